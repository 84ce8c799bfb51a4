"""``GradientFlow(flight_recorder=K)``: the Lightning side of the flight recorder.

:class:`FitFlightRecorder` feeds a :class:`~gradtrace.measure.flight_recorder.FlightRecorder`
from the callback's hooks at every training step (the loss in ``on_before_backward``, the
gradients and a copy of the weights in ``on_before_optimizer_step``, the row at batch end),
checks it every ``max(1, K // 4)`` steps, at the end of the fit and when training fails, and
on a spike writes ``spike_<step>.csv`` and ``spike_<step>.png`` into the run directory
(global rank 0) and warns once per fit. What is found is kept in :attr:`spikes`.
"""

from __future__ import annotations

import csv
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradtrace.compat import loss_scale_tensor, optimizer_handles_unscaling
from gradtrace.gradient_flow.cadence import logging_step
from gradtrace.gradient_flow.figures import matplotlib_missing
from gradtrace.measure.activation_catalog import activation_sources
from gradtrace.measure.departures import SIDES, Departure, first_departure
from gradtrace.measure.diagnosis import GradientFlowWarning
from gradtrace.measure.eager_hooks import contains_compiled
from gradtrace.measure.flight_recorder import FlightRecorder
from gradtrace.measure.selection import Layer
from gradtrace.measure.shards import FSDP1Groups

__all__ = ["MAX_DUMPS", "FitFlightRecorder", "Spike"]

MAX_DUMPS = 5
"""Spikes written per fit at most (a run that keeps spiking would fill the disk)."""
_COLUMNS = {"gradient": "grad_l2", "update": "update_l2", "activation": "act_rms"}

_Method = TypeVar("_Method", bound=Callable[..., Any])


@dataclass(frozen=True)
class Spike:
    """A loss spike (or a non-finite loss or value) the flight recorder found."""

    step: int
    """The step whose loss spiked or where something first went non-finite."""
    loss: float
    """The mean loss over ranks at that step."""
    z: float
    """The loss's robust z-score (``inf`` when something went non-finite)."""
    departure_step: int | None
    """The step at which the first series left its own history (``None``: none did)."""
    layer: str | None
    """That series' layer."""
    side: str | None
    """That series' side: ``"activation"``, ``"gradient"`` or ``"update"``."""
    factor: float | None
    """Its value over its median of the previous steps (nan when not finite)."""
    path: Path
    """The ``spike_<step>.csv`` written by global rank 0 (the figure beside it)."""


