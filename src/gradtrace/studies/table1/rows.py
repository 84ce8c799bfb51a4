"""Table 1's rows as measured: read from finished runs, or from the smoke budget's in-process
runs. A finished run is read with :func:`gradtrace.cli.run_files.read_run`.

A run is a row's when its model settings equal the row's shipped config with every other
setting at :class:`~gradtrace.classifier.ImageClassifier`'s own defaults (read from its
signature, so a changed default moves both sides), with no gradient clipping and on the
wanted dataset; epochs and batch size may differ and are reported.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradtrace.cli.run_files import FinishedRun, RunFilesError, read_run
from gradtrace.models.vgg import CONFIGS as VGG_DEPTHS
from gradtrace.studies.short_run import RunSpec, table1_specs

__all__ = [
    "METRICS",
    "RowRun",
    "collect",
    "matches",
    "measured",
    "model_defaults",
    "resolved_model_settings",
]

METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
TRAIN_KEYS = ("train/loss_step", "train/loss", "train/acc")
# Settings that do not change what a row trains: filled in by the CLI from the data
# (classes, channels) or speed only (memory layout, compilation).
NOT_ROW_SETTINGS = ("num_classes", "in_chans", "channels_last", "compile")
# The coursework network's family and the aliases that fix a depth.
COURSEWORK_FAMILY = "coursework_vgg"
COURSEWORK_ALIASES = {"vgg08": 8, "vgg38": 38}


@dataclass
class RowRun:
    """What one Table 1 row measured (final values, curves, gradient flow)."""

    spec: RunSpec
    metrics: dict[str, float]
    steps: int
    epochs: int
    curves: dict[str, list[tuple[float, float]]]
    """``{"train/loss": [(step, value), ...], ...}``; ``*_epoch`` series are by epoch."""
    history: list[dict[str, Any]] = field(repr=False)
    source: Path
    num_classes: int
    in_chans: int
    seconds: float | None = None


def measured(run: FinishedRun) -> tuple[dict, dict, int, int]:
    """Final metrics, curves, steps and epochs of one run.

    Curves, as ``(x, value)`` with x the number of steps (or epochs) done: ``train/loss``
    (``train/loss_step`` at each logged step), ``val/loss`` and ``val/acc`` at each
    validation, and the epoch-level ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    under ``<key>_epoch``. A validation after training (``trainer.validate``) counts as the
    last step's.
    """
    rows = run.metrics
    trained = [r for r in rows if any(k in r for k in TRAIN_KEYS) and "step" in r]
    steps = max((int(r["step"]) + 1 for r in trained), default=0)
    epochs = max((int(r["epoch"]) + 1 for r in trained if "epoch" in r), default=0)
    by_x: dict[str, dict[float, float]] = {}
    final: dict[str, float] = {}
    for row in rows:
        if "step" not in row:
            continue
        x_step = min(row["step"] + 1, steps)
        x_epoch = None if "epoch" not in row else min(row["epoch"] + 1, epochs)
        loss = row.get("train/loss_step")
        if loss is not None and math.isfinite(loss):
            by_x.setdefault("train/loss", {})[x_step] = loss
        for key in METRICS:
            value = row.get(key)
            if value is None or not math.isfinite(value):
                continue
            final[key] = value
            if key.startswith("val/"):
                by_x.setdefault(key, {})[x_step] = value
            if x_epoch is not None:
                by_x.setdefault(f"{key}_epoch", {})[x_epoch] = value
    curves = {key: sorted(points.items()) for key, points in by_x.items()}
    return final, curves, steps, epochs


def model_defaults() -> dict[str, Any]:
    """``ImageClassifier``'s default settings, read from its signature."""
    from gradtrace.classifier import ImageClassifier

    parameters = inspect.signature(ImageClassifier.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def resolved_model_settings(
    model: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``model``'s settings over ``defaults`` as a run trains them: coursework aliases and old
    names resolved, settings that do not change training (classes and channels from the data,
    memory layout, compilation) left out, so that two equal results train the same network."""
    given = {k: v for k, v in model.items() if v is not None or k not in defaults}
    settings = {**defaults, **given}
    arch = settings.get("arch")
    if arch in COURSEWORK_ALIASES:
        settings["depth"] = settings.get("depth") or COURSEWORK_ALIASES[arch]
    if arch in COURSEWORK_ALIASES or _saved_as_old_coursework_name(arch, settings.get("depth")):
        settings["arch"] = COURSEWORK_FAMILY
    for key in ("batch_norm", "residual"):
        settings[key] = bool(settings.get(key))
    settings["arch_kwargs"] = settings.get("arch_kwargs") or {}
    for key in NOT_ROW_SETTINGS:
        settings.pop(key, None)
    # config.yaml holds lists where the signature's defaults are tuples (milestones).
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _saved_as_old_coursework_name(arch: Any, depth: Any) -> bool:
    """Whether a saved run's ``arch: vgg`` is the coursework network.

    Runs saved before the coursework network was registered as ``coursework_vgg`` name it
    ``vgg``, the name the classic VGG family holds now. The depth tells them apart: the classic
    VGG has none of the coursework depths (8 + 6b).
    """
    return arch == "vgg" and depth is not None and depth not in VGG_DEPTHS


def matches(spec: RunSpec, config: Mapping[str, Any], dataset: str) -> bool:
    """Whether the run whose resolved CLI ``config`` is given trains Table 1 row ``spec``
    (see the module docstring)."""
    defaults = model_defaults()
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    return (
        resolved_model_settings(config.get("model") or {}, defaults)
        == resolved_model_settings(spec.model, defaults)
        and not trainer.get("gradient_clip_val")
        and data.get("dataset") == dataset
    )


def _classes_of(dataset: str) -> int:
    return {"cifar100": 100}.get(dataset, 10)


def _hparams(run_dir: Path) -> dict[str, Any]:
    """The run's saved hyperparameters (``hparams.yaml``: the model's classes and channels as
    linked from the data), or ``{}``. The file holds Python tuples, hence the full loader."""
    import yaml

    try:
        return yaml.load((run_dir / "hparams.yaml").read_text(), Loader=yaml.FullLoader) or {}
    except (OSError, yaml.YAMLError):
        return {}


def collect(
    folder: str | Path, dataset: str = "cifar100", specs: Sequence[RunSpec] | None = None
) -> list[RowRun]:
    """The Table 1 rows found among the CLI runs under ``folder`` (any depth).

    When several runs match a row, the one with the most steps wins. Raises ``ValueError``
    naming the rows that no run matches.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--from {folder}: no such folder")
    specs = list(specs or table1_specs())
    runs = []
    for config_file in sorted(folder.rglob("config.yaml")):
        try:
            runs.append(read_run(config_file.parent))
        except RunFilesError:
            continue  # a config without metrics: a run that never started
    rows, missing = [], []
    for spec in specs:
        candidates = [run for run in runs if matches(spec, run.config, dataset)]
        if not candidates:
            missing.append(spec.name)
            continue
        scored = [(measured(run), run) for run in candidates]
        (final, curves, steps, epochs), run = max(scored, key=lambda item: item[0][2])
        hparams = _hparams(run.path)
        rows.append(
            RowRun(
                spec=spec,
                metrics=final,
                steps=steps,
                epochs=epochs,
                curves=curves,
                history=run.gradient_flow,
                source=run.path,
                num_classes=int(hparams.get("num_classes") or _classes_of(dataset)),
                in_chans=int(hparams.get("in_chans") or (1 if dataset == "fashion_mnist" else 3)),
            )
        )
    if missing:
        raise ValueError(
            f"no {dataset} run under {folder} matches Table 1 row(s) "
            f"{', '.join(missing)}; run them with `make reproduce-table1` or "
            "`make sweep-local SWEEP=sweeps/table1.yaml`"
        )
    return rows
