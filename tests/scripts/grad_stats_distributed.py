"""``grad_stats`` on ``--world`` gloo CPU processes: DDP, FSDP1 (``use_orig_params=True``;
FULL_SHARD, NO_SHARD and hybrid sharding), FSDP2 ``fully_shard`` (on the world, hybrid on a
replicate x shard mesh, and on the ``dp`` sub-mesh of a dp x tp mesh) and a DTensor-sharded
parameter set; each rank writes the stats, the collective count, the gradient histograms and
the optimizer side of one clipped Adam step (``OptimizerStep``, with its collective count) as
JSON. ``--device cuda``: NCCL, one GPU per process, and FSDP1 with CPU offload too;
otherwise every mesh is an explicit CPU mesh (FSDP2's default is CUDA when a GPU is visible).

Used by tests/test_stats.py, which compares the 2-process values with one
process on the same model and batch. Every rank sees the full batch (the DDP/FSDP average of
equal per-rank gradients is the one-process gradient), so the values must agree exactly up to
float rounding.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch import nn

from gradtrace.measure import grad_stats
from gradtrace.measure.histograms import gradient_histograms
from gradtrace.measure.optimizer_stats import OptimizerStep
from gradtrace.measure.selection import parameter_names
from gradtrace.measure.shards import fsdp1_shard_groups

# Where this process computes: the CPU, or its own GPU under --device cuda.
DEVICE = torch.device("cpu")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))
    return net.to(DEVICE)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    return x.to(DEVICE), y.to(DEVICE)


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


GradientsMeasured = tuple[dict[str, float], int, dict[str, Any]]
Measured = tuple[dict[str, float], int, dict[str, Any], dict[str, Any]]

CLIP_NORM = 0.05
"""Below the test model's gradient norm: the step's gradients are clipped."""
ADAM_LR = 0.01


def clip(model: nn.Module) -> None:
    """Clip the gradients' global norm to :data:`CLIP_NORM` as the strategy prescribes."""
    if hasattr(model, "clip_grad_norm_"):  # FSDP1: its own, over the shards
        model.clip_grad_norm_(CLIP_NORM)
    else:
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)


def optimizer_side(model: nn.Module) -> dict[str, Any]:
    """One clipped Adam step measured by ``OptimizerStep``: per parameter (update norm,
    weight norm, mean |m|, mean sqrt(v)), the clipped gradient norm, collectives issued."""
    names = parameter_names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if hasattr(p, "placements") and p.grad.placements != p.placements:
            # Adam steps a DTensor in place: its gradient must be placed like it (what FSDP2
            # ensures; the hand-built DTensor setup's backward places some otherwise).
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    optimizer = torch.optim.Adam(params, lr=ADAM_LR)
    step = OptimizerStep.start(optimizer, params, fsdp1_groups=fsdp1_shard_groups(model))
    clip(model)
    optimizer.step()
    counter = CountingAllGather()
    dist.all_gather = counter
    try:
        values = step.finish()
    finally:
        dist.all_gather = counter._wrapped
    assert values is not None
    rows = zip(values.update_norm, values.weight_norm, values.m_mean_abs, values.sqrt_v_mean)
    return {
        "params": {names[id(p)]: list(row) for p, row in zip(params, rows)},
        "grad_norm_clipped": values.grad_norm_clipped,
        "calls": counter.calls,
    }


def histograms(model: nn.Module) -> dict[str, Any]:
    """Each weight's histogram (number of entries, range, counts) of the whole gradient."""
    from gradtrace.measure import parameter_names
    from gradtrace.measure.shards import fsdp1_shard_groups

    names = parameter_names(model)
    weights = [(names[id(p)], p) for p in model.parameters() if names[id(p)].endswith("weight")]
    found = gradient_histograms(weights, bins=8, fsdp1_groups=fsdp1_shard_groups(model))
    return {name: [h["num"], h["min"], h["max"], h["counts"]] for name, h in found.items()}


def measure_gradients(model: nn.Module) -> GradientsMeasured:
    """``grad_stats`` of ``model``, the collectives it issued, and the histograms."""
    counter = CountingAllGather()
    dist.all_gather = counter
    try:
        stats = grad_stats(model)
    finally:
        dist.all_gather = counter._wrapped
    return {k: float(v) for k, v in stats.items()}, counter.calls, histograms(model)


def measure(model: nn.Module) -> Measured:
    """:func:`measure_gradients`, then the optimizer side of one clipped Adam step."""
    return (*measure_gradients(model), optimizer_side(model))


def single() -> tuple[dict[str, float], dict[str, Any]]:
    model = make_model()
    backward(model)
    return {k: float(v) for k, v in grad_stats(model).items()}, histograms(model)


