"""Shared test setup: one thread per xdist worker (the suite is sized for 2 cores)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Slow tests first, so that xdist's work stealing balances the rest around them.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_wandb_settings() -> Iterator[None]:
    # wandb.setup() keeps the settings it read from the environment (WANDB_RUN_ID, ...) for
    # the life of the process; a test that ran an agent-style cell must not hand its run id to
    # the next test in the same worker.
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()
