"""The flight recorder's rule and reading: when the loss spikes, and which layer left its own
history first.

:func:`robust_z` is the spike rule: a value against the median and the median absolute
deviation (MAD) of the previous :data:`WINDOW` values, robust to the outliers a history of
spikes holds. :func:`first_departure` applies the same to ``log10`` of every layer's
gradient, update and activation series and walks back from the spike through the steps where
some series departs, naming the first in the order things happen in a step. Torch alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LOSS_FLOOR",
    "SETTLE",
    "SIDES",
    "WINDOW",
    "Departure",
    "first_departure",
    "robust_z",
]

SIDES: tuple[str, ...] = ("gradient", "update", "activation")
"""The ring's columns: gradient L2, update L2 and activation RMS per layer."""
_GRADIENT, _UPDATE, _ACTIVATION = range(3)
# The order things happen in a step, which names the first departure of a step: activations
# (forward, input first), gradients (backward, output first), updates (the optimizer).
_STEP_ORDER = ((_ACTIVATION, 1), (_GRADIENT, -1), (_UPDATE, 1))

WINDOW = 50
"""A value is compared with up to this many previous steps of its own series."""
MIN_HISTORY = 10
"""Fewer previous finite values than this: no verdict (never a spike or a departure)."""
LOSS_FLOOR = 0.05
"""The loss's robust scale is at least this fraction of its median (a flat loss is no
license to call its noise a spike)."""
DECADES_FLOOR = 0.05
"""A layer series' robust scale, in decades of its log10, is at least this (steady series)."""
LAG = 1
"""Steps the loss may spike after the last departure (an update departs at step s, the loss
it makes at s + 1)."""
SETTLE = 10
"""A loss that spikes within this many steps of the last spiking one is the same spike (a
loss that jumps, eases and jumps again while training recovers is one incident)."""
_MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its sigma


def robust_z(value: float, previous: Sequence[float], floor: float = 0.0) -> float | None:
    """``(value - median) / max(1.4826 * MAD, floor * |median|, tiny)`` of ``value`` against
    the finite values of ``previous``; ``None`` with fewer than :data:`MIN_HISTORY`."""
    finite = [v for v in previous if math.isfinite(v)]
    if len(finite) < MIN_HISTORY:
        return None
    median = statistics.median(finite)
    mad = statistics.median(abs(v - median) for v in finite)
    scale = max(_MAD_TO_SIGMA * mad, floor * abs(median), 1e-12)
    return (value - median) / scale


@dataclass(frozen=True)
class Departure:
    """The first series to leave its own history in the run of steps before a spike."""

    row: int
    """Its row in the norms given to :func:`first_departure`."""
    side: str
    """One of :data:`SIDES`."""
    layer: int
    """Its layer's index among the recorder's layers."""
    factor: float
    """Its value over its median of the previous steps (nan when not finite)."""


def _series_z(
    values: torch.Tensor, expected_nonfinite: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust z of ``log10`` of each ``[steps x ...]`` value against the previous
    :data:`WINDOW` steps of its own series, and those steps' median (in ``log10``).

    Zeros (a step the GradScaler skipped, a layer without a gradient) and non-finite values
    are no history; a non-finite value has ``z = inf`` unless ``expected_nonfinite`` marks it
    (a skipped fp16 step's gradient), then nan; under :data:`MIN_HISTORY` values, nan."""
    logs = torch.where((values > 0) & values.isfinite(), values, torch.nan).log10()
    flat = logs.flatten(1)
    padded = torch.cat([torch.full((WINDOW, flat.shape[1]), torch.nan, dtype=flat.dtype), flat])
    windows = padded.unfold(0, WINDOW, 1)[: flat.shape[0]]  # row t: rows t - WINDOW .. t - 1
    median = windows.nanmedian(-1).values
    mad = (windows - median[..., None]).abs().nanmedian(-1).values
    scale = (_MAD_TO_SIGMA * mad).clamp(min=DECADES_FLOOR)
    z = (flat - median) / scale
    z[(~windows.isnan()).sum(-1) < MIN_HISTORY] = torch.nan
    nonfinite = ~values.isfinite().flatten(1)
    if expected_nonfinite is not None:
        nonfinite &= ~expected_nonfinite.flatten(1)
    z[nonfinite] = math.inf
    return z.reshape(values.shape), median.reshape(values.shape)


def first_departure(
    norms: torch.Tensor,
    spike_row: int,
    flow_order: Sequence[int],
    threshold: float,
    scaler_in_use: bool = False,
) -> tuple[Departure | None, torch.Tensor]:
    """The first series of ``norms`` (``[steps x sides x layers]``, :data:`SIDES`) to depart
    (``|z| > threshold`` or non-finite) in the run of consecutive steps with departures that
    ends at ``spike_row`` or at most :data:`LAG` steps before it, and the z-scores. At the
    run's first step, the first in a step's order is named: activations (``flow_order``,
    input first), gradients (output first), updates. ``scaler_in_use``: non-finite
    gradients are a GradScaler's skipped steps, no departure."""
    expected = None
    if scaler_in_use:
        expected = torch.zeros_like(norms, dtype=torch.bool)
        expected[:, _GRADIENT] = True
    z, median = _series_z(norms, expected)
    departed = (z.abs() > threshold).flatten(1).any(1).tolist()
    ends = [t for t in range(spike_row, max(-1, spike_row - LAG - 1), -1) if departed[t]]
    if not ends:
        return None, z
    row = ends[0]
    while row > 0 and departed[row - 1]:  # a quiet step ends the walk: chance departures
        row -= 1  # of noisy series before it are not the cause
    for side, direction in _STEP_ORDER:
        for layer in list(flow_order)[::direction]:
            if abs(float(z[row, side, layer])) > threshold:
                value = float(norms[row, side, layer])
                factor = value / 10 ** float(median[row, side, layer])
                return Departure(row, SIDES[side], layer, factor), z
    return None, z
