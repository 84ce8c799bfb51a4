"""Fit a small model with GradientFlow on ``--devices`` CPU processes; dump what each rank saw.

Used by tests/test_gradient_flow_distributed.py: with ``--devices 2`` Lightning's DDP (or FSDP, with
``--strategy fsdp``) re-runs this script for rank 1.
Global batch 8 (``8 // devices`` per rank), 24 samples, SGD; at ``--poison-step``
every rank puts inf into one gradient entry of ``net.hidden.weight`` and
``GradientFlow(on_nonfinite="raise")`` must stop all of them. ``--strategy fsdp_no_shard`` is
FSDP1 with ``sharding_strategy="NO_SHARD"``, ``fsdp_cpu_offload`` FSDP1 with parameters and
gradients on the CPU (GPUs only: its gradient tables must reach NCCL on the GPU);
``--precision`` as Lightning's. Writes ``rank<r>.json`` with the
rank's history, the error message and the number of collectives each measured step issued in
the callback's hook, and the callback's CSV, into ``out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradtrace import GradientFlow, NonFiniteGradientError
from gradtrace.gradient_flow import is_measured_step

_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter_tensor",
)


class CountingGradientFlow(GradientFlow):
    """Counts the torch.distributed collectives its measuring hook issues, per measured step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collectives: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        calls = [0]
        originals = {name: getattr(dist, name) for name in _COLLECTIVES}

        def counted(function):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                return function(*args, **kwargs)

            return wrapper

        measured = is_measured_step(trainer, self.every_n_steps)
        for name, function in originals.items():
            setattr(dist, name, counted(function))
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            for name, function in originals.items():
                setattr(dist, name, function)
            if measured:
                self.collectives.append(calls[0])


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


def _strategy(name: str, accelerator: str) -> str | FSDPStrategy:
    if name == "fsdp_cpu_offload":
        return FSDPStrategy(cpu_offload=True)
    if name == "fsdp_no_shard":  # FSDP1 holding whole gradients, as DDP does
        kwargs = {"sharding_strategy": "NO_SHARD"}
        if accelerator != "cpu":
            return FSDPStrategy(**kwargs)
    elif name != "fsdp" or accelerator != "cpu":
        return name
    else:
        kwargs = {}

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning refuses ``strategy="fsdp"`` without a GPU (by its exact type) and wraps
        with ``device_id=None``, which FSDP1 rejects without an accelerator; FSDP1 itself runs
        on CPU with gloo, so this subclass wraps on the CPU and keeps the rest of the strategy
        (Lightning's default ``use_orig_params=True``)."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            kwargs = {"use_orig_params": True, **self.kwargs}
            return FullyShardedDataParallel(
                model,
                device_id=torch.device("cpu"),
                sharding_strategy=self.sharding_strategy,
                **kwargs,
            )

    return CPUFSDPStrategy(**kwargs)


def run(
    out: Path,
    devices: int,
    poison_step: int,
    strategy: str = "ddp",
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> dict:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g))
    torch.manual_seed(0)
    model = Model(data, poison_step)
    callback = CountingGradientFlow(every_n_steps=1, on_nonfinite="raise", plot=False)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=_strategy(strategy, accelerator) if devices > 1 else "auto",
        precision=precision,
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
    result = {
        "rank": trainer.global_rank,
        "history": callback.history,
        "error": error,
        "collectives": callback.collectives,
    }
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
    strategies = ["ddp", "fsdp", "fsdp_no_shard", "fsdp_cpu_offload"]
    parser.add_argument("--strategy", default="ddp", choices=strategies)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    run(args.out, args.devices, args.poison_step, args.strategy, args.accelerator, args.precision)
