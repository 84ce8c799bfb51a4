"""The study's claims, the coursework report's qualitative result, checked on measured rows
(Table 1's seven, or the demo's three): plain VGG38 stays at chance and its gradient collapses
toward the input; VGG08 and VGG38 with BN, RC or both learn.

Each claim holds, does not hold, or is not established at the run's budget:

- A claim about accuracy is checked on a row that trained :func:`settling_steps` optimizer
  steps or more: the fewest after which the smoke budget (Fashion-MNIST, batch 16) measured
  every learning row above twice chance. Before that, a row at chance may still be about to
  learn, so neither "learns" nor "stays at chance" is settled.
- The gradient claim is checked whenever gradients of two layers or more were recorded:
  plain VGG38's gradient is collapsed from its first step on.

A command whose claims do not all hold exits with status 1 (:func:`does_not_hold_line`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gradtrace.measure import input_output_ratio
from gradtrace.studies.short_run import RunSpec

__all__ = [
    "AT_CHANCE_BELOW",
    "COLLAPSED_BELOW",
    "DOES_NOT_HOLD",
    "HOLDS",
    "LEARNING_ROWS",
    "LEARNS_ABOVE_CHANCE",
    "NOT_ESTABLISHED",
    "SETTLING_STEPS",
    "SLOW_START",
    "Claim",
    "MeasuredRow",
    "check_claims",
    "claims_count",
    "claims_markdown",
    "does_not_hold_line",
    "grad_ratio",
    "settling_steps",
]

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NOT_ESTABLISHED = "not established"

SETTLING_STEPS = 150
# Rows that need more steps. Without BN, VGG38 RC starts slowly: measured on Fashion-MNIST
# (batch 16), 23% validation accuracy after 200 steps, 58% after 300.
SLOW_START = {"vgg38-rc": 2}
LEARNING_ROWS = ("vgg38-bn", "vgg38-rc", "vgg38-bn-rc", "vgg38-bn-rc-lr1e-2", "vgg08")
LEARNS_ABOVE_CHANCE = 2.0  # a row learns: validation accuracy above 2x chance
AT_CHANCE_BELOW = 1.5  # plain VGG38 stays at chance: below 1.5x chance
COLLAPSED_BELOW = 1e-3  # first/last layer mean |grad| of a collapsed gradient


class MeasuredRow(Protocol):
    """What the claims read of a row (Table 1's ``RowRun`` and the demo's ``RunResult``)."""

    @property
    def spec(self) -> RunSpec: ...

    @property
    def metrics(self) -> dict[str, float]: ...

    @property
    def steps(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def history(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Claim:
    """One claim about one row: what is claimed (``name``), what was measured (``evidence``),
    the ``verdict`` (:data:`HOLDS`, :data:`DOES_NOT_HOLD` or :data:`NOT_ESTABLISHED`) and,
    when not established, why (``reason``)."""

    name: str
    evidence: str
    verdict: str
    reason: str = ""

    def markdown(self) -> str:
        """``- holds: NAME: EVIDENCE`` (or ``**DOES NOT HOLD**``, or ``not established at this
        budget (REASON)``)."""
        mark = {HOLDS: "holds", DOES_NOT_HOLD: "**DOES NOT HOLD**"}.get(
            self.verdict, f"not established at this budget ({self.reason})"
        )
        return f"- {mark}: {self.name}: {self.evidence}"


def settling_steps(name: str) -> int:
    """Optimizer steps after which an accuracy claim about row ``name`` is checked."""
    return SETTLING_STEPS * SLOW_START.get(name, 1)


def grad_ratio(history: Sequence[dict[str, Any]], last_n: int = 5) -> float:
    """First over last layer's ``mean_abs`` (data-flow order, as recorded), each averaged
    over its last ``last_n`` records: far below 1 means the gradient vanished at the input;
    NaN with fewer than two layers recorded."""
    if len({r["layer"] for r in history}) < 2:
        return math.nan
    return input_output_ratio(history, last_n)


def _accuracy_claim(row: MeasuredRow, name: str, evidence: str, holds: bool, acc: float) -> Claim:
    needed = settling_steps(row.spec.name)
    if not math.isfinite(acc):
        return Claim(name, evidence, NOT_ESTABLISHED, "no validation accuracy recorded")
    if row.steps < needed:
        return Claim(name, evidence, NOT_ESTABLISHED, f"{row.steps} of the {needed} steps it needs")
    return Claim(name, evidence, HOLDS if holds else DOES_NOT_HOLD)


def check_claims(rows: Sequence[MeasuredRow]) -> list[Claim]:
    """The claims about the rows present in ``rows`` (see the module docstring)."""
    by_name = {r.spec.name: r for r in rows}
    claims = []
    if "vgg38" in by_name:
        row = by_name["vgg38"]
        chance = 1.0 / row.num_classes
        acc = row.metrics.get("val/acc", math.nan)
        claims.append(
            _accuracy_claim(
                row,
                "plain VGG38 stays at chance",
                f"val acc {100 * acc:.1f}% (chance {100 * chance:.0f}%)",
                acc < AT_CHANCE_BELOW * chance,
                acc,
            )
        )
        ratio = grad_ratio(row.history)
        name = "plain VGG38's gradient collapses toward the input"
        evidence = f"first/last layer mean |grad| {ratio:.1e} (< {COLLAPSED_BELOW:g})"
        if math.isnan(ratio):
            claims.append(Claim(name, evidence, NOT_ESTABLISHED, "no gradients of two layers"))
        else:
            verdict = HOLDS if ratio < COLLAPSED_BELOW else DOES_NOT_HOLD
            claims.append(Claim(name, evidence, verdict))
    for row_name in LEARNING_ROWS:
        if row_name in by_name:
            row = by_name[row_name]
            chance = 1.0 / row.num_classes
            acc = row.metrics.get("val/acc", math.nan)
            claims.append(
                _accuracy_claim(
                    row,
                    f"{row.spec.label} (lr {row.spec.lr:g}) learns",
                    f"val acc {100 * acc:.1f}% (> {LEARNS_ABOVE_CHANCE:g}x chance, "
                    f"{100 * LEARNS_ABOVE_CHANCE * chance:.0f}%)",
                    acc > LEARNS_ABOVE_CHANCE * chance,
                    acc,
                )
            )
    return claims


def claims_markdown(claims: Sequence[Claim]) -> list[str]:
    """The claims as a markdown list, one line each with its verdict and evidence."""
    return [claim.markdown() for claim in claims]


def claims_count(claims: Sequence[Claim]) -> str:
    """``N of M hold`` with how many fail and how many are not established, in one phrase."""
    counts = Counter(claim.verdict for claim in claims)
    phrase = f"{counts[HOLDS]} of {len(claims)} hold"
    if failed := counts[DOES_NOT_HOLD]:
        phrase += f", {failed} {'does' if failed == 1 else 'do'} not hold"
    if counts[NOT_ESTABLISHED]:
        phrase += f", {counts[NOT_ESTABLISHED]} not established at this budget"
    return phrase


def does_not_hold_line(claims: Sequence[Claim]) -> str | None:
    """``N claim(s) do not hold: NAME; NAME``, or ``None`` when none fails."""
    failed = [claim.name for claim in claims if claim.verdict == DOES_NOT_HOLD]
    if not failed:
        return None
    return f"{len(failed)} claim(s) do not hold: {'; '.join(failed)}"
