"""Interleaved timing and the statistics of its rounds.

Shared machines are noisy: another process can slow one measurement by 2x and leave the next
alone. So nothing is measured alone. Every figure is a ratio of workloads run in the same
process, one after the other inside each round (A B C, then B C A, ...), and the ratio is taken
per round before the median over rounds: slow phases of the machine hit both sides of a ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Summary", "interleave", "overheads", "ratios", "round_orders"]

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


def overheads(with_it: Sequence[float], without: Sequence[float]) -> list[float]:
    """Per-round extra time as a fraction of the time without: ``(with - without) / without``."""
    return [r - 1.0 for r in ratios(with_it, without)]


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure's per-round values."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    rounds: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise per-round values (at least one)."""
        if not values:
            raise ValueError("Summary.of needs at least one value")
        vals = tuple(float(v) for v in values)
        if len(vals) == 1:
            q1 = q3 = vals[0]
        else:
            q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        return cls(
            median=statistics.median(vals),
            low=min(vals),
            high=max(vals),
            q1=q1,
            q3=q3,
            rounds=len(vals),
            values=vals,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: median, low, high, q1, q3, rounds, values (a list)."""
        out = asdict(self)
        out["values"] = list(self.values)
        return out
