"""What multi-process tests share: a free port for the rendezvous, and a skip for tests that
need several GPUs (``make gpu-check`` on one GPU skips them)."""

from __future__ import annotations

import socket

import pytest
import torch

__all__ = ["free_port", "needs_gpus"]


def free_port() -> int:
    """A TCP port nothing listens on now (for ``MASTER_PORT``/``init_method``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def needs_gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless at least ``count`` CUDA GPUs are visible (use with ``pytest.mark.gpu``)."""
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA GPUs")
