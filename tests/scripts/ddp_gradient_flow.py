"""Fit a small model with GradientFlow on ``--devices`` CPU processes; dump what each rank saw.

Used by tests/test_gradient_flow.py: with ``--devices 2`` Lightning's DDP re-runs this script
for rank 1. Global batch 8 (``8 // devices`` per rank), 24 samples, SGD; at ``--poison-step``
every rank puts inf into one gradient entry of ``net.hidden.weight`` and
``GradientFlow(on_nonfinite="raise")`` must stop all of them. Writes ``rank<r>.json`` with the
rank's history and the error message, and the callback's CSV, into ``out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradtrace import GradientFlow, NonFiniteGradientError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.hidden = nn.Linear(8, 8)
        self.inp = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


class Model(pl.LightningModule):
    def __init__(self, data: TensorDataset, poison_step: int) -> None:
        super().__init__()
        self.net = Net()
        self.data = data
        self.poison_step = poison_step

    def train_dataloader(self) -> DataLoader:
        # Lightning's own DistributedSampler would shuffle; this one interleaves in order, so
        # the ranks' batches together are the one-process batch.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=8 // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.poison_step:
            with torch.no_grad():
                self.net.hidden.weight.grad[0, 0] = math.inf

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(out: Path, devices: int, poison_step: int) -> dict:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g))
    torch.manual_seed(0)
    model = Model(data, poison_step)
    callback = GradientFlow(every_n_steps=1, on_nonfinite="raise", plot=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[callback],
        use_distributed_sampler=False,
    )
    error = None
    try:
        trainer.fit(model)
    except NonFiniteGradientError as err:
        error = str(err)
    result = {"rank": trainer.global_rank, "history": callback.history, "error": error}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    launcher = trainer.strategy.launcher
    for proc in getattr(launcher, "procs", []):  # rank 0 waits for the ranks it launched
        proc.wait(timeout=120)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--poison-step", type=int, default=2)
    args = parser.parse_args()
    run(args.out, args.devices, args.poison_step)
