"""What part of a parameter's gradient this rank holds, and which ranks hold the rest.

:func:`held_here` describes one parameter's gradient on this rank as a :class:`Held`: the
values to sum here and the ranks whose partial sums together make the full gradient
(``None`` when this rank holds it whole). :mod:`gradtrace.measure.stats` turns that into
partial sums and one collective.

FSDP1 (``use_orig_params=True``) gives an original parameter no link back to its flat
parameter, so :func:`fsdp1_shard_groups` reads each unit's sharding strategy and process group
from the module; the caller passes that table to :func:`held_here`.

DeepSpeed ZeRO leaves ``param.grad`` empty after ``engine.backward``: the reduced gradient
sits in the optimizer's partitions, read here the way ``deepspeed.utils.safe_get_full_grad``
reads them but without its per-parameter all_reduce of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from gradtrace.compat import (
    deepspeed_zero3_group,
    deepspeed_zero12_fragment,
    fsdp1_units,
    is_deepspeed_zero12,
    is_fsdp1_flattened,
)

__all__ = [
    "EVERY_RANK",
    "Held",
    "fsdp1_shard_groups",
    "held_here",
    "param_shard_ranks",
    "reduce_over_ranks",
    "shard_mask",
]

EVERY_RANK: tuple[int, ...] = ()
"""``Held.shard_ranks`` for a gradient sharded over every rank of the collective's group."""

FSDP1Groups = WeakIdKeyDictionary
"""FSDP1 original parameter -> global ranks of its shard group (``None``: ``NO_SHARD``, whole
on every rank). Weak and by identity: a parameter that is gone drops out, and tensors compare
by value, not identity."""


@dataclass(frozen=True)
class Held:
    """One parameter's gradient as this rank holds it."""

    grad: torch.Tensor | None
    """Values to sum on this rank; ``None`` when it holds none or a replica counted elsewhere."""
    numel: int
    """Dense element count of ``grad`` (0 with ``grad=None``)."""
    shard_ranks: tuple[int, ...] | None
    """Global ranks whose partial sums add up to the full gradient (:data:`EVERY_RANK`: all
    ranks of the group); ``None``: the gradient is complete here, no collective needed."""


def fsdp1_shard_groups(module: nn.Module) -> FSDP1Groups:
    """The shard group of every original parameter of the FSDP1 units in ``module``.

    ``NO_SHARD`` units hold whole gradients (``None``: no collective); hybrid units
    (``HYBRID_SHARD``, ``_HYBRID_SHARD_ZERO2``) shard over their intra-node group, the
    handle's ``process_group``, and replicate across nodes, so only that group's partial
    sums add up. Cheap enough to read on every :func:`~gradtrace.measure.grad_stats` call.
    """
    groups: FSDP1Groups = WeakIdKeyDictionary()
    for params, group in fsdp1_units(module):
        ranks = None if group is None else tuple(dist.get_process_group_ranks(group))
        for param in params:
            groups[param] = ranks
    return groups


def _dtensor(grad: torch.Tensor) -> Held | None:
    """How a DTensor gradient is held, or ``None`` if ``grad`` is no DTensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return None
    if not isinstance(grad, DTensor):
        return None
    if any(p.is_partial() for p in grad.placements):
        # Pending reduction: make it whole first (one extra collective, rare outside hooks).
        from torch.distributed.tensor import Replicate

        placements = [Replicate() if p.is_partial() else p for p in grad.placements]
        grad = grad.redistribute(grad.device_mesh, placements)
    local = grad.to_local()
    if not any(p.is_shard() for p in grad.placements):
        return Held(local, local.numel(), None)  # replicated: whole on every rank
    return Held(local, local.numel(), _shard_group(grad.device_mesh, grad.placements))


def _shard_group(mesh: Any, placements: Sequence[Any]) -> tuple[int, ...] | None:
    """Global ranks of the mesh whose shards, with this rank's, make one whole tensor: those
    at this rank's coordinate on every replicated mesh dimension (hybrid sharding: this
    replica's shard group). Ranks outside the mesh (a sub-mesh such as ``mesh["dp"]`` next to
    tensor parallelism) hold another copy and are left out. ``None`` if this rank is not on
    the mesh."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    ranks = mesh.mesh  # the global rank at each mesh coordinate
    index = tuple(
        coordinate[dim] if placement.is_replicate() else slice(None)
        for dim, placement in enumerate(placements)
    )
    return tuple(int(r) for r in ranks[index].flatten().tolist())


