"""Where ``GradientFlow``'s records go (global rank 0): the bounded history, the CSV file in the
run directory and the loggers, under a metric namespace each callback of a Trainer has to
itself."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradtrace.gradient_flow.step import Measurement
from gradtrace.measure.activations import ACTIVATION_STATS
from gradtrace.measure.faults import Faults
from gradtrace.measure.optimizer_stats import optimizer_columns
from gradtrace.measure.records import BoundedHistory, CsvRecords

__all__ = [
    "DEFAULT_FILENAME",
    "FLUSH_INTERVAL_S",
    "NAMESPACE",
    "RecordOutlets",
    "log_summary",
    "metric_namespaces",
    "optimizer_suffix",
    "record_columns",
]

NAMESPACE = "grad_flow"
"""Prefix of the metric names of the first (or only) ``GradientFlow`` of a Trainer."""
DEFAULT_FILENAME = "gradient_flow.csv"
FLUSH_INTERVAL_S = 60.0
"""The CSV is written at least this often (seconds), even inside a long epoch."""


def record_columns(
    stats: Sequence[str],
    *,
    optimizer_stats: bool,
    adam: bool,
    scaler_in_use: bool,
    activations: bool,
) -> list[str]:
    """The columns of every record and of the CSV, in order: ``step``, ``layer``, ``stats``,
    then the optimizer side when recorded (``adam``: with Adam's moments), ``scaler_skipped``
    (under a GradScaler) and the activation statistics when recorded."""
    columns = ["step", "layer", *stats]
    if optimizer_stats:
        columns += optimizer_columns(adam)
    if scaler_in_use:
        columns.append("scaler_skipped")
    if activations:
        columns += ACTIVATION_STATS
    return columns


def metric_namespaces(filenames: Sequence[str]) -> list[str]:
    """The metric namespace of each ``GradientFlow`` of one Trainer, given their file names in
    the Trainer's order: ``grad_flow``; for a second and later one ``grad_flow-<file stem>``
    (unless it keeps the default file name); ``-2``, ``-3``, ... after a name already taken."""
    taken: list[str] = []
    for filename in filenames:
        base = NAMESPACE
        if len(filenames) > 1 and filename != DEFAULT_FILENAME:
            base = f"{NAMESPACE}-{Path(filename).stem}"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.append(name)
    return taken


def log_summary(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    measured: Measurement,
    namespace: str,
) -> dict[str, float]:
    """The summary scalars of ``optimizer``'s step (:func:`optimizer_suffix` after their
    names), also logged through ``pl_module``."""
    summary = measured.summary_values(namespace, optimizer_suffix(trainer, optimizer))
    for key, value in summary.items():
        # The loggers get them with the per-layer values (step 0 included); this is for
        # EarlyStopping, ModelCheckpoint and the progress bar.
        pl_module.log(key, value, on_step=True, on_epoch=False, logger=False)
    return summary


def optimizer_suffix(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
    """What follows a summary scalar's name: ``/optimizer_<i>`` for the trainer's second and
    later optimizers, nothing for the first."""
    index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
    return f"/optimizer_{index}" if index else ""


class RecordOutlets:
    """One fit's way out for records: ``history`` (kept across a resumed fit by the callback),
    the CSV once :meth:`open_csv` started it, and the loggers; each guarded by ``faults``."""

    def __init__(self, history: BoundedHistory, faults: Faults) -> None:
        self.history = history
        self.csv: CsvRecords | None = None
        self._faults = faults
        self._last_flush = time.monotonic()

    def open_csv(self, path: Path, columns: Sequence[str], resume_step: int | None) -> Path:
        """Start the CSV at ``path`` (``resume_step``: as :meth:`CsvRecords.start`) and return
        the file it writes: ``path``, or a ``-v<N>`` file beside an earlier fit's records,
        which one info line points out."""
        with self._faults.guard("files"):
            self.csv = CsvRecords(path, columns)
            earlier = self.csv.start(resume_step)
            path = self.csv.path
            if earlier is not None:
                rank_zero_info(
                    f"GradientFlow: {earlier} holds an earlier fit's records; this fit "
                    f"writes {path.name} beside it"
                )
        return path

    def emit(
        self,
        loggers: Sequence[Any],
        records: list[dict[str, Any]],
        summary: dict[str, float],
        namespace: str,
        value_columns: Sequence[str],
    ) -> None:
        """Store, write and log the records of one optimizer step: the one place records
        leave the callback. The CSV is flushed when it has waited :data:`FLUSH_INTERVAL_S`."""
        if not records:
            return
        self.history.extend(records)
        if self.csv is not None:
            self._faults.run("files", self.csv.add, records)
        self._faults.run(
            "loggers", _log_metrics, loggers, namespace, value_columns, records, summary
        )
        if time.monotonic() - self._last_flush > FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write the CSV's buffered rows."""
        self._last_flush = time.monotonic()
        if self.csv is not None:
            self._faults.run("files", self.csv.flush)


def _log_metrics(
    loggers: Sequence[Any],
    namespace: str,
    value_columns: Sequence[str],
    records: list[dict[str, Any]],
    summary: dict[str, float],
) -> None:
    """Send ``<namespace>/<column>/<layer>`` for each value the records hold, with the
    summary scalars (already named), to every logger at the records' step."""
    metrics = {
        f"{namespace}/{column}/{record['layer']}": record[column]
        for record in records
        for column in value_columns
        if column in record
    }
    metrics.update(summary)
    for logger in loggers:
        logger.log_metrics(metrics, step=records[0]["step"])
