"""Layer order from the autograd graph: where each parameter's gradient enters the backward
pass, whatever calls it (a module, ``F.linear``, a bare parameter, a tied weight, a branch some
batches skip, a second loss)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow
from gradtrace.measure import parameter_names
from gradtrace.measure.order import LayerOrder, backward_depths
from helpers.corpus import GAN
from helpers.fits import quiet_trainer


def fit(module: pl.LightningModule, data: TensorDataset, tmp_path: Path, steps: int, **options):
    flow = GradientFlow(every_n_steps=1, plot=False, **options)
    quiet_trainer(tmp_path, [flow], max_steps=steps).fit(module, DataLoader(data, batch_size=2))
    return flow


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def classes(n: int, features: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, 3, (n,)))


def test_backward_depths_are_the_longest_chain_from_the_output() -> None:
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    out = ((a * 2).exp() + b).sum()  # a: sum <- add <- exp <- mul <- a; b: sum <- add <- b
    depths = backward_depths(out)
    by_leaf = {id(n.variable): d for n, d in depths.items() if hasattr(n, "variable")}
    assert by_leaf == {id(a): 4, id(b): 2}
    assert depths[out.grad_fn] == 0
    assert backward_depths(torch.ones(2)) == {}


class Attention(nn.Module):
    """Attention whose output projection is applied inside ``F.multi_head_attention_forward``
    (never called as a module), registered after the head; a temperature divides the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).unsqueeze(1)
        return self.head(self.attn(h, h, h)[0].squeeze(1)) / self.temperature


def test_attention_projections_and_a_bare_parameter_land_where_the_data_flows(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    flow = fit(Task(Attention()), classes(4), tmp_path, steps=1, include=["*temperature"])
    assert flow.layer_order == [
        "net.embed.weight",
        "net.attn.in_proj_weight",
        "net.attn.out_proj.weight",
        "net.head.weight",
        "net.temperature",  # used last: nearest the loss
    ]
    assert flow.main_path[-1] == "net.temperature"
    without = fit(Task(Attention()), classes(4), tmp_path / "b", steps=1)
    assert without.main_path[-1] == "net.head.weight"  # not 'net.attn.out_proj.weight'


class Tied(nn.Module):
    """An embedding reused as the output head (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mix(self.embed(x))), self.embed.weight)


def test_a_tied_weight_sits_where_the_data_enters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 10, (4,), generator=g), torch.randint(0, 10, (4,)))
    flow = fit(Task(Tied()), data, tmp_path, steps=1)
    assert flow.layer_order == ["net.embed.weight", "net.mix.weight"]


class SometimesBranch(nn.Module):
    """A middle branch that the first batch skips."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.branch = nn.Linear(8, 8)
        self.inp = nn.Linear(6, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.tanh(self.inp(x))
        if self.calls > 1:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def test_a_branch_skipped_on_the_first_batch_is_placed_once_it_has_a_gradient(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    flow = fit(Task(SometimesBranch()), classes(8), tmp_path, steps=3)
    assert flow.layer_order == ["net.inp.weight", "net.branch.weight", "net.head.weight"]
    assert flow.main_path == flow.layer_order


def test_a_generator_comes_before_its_critic(tmp_path: Path) -> None:
    flow = fit(GAN(), TensorDataset(torch.randn(4, 12)), tmp_path, steps=2)
    generator = [name for name in flow.layer_order if name.startswith("generator.")]
    critic = [name for name in flow.layer_order if name.startswith("critic.")]
    assert flow.layer_order == generator + critic
    assert generator == [f"generator.{i}.weight" for i in (0, 2, 4)]
    assert critic == [f"critic.{i}.weight" for i in (0, 2, 4)]


class Checkpointed(nn.Module):
    """A middle block under reentrant activation checkpointing: autograd cannot see inside."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)).requires_grad_()
        h = checkpoint(self.block, h, use_reentrant=True)
        return self.head(h)


def test_what_autograd_cannot_reach_keeps_its_place_in_call_order() -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.net = Checkpointed()
    order = LayerOrder()
    order.start(parameter_names(root), keep=False)
    order.watch(root)
    x, y = classes(2)[:]
    loss = F.cross_entropy(root.net(x), y)
    order.backward(loss)
    order.end_watch()
    weights = [name for name in order.order if name.endswith("weight")]
    assert weights == [
        "net.inp.weight",
        "net.block.0.weight",
        "net.block.2.weight",
        "net.head.weight",
    ]
    assert "net.block.0.weight" not in order.depths  # placed by call order, not by autograd
