"""GradientFlow: values against independent computations, AMP, accumulation, compile, layer
order and naming, non-finite handling, diagnosis, CSV/logger output and argument checks."""

from __future__ import annotations

import copy
import csv
import math
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, GradientFlowWarning, NonFiniteGradientError
from gradtrace.measure import parameter_names, read_history
from gradtrace.sweeps.launch import free_port
from helpers.distributed import needs_gpus
from helpers.fits import fit, quiet_trainer
from helpers.logs import rank_zero_lines
from helpers.records import assert_record_matches, by_step
from helpers.tiny import (
    CLASSES,
    FLOW,
    FLOW_WITH_BIAS,
    HIDDEN,
    IN,
    Chain,
    Classifier,
    TinyNet,
    make_data,
)

# --------------------------------------------------------------------------- values


def test_values_equal_an_independent_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(TinyNet(), lr=0.1)
    cb = GradientFlow(every_n_steps=1, include=["*.bias"], update_ratio=True)
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
        "update_ratio",
    }
    records = by_step(cb.history)
    assert [s["step"] for s in model.seen] == [0, 1, 2]
    for seen in model.seen:
        for layer, record in records[seen["step"]].items():
            grad = seen["grads"][layer]
            assert_record_matches(record, grad)
            # plain SGD: w_after - w_before = -lr * grad
            expected_ratio = 0.1 * grad.double().norm() / seen["weights"][layer].double().norm()
            assert record["update_ratio"] == pytest.approx(expected_ratio.item(), rel=1e-4)


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


# --------------------------------------------------------------------------- naming, order


class Odd(nn.Module):
    """A shared (tied), a frozen and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(IN, IN)
        self.a = nn.Linear(IN, IN, bias=False)
        self.frozen = nn.Linear(IN, IN, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.b = nn.Linear(IN, IN, bias=False)
        self.b.weight = self.a.weight  # tied: one parameter, two uses
        self.out = nn.Linear(IN, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        return self.out(torch.tanh(self.b(x)))


class Scaled(Classifier):
    """Owns a parameter used in training_step: its module is never called."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.scale = nn.Parameter(torch.ones(CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x) * self.scale, y)


