"""Collectives GradientFlow adds on a sharded model: ``grad_stats`` on FSDP2 over 2 processes.

The statistics of a sharded gradient need the other ranks' shards; the goal is exactly one
collective per logged step (all layers' partial sums reduced together), not one per layer.
Counted at the dispatcher: :class:`CollectiveCounter` sees every ``c10d`` op (what
``torch.distributed.all_reduce`` and friends dispatch to) and every functional collective
(what DTensor's redistributions use), whichever way the code reaches them.

``python -m benchmarks.collectives`` prints the count (2 gloo processes on the CPU).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CollectiveCounter", "bench_collectives", "sharded_model"]

_NAMESPACES = frozenset({"c10d", "_c10d_functional"})
# ops in those namespaces that move no data between ranks
_NOT_COLLECTIVES = frozenset({"wait_tensor", "_wrap_tensor_autograd"})


class CollectiveCounter(TorchDispatchMode):
    """Records the collective ops dispatched while it is entered, in order (:attr:`ops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func.overloadpacket.__name__
        if func.namespace in _NAMESPACES and name not in _NOT_COLLECTIVES:
            self.ops.append(f"{func.namespace}.{name}")
        return func(*args, **(kwargs or {}))


def sharded_model() -> nn.Module:
    """A small conv net with FSDP2 (``fully_shard``) on each weight-bearing layer and the root,
    sharded over every process of the default group on a CPU mesh (FSDP2's default mesh is the
    accelerator's: on a GPU machine the parameters would move to CUDA and the CPU batch would
    not reach them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    for layer in net:
        if isinstance(layer, nn.Conv2d | nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _rank(rank: int, world_size: int, port: int, out: str) -> None:
    """One process: count ``grad_stats``' collectives, write them, leave without the
    interpreter's teardown (as tests/scripts/ranks.py does: gloo's C++ threads still alive at
    exit have aborted a rank, "terminate called without an active exception", on a busy
    machine after its work was done)."""
    from gradtrace.measure import grad_stats

    status = 1
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        net = sharded_model()
        generator = torch.Generator().manual_seed(rank)
        images = torch.randn(4, 3, 16, 16, generator=generator)
        nn.functional.cross_entropy(net(images), torch.arange(4)).backward()
        with CollectiveCounter() as counter:
            grad_stats(net)
        Path(out, f"rank{rank}.json").write_text(json.dumps(counter.ops))
        dist.barrier()  # no rank tears the group down while another still talks to it
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_collectives(log: Callable[[str], None], world_size: int = 2) -> dict[str, Any]:
    """Collectives per logged step of ``grad_stats`` on an FSDP2 model, ``world_size`` gloo
    processes."""
    log(f"collectives: grad_stats on an FSDP2 model, {world_size} gloo processes")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        for attempt in (1, 2):
            try:
                mp.spawn(_rank, args=(world_size, _free_port(), tmp), nprocs=world_size)
                break
            except mp.ProcessExitedException as err:
                # A signal (not a Python error) once more, on a new port: the C++ runtime
                # has aborted a gloo process outside the measured code on a busy machine.
                if err.signal_name is None or attempt == 2:
                    raise
                log(f"collectives: a process died of {err.signal_name}; running them again")
        ops = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
    return {
        "collectives_per_logged_step": max(len(rank_ops) for rank_ops in ops),
        "ops_per_rank": ops,
        "processes": world_size,
        "backend": "gloo",
    }


if __name__ == "__main__":
    print(json.dumps(bench_collectives(lambda m: print(m, file=sys.stderr)), indent=2))
