"""A hook that fails on one rank only: every rank learns it from the one all_reduce.

Used by tests/test_faults.py: two gloo processes run a DDP step with an ActivationCollector
whose layer hook raises on rank 1 only. Both ranks must reach the same all_reduce (no rank
waits forever), both must raise ActivationFault, and a second step with the hooks working
again must give values on both. Writes ``rank<r>.json`` into ``out``.

``python ddp_activation_fault.py OUT PORT``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import spawn_ranks
from torch import nn

from gradtrace.measure.activations import ActivationCollector, ActivationFault


def step(model: nn.Module, net: nn.Sequential, collector: ActivationCollector) -> dict:
    collector.attach(model, {"0.weight": net[0], "2.weight": net[2]})
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    F.cross_entropy(model(x), y).backward()
    collector.detach()
    try:
        return {"stats": collector.compute()}
    except ActivationFault as fault:
        return {"fault": str(fault), "layer": fault.layer}


def rank_main(rank: int) -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.parallel.DistributedDataParallel(net)
    collector = ActivationCollector()
    layer_called = collector._layer_called
    if rank == 1:

        def broken(i, output):
            raise ValueError("injected on rank 1")

        collector._layer_called = broken
    first = step(model, net, collector)
    collector._layer_called = layer_called
    second = step(model, net, collector)
    return {"first": first, "second": second}


if __name__ == "__main__":
    spawn_ranks(rank_main, Path(sys.argv[1]), int(sys.argv[2]))
