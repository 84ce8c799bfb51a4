"""Per-layer gradient measurement for Lightning: the ``GradientFlow`` callback and its pieces.

* :mod:`~gradtrace.gradient_flow.stats`: :func:`grad_stats`, exact per-layer statistics under
  one process, DDP, FSDP and DTensor (one collective when gradients are sharded);
* :mod:`~gradtrace.gradient_flow.selection`: :func:`select_layers`, which parameters are layers;
* :mod:`~gradtrace.gradient_flow.cadence`: :func:`is_measured_step`, which steps are measured;
* :mod:`~gradtrace.gradient_flow.callback`: :class:`GradientFlow`, the Lightning callback.

Needs only torch and Lightning at import; plots need matplotlib (the ``plot`` extra).
"""

from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.callback import GradientFlow
from gradtrace.gradient_flow.diagnosis import GradientFlowWarning, NonFiniteGradientError
from gradtrace.gradient_flow.records import input_output_ratio, read_history
from gradtrace.gradient_flow.selection import Layer, parameter_names, select_layers
from gradtrace.gradient_flow.stats import STATS, grad_stats, grad_stats_table

__all__ = [
    "STATS",
    "GradientFlow",
    "GradientFlowWarning",
    "Layer",
    "NonFiniteGradientError",
    "grad_stats",
    "grad_stats_table",
    "input_output_ratio",
    "is_measured_step",
    "logging_step",
    "parameter_names",
    "read_history",
    "select_layers",
]
