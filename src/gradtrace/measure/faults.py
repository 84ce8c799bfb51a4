"""Never break training: an error inside ``GradientFlow`` switches one feature off, not the run.

Each of the callback's features runs inside :meth:`Faults.guard`. The first exception of a
feature becomes one :class:`~gradtrace.measure.diagnosis.GradientFlowWarning` naming the
feature, the layer where known and the exception; the feature stays off for the rest of the
fit and training goes on. :class:`~gradtrace.measure.diagnosis.NonFiniteGradientError`
(``on_nonfinite="raise"``) is the one error that passes: it is meant to stop the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from gradtrace.measure.activations import ActivationFault
from gradtrace.measure.diagnosis import GradientFlowWarning, NonFiniteGradientError

__all__ = ["FEATURES", "Faults"]

T = TypeVar("T")

FEATURES: dict[str, str] = {
    "gradients": "gradient statistics",
    "activations": "activation statistics",
    "order": "layer order",
    "diagnosis": "vanishing/exploding diagnosis",
    "optimizer_stats": "optimizer statistics",
    "files": "the CSV file",
    "loggers": "logger metrics",
    "plots": "plots",
    "histograms": "histograms",
    "flight_recorder": "the flight recorder",
    "noise_scale": "the gradient noise scale",
}
"""The features that switch off one by one, with how a warning names them."""


class Faults:
    """Which features failed during this fit (each warned about once)."""

    def __init__(self) -> None:
        self.failed: dict[str, BaseException] = {}

    def active(self, feature: str) -> bool:
        """Whether ``feature`` still runs."""
        return feature not in self.failed

    def disable(self, feature: str, reason: BaseException) -> None:
        """Switch ``feature`` off without a warning (the caller says why)."""
        self.failed.setdefault(feature, reason)

    def fail(self, feature: str, error: BaseException, layer: str | None = None) -> None:
        """Switch ``feature`` off with one warning (none if it is off already)."""
        if feature in self.failed:
            return
        self.failed[feature] = error
        if isinstance(error, ActivationFault):  # a hook's error, carried out of the hook
            layer, error = layer or error.layer, error.error or error
        where = f" at layer {layer!r}" if layer else ""
        message = " ".join(str(error).split()) or "(no message)"
        warnings.warn(
            f"GradientFlow switched off {FEATURES[feature]} for the rest of this fit after an "
            f"internal error{where}: {type(error).__name__}: {message}. Training goes on; "
            "please report this with the model that caused it.",
            GradientFlowWarning,
            stacklevel=4,
        )

    @contextmanager
    def guard(self, feature: str, layer: str | None = None) -> Iterator[None]:
        """Run the block as part of ``feature``: an exception switches ``feature`` off."""
        try:
            yield
        except NonFiniteGradientError:
            raise
        except Exception as err:
            self.fail(feature, err, layer)

    def run(self, feature: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` as part of ``feature``, unless it is switched off; ``None`` when it is
        off or fails (and is switched off by that)."""
        if feature not in self.failed:
            with self.guard(feature):
                return fn(*args)
        return None
