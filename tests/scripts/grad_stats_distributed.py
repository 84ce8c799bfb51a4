"""``grad_stats`` on ``--world`` gloo CPU processes: DDP, FSDP2 ``fully_shard`` and a
DTensor-sharded parameter set; rank 0 writes the stats and the collective count as JSON.

Used by tests/test_gradient_flow_stats.py, which compares the 2-process values with one
process on the same model and batch. Every rank sees the full batch (the DDP/FSDP average of
equal per-rank gradients is the one-process gradient), so the values must agree exactly up to
float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradtrace.gradient_flow import grad_stats


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def backward(model: nn.Module) -> None:
    x, y = batch()
    nn.functional.mse_loss(model(x), y).backward()


class CountingAllGather:
    """Counts collectives that ``grad_stats`` issues (it uses ``dist.all_gather``)."""

    def __init__(self) -> None:
        self.calls = 0
        self._wrapped = dist.all_gather

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self._wrapped(*args, **kwargs)


def measure(model: nn.Module) -> tuple[dict[str, float], int]:
    counter = CountingAllGather()
    dist.all_gather = counter
    try:
        stats = grad_stats(model)
    finally:
        dist.all_gather = counter._wrapped
    return {k: float(v) for k, v in stats.items()}, counter.calls


def single() -> dict[str, float]:
    model = make_model()
    backward(model)
    return {k: float(v) for k, v in grad_stats(model).items()}


def ddp() -> tuple[dict[str, float], int]:
    model = nn.parallel.DistributedDataParallel(make_model())
    backward(model)
    return measure(model)


def fsdp2() -> tuple[dict[str, float], int]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    backward(model)
    return measure(model)


def dtensor() -> tuple[dict[str, float], int]:
    """Row-sharded weights, replicated biases: the gradients keep the parameters' placements."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
            layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    x, y = batch()
    out = model(distribute_tensor(x, mesh, [Replicate()]))
    nn.functional.mse_loss(out.full_tensor(), y).backward()
    return measure(model)


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {
            name: run() for name, run in (("ddp", ddp), ("fsdp2", fsdp2), ("dtensor", dtensor))
        }
    finally:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    args = parser.parse_args()
    mp.spawn(worker, args=(args.world, args.port, args.out), nprocs=args.world)


if __name__ == "__main__":
    main()
