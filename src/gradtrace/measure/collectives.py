"""The collectives GradientFlow issues, each on a device its process group's backend serves.

NCCL takes CUDA tensors only: a CPU tensor makes it raise "No backend type associated with
device type cpu" on that rank while the others wait until the timeout. Tables of partial sums
can be on the CPU on one rank and not on another (a rank holding no gradient, CPU-offloaded
gradients under FSDP1 or DeepSpeed, activation counts gathered on the host), so every
collective goes through this module, which moves its input to a device the backend serves
first: the tensor's own device when it is one, else the backend's (CUDA: the current device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankFailure",
    "all_gather_guarded",
    "all_gather_stacked",
    "all_reduce_sum",
    "collective_device",
]


class RankFailure(RuntimeError):
    """What a rank computes for a collective failed on another rank (every rank raises)."""


def _served_device_types(group: Any) -> list[str]:
    """Device types the backend(s) of ``group`` serve, from ``get_backend_config``
    (``"cuda:nccl"``, ``"cpu:gloo,cuda:gloo"``, ``"cpu:gloo,cuda:nccl"``...)."""
    config = dist.get_backend_config(group)
    return [entry.split(":")[0] for entry in config.split(",") if ":" in entry]


def collective_device(device: torch.device, group: Any = None) -> torch.device:
    """``device`` if the backend of ``group`` (default: the world) serves it, else the device
    the backend serves (for an accelerator, this process's current one)."""
    served = _served_device_types(group)
    if not served or device.type in served:
        return device
    kind = served[0]
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def _on_collective_device(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return tensor.to(collective_device(tensor.device, group), non_blocking=True)


def all_gather_stacked(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``[ranks of group x *tensor.shape]``: every rank's ``tensor``, on the collective's
    device. Every rank of ``group`` must call it with a tensor of the same shape and dtype."""
    tensor = _on_collective_device(tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of every rank's ``tensor``, reduced in place on the collective's device (in
    ``tensor`` itself when it is there already). Every rank of ``group`` must call it."""
    tensor = _on_collective_device(tensor, group)
    dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_guarded(
    compute: Callable[[], torch.Tensor],
    shape: Sequence[int],
    dtype: torch.dtype,
    group: Any = None,
) -> torch.Tensor:
    """:func:`all_gather_stacked` of ``compute()`` (a ``shape`` tensor of ``dtype``), where
    ``compute`` failing on one rank does not leave the others waiting: every rank takes part
    (a failed one with zeros and a flag) and then raises, the failed rank its own error, the
    others :class:`RankFailure`."""
    error: Exception | None = None
    try:
        values = compute().to(dtype)
    except Exception as err:  # raised again below, on every rank, after the collective
        error, values = err, torch.zeros(*shape, dtype=dtype)
    flag = torch.full((1, *shape[1:]), float(error is not None), dtype=dtype)
    gathered = all_gather_stacked(torch.cat([values, flag.to(values.device)]), group)
    failed = gathered[:, -1].flatten(1)[:, 0].cpu().tolist()
    if error is not None:
        raise error
    if any(failed):
        ranks = [rank for rank, bad in enumerate(failed) if bad]
        raise RankFailure(f"it failed on rank(s) {ranks} of the group")
    return gathered[:, :-1]
