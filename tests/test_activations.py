"""Activation statistics: values against plain forward hooks and ``torch.autograd.grad``,
the following-activation rule, hook bookkeeping, accumulation, loss scale, torch.compile,
DDP (2 gloo processes vs one) and the dead/saturated diagnosis."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.gradient_flow.activation_recorder import ActivationDiagnosis
from gradtrace.measure import read_history
from gradtrace.measure.activations import (
    ACTIVATION_STATS,
    ActivationCollector,
    ActivationsUnavailableError,
    loss_scale,
)
from helpers.distributed import needs_gpus, run_rank_script


def small_net() -> nn.Sequential:
    """conv -> BN -> ReLU, conv -> tanh, linear -> sigmoid, linear (no activation)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.Sigmoid(),
        nn.Linear(6, 3),
    )


# layer name -> (its index, the index of the activation that follows it, or None)
LAYERS = {"0.weight": (0, 2), "3.weight": (3, 4), "6.weight": (6, 7), "8.weight": (8, None)}
BOUNDS = {4: (-1.0, 1.0), 7: (0.0, 1.0)}


def layers_of(net: nn.Sequential) -> dict[str, nn.Module]:
    return {name: net[i] for name, (i, _) in LAYERS.items()}


def hook_count(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in net.modules()
    )


def expected_stats(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The statistics from plain forward hooks and ``torch.autograd.grad`` on one batch."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        net[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i in range(len(net))
    ]
    loss = F.cross_entropy(net(x), y)
    for handle in handles:
        handle.remove()
    layer_ids = [i for i, _ in LAYERS.values()]
    grads = dict(zip(layer_ids, torch.autograd.grad(loss, [outputs[i] for i in layer_ids])))
    expected = {}
    for name, (i, act) in LAYERS.items():
        z = outputs[i].detach().double()
        a = outputs[act].detach().double() if act is not None else z
        stats = {
            "act_mean": z.mean().item(),
            "act_std": z.std().item(),
            "act_zero_frac": (a == 0).double().mean().item(),
            "act_grad_mean_abs": grads[i].abs().double().mean().item(),
        }
        if act in BOUNDS:
            low, high = BOUNDS[act]
            margin = 0.01 * (high - low)
            stats["act_sat_frac"] = ((a <= low + margin) | (a >= high - margin)).double().mean()
            stats["act_sat_frac"] = stats["act_sat_frac"].item()
        expected[name] = stats
    return expected


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def assert_stats_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for layer, stats in want.items():
        assert set(got[layer]) == set(stats), layer
        for stat, value in stats.items():
            assert got[layer][stat] == pytest.approx(value, rel=1e-5, abs=1e-12), (layer, stat)


def collect(net: nn.Module, x: torch.Tensor, y: torch.Tensor, **compute_kwargs) -> dict:
    collector = ActivationCollector()
    collector.attach(net, layers_of(net))
    F.cross_entropy(net(x), y).backward()
    stats = collector.compute(**compute_kwargs)
    collector.detach()
    return stats


def test_every_statistic_matches_plain_hooks_and_autograd() -> None:
    x, y = batch()
    net = small_net()
    want = expected_stats(net, x, y)
    net.zero_grad()
    before = hook_count(net)
    got = collect(net, x, y)
    assert_stats_equal(got, want)
    assert tuple(got["3.weight"]) == ACTIVATION_STATS  # tanh follows: all five, in order
    assert "act_sat_frac" not in got["0.weight"]  # ReLU: not saturating
    assert hook_count(net) == before == 0  # nothing left behind


def test_the_batch_norm_between_layer_and_relu_is_skipped() -> None:
    # The conv's output has (almost) no zeros; after BN -> ReLU about half are zero.
    x, y = batch()
    got = collect(small_net(), x, y)
    assert 0.3 < got["0.weight"]["act_zero_frac"] < 0.7


