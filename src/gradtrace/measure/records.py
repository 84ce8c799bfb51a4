"""Recorded values: the bounded in-memory history, the CSV file, and reading a CSV back.

A record is one dict per (step, layer): ``step``, ``layer``, one key per statistic, and
``scaler_skipped`` when a GradScaler is in use. The CSV keeps every record; memory keeps the
last ``per_layer`` records of each layer.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BoundedHistory",
    "CsvRecords",
    "drop_rows_from_step",
    "input_output_ratio",
    "read_history",
]

_INT_COLUMNS = ("step", "nonfinite", "scaler_skipped")


class BoundedHistory:
    """The last ``per_layer`` records of every layer (all of them with ``None``), in order."""

    def __init__(self, per_layer: int | None) -> None:
        self.per_layer = per_layer
        self._layers: dict[str, deque[tuple[int, dict[str, Any]]]] = {}
        self._counter = itertools.count()

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            layer = self._layers.get(record["layer"])
            if layer is None:
                layer = self._layers[record["layer"]] = deque(maxlen=self.per_layer)
            layer.append((next(self._counter), record))

    def records(self) -> list[dict[str, Any]]:
        """Every kept record, in the order recorded."""
        merged = sorted(itertools.chain.from_iterable(self._layers.values()), key=lambda e: e[0])
        return [record for _, record in merged]

    def __len__(self) -> int:
        return sum(len(layer) for layer in self._layers.values())

    def state_dict(self) -> list[dict[str, Any]]:
        return self.records()

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        self._layers.clear()
        self.extend(dict(record) for record in records)


class CsvRecords:
    """Appends records to a CSV file (global rank 0), buffering rows between flushes."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self._rows: list[list[Any]] = []

    def start(self, resume_step: int | None) -> Path | None:
        """Open the file. Resuming at ``resume_step`` into a file with the same columns keeps
        its rows of earlier steps and appends (rows a killed attempt logged from that step on
        are logged again). Otherwise (``None``: a new fit) the file is started afresh, unless
        it holds rows of an earlier fit: those are kept, and this fit writes the first free
        ``<stem>-v<N>.csv`` beside it (:attr:`path` changes). Returns the earlier file in
        that case, else ``None``."""
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), None)
            if header == self.columns:
                drop_rows_from_step(self.path, resume_step)
                return None
        earlier = None
        if _has_rows(self.path):
            earlier = self.path
            self.path = _free_version(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(self.columns)
        return earlier

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        self._rows += [[r.get(column, "") for column in self.columns] for r in records]

    def flush(self) -> None:
        if not self._rows:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows(self._rows)
        self._rows = []


def _has_rows(path: Path) -> bool:
    """Whether the CSV file ``path`` exists with at least one row below its header."""
    if not path.is_file():
        return False
    with path.open(newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return next(reader, None) is not None


def _free_version(path: Path) -> Path:
    """``<stem>-v1<suffix>``, ``-v2``... beside ``path``: the first that holds no rows (as
    ``ModelCheckpoint`` versions its files)."""
    version = 1
    while _has_rows(candidate := path.with_name(f"{path.stem}-v{version}{path.suffix}")):
        version += 1
    return candidate


def drop_rows_from_step(path: Path, step: int) -> None:
    """Keep only the rows of the CSV file ``path`` logged before ``step`` (column ``step``):
    what a killed run logged after its last checkpoint is logged again when it resumes."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) < step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``gradient_flow.csv`` back as the list of dicts of ``GradientFlow.history``.

    ``step``, ``nonfinite`` and ``scaler_skipped`` become ``int``, ``layer`` stays a string,
    every other column (``mean_abs``, ``l2``, ``max_abs``, ``update_ratio``) becomes ``float``.
    """
    history: list[dict[str, Any]] = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            record: dict[str, Any] = {}
            for key, value in row.items():
                if key == "layer":
                    record[key] = value
                elif key in _INT_COLUMNS:
                    record[key] = int(value)
                else:
                    record[key] = float(value) if value != "" else math.nan
            history.append(record)
    return history


def input_output_ratio(
    history: Sequence[Mapping[str, Any]], last_n: int = 1, order: Sequence[str] | None = None
) -> float:
    """First over last layer's ``mean_abs`` in ``history`` (``GradientFlow.history`` or
    :func:`read_history`), each averaged over its last ``last_n`` records.

    ``order`` lists the layers input first; by default the order in which they first appear,
    which is data-flow order in what ``GradientFlow`` records and writes. Far below 1:
    gradients vanish toward the input.
    """
    layers = list(order) if order is not None else list(dict.fromkeys(r["layer"] for r in history))
    if len(layers) < 2:
        raise ValueError(
            f"input_output_ratio needs records of at least two layers; have {len(layers)}"
        )

    def average(layer: str) -> float:
        values = [r["mean_abs"] for r in history if r["layer"] == layer][-last_n:]
        return sum(values) / len(values)

    first, last = average(layers[0]), average(layers[-1])
    return first / last if last else math.inf
