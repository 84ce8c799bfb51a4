"""Interleaved timing and the statistics of its rounds.

Shared machines are noisy: another process can slow one measurement by 2x and leave the next
alone. So nothing is measured alone. Every figure is a ratio of workloads run in the same
process, one after the other inside each round (A B C, then B C A, ...), and the ratio is taken
per round before the median over rounds: slow phases of the machine hit both sides of a ratio.

A verdict needs more than the median: :func:`median_interval` gives a distribution-free
confidence interval of the median (order statistics), which is what a goal is judged on.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Summary", "interleave", "median_interval", "ratios", "round_orders"]

CONFIDENCE = 0.95
"""The coverage :func:`median_interval` aims at."""

Workload = Callable[[], "float | None"]
"""One measurement: returns its own duration in seconds, or ``None`` to be timed around."""


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of ``names`` in each round: rotated by one per round (A B C, B C A, C A B).

    Every workload takes every position equally often (over ``len(names)`` rounds), so none
    always runs right after the same neighbour (warm caches, a background flush).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0; got {rounds}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"names must be distinct and not empty; got {list(names)}")
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


def interleave(
    workloads: Mapping[str, Workload],
    rounds: int,
    *,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    between: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Run every workload once per round in rotating order; return each one's durations.

    Args:
        workloads: name -> callable. A callable returns its own duration (seconds, e.g. a
            block timed inside a Trainer) or ``None``, in which case ``clock`` times the call.
        rounds: recorded rounds; ``result[name][r]`` is round ``r``'s duration of ``name``.
        warmup: rounds run first and discarded (first calls allocate, compile, fill caches).
        clock: the timer for workloads that return ``None``.
        between: called with the name of the next workload before each call, outside the
            timing (e.g. to switch a callback on).
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    names = list(workloads)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r, order in enumerate(round_orders(names, warmup + rounds)):
        for name in order:
            if between is not None:
                between(name)
            start = clock()
            own = workloads[name]()
            elapsed = clock() - start if own is None else float(own)
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ``numerator[r] / denominator[r]``."""
    if len(numerator) != len(denominator):
        raise ValueError(
            f"ratios need the same number of rounds; got {len(numerator)} and {len(denominator)}"
        )
    return [a / b if b else math.inf for a, b in zip(numerator, denominator)]


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """A confidence interval of the median: ``(low, high, coverage)``.

    Distribution-free: with ``n`` sorted values, ``[x_(k), x_(n+1-k)]`` holds the true median
    with probability ``1 - 2 P(Binomial(n, 1/2) < k)``, whatever the distribution of the
    rounds (a machine's noise is far from normal: rare, large slow-downs). ``k`` is the
    largest with at least ``confidence`` coverage; with too few values for that (``n <= 5``
    at 95%) the interval is the whole range and ``coverage`` says how much less it holds.
    """
    if not values:
        raise ValueError("median_interval needs at least one value")
    ordered = sorted(float(v) for v in values)
    n = len(ordered)

    def coverage(k: int) -> float:
        below = sum(math.comb(n, i) for i in range(k)) / 2**n
        return 1.0 - 2.0 * below

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure's per-round values, and the median's interval.

    ``ci_low``/``ci_high`` bound the median with probability ``ci_coverage``
    (:func:`median_interval`); ``low``/``high`` are the extreme rounds.
    """

    median: float
    low: float
    high: float
    rounds: int
    values: tuple[float, ...]
    ci_low: float
    ci_high: float
    ci_coverage: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise per-round values (at least one)."""
        if not values:
            raise ValueError("Summary.of needs at least one value")
        vals = tuple(float(v) for v in values)
        ci_low, ci_high, ci_coverage = median_interval(vals)
        return cls(
            median=statistics.median(vals),
            low=min(vals),
            high=max(vals),
            rounds=len(vals),
            values=vals,
            ci_low=ci_low,
            ci_high=ci_high,
            ci_coverage=ci_coverage,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, ``values`` as a list."""
        out = asdict(self)
        out["values"] = list(self.values)
        return out
