"""GradientFlow never breaks training: an error injected into any of its features (in its
Lightning hooks, or in the module and tensor hooks it registers) becomes one
GradientFlowWarning naming the feature, the layer where known and the error; that feature
stays off for the rest of the fit, the others go on, and training finishes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, GradientFlowWarning, read_history
from gradtrace.measure.activations import ActivationCollector
from gradtrace.measure.diagnosis import Diagnosis
from gradtrace.measure.optimizer_stats import OptimizerStep
from gradtrace.measure.records import CsvRecords
from helpers.distributed import run_rank_script
from helpers.fits import quiet_trainer

STEPS = 4


class MLP(pl.LightningModule):
    """Linear -> ReLU, Linear -> F.relu (a function), Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(F.relu(self.net(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RaisingLogger(CSVLogger):
    """A logger that fails on GradientFlow's metrics only."""

    def log_metrics(self, metrics, step=None):
        if any(key.startswith("grad_flow/") for key in metrics):
            raise OSError("injected: disk full")
        super().log_metrics(metrics, step)


def fit(tmp_path: Path, logger=False, **options) -> tuple[GradientFlow, pl.Trainer, list[str]]:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(4 * STEPS, 6, generator=g), torch.randint(0, 3, (4 * STEPS,)))
    flow = GradientFlow(every_n_steps=1, **options)
    trainer = quiet_trainer(tmp_path, [flow], max_steps=STEPS, logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLP(), DataLoader(data, batch_size=4))
    ours = [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]
    return flow, trainer, ours


def injected(*args, **kwargs):
    raise RuntimeError("injected fault")


# (what to break, the feature it belongs to, GradientFlow options, the layer the warning names)
FAULTS = [
    ("gradtrace.gradient_flow.step.grad_stats_table", "gradients", {}, None),
    ("gradtrace.measure.order.backward_depths", "order", {}, None),
    (ActivationCollector, "activations", {"activations": True}, "net.0.weight"),
    ("ActivationCollector._grad_arrived", "activations", {"activations": True}, "head.weight"),
    ("ActivationCollector.function_called", "activations", {"activations": True}, None),
    ("gradtrace.gradient_flow.figures.draw_figure", "plots", {}, None),
    ("gradtrace.gradient_flow.fit_layers.send_histograms", "histograms", {}, None),
    (Diagnosis, "diagnosis", {}, None),
    (OptimizerStep, "optimizer_stats", {"optimizer_stats": True}, None),
    (CsvRecords, "files", {}, None),
]
METHODS = {
    ActivationCollector: "_layer_called",
    Diagnosis: "check_path",
    OptimizerStep: "finish",
    CsvRecords: "flush",
}
WORDS = {
    "gradients": "gradient statistics",
    "order": "layer order",
    "activations": "activation statistics",
    "plots": "plots",
    "histograms": "histograms",
    "diagnosis": "vanishing/exploding diagnosis",
    "optimizer_stats": "optimizer statistics",
    "files": "the CSV file",
    "loggers": "logger metrics",
}


@pytest.mark.parametrize(
    ("target", "feature", "options", "layer"),
    FAULTS,
    ids=[f[1] + str(i) for i, f in enumerate(FAULTS)],
)
def test_an_injected_fault_switches_one_feature_off_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target, feature: str, options: dict, layer
) -> None:
    if isinstance(target, type):
        monkeypatch.setattr(target, METHODS[target], injected)
    elif target.startswith("ActivationCollector."):
        monkeypatch.setattr(ActivationCollector, target.split(".")[1], injected)
    else:
        monkeypatch.setattr(target, injected)
    if feature == "histograms":
        options = {**options, "histogram_every_n_steps": 1}
    flow, trainer, messages = fit(tmp_path, **options)

    assert trainer.global_step == STEPS  # training finished
    assert list(flow.faults) == [feature]
    assert len(messages) == 1, messages
    message = messages[0]
    assert f"switched off {WORDS[feature]} for the rest of this fit" in message
    assert "injected fault" in message
    assert (f"at layer {layer!r}" in message) == (layer is not None)
    assert "\n" not in message
    # the other features go on
    steps = sorted({r["step"] for r in flow.history})
    if feature == "gradients":
        assert steps == []
    else:
        assert steps == list(range(STEPS))
    if feature == "activations":
        assert not any("act_mean" in r for r in flow.history)
    if feature not in ("files", "gradients"):
        assert len(read_history(flow.csv_path)) == len(flow.history)


def test_a_failing_logger_leaves_the_csv_and_the_history(tmp_path: Path) -> None:
    logger = RaisingLogger(tmp_path)
    flow, trainer, messages = fit(tmp_path, logger=logger)
    assert trainer.global_step == STEPS
    assert list(flow.faults) == ["loggers"]
    assert len(messages) == 1
    assert "switched off logger metrics" in messages[0]
    assert "OSError: injected: disk full" in messages[0]
    assert len(read_history(flow.csv_path)) == len(flow.history) == STEPS * 3


def test_without_faults_nothing_is_said(tmp_path: Path) -> None:
    flow, _, messages = fit(tmp_path, activations=True, optimizer_stats=True)
    assert messages == []
    assert flow.faults == {}
    assert all("act_mean" in r for r in flow.history)


@pytest.mark.slow
@pytest.mark.integration
def test_a_hook_failing_on_one_rank_switches_activations_off_on_every_rank(
    tmp_path: Path,
) -> None:
    run_rank_script("ddp_activation_fault.py", lambda port: [str(tmp_path), str(port)], 180)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the rank that failed names its error and layer; the other learns it from the reduction
    assert rank1["first"]["fault"].startswith("ValueError at layer '0.weight': injected")
    assert rank1["first"]["layer"] == "0.weight"
    assert rank0["first"]["fault"] == "a hook failed on 1 other rank(s)"
    # both went on, and the next step (hooks working again) is measured on both alike
    assert rank0["second"]["stats"] == rank1["second"]["stats"]
    assert set(rank0["second"]["stats"]) == {"0.weight", "2.weight"}


@pytest.mark.parametrize(
    ("target", "feature"),
    [
        ("gradtrace.measure.activations.ActivationCollector._layer_hook", "activations"),
        ("gradtrace.measure.order.ForwardProbe._record", "order"),
    ],
)
def test_hooks_set_up_halfway_are_removed_and_compiled_code_runs_compiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, feature: str
) -> None:
    module_path, cls_name, method = target.rsplit(".", 2)
    cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
    if method == "_record":  # the probe registers its hooks, then fails when they fire
        monkeypatch.setattr(cls, "__init__", _failing_after_some_hooks(cls.__init__))
    else:
        monkeypatch.setattr(cls, method, injected)
    flow, trainer, messages = fit(tmp_path, activations=True)
    assert trainer.global_step == STEPS
    assert list(flow.faults) == [feature]
    assert len(messages) == 1
    model = trainer.lightning_module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch._dynamo.eval_frame._stance.stance == "default"


def _failing_after_some_hooks(init):
    def broken(self, root, names):
        original = root.register_forward_pre_hook

        def fail_on_the_root(*args, **kwargs):
            raise RuntimeError("injected fault")

        root.register_forward_pre_hook = fail_on_the_root  # the outer hooks come last
        try:
            init(self, root, names)
        finally:
            del root.register_forward_pre_hook
            assert root.register_forward_pre_hook == original

    return broken


def test_a_feature_switched_off_is_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("injected fault")

    monkeypatch.setattr("gradtrace.gradient_flow.fit_layers.send_histograms", failing)
    flow, trainer, _ = fit(tmp_path, histogram_every_n_steps=1)
    assert trainer.global_step == STEPS
    assert list(flow.faults) == ["histograms"]
    assert len(calls) == 1  # not once per measured step