def test_accumulated_micro_batches_equal_one_batch() -> None:
    # No BatchNorm: two halves with loss / 2 each are exactly one batch of the mean loss.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    layers = {"0.weight": net[0], "2.weight": net[2]}
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    collector = ActivationCollector()
    collector.attach(net, layers)
    F.cross_entropy(net(x), y).backward()
    whole = collector.compute()
    for part in (slice(0, 5), slice(5, 10)):
        (F.cross_entropy(net(x[part]), y[part]) / 2).backward()
    halves = collector.compute()
    collector.detach()
    assert_stats_equal(halves, whole)


def test_the_loss_scale_is_divided_out() -> None:
    x, y = batch()
    net = small_net()
    want = collect(net, x, y)
    collector = ActivationCollector()
    collector.attach(net, layers_of(net))
    (F.cross_entropy(net(x), y) * 1024.0).backward()
    got = collector.compute(grad_scale=1024.0)
    collector.detach()
    assert_stats_equal(got, want)


def test_layers_not_called_are_left_out_and_nothing_fires_after_detach() -> None:
    net = small_net()
    collector = ActivationCollector()
    collector.attach(net, {**layers_of(net), "unused.weight": nn.Linear(2, 2)})
    assert collector.attached
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    collector.detach()
    assert not collector.attached
    F.cross_entropy(net(x), y).backward()  # after detach: not counted
    got = collector.compute()
    assert "unused.weight" not in got
    assert_stats_equal(got, collect(small_net(), x, y))


def test_compiled_model_runs_the_measured_step_eagerly() -> None:
    x, y = batch()
    want = collect(small_net(), x, y)
    net = small_net()
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # compiled before the hooks exist
    collector = ActivationCollector()
    collector.attach(compiled, layers_of(net))
    F.cross_entropy(compiled(x), y).backward()
    got = collector.compute()
    collector.detach()
    assert_stats_equal(got, want)
    # after detach the compiled graph runs again, with no hook firing into the collector
    F.cross_entropy(compiled(x), y).backward()
    assert collector.compute() == {}
    assert hook_count(compiled) == 0


def test_compiled_model_without_set_stance_is_refused_in_one_line(monkeypatch) -> None:
    net = small_net()
    net.compile(backend="eager")
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ActivationsUnavailableError, match=r"torch >= 2\.6") as err:
        ActivationCollector().attach(net, layers_of(net))
    assert "\n" not in str(err.value)
    assert hook_count(net) == 0


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpus(2)]),
    ],
)
@pytest.mark.integration
def test_two_ddp_processes_match_one_process(tmp_path: Path, device: str) -> None:
    """gloo on the CPU; NCCL on two GPUs (the collector's host-side counts must reach NCCL
    on the GPU)."""
    import json

    run_rank_script("ddp_activations.py", lambda port: [str(tmp_path), device, str(port)], 120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single.json").read_text())
    for got in ranks:  # every rank holds the reduced values
        assert_stats_equal(got, single)


# --------------------------------------------------------------------------- diagnosis


def test_diagnosis_needs_patience_and_reports_each_layer_once() -> None:
    diagnosis = ActivationDiagnosis(dead_fraction=0.9, saturated_fraction=0.8, patience=2)
    dead = {"a.weight": {"act_zero_frac": 0.95}, "b.weight": {"act_sat_frac": 0.85}}
    healthy = {"a.weight": {"act_zero_frac": 0.5}, "b.weight": {"act_sat_frac": 0.1}}
    assert diagnosis.update(0, dead) == []
    assert diagnosis.update(1, healthy) == []  # the streak is broken
    assert diagnosis.update(2, dead) == []
    messages = diagnosis.update(3, dead)
    assert len(messages) == 2
    assert "Dead units in layer 'a.weight' at step 3: 95.0%" in messages[0]
    assert "Saturated activation after layer 'b.weight' at step 3: 85.0%" in messages[1]
    assert diagnosis.update(4, dead) == []


def test_diagnosis_state_survives_a_round_trip() -> None:
    dead = {"a.weight": {"act_zero_frac": 0.95}, "b.weight": {"act_zero_frac": 0.99}}
    diagnosis = ActivationDiagnosis(patience=2)
    assert diagnosis.update(0, dead) == []
    healthy_b = {"a.weight": dead["a.weight"], "b.weight": {"act_zero_frac": 0.5}}
    assert len(diagnosis.update(1, healthy_b)) == 1  # a reported, b's streak broken
    resumed = ActivationDiagnosis(patience=2)
    resumed.load_state_dict(diagnosis.state_dict())
    assert resumed.state_dict() == diagnosis.state_dict()
    assert resumed.update(2, dead) == []  # a: reported already; b: first of its new streak
    assert ["b.weight" in m for m in resumed.update(3, dead)] == [True]
    resumed.reset()
    assert resumed.state_dict() == {"streak": [], "reported": []}


def test_diagnosis_checks_can_be_switched_off() -> None:
    diagnosis = ActivationDiagnosis(dead_fraction=None, saturated_fraction=None, patience=1)
    assert diagnosis.update(0, {"a": {"act_zero_frac": 1.0, "act_sat_frac": 1.0}}) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dead_fraction": 1.5}, r"dead_fraction must be in \[0, 1\)"),
        ({"saturated_fraction": 1.0}, r"saturated_fraction must be in \[0, 1\)"),
        ({"patience": 0}, "patience must be an integer >= 1"),
    ],
)
def test_diagnosis_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActivationDiagnosis(**kwargs)


