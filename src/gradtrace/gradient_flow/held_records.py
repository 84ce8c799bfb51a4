"""A training batch's records, held from the optimizer steps that measure them until the batch
ends: its activation statistics and update ratios are known only then."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from gradtrace.gradient_flow.activation_recorder import ActivationRecorder
from gradtrace.gradient_flow.cadence import logging_step
from gradtrace.measure.faults import Faults
from gradtrace.measure.update_ratio import PendingUpdate

__all__ = ["HeldRecords", "StepRecords"]


@dataclass
class StepRecords:
    """One optimizer step's records and summary scalars, and its update ratios to come."""

    records: list[dict[str, Any]]
    summary: dict[str, float]
    update: PendingUpdate | None = None


class HeldRecords:
    """The records of the batch being trained, one :class:`StepRecords` per optimizer step."""

    def __init__(self) -> None:
        self._steps: list[StepRecords] = []

    def hold(
        self,
        records: list[dict[str, Any]],
        summary: dict[str, float],
        scaler_skipped: bool | None,
    ) -> StepRecords:
        """Hold one optimizer step's records until the batch ends. ``scaler_skipped``:
        ``None`` without a GradScaler, else whether it skips the step (inf/nan gradients),
        which every record then says in its ``scaler_skipped`` column."""
        if scaler_skipped is not None:
            for record in records:
                record["scaler_skipped"] = int(scaler_skipped)
        step = StepRecords(records, summary)
        self._steps.append(step)
        return step

    def add_activation_stats(
        self, trainer: pl.Trainer, recorder: ActivationRecorder, faults: Faults
    ) -> None:
        """Read the measured batch's activation statistics from ``recorder`` (every rank: one
        all_reduce) into its records; say which layers got none, and diagnose dead or
        saturated units (global rank 0)."""
        stats: dict[str, dict[str, float]] = {}
        with faults.guard("activations"):
            stats = recorder.finish(trainer)
        for step in self._steps:
            for record in step.records:
                record.update(stats.get(record["layer"], {}))
        if not stats:
            return
        blank = (r["layer"] for s in self._steps for r in s.records if "act_mean" not in r)
        recorder.report_blank(trainer, blank)
        if trainer.is_global_zero:
            faults.run("diagnosis", recorder.diagnose, logging_step(trainer), stats)

    def release(self, *, stepped: bool, faults: Faults) -> list[StepRecords]:
        """The batch is over: hand over its records, with their update ratios once the
        optimizer has ``stepped`` (a failed batch abandons them), and hold none."""
        steps, self._steps = self._steps, []
        for step in steps:
            if step.update is not None and stepped:
                faults.run("update_ratio", step.update.finish)
            elif step.update is not None:
                step.update.abandon()
        return steps
