"""A Lightning logger that keeps what it is sent, for tests that read the logged scalars."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger

__all__ = ["MetricsLogger"]


class MetricsLogger(Logger):
    """Every ``log_metrics`` call, in memory: :attr:`steps` maps each step to the metrics sent
    at it (several calls at one step merged, in the order sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(int(step), {}).update(metrics)

    def named(self, fragment: str) -> dict[int, dict[str, float]]:
        """``{step: {key: value}}`` of the metrics whose name holds ``fragment`` (e.g.
        ``"/noise_scale"``), keys without their namespace (``grad_flow/``); steps without
        any left out."""
        found = {}
        for step, metrics in self.steps.items():
            values = {k.split("/", 1)[1]: v for k, v in metrics.items() if fragment in k}
            if values:
                found[step] = values
        return found
