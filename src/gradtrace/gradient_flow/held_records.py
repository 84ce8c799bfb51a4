"""A training batch's records, held from the optimizer steps that measure them until the batch
ends: its activation statistics and the optimizer side of its steps are known only then."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from gradtrace.gradient_flow.activation_recorder import ActivationRecorder
from gradtrace.gradient_flow.cadence import logging_step
from gradtrace.measure.faults import Faults
from gradtrace.measure.optimizer_stats import OptimizerStep, optimizer_columns

__all__ = ["HeldRecords", "PendingOptimizerStep", "StepRecords"]


@dataclass
class PendingOptimizerStep:
    """The optimizer side of a measured step, to fill into its records once it has stepped."""

    step: OptimizerStep
    record_rows: list[int]
    """The row of :attr:`OptimizerStep.params` of each record, in the records' order."""
    clipped_norm_key: str
    """The summary scalar of the gradient norm after clipping."""
    adam: bool
    """Whether the records have the Adam moment columns."""

    def fill(self, records: list[dict[str, Any]], summary: dict[str, float]) -> None:
        """Fill the values into ``records`` and ``summary`` (every rank: sharded parameters'
        partial sums are combined in one collective); NaN when the step never ran."""
        values = self.step.finish()
        if values is None:
            self._fill_nan(records)
            summary[self.clipped_norm_key] = math.nan
            return
        for record, row in zip(records, self.record_rows):
            columns = values.columns(row)
            record.update({key: columns[key] for key in optimizer_columns(self.adam)})
        summary[self.clipped_norm_key] = values.grad_norm_clipped

    def abandon(self, records: list[dict[str, Any]]) -> None:
        """The batch failed before the step: its values are NaN."""
        self.step.abandon()
        self._fill_nan(records)

    def _fill_nan(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            record.update(dict.fromkeys(optimizer_columns(self.adam), math.nan))


@dataclass
class StepRecords:
    """One optimizer step's records and summary scalars, and its optimizer side to come."""

    records: list[dict[str, Any]]
    summary: dict[str, float]
    optimizer_side: PendingOptimizerStep | None = None


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
        """The batch is over: hand over its records, with their optimizer side once the
        optimizer has ``stepped`` (a failed batch abandons it), and hold none. Every rank
        calls it (sharded parameters' optimizer side is combined in a collective)."""
        steps, self._steps = self._steps, []
        for step in steps:
            pending = step.optimizer_side
            if pending is not None and stepped and faults.active("optimizer_stats"):
                faults.run("optimizer_stats", pending.fill, step.records, step.summary)
            elif pending is not None:
                pending.abandon(step.records)
        return steps
