"""Every collective GradientFlow issues takes its tensors on a device the backend serves.

NCCL rejects CPU tensors ("No backend type associated with device type cpu") on the rank that
passes one while the others wait; a backend registered for CUDA only behaves the same way
here, without a GPU. One process (world size 1) is enough to see the rule: the check is in
the process group, before any data moves.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradtrace.gradient_flow.activations import ActivationCollector
from gradtrace.gradient_flow.collectives import collective_device
from gradtrace.gradient_flow.histograms import gradient_histograms
from gradtrace.gradient_flow.stats import grad_stats_table

SRC = Path(__file__).resolve().parents[1] / "src" / "gradtrace"
# torch.distributed functions that move data between ranks
COLLECTIVES = {
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
}


def _cuda_only_backend(store, rank, size, timeout):  # type: ignore[no-untyped-def]
    return dist.ProcessGroupGloo(store, rank, size, timeout)


@pytest.fixture
def world() -> Iterator[None]:
    """A one-process gloo world (the default group serves CPU and CUDA tensors)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def cuda_only(world: None) -> dist.ProcessGroup:
    """A group whose backend is registered for CUDA only, as NCCL is."""
    if "cudaonly" not in dist.Backend.backend_list:
        dist.Backend.register_backend("cudaonly", _cuda_only_backend, devices=["cuda"])
    return dist.new_group(backend="cudaonly")


def test_a_cuda_only_backend_rejects_cpu_tensors_as_nccl_does(cuda_only) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(2), group=cuda_only)


def test_collective_device_is_one_the_backend_serves(cuda_only, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cpu = torch.device("cpu")
    assert collective_device(cpu) == cpu  # gloo serves the CPU: no copy
    assert collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # and CUDA
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device(cpu, cuda_only) == torch.device("cuda", 3)


def test_every_collective_in_gradtrace_goes_through_the_collectives_module() -> None:
    """No ``dist.<collective>(...)`` call outside collectives.py (Lightning's own
    ``strategy.broadcast`` picks its device itself)."""
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
                and ast.unparse(node.func.value) in {"dist", "torch.distributed"}
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found == []


def test_grad_stats_histograms_and_activations_reach_the_collective_through_it(
    world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a group of two (faked: the gather and reduce themselves are stand-ins), each of
    the three callers hands its table to the collectives module, which is where it would move
    to the backend's device."""
    calls: list[str] = []

    def gather(tensor: torch.Tensor, group: object = None) -> torch.Tensor:
        calls.append("all_gather_stacked")
        return torch.stack([tensor, tensor])

    def reduce(tensor: torch.Tensor, group: object = None) -> torch.Tensor:
        calls.append("all_reduce_sum")
        return tensor * 2

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr("gradtrace.gradient_flow.stats.all_gather_stacked", gather)
    monkeypatch.setattr("gradtrace.gradient_flow.histograms.all_gather_stacked", gather)
    monkeypatch.setattr("gradtrace.gradient_flow.activations.all_reduce_sum", reduce)

    weight = nn.Parameter(torch.randn(3, 4))
    weight._fsdp_flattened = True  # an FSDP1 shard: combined over ranks
    weight.grad = torch.randn(3, 4)
    grad_stats_table([("w", weight)])
    gradient_histograms([("w", weight)])
    assert calls == ["all_gather_stacked", "all_gather_stacked", "all_gather_stacked"]

    calls.clear()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    collector = ActivationCollector()
    collector.attach(model, {"0": model[0]})
    model(torch.randn(2, 4)).sum().backward()
    collector.detach()
    collector.compute()
    assert calls == ["all_reduce_sum"]
