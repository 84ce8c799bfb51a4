"""The gradient noise scale under DDP on 2 processes and under gradient accumulation on one.

Used by tests/test_noise_scale.py: linear regression trained by SGD, every step measured. DDP:
2 gloo ranks (Lightning's ``ddp_fork``: the ranks fork from this process, which has imported
Lightning once), batch ``b`` per rank; rank r's k-th batch is block ``2k + r`` of the data.
Accumulation: 1 process, ``accumulate_grad_batches=2``, batch ``b``, the blocks in order. Each
optimizer step sees the same two blocks either way. Writes the noise-scale scalars that reach
the logger at each step into ``OUT/ddp.json`` (global rank 0) and ``OUT/single.json``. A third
fit runs DDP again with every hook on rank 1 failing: each rank writes the features its
GradientFlow switched off into ``OUT/faults_rank<r>.json`` (the others must not wait for rank 1
in the collective). ``python ddp_noise_scale.py OUT PORT``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, Subset, TensorDataset

from gradtrace import GradientFlow

DIM, BATCH, STEPS = 6, 16, 5


class NoiseScaleLogger(Logger):
    """Keeps the ``grad_flow/noise_scale*`` scalars of each step; writes them at the end."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "noise_scale"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        kept = {k: v for k, v in metrics.items() if k.startswith("grad_flow/noise_scale")}
        if kept:
            self.steps[int(step)] = kept

    def finalize(self, status: str) -> None:
        if self.steps:  # global rank 0: the other ranks log nothing
            self.path.write_text(json.dumps(self.steps))


class LinearRegression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(DIM, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2 * STEPS * BATCH, DIM, generator=g)
        y = x @ torch.randn(DIM, generator=g) + torch.randn(len(x), generator=g)
        self.data = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        blocks = range(rank, 2 * STEPS, world)
        indices = [i for k in blocks for i in range(k * BATCH, (k + 1) * BATCH)]
        return DataLoader(Subset(self.data, indices), batch_size=BATCH)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.linear(x)[:, 0] - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class FaultReport(pl.Callback):
    """Writes the features each rank's GradientFlow switched off, at the end of the fit."""

    def __init__(self, out: Path, flow: GradientFlow) -> None:
        self.out, self.flow = out, flow

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        faults = {feature: str(error) for feature, error in self.flow.faults.items()}
        (self.out / f"faults_rank{trainer.global_rank}.json").write_text(json.dumps(faults))


def failing_on_rank_1(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.linalg.vector_norm`` that fails on rank 1 (the noise scale's hooks call it)."""
    if dist.get_rank() == 1:
        raise RuntimeError("hook failure on rank 1")
    return VECTOR_NORM(*args, **kwargs)


VECTOR_NORM = torch.linalg.vector_norm


def fit(out: Path, devices: int, name: str) -> None:
    flow = GradientFlow(noise_scale=True, every_n_steps=1, plot=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        accumulate_grad_batches=1 if devices > 1 else 2,
        max_epochs=1,
        logger=NoiseScaleLogger(out / name),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        use_distributed_sampler=False,
        callbacks=[flow, FaultReport(out, flow)],
    )
    trainer.fit(LinearRegression())


if __name__ == "__main__":
    torch.set_num_threads(1)  # before the fork: the ranks share 2 cores
    out, port = Path(sys.argv[1]), sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    fit(out, devices=2, name="ddp.json")
    fit(out, devices=1, name="single.json")
    torch.linalg.vector_norm = failing_on_rank_1  # the ranks fork with it
    fit(out, devices=2, name="ddp_failing.json")