def test_shared_frozen_and_unused_parameters(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = Scaled(Odd())
    cb = GradientFlow(every_n_steps=1, include=["*.bias", "scale"])
    fit(tmp_path, model, cb, max_steps=2)

    # frozen and unused never appear; the tied weight once, under its first name; the
    # parameter of a module that is never called comes last
    assert cb.layer_order == ["net.a.weight", "net.out.weight", "scale"]
    assert len(cb.history) == 2 * 3
    for seen in model.seen:
        for layer, record in by_step(cb.history)[seen["step"]].items():
            assert_record_matches(record, seen["grads"][layer])


def test_wrapper_prefixes_are_stripped() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dp = nn.DataParallel(nn.Sequential(nn.Linear(2, 2)))
            self.module = nn.Linear(2, 2)  # an ordinary child called "module" is kept

    holder = Holder()
    assert list(parameter_names(holder).values()) == [
        "dp.0.weight",
        "dp.0.bias",
        "module.weight",
        "module.bias",
    ]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model(tmp_path: Path, backend: str) -> None:
    torch.manual_seed(6)
    torch._dynamo.reset()
    net = TinyNet()
    reference = copy.deepcopy(net)
    compiled = torch.compile(net, backend=backend)
    model = Classifier(compiled, lr=0.0)
    data = make_data(8)
    compiled(data[:4][0])  # compiled in training mode before the callback's hooks exist
    cb = GradientFlow(every_n_steps=1)
    fit(tmp_path, model, cb, data=data)

    # names without "_orig_mod.", data-flow order although hooks cannot see compiled code
    assert cb.layer_order == FLOW
    assert torch._dynamo.eval_frame._stance.stance == "default"  # stance restored
    for step, layers in by_step(cb.history).items():
        x, y = data[step * 4 : step * 4 + 4]
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for layer, record in layers.items():
            assert_record_matches(record, reference.get_parameter(layer[len("net.") :]).grad)
    # no forward pre-hook left behind
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_compiled_model_without_set_stance_falls_back_to_registration_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch < 2.6 has no set_stance: hooks would be compiled into the graph, so none are set,
    # and AOT autograd gives one backward node for the whole compiled graph
    monkeypatch.delattr(torch.compiler, "set_stance")
    torch._dynamo.reset()
    net = TinyNet()
    cb = GradientFlow(every_n_steps=1)
    with pytest.warns(GradientFlowWarning, match="layers are in registration order"):
        fit(tmp_path, Classifier(torch.compile(net, backend="aot_eager")), cb, max_steps=1)
    assert cb.layer_order == ["net.head.weight", "net.hidden.weight", "net.inp.weight"]
    assert all(not m._forward_pre_hooks for m in net.modules())


# --------------------------------------------------------------------------- non-finite


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


# --------------------------------------------------------------------------- diagnosis


@pytest.mark.parametrize(
    ("factor", "kind", "word"), [(1e-6, "vanish", "drop"), (1e6, "explode", "rise")]
)
def test_diagnosis_names_the_layer_pair_once(
    tmp_path: Path, factor: float, kind: str, word: str
) -> None:
    torch.manual_seed(8)
    cb = GradientFlow(every_n_steps=1, warmup_steps=1)
    with pytest.warns(GradientFlowWarning) as caught:
        fit(tmp_path, Classifier(Chain(factor), lr=0.0), cb, max_steps=3)
    messages = [str(w.message) for w in caught if w.category is GradientFlowWarning]
    assert len(messages) == 1  # once, although steps 1 and 2 both qualify
    assert messages[0].startswith(f"Gradients {kind} at step 1: ")
    assert (
        f"The largest {word} is from 'net.layers.2.weight' to 'net.layers.1.weight'" in messages[0]
    )
    ratio = cb.input_output_ratio()
    assert f"is {ratio:.3g} times" in messages[0]


@pytest.mark.parametrize(("depth", "warns"), [(38, True), (8, False)])
def test_vanishing_warning_for_plain_vgg38_not_vgg08(
    tmp_path: Path, depth: int, warns: bool
) -> None:
    from gradtrace.models import create_model

    torch.manual_seed(9)
    net = create_model(f"vgg{depth:02d}", num_classes=10)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    )
    cb = GradientFlow(every_n_steps=1, warmup_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, Classifier(net, lr=1e-3), cb, data=data, max_steps=1)
    messages = [str(w.message) for w in caught if w.category is GradientFlowWarning]
    ratio = cb.input_output_ratio()
    assert cb.layer_order[0] == "net.stem.0.weight"
    assert cb.layer_order[-1] == "net.head.weight"
    if warns:
        assert ratio < 1e-7
        assert len(messages) == 1
        assert messages[0].startswith(
            "Gradients vanish at step 0: mean |grad| of the input-side layer 'net.stem.0.weight'"
        )
    else:
        assert ratio > 1e-3
        assert messages == []


# --------------------------------------------------------------------------- outputs


def test_csv_and_logger_keys(tmp_path: Path) -> None:
    torch.manual_seed(10)
    cb = GradientFlow(every_n_steps=1, plot=False)
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, Classifier(TinyNet()), cb, logger=logger, max_epochs=2, log_every_n_steps=1)

    assert cb.csv_path == Path(logger.log_dir) / "gradient_flow.csv"
    assert read_history(cb.csv_path) == cb.history
    assert len(cb.history) == 4 * len(FLOW)
    with open(cb.csv_path, newline="") as f:
        assert next(csv.reader(f)) == ["step", "layer", "mean_abs", "l2", "max_abs", "nonfinite"]
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected_keys = {
        f"grad_flow/{s}/{layer}"
        for s in ("mean_abs", "l2", "max_abs", "nonfinite")
        for layer in FLOW
    }
    assert expected_keys <= set(rows[0])
    for record in cb.history:
        row = next(
            r
            for r in rows
            if r["step"] == str(record["step"]) and r[f"grad_flow/l2/{record['layer']}"] != ""
        )
        assert float(row[f"grad_flow/l2/{record['layer']}"]) == pytest.approx(record["l2"])


class FailsAtBatch(Classifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_csv_is_on_disk_after_an_exception_mid_fit(tmp_path: Path) -> None:
    torch.manual_seed(11)
    cb = GradientFlow(every_n_steps=1, update_ratio=True)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, FailsAtBatch(TinyNet()), cb, data=make_data(24))
    on_disk = read_history(cb.csv_path)
    assert sorted({r["step"] for r in on_disk}) == [0, 1, 2]
    assert on_disk == cb.history


