"""Shared test helpers: tiny models, fits and independent captures (no test imports another
test file)."""
