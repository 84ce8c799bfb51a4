"""gradtrace: watch gradients flow through deep image classifiers, and fix them when they vanish.

``from gradtrace import grad_stats`` (or ``probe``, ``coord_check``) needs torch alone
(:mod:`gradtrace.measure`); ``from gradtrace import GradientFlow`` needs torch and Lightning.
Every export is imported on first access, so ``import gradtrace`` alone stays light;
``ImageClassifier`` and ``ImageDataModule`` need the ``train`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "GradientFlow",
    "GradientFlowWarning",
    "ImageClassifier",
    "ImageDataModule",
    "NonFiniteGradientError",
    "__version__",
    "coord_check",
    "grad_stats",
    "input_output_ratio",
    "probe",
    "read_history",
    "select_layers",
]

if TYPE_CHECKING:
    from gradtrace.classifier import ImageClassifier
    from gradtrace.data.datamodule import ImageDataModule
    from gradtrace.gradient_flow import GradientFlow
    from gradtrace.measure import (
        GradientFlowWarning,
        NonFiniteGradientError,
        coord_check,
        grad_stats,
        input_output_ratio,
        probe,
        read_history,
        select_layers,
    )

_LAZY = {
    "GradientFlow": "gradtrace.gradient_flow",
    "GradientFlowWarning": "gradtrace.measure",
    "NonFiniteGradientError": "gradtrace.measure",
    "coord_check": "gradtrace.measure",
    "grad_stats": "gradtrace.measure",
    "input_output_ratio": "gradtrace.measure",
    "probe": "gradtrace.measure",
    "read_history": "gradtrace.measure",
    "select_layers": "gradtrace.measure",
    "ImageClassifier": "gradtrace.classifier",
    "ImageDataModule": "gradtrace.data.datamodule",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
