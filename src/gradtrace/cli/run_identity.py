"""One identity and one directory per run of the ``gradtrace`` command.

A run is named ``<readable prefix>-<id>``: the prefix says what it trains
(``vgg38-bn-rc-cifar100-lr0.01``), the id tells apart runs that the prefix does not (clipping,
weight decay, ``arch_kwargs``, ...). The id is the W&B run id under ``wandb agent`` (which
exports ``WANDB_RUN_ID`` to each run it starts), else a short hash of the fully resolved
config, so the same settings always land in the same directory and a rerun with
``--ckpt_path last`` continues there. The directory is fixed (no ``version_N``): a resumed run
appends to its own ``metrics.csv`` and ``gradient_flow.csv`` after dropping what was logged
after its checkpoint (:class:`ContinuousRunFiles`), and :class:`ResumeCheckpoint` keeps
``checkpoints/last.ckpt`` whatever other checkpoint callbacks the user adds.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from gradtrace.compat import batches_that_stepped
from gradtrace.gradient_flow import GradientFlow
from gradtrace.gradient_flow.output_dir import output_directory
from gradtrace.measure.records import drop_rows_from_step

__all__ = [
    "IDENTITY_SECTIONS",
    "NOT_IDENTITY",
    "OBSERVING_CALLBACKS",
    "ContinuousRunFiles",
    "ResumeCheckpoint",
    "RunCSVLogger",
    "config_hash",
    "readable_prefix",
    "run_name",
]

IDENTITY_SECTIONS = ("seed_everything", "model", "data", "trainer")
"""The config sections that make a run what it is (shared by fit, validate, test, predict)."""
NOT_IDENTITY = frozenset(
    {
        # Where and how results are shown or saved, not what is trained.
        "default_root_dir",
        "logger",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
    }
)
"""Trainer settings that do not enter the hash."""
OBSERVING_CALLBACKS = (
    "gradtrace.gradient_flow.callback.GradientFlow",
    "lightning.pytorch.callbacks.checkpoint.Checkpoint",
    "lightning.pytorch.callbacks.lr_monitor.LearningRateMonitor",
    "lightning.pytorch.callbacks.progress.progress_bar.ProgressBar",
    "lightning.pytorch.callbacks.model_summary.ModelSummary",
    "lightning.pytorch.callbacks.device_stats_monitor.DeviceStatsMonitor",
    "lightning.pytorch.callbacks.prediction_writer.BasePredictionWriter",
)
"""Callbacks (and their subclasses) that watch or save a run without changing what it trains:
they stay out of the hash, so a run resumed with other GradientFlow or checkpoint settings
continues in its own directory. Any other callback (early stopping, SWA, a fine-tuning
schedule, ...) enters it."""
HASH_LENGTH = 8
VGG_FAMILIES = ("coursework_vgg", "vgg")
"""Model families whose run names read ``vgg<depth>``."""


def readable_prefix(model: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """The readable part of a run name, e.g. ``vgg38-bn-rc-cifar100-lr0.01``.

    Architecture (with the depth for families that take one), ``bn`` and ``rc`` when set,
    norm, activation and init when set, the dataset (without an ``imagefolder:`` path) and lr.
    """
    arch = str(model.get("arch"))
    depth = model.get("depth")
    if depth is not None:
        # Both VGG families read as their registered depth names: the coursework network's
        # vgg08 / vgg38 (as in the report) and the classic vgg11 ... vgg19; their depths
        # (8 + 6b against 11, 13, 16, 19) never give the same name.
        arch = f"vgg{depth:02d}" if arch in VGG_FAMILIES else f"{arch}-d{depth}"
    parts = [arch]
    parts += ["bn"] if model.get("batch_norm") else []
    parts += ["rc"] if model.get("residual") else []
    keys = ("norm", "activation", "init")
    parts += [str(model[key]) for key in keys if model.get(key) is not None]
    parts.append(str(data.get("dataset")).split(":")[0])
    if model.get("lr") is not None:
        parts.append(f"lr{model['lr']:g}")
    return "-".join(parts)


def _import_class(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


@functools.cache
def _observing_classes() -> tuple[type, ...]:
    return tuple(_import_class(path) for path in OBSERVING_CALLBACKS)


def _observes(callback: Any) -> bool:
    class_path = callback.get("class_path") if isinstance(callback, Mapping) else None
    try:
        cls = _import_class(class_path)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False  # unknown: counted as changing the run
    return isinstance(cls, type) and issubclass(cls, _observing_classes())


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: config.get(key) for key in IDENTITY_SECTIONS}
    trainer = dict(out.get("trainer") or {})
    callbacks = trainer.pop("callbacks", None) or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    out["trainer"] = {k: v for k, v in trainer.items() if k not in NOT_IDENTITY}
    training_callbacks = [cb for cb in callbacks if not _observes(cb)]
    if training_callbacks:  # absent otherwise: the hashes of runs without them are unchanged
        out["trainer"]["callbacks"] = training_callbacks
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """A short hash of the sections of ``config`` that make the run (see
    :data:`IDENTITY_SECTIONS` and :data:`NOT_IDENTITY`); equal settings give equal hashes
    however they were spelled (config file, flags, defaults)."""
    text = json.dumps(_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def run_name(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """``<readable prefix>-<id>`` for the resolved ``config`` (a plain nested dict).

    The id is ``WANDB_RUN_ID`` when ``wandb agent`` started the run (``WANDB_SWEEP_ID`` and
    ``WANDB_RUN_ID`` both set), else :func:`config_hash`.
    """
    env = os.environ if env is None else env
    model, data = config.get("model") or {}, config.get("data") or {}
    under_agent = env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID")
    run_id = env["WANDB_RUN_ID"] if under_agent else config_hash(config)
    return f"{readable_prefix(model, data)}-{run_id}"


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """A CSV logger writing straight into ``<save_dir>/<name>/`` (no ``version_N``), which
    continues an existing ``metrics.csv``; :class:`ContinuousRunFiles` trims it on resume."""

    def __init__(self, save_dir: str | Path, name: str) -> None:
        super().__init__(save_dir=save_dir, name=name, version="")

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and pl.utilities.rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return super().experiment


class ResumeCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``, refreshed at every epoch end: what ``--ckpt_path last``
    resumes from. Its own type, so a user's ``ModelCheckpoint`` never replaces it."""

    def __init__(self) -> None:
        # An unmonitored top-1 checkpoint is rewritten at every save: always the latest state.
        super().__init__(filename="last", save_top_k=1, enable_version_counter=False)


class ContinuousRunFiles(pl.Callback):
    """Keeps a run directory's CSV files one continuous record of one run.

    A run directory belongs to one run (one set of settings): a fresh fit there restarts the
    run, so it empties ``metrics.csv`` and every ``GradientFlow`` CSV of an earlier attempt
    (left alone, GradientFlow would keep an earlier fit's file and start a ``-v1`` one beside
    it); a resumed fit drops the rows of ``metrics.csv`` logged after the checkpoint (they are
    logged again; GradientFlow trims its own CSV). Put it before the GradientFlows in the
    Trainer's callbacks: its ``on_train_start`` must run first.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = batches_that_stepped(trainer)
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask
        flows = [cb for cb in trainer.callbacks if isinstance(cb, GradientFlow)] if not step else []
        directories = [output_directory(trainer, flow.dirpath) for flow in flows]  # broadcasts
        if not trainer.is_global_zero:
            return
        if log_dir is not None:
            drop_rows_from_step(Path(log_dir) / "metrics.csv", step)
        for flow, directory in zip(flows, directories):
            drop_rows_from_step(directory / flow.filename, 0)
