"""The partial sums behind the activation statistics, and the statistics computed from them;
:mod:`~gradtrace.measure.activations` watches the calls that feed them. Per layer:

* the layer's **output** ``z`` (its module's return value, before any activation; the first
  tensor of a tuple): ``act_mean`` and ``act_std`` (Bessel-corrected, as ``torch.std``) over
  every element of the batch, and ``act_grad_mean_abs``, the mean of ``|dL/dz|`` (read with
  ``Tensor.register_hook`` on ``z``: no full backward hooks);
* the **layer's activation output** ``a = f(z)``: the output of the activation that takes
  ``z`` itself as its input, a module (``nn.ReLU``) or a function (``F.relu(z)``,
  ``z.sigmoid()``), possibly through normalization layers, ``Identity`` and reshapes
  (``Conv -> BatchNorm -> ReLU`` gives the ReLU). ``act_zero_frac`` is the fraction of exact
  zeros of ``a`` (dead ReLU units), or of ``z`` when anything else takes it first (the next
  layer, a sum with a shortcut, the loss); ``act_sat_frac`` is the fraction of ``a`` within 1%
  (of the output range) of the bounds of a saturating activation (sigmoid, tanh, hardtanh,
  ReLU6, hardsigmoid), absent after any other.

Each layer has two rows of partial sums (:func:`empty_row`, one for its module's outputs and
one for its weight's functional uses), indexed by the column constants below. An entry is a
Python number or a device tensor: counting never synchronises with the device, and
:func:`sums_table` places every tensor into one float64 table with one stack and one scatter,
summed over ranks by :func:`reduce_table` with a single ``all_reduce``; :func:`layer_stats`
turns a reduced row into the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gradtrace.measure.activation_catalog import Bounds
from gradtrace.measure.collectives import all_reduce_sum

__all__ = [
    "COLUMNS",
    "SATURATION_TOLERANCE",
    "LayerCall",
    "add_gradient",
    "add_output",
    "count_activated",
    "empty_row",
    "layer_stats",
    "reduce_table",
    "sums_table",
]

SATURATION_TOLERANCE = 0.01
"""An output within this fraction of the activation's range from a bound counts as saturated."""

# Columns of a row of partial sums.
N, SUM, SUMSQ, ZEROS, N_ZERO, SAT, N_SAT, GRAD, N_GRAD = range(9)
COLUMNS = 9


def empty_row() -> list[Any]:
    """A row of partial sums with nothing counted."""
    return [0, None, None, None, 0, None, 0, None, 0]


def _add(row: list[Any], column: int, value: torch.Tensor) -> None:
    row[column] = value if row[column] is None else row[column] + value


@dataclass
class LayerCall:
    """One call of a measured layer: zeros of its own output, until an activation decides."""

    row: list[Any]
    """The partial sums it adds to (of the layer's module outputs, or of its weight's
    functional uses)."""
    own_zeros: torch.Tensor
    size: int
    resolved: bool = False


def add_output(row: list[Any], z: torch.Tensor) -> LayerCall:
    """Add the count, sum and sum of squares of the layer output ``z`` (detached) to ``row``;
    its zeros wait in the returned call until :func:`count_activated` decides whose count."""
    row[N] += z.numel()
    _add(row, SUM, torch.sum(z, dtype=torch.float64))
    _add(row, SUMSQ, torch.linalg.vector_norm(z, 2, dtype=torch.float64).square())
    return LayerCall(row, (z == 0).sum(), z.numel())


def add_gradient(row: list[Any], grad: torch.Tensor) -> None:
    """Add ``|dL/dz|`` summed over the elements of ``grad`` and their count to ``row``."""
    row[N_GRAD] += grad.numel()
    _add(row, GRAD, torch.linalg.vector_norm(grad.detach(), 1, dtype=torch.float64))


def count_activated(
    calls: list[LayerCall], activated: torch.Tensor | None = None, bounds: Bounds = None
) -> None:
    """Add zero (and saturation) counts for ``calls``: of ``activated`` when an activation
    took their output (with ``bounds`` when it saturates), else each call's own count."""
    if activated is not None:
        zeros = (activated == 0).sum()
        if bounds is not None:
            low, high = bounds
            margin = SATURATION_TOLERANCE * (high - low)
            saturated = ((activated <= low + margin) | (activated >= high - margin)).sum()
    for call in calls:
        if call.resolved:
            continue
        call.resolved = True
        row = call.row
        if activated is None:
            _add(row, ZEROS, call.own_zeros)
            row[N_ZERO] += call.size
            continue
        _add(row, ZEROS, zeros)
        row[N_ZERO] += activated.numel()
        if bounds is not None:
            _add(row, SAT, saturated)
            row[N_SAT] += activated.numel()


def sums_table(rows: list[list[Any]], failed: bool) -> torch.Tensor:
    """``[len(rows) + 1, COLUMNS]`` float64 table of ``rows``, on the device of their tensors;
    the last row's first entry is 1 when ``failed`` (a hook failed here: nothing else is
    placed)."""
    counts = torch.zeros(len(rows) + 1, COLUMNS, dtype=torch.float64)
    counts[-1, 0] = float(failed)
    slots: list[int] = []
    sums: list[torch.Tensor] = []
    if not failed:
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                if isinstance(value, torch.Tensor):
                    slots.append(r * COLUMNS + c)
                    sums.append(value)
                elif value:
                    counts[r, c] = value
    device = sums[0].device if sums else torch.device("cpu")
    table = counts.to(device)
    if sums:  # the device-side sums, placed with one stack and one scatter
        stacked = torch.stack([t.to(device, torch.float64) for t in sums])
        table.view(-1)[torch.tensor(slots, device=device)] = stacked
    return table


def reduce_table(table: torch.Tensor, process_group: Any) -> tuple[list[list[float]], int]:
    """``table`` summed over the ranks of ``process_group`` (when torch.distributed is
    initialized), as rows on the host, and the number of ranks summed."""
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(process_group)
        if world > 1:
            table = all_reduce_sum(table, process_group)
    return table.cpu().tolist(), world  # one device-to-host copy


def layer_stats(row: list[float], world: int, grad_scale: float) -> dict[str, float] | None:
    """The statistics of one reduced row (``None`` when the layer was never called).

    ``act_sat_frac`` only when a saturating activation followed, ``act_grad_mean_abs`` only
    when a gradient arrived: its sum is of each of the ``world`` ranks' ``|dL_r/dz|``, scaled
    by ``grad_scale``, both divided out here.
    """
    n = row[N]
    if not n:
        return None
    variance = (row[SUMSQ] - row[SUM] ** 2 / n) / (n - 1) if n > 1 else math.nan
    stats = {
        "act_mean": row[SUM] / n,
        "act_std": math.sqrt(max(variance, 0.0)) if n > 1 else math.nan,
        "act_zero_frac": row[ZEROS] / row[N_ZERO] if row[N_ZERO] else math.nan,
    }
    if row[N_SAT]:
        stats["act_sat_frac"] = row[SAT] / row[N_SAT]
    if row[N_GRAD]:
        stats["act_grad_mean_abs"] = row[GRAD] / row[N_GRAD] / world / grad_scale
    return stats