def test_nan_values_never_count() -> None:
    diagnosis = ActivationDiagnosis(patience=1)
    assert diagnosis.update(0, {"a": {"act_zero_frac": math.nan}}) == []


# --------------------------------------------------------------------------- the callback


class MLP(pl.LightningModule):
    """Cross-entropy MLP; remembers its first batch and the forward hooks seen every batch."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 3)
        )
        self.first_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hooks_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.first_batch is None:
            self.first_batch = (x.clone(), y.clone())
        self.hooks_seen.append(sum(len(m._forward_hooks) for m in self.net.modules()))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(model: MLP, tmp_path: Path, steps: int = 4, **flow_kwargs) -> GradientFlow:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(8 * steps, 6, generator=g), torch.randint(0, 3, (8 * steps,)))
    flow = GradientFlow(plot=False, activations=True, **flow_kwargs)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[flow],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return flow


def act_records(flow: GradientFlow, layer: str) -> list[dict]:
    return [r for r in flow.history if r["layer"] == layer]


def test_the_callback_records_the_independent_values_in_the_same_rows(tmp_path: Path) -> None:
    model = MLP()
    start = copy.deepcopy(model.net)
    flow = fit(model, tmp_path, every_n_steps=2)
    assert {r["step"] for r in flow.history} == {0, 1, 3}  # first, (step + 1) % 2 == 0, last
    net = start
    x, y = model.first_batch
    outputs: dict[int, torch.Tensor] = {}
    for i in range(5):
        net[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, [outputs[0], outputs[2], outputs[4]])
    for (i, act), grad in zip([(0, 1), (2, 3), (4, None)], grads):
        (record,) = [r for r in act_records(flow, f"net.{i}.weight") if r["step"] == 0]
        z, a = outputs[i].detach(), outputs[act if act is not None else i].detach()
        assert record["act_mean"] == pytest.approx(z.mean().item(), rel=1e-5)
        assert record["act_std"] == pytest.approx(z.std().item(), rel=1e-5)
        assert record["act_zero_frac"] == pytest.approx((a == 0).double().mean().item())
        assert record["act_grad_mean_abs"] == pytest.approx(grad.abs().mean().item(), rel=1e-5)
        assert "act_sat_frac" not in record  # ReLU
        assert "mean_abs" in record  # the gradient statistics of the same row
    # hooks exist only inside measured steps: one per module and one per layer, none at step 2
    assert model.hooks_seen[1:] == [9, 0, 9]
    assert hook_count(model) == 0
    written = read_history(flow.csv_path)
    assert [r["layer"] for r in written] == [r["layer"] for r in flow.history]
    for got, want in zip(written, flow.history):
        assert got["act_zero_frac"] == want["act_zero_frac"]
        assert math.isnan(got["act_sat_frac"])  # absent: an empty cell


def test_a_dead_relu_layer_is_reported_and_named(tmp_path: Path) -> None:
    model = MLP()
    with torch.no_grad():
        model.net[2].bias.fill_(-10.0)
    with pytest.warns(GradientFlowWarning, match=r"Dead units in layer 'net\.2\.weight' at step 2"):
        flow = fit(model, tmp_path, every_n_steps=1)
    assert all(r["act_zero_frac"] > 0.9 for r in act_records(flow, "net.2.weight"))
    assert all(r["act_zero_frac"] < 0.9 for r in act_records(flow, "net.0.weight"))


def test_a_saturated_tanh_layer_is_reported(tmp_path: Path) -> None:
    model = MLP(act=nn.Tanh)
    with torch.no_grad():
        model.net[0].weight.mul_(200.0)
    with pytest.warns(
        GradientFlowWarning, match=r"Saturated activation after layer 'net\.0\.weight'"
    ):
        flow = fit(model, tmp_path, every_n_steps=1)
    assert all(r["act_sat_frac"] > 0.9 for r in act_records(flow, "net.0.weight"))


def test_a_healthy_net_reports_neither(tmp_path: Path) -> None:
    for act in (nn.ReLU, nn.Tanh):
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradientFlowWarning)
            flow = fit(MLP(act=act), tmp_path / act.__name__, every_n_steps=1, vanishing_ratio=None)
        for record in flow.history:
            assert record["act_zero_frac"] < 0.9
            assert record.get("act_sat_frac", 0.0) < 0.9


def test_the_thresholds_are_arguments(tmp_path: Path) -> None:
    with pytest.warns(GradientFlowWarning, match=r"Dead units in layer 'net\.0\.weight' at step 0"):
        fit(MLP(), tmp_path, steps=1, dead_fraction=0.1, activation_patience=1)
    with pytest.raises(ValueError, match="dead_fraction must be in"):
        GradientFlow(activations=True, dead_fraction=1.0)
    with pytest.raises(ValueError, match="activation_patience must be an integer >= 1; got 0"):
        GradientFlow(activations=True, activation_patience=0)


def test_loss_scale_reads_an_enabled_grad_scaler() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    assert loss_scale(SimpleNamespace(scaler=scaler)) == 512.0
    assert loss_scale(SimpleNamespace(scaler=None)) == 1.0
    assert loss_scale(SimpleNamespace()) == 1.0


def test_a_compiled_model_gives_the_eager_values(tmp_path: Path) -> None:
    eager = fit(MLP(), tmp_path / "eager", every_n_steps=2)
    model = MLP()
    model.net.compile(backend="eager")
    compiled = fit(model, tmp_path / "compiled", every_n_steps=2)
    assert model.hooks_seen[1:] == [9, 0, 9]
    assert len(compiled.history) == len(eager.history)
    for got, want in zip(compiled.history, eager.history):
        assert got.keys() == want.keys()
        assert (got["step"], got["layer"]) == (want["step"], want["layer"])
        for key in ("mean_abs", *ACTIVATION_STATS):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), key


class ResidualBlock(nn.Module):
    """conv1 -> Identity (no BN) -> ReLU; conv2 -> relu(conv2 + shortcut(x)) with a 1x1 conv
    shortcut called between conv2 and the final ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn1 = nn.Identity()
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.shortcut = nn.Conv2d(2, 2, 1)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        return self.act2(out + self.shortcut(x))


