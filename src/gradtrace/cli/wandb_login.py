"""Whether a ``gradtrace`` run logs to Weights & Biases, and whether it can: checked before
any work, so a missing login is one line, not a traceback after the data has loaded."""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from gradtrace.cli.errors import UserError

__all__ = ["WANDB_LOCAL_MODES", "check_wandb_login", "wandb_wanted"]

WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
"""W&B modes that need no account: they log to local files only."""


def wandb_wanted(flag: bool | None) -> bool:
    """``--wandb``'s value; unset, W&B logs only under ``wandb agent`` (which exports
    ``WANDB_SWEEP_ID`` to the runs it starts)."""
    return bool(flag) if flag is not None else "WANDB_SWEEP_ID" in os.environ


def _key_configured() -> bool:
    # Where `wandb login` and W&B's documented variables put the credentials. Read directly:
    # wandb.login() starts W&B's service process and, without a terminal, can wait minutes.
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb_login() -> None:
    """Raise :class:`UserError` unless W&B can log: a login (``wandb login``,
    ``WANDB_API_KEY``), a local mode (``WANDB_MODE=offline``) or a terminal, where W&B asks
    for the key itself."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES or _key_configured():
        return
    if sys.stdin is not None and sys.stdin.isatty():
        return
    raise UserError(
        "--wandb true needs a W&B login: run `wandb login` (or set WANDB_API_KEY), or log to "
        "local files with WANDB_MODE=offline and upload them later with `wandb sync`"
    )
