"""Gradient histograms, in the form TensorBoard (``add_histogram_raw``) and W&B
(``wandb.Histogram``) take (sent by :mod:`gradtrace.gradient_flow.histogram_loggers`).

Each histogram is of a parameter's whole gradient, also when ranks hold only shards of it
(FSDP, DTensor, DeepSpeed ZeRO): ranges and counts are summed over the shard group the way
:mod:`gradtrace.measure.stats` sums partial sums, with one collective for the ranges and
one for the counts. Counted on the device with an integer ``scatter_add_``, which is
deterministic (``torch.histc`` on CUDA raises under ``torch.use_deterministic_algorithms``);
non-finite entries are left out. Two small device-to-host copies per histogram step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradtrace.measure.collectives import all_gather_guarded
from gradtrace.measure.shards import FSDP1Groups, Held, held_here, reduce_over_ranks, shard_mask

__all__ = ["BINS", "gradient_histograms"]

BINS = 64

# Columns of the per-layer range table (then the sum and the sum of squares): min, max and the
# sums each combine over ranks with their own reduction.
_MIN, _MAX, _NUM = range(3)


def _values(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` flattened, in float32 (float64 stays float64): half precision is binned in
    float32 as ``histc`` did."""
    flat = grad.detach().flatten()
    return flat if flat.dtype == torch.float64 else flat.float()


def _ranges(held: Sequence[Held], device: torch.device) -> torch.Tensor:
    """``[layers x 5]`` float64: min, max, count, sum and sum of squares of the finite entries
    this rank holds (``inf``, ``-inf``, 0, 0, 0 for none)."""
    rows = []
    for h in held:
        if h.grad is None or h.grad.numel() == 0:
            rows.append(torch.tensor([torch.inf, -torch.inf, 0.0, 0.0, 0.0], device=device))
            continue
        g = _values(h.grad)
        finite = torch.isfinite(g)
        clean = torch.where(finite, g, 0.0)
        row = [
            torch.where(finite, g, torch.inf).min(),
            torch.where(finite, g, -torch.inf).max(),
            finite.sum(),
            clean.sum(dtype=torch.float64),
            clean.square().sum(dtype=torch.float64),
        ]
        rows.append(torch.stack([value.to(device, torch.float64) for value in row]))
    return torch.stack(rows)


def _counts(
    held: Sequence[Held], ranges: list[list[float]], bins: int, device: torch.device
) -> torch.Tensor:
    """``[layers x bins]`` int64 counts of this rank's finite entries in ``bins`` equal bins
    of each layer's ``[min, max]`` (the maximum goes into the last bin, as with ``histc``)."""
    counts = torch.zeros(len(held), bins + 1, dtype=torch.long, device=device)
    for row, (h, (low, high, *_)) in enumerate(zip(held, ranges)):
        if h.grad is None or h.grad.numel() == 0 or low > high:
            continue
        g = _values(h.grad)
        index = ((g - low) * (bins / (high - low))).floor().clamp(0, bins - 1).long()
        index = torch.where(torch.isfinite(g), index, bins)  # non-finite: the dropped last bin
        ones = torch.ones(1, dtype=torch.long, device=g.device).expand_as(index)
        counts[row].scatter_add_(0, index.to(device), ones.to(device))
    return counts[:, :bins]


def gradient_histograms(
    named_parameters: Sequence[tuple[str, torch.Tensor]],
    bins: int = BINS,
    *,
    group: Any = None,
    fsdp1_groups: FSDP1Groups | None = None,
) -> dict[str, dict[str, Any]]:
    """``{name: {"edges", "counts", "sum", "sum_squares", "num", "min", "max"}}`` (host lists
    and floats) of each parameter's whole gradient, finite entries only; parameters whose
    gradient has none (or no gradient) are left out.

    With sharded gradients, every rank of ``group`` must call it (same parameters, same
    order): two ``all_gather`` collectives combine the shards (``fsdp1_groups``: as for
    :func:`~gradtrace.measure.grad_stats`). If counting fails on one rank,
    every rank raises (:class:`~gradtrace.measure.collectives.RankFailure` on the
    others) instead of waiting.
    """
    if not named_parameters:
        return {}
    held = [held_here(p, fsdp1_groups) for _, p in named_parameters]
    grads = [h.grad for h in held if h.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sharded = [h.shard_ranks is not None for h in held]
    mask = None
    combine = any(sharded) and dist.is_initialized() and dist.get_world_size(group) > 1
    if not combine:
        table = _ranges(held, device)
    else:
        # guarded: a rank whose part fails must not leave the others in the collective
        shape = (len(held), 5)
        gathered = all_gather_guarded(lambda: _ranges(held, device), shape, torch.float64, group)
        device = gathered.device
        table = gathered[dist.get_rank(group)]
        mask = shard_mask([h.shard_ranks for h in held], group, device)
        whole = torch.cat(
            [
                reduce_over_ranks(gathered[:, :, _MIN : _MIN + 1], mask, "amin", torch.inf),
                reduce_over_ranks(gathered[:, :, _MAX : _MAX + 1], mask, "amax", -torch.inf),
                reduce_over_ranks(gathered[:, :, _NUM:], mask, "sum"),  # count, sum, squares
            ],
            dim=1,
        )
        table = torch.where(_to_device(sharded, device)[:, None], whole, table)
    ranges = table.cpu().tolist()
    for values in ranges:
        if values[_MIN] == values[_MAX]:  # one distinct value: a unit-wide bin range around it
            values[_MIN], values[_MAX] = values[_MIN] - 0.5, values[_MAX] + 0.5
    if not combine:
        counts = _counts(held, ranges, bins, device)
    else:
        parts = all_gather_guarded(
            lambda: _counts(held, ranges, bins, device), (len(held), bins), torch.long, group
        )
        whole_counts = reduce_over_ranks(parts, mask, "sum")
        own = parts[dist.get_rank(group)]
        counts = torch.where(_to_device(sharded, device)[:, None], whole_counts, own)
    out: dict[str, dict[str, Any]] = {}
    for (name, _), (low, high, num, total, squares), count in zip(
        named_parameters, ranges, counts.cpu().tolist()
    ):
        if num == 0:
            continue
        step = (high - low) / bins
        out[name] = {
            "edges": [low + k * step for k in range(bins + 1)],
            "counts": count,
            "sum": total,
            "sum_squares": squares,
            "num": int(num),
            "min": low,
            "max": high,
        }
    return out


def _to_device(flags: list[bool], device: torch.device) -> torch.Tensor:
    return torch.tensor(flags, dtype=torch.bool).to(device, non_blocking=True)