def _deepspeed_zero3(param: torch.Tensor) -> Held:
    """ZeRO-3: this rank's partition of the fp32 gradient (``safe_get_local_grad``), the
    partitions of ``ds_process_group`` padded to equal size; the padding is cut off here."""
    from deepspeed.utils import safe_get_local_grad

    local = safe_get_local_grad(param)
    if local is None:
        return Held(None, 0, None)
    # DeepSpeed's own full-gradient gather (_fp32_state_allgather) uses the same group.
    group = deepspeed_zero3_group(param)
    local = local.flatten()
    start = dist.get_rank(group) * local.numel()
    local = local[: max(0, min(local.numel(), param.ds_numel - start))]
    return Held(local, local.numel(), tuple(dist.get_process_group_ranks(group)))


def _deepspeed_zero12(param: torch.Tensor) -> Held:
    """ZeRO-1/2: the fragment of the reduced gradient in this rank's optimizer partition, over
    the parameter's data-parallel group."""
    group, fragment = deepspeed_zero12_fragment(param)
    ranks = tuple(dist.get_process_group_ranks(group))
    if fragment is None:
        return Held(None, 0, ranks)
    return Held(fragment, fragment.numel(), ranks)


def held_here(param: torch.Tensor, fsdp1_groups: FSDP1Groups | None = None) -> Held:
    """What of ``param``'s gradient this rank holds and which ranks hold the rest.

    ``fsdp1_groups`` (:func:`fsdp1_shard_groups` of the model) says how an FSDP1 parameter is
    sharded; without it, or for a parameter it does not know, FSDP1's default is assumed:
    sharded over the whole group (``FULL_SHARD``/``SHARD_GRAD_OP``)."""
    grad = param.grad
    if grad is None and hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        return _deepspeed_zero3(param)
    if grad is None and is_deepspeed_zero12(param):
        return _deepspeed_zero12(param)
    shard_ranks: tuple[int, ...] | None = None
    if is_fsdp1_flattened(param):
        # FSDP1 (use_orig_params=True): a slice of the gradient or None on each rank of the
        # shard group.
        known = fsdp1_groups if fsdp1_groups is not None else {}
        shard_ranks = known.get(param, EVERY_RANK)
    if grad is None:
        return Held(None, 0, shard_ranks)
    dtensor = _dtensor(grad)
    if dtensor is not None:
        return dtensor
    if grad.is_sparse:
        # nn.Embedding(sparse=True): the stored values give the same sums; the mean is over the
        # dense size. Duplicate indices are summed first.
        return Held(grad.coalesce().values(), grad.numel(), shard_ranks)
    return Held(grad, grad.numel(), shard_ranks)


def param_shard_ranks(
    param: torch.Tensor, fsdp1_groups: FSDP1Groups | None = None
) -> tuple[int, ...] | None:
    """Global ranks whose pieces of the parameter ``param`` itself (its values, and optimizer
    state shaped like it), with this rank's, make the whole tensor; ``None``: whole here.

    Read from the parameter, not its gradient: a DTensor's gradient may be placed otherwise
    (a ``Replicate`` bias gets a ``Shard`` gradient)."""
    if is_fsdp1_flattened(param):
        known = fsdp1_groups if fsdp1_groups is not None else {}
        return known.get(param, EVERY_RANK)
    placements = getattr(param, "placements", None)
    if placements is not None and any(p.is_shard() for p in placements):
        return _shard_group(param.device_mesh, placements)
    return None


def shard_mask(
    shard_ranks: Sequence[tuple[int, ...] | None], group: Any, device: torch.device
) -> torch.Tensor | None:
    """``[ranks of group x layers]`` boolean mask of the ranks whose partial sums make each
    layer's whole gradient (from each :attr:`Held.shard_ranks`), or ``None`` when every layer
    takes all of them (FULL_SHARD, FSDP2 over the whole world)."""
    if all(not ranks for ranks in shard_ranks):
        return None
    world = dist.get_world_size(group)
    rows = []
    for ranks in shard_ranks:
        if not ranks:  # EVERY_RANK, or whole here (that row is not taken from the gather)
            rows.append([True] * world)
            continue
        indices = {r if group is None else dist.get_group_rank(group, r) for r in ranks}
        rows.append([i in indices for i in range(world)])
    return torch.tensor(rows, dtype=torch.bool).T.to(device, non_blocking=True)


def reduce_over_ranks(
    gathered: torch.Tensor, mask: torch.Tensor | None, reduce: str, fill: float = 0.0
) -> torch.Tensor:
    """``gathered`` (``[ranks x layers, ...]``) reduced over ranks by ``reduce`` (``"sum"``,
    ``"amax"``, ``"amin"``), each layer over the ranks :func:`shard_mask` keeps for it; the
    others count as ``fill``, the reduction's neutral value."""
    if mask is not None:
        keep = mask.reshape(*mask.shape, *[1] * (gathered.ndim - 2))
        # where, not a product: a nan partial sum times a 0 mask would still be nan.
        gathered = torch.where(keep, gathered, torch.full_like(gathered, fill))
    return getattr(gathered, reduce)(dim=0)
