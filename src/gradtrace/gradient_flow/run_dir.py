"""Where ``GradientFlow`` writes its files: the run's own directory, never a shared folder.

Like ``ModelCheckpoint``: the first logger's ``log_dir`` for the CSV and TensorBoard loggers
(their ``save_dir/name/version_N``), ``save_dir/name/version`` for the others (W&B, MLflow,
...; ``trainer.log_dir`` would be the bare ``save_dir``, shared by every run in it), and
``default_root_dir`` without loggers.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["run_directory"]


def _logger_directory(trainer: pl.Trainer) -> str:
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return str(logger.log_dir)
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    if version is None and trainer.is_global_zero:
        _ = logger.experiment  # W&B names its version (the run id) once the run exists
        version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(save_dir, str(logger.name), version)


def run_directory(trainer: pl.Trainer, dirpath: str | os.PathLike[str] | None = None) -> Path:
    """The directory of this run's files: ``dirpath`` when given, else as ``ModelCheckpoint``
    derives it (without its ``checkpoints`` suffix). Call it on every rank: rank 0's answer is
    broadcast, because only rank 0's logger knows its version."""
    directory = str(dirpath) if dirpath is not None else _logger_directory(trainer)
    return Path(trainer.strategy.broadcast(directory))
