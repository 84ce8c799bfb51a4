"""The gradient noise scale (``GradientFlow(noise_scale=True)``, gradtrace.measure.noise_scale)
against closed forms: the estimator's algebra, the running average, each backward pass's own
gradient, linear regression with Gaussian noise (where ``tr(Sigma)`` and ``|G|^2`` are known),
DDP against gradient accumulation, and the fits where nothing can be estimated.

Linear regression: ``x ~ N(0, I_d)``, ``y = x.w* + eps``, ``eps ~ N(0, s^2)``, loss ``0.5 (x.w -
y)^2`` per sample, ``delta = w - w*``. One sample's gradient is ``g = (x.delta - eps) x``, so
``G = E[x x^T] delta = delta`` and ``E|g|^2 = E[(x.delta)^2 |x|^2] + s^2 E|x|^2 = (d + 2)
|delta|^2 + d s^2`` (Isserlis: ``E[x_i^2 x_k^2]`` is 3 for ``i = k``, else 1), hence
``tr(Sigma) = E|g|^2 - |G|^2 = (d + 1) |delta|^2 + d s^2``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.gradient_flow.noise_scale_recorder import noise_scale_unavailable
from gradtrace.measure.noise_scale import (
    LocalGradientNorms,
    NoiseScaleEstimate,
    RunningNoiseScale,
    estimate_from_micro_batches,
    estimate_noise_scale,
)
from helpers.distributed import run_rank_script
from helpers.fits import quiet_trainer
from helpers.metrics import MetricsLogger

KEYS = ("noise_scale", "noise_scale_step", "noise_scale_trace", "noise_scale_grad_sq")


# ---------------------------------------------------------------- the estimator


def test_two_batch_sizes_give_both_terms_exactly() -> None:
    grad_sq, trace = 3.0, 40.0
    small, big = grad_sq + trace / 8, grad_sq + trace / 32  # E|G_B|^2 at B = 8 and 32
    estimate = estimate_noise_scale(small, 8, big, 32)
    assert estimate.grad_sq == pytest.approx(grad_sq, rel=1e-12)
    assert estimate.trace == pytest.approx(trace, rel=1e-12)
    assert estimate.noise_scale == pytest.approx(trace / grad_sq, rel=1e-12)
    with pytest.raises(ValueError, match="0 < small_batch < big_batch"):
        estimate_noise_scale(small, 8, big, 8)


def test_micro_batches_of_unequal_size_use_their_harmonic_mean() -> None:
    grad_sq, trace, sizes = 2.0, 30.0, [4, 8, 8, 16]
    n, inverse = len(sizes), sum(1 / b for b in sizes)
    squared_norms = sum(grad_sq + trace / b for b in sizes)  # E|g_i|^2 of each micro-batch
    mean_sq_norm = grad_sq + trace * inverse / n**2  # E|mean of the g_i|^2
    estimate = estimate_from_micro_batches(squared_norms, n, inverse, mean_sq_norm)
    assert estimate is not None
    assert estimate.grad_sq == pytest.approx(grad_sq, rel=1e-12)
    assert estimate.trace == pytest.approx(trace, rel=1e-12)
    assert estimate_from_micro_batches(squared_norms, 1, inverse, mean_sq_norm) is None


def test_running_average_divides_the_averaged_terms() -> None:
    average = RunningNoiseScale(decay=0.5)
    assert math.isnan(average.value)
    average.update(NoiseScaleEstimate(grad_sq=1.0, trace=10.0))
    average.update(NoiseScaleEstimate(grad_sq=3.0, trace=10.0))
    # Weights 0.25 and 0.5 of 0.75 gathered: the mean of the ratios (10 and 3.3) would be 6.7.
    assert average.grad_sq == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert average.trace == pytest.approx(10.0)
    assert average.value == pytest.approx(10.0 / ((0.25 + 1.5) / 0.75))
    assert not average.update(NoiseScaleEstimate(grad_sq=math.inf, trace=1.0))
    assert average.steps == 2

    resumed = RunningNoiseScale(decay=0.5)
    resumed.load_state_dict(average.state_dict())
    for running in (average, resumed):
        running.update(NoiseScaleEstimate(grad_sq=2.0, trace=5.0))
    assert resumed.state_dict() == average.state_dict()
    with pytest.raises(ValueError, match="decay must be in"):
        RunningNoiseScale(decay=1.0)
    with pytest.raises(ValueError, match="noise_scale_decay must be in"):
        GradientFlow(noise_scale=True, noise_scale_decay=0.0)


# ---------------------------------------------------------------- each backward's own gradient


def test_hooks_see_each_backward_pass_before_it_is_added_to_grad(monkeypatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [torch.randn(3, 5) for _ in range(3)]
    expected = []
    for x in batches[:2]:  # independently: autograd.grad of each loss alone
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        expected.append(sum(g.double().square().sum() for g in grads).item())

    norms = LocalGradientNorms()
    norms.attach(model.parameters())
    for x in batches[:2]:  # accumulated into .grad, as gradient accumulation does
        norms.open()
        model(x).square().mean().backward()
        norms.close()
    model(batches[2]).square().mean().backward()  # outside open/close: not counted
    got = [n.item() for n in norms.take()]
    assert got == pytest.approx(expected, rel=1e-12)

    def failing_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("hook failure")

    monkeypatch.setattr(torch.linalg, "vector_norm", failing_norm)
    model.zero_grad()
    norms.open()
    model(batches[0]).square().mean().backward()  # the backward pass itself goes on
    assert all(p.grad is not None for p in model.parameters())
    assert str(norms.error) == "hook failure"
    norms.detach()
    assert not norms.attached
    assert norms.error is None


# ---------------------------------------------------------------- through Lightning


class LinearRegression(pl.LightningModule):
    def __init__(
        self, weight: torch.Tensor, lr: float = 0.0, manual: bool = False, fused: bool = False
    ) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(len(weight), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight[None])
        self.lr = lr
        self.fused = fused  # an optimizer that unscales its own gradients under a GradScaler
        self.automatic_optimization = not manual

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = 0.5 * (self.linear(x)[:, 0] - y).square().mean()
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, fused=self.fused)


def regression_data(
    samples: int, dim: int, noise: float, seed: int
) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    """``(x, y)`` with a random ``w*``, and a weight ``w`` at distance 1 from it."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(dim, generator=g)
    delta = torch.randn(dim, generator=g)
    x = torch.randn(samples, dim, generator=g)
    y = x @ w_star + noise * torch.randn(samples, generator=g)
    return TensorDataset(x, y), w_star, w_star + delta / delta.norm()


