"""Per-layer gradient measurement for Lightning: the ``GradientFlow`` callback and its pieces.

Needs only torch and Lightning at import; plots need matplotlib (the ``plot`` extra).
"""

from gradtrace.gradient_flow.callback import (
    STATS,
    GradientFlow,
    GradientFlowWarning,
    NonFiniteGradientError,
    input_output_ratio,
    parameter_names,
    read_history,
)

__all__ = [
    "STATS",
    "GradientFlow",
    "GradientFlowWarning",
    "NonFiniteGradientError",
    "input_output_ratio",
    "parameter_names",
    "read_history",
]
