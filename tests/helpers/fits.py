"""A quiet Lightning Trainer for tests: CPU, no progress bar, summary, checkpoints or logger
unless asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["quiet_trainer"]


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
