"""The flight recorder (``FlightRecorder``, torch alone) on 2 gloo CPU processes under DDP and
FSDP2 ``fully_shard``: each rank trains on half of every batch, with an Adam learning rate
1000 times higher at :data:`BURST`; each rank writes, as JSON, the spikes its checks found, the
collectives its checks and its reading of the ring issued, and the ring read back
(``FlightRecorder.norms``).

Used by tests/test_flight_recorder.py, which compares them with :func:`single`, one process on
the whole batches: the loss is the mean over ranks, the gradients are DDP's or FSDP's average,
the activation shares of the two halves add up, so the values must agree up to float
rounding.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from gradtrace.measure.flight_recorder import ACTIVATION_SHARE, FlightRecorder
from gradtrace.measure.selection import select_layers

STEPS, BURST, CAPACITY, THRESHOLD = 24, 18, 20, 6.0
BATCH = 4 * ACTIVATION_SHARE  # each rank's activation share: 2 samples of its half


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(step: int, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s :data:`BATCH` samples, half a rank; ``whole``: for one process, the
    samples of each rank's activation share first (the first 1/ACTIVATION_SHARE of its half),
    so that the share of the whole batch holds the same samples (the loss, a mean, and the
    gradients do not depend on the order)."""
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 3, generator=generator)
    if whole:
        half, share = BATCH // 2, BATCH // 2 // ACTIVATION_SHARE
        first = [*range(share), *range(half, half + share)]
        order = first + [i for i in range(BATCH) if i not in first]
        return x[order], y[order]
    return x, y


def counted(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """``fn(*args)`` and the number of ``dist.all_gather`` calls it made."""
    original, calls = dist.all_gather, [0]

    def counting(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return original(*a, **kw)

    dist.all_gather = counting
    try:
        return fn(*args), calls[0]
    finally:
        dist.all_gather = original


def record(model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train ``model`` for :data:`STEPS` steps on this rank's share of each batch, recording
    every step; the checks' spikes, their collectives and the ring read back."""
    layers = select_layers(model)
    recorder = FlightRecorder(layers, CAPACITY, torch.device("cpu"))
    recorder.attach({layer.name: layer.module for layer in layers})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    spikes, check_calls = [], []
    for step in range(STEPS):
        x, y = (t.chunk(world)[rank] for t in batch(step, world == 1))
        loss = nn.functional.mse_loss(model(x), y)
        recorder.add_loss(loss)
        recorder.paused = True
        loss.backward()
        recorder.paused = False
        recorder.add_gradients(params)
        recorder.snapshot_weights(params)
        for group in optimizer.param_groups:
            group["lr"] = 10.0 if step == BURST else 1e-2
        optimizer.step()
        optimizer.zero_grad()
        recorder.finish_updates()
        recorder.end_step(step)
        if recorder.unchecked >= CAPACITY // 4 or step == STEPS - 1:  # and at the end
            found, calls = counted(recorder.check, THRESHOLD)
            spikes += [list(spike) for spike in found]
            check_calls.append(calls)
    rows, steps, losses = recorder.window()
    norms, norms_calls = counted(recorder.norms, rows)
    return {
        "names": recorder.names,
        "spikes": spikes,
        "check_collectives": check_calls,
        "norms_collectives": norms_calls,
        "steps": steps,
        "losses": losses,
        "norms": norms.tolist(),
    }


def single() -> dict[str, Any]:
    """One process on the whole batches."""
    return record(make_model())


def ddp(rank: int) -> dict[str, Any]:
    return record(nn.parallel.DistributedDataParallel(make_model()), rank, 2)


def fsdp2(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return record(model, rank, 2)


def worker(rank: int) -> dict[str, Any]:
    return {"ddp": ddp(rank), "fsdp2": fsdp2(rank)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    spawn_ranks(worker, args.out, args.port, world=2)


if __name__ == "__main__":
    main()
