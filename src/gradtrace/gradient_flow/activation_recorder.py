"""The callback side of activation statistics: when hooks exist, and what is worth a warning.

:class:`ActivationRecorder` is what ``GradientFlow(activations=True)`` holds: it attaches an
:class:`~gradtrace.measure.activations.ActivationCollector` at the start of a measured
step, reads and detaches it after the batch's optimizer steps, and warns (global rank 0) through
:class:`ActivationDiagnosis` when a layer is dead or saturated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from gradtrace.checks import check_int, check_range
from gradtrace.measure.activation_catalog import activation_sources, is_bias
from gradtrace.measure.activations import (
    ActivationCollector,
    ActivationsUnavailableError,
    loss_scale,
)
from gradtrace.measure.diagnosis import GradientFlowWarning
from gradtrace.measure.selection import Layer

__all__ = ["ActivationDiagnosis", "ActivationRecorder"]


class ActivationDiagnosis:
    """Find dead or saturated layers in a stream of measured steps.

    A layer is dead when ``act_zero_frac > dead_fraction`` and saturated when ``act_sat_frac >
    saturated_fraction``, each at ``patience`` measured steps in a row; each layer is reported
    once per finding.
    """

    def __init__(
        self, dead_fraction: float = 0.9, saturated_fraction: float = 0.9, patience: int = 3
    ) -> None:
        check_range("dead_fraction", dead_fraction, 0.0, 1.0, high_inclusive=False, optional=True)
        check_range(
            "saturated_fraction", saturated_fraction, 0.0, 1.0, high_inclusive=False, optional=True
        )
        check_int("patience", patience, 1)
        self.dead_fraction = dead_fraction
        self.saturated_fraction = saturated_fraction
        self.patience = patience
        self.reset()

    def reset(self) -> None:
        """Forget streaks and what was reported (a new fit)."""
        self._streak: dict[tuple[str, str], int] = {}
        self._reported: set[tuple[str, str]] = set()

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak": [[layer, kind, n] for (layer, kind), n in sorted(self._streak.items())],
            "reported": sorted([layer, kind] for layer, kind in self._reported),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._streak = {(layer, kind): int(n) for layer, kind, n in state["streak"]}
        self._reported = {(layer, kind) for layer, kind in state["reported"]}

    def update(self, step: int, stats: Mapping[str, Mapping[str, float]]) -> list[str]:
        """Take one measured step's ``{layer: {stat: value}}``; return new warning messages."""
        messages = []
        checks: Sequence[tuple[str, str, float | None]] = (
            ("dead", "act_zero_frac", self.dead_fraction),
            ("saturated", "act_sat_frac", self.saturated_fraction),
        )
        for layer, values in stats.items():
            for kind, stat, threshold in checks:
                key = (layer, kind)
                value = values.get(stat, math.nan)
                if threshold is None or not value > threshold:
                    self._streak.pop(key, None)
                    continue
                self._streak[key] = self._streak.get(key, 0) + 1
                if self._streak[key] < self.patience or key in self._reported:
                    continue
                self._reported.add(key)
                messages.append(self._message(kind, layer, step, value, threshold))
        return messages

    def _message(self, kind: str, layer: str, step: int, value: float, threshold: float) -> str:
        steps = f"{self.patience} measured steps in a row" if self.patience > 1 else "a step"
        if kind == "dead":
            return (
                f"Dead units in layer {layer!r} at step {step}: {value:.1%} of its activated "
                f"outputs are exactly zero (over dead_fraction={threshold:g} at {steps}), so "
                "almost no gradient passes back through it. A lower learning rate, LeakyReLU, "
                "another initialisation or batch normalization usually help."
            )
        return (
            f"Saturated activation after layer {layer!r} at step {step}: {value:.1%} of its "
            f"outputs lie within 1% of the bounds (over saturated_fraction={threshold:g} at "
            f"{steps}), where its derivative is nearly zero. Batch normalization, a smaller "
            "initialisation or a non-saturating activation usually help."
        )


class ActivationRecorder:
    """Hooks on measured steps only, values reduced over ranks, warnings on global rank 0.

    The hooks stay from the start of a measured batch until its statistics are read: after the
    optimizer step of that batch (every micro-batch of gradient accumulation, and every
    optimizer of a manually optimized batch, e.g. a GAN's generator and critic, counted).
    """

    def __init__(self, diagnosis: ActivationDiagnosis) -> None:
        self.diagnosis = diagnosis
        self._collector = ActivationCollector()
        self._unavailable = False
        self._reported_blank = False
        self._missing: dict[str, str] = {}

    @property
    def attached(self) -> bool:
        """Whether the hooks of a measured batch are in place."""
        return self._collector.attached

    def start(self, trainer: pl.Trainer, root: nn.Module, layers: Iterable[Layer]) -> None:
        """Attach the hooks for a measured step (once for all its micro-batches)."""
        if self._unavailable or self._collector.attached:
            return
        layers = list(layers)
        sources, self._missing = activation_sources(((y.name, y.module) for y in layers), root)
        try:
            self._collector.attach(root, sources, {y.name: y.param for y in layers})
        except ActivationsUnavailableError as err:
            self._unavailable = True  # said once, then the gradients go on alone
            if trainer.is_global_zero:
                warnings.warn(
                    f"GradientFlow: no activation statistics: {err}",
                    GradientFlowWarning,
                    stacklevel=2,
                )

    def pause(self) -> None:
        """Backward begins: forward passes until :meth:`resume` recompute, they are not new."""
        self._collector.pause()

    def resume(self) -> None:
        self._collector.resume()

    def finish(self, trainer: pl.Trainer) -> dict[str, dict[str, float]]:
        """The measured step's statistics (every rank: one all_reduce); hooks removed.

        Raises:
            ActivationFault: a hook failed on some rank (every rank raises it).
        """
        if not self._collector.attached:
            return {}
        self._collector.detach()
        return self._collector.compute(grad_scale=loss_scale(trainer.precision_plugin))

    def close(self) -> None:
        """Remove any hook left by a measured batch that never stepped."""
        self._collector.detach()

    def report_blank(self, trainer: pl.Trainer, layers: Iterable[str]) -> None:
        """Say once (global rank 0) which recorded layers got no activation statistics, and
        why (biases never do: their module's output is their weight's)."""
        blank = [name for name in layers if not is_bias(name)]
        if not blank or self._reported_blank or not trainer.is_global_zero:
            return
        self._reported_blank = True
        unseen = "its module never ran and no linear/convolution/embedding function applied it"
        reasons = {name: self._missing.get(name, unseen) for name in dict.fromkeys(blank)}
        warnings.warn(_missing_message(reasons), GradientFlowWarning, stacklevel=2)

    def diagnose(self, step: int, stats: Mapping[str, Mapping[str, float]]) -> None:
        """Warn about layers that became dead or saturated (call on global rank 0)."""
        for message in self.diagnosis.update(step, stats):
            warnings.warn(message, GradientFlowWarning, stacklevel=2)


def _missing_message(reasons: Mapping[str, str], shown: int = 4) -> str:
    listed = "; ".join(f"{name!r} ({why})" for name, why in list(reasons.items())[:shown])
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    return (
        f"GradientFlow(activations=True): no activation statistics for {len(reasons)} "
        f"recorded layer(s) whose output no hook can see: {listed}{more}. Their gradient "
        "statistics are recorded as usual (docs/activations.md)."
    )
