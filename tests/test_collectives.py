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

from gradtrace.measure import collectives
from gradtrace.measure.activations import ActivationCollector
from gradtrace.measure.collectives import collective_device
from gradtrace.measure.histograms import gradient_histograms
from gradtrace.measure.stats import grad_stats_table
from helpers.distributed import run_rank_script

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
    """In a group of two (faked: the gather and reduce themselves are stand-ins), each of the
    three callers hands every table to the collectives module's device step before its
    collective."""
    events: list[object] = []  # "device" for each device step, a tensor's shape per collective
    original = collectives.collective_device

    def device_step(device: torch.device, group: object = None) -> torch.device:
        events.append("device")
        return original(device, group)

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group: object = None) -> None:
        events.append(tensor.shape)
        for part in parts:
            part.copy_(tensor)

    def all_reduce(tensor: torch.Tensor, group: object = None) -> None:
        events.append(tensor.shape)
        tensor.mul_(2)

    def moved() -> list[torch.Size]:
        """The tables handed to collectives, each right after its device step."""
        assert events[::2] == ["device"] * len(events[1::2]), events
        assert all(isinstance(e, torch.Size) for e in events[1::2]), events
        return events[1::2]

    monkeypatch.setattr(collectives, "collective_device", device_step)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)

    weight = nn.Parameter(torch.randn(3, 4))
    weight._fsdp_flattened = True  # an FSDP1 shard: combined over ranks
    weight.grad = torch.randn(3, 4)
    grad_stats_table([("w", weight)])
    assert moved() == [torch.Size([1, 5])]  # the partial sums
    gradient_histograms([("w", weight)], bins=8)
    # ranges, then counts, each with the guard's flag row
    assert moved()[1:] == [torch.Size([2, 5]), torch.Size([2, 8])]

    events.clear()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    collector = ActivationCollector()
    collector.attach(model, {"0": model[0]})
    model(torch.randn(2, 4)).sum().backward()
    collector.detach()
    collector.compute()
    assert len(moved()) == 1  # the activation table, reduced once


@pytest.mark.slow
@pytest.mark.integration
def test_a_part_failing_on_one_rank_makes_every_rank_raise_none_waits(tmp_path: Path) -> None:
    import json

    run_rank_script("guarded_gather.py", lambda port: [str(tmp_path), str(port)], 120)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["raised"] == "RankFailure: it failed on rank(s) [1] of the group"
    assert rank1["raised"] == "ValueError: counting failed here"
    # the group still works afterwards, and a healthy gather stacks every rank's tensor
    assert rank0["healthy"] == rank1["healthy"] == [[[0] * 3] * 2, [[1] * 3] * 2]
