"""Tiny models for GradientFlow's tests, small enough to check every record by hand.

:class:`TinyNet` is registered head-first and called input-first (registration order is not
data-flow order); :class:`Chain` multiplies the gradient by a factor between its layers 1 and
2 (vanishing or exploding on demand); :class:`Classifier` trains either with cross-entropy and
keeps a copy of every gradient and weight the optimizer sees.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "CLASSES",
    "FLOW",
    "FLOW_WITH_BIAS",
    "HIDDEN",
    "IN",
    "Chain",
    "Classifier",
    "ScaleGrad",
    "TinyNet",
    "make_data",
]

IN, HIDDEN, CLASSES = 6, 8, 3


class TinyNet(nn.Module):
    """Registered head-first, called input-first: registration order != data-flow order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.inp = nn.Linear(IN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


# TinyNet's weights (and biases) in data-flow order, as a Classifier names them.
FLOW = ["net.inp.weight", "net.hidden.weight", "net.head.weight"]
FLOW_WITH_BIAS = [
    "net.inp.weight",
    "net.inp.bias",
    "net.hidden.weight",
    "net.hidden.bias",
    "net.head.weight",
    "net.head.bias",
]


class Classifier(pl.LightningModule):
    """Cross-entropy classifier that keeps a copy of every gradient the optimizer sees."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.seen: list[dict] = []  # per optimizer step: {"step", "grads", "weights"}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs right after the callbacks' hook, on the same gradients.
        self.seen.append(
            {
                "step": self.trainer.global_step,
                "grads": {
                    n: p.grad.detach().clone()
                    for n, p in self.named_parameters()
                    if p.grad is not None
                },
                "weights": {n: p.detach().clone() for n, p in self.named_parameters()},
            }
        )


def make_data(n: int = 8, seed: int = 0) -> TensorDataset:
    """``n`` random inputs for :class:`TinyNet` and their random labels."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    )


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class Chain(nn.Module):
    """Four layers; the gradient is multiplied by ``factor`` between layer 1 and layer 2."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.layers = nn.ModuleList(
            [
                nn.Linear(IN, HIDDEN),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Linear(HIDDEN, CLASSES),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i == 2:
                x = ScaleGrad.apply(x, self.factor)
            x = torch.tanh(layer(x)) if i < 3 else layer(x)
        return x
