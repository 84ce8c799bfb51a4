"""Multi-process tests: a skip for tests that need several GPUs (``make gpu-check`` on one GPU
skips them), and :func:`run_rank_script`, which runs a script of ``tests/scripts/`` (its ranks
go through ``tests/scripts/ranks.py``) on a free rendezvous port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gradtrace.sweeps.launch import free_port

__all__ = ["SCRIPTS", "needs_gpus", "run_rank_script"]

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def needs_gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless at least ``count`` CUDA GPUs are visible (use with ``pytest.mark.gpu``)."""
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA GPUs")


def run_rank_script(
    script: str, arguments: Callable[[int], list[str]], timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` with ``arguments(port)`` and assert it succeeded.

    A run in which a rank was killed by a signal is run once more, on a new port: on a busy
    machine a gloo rank has died of SIGABRT in the C++ runtime outside any code under test. A
    Python error in a rank fails at once, and a signal that comes back fails the second run.
    """
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / script), *arguments(free_port())],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=SCRIPTS,
        )
        killed = "terminated with signal" in done.stderr
        if done.returncode == 0 or not killed or attempt == 2:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return done