def test_the_activation_is_the_module_that_takes_the_layer_output() -> None:
    torch.manual_seed(0)
    block = ResidualBlock()
    seen: dict[str, torch.Tensor] = {}
    for name in ("conv1", "act1", "conv2", "shortcut"):
        getattr(block, name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone())
        )
    collector = ActivationCollector()
    layers = {"conv1.weight": block.conv1, "conv2.weight": block.conv2}
    collector.attach(block, {**layers, "shortcut.weight": block.shortcut})
    block(torch.randn(4, 2, 5, 5)).sum().backward()
    got = collector.compute()
    collector.detach()
    frac = lambda t: (t == 0).double().mean().item()  # noqa: E731
    assert got["conv1.weight"]["act_zero_frac"] == pytest.approx(frac(seen["act1"]))  # via Identity
    assert got["conv1.weight"]["act_zero_frac"] > 0.2
    # conv2's output goes into a sum, not into a module: its own zeros (none)
    assert got["conv2.weight"]["act_zero_frac"] == frac(seen["conv2"]) == 0.0
    assert got["shortcut.weight"]["act_zero_frac"] == 0.0


@pytest.mark.gpu
def test_16_mixed_divides_the_loss_scale_out(tmp_path: Path) -> None:
    records = {}
    for precision in ("32-true", "16-mixed"):
        g = torch.Generator().manual_seed(2)
        data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,)))
        flow = GradientFlow(plot=False, activations=True, every_n_steps=1)
        trainer = pl.Trainer(
            max_steps=1,
            accelerator="gpu",
            devices=1,
            precision=precision,
            logger=False,
            callbacks=[flow],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path / precision,
        )
        trainer.fit(MLP(), DataLoader(data, batch_size=32))
        records[precision] = flow.history
    for fp32, fp16 in zip(records["32-true"], records["16-mixed"]):
        assert fp16["layer"] == fp32["layer"]
        # the GradScaler multiplies dL/dz by 65536; fp16 rounding stays within 1%
        assert fp16["act_grad_mean_abs"] == pytest.approx(fp32["act_grad_mean_abs"], rel=1e-2)
        assert fp16["act_mean"] == pytest.approx(fp32["act_mean"], rel=1e-2, abs=1e-3)


