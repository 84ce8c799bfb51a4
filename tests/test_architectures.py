"""``make reproduce-architectures``: the compared models read from the shipped sweep, the
sources' claims and their budget rules on made-up studies, the study collected from runs the
CLI wrote (metrics, cost and gradient profiles checked against an independent forward and
backward pass of the saved weights), the report and its figures, the exit statuses, where the
report goes, and the smoke budget end to end on Fashion-MNIST."""

from __future__ import annotations

import copy
import csv
import inspect
import math
import re
import shutil
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from gradtrace.classifier import ImageClassifier
from gradtrace.cli.main import main as cli_main
from gradtrace.data import find_fashion_mnist
from gradtrace.data.datamodule import ImageDataModule
from gradtrace.measure.probe import ProbeResult
from gradtrace.studies import claims as study_claims
from gradtrace.studies.architectures import claims as arch_claims
from gradtrace.studies.architectures import reproduce
from gradtrace.studies.architectures import results as arch_results
from gradtrace.studies.architectures.probes import AuxControl, DepthPoint
from gradtrace.studies.architectures.results import ModelResult, Study
from gradtrace.studies.architectures.specs import ModelSpec, model_specs
from gradtrace.sweeps.commands import local_runs
from gradtrace.sweeps.grid import gradtrace_args

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "sweeps" / "architectures.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
PROG = "make reproduce-architectures"
HOLDS, DOES_NOT_HOLD, NOT_ESTABLISHED = "holds", "does not hold", "not established"
SETTLING = 150  # optimizer steps after which a training claim is settled (the house rule)