def fit_regression(
    root: Path, data: TensorDataset, weight: torch.Tensor, batch: int, **options: Any
) -> tuple[MetricsLogger, LinearRegression]:
    """Fit linear regression from ``weight`` with GradientFlow(noise_scale=True) measuring
    every step; ``options``: of the model (``lr``, ``manual``, ``fused``), the callback
    (``noise_scale_decay``, ``noise_scale``) or the Trainer."""
    model_options = {k: options.pop(k) for k in ("lr", "manual", "fused") if k in options}
    flow_options = {k: options.pop(k) for k in ("noise_scale", "noise_scale_decay") if k in options}
    flow = GradientFlow(**{"noise_scale": True, **flow_options}, every_n_steps=1, plot=False)
    logger = MetricsLogger()
    model = LinearRegression(weight, **model_options)
    trainer = quiet_trainer(root, [flow], logger=logger, max_epochs=1, **options)
    trainer.fit(model, DataLoader(data, batch_size=batch))
    return logger, model


def test_linear_regression_estimate_is_within_10_percent_of_the_closed_form(
    tmp_path: Path,
) -> None:
    # d = 32, s = 1, |delta| = 1: B_simple = ((d + 1) + d s^2) / 1 = 65. Batch 256 in 8
    # micro-batches, 50 steps with w fixed (lr 0), decay 0.98: over 200 seeds of this setup
    # (simulated without Lightning) the running estimate's error was 1.6% rms, 4.6% at most.
    dim, noise, batch, accumulate, steps = 32, 1.0, 256, 8, 50
    data, w_star, weight = regression_data(batch * accumulate * steps, dim, noise, seed=0)
    logger, _ = fit_regression(
        tmp_path, data, weight, batch, noise_scale_decay=0.98, accumulate_grad_batches=accumulate
    )
    logged = logger.named("/noise_scale")
    assert sorted(logged) == list(range(steps))
    assert set(logged[0]) == set(KEYS)
    delta_sq = (weight - w_star).square().sum().item()
    truth = ((dim + 1) * delta_sq + dim * noise**2) / delta_sq
    assert logged[steps - 1]["noise_scale"] == pytest.approx(truth, rel=0.10)

    # The first step exactly, from each micro-batch's mean gradient x^T (x w - y) / b.
    x, y = (t[: batch * accumulate].double() for t in data.tensors)
    residual = x @ weight.double() - y
    grads = torch.stack(
        [
            x[k * batch : (k + 1) * batch].T @ residual[k * batch : (k + 1) * batch] / batch
            for k in range(accumulate)
        ]
    )
    small = grads.square().sum(1).mean().item()
    big = grads.mean(0).square().sum().item()
    first = estimate_noise_scale(small, batch, big, batch * accumulate)
    assert logged[0]["noise_scale_step"] == pytest.approx(first.noise_scale, rel=1e-4)
    assert logged[0]["noise_scale_trace"] == pytest.approx(first.trace, rel=1e-4)
    assert logged[0]["noise_scale_grad_sq"] == pytest.approx(first.grad_sq, rel=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "fused"])
