"""gradtrace: watch gradients flow through deep image classifiers, and fix them when they vanish."""

__version__ = "0.1.0"
