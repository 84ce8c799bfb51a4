"""gradtrace's figures: gradient flow (with an activation panel when recorded), several runs
overlaid, a layer x step heatmap, training curves, the probe's models side by side, the
coordinate check's layers across width, the flight recorder's spikes; saved to files and sent
to loggers.

matplotlib is an optional dependency (``pip install 'gradtrace[plot]'``), imported inside the
functions, so importing this package costs nothing.
"""

from gradtrace.plots.coord_check import plot_coord_check
from gradtrace.plots.curves import plot_training_curves
from gradtrace.plots.flow import (
    has_activation_stats,
    layer_summary,
    plot_activation_flow,
    plot_gradient_flow,
    plot_gradient_heatmap,
    plot_runs,
)
from gradtrace.plots.probe import plot_probe
from gradtrace.plots.spike import plot_spike
from gradtrace.plots.style import save_figure, send_to_loggers

__all__ = [
    "has_activation_stats",
    "layer_summary",
    "plot_activation_flow",
    "plot_coord_check",
    "plot_gradient_flow",
    "plot_gradient_heatmap",
    "plot_probe",
    "plot_runs",
    "plot_spike",
    "plot_training_curves",
    "save_figure",
    "send_to_loggers",
]
