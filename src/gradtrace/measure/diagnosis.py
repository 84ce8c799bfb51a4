"""Vanishing/exploding diagnosis and non-finite gradients: what to warn about, once.

The vanishing/exploding check compares the input end with the output end of one optimizer's
main path (its selected layers that lead to the model's output, in data-flow order); auxiliary
heads and other optimizers' layers never take part.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from gradtrace.checks import check_choice, check_int

__all__ = ["NONFINITE_ACTIONS", "Diagnosis", "GradientFlowWarning", "NonFiniteGradientError"]

NONFINITE_ACTIONS: tuple[str, ...] = ("warn", "raise")


class GradientFlowWarning(UserWarning):
    """Gradients vanish, explode, or are not finite (issued by ``GradientFlow``)."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or nan and ``GradientFlow(on_nonfinite="raise")`` stops training."""


class Diagnosis:
    """Warn-once checks; :meth:`state_dict` carries the flags across a resumed fit."""

    def __init__(
        self,
        vanishing_ratio: float | None,
        exploding_ratio: float | None,
        warmup_steps: int,
        on_nonfinite: str,
    ) -> None:
        check_int("warmup_steps", warmup_steps, 0)
        if vanishing_ratio is not None and not (
            isinstance(vanishing_ratio, (int, float)) and 0 < vanishing_ratio < 1
        ):
            raise ValueError(
                f"vanishing_ratio must be a number in (0, 1) or None; got {vanishing_ratio!r}"
            )
        if exploding_ratio is not None and not (
            isinstance(exploding_ratio, (int, float)) and 1 < exploding_ratio < math.inf
        ):
            raise ValueError(
                f"exploding_ratio must be a finite number > 1 or None; got {exploding_ratio!r}"
            )
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        self.vanishing_ratio = vanishing_ratio
        self.exploding_ratio = exploding_ratio
        self.warmup_steps = warmup_steps
        self.on_nonfinite = on_nonfinite
        self.reset()

    def reset(self) -> None:
        """Forget what was warned about (a new fit)."""
        self.warned_vanishing = False
        self.warned_exploding = False
        self.warned_nonfinite: set[str] = set()

    def check_path(self, step: int, path: Sequence[tuple[str, float]]) -> None:
        """Warn once if the input end's mean |grad| of ``path`` ((layer, mean |grad|), input
        first) is below ``vanishing_ratio`` or above ``exploding_ratio`` times the output end's."""
        check_vanishing = self.vanishing_ratio is not None and not self.warned_vanishing
        check_exploding = self.exploding_ratio is not None and not self.warned_exploding
        if step < self.warmup_steps or not (check_vanishing or check_exploding):
            return
        if len(path) < 2 or path[-1][1] == 0:
            return
        order = [name for name, _ in path]
        values = [value for _, value in path]
        ratio = values[0] / values[-1]
        # factor: how much mean |grad| changes from one layer to the one before (toward input)
        pairs = [
            (values[i] / values[i + 1], order[i + 1], order[i])
            for i in range(len(order) - 1)
            if values[i + 1] > 0
        ]
        if check_vanishing and ratio < self.vanishing_ratio:
            self.warned_vanishing = True
            factor, upper, lower = min(pairs)
            warnings.warn(
                f"Gradients vanish at step {step}: mean |grad| of the input-side layer "
                f"{order[0]!r} is {ratio:.3g} times that of the output-side layer {order[-1]!r} "
                f"(vanishing_ratio={self.vanishing_ratio:g}). The largest drop is from "
                f"{upper!r} to {lower!r} (x{factor:.3g} toward the input). Batch normalization, "
                "residual connections or another initialisation usually help.",
                GradientFlowWarning,
                stacklevel=3,
            )
        if check_exploding and ratio > self.exploding_ratio:
            self.warned_exploding = True
            factor, upper, lower = max(pairs)
            warnings.warn(
                f"Gradients explode at step {step}: mean |grad| of the input-side layer "
                f"{order[0]!r} is {ratio:.3g} times that of the output-side layer {order[-1]!r} "
                f"(exploding_ratio={self.exploding_ratio:g}). The largest rise is from "
                f"{upper!r} to {lower!r} (x{factor:.3g} toward the input). Gradient clipping, "
                "normalization or a smaller initialisation usually help.",
                GradientFlowWarning,
                stacklevel=3,
            )

    def nonfinite(self, step: int, bad: Sequence[tuple[str, int, int]], *, report: bool) -> None:
        """Handle inf/nan gradients: ``bad`` is (layer, non-finite count, size) in data-flow
        order. Raises with ``on_nonfinite="raise"`` (on every rank), else warns once per layer
        where ``report`` (global rank 0)."""
        if not bad:
            return
        if self.on_nonfinite == "raise":
            name, count, numel = bad[0]
            others = f"; also in {', '.join(repr(b[0]) for b in bad[1:])}" if len(bad) > 1 else ""
            raise NonFiniteGradientError(
                f"non-finite gradient at step {step}: first in layer {name!r} "
                f"({count} of {numel} entries are inf or nan){others}"
            )
        if not report:
            return
        for name, count, numel in bad:
            if name in self.warned_nonfinite:
                continue
            self.warned_nonfinite.add(name)
            warnings.warn(
                f"non-finite gradient at step {step} in layer {name!r}: {count} of {numel} "
                "entries are inf or nan",
                GradientFlowWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "warned_vanishing": self.warned_vanishing,
            "warned_exploding": self.warned_exploding,
            "warned_nonfinite": sorted(self.warned_nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warned_vanishing = bool(state["warned_vanishing"])
        self.warned_exploding = bool(state["warned_exploding"])
        self.warned_nonfinite = set(state["warned_nonfinite"])
