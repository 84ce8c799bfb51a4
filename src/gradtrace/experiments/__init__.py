"""Experiments built on gradtrace: the demo, sweeps and the Table 1 reproduction."""