def _closes_on_error(method: _Method) -> _Method:
    """A failing method removes the recorder's module hooks before the error switches the
    feature off: nothing of it keeps running in the model."""

    @functools.wraps(method)
    def run(self: FitFlightRecorder, *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception:
            self.close()
            raise

    return run  # type: ignore[return-value]


class FitFlightRecorder:
    """One fit's flight recorder of ``capacity`` steps, spikes at a loss robust z over
    ``threshold``, a figure beside each spike's CSV when ``plot`` (and matplotlib). Each method
    is one of the callback's hooks, run guarded by its faults."""

    def __init__(self, capacity: int, threshold: float, plot: bool = True) -> None:
        self.capacity = capacity
        self.threshold = threshold
        self.plot = plot
        self.spikes: list[Spike] = []
        """What this fit's checks found, in the order found."""
        self._recorder: FlightRecorder | None = None
        self._interval = max(1, capacity // 4)
        self._scaler: Any = None
        self._run_dir = Path()
        self._rank_of: Callable[[str], Any] = str
        self._stepped = self._open = self._warned = False

    @_closes_on_error
    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: Sequence[Layer],
        fsdp1_groups: FSDP1Groups | None,
        run_dir: Path,
        rank_of: Callable[[str], Any],
    ) -> None:
        """A new, empty recorder on the training device; hooks on the layers' modules unless
        the model is compiled (hooks inside a compiled graph would recompile it)."""
        self.close()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._run_dir, self._rank_of = run_dir, rank_of
        device = trainer.strategy.root_device
        self._recorder = FlightRecorder(layers, self.capacity, device, fsdp1_groups)
        if contains_compiled(pl_module):
            rank_zero_info(
                "GradientFlow flight recorder: the model is compiled (torch.compile), so it "
                "records gradients, updates and the loss but no activations"
            )
            return
        sources, _ = activation_sources(((y.name, y.module) for y in layers), pl_module)
        self._recorder.attach(sources)

    def pause(self) -> None:
        """Forward passes until :meth:`resume` are not the step's (backward's recomputation,
        validation)."""
        if self._recorder is not None:
            self._recorder.paused = True

    def resume(self) -> None:
        if self._recorder is not None:
            self._recorder.paused = False

    @_closes_on_error
    def before_backward(self, loss: torch.Tensor) -> None:
        """Add the loss (without the GradScaler's scale) and stop counting activations."""
        recorder = self._recorder
        if recorder is not None:
            scale = loss_scale_tensor(self._scaler) if self._scaler is not None else None
            recorder.add_loss(loss, scale)
            recorder.paused = self._open = True

    @_closes_on_error
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the gradients ``optimizer`` is about to use and copy its layers' weights."""
        recorder = self._recorder
        if recorder is None:
            return
        self._stepped = self._open = True
        recorder.finish_updates()  # another optimizer of this batch has stepped
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scale = None
        if self._scaler is not None and optimizer_handles_unscaling(optimizer):
            scale = loss_scale_tensor(self._scaler)  # Lightning did not unscale
        recorder.add_gradients(params, scale)
        recorder.snapshot_weights(params)

    @_closes_on_error
    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the step's row once its optimizers stepped; check every ``K // 4`` rows."""
        recorder = self._recorder
        if recorder is None:
            return
        recorder.finish_updates()
        # Automatic optimization may accumulate over several batches before it steps.
        if self._stepped or not pl_module.automatic_optimization:
            recorder.end_step(logging_step(trainer))
            self._stepped = self._open = False
        if recorder.unchecked >= self._interval:
            self._check(trainer, recorder)

    @_closes_on_error
    def train_end(self, trainer: pl.Trainer) -> None:
        """Check the rows since the last check, then remove the hooks."""
        if self._recorder is not None:
            self._check(trainer, self._recorder)
        self.close()

    @_closes_on_error
    def exception(self, trainer: pl.Trainer) -> None:
        """Training failed: write the unfinished step's row and check (one process only: a
        collective could wait forever for ranks that did not fail), then remove the hooks."""
        recorder = self._recorder
        if recorder is not None and trainer.world_size == 1:
            recorder.finish_updates()
            if self._open:
                recorder.end_step(logging_step(trainer))
            self._check(trainer, recorder)
        self.close()

    def close(self) -> None:
        """Remove the module hooks (safe to call twice)."""
        if self._recorder is not None:
            self._recorder.close()

    def _check(self, trainer: pl.Trainer, recorder: FlightRecorder) -> None:
        """The spike rule on the rows since the last check (every rank alike); each new spike
        is read, written and reported, up to :data:`MAX_DUMPS` per fit."""
        found = recorder.check(self.threshold, scaler_in_use=self._scaler is not None)
        for row, loss, z in found:
            if len(self.spikes) < MAX_DUMPS:
                self._read_spike(trainer, recorder, row, loss, z)

    def _read_spike(
        self, trainer: pl.Trainer, recorder: FlightRecorder, row: int, loss: float, z: float
    ) -> None:
        """Read the ring around the spike at ``row`` (every rank), find the first departure,
        and on global rank 0 write the CSV and figure and warn (once per fit)."""
        rows, steps, losses = recorder.window()
        norms = recorder.norms(rows)  # every rank: one all_gather under several processes
        names = recorder.names
        order = sorted(range(len(names)), key=lambda i: self._rank_of(names[i]))
        spike_row = rows.index(row)
        scaled = self._scaler is not None
        departure, z_scores = first_departure(norms, spike_row, order, self.threshold, scaled)
        step = steps[spike_row]
        path = self._run_dir / f"spike_{step}.csv"
        found = _spike(step, loss, z, departure, steps, names, path)
        self.spikes.append(found)
        if not trainer.is_global_zero:
            return
        self._run_dir.mkdir(parents=True, exist_ok=True)
        layers = [names[i] for i in order]
        _write_csv(path, steps, losses, layers, norms[:, :, order], z_scores[:, :, order])
        if not self._warned:
            self._warned = True
            warnings.warn(_message(found), GradientFlowWarning, stacklevel=2)
        if self.plot and matplotlib_missing() is None:
            from gradtrace.plots.spike import plot_spike
            from gradtrace.plots.style import save_figure

            values = {side: norms[:, k, order].tolist() for k, side in enumerate(SIDES)}
            mark = None if found.layer is None else (found.departure_step, found.layer, found.side)
            fig = plot_spike(steps, losses, layers, values, spike_step=step, departure=mark)
            save_figure(fig, path.with_suffix(".png"))


def _spike(
    step: int,
    loss: float,
    z: float,
    departure: Departure | None,
    steps: Sequence[int],
    names: Sequence[str],
    path: Path,
) -> Spike:
    if departure is None:
        return Spike(step, loss, z, None, None, None, None, path)
    where = steps[departure.row]
    return Spike(
        step, loss, z, where, names[departure.layer], departure.side, departure.factor, path
    )


def _message(spike: Spike) -> str:
    """The one warning of a fit: what spiked, what departed first, where the details are."""
    if math.isfinite(spike.z):
        what = f"the loss spiked at step {spike.step} ({spike.loss:.4g}, robust z {spike.z:.3g})"
    elif math.isfinite(spike.loss):
        what = f"a layer's statistics went non-finite at step {spike.step}"
    else:
        what = f"the loss went non-finite at step {spike.step} ({spike.loss})"
    if spike.layer is None:
        first = "no layer departed from its own history before it"
    else:
        factor = spike.factor
        size = "non-finite"
        if factor is not None and math.isfinite(factor):
            size = f"x{factor:,.0f} its median" if factor >= 10 else f"x{factor:.2g} its median"
        first = (
            f"the first to depart from its own history was the {spike.side} of {spike.layer} "
            f"at step {spike.departure_step} ({size})"
        )
    return (
        f"GradientFlow flight recorder: {what}; {first}; details: {spike.path} "
        "(later spikes of this fit are written without a warning)"
    )


def _write_csv(
    path: Path,
    steps: Sequence[int],
    losses: Sequence[float],
    layers: Sequence[str],
    norms: torch.Tensor,
    z: torch.Tensor,
) -> None:
    """One row per (step, layer): the loss, the three norms and their robust z-scores (blank
    where a series has too little history)."""
    columns = [_COLUMNS[side] for side in SIDES]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "layer", "loss", *columns, *(f"{c}_z" for c in columns)])
        for t, (step, loss) in enumerate(zip(steps, losses)):
            for k, layer in enumerate(layers):
                scores = ["" if math.isnan(v) else v for v in z[t, :, k].tolist()]
                writer.writerow([step, layer, loss, *norms[t, :, k].tolist(), *scores])