# --------------------------------------------------------------------------- beyond modules


class Functional(nn.Module):
    """The activation after each layer is a function or a tensor method, not a module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 7)
        self.c = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        h = self.b(h).view(-1, 7).sigmoid()  # a reshape in between
        return self.c(h)


def test_functional_activations_are_the_layers_activations() -> None:
    net = Functional()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(4))
    collector = ActivationCollector()
    collector.attach(net, {"a.weight": net.a, "b.weight": net.b, "c.weight": net.c})
    net(x).sum().backward()
    got = collector.compute()
    collector.detach()
    with torch.no_grad():
        za = net.a(x)
        zb = net.b(F.relu(za))
    assert got["a.weight"]["act_zero_frac"] == pytest.approx((F.relu(za) == 0).double().mean())
    assert got["a.weight"]["act_zero_frac"] > 0.2
    sat = ((zb.sigmoid() <= 0.01) | (zb.sigmoid() >= 0.99)).double().mean().item()
    assert got["b.weight"]["act_sat_frac"] == pytest.approx(sat)
    assert "act_sat_frac" not in got["a.weight"]
    assert "act_sat_frac" not in got["c.weight"]


class Repeated(nn.Module):
    """A layer called many times whose outputs are freed at once: freed tensors' ids come back
    for later tensors (which once lost a call's zero count and divided by zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(self.fc(x * k).relu().mean() for k in range(1, 9))
        return self.out(x) * total


def test_every_call_counts_however_tensors_are_freed_and_reused() -> None:
    torch.manual_seed(5)
    net = Repeated()
    x = torch.randn(4, 5)
    collector = ActivationCollector()
    collector.attach(net, {"fc.weight": net.fc, "out.weight": net.out})
    net(x).sum().backward()
    got = collector.compute()
    collector.detach()
    with torch.no_grad():
        zs = torch.cat([net.fc(x * k) for k in range(1, 9)])
    assert got["fc.weight"]["act_mean"] == pytest.approx(zs.mean().item(), rel=1e-6)
    assert got["fc.weight"]["act_zero_frac"] == pytest.approx((zs.relu() == 0).double().mean())


def test_a_checkpointed_block_is_counted_once() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(6)
    net = small_net()
    x, y = batch()
    want = collect(net, x, y)

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.net, x, use_reentrant=False)

    root = Checkpointed()
    collector = ActivationCollector()
    collector.attach(root, layers_of(net))
    loss = F.cross_entropy(root(x), y)
    collector.pause()  # as GradientFlow does in on_before_backward
    loss.backward()
    collector.resume()
    got = collector.compute()
    collector.detach()
    assert_stats_equal(got, want)


