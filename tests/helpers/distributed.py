"""A skip for tests that need several GPUs (``make gpu-check`` on one GPU skips them). Their
rendezvous ports come from :func:`gradtrace.sweeps.launch.free_port`."""

from __future__ import annotations

import pytest
import torch

__all__ = ["needs_gpus"]


def needs_gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless at least ``count`` CUDA GPUs are visible (use with ``pytest.mark.gpu``)."""
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA GPUs")
