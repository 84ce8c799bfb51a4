"""GradientFlow's numbers against gradients computed apart: every statistic, bf16 autocast,
gradient accumulation, manual optimization with two optimizers, fp16 with a grad scaler or an
optimizer that unscales itself, non-finite gradients, and a subset of the statistics."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtrace import GradientFlow, GradientFlowWarning, NonFiniteGradientError
from gradtrace.measure import read_history
from helpers.capture import expected_stats
from helpers.fits import fit
from helpers.records import assert_record_matches, by_step
from helpers.tiny import CLASSES, FLOW, FLOW_WITH_BIAS, HIDDEN, IN, Classifier, TinyNet, make_data


def test_values_equal_an_independent_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(TinyNet(), lr=0.1)
    cb = GradientFlow(every_n_steps=1, include=["*.bias"], optimizer_stats=True)
    fit(tmp_path, model, cb, max_steps=3, data=make_data(12))

    assert [r["step"] for r in cb.history] == [s for s in range(3) for _ in FLOW_WITH_BIAS]
    assert cb.layer_order == FLOW_WITH_BIAS  # data flow, not registration order
    assert [r["layer"] for r in cb.history[:6]] == FLOW_WITH_BIAS
    assert set(cb.history[0]) == {
        "step",
        "layer",
        "mean_abs",
        "l2",
        "max_abs",
        "nonfinite",
        "update_norm",
        "weight_norm",
        "update_ratio",
    }  # no Adam moments for SGD
    records = by_step(cb.history)
    assert [s["step"] for s in model.seen] == [0, 1, 2]
    for seen in model.seen:
        for layer, record in records[seen["step"]].items():
            grad = seen["grads"][layer]
            assert_record_matches(record, grad)
            # plain SGD: w_after - w_before = -lr * grad
            update, weight = 0.1 * grad.double().norm(), seen["weights"][layer].double().norm()
            assert record["update_norm"] == pytest.approx(update.item(), rel=1e-4)
            assert record["weight_norm"] == pytest.approx(weight.item(), rel=1e-6)
            assert record["update_ratio"] == pytest.approx((update / weight).item(), rel=1e-4)


def test_grads_match_plain_pytorch_and_interval_and_biases(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TinyNet()
    reference = copy.deepcopy(net)
    cb = GradientFlow(every_n_steps=2)  # biases excluded by default
    data = make_data(20)
    fit(tmp_path, Classifier(net, lr=0.0), cb, data=data)  # 5 steps, lr 0: weights fixed

    # step 0, Lightning's logging steps ((step + 1) % 2 == 0) and the last step
    assert sorted({r["step"] for r in cb.history}) == [0, 1, 3, 4]
    assert len(cb.history) == 4 * len(FLOW)
    assert set(cb.history[0]) == {"step", "layer", "mean_abs", "l2", "max_abs", "nonfinite"}
    for step, layers in by_step(cb.history).items():
        x, y = data[step * 4 : step * 4 + 4]
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        assert list(layers) == FLOW
        for layer, record in layers.items():
            assert_record_matches(record, reference.get_parameter(layer[len("net.") :]).grad)


def test_bf16_autocast_gradients(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = TinyNet()
    reference = copy.deepcopy(net)
    data = make_data(4)
    cb = GradientFlow(every_n_steps=1)
    fit(tmp_path, Classifier(net), cb, precision="bf16-mixed", max_steps=1, data=data)

    x, y = data[:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(reference(x), y)
    loss.backward()
    fp32 = copy.deepcopy(reference)
    fp32.zero_grad()
    F.cross_entropy(fp32(x), y).backward()
    for record in cb.history:
        name = record["layer"][len("net.") :]
        grad = reference.get_parameter(name).grad
        assert grad.dtype == torch.float32  # fp32 master weights, bf16 compute
        assert_record_matches(record, grad)
        # and it really is the autocast gradient, not the fp32 one
        assert record["mean_abs"] != pytest.approx(
            fp32.get_parameter(name).grad.abs().mean().item(), rel=1e-4
        )


def test_gradient_accumulation_records_the_accumulated_gradient(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = TinyNet()
    reference = copy.deepcopy(net)
    data = make_data(16)
    cb = GradientFlow(every_n_steps=1)
    fit(tmp_path, Classifier(net, lr=0.0), cb, data=data, accumulate_grad_batches=2)

    steps = by_step(cb.history)
    assert sorted(steps) == [0, 1]  # 4 batches, one record per two
    for step, layers in steps.items():
        reference.zero_grad()
        for b in (2 * step, 2 * step + 1):
            x, y = data[b * 4 : b * 4 + 4]
            (F.cross_entropy(reference(x), y) / 2).backward()  # Lightning scales by 1/2
        for layer, record in layers.items():
            assert_record_matches(record, reference.get_parameter(layer[len("net.") :]).grad)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: a generator-like and a critic-like layer, one optimizer each."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first = nn.Linear(IN, HIDDEN, bias=False)
        self.second = nn.Linear(HIDDEN, CLASSES, bias=False)
        self.seen: list[tuple[int, str, torch.Tensor]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        opt_first, opt_second = self.optimizers()
        loss = F.cross_entropy(self.second(torch.relu(self.first(x))), y)
        opt_first.zero_grad()
        opt_second.zero_grad()
        self.manual_backward(loss)
        opt_first.step()  # the callback records first.weight
        self.seen.append((batch_idx, "first.weight", self.first.weight.grad.clone()))
        opt_second.step()  # ... then second.weight
        self.seen.append((batch_idx, "second.weight", self.second.weight.grad.clone()))

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.first.parameters(), lr=0.1),
            torch.optim.SGD(self.second.parameters(), lr=0.1),
        )


@pytest.mark.parametrize(("every", "logged"), [(1, [0, 1, 2]), (3, [0, 2])])
def test_manual_optimization_with_two_optimizers(
    tmp_path: Path, every: int, logged: list[int]
) -> None:
    torch.manual_seed(4)
    model = TwoOptimizers()
    cb = GradientFlow(every_n_steps=every)
    t = fit(tmp_path, model, cb, data=make_data(12))  # 3 batches x 2 optimizer steps

    assert t.global_step == 6  # Lightning counts both optimizers' steps ...
    # ... but the logging step counts batches, so both optimizers are measured at the same
    # steps, each call recording its own optimizer's layer
    assert [(r["step"], r["layer"]) for r in cb.history] == [
        (b, layer) for b in logged for layer in ("first.weight", "second.weight")
    ]
    seen = [s for s in model.seen if s[0] in logged]
    for record, (batch_idx, layer, grad) in zip(cb.history, seen, strict=True):
        assert (record["step"], record["layer"]) == (batch_idx, layer)
        assert_record_matches(record, grad)
    assert cb.layer_order == ["first.weight", "second.weight"]


class FusedAdam(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_fp16_with_an_optimizer_that_unscales_itself(tmp_path: Path) -> None:
    """Lightning skips ``unscale_`` for fused Adam, so the hook sees gradients x the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(23)
    model = FusedAdam(TinyNet())
    cb = GradientFlow(every_n_steps=1, plot=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        fit(tmp_path, model, cb, max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert cb.columns[-1] == "scaler_skipped"
    scale = 2.0**16  # finite gradients: the scale stays put for 2000 steps
    for seen in model.seen:
        for layer, record in by_step(cb.history)[seen["step"]].items():
            want = expected_stats(seen["grads"][layer] / scale)
            assert seen["grads"][layer].abs().max() > 100 * record["max_abs"]  # really scaled
            for stat in ("mean_abs", "l2", "max_abs"):
                assert record[stat] == pytest.approx(want[stat], rel=1e-5)
            assert record["scaler_skipped"] == 0


@pytest.mark.gpu
def test_fp16_fused_adam_matches_fp32_on_a_gpu(tmp_path: Path) -> None:
    runs = {}
    for precision in ("32-true", "16-mixed"):
        torch.manual_seed(24)
        cb = GradientFlow(every_n_steps=1, plot=False)
        fit(tmp_path, FusedAdam(TinyNet()), cb, max_steps=1, accelerator="gpu", precision=precision)
        runs[precision] = cb.history
    for fp32, fp16 in zip(runs["32-true"], runs["16-mixed"], strict=True):
        for stat in ("mean_abs", "l2", "max_abs"):
            assert fp16[stat] == pytest.approx(fp32[stat], rel=1e-2), (fp32["layer"], stat)


class Poisoned(Classifier):
    """Puts inf into ``hidden`` (2 entries) and nan into ``head`` (1) at step 1."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step == 1:
            with torch.no_grad():
                self.net.head.weight.grad[1, 1] = math.nan  # registered first, used last
                self.net.hidden.weight.grad[0, :2] = math.inf


def test_nonfinite_raise_names_the_first_layer_in_data_flow_order(tmp_path: Path) -> None:
    torch.manual_seed(7)
    cb = GradientFlow(every_n_steps=1, on_nonfinite="raise")
    with pytest.raises(
        NonFiniteGradientError,
        match=r"^non-finite gradient at step 1: first in layer 'net.hidden.weight' \(2 of 64 "
        r"entries are inf or nan\); also in 'net.head.weight'$",
    ):
        fit(tmp_path, Poisoned(TinyNet()), cb)
    # the records of the failing step are on disk
    on_disk = read_history(cb.csv_path)
    assert [(r["step"], r["layer"], r["nonfinite"]) for r in on_disk] == [
        (0, "net.inp.weight", 0),
        (0, "net.hidden.weight", 0),
        (0, "net.head.weight", 0),
        (1, "net.inp.weight", 0),
        (1, "net.hidden.weight", 2),
        (1, "net.head.weight", 1),
    ]
    assert math.isinf(on_disk[4]["mean_abs"])
    assert math.isnan(on_disk[5]["mean_abs"])


def test_nonfinite_warn_names_each_layer_once(tmp_path: Path) -> None:
    torch.manual_seed(7)
    cb = GradientFlow(every_n_steps=1)
    with pytest.warns(GradientFlowWarning) as caught:
        fit(tmp_path, Poisoned(TinyNet()), cb)
    messages = [str(w.message) for w in caught if w.category is GradientFlowWarning]
    assert messages == [
        "non-finite gradient at step 1 in layer 'net.hidden.weight': 2 of 64 entries are inf "
        "or nan",
        "non-finite gradient at step 1 in layer 'net.head.weight': 1 of 24 entries are inf or nan",
    ]
    assert [r["nonfinite"] for r in cb.history if r["step"] == 1] == [0, 2, 1]


def test_nonfinite_under_a_grad_scaler_is_recorded_not_raised(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(7)
    model = Poisoned(TinyNet())
    cb = GradientFlow(every_n_steps=1, on_nonfinite="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        fit(tmp_path, model, cb, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert [r["nonfinite"] for r in cb.history if r["step"] == 1] == [0, 2, 1]
    # the scaler skipped step 1 (and only it): flagged on every record of that step
    assert [r["scaler_skipped"] for r in cb.history] == [0] * 3 + [1] * 3
    # the gradients were unscaled before the callback saw them (initial scale is 65536)
    step0 = model.seen[0]["grads"]
    for record in by_step(cb.history)[0].values():
        assert_record_matches(record, step0[record["layer"]])
        assert record["max_abs"] < 10


def test_stats_subset_and_column_order(tmp_path: Path) -> None:
    torch.manual_seed(13)
    cb = GradientFlow(stats=["nonfinite", "l2"], plot=False, every_n_steps=1)
    model = Classifier(TinyNet())
    fit(tmp_path, model, cb, max_steps=1)
    assert [list(r) for r in cb.history] == [["step", "layer", "l2", "nonfinite"]] * 3
    for record in cb.history:
        grad = model.seen[0]["grads"][record["layer"]]
        assert record["l2"] == pytest.approx(grad.norm().item(), rel=1e-5)