def test_attention_output_belongs_to_its_output_projection() -> None:
    from gradtrace.measure.activation_catalog import activation_sources
    from gradtrace.measure.selection import select_layers

    torch.manual_seed(7)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    root = nn.Sequential(attention)
    layers = select_layers(root)
    assert [y.name for y in layers] == ["0.in_proj_weight", "0.out_proj.weight"]
    sources, missing = activation_sources([(y.name, y.module) for y in layers], root)
    assert sources == {"0.out_proj.weight": attention}
    assert list(missing) == ["0.in_proj_weight"]
    assert "nn.MultiheadAttention" in missing["0.in_proj_weight"]
    x = torch.randn(2, 3, 8)
    collector = ActivationCollector()
    collector.attach(root, sources)
    out, _ = attention(x, x, x)
    out.sum().backward()
    got = collector.compute()
    collector.detach()
    assert got["0.out_proj.weight"]["act_mean"] == pytest.approx(out.mean().item(), rel=1e-5)


def test_recurrent_layers_say_which_weights_have_no_output_of_their_own() -> None:
    from gradtrace.measure.activation_catalog import activation_sources
    from gradtrace.measure.selection import select_layers

    lstm = nn.LSTM(4, 4, num_layers=2, bidirectional=True)
    root = nn.Sequential(lstm)
    layers = [(y.name, y.module) for y in select_layers(root, include=["*.bias_*"])]
    sources, missing = activation_sources(layers, root)
    assert sources == {"0.weight_ih_l1": lstm}  # the last layer's output leaves the module
    assert "0.weight_hh_l0" in missing
    assert "0.weight_ih_l1_reverse" in missing
    assert not any("bias" in name for name in missing)  # biases share their weight's row


class AppliesWeights(nn.Module):
    """``proj``'s weight applied with ``F.linear`` (its module never runs, as in torchvision's
    Swin), and an embedding reused as the output head (its module runs too)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.embed(tokens), self.proj.weight, self.proj.bias).relu()
        return F.linear(h, self.embed.weight)


def test_a_weight_applied_by_a_function_gives_its_layer_output_when_its_module_never_runs() -> None:
    torch.manual_seed(8)
    net = AppliesWeights()
    tokens = torch.randint(0, 10, (4, 5))
    collector = ActivationCollector()
    weights = {"embed.weight": net.embed.weight, "proj.weight": net.proj.weight}
    collector.attach(net, {"embed.weight": net.embed}, weights)
    net(tokens).sum().backward()
    got = collector.compute()
    collector.detach()
    with torch.no_grad():
        e = net.embed(tokens)
        z = F.linear(e, net.proj.weight, net.proj.bias)
    assert got["proj.weight"]["act_mean"] == pytest.approx(z.mean().item(), rel=1e-6)
    assert got["proj.weight"]["act_zero_frac"] == pytest.approx((z.relu() == 0).double().mean())
    # the embedding's module ran: its rows hold the lookups, not the tied head's logits
    assert got["embed.weight"]["act_mean"] == pytest.approx(e.mean().item(), rel=1e-6)


class Validated(MLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x * 5.0), y))


def test_validation_between_accumulated_micro_batches_is_not_counted(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,)))
    records = {}
    for validate in (False, True):
        flow = GradientFlow(plot=False, activations=True, every_n_steps=1)
        trainer = pl.Trainer(
            max_steps=2,
            accelerator="cpu",
            accumulate_grad_batches=2,
            val_check_interval=1 if validate else 1.0,  # after every micro-batch
            limit_val_batches=1 if validate else 0,
            num_sanity_val_steps=0,
            logger=False,
            callbacks=[flow],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path / str(validate),
        )
        loader = DataLoader(data, batch_size=4)
        trainer.fit(Validated(), loader, loader if validate else None)
        records[validate] = flow.history
    assert len(records[True]) == len(records[False]) > 0
    for got, want in zip(records[True], records[False]):
        assert got["act_mean"] == pytest.approx(want["act_mean"], rel=1e-6)
        assert got["act_zero_frac"] == want["act_zero_frac"]
