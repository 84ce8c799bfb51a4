"""GradientFlow's records, grouped by step and checked against a gradient computed apart."""

from __future__ import annotations

import pytest
import torch

from helpers.capture import expected_stats

__all__ = ["assert_record_matches", "by_step"]


def assert_record_matches(record: dict, grad: torch.Tensor, rel: float = 1e-5) -> None:
    """Each statistic of ``record`` equals that of ``grad`` (relative tolerance ``rel``)."""
    for stat, value in expected_stats(grad).items():
        assert record[stat] == pytest.approx(value, rel=rel), (record["layer"], stat)


def by_step(history: list[dict]) -> dict[int, dict[str, dict]]:
    """``history`` as ``{step: {layer: record}}``."""
    out: dict[int, dict[str, dict]] = {}
    for record in history:
        out.setdefault(record["step"], {})[record["layer"]] = record
    return out
