"""Activation statistics of one batch on 2 processes (DDP) and on one process.

Used by tests/test_activations.py: the global batch of 8 is split 4 + 4 over two ranks of a
DistributedDataParallel model; each rank's ``ActivationCollector.compute`` (one all_reduce)
must equal one process on all 8. Writes ``rank<r>.json`` and ``single.json`` into ``out``.
``python ddp_activations.py OUT [cpu|cuda] PORT``: gloo on the CPU, or NCCL on two GPUs.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ranks import spawn_ranks
from torch import nn

from gradtrace.measure.activations import ActivationCollector


def make_net() -> nn.Sequential:
    # No BatchNorm: per-process batch statistics would differ from one process's.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def measure(model: nn.Module, net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict:
    collector = ActivationCollector()
    collector.attach(model, {"0.weight": net[0], "2.weight": net[2], "4.weight": net[4]})
    F.cross_entropy(model(x), y).backward()
    stats = collector.compute()
    collector.detach()
    return stats


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g) * 3, torch.randint(0, 3, (8,), generator=g)


def rank_main(device_type: str, rank: int) -> dict:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    net = make_net().to(device)
    model = nn.parallel.DistributedDataParallel(net)
    x, y = (t[rank * 4 : rank * 4 + 4].to(device) for t in data())
    return measure(model, net, x, y)


if __name__ == "__main__":
    out, device_type, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    spawn_ranks(functools.partial(rank_main, device_type), out, port, device=device_type)
    net = make_net()
    (out / "single.json").write_text(json.dumps(measure(net, net, *data())))
