"""The measuring core: exact per-layer gradient statistics with torch alone.

Usable in any training loop (plain PyTorch, Fabric, Hugging Face), with no Lightning::

    from gradtrace.measure import grad_stats
    loss.backward()
    table = grad_stats(model)  # {layer name: {"mean_abs": ..., "l2": ..., ...}}

* :mod:`~gradtrace.measure.stats`: :func:`grad_stats`, one process, DDP, FSDP, DTensor, ZeRO;
* :mod:`~gradtrace.measure.selection`: :func:`select_layers`, which parameters are layers;
* :mod:`~gradtrace.measure.order`: data-flow order (where each gradient enters the backward);
* :mod:`~gradtrace.measure.shards` and :mod:`~gradtrace.measure.collectives`: sharded
  gradients and the collectives that combine them;
* :mod:`~gradtrace.measure.histograms`, :mod:`~gradtrace.measure.optimizer_stats` (what the
  optimizer did with the gradients), :mod:`~gradtrace.measure.activations` (with
  :mod:`~gradtrace.measure.activation_catalog` and :mod:`~gradtrace.measure.activation_sums`),
  :mod:`~gradtrace.measure.flight_recorder` (every step's per-layer norms on the device, and
  :mod:`~gradtrace.measure.departures`: loss spikes and which layer left its history first),
  :mod:`~gradtrace.measure.noise_scale` (the gradient noise scale): the other instruments;
* :mod:`~gradtrace.measure.diagnosis`, :mod:`~gradtrace.measure.faults`,
  :mod:`~gradtrace.measure.records`: warnings, guarded features, the history and its CSV;
* :mod:`~gradtrace.measure.probe`: :func:`probe`, a model's gradient and activation flow on
  one batch, over several seeds, without a training run;
* :mod:`~gradtrace.measure.coord_check`: :func:`coord_check`, each layer's scale across width
  after a few steps (muP's coordinate check).

The functions :func:`probe` and :func:`coord_check` take the names ``gradtrace.measure.probe``
and ``gradtrace.measure.coord_check`` here: reach the modules with ``from
gradtrace.measure.probe import ...`` (``import gradtrace.measure.probe as m`` gives the
function).
"""

from gradtrace.measure.coord_check import CoordCheckResult, coord_check
from gradtrace.measure.diagnosis import GradientFlowWarning, NonFiniteGradientError
from gradtrace.measure.probe import ProbeResult, probe, random_batch
from gradtrace.measure.records import input_output_ratio, read_history
from gradtrace.measure.selection import Layer, parameter_names, select_layers
from gradtrace.measure.stats import STATS, grad_stats, grad_stats_table

__all__ = [
    "STATS",
    "CoordCheckResult",
    "GradientFlowWarning",
    "Layer",
    "NonFiniteGradientError",
    "ProbeResult",
    "coord_check",
    "grad_stats",
    "grad_stats_table",
    "input_output_ratio",
    "parameter_names",
    "probe",
    "random_batch",
    "read_history",
    "select_layers",
]
