"""What ``GradientFlow`` holds for one fit (rebuilt by every ``fit``), and the steps of a fit
that use it: finding the layers, measuring an optimizer step's gradients, releasing a batch's
records.

The callback keeps what outlives a fit (its settings, the history, the layer order, the
diagnoses, the noise scale's running average: what a checkpoint restores); :class:`FitState`
keeps the rest: which features failed, the layers and their plans, the records held until a
batch ends, where records go, the figures, the activation recorder and the every-step
instruments.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from gradtrace.gradient_flow.activation_recorder import ActivationDiagnosis, ActivationRecorder
from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.figures import FitFigures
from gradtrace.gradient_flow.fit_layers import FitLayers
from gradtrace.gradient_flow.flight import FitFlightRecorder
from gradtrace.gradient_flow.held_records import HeldRecords
from gradtrace.gradient_flow.noise_scale_recorder import NoiseScaleRecorder
from gradtrace.gradient_flow.reporting import RecordOutlets, log_summary, optimizer_suffix
from gradtrace.gradient_flow.settings import deepspeed_zero_stage, warn_about_fit_settings
from gradtrace.gradient_flow.step_instruments import StepInstruments
from gradtrace.measure.diagnosis import Diagnosis
from gradtrace.measure.faults import Faults
from gradtrace.measure.noise_scale import RunningNoiseScale
from gradtrace.measure.optimizer_stats import is_adam_family
from gradtrace.measure.order import LayerOrder
from gradtrace.measure.records import BoundedHistory

__all__ = ["FitState"]


class FitState:
    """One fit's state for a ``GradientFlow`` with these settings (see its arguments)."""

    def __init__(
        self,
        *,
        order: LayerOrder,
        history: BoundedHistory,
        histogram_every_n_steps: int | None,
        optimizer_stats: bool,
        plot: bool,
        log_scale: bool,
        activation_diagnosis: ActivationDiagnosis,
        flight_recorder: int | None,
        spike_threshold: float,
        noise_scale: bool,
        noise_scale_average: RunningNoiseScale,
    ) -> None:
        self.faults = Faults()
        self.scaler_in_use = False
        self.adam_in_use = False
        self.grads_unavailable = False  # DeepSpeed: the optimizer steps flat partitions
        self.layers = FitLayers(order, self.faults, histogram_every_n_steps, optimizer_stats)
        self.held = HeldRecords()
        self.stepped = False
        """Whether an optimizer stepped in the batch being trained."""
        self.epoch_first_step = 0
        self.outlets = RecordOutlets(history, self.faults)
        self.figures = FitFigures(self.faults, plot, log_scale, order.rank_of)
        self.activations = ActivationRecorder(activation_diagnosis)
        flight = None
        if flight_recorder is not None:
            flight = FitFlightRecorder(flight_recorder, spike_threshold, plot)
        recorder = NoiseScaleRecorder(noise_scale_average, noise_scale)
        self.instruments = StepInstruments(self.faults, flight, recorder)

    def configure(self, trainer: pl.Trainer) -> None:
        """What the Trainer decides about the records' columns: a GradScaler, Adam."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler_in_use = scaler is not None and scaler.is_enabled()
        self.adam_in_use = any(is_adam_family(optimizer) for optimizer in trainer.optimizers)

    def select_layers(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        include: Sequence[str | type],
        exclude: Sequence[str | type],
        every_n_steps: int | None,
    ) -> None:
        """Find the layers, then warn about settings that they and the Trainer make unusable."""
        with self.faults.guard("gradients"):
            self.layers.select(trainer, pl_module, include, exclude)
            zero_stage = deepspeed_zero_stage(trainer.strategy)
            self.grads_unavailable = zero_stage is not None
            warn_about_fit_settings(
                zero_stage=zero_stage,
                log_every_n_steps=trainer.log_every_n_steps,
                every_n_steps=every_n_steps,
            )

    def measured(self, trainer: pl.Trainer, every_n_steps: int | None) -> bool:
        """:func:`~.cadence.is_measured_step`, guarded: ``False`` when it fails."""
        measured = False
        with self.faults.guard("gradients"):
            measured = is_measured_step(trainer, every_n_steps)
        return measured

    def measure_gradients(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        *,
        stats: Sequence[str],
        namespace: str,
        diagnosis: Diagnosis,
        extra_summary: dict[str, float],
    ) -> int | None:
        """Measure ``optimizer``'s layers (every rank) and hold their records until the batch
        ends, with what the same gradients feed: the summary (plus ``extra_summary``, the
        step's noise scale), histograms, the optimizer side, the vanishing/exploding check
        and the non-finite check. Returns the step measured (``None``: no gradient)."""
        step = logging_step(trainer)
        measured = self.layers.measure(trainer, optimizer)
        if measured is None:
            return None
        summary = log_summary(trainer, pl_module, optimizer, measured, namespace)
        summary.update(extra_summary)
        scaler_skipped = measured.any_nonfinite if self.scaler_in_use else None
        held = self.held.hold(measured.records(step, stats), summary, scaler_skipped)
        self.layers.send_histograms_if_due(trainer, measured, step)
        clipped_norm_key = f"{namespace}/grad_norm_clipped{optimizer_suffix(trainer, optimizer)}"
        held.optimizer_side = self.layers.start_optimizer_side(
            trainer, optimizer, measured, clipped_norm_key, self.adam_in_use
        )
        if trainer.is_global_zero:
            self.faults.run("diagnosis", diagnosis.check_path, step, measured.path_means())
        if not scaler_skipped:  # a GradScaler skips such steps: expected in fp16
            nonfinite = measured.nonfinite_layers()
            diagnosis.nonfinite(step, nonfinite, report=trainer.is_global_zero)
        return step

    def end_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        value_columns: Sequence[str],
        namespace: str,
    ) -> None:
        """A training batch is over: the layer order settles, a measured step that stepped
        gets its activation statistics, and its records are released."""
        self.layers.end_order_watch()
        # Automatic optimization may accumulate over several batches before it steps.
        stepped = self.stepped or not pl_module.automatic_optimization
        if self.activations.attached and stepped:
            self.held.add_activation_stats(trainer, self.activations, self.faults)
        self.release_records(trainer, value_columns, namespace, stepped=True)
        self.instruments.batch_end(trainer, pl_module, stepped)

    def release_records(
        self, trainer: pl.Trainer, value_columns: Sequence[str], namespace: str, *, stepped: bool
    ) -> None:
        """The batch is over: store, write and log its records (global rank 0; every rank
        takes part in combining sharded optimizer-side values)."""
        for held in self.held.release(stepped=stepped, faults=self.faults):
            if trainer.is_global_zero:
                self.outlets.emit(
                    trainer.loggers, held.records, held.summary, namespace, value_columns
                )
