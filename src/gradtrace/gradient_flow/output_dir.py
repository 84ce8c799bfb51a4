"""Where ``GradientFlow`` writes its files: the run's own directory, never a shared folder.

Like ``ModelCheckpoint``: the first logger's ``log_dir`` for the CSV and TensorBoard loggers
(their ``save_dir/name/version_N``), ``save_dir/name/version`` for the others (W&B, MLflow,
...; ``trainer.log_dir`` would be the bare ``save_dir``, shared by every run in it), and
``default_root_dir/gradient_flow`` without loggers (``logger=False``, ``fast_dev_run``), as
checkpoints go to ``default_root_dir/checkpoints``: never the bare working directory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger

from gradtrace.measure.diagnosis import GradientFlowWarning

__all__ = ["NO_LOGGER_FOLDER", "output_directory"]

NO_LOGGER_FOLDER = "gradient_flow"
"""The folder under ``default_root_dir`` that holds the files when no logger is set."""


def _logger_directory(trainer: pl.Trainer) -> str:
    loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
    if not loggers:
        return os.path.join(trainer.default_root_dir, NO_LOGGER_FOLDER)
    logger = loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return str(logger.log_dir)
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    if version is None and trainer.is_global_zero:
        _ = logger.experiment  # W&B names its version (the run id) once the run exists
        version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(save_dir, str(logger.name), version)


def output_directory(trainer: pl.Trainer, dirpath: str | os.PathLike[str] | None = None) -> Path:
    """The directory of this run's files: ``dirpath`` when given, else as ``ModelCheckpoint``
    derives it (without its ``checkpoints`` suffix). Call it on every rank: rank 0's answer is
    broadcast, because only rank 0's logger knows its version."""
    if dirpath is not None:
        directory = str(dirpath)
    else:
        try:
            directory = _logger_directory(trainer)
        except Exception as err:  # a logger that cannot say: the broadcast must still happen
            directory = os.path.join(trainer.default_root_dir, NO_LOGGER_FOLDER)
            warnings.warn(
                f"GradientFlow could not read its logger's directory ({type(err).__name__}: "
                f"{err}); its files go to {directory}",
                GradientFlowWarning,
                stacklevel=2,
            )
    return Path(trainer.strategy.broadcast(directory))
