"""The instruments that follow every training step, not only the measured ones: the flight
recorder (:mod:`.flight`) and the gradient noise scale (:mod:`.noise_scale_recorder`).

:class:`StepInstruments` hands each of the callback's hooks to the instruments switched on,
each call guarded by the fit's :class:`~gradtrace.measure.faults.Faults` (a failing
instrument is switched off with one warning; training goes on).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from gradtrace.gradient_flow.fit_layers import FitLayers
from gradtrace.gradient_flow.flight import FitFlightRecorder, Spike
from gradtrace.gradient_flow.noise_scale_recorder import NoiseScaleRecorder
from gradtrace.measure.faults import Faults

__all__ = ["StepInstruments"]


class StepInstruments:
    """One fit's flight recorder (``None``: off) and noise scale recorder, guarded by
    ``faults``."""

    def __init__(
        self, faults: Faults, flight: FitFlightRecorder | None, noise_scale: NoiseScaleRecorder
    ) -> None:
        self._faults = faults
        self._flight = flight
        self._noise_scale = noise_scale

    @property
    def spikes(self) -> list[Spike]:
        """What the flight recorder found in this fit (none when it is off)."""
        return list(self._flight.spikes) if self._flight is not None else []

    def _flight_run(self, method: str, *args: Any) -> None:
        if self._flight is not None:
            self._faults.run("flight_recorder", getattr(self._flight, method), *args)

    def _noise_run(self, method: str, *args: Any) -> Any:
        if self._noise_scale.requested:
            return self._faults.run("noise_scale", getattr(self._noise_scale, method), *args)
        return None

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: FitLayers,
        run_dir: Path,
        rank_of: Callable[[str], Any],
    ) -> None:
        """At train start, once the layers are known: ``run_dir`` takes the spike files."""
        fit = (trainer, pl_module, layers.layers, layers.fsdp1_groups, run_dir, rank_of)
        self._flight_run("start", *fit)
        self._noise_run("start", trainer, pl_module)

    def batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        measured: Callable[[], bool],
    ) -> None:
        """A training batch starts; ``measured()`` says whether it is measured."""
        if self._noise_scale.requested and measured():
            self._noise_run("batch_start", trainer, pl_module, batch, batch_idx)

    def before_backward(self, loss: torch.Tensor) -> None:
        self._flight_run("before_backward", loss)
        self._noise_run("backward_start")

    def after_backward(self) -> None:
        self._noise_run("backward_end")
        self._flight_run("resume")

    def pause(self) -> None:
        """Validation runs inside a training epoch: its forward passes are not recorded."""
        self._flight_run("pause")

    def resume(self) -> None:
        self._flight_run("resume")

    def before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        namespace: str,
    ) -> dict[str, float]:
        """Before the gradient statistics (the noise scale's collective must not wait on
        them, and a ``NonFiniteGradientError`` they raise ends the batch): the step's noise
        scale scalars, named under ``namespace`` (empty when none)."""
        self._flight_run("before_optimizer_step", optimizer)
        return self._noise_run("step", trainer, pl_module, optimizer, namespace) or {}

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stepped: bool) -> None:
        """The batch is over; ``stepped``: an optimizer stepped in it."""
        self._flight_run("batch_end", trainer, pl_module)
        self._noise_run("batch_end", stepped)

    def train_end(self, trainer: pl.Trainer) -> None:
        self._noise_scale.close()
        self._flight_run("train_end", trainer)

    def exception(self, trainer: pl.Trainer) -> None:
        self._noise_scale.close()
        self._flight_run("exception", trainer)
