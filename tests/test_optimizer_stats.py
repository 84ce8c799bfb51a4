"""``GradientFlow(optimizer_stats=True)``: what the optimizer did with the gradients, against
the weights' change, the clipped gradients and ``optimizer.state`` read by hand in the same fit.

The sharded paths (FSDP1, FSDP2, DTensor on 2 and 4 gloo processes, one collective) are
compared with a clipped Adam step computed by hand in tests/test_stats.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, read_history
from helpers.fits import quiet_trainer
from helpers.metrics import MetricsLogger

CLIP = 0.05
STEPS = 3


class GRUClassifier(pl.LightningModule):
    """A model our CNN fixtures are not: a GRU over a sequence, an embedding, AdamW."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        tokens, labels = batch
        hidden, _ = self.gru(self.embed(tokens))
        return nn.functional.cross_entropy(self.head(hidden[:, -1]), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


class ByHand(pl.Callback):
    """The weights before each step (after GradientFlow's hook, before clipping) and, after
    the step, the clipped gradients, the weights and the optimizer's state, per step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        params = dict(pl_module.named_parameters())
        clipped = torch.stack([p.grad.double().norm() for p in params.values()]).norm()
        layers = {}
        for name, p in params.items():
            before, state = self._before[name], optimizer.state[p]
            layers[name] = {
                "update_norm": (p.detach().double() - before).norm().item(),
                "weight_norm": before.norm().item(),
                "m_mean_abs": state["exp_avg"].double().abs().mean().item()
                if "exp_avg" in state
                else None,
                "sqrt_v_mean": state["exp_avg_sq"].double().sqrt().mean().item()
                if "exp_avg_sq" in state
                else None,
            }
        self.steps.append({"clipped": clipped.item(), "layers": layers})


def fit(tmp_path: Path, optimizer: str) -> tuple[GradientFlow, ByHand, MetricsLogger]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (12, 5)), torch.randint(0, 3, (12,)))
    flow = GradientFlow(every_n_steps=1, optimizer_stats=True, plot=False)
    by_hand, logger = ByHand(), MetricsLogger()
    trainer = quiet_trainer(
        tmp_path, [flow, by_hand], max_steps=STEPS, gradient_clip_val=CLIP, logger=logger
    )
    trainer.fit(GRUClassifier(optimizer), DataLoader(data, batch_size=4))
    return flow, by_hand, logger


def test_adamw_update_weight_and_moments_equal_the_state_read_by_hand(tmp_path: Path) -> None:
    flow, by_hand, logger = fit(tmp_path, "adamw")
    layers = ["embed.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight"]
    assert flow.layer_order == layers
    columns = ["update_norm", "weight_norm", "update_ratio", "m_mean_abs", "sqrt_v_mean"]
    assert flow.columns[6:] == columns
    assert len(by_hand.steps) == STEPS
    for record in flow.history:
        want = by_hand.steps[record["step"]]["layers"][record["layer"]]
        for key in ("update_norm", "weight_norm", "m_mean_abs", "sqrt_v_mean"):
            assert record[key] == pytest.approx(want[key], rel=1e-6), (record["step"], key)
        ratio = want["update_norm"] / want["weight_norm"]
        assert record["update_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert read_history(flow.csv_path) == flow.history

    # the gradient norm before clipping (above CLIP) and after it (CLIP), per step
    summaries = [m for m in logger.steps.values() if "grad_flow/grad_norm_clipped" in m]
    assert len(summaries) == STEPS
    for step, summary in enumerate(summaries):
        assert summary["grad_flow/grad_norm"] > CLIP
        clipped = by_hand.steps[step]["clipped"]
        assert summary["grad_flow/grad_norm_clipped"] == pytest.approx(clipped, rel=1e-6)
        assert clipped == pytest.approx(CLIP, rel=1e-4)


def test_sgd_has_no_moment_columns(tmp_path: Path) -> None:
    flow, by_hand, _ = fit(tmp_path, "sgd")
    assert flow.columns[6:] == ["update_norm", "weight_norm", "update_ratio"]
    for record in flow.history:
        want = by_hand.steps[record["step"]]["layers"][record["layer"]]
        assert record["update_norm"] == pytest.approx(want["update_norm"], rel=1e-6)
        assert "m_mean_abs" not in record


def test_a_step_that_never_ran_is_nan(tmp_path: Path) -> None:
    """A batch that fails after the gradients were measured but before the step: its
    optimizer side is NaN on disk, and the run's error is the user's."""

    class FailsBeforeStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if trainer.global_step == 1:
                raise RuntimeError("boom")

    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (12, 5)), torch.randint(0, 3, (12,)))
    flow = GradientFlow(every_n_steps=1, optimizer_stats=True, plot=False)
    trainer = quiet_trainer(tmp_path, [flow, FailsBeforeStep()], max_steps=STEPS)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(GRUClassifier(), DataLoader(data, batch_size=4))
    on_disk = read_history(flow.csv_path)
    assert {r["step"] for r in on_disk} == {0, 1}
    assert all(math.isfinite(r["update_norm"]) for r in on_disk if r["step"] == 0)
    assert all(math.isnan(r["update_norm"]) for r in on_disk if r["step"] == 1)
