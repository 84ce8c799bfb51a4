"""``GradientFlow``: the Lightning callback on top of :mod:`gradtrace.measure`.

* :mod:`~gradtrace.gradient_flow.callback`: :class:`GradientFlow`, its hooks;
* :mod:`~gradtrace.gradient_flow.fit_state`: what it holds for one fit, the steps of a fit;
* :mod:`~gradtrace.gradient_flow.settings`: its arguments' checks, and the train-start warnings;
* :mod:`~gradtrace.gradient_flow.cadence`: :func:`is_measured_step`, which steps are measured;
* :mod:`~gradtrace.gradient_flow.fit_layers`: a fit's layers, each optimizer's plan, histograms;
* :mod:`~gradtrace.gradient_flow.step`: one optimizer step's layers, measured;
* :mod:`~gradtrace.gradient_flow.held_records`: a batch's records, held until the batch ends;
* :mod:`~gradtrace.gradient_flow.activation_recorder`: activations on measured batches;
* :mod:`~gradtrace.gradient_flow.step_instruments`: the instruments of every step, the flight
  recorder (:mod:`~gradtrace.gradient_flow.flight`) and the gradient noise scale
  (:mod:`~gradtrace.gradient_flow.noise_scale_recorder`);
* :mod:`~gradtrace.gradient_flow.reporting`: records to the history, the CSV and the loggers;
* :mod:`~gradtrace.gradient_flow.output_dir`: where the CSV and plots go;
* :mod:`~gradtrace.gradient_flow.figures`: the plots of a fit.

Needs torch and Lightning at import; plots need matplotlib (the ``plot`` extra).
"""

from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.callback import GradientFlow
from gradtrace.measure.diagnosis import GradientFlowWarning, NonFiniteGradientError

__all__ = [
    "GradientFlow",
    "GradientFlowWarning",
    "NonFiniteGradientError",
    "is_measured_step",
    "logging_step",
]