# The shipped grid, written out: (key, label, family, the model value of the sweep file).
SHIPPED = [
    ("vgg38", "VGG38", "VGG38 (coursework)",
     {"arch": "coursework_vgg", "depth": 38, "batch_norm": False, "residual": False}),
    ("vgg38-bn", "VGG38 BN", "VGG38 (coursework)",
     {"arch": "coursework_vgg", "depth": 38, "batch_norm": True, "residual": False}),
    ("vgg38-rc", "VGG38 RC", "VGG38 (coursework)",
     {"arch": "coursework_vgg", "depth": 38, "batch_norm": False, "residual": True}),
    ("vgg38-bn-rc", "VGG38 BN + RC", "VGG38 (coursework)",
     {"arch": "coursework_vgg", "depth": 38, "batch_norm": True, "residual": True}),
    ("resnet20", "ResNet-20", "ResNet / plain (CIFAR)", {"arch": "resnet20"}),
    ("resnet56", "ResNet-56", "ResNet / plain (CIFAR)", {"arch": "resnet56"}),
    ("resnet110", "ResNet-110", "ResNet / plain (CIFAR)", {"arch": "resnet110"}),
    ("plain20", "plain-20", "ResNet / plain (CIFAR)", {"arch": "plain20"}),
    ("plain56", "plain-56", "ResNet / plain (CIFAR)", {"arch": "plain56"}),
    ("plain110", "plain-110", "ResNet / plain (CIFAR)", {"arch": "plain110"}),
    ("googlenet-aux", "GoogLeNet + aux", "GoogLeNet",
     {"arch": "googlenet", "batch_norm": True,
      "arch_kwargs": {"stem": "cifar", "aux_logits": True}}),
    ("googlenet-noaux", "GoogLeNet no aux", "GoogLeNet",
     {"arch": "googlenet", "batch_norm": True,
      "arch_kwargs": {"stem": "cifar", "aux_logits": False}}),
    ("googlenet-aux-nobn", "GoogLeNet + aux, no BN", "GoogLeNet",
     {"arch": "googlenet", "batch_norm": False,
      "arch_kwargs": {"stem": "cifar", "aux_logits": True}}),
    ("googlenet-noaux-nobn", "GoogLeNet no aux, no BN", "GoogLeNet",
     {"arch": "googlenet", "batch_norm": False,
      "arch_kwargs": {"stem": "cifar", "aux_logits": False}}),
    ("vit_tiny_cifar", "ViT-Ti", "Transformers", {"arch": "vit_tiny_cifar"}),
    ("swin_tiny_cifar", "Swin-T", "Transformers", {"arch": "swin_tiny_cifar"}),
    ("vgg_cifar10", "VGG (seed)", "VGG (seed paper)",
     {"arch": "vgg_cifar10", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
      "weight_decay": 0.0005}),
]  # fmt: skip
SHARED = {"optimizer": "adam", "lr": 0.001, "scheduler": "cosine"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # As in the suite's workers (conftest.py): on 2 shared cores, two intra-op threads make
    # these small convolutions several times slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shipped_specs() -> dict[str, ModelSpec]:
    specs, _ = model_specs(SWEEP)
    return {spec.key: spec for spec in specs}


def classifier_defaults() -> dict[str, Any]:
    """What a run's ``config.yaml`` lists under ``model`` besides what was set: every
    argument of ``ImageClassifier`` at its default (tuples as YAML lists)."""
    parameters = inspect.signature(ImageClassifier.__init__).parameters.values()
    return {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty
    }


# ------------------------------------------------------------------------------------------
# The compared models


def test_model_specs_of_the_shipped_sweep() -> None:
    specs, datasets = model_specs(SWEEP)
    assert datasets == ["cifar10", "cifar100"]
    assert [(s.key, s.label, s.family) for s in specs] == [row[:3] for row in SHIPPED]
    assert len({s.key for s in specs}) == len(specs) == 17
    for spec, (_, _, _, value) in zip(specs, SHIPPED):
        # the command's shared --model.* settings under each model value, the value winning
        assert spec.model == {**SHARED, **value}, spec.key
        assert spec.arch == value["arch"]
        assert spec.arch_kwargs == value.get("arch_kwargs", {})
    seed = specs[-1].model
    assert (seed["optimizer"], seed["lr"], seed["momentum"], seed["weight_decay"]) == (
        "sgd",
        0.01,
        0.9,
        0.0005,
    )
    assert seed["scheduler"] == "cosine"  # not set by the seed VGG: the shared one


def test_a_spec_matches_a_resolved_config_and_not_another_model() -> None:
    specs = shipped_specs()
    defaults = classifier_defaults()
    # config.yaml: every argument, the CLI's linked class count, the model value set
    resolved = {**defaults, **specs["vgg38-bn"].model, "num_classes": 10, "in_chans": 3}
    assert specs["vgg38-bn"].matches(resolved)
    assert not specs["vgg38"].matches(resolved)  # batch_norm differs
    assert not specs["vgg38-bn-rc"].matches(resolved)  # residual differs
    assert not specs["vgg38-bn"].matches({**resolved, "lr": 0.01})
    assert not specs["vgg38-bn"].matches({**resolved, "optimizer": "sgd"})
    assert not specs["vgg38-bn"].matches({**resolved, "depth": 8})
    # arch_kwargs: compared as a whole
    aux = {**defaults, **specs["googlenet-aux"].model}
    assert specs["googlenet-aux"].matches(aux)
    assert not specs["googlenet-noaux"].matches(aux)
    no_stem = {**aux, "arch_kwargs": {"aux_logits": True}}
    assert not specs["googlenet-aux"].matches(no_stem)
    assert not specs["googlenet-aux"].matches({**aux, "arch_kwargs": None})
    # the seed VGG: its own recipe only
    seed = {**defaults, **specs["vgg_cifar10"].model}
    assert specs["vgg_cifar10"].matches(seed)
    assert not specs["vgg_cifar10"].matches({**seed, "weight_decay": 0.0})
    assert not specs["vgg_cifar10"].matches({**seed, "optimizer": "adam", "lr": 0.001})
    resnet = {**defaults, **specs["resnet20"].model}
    assert specs["resnet20"].matches(resnet)
    assert not specs["plain20"].matches(resnet)


def test_a_spec_does_not_match_a_run_with_an_unlisted_setting_changed() -> None:
    specs = shipped_specs()
    resolved = {**classifier_defaults(), **specs["resnet20"].model}
    assert specs["resnet20"].matches(resolved)
    for key, value in (
        ("init", "kaiming"),
        ("weight_decay", 1e-4),
        ("label_smoothing", 0.1),
        ("arch_kwargs", {"downsample_shortcut": "avgpool"}),
    ):
        assert not specs["resnet20"].matches({**resolved, key: value}), key


# ------------------------------------------------------------------------------------------
# Claims, on studies made up for the purpose


def profile(per_seed: Sequence[Sequence[float]], zero_frac: float = 0.0) -> ProbeResult:
    """A probe's result with these per-seed mean |grad| values (input layer first); seeds
    0, 1, ..."""
    seeds = tuple(range(len(per_seed)))
    layers = [f"layers.{i}.weight" for i in range(len(per_seed[0]))]
    last = len(layers) - 1
    records = [
        {"seed": seed, "step": 0, "layer": layers[i], "depth": i / last, "mean_abs": value,
         "act_rms": 1.0, "act_zero_frac": zero_frac, "act_sat_frac": 0.0}
        for seed, values in zip(seeds, per_seed)
        for i, value in enumerate(values)
    ]  # fmt: skip
    return ProbeResult(records, layers, [], seeds, 0, tuple(2.3 for _ in seeds))


def ratio_profile(ratio: float) -> ProbeResult:
    """Two seeds whose input/output ratios are 0.5 and 1.5 times ``ratio`` (median: ratio)."""
    return profile([[0.5 * ratio * 1e-3, 2e-3, 1e-3], [1.5 * ratio * 1e-3, 3e-3, 1e-3]])


def result(
    key: str,
    dataset: str = "cifar10",
    steps: int = 1000,
    num_classes: int = 10,
    init_ratio: float = 1.0,
    **metrics: float,
) -> ModelResult:
    """Model ``key`` of the shipped sweep trained ``steps`` steps on ``dataset``;
    ``train_loss=...`` sets ``metrics["train/loss"]``."""
    return ModelResult(
        spec=shipped_specs()[key],
        dataset=dataset,
        num_classes=num_classes,
        input_size=(3, 32, 32),
        params=1000,
        macs=2_000_000,
        metrics={name.replace("_", "/", 1): value for name, value in metrics.items()},
        steps=steps,
        epochs=max(1, steps // 100),
        init=ratio_profile(init_ratio),
        end=ratio_profile(init_ratio),
    )


def study(
    budget: str,
    results: Sequence[ModelResult] = (),
    depth: Sequence[DepthPoint] = (),
    aux: dict[str, AuxControl] | None = None,
) -> Study:
    return Study(budget, "made-up data", list(results), list(depth), aux or {}, (0, 1), 8)


def degradation(
    budget: str,
    losses: Sequence[float],
    steps: Sequence[int] = (1000,) * 4,
    depth: int = 56,
    dataset: str = "cifar10",
) -> Study:
    keys = ("plain20", f"plain{depth}", "resnet20", f"resnet{depth}")
    rows = [
        result(key, dataset, steps=n, train_loss=loss) for key, n, loss in zip(keys, steps, losses)
    ]
    return study(budget, rows)


def one(claims: list[study_claims.Claim]) -> study_claims.Claim:
    assert len(claims) == 1, claims
    return claims[0]


def test_degradation_claims_hold_fail_or_wait_for_the_budget() -> None:
    name = "plain-56 trains worse than plain-20, ResNet-56 does not (cifar10)"
    # plain-56 above plain-20, ResNet-56 not above ResNet-20 (equal is not above)
    claim = one(arch_claims.degradation_claims(degradation("full", (0.5, 0.8, 0.4, 0.4))))
    assert (claim.name, claim.verdict, claim.reason) == (name, HOLDS, "")
    assert claim.evidence == (
        "final training loss: plain-20 0.500, plain-56 0.800; ResNet-20 0.400, ResNet-56 0.400"
    )
    # at the smoke budget a claim that is met holds too
    assert (
        one(arch_claims.degradation_claims(degradation("smoke", (0.5, 0.8, 0.4, 0.3)))).verdict
        == HOLDS
    )
    # not met: plain-56 no worse than plain-20 (equal), or ResNet-56 worse than ResNet-20
    for losses in ((0.5, 0.5, 0.4, 0.3), (0.5, 0.8, 0.4, 0.41)):
        claim = one(arch_claims.degradation_claims(degradation("full", losses)))
        assert (claim.verdict, claim.reason) == (DOES_NOT_HOLD, ""), losses
        claim = one(arch_claims.degradation_claims(degradation("smoke", losses)))
        assert claim.verdict == NOT_ESTABLISHED, losses
        assert claim.reason == "1000 steps of a smoke run, far from the source's training"
    # below the settling steps (the fewest of the four rows), met or not, at any budget
    steps = (SETTLING, SETTLING - 1, SETTLING, 5000)
    for budget in ("full", "smoke"):
        for losses in ((0.5, 0.8, 0.4, 0.3), (0.5, 0.4, 0.4, 0.9)):
            claim = one(arch_claims.degradation_claims(degradation(budget, losses, steps)))
            assert (claim.verdict, claim.reason) == (
                NOT_ESTABLISHED,
                "149 of the 150 steps a training claim needs",
            ), budget
    at_settling = degradation("full", (0.5, 0.8, 0.4, 0.3), (SETTLING,) * 4)
    assert one(arch_claims.degradation_claims(at_settling)).verdict == HOLDS
    # no training loss recorded
    claim = one(arch_claims.degradation_claims(degradation("full", (0.5, math.nan, 0.4, 0.3))))
    assert (claim.verdict, claim.reason) == (NOT_ESTABLISHED, "no training loss recorded")
    # one claim per deep depth and dataset whose four rows are there
    both = degradation("full", (0.5, 0.8, 0.4, 0.3)).results
    both += degradation("full", (0.5, 0.4, 0.4, 0.3), depth=110).results[1::2]  # plain/ResNet-110
    both += degradation("full", (0.6, 0.9, 0.5, 0.4), dataset="cifar100").results
    claims = arch_claims.degradation_claims(study("full", both))
    assert [(c.name, c.verdict) for c in claims] == [
        (name, HOLDS),
        ("plain-110 trains worse than plain-20, ResNet-110 does not (cifar10)", DOES_NOT_HOLD),
        ("plain-56 trains worse than plain-20, ResNet-56 does not (cifar100)", HOLDS),
    ]
    assert "plain-110 0.400; ResNet-20 0.400, ResNet-110 0.300" in claims[1].evidence
    assert arch_claims.degradation_claims(study("full", both[:3])) == []  # ResNet-56 missing


def aux_control(
    with_aux: Sequence[Sequence[float]], without: Sequence[Sequence[float]]
) -> AuxControl:
    return AuxControl(profile(with_aux), profile(without))


def test_aux_claim_compares_the_early_layers_with_and_without_the_heads() -> None:
    # 7 main-path layers: the early third is the first 2. The later layers would reverse the
    # verdict if they counted.
    without = [[1.0, 3.0, 100.0, 100.0, 100.0, 100.0, 1.0]] * 3
    gains = (1.5, 2.0, 0.8)  # per seed: sum of the first two layers' with / without
    with_aux = [[4.0 * g - 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] for g in gains]
    control = aux_control(with_aux, without)
    assert control.early_gains() == pytest.approx(list(gains))
    for budget in ("full", "smoke"):  # an initialisation claim: settled at any budget
        claim = one(arch_claims.aux_claim(study(budget, aux={"GoogLeNet + aux": control})))
        assert claim.name == (
            "GoogLeNet's auxiliary classifiers strengthen the early layers' gradient "
            "(GoogLeNet + aux)"
        )
        assert (claim.verdict, claim.reason) == (HOLDS, "")
        assert claim.evidence == (
            "mean |grad| of the first 2 of 7 main-path layers with the auxiliary losses over "
            "without them, same weights: x1.500 (median of 3 seeds, range 0.800-2.000)"
        )
    weaker = aux_control(
        [[4.0 * g - 1.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0] for g in (0.9, 1.0, 3.0)], without
    )
    claims = arch_claims.aux_claim(study("smoke", aux={"A": control, "B": weaker}))
    assert [(c.name[-3:], c.verdict) for c in claims] == [("(A)", HOLDS), ("(B)", DOES_NOT_HOLD)]
    claim = claims[1]
    assert claim.verdict == DOES_NOT_HOLD  # median x1.000 is no gain
    assert "x1.000 (median of 3 seeds, range 0.900-3.000)" in claim.evidence
    assert arch_claims.aux_claim(study("full")) == []  # no GoogLeNet with heads


# Ratios at initialisation of the depth series: (depth, without skips, with skips).
VGG_SERIES = [(8, 2.0, 2.0), (14, 10.0, 1.5), (20, 100.0, 1.2)]
RESNET_SERIES = [(20, 3.0, 1.1), (56, 30.0, 0.5), (110, 300.0, 1.3)]


def depth_points(
    vgg: Sequence[tuple[int, float, float]] = VGG_SERIES,
    resnet: Sequence[tuple[int, float, float]] = RESNET_SERIES,
) -> list[DepthPoint]:
    points = []
    for family, series in (("coursework VGG, BN", vgg), ("CIFAR ResNet", resnet)):
        for residual in (False, True):
            for depth, plain, skip in series:
                ratio = skip if residual else plain
                points.append(DepthPoint(family, depth, residual, ratio_profile(ratio)))
    return points


def test_batch_norm_claim_on_the_depth_series() -> None:
    name = (
        "with batch normalization and no skips the gradient grows toward the input, more with "
        "depth; skip connections keep it nearer flat"
    )
    for budget in ("full", "smoke"):  # an initialisation claim: settled at any budget
        claim = one(arch_claims.batch_norm_claim(study(budget, depth=depth_points())))
        assert (claim.name, claim.verdict, claim.reason) == (name, HOLDS, "")
    assert claim.evidence == (
        "input/output ratio at initialisation, coursework VGG, BN (depth: without / with skips) "
        "8: 2.0e+00 / 2.0e+00, 14: 1.0e+01 / 1.5e+00, 20: 1.0e+02 / 1.2e+00; without skips "
        "+0.142 decades per layer; CIFAR ResNet "
        "(depth: without / with skips) 20: 3.0e+00 / 1.1e+00, 56: 3.0e+01 / 5.0e-01, "
        "110: 3.0e+02 / 1.3e+00; without skips +0.022 decades per layer"
    )  # least-squares slopes of log10(ratio) over depth, by hand: 10.194 / 72, 90 / 4104
    failing = {
        "falling with depth": (VGG_SERIES, [(20, 300.0, 1.1), (56, 30.0, 1.2), (110, 20.0, 1.3)]),
        "deepest below 10": ([(8, 0.01, 0.01), (14, 0.1, 1.0), (20, 9.0, 1.0)], RESNET_SERIES),
        "skips not flatter": (VGG_SERIES, [(20, 3.0, 1.1), (56, 30.0, 1.0), (110, 300.0, 1 / 400)]),
    }
    for why, (vgg, resnet) in failing.items():
        claim = one(arch_claims.batch_norm_claim(study("smoke", depth=depth_points(vgg, resnet))))
        assert claim.verdict == DOES_NOT_HOLD, why
    assert arch_claims.batch_norm_claim(study("full")) == []


def test_seed_paper_claim_needs_its_accuracy_on_cifar10() -> None:
    name = "the seed paper's CIFAR-10 VGG reaches 46.88% train / 48.46% validation accuracy"
    claim = one(
        arch_claims.seed_paper_claim(
            study("full", [result("vgg_cifar10", steps=10_000, train_acc=0.4688, val_acc=0.4846)])
        )
    )
    assert (claim.name, claim.verdict) == (name, HOLDS)
    assert claim.evidence == "train acc 46.88%, val acc 48.46% after 100 epochs"
    for train, val in ((0.4687, 0.60), (0.60, 0.4845)):
        row = result("vgg_cifar10", steps=10_000, train_acc=train, val_acc=val)
        claim = one(arch_claims.seed_paper_claim(study("full", [row])))
        assert claim.verdict == DOES_NOT_HOLD, (train, val)
        assert f"train acc {100 * train:.2f}%, val acc {100 * val:.2f}%" in claim.evidence
    # trained elsewhere (the smoke budget's Fashion-MNIST), or not at all
    row = result("vgg_cifar10", "fashion_mnist", steps=100, train_acc=0.9, val_acc=0.873)
    claim = one(arch_claims.seed_paper_claim(study("smoke", [row])))
    assert (claim.verdict, claim.reason) == (NOT_ESTABLISHED, "needs CIFAR-10 at the full budget")
    assert claim.evidence == "on fashion_mnist: val acc 87.3%"
    claim = one(arch_claims.seed_paper_claim(study("full", [result("resnet20")])))
    assert (claim.verdict, claim.evidence) == (NOT_ESTABLISHED, "not trained")


def test_vgg38_claims_gradient_collapse_at_any_budget_chance_after_settling() -> None:
    collapse = "plain VGG38's gradient at initialisation collapses toward the input (cifar100)"
    chance = "plain VGG38 stays at chance (cifar100)"

    def claims(budget: str, steps: int, ratio: float, acc: float) -> dict[str, Any]:
        row = result("vgg38", "cifar100", steps, 100, ratio, val_acc=acc)
        return {c.name: c for c in arch_claims.vgg38_claims(study(budget, [row]))}

    got = claims("full", SETTLING, 1e-5, 0.01)
    assert list(got) == [collapse, chance]
    assert (got[collapse].verdict, got[collapse].evidence) == (
        HOLDS,
        "input/output ratio 1.0e-05 (< 0.001)",
    )
    assert (got[chance].verdict, got[chance].evidence) == (
        HOLDS,
        "val acc 1.0% after 150 steps (chance 1%)",
    )
    # the gradient claim is settled at any budget and step
    for budget in ("full", "smoke"):
        assert claims(budget, 2, 1e-5, 0.01)[collapse].verdict == HOLDS
        not_collapsed = claims(budget, 2, 2e-3, 0.01)[collapse]
        assert (not_collapsed.verdict, not_collapsed.evidence) == (
            DOES_NOT_HOLD,
            "input/output ratio 2.0e-03 (< 0.001)",
        )
    # at chance (below 1.5x), but too few steps to say it stays there
    short = claims("full", SETTLING - 1, 1e-5, 0.0149)[chance]
    assert (short.verdict, short.reason) == (
        NOT_ESTABLISHED,
        "149 of the 150 steps a training claim needs",
    )
    assert claims("smoke", SETTLING, 1e-5, 0.0149)[chance].verdict == HOLDS
    # it left chance at the full budget after settling; no accuracy recorded
    left = claims("full", 5000, 1e-5, 0.015)[chance]
    assert (left.verdict, left.evidence) == (
        DOES_NOT_HOLD,
        "val acc 1.5% after 5000 steps (chance 1%)",
    )
    missing = claims("full", 5000, 1e-5, math.nan)[chance]
    assert (missing.verdict, missing.reason) == (NOT_ESTABLISHED, "no validation accuracy")
    # one pair per dataset that has the row
    rows = [result("vgg38", "cifar10", val_acc=0.1), result("vgg38-bn", "cifar100", val_acc=0.5)]
    assert [c.name for c in arch_claims.vgg38_claims(study("full", rows))] == [
        "plain VGG38's gradient at initialisation collapses toward the input (cifar10)",
        "plain VGG38 stays at chance (cifar10)",
    ]


def test_plain_vgg38_leaving_chance_early_or_at_the_smoke_budget_is_not_established() -> None:
    def chance_claim(budget: str, steps: int) -> study_claims.Claim:
        row = result("vgg38", "fashion_mnist", steps, 10, 1e-5, val_acc=0.3)
        return arch_claims.vgg38_claims(study(budget, [row]))[1]

    for budget in ("full", "smoke"):
        claim = chance_claim(budget, SETTLING - 1)
        assert claim.verdict == NOT_ESTABLISHED, budget
        assert "149 of the 150 steps" in claim.reason
    claim = chance_claim("smoke", 1000)
    assert claim.verdict == NOT_ESTABLISHED
    assert "smoke" in claim.reason
    assert chance_claim("full", 1000).verdict == DOES_NOT_HOLD


# ------------------------------------------------------------------------------------------
# The study collected from runs the CLI wrote (the full budget's source, and --from)

TINY_MODELS = [
    {"arch": "coursework_vgg", "depth": 8, "batch_norm": False, "residual": False},
    {"arch": "resnet20"},
    {"arch": "plain20"},
]
# Each run: 32 training images in batches of 16 for 2 epochs (4 steps), a validation after
# each epoch, GradientFlow without its plots, last.ckpt but no best checkpoint.
TINY_RUN = [
    "--data.synthetic_sizes=[48, 16]",
    "--data.val_size=16",
    "--data.batch_size=16",
    "--trainer.max_epochs=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.callbacks=[{class_path: gradtrace.GradientFlow, init_args: {plot: false}}, "
    "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_top_k: 0}}]",
]


def tiny_sweep(path: Path, models: list[dict[str, Any]], datasets: list[str]) -> Path:
    """The shipped sweep file with other models and datasets (same command)."""
    config = yaml.safe_load(SWEEP.read_text())
    config["parameters"] = {"model": {"values": models}, "data.dataset": {"values": datasets}}
    path.write_text(yaml.safe_dump(config))
    return path


def stub_depth_series(calls: list[tuple[Any, ...]]) -> Any:
    """A depth series of hand-made points instead of probing 110-layer networks; records the
    arguments of each call in ``calls``."""

    def depth_series(batch: Any, num_classes: int, in_chans: int, seeds: Any) -> list[DepthPoint]:
        calls.append((tuple(batch[0].shape), num_classes, in_chans, tuple(seeds)))
        return depth_points()

    return depth_series


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    """(sweep file, root, {model key: run directory}): each model of a tiny sweep trained by
    ``gradtrace fit`` with the sweep's own command (as ``sweep local`` builds it) on synthetic
    data."""
    folder = tmp_path_factory.mktemp("architectures")
    sweep = tiny_sweep(folder / "tiny.yaml", TINY_MODELS, ["synthetic"])
    root = folder / "runs"
    _, commands = local_runs(sweep, root=root, overrides=TINY_RUN, use_wandb=False)
    for _, command in commands:
        cli_main(gradtrace_args(command))
    keys = ["vgg08", "resnet20", "plain20"]
    return sweep, root, {key: run_dir for key, (run_dir, _) in zip(keys, commands)}


def last_values(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = ("train/loss", "train/acc", "val/loss", "val/acc")
    return {key: float([row[key] for row in rows if row.get(key)][-1]) for key in keys}


def first_batch(
    config: dict[str, Any], size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch of the run's data, without augmentation, normalised."""
    data = ImageDataModule(
        **{**config["data"], "batch_size": size, "augment": "none", "device_resident": False}
    )
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    return data.transform_batch((images.to(device), labels.to(device)))


def input_output_ratio(
    net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """(first convolution's over last linear layer's mean |grad|, loss) after one forward
    and backward pass in training mode, by hand."""
    net.train()
    net.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(batch[0]), batch[1])
    loss.backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    ratio = first.weight.grad.abs().mean() / last.weight.grad.abs().mean()
    return float(ratio), float(loss.detach())


def model_table(report: str, dataset: str) -> list[list[str]]:
    lines = report.splitlines()
    start = lines.index(f"## Models on {dataset}") + 2
    assert lines[start].startswith("| Model | Params | MACs / image | Steps (epochs) |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def add_decoys(root: Path, run_of: dict[str, Path]) -> None:
    """Runs under ``root`` that ``collect`` must pass over: ResNet-20 at another learning rate
    with more steps, VGG08 stopped after 2 of its 4 steps, and a run that never started."""
    other_lr = root / "deeper" / "resnet20-lr0.01"
    shutil.copytree(run_of["resnet20"], other_lr)
    config = yaml.safe_load((other_lr / "config.yaml").read_text())
    config["model"]["lr"] = 0.01
    (other_lr / "config.yaml").write_text(yaml.safe_dump(config))
    with open(other_lr / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    with open(other_lr / "metrics.csv", "a") as f:
        f.write(
            ",".join("9" if k in ("step", "epoch", "train/loss") else "" for k in header) + "\n"
        )
    shorter = root / "vgg08-stopped"
    shutil.copytree(run_of["vgg08"], shorter)
    lines = (shorter / "metrics.csv").read_text().splitlines()
    step = lines[0].split(",").index("step")
    kept = [line for line in lines[1:] if int(line.split(",")[step]) < 2]
    (shorter / "metrics.csv").write_text("\n".join([lines[0], *kept]) + "\n")
    never = root / "plain20-never"
    never.mkdir()
    shutil.copyfile(run_of["plain20"] / "config.yaml", never / "config.yaml")


def test_collect_reads_finished_cli_runs_and_the_report_shows_them(
    cli_runs: tuple[Path, Path, dict[str, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a committed reports/ would be
    sweep, root, run_of = cli_runs
    add_decoys(root, run_of)
    # The probes run where the study runs them (a GPU when there is one); so does the reference
    # pass. CUDA's convolutions may use TF32: a looser tolerance there.
    device = arch_results._device()
    rel = 1e-4 if device.type == "cpu" else 2e-2
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(arch_results, "depth_series", stub_depth_series(calls))
    specs, datasets = model_specs(sweep)
    assert [s.key for s in specs] == list(run_of)
    assert datasets == ["synthetic"]
    got = arch_results.collect_study(root, specs, datasets, probe_batch=8, seeds=(0, 1))

    assert (got.budget, got.seeds, got.probe_batch) == ("full", (0, 1), 8)
    assert got.data == (
        "synthetic: batch 16, 16 validation images, training augmentation none, normalisation split"
    )
    assert calls == [((8, 3, 32, 32), 10, 3, (0, 1))]  # once per study
    assert got.aux == {}  # no GoogLeNet with heads
    assert [r.spec.key for r in got.results] == list(run_of)
    for r in got.results:
        run_dir = run_of[r.spec.key]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert r.spec.matches(config["model"])
        assert (r.source, r.dataset, r.num_classes, r.input_size) == (
            run_dir,
            "synthetic",
            10,
            (3, 32, 32),
        )
        assert r.metrics == pytest.approx(last_values(run_dir), rel=1e-6)
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert (r.steps, r.epochs) == (saved["global_step"], 2) == (4, 2)
        trained = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").net
        assert r.params == sum(p.numel() for p in trained.parameters())
        assert r.macs > r.params  # each weight is used at least once per image, convs many times
        batch = first_batch(config, 8, device)
        # after training: the saved weights' profile on the probes' batch
        ratio, loss = input_output_ratio(copy.deepcopy(trained).to(device), batch)
        assert r.end is not None
        assert r.end.seeds == (0,)
        assert r.end.ratio == pytest.approx(ratio, rel=rel)
        assert r.end.losses[0] == pytest.approx(loss, rel=rel)
        # at initialisation: one network per seed, built after torch.manual_seed(seed)
        init = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = ImageClassifier(**r.spec.model, num_classes=10, in_chans=3, channels_last=False)
            init.append(input_output_ratio(model.net.to(device), batch)[0])
        assert r.init.seeds == (0, 1)
        assert r.init.ratios == pytest.approx(init, rel=rel)
        assert r.init.ratio == pytest.approx(statistics.median(init), rel=rel)
        assert r.end.layers == r.init.layers
        assert r.init.layers[0] in ("stem.0.weight", "conv1.weight")
        assert r.init.layers[-1] in ("head.weight", "fc.weight")

    out = tmp_path / "out"
    report, claims = reproduce.write_study_report(got, out, 12.0)
    assert (out / "report.md").read_text() == report
    assert report.startswith("# The architecture comparison, reproduced (full budget)\n")
    assert "Smoke budget" not in report
    assert "SYNTHETIC" not in report
    rows = model_table(report, "synthetic")
    assert [row[0] for row in rows] == ["VGG08", "ResNet-20", "plain-20"]
    for row, r in zip(rows, got.results):
        last = last_values(r.source)
        assert row[1] == f"{r.params:,}"
        assert row[3] == "4 (2)"
        assert row[4] == f"{last['train/loss']:.3f}"
        assert row[5] == f"{100 * last['val/acc']:.1f}"
        low, high = sorted(r.init.ratios)
        assert row[6] == f"{r.init.ratio:.1e} [{low:.1e}, {high:.1e}]"
        assert row[8] == f"{r.end.ratio:.1e}"
        assert f"- {r.spec.label} on synthetic: {r.source}" in report
    assert "- Training: every model adam lr 0.001, cosine, the same steps" in report
    assert "- Wall time: 12 s." in report
    assert not (tmp_path / "reports").exists()  # only with update_reports
    figures = ["architectures_depth.png", "architectures_flow_synthetic.png"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == figures
    for name in figures:
        assert (out / "figures" / name).read_bytes().startswith(PNG)
        assert f"](figures/{name})" in report
    # plain-20 and ResNet-20 differ in their shortcuts only: the same weights
    assert got.results[1].params == got.results[2].params
    # the depth series' claim (made-up points that hold) and the models' claims are reported
    assert [c.verdict for c in claims if c.name.startswith("with batch normalization")] == [HOLDS]
    assert f"The claims: {study_claims.claims_count(claims)}." in report
    assert "### Batch normalization without skips at initialisation" in report

    # a model or a dataset without a run: named, with how to run it, before any probe
    missing = ModelSpec("plain56", "plain-56", "ResNet / plain (CIFAR)", {"arch": "plain56"})
    with pytest.raises(ValueError) as error:
        arch_results.collect_study(root, [specs[0], missing], ["synthetic", "cifar10"], 8, (0,))
    assert str(error.value).startswith(
        f"no finished run under {root} for plain56 on synthetic, vgg08 on cifar10, plain56 on "
        "cifar10; run them with `make reproduce-architectures`"
    )
    assert len(calls) == 1  # the depth series did not start
    with pytest.raises(ValueError, match="no such folder"):
        arch_results.collect_study(tmp_path / "nowhere", specs, datasets, 8, (0,))


# ------------------------------------------------------------------------------------------
# The command: exit statuses, where the report goes, bad input


def made_up_smoke(vgg38_ratio: float = 1e-9) -> Study:
    """A smoke-budget study of plain VGG38 (init ratio ``vgg38_ratio``, at chance after two
    steps) and VGG38 BN (no checkpoint), on made-up data."""
    rows = [
        result("vgg38", "fashion_mnist", 2, 10, vgg38_ratio, train_loss=2.3, val_acc=0.1),
        result("vgg38-bn", "fashion_mnist", 2, 10, 300.0, train_loss=1.1, val_acc=0.6),
    ]
    rows[1].end = None
    return Study("smoke", "made-up data", rows, depth_points(), {}, (0, 1), 8)


@pytest.fixture
def fake_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Study]:
    """The smoke budget replaced by the studies put in the returned list; the working
    directory is ``tmp_path`` with a committed ``reports/`` of its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    (tmp_path / "reports" / "architectures.md").write_text("the committed report\n")
    planned: list[Study] = []
    monkeypatch.setattr(reproduce, "smoke_study", lambda *args, **kwargs: planned.pop())
    return planned


SMOKE = ["--budget", "smoke", "--sweep", str(SWEEP)]
SMOKE_FIGURES = ["architectures_depth.png", "architectures_flow_fashion_mnist.png"]


def test_a_claim_that_does_not_hold_exits_1_after_writing_the_report(
    tmp_path: Path, fake_smoke: list[Study], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_smoke.append(made_up_smoke(vgg38_ratio=2e-3))
    assert reproduce.main(SMOKE) == 1
    report = (tmp_path / "runs" / "architectures-smoke" / "report.md").read_text()
    name = "plain VGG38's gradient at initialisation collapses toward the input (fashion_mnist)"
    assert [line for line in report.splitlines() if "DOES NOT HOLD" in line] == [
        f"- **DOES NOT HOLD**: {name}: input/output ratio 2.0e-03 (< 0.001)"
    ]
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"{PROG}: 1 claim(s) do not hold: {name} (see runs/architectures-smoke/report.md)"
    ]
    assert report in out
    assert (tmp_path / "reports" / "architectures.md").read_text() == "the committed report\n"


def test_the_report_goes_under_runs_and_into_reports_only_when_asked(
    tmp_path: Path, fake_smoke: list[Study], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_smoke.append(made_up_smoke())
    assert reproduce.main(SMOKE) == 0
    assert capsys.readouterr().err == ""
    out = tmp_path / "runs" / "architectures-smoke"
    report = (out / "report.md").read_text()
    assert report.startswith("# The architecture comparison, reproduced (smoke budget)")
    assert "> **Smoke budget**" in report
    assert "- Budget: **smoke**. Data: made-up data." in report
    rows = model_table(report, "fashion_mnist")
    assert [(row[0], row[3], row[8]) for row in rows] == [
        ("VGG38", "2 (1)", "1.0e-09 [5.0e-10, 1.5e-09]"),
        ("VGG38 BN", "2 (1)", "no checkpoint"),
    ]
    # plain VGG38 at chance after 2 steps: not established; its gradient collapsed: holds
    assert (
        "- not established at this budget (2 of the 150 steps a training claim needs): plain "
        "VGG38 stays at chance (fashion_mnist): val acc 10.0% after 2 steps (chance 10%)"
    ) in report
    assert sorted(p.name for p in (out / "figures").iterdir()) == SMOKE_FIGURES
    assert (tmp_path / "reports" / "architectures.md").read_text() == "the committed report\n"
    assert list((tmp_path / "reports" / "figures").iterdir()) == []

    fake_smoke.append(made_up_smoke())
    assert reproduce.main([*SMOKE, "--update-reports", "--out", "elsewhere"]) == 0
    out = tmp_path / "elsewhere"
    committed = tmp_path / "reports"
    assert (committed / "architectures.md").read_text() == (out / "report.md").read_text()
    assert sorted(p.name for p in (committed / "figures").iterdir()) == SMOKE_FIGURES
    for name in SMOKE_FIGURES:
        copied = (committed / "figures" / name).read_bytes()
        assert copied == (out / "figures" / name).read_bytes()
        assert copied.startswith(PNG)
    assert "; copied to reports/architectures.md" in capsys.readouterr().out


def test_the_full_budget_runs_the_grid_then_collects_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    launched: list[tuple[Any, ...]] = []
    collected: list[tuple[Any, ...]] = []
    outcome: list[list[Any]] = []

    def run_local(path: Any, **kwargs: Any) -> list[Any]:
        launched.append((path, kwargs))
        return outcome.pop()

    def collect(*args: Any) -> Study:
        collected.append(args)
        return study("full", [result("resnet20", val_acc=0.9)])

    from gradtrace.sweeps import commands
    from gradtrace.sweeps.outcome import DONE, FAILED

    monkeypatch.setattr(commands, "run_local", run_local)
    monkeypatch.setattr(reproduce, "collect_study", collect)
    monkeypatch.setattr(reproduce, "idle_gpus_note", lambda how: None)

    class Launched:
        def __init__(self, status: str) -> None:
            self.status = status

    outcome.append([Launched(DONE), Launched(FAILED)])
    args = ["--sweep", str(SWEEP), "--gpus", "0,1", "--seeds", "2", "--probe-batch", "4"]
    assert reproduce.main([*args, "--", "--data.root=/d"]) == 1  # a run failed: no report
    assert launched == [
        (
            SWEEP,
            {
                "gpus": ["0", "1"],
                "root": Path("runs/architectures"),
                "overrides": ["--data.root=/d"],
                "use_wandb": False,
            },
        )
    ]
    assert collected == []
    assert not (tmp_path / "runs").exists()

    outcome.append([Launched(DONE)])
    assert reproduce.main([*args, "--root", "r"]) == 0
    [(folder, specs, datasets, probe_batch, seeds)] = collected
    assert (folder, datasets, probe_batch, tuple(seeds)) == (
        Path("r"),
        ["cifar10", "cifar100"],
        4,
        (0, 1),
    )
    assert [s.key for s in specs] == [row[0] for row in SHIPPED]
    assert (tmp_path / "r" / "report.md").is_file()

    # --from: no training, the runs of that folder
    launched.clear()
    collected.clear()
    assert reproduce.main(["--sweep", str(SWEEP), "--from", "done"]) == 0
    assert launched == []
    assert collected[0][0] == Path("done")
    assert (tmp_path / "runs" / "architectures" / "report.md").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "smoke", "--seeds", "0"], "--seeds, --probe-batch, --steps, --batch-size "
         "and --val-size must be >= 1"),
        (["--budget", "smoke", "--probe-batch", "0"], "must be >= 1"),
        (["--sweep", "missing.yaml"], "missing.yaml"),
        (["--budget", "smoke", "--from", "x"], "--from collects full-budget runs; leave out "
         "--budget smoke"),
        (["--budget", "smoke", "--", "--foo"], "arguments after `--` go to full-budget runs only"),
        (["--from", "x", "--", "--foo"], "arguments after `--` go to full-budget runs only"),
        (["--gpus", "0,,1"], "gpus must be a comma-separated list"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_error_line_before_any_work(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # missing.yaml: not there

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("work started")

    for name in ("smoke_study", "collect_study", "_run_full_budget", "write_study_report"):
        monkeypatch.setattr(reproduce, name, no_work)
    if "--sweep" not in argv:
        argv = [*argv, "--sweep", str(SWEEP)]
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1
    assert errors[0] == err[-1]
    assert errors[0].startswith(f"{PROG}: error: ")
    assert message in errors[0]


def test_a_missing_runs_folder_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reproduce.main(["--sweep", str(SWEEP), "--from", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: --from {tmp_path / 'none'}: no such folder"
    ]


# ------------------------------------------------------------------------------------------
# The smoke budget end to end


@pytest.mark.slow
@pytest.mark.skipif(
    find_fashion_mnist("data") is None, reason="needs Debian's dataset-fashion-mnist"
)
def test_the_smoke_budget_trains_and_reports_on_fashion_mnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # where a committed reports/ would be
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(arch_results, "depth_series", stub_depth_series(calls))
    models = [*TINY_MODELS[:2], {"arch": "resnet110"}]  # the 110-layer nets: full budget only
    sweep = tiny_sweep(tmp_path / "tiny.yaml", models, ["fashion_mnist"])
    root = tmp_path / "runs"
    code = reproduce.main(
        ["--budget", "smoke", "--sweep", str(sweep), "--steps", "2", "--seeds", "1",
         "--probe-batch", "8", "--val-size", "16", "--root", str(root)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert calls == [((8, 1, 32, 32), 10, 1, (0,))]
    report = (root / "report.md").read_text()
    assert report.startswith("# The architecture comparison, reproduced (smoke budget)")
    assert "Fashion-MNIST (real data" in report
    assert "SYNTHETIC" not in report
    rows = model_table(report, "fashion_mnist")
    assert [row[0] for row in rows] == ["VGG08", "ResNet-20"]  # no ResNet-110
    assert [row[3] for row in rows] == ["2 (2)", "2 (2)"]  # 16 images, batch 16, two epochs
    for row in rows:
        assert float(row[4]) > 0
        assert 0 <= float(row[5]) <= 100
        assert float(row[6]) > 0
        assert float(row[8]) > 0
    assert "## Claims" in report
    assert "### Residual connections against degradation" in report
    assert "- not measured: no such models ran" in report  # no plain nets, no GoogLeNet
    assert "- holds: with batch normalization and no skips" in report  # the stubbed series
    for key, label in (("vgg08", "VGG08"), ("resnet20", "ResNet-20")):
        assert (root / key / "metrics.csv").is_file()
        assert re.search(
            rf"^- {label} on fashion_mnist, \d+ s: {re.escape(str(root / key))}$", report, re.M
        )
    assert not (root / "resnet110").exists()
    assert sorted(p.name for p in (root / "figures").iterdir()) == SMOKE_FIGURES
    assert not (tmp_path / "reports").exists()  # only with --update-reports