def single_optimizer_side() -> dict[str, Any]:
    """The clipped Adam step of :func:`optimizer_side` on one process, computed by hand from
    the weights before and after it and ``optimizer.state``."""
    model = make_model()
    backward(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=ADAM_LR)
    before = {name: p.detach().clone().double() for name, p in params.items()}
    clip(model)
    grads = [p.grad.double() for p in params.values()]
    optimizer.step()
    out = {}
    for name, p in params.items():
        state = optimizer.state[p]
        out[name] = [
            (p.detach().double() - before[name]).norm().item(),
            before[name].norm().item(),
            state["exp_avg"].double().abs().mean().item(),
            state["exp_avg_sq"].double().sqrt().mean().item(),
        ]
    norm = torch.stack([g.norm() for g in grads]).norm().item()
    return {"params": out, "grad_norm_clipped": norm}


def ddp() -> Measured:
    model = nn.parallel.DistributedDataParallel(make_model())
    backward(model)
    return measure(model)


def fsdp1(**kwargs) -> Measured:  # type: ignore[no-untyped-def]
    """FSDP1 with ``use_orig_params=True`` (Lightning's default): each rank holds a slice of
    some gradients and ``None`` for the others (FULL_SHARD, the default)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=DEVICE, **kwargs)
    backward(model)
    return measure(model)


def fsdp1_cpu_offload() -> Measured:
    """Parameters and gradients offloaded to the CPU (CUDA only): CPU tables into NCCL."""
    from torch.distributed.fsdp import CPUOffload

    return fsdp1(cpu_offload=CPUOffload(offload_params=True))


def fsdp1_no_shard() -> Measured:
    """NO_SHARD: every rank holds the whole gradient, as under DDP."""
    from torch.distributed.fsdp import ShardingStrategy

    return fsdp1(sharding_strategy=ShardingStrategy.NO_SHARD)


def fsdp1_hybrid(replicas: int, strategy: str = "HYBRID_SHARD") -> Measured:
    """Hybrid sharding on a ``(replicas, world // replicas)`` mesh: shards within a row of the
    mesh, replicas across rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import ShardingStrategy

    world = dist.get_world_size()
    mesh = init_device_mesh(DEVICE.type, (replicas, world // replicas))
    return fsdp1(sharding_strategy=ShardingStrategy[strategy], device_mesh=mesh)


def fsdp2(mesh: Any = None) -> Measured:
    """``fully_shard`` on each Linear and the root: over the world by default; a 2-D mesh
    is hybrid sharding (replicate x shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = mesh or init_device_mesh(DEVICE.type, (dist.get_world_size(),))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    backward(model)
    return measure(model)


def fsdp2_hybrid() -> Measured:
    """HSDP: shards within a row of a ``(2, world // 2)`` mesh, 2 replicas across rows;
    gradients ``(Replicate(), Shard(0))``. Ranks off the first row used to count nothing and
    reach the collective with a CPU table."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (2, dist.get_world_size() // 2)
    return fsdp2(init_device_mesh(DEVICE.type, shape, mesh_dim_names=("replicate", "shard")))


def fsdp2_dp_submesh() -> Measured:
    """``fully_shard`` on the ``dp`` sub-mesh of a ``(world // 2, 2)`` dp x tp mesh, as next
    to tensor parallelism: each tp rank's dp group holds a whole copy of the gradient, so
    summing over the world would count it twice."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dist.get_world_size() // 2, 2)
    mesh = init_device_mesh(DEVICE.type, shape, mesh_dim_names=("dp", "tp"))
    return fsdp2(mesh["dp"])


def dtensor() -> Measured:
    """Row-sharded weights, replicated biases: the gradients keep the parameters' placements."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
            layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    x, y = batch()
    out = model(distribute_tensor(x, mesh, [Replicate()]))
    nn.functional.mse_loss(out.full_tensor(), y).backward()
    return measure(model)


def worker(device_type: str, rank: int) -> dict[str, Measured]:
    global DEVICE
    if device_type == "cuda":
        DEVICE = torch.device("cuda", rank)
    world = dist.get_world_size()
    replicas = 2 if world >= 4 else 1
    setups = {
        "ddp": ddp,
        "fsdp1": fsdp1,
        "fsdp1_no_shard": fsdp1_no_shard,
        # 2 replicas of world // 2 shards from 4 processes on; with 2, one replica of 2
        # shards. (A mesh of 2 replicas of 1 shard makes FSDP1 fall back to NO_SHARD on
        # the 1-rank group, where its gradients are not averaged across replicas.)
        "fsdp1_hybrid": lambda: fsdp1_hybrid(replicas),
        "fsdp1_hybrid_zero2": lambda: fsdp1_hybrid(replicas, "_HYBRID_SHARD_ZERO2"),
        "fsdp2": fsdp2,
        "fsdp2_hybrid": fsdp2_hybrid,
        "fsdp2_dp_submesh": fsdp2_dp_submesh,
        "dtensor": dtensor,
    }
    if DEVICE.type == "cuda":
        setups["fsdp1_cpu_offload"] = fsdp1_cpu_offload
    return {name: run() for name, run in setups.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    work = functools.partial(worker, args.device)
    spawn_ranks(work, args.out, args.port, world=args.world, device=args.device)


if __name__ == "__main__":
    main()
