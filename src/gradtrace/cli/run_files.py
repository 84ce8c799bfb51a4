"""Reading the files of a finished (or interrupted) run: the one reader behind ``gradtrace
compare``, the demo, Table 1 and the sweep summaries.

A run directory is what ``gradtrace fit`` writes (``<default_root_dir>/<run_name>/``) or any
folder holding a Lightning ``metrics.csv`` (CSVLogger) and/or a ``gradient_flow.csv``
(:class:`gradtrace.GradientFlow`), with the run's ``config.yaml`` (LightningCLI) or
``hparams.yaml`` beside them when present.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["FinishedRun", "RunFilesError", "find_runs", "read_run"]

METRICS_FILE = "metrics.csv"
GRADIENT_FLOW_FILE = "gradient_flow.csv"
CONFIG_FILES = ("config.yaml", "hparams.yaml")
_FLOW_COLUMNS = ("step", "layer")


class RunFilesError(ValueError):
    """A run directory or one of its files cannot be read; the message names the path."""


@dataclass(frozen=True)
class FinishedRun:
    """What one run directory holds.

    ``metrics`` has one dict per ``metrics.csv`` row with the row's non-empty cells as floats
    (``step`` and ``epoch`` included), in file order; ``gradient_flow`` is the run's gradient
    history as :func:`gradtrace.measure.read_history` returns it; ``config`` is the saved
    ``config.yaml`` (else ``hparams.yaml``, else empty).
    """

    path: Path
    name: str
    config: dict[str, Any] = field(repr=False)
    metrics: list[dict[str, float]] = field(repr=False)
    gradient_flow: list[dict[str, Any]] = field(repr=False)

    def last(self, key: str) -> float | None:
        """The last finite value logged for metric ``key`` (e.g. ``"val/acc"``), or ``None``."""
        for row in reversed(self.metrics):
            value = row.get(key)
            if value is not None and math.isfinite(value):
                return value
        return None

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` for every finite value of metric ``key``, later rows of the same
        step (a resumed run) replacing earlier ones, sorted by step."""
        points: dict[int, float] = {}
        for row in self.metrics:
            value, step = row.get(key), row.get("step")
            if value is not None and step is not None and math.isfinite(value):
                points[int(step)] = value
        return sorted(points.items())


def _read_metrics(path: Path) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    try:
        with path.open(newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                values: dict[str, float] = {}
                for key, cell in row.items():
                    if key is None or cell in (None, ""):
                        continue
                    try:
                        values[key] = float(cell)
                    except ValueError:
                        raise RunFilesError(
                            f"{path}:{line}: column {key!r} holds {cell!r}, not a number"
                        ) from None
                rows.append(values)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunFilesError(f"{path}: cannot read it ({err})") from None
    return rows


def _read_gradient_flow(path: Path) -> list[dict[str, Any]]:
    from gradtrace.measure import read_history

    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunFilesError(f"{path}: cannot read it ({err})") from None
    missing = [column for column in _FLOW_COLUMNS if column not in header]
    if missing:
        raise RunFilesError(
            f"{path}: not a gradient-flow CSV (columns {', '.join(header) or 'none'}; "
            f"missing {', '.join(missing)})"
        )
    try:
        return read_history(path)
    except (ValueError, KeyError, csv.Error) as err:
        raise RunFilesError(f"{path}: malformed gradient-flow CSV ({err})") from None


def _read_config(directory: Path) -> dict[str, Any]:
    for name in CONFIG_FILES:
        path = directory / name
        if path.is_file():
            try:
                # Lightning writes hparams.yaml with Python tuples (!!python/tuple), which the
                # full loader reads (it builds no arbitrary objects).
                loaded = yaml.load(path.read_text(), Loader=yaml.FullLoader)
            except (OSError, yaml.YAMLError) as err:
                raise RunFilesError(f"{path}: cannot read it ({err})") from None
            return loaded if isinstance(loaded, dict) else {}
    return {}


def _is_run_directory(directory: Path) -> bool:
    return (directory / METRICS_FILE).is_file() or (directory / GRADIENT_FLOW_FILE).is_file()


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run directory, else the run directories directly inside it
    (a sweep's, the demo's or Table 1's output folder), sorted by name.

    Raises:
        RunFilesError: ``path`` is neither (one line naming it).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise RunFilesError(f"{directory}: no such run directory")
    if _is_run_directory(directory):
        return [directory]
    runs = sorted(p for p in directory.iterdir() if p.is_dir() and _is_run_directory(p))
    if not runs:
        raise RunFilesError(
            f"{directory}: not a run directory (no {METRICS_FILE} or {GRADIENT_FLOW_FILE}) "
            "and no run directories inside it"
        )
    return runs


def read_run(path: str | Path) -> FinishedRun:
    """Read the run directory ``path``.

    Raises:
        RunFilesError: ``path`` is not a directory, holds neither ``metrics.csv`` nor
            ``gradient_flow.csv``, or one of them is malformed (one line naming the file).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise RunFilesError(f"{directory}: no such run directory")
    metrics_path = directory / METRICS_FILE
    flow_path = directory / GRADIENT_FLOW_FILE
    if not _is_run_directory(directory):
        raise RunFilesError(
            f"{directory}: not a run directory (no {METRICS_FILE} or {GRADIENT_FLOW_FILE})"
        )
    return FinishedRun(
        path=directory,
        name=directory.name,
        config=_read_config(directory),
        metrics=_read_metrics(metrics_path) if metrics_path.is_file() else [],
        gradient_flow=_read_gradient_flow(flow_path) if flow_path.is_file() else [],
    )