def test_resumed_fit_appends_to_the_csv_and_a_new_fit_starts_it_afresh(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(16)
    model = Classifier(TinyNet())
    first = GradientFlow(every_n_steps=1, plot=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, model, first, callbacks=[first, ckpt], enable_checkpointing=True)
    resumed = GradientFlow(every_n_steps=1, plot=False)
    t = quiet_trainer(tmp_path, [resumed], max_epochs=2)
    t.fit(model, DataLoader(make_data(), batch_size=4), ckpt_path=ckpt.last_model_path)

    assert resumed.csv_path == first.csv_path
    # the checkpoint carries the history: the resumed callback continues the first one's
    assert sorted({r["step"] for r in resumed.history}) == [0, 1, 2, 3]
    assert resumed.history[: len(first.history)] == first.history
    assert read_history(first.csv_path) == resumed.history
    fresh = GradientFlow(every_n_steps=1, plot=False)
    fit(tmp_path, Classifier(TinyNet()), fresh, max_steps=1)
    assert read_history(fresh.csv_path) == fresh.history
    assert len(fresh.history) == len(FLOW)


def test_every_n_steps_follows_log_every_n_steps(tmp_path: Path) -> None:
    torch.manual_seed(12)
    cb = GradientFlow(plot=False)
    fit(tmp_path, Classifier(TinyNet()), cb, data=make_data(28), log_every_n_steps=3)
    assert sorted({r["step"] for r in cb.history}) == [0, 2, 5, 6]


def test_stats_subset_and_column_order(tmp_path: Path) -> None:
    torch.manual_seed(13)
    cb = GradientFlow(stats=["nonfinite", "l2"], plot=False, every_n_steps=1)
    model = Classifier(TinyNet())
    fit(tmp_path, model, cb, max_steps=1)
    assert [list(r) for r in cb.history] == [["step", "layer", "l2", "nonfinite"]] * 3
    for record in cb.history:
        grad = model.seen[0]["grads"][record["layer"]]
        assert record["l2"] == pytest.approx(grad.norm().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"stats": ("mean_abs", "median")},
            "stats entry must be one of mean_abs, l2, max_abs, nonfinite; got 'median'",
        ),
        ({"stats": ()}, "stats must name at least one of mean_abs, l2, max_abs, nonfinite"),
        ({"stats": ("l2",)}, "plot=True draws mean_abs, so stats must include 'mean_abs'"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1 or None; got 0"),
        ({"every_n_steps": 2.5}, "every_n_steps must be an integer >= 1 or None; got 2.5"),
        ({"history_size": 0}, "history_size must be an integer >= 1 or None; got 0"),
        ({"include": [None]}, "include entries must be name globs such as"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0; got -1"),
        ({"vanishing_ratio": 0}, r"vanishing_ratio must be a number in \(0, 1\) or None; got 0"),
        ({"vanishing_ratio": 2}, r"vanishing_ratio must be a number in \(0, 1\) or None; got 2"),
        ({"exploding_ratio": 0.5}, "exploding_ratio must be a finite number > 1 or None; got 0.5"),
        ({"exploding_ratio": math.inf}, "exploding_ratio must be a finite number > 1"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of warn, raise; got 'ignore'"),
        ({"filename": "a/b.csv"}, "filename must be a plain file name"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientFlow(**kwargs)


def test_log_every_n_steps_zero_measures_the_first_and_last_step_and_says_so(
    tmp_path: Path,
) -> None:
    cb = GradientFlow(plot=False)
    with pytest.warns(GradientFlowWarning, match=r"log_every_n_steps=0\): only the first and"):
        fit(tmp_path, Classifier(TinyNet()), cb, log_every_n_steps=0)
    assert sorted({r["step"] for r in cb.history}) == [0, 1]  # 8 samples, batches of 4


def test_input_output_ratio_averages_the_last_steps(tmp_path: Path) -> None:
    torch.manual_seed(14)
    cb = GradientFlow(every_n_steps=1, plot=False)
    fit(tmp_path, Classifier(TinyNet()), cb)
    first = [r["mean_abs"] for r in cb.history if r["layer"] == FLOW[0]]
    last = [r["mean_abs"] for r in cb.history if r["layer"] == FLOW[-1]]
    assert cb.input_output_ratio() == pytest.approx(first[-1] / last[-1])
    assert cb.input_output_ratio(last_n=2) == pytest.approx(
        (first[-1] + first[-2]) / (last[-1] + last[-2])
    )
    with pytest.raises(ValueError, match="last_n must be a positive integer; got 0"):
        cb.input_output_ratio(0)


def test_plots_are_skipped_with_one_info_line_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    cb = GradientFlow(every_n_steps=1)
    with rank_zero_lines() as lines:
        fit(tmp_path, Classifier(TinyNet()), cb, max_epochs=2)
    ours = [line for line in lines if "GradientFlow" in line]
    assert len(ours) == 1
    assert "no gradient-flow plots" in ours[0]
    assert "pip install 'gradtrace[plot]'" in ours[0]
    # no logger: the CSV goes to default_root_dir/gradient_flow/, no plot folder beside it
    assert cb.csv_path == tmp_path / "gradient_flow" / "gradient_flow.csv"
    assert not (tmp_path / "gradient_flow" / "gradient_flow").exists()
    assert len(read_history(cb.csv_path)) == 4 * len(FLOW)


def test_plots_are_saved_and_sent_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(15)
    cb = GradientFlow(every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, Classifier(TinyNet()), cb, logger=logger, max_epochs=2)

    folder = Path(logger.log_dir) / "gradient_flow"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch_000.png",
        "epoch_001.png",
        "heatmap.png",
    ]
    for png in folder.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"grad_flow/plot", "grad_flow/heatmap"}
    assert len(events.Images("grad_flow/plot")) == 2
    assert "grad_flow/mean_abs/net.inp.weight" in events.Tags()["scalars"]


# --------------------------------------------------------------------------- DDP

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    import importlib.util
    import json
    import subprocess
    import sys

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    script = SCRIPTS / "ddp_gradient_flow.py"
    done = subprocess.run(
        [sys.executable, str(script), str(ddp_out), "--devices", "2", "--poison-step", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("ddp_gradient_flow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(single_out, devices=1, poison_step=2)

    rank0, rank1 = (json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1))
    # both ranks stopped at the poisoned step with the same message as one process
    message = (
        "non-finite gradient at step 2: first in layer 'net.hidden.weight' (1 of 64 entries "
        "are inf or nan)"
    )
    assert rank0["error"] == rank1["error"] == single["error"] == message
    # rank 0 reports, rank 1 does not; the values are those of one process on the same batch
    assert rank1["history"] == []
    assert rank0["collectives"] == rank1["collectives"] == [0, 0, 0]  # replicated: none
    assert len(rank0["history"]) == len(single["history"]) == 3 * 3
    for got, want in zip(rank0["history"], single["history"]):
        assert (got["step"], got["layer"], got["nonfinite"]) == (
            want["step"],
            want["layer"],
            want["nonfinite"],
        )
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-5), (got["layer"], stat)
    assert read_history(ddp_out / "gradient_flow" / "gradient_flow.csv") == rank0["history"]


def _two_processes_and_one(
    tmp_path: Path, strategy: str, accelerator: str, precision: str = "32-true"
) -> tuple[dict, dict, dict]:
    """What ranks 0 and 1 of a 2-process ``strategy`` fit of ddp_gradient_flow.py saw, and
    what one process (same accelerator and precision) saw."""
    import importlib.util
    import json
    import subprocess
    import sys

    two_out, single_out = tmp_path / "two", tmp_path / "single"
    two_out.mkdir()
    single_out.mkdir()
    script = SCRIPTS / "ddp_gradient_flow.py"
    args = [str(two_out), "--devices", "2", "--poison-step", "-1", "--strategy", strategy]
    args += ["--accelerator", accelerator, "--precision", precision]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("ddp_gradient_flow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(single_out, 1, -1, accelerator=accelerator, precision=precision)
    rank0, rank1 = (json.loads((two_out / f"rank{r}.json").read_text()) for r in (0, 1))
    return rank0, rank1, single


@pytest.mark.parametrize(
    "accelerator",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param(
            "gpu",
            marks=[pytest.mark.gpu, needs_gpus(2)],
        ),
    ],
)
@pytest.mark.parametrize(("strategy", "collectives"), [("fsdp", 1), ("fsdp_no_shard", 0)])
@pytest.mark.integration
def test_lightning_fsdp_two_processes_match_one_process_with_one_collective(
    tmp_path: Path, accelerator: str, strategy: str, collectives: int
) -> None:
    """Lightning's FSDP strategy (FSDP1, use_orig_params=True): each rank holds slices of the
    gradients; one all_gather per measured step gives the one-process values. With NO_SHARD
    each rank holds them whole: no collective. On CPU the strategy runs through a subclass
    (Lightning allows "fsdp" only with a GPU)."""
    rank0, rank1, single = _two_processes_and_one(tmp_path, strategy, accelerator)
    assert rank0["collectives"] == rank1["collectives"] == [collectives] * 3  # 3 measured steps
    assert single["collectives"] == [0, 0, 0]
    assert rank1["history"] == []
    assert [(r["step"], r["layer"]) for r in rank0["history"]] == [
        (s, layer)
        for s in range(3)
        for layer in ("net.inp.weight", "net.hidden.weight", "net.head.weight")
    ]
    for got, want in zip(rank0["history"], single["history"], strict=True):
        assert got["nonfinite"] == want["nonfinite"] == 0
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-5), (got["layer"], stat)


@pytest.mark.slow
@pytest.mark.integration
def test_model_parallel_strategy_sub_mesh_matches_one_process(tmp_path: Path) -> None:
    """Lightning's ModelParallelStrategy, fully_shard on the data-parallel sub-mesh (1 rank)
    next to 2 tensor-parallel ranks: each rank's shard group is its own sub-mesh, so the
    values are one process's (the whole world's sum gave l2 x sqrt 2)."""
    import json
    import subprocess
    import sys

    script = SCRIPTS / "model_parallel_gradient_flow.py"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    for mode in ("single", "model_parallel"):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), mode],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = (
        json.loads((tmp_path / f"{m}.json").read_text()) for m in ("single", "model_parallel")
    )
    assert len(single) == 3 * 3  # 3 steps x 3 weights
    for got, want in zip(parallel, single, strict=True):
        assert (got["step"], got["layer"]) == (want["step"], want["layer"])
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-6), (got["layer"], stat)


