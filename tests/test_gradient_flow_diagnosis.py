"""GradientFlow's diagnosis: the vanishing or exploding warning names the layer pair once, plain
VGG38 warns and VGG08 does not, each optimizer is diagnosed on its own layers, and the input /
output ratio."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradtrace import GradientFlow, GradientFlowWarning
from helpers.fits import fit
from helpers.records import by_step
from helpers.tiny import CLASSES, FLOW, HIDDEN, Chain, Classifier, TinyNet


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


class GanLike(pl.LightningModule):
    """A generator whose gradient vanishes toward its input, and a healthy critic, each with
    its own optimizer (manual optimization, the GAN recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = Chain(1e-6)
        self.critic = nn.Sequential(nn.Linear(CLASSES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        fake = self.generator(x)
        opt_c.zero_grad()
        self.manual_backward(self.critic(fake.detach()).mean())
        opt_c.step()
        opt_g.zero_grad()
        self.manual_backward(-self.critic(fake).mean())
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.0),
            torch.optim.SGD(self.critic.parameters(), lr=0.0),
        )


def test_each_optimizer_is_diagnosed_on_its_own_layers(tmp_path: Path) -> None:
    torch.manual_seed(22)
    cb = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    model = GanLike()
    with pytest.warns(GradientFlowWarning) as caught:
        fit(tmp_path, model, cb, max_steps=4)  # 2 batches x 2 optimizer steps
    messages = [str(w.message) for w in caught if w.category is GradientFlowWarning]
    assert len(messages) == 1
    assert messages[0].startswith(
        "Gradients vanish at step 0: mean |grad| of the input-side layer "
        "'generator.layers.0.weight' is"
    )
    assert "output-side layer 'generator.layers.3.weight'" in messages[0]
    metrics = model.trainer.callback_metrics
    step = by_step(cb.history)[1]
    want_g = (
        step["generator.layers.0.weight"]["mean_abs"]
        / step["generator.layers.3.weight"]["mean_abs"]
    )
    want_c = step["critic.0.weight"]["mean_abs"] / step["critic.2.weight"]["mean_abs"]
    assert metrics["grad_flow/input_output_ratio"].item() == pytest.approx(want_g, rel=1e-5)
    assert metrics["grad_flow/input_output_ratio/optimizer_1"].item() == pytest.approx(
        want_c, rel=1e-5
    )


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
