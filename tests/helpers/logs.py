"""What Lightning's ``rank_zero_info`` printed (GradientFlow's info lines go there)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["rank_zero_lines"]


@contextmanager
def rank_zero_lines() -> Iterator[list[str]]:
    """Collect the messages logged through ``lightning.pytorch.utilities.rank_zero``."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