def test_fp16_loss_scale_is_divided_out(tmp_path: Path, fused: bool) -> None:
    # The hooks see gradients times the GradScaler's scale (1024 here); the optimizer's
    # gradient is unscaled by Lightning, or not at all by a fused optimizer.
    data, _, weight = regression_data(16 * 2 * 4, 4, 1.0, seed=1)
    fp32, _ = fit_regression(tmp_path / "fp32", data, weight, 16, accumulate_grad_batches=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fp16, _ = fit_regression(
        tmp_path / "fp16",
        data,
        weight,
        16,
        fused=fused,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert sorted(fp16.named("/noise_scale")) == sorted(fp32.named("/noise_scale")) == [0, 1, 2, 3]
    for step, values in fp32.named("/noise_scale").items():
        for key, value in values.items():  # fp16 autocast: the forward pass rounds
            assert fp16.named("/noise_scale")[step][key] == pytest.approx(value, rel=1e-2), (
                step,
                key,
            )


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_on_two_processes_matches_accumulating_two_micro_batches(tmp_path: Path) -> None:
    run_rank_script("ddp_noise_scale.py", lambda port: [str(tmp_path), str(port)], timeout=180)
    ddp, single = (
        json.loads((tmp_path / name).read_text()) for name in ("ddp.json", "single.json")
    )
    assert sorted(ddp) == sorted(single) == [str(step) for step in range(5)]
    for step, values in single.items():
        assert sorted(ddp[step]) == sorted(f"grad_flow/{key}" for key in KEYS)
        for key, value in values.items():
            assert ddp[step][key] == pytest.approx(value, rel=1e-5), (step, key)
    # A hook failing on rank 1 alone: every rank switched the noise scale off, and only it.
    failed = [json.loads((tmp_path / f"faults_rank{r}.json").read_text()) for r in (0, 1)]
    assert failed[0] == {"noise_scale": "it failed on rank(s) [1] of the group"}
    assert failed[1] == {"noise_scale": "hook failure on rank 1"}
    assert not (tmp_path / "ddp_failing.json").exists()  # no noise scale was logged


def test_no_second_batch_size_warns_once_and_logs_nothing(tmp_path: Path) -> None:
    data, _, weight = regression_data(64, 4, 1.0, seed=0)
    for options, needs in [
        ({}, "accumulate_grad_batches >= 2"),
        ({"manual": True}, "under manual optimization only DDP"),
    ]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger, _ = fit_regression(tmp_path / str(len(options)), data, weight, 16, **options)
        said = [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]
        assert len(said) == 1, said
        assert needs in said[0]
        assert said[0].startswith("GradientFlow(noise_scale=True) logs no noise scale")
        assert logger.named("/noise_scale") == {}

    def reason(**settings: Any) -> str | None:
        fit = {"world_size": 1, "accumulate_grad_batches": 2, "automatic_optimization": True}
        return noise_scale_unavailable(**{**fit, "optimizers": 1, "sharded": False, **settings})

    assert reason() is None
    assert reason(world_size=2, accumulate_grad_batches=1) is None
    assert reason(world_size=2, automatic_optimization=False) is None
    assert "sharded (FSDP, DTensor)" in reason(world_size=2, sharded=True)
    assert "this fit has 2" in reason(optimizers=2)


class StopAfterBatch(pl.Callback):
    """Sets ``trainer.should_stop`` after batch ``batch_idx``: every later batch is measured."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainer.should_stop = trainer.should_stop or batch_idx == self.batch_idx


def test_a_step_measured_from_a_later_micro_batch_on_gives_no_estimate(tmp_path: Path) -> None:
    # Windows of 3 micro-batches; measuring starts at batch 4, inside the window of step 1
    # (batches 3 to 5), whose gradient holds batch 3 too. min_epochs keeps the fit going.
    data, _, weight = regression_data(8 * 3 * 3, 4, 1.0, seed=0)
    flow = GradientFlow(noise_scale=True, every_n_steps=100, plot=False)
    logger = MetricsLogger()
    trainer = quiet_trainer(
        tmp_path,
        [flow, StopAfterBatch(3)],
        logger=logger,
        max_epochs=1,
        min_epochs=1,
        accumulate_grad_batches=3,
    )
    trainer.fit(LinearRegression(weight), DataLoader(data, batch_size=8))
    assert sorted(logger.named("/noise_scale")) == [0, 2]


def test_a_failing_hook_switches_off_the_noise_scale_alone(tmp_path: Path, monkeypatch) -> None:
    def failing_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("hook failure")

    data, _, weight = regression_data(16 * 2 * 3, 4, 1.0, seed=0)
    monkeypatch.setattr(torch.linalg, "vector_norm", failing_norm)  # the hooks' reduction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger, _ = fit_regression(tmp_path, data, weight, 16, accumulate_grad_batches=2)
    said = [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]
    assert len(said) == 1, said
    assert said[0].startswith("GradientFlow switched off the gradient noise scale")
    assert "RuntimeError: hook failure" in said[0]
    assert logger.named("/noise_scale") == {}
    assert all("grad_flow/grad_norm" in logger.steps[step] for step in range(3))


def test_training_is_unchanged_and_resuming_continues_the_average(tmp_path: Path) -> None:
    data, _, weight = regression_data(16 * 2 * 6, 4, 1.0, seed=1)
    fits = {}
    for noise_scale in (False, True):
        root = tmp_path / f"noise_scale_{noise_scale}"
        options = {"noise_scale": noise_scale, "lr": 0.1, "accumulate_grad_batches": 2}
        fits[noise_scale] = fit_regression(root, data, weight, 16, **options)
    assert torch.equal(fits[False][1].linear.weight, fits[True][1].linear.weight)
    assert fits[False][0].named("/noise_scale") == {}
    assert len(fits[True][0].named("/noise_scale")) == 6

    # Two epochs straight, or one, a checkpoint and a second: the same running average.
    def two_epochs(root: Path, ckpt: str | None = None, epochs: int = 2) -> GradientFlow:
        flow = GradientFlow(noise_scale=True, every_n_steps=1, plot=False)
        trainer = quiet_trainer(root, [flow], max_epochs=epochs, accumulate_grad_batches=2)
        trainer.fit(LinearRegression(weight), DataLoader(data, batch_size=16), ckpt_path=ckpt)
        if ckpt is None and epochs == 1:
            trainer.save_checkpoint(root / "epoch1.ckpt")
        return flow

    straight = two_epochs(tmp_path / "straight")
    two_epochs(tmp_path / "resumed", epochs=1)
    resumed = two_epochs(tmp_path / "resumed", ckpt=str(tmp_path / "resumed" / "epoch1.ckpt"))
    state = straight.state_dict()["noise_scale"]
    assert state["steps"] == 12
    assert resumed.state_dict()["noise_scale"] == pytest.approx(state)
    # A new fit with the same callback, not resumed, starts its averages afresh.
    trainer = quiet_trainer(tmp_path / "again", [straight], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(LinearRegression(weight), DataLoader(data, batch_size=16))
    assert straight.state_dict()["noise_scale"] == pytest.approx(state)
