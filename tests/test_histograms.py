"""Gradient histograms against numpy's, on the CPU and (deterministic algorithms on) a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradtrace.measure.histograms import gradient_histograms

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _parameter(values: torch.Tensor) -> nn.Parameter:
    param = nn.Parameter(torch.zeros_like(values))
    param.grad = values.clone()
    return param


@pytest.mark.parametrize("device", DEVICES)
def test_counts_ranges_and_sums_match_numpy(device: str) -> None:
    torch.manual_seed(0)
    grad = torch.randn(300, 17, device=device)
    grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    const = torch.full((5,), 0.25, device=device, dtype=torch.bfloat16)
    named = [("w", _parameter(grad)), ("c", _parameter(const)), ("none", nn.Parameter(grad))]
    torch.use_deterministic_algorithms(True)  # histc would raise here on a GPU
    try:
        found = gradient_histograms(named, bins=16)
    finally:
        torch.use_deterministic_algorithms(False)
    assert list(found) == ["w", "c"]  # no gradient: left out
    finite = grad.flatten()[torch.isfinite(grad.flatten())].double().cpu().numpy()
    counts, edges = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    w = found["w"]
    assert w["num"] == finite.size == 300 * 17 - 3
    assert w["counts"] == counts.tolist()
    assert w["edges"] == pytest.approx(edges.tolist(), rel=1e-6)
    assert (w["min"], w["max"]) == pytest.approx((finite.min(), finite.max()), rel=1e-6)
    assert w["sum"] == pytest.approx(finite.sum(), rel=1e-5)
    assert w["sum_squares"] == pytest.approx((finite**2).sum(), rel=1e-5)
    c = found["c"]  # one distinct value: a unit-wide range around it, all in the middle bin
    assert (c["min"], c["max"], c["num"]) == (-0.25, 0.75, 5)
    assert c["counts"] == [0] * 8 + [5] + [0] * 7
