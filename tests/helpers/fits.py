"""A quiet Lightning Trainer for tests: CPU, no progress bar, summary, checkpoints or logger
unless asked for; and a one-epoch fit of a tiny model with a callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

from helpers.tiny import make_data

__all__ = ["fit", "quiet_trainer"]


def quiet_trainer(root: Path | None, callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    """A Trainer writing under ``root`` (``None``: Lightning's default, the working
    directory); ``options`` override the quiet defaults."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    if root is not None:
        settings["default_root_dir"] = root
    return pl.Trainer(**{**settings, **options})


def fit(
    root: Path,
    model: pl.LightningModule,
    callback: pl.Callback,
    batch_size: int = 4,
    data: TensorDataset | None = None,
    **options: Any,
) -> pl.Trainer:
    """Fit ``model`` with ``callback`` on ``data`` (default: :func:`helpers.tiny.make_data`)
    for one epoch under a :func:`quiet_trainer`; ``options`` override its settings (among
    them ``callbacks``, which then replace ``[callback]``)."""
    callbacks = options.pop("callbacks", [callback])
    trainer = quiet_trainer(root, callbacks, **{"max_epochs": 1, **options})
    trainer.fit(model, DataLoader(data or make_data(), batch_size=batch_size))
    return trainer