@pytest.mark.gpu
@needs_gpus(2)
@pytest.mark.parametrize(
    ("strategy", "precision"), [("fsdp_cpu_offload", "32-true"), ("fsdp", "16-mixed")]
)
@pytest.mark.integration
def test_lightning_fsdp_on_two_gpus_matches_one_gpu(
    tmp_path: Path, strategy: str, precision: str
) -> None:
    """FSDP1 with CPU offload (gradients on the CPU, combined over NCCL on the GPU) and FSDP
    with 16-mixed (loss-scaled gradients, ShardedGradScaler) on 2 GPUs vs one GPU."""
    rank0, _, single = _two_processes_and_one(tmp_path, strategy, "gpu", precision)
    assert rank0["collectives"] == [1, 1, 1]
    assert len(rank0["history"]) == len(single["history"]) == 3 * 3
    rel = 1e-3 if precision == "16-mixed" else 1e-4
    for got, want in zip(rank0["history"], single["history"], strict=True):
        assert (got["step"], got["layer"]) == (want["step"], want["layer"])
        for stat in ("mean_abs", "l2", "max_abs"):
            assert got[stat] == pytest.approx(want[stat], rel=rel), (got["layer"], stat)


def test_deepspeed_warns_once_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DeepSpeed the callback measures nothing and says so once at train start (the
    strategy itself needs deepspeed and CUDA, so its ZeRO stage is patched in here)."""
    from gradtrace.gradient_flow import callback as callback_module

    monkeypatch.setattr(callback_module, "deepspeed_zero_stage", lambda strategy: 2)
    cb = GradientFlow(every_n_steps=1, plot=False)
    with pytest.warns(GradientFlowWarning, match="DeepSpeed \\(ZeRO stage 2\\)") as caught:
        fit(tmp_path, Classifier(TinyNet()), cb)
    assert len([w for w in caught if issubclass(w.category, GradientFlowWarning)]) == 1
    assert cb.history == []
