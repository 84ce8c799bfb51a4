"""GradientFlow on models it was not written around: the same invariants on each.

For every model of the corpus (:mod:`helpers.corpus`: the zoo, torchvision and timm models,
Transformers, recurrent layers, a GAN, a UNet, tied embeddings, LoRA, functional activations,
accumulation + clipping + bf16-mixed, ``torch.compile``), with default settings and with
``activations=True``:

* training finishes, with no GradientFlowWarning and no warning from gradtrace's code but the
  one that names layers without activation statistics where the model has such layers;
* every recorded value equals the statistics of the gradient captured independently;
* the first recorded layer of each optimizer is the one whose gradient autograd accumulates
  last, the output end the main-path layer it accumulates first;
* every recorded layer whose module was called has activation statistics (unless that warning
  named it), and ``act_mean`` of a layer whose module ran once equals its output's mean.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from torch import nn
from torch.utils.data import DataLoader

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.models import list_models
from helpers.capture import IndependentCapture
from helpers.corpus import CASES, Case, zoo_case
from helpers.fits import quiet_trainer

GRADTRACE_SOURCE = str(Path(__import__("gradtrace").__file__).parent)
STEPS = 2


def fit(
    case: Case, tmp_path: Path, **flow_options
) -> tuple[GradientFlow, IndependentCapture, list]:
    module = case.build()
    flow = GradientFlow(**flow_options)
    capture = IndependentCapture(window=case.window)
    options = {"max_steps": STEPS, "log_every_n_steps": 1, **case.trainer}
    trainer = quiet_trainer(tmp_path, [flow, capture], **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(case.data(), batch_size=case.batch_size))
    return flow, capture, caught


def ours(caught: list) -> list[str]:
    """Warnings GradientFlow issued, or any from gradtrace's code."""
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, GradientFlowWarning) or w.filename.startswith(GRADTRACE_SOURCE)
    ]


def named_layers(messages: list[str]) -> set[str]:
    named = [m for m in messages if "no activation statistics for" in m]
    return set(re.findall(r"'([^']+)' \(", " ".join(named)))


# The modules whose inner layers' outputs no hook can see (the warning says which).
FUSED = (nn.MultiheadAttention, nn.RNNBase)


def check(case: Case, tmp_path: Path, activations: bool) -> None:
    flow, capture, caught = fit(case, tmp_path, activations=activations, plot=False)
    messages = ours(caught)
    expected = [m for m in messages if "no activation statistics for" in m]
    assert len(expected) == (1 if activations and case.unhooked else 0), messages
    assert not [m for m in messages if m not in expected], messages
    assert not flow.faults

    capture.assert_values_match(flow.history)
    assert {r["step"] for r in flow.history} == set(range(case.steps))

    for layers in _optimizer_layers(flow, capture):
        order = [name for name in flow.layer_order if name in layers]
        main = [name for name in flow.main_path if name in layers]
        assert (order[0], main[-1]) == capture.input_and_output_ends(layers, main), case.name

    if not activations:
        assert not any("act_mean" in r for r in flow.history)
        return
    named = named_layers(messages)
    fused = {
        r["layer"]
        for r in flow.history
        if issubclass(capture.module_types[r["layer"].rsplit(".", 1)[0]], FUSED)
    }
    assert named <= fused
    for record in (r for r in flow.history if r["step"] == 0):
        owner = record["layer"].rsplit(".", 1)[0]
        if owner not in capture.called or (record["layer"] in fused and "act_mean" not in record):
            continue
        assert "act_mean" in record, (case.name, record["layer"])
        total, count, calls = capture.called[owner]
        if calls == 1 and count:
            assert record["act_mean"] == pytest.approx(total / count, rel=1e-4, abs=1e-6)


def _optimizer_layers(flow: GradientFlow, capture: IndependentCapture) -> list[set[str]]:
    """The recorded layers, split by the optimizer whose parameters they are (captured
    gradients are keyed by step; each optimizer step records its own layers)."""
    recorded = {r["layer"] for r in flow.history}
    groups: list[set[str]] = []
    for sequence in capture.firing:
        fired = {name for name in sequence if name in recorded}
        if fired and not any(fired & group for group in groups):
            groups.append(fired)
    return groups


ZOO = [zoo_case(name) for name in list_models()]


def _param(case: Case) -> object:
    return pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", [_param(c) for c in ZOO + CASES])
def test_default_settings(case: Case, tmp_path: Path) -> None:
    check(case, tmp_path, activations=False)


@pytest.mark.parametrize("case", [_param(c) for c in ZOO + CASES])
def test_with_activations(case: Case, tmp_path: Path) -> None:
    check(case, tmp_path, activations=True)
