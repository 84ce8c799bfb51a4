"""What a user gets wrong, said in one line: :class:`UserError` for gradtrace's own checks and
:class:`CommandParser` for the argument parsing of ``gradtrace summary``, ``compare`` and
``probe``. :func:`gradtrace.cli.main.main` prints either as ``gradtrace: error: ...``, exit
status 2."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

__all__ = ["CommandParser", "UserError", "one_line", "require_matplotlib"]


class UserError(Exception):
    """A mistake the user fixes by changing the command, the environment or the data (not a
    gradtrace bug): its message says what was wrong and what is valid."""


class CommandParser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`UserError` on a bad argument instead of printing its
    usage and exiting, and refuses option prefixes (``--mark`` is not ``--markdown``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (all options: {self.prog} --help)")


def one_line(err: BaseException) -> str:
    """``err``'s message with its lines joined: a user error is printed as one line."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def require_matplotlib(command: str) -> None:
    """Raise :class:`UserError` before any work when ``gradtrace <command>``, which draws a
    figure, cannot: matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401  (optional: the "plot" extra)
    except ImportError:
        raise UserError(
            f"gradtrace {command} draws a figure, which needs matplotlib: "
            "pip install 'gradtrace[plot]'"
        ) from None
