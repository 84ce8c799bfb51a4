"""Building blocks shared by the hand-written families: activations and weight initialisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from gradtrace.checks import check_choice

__all__ = ["ACTIVATIONS", "INITS", "AuxLogits", "init_weights", "make_activation"]


class AuxLogits(NamedTuple):
    """What a model with auxiliary classifiers (GoogLeNet) returns in training mode.

    ``logits`` are the main head's; ``aux`` holds the auxiliary heads' logits, input side
    first. In eval mode such models return plain logits.
    """

    logits: torch.Tensor
    aux: tuple[torch.Tensor, ...]


# name -> (module factory, nonlinearity name for nn.init gains, its parameter)
_ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str, float | None]] = {
    "leaky_relu": (lambda: nn.LeakyReLU(0.01), "leaky_relu", 0.01),
    "relu": (lambda: nn.ReLU(), "relu", None),
    # ELU is the identity for positive inputs, so the ReLU gain is the usual choice.
    "elu": (lambda: nn.ELU(), "relu", None),
    "selu": (lambda: nn.SELU(), "selu", None),
    "sigmoid": (lambda: nn.Sigmoid(), "sigmoid", None),
    "tanh": (lambda: nn.Tanh(), "tanh", None),
}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)
INITS: tuple[str, ...] = ("pytorch", "kaiming", "xavier")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    check_choice("activation", name, ACTIVATIONS)
    return _ACTIVATIONS[name][0]()


def init_weights(model: nn.Module, scheme: str, activation: str) -> None:
    """Re-initialise conv and linear weights of ``model``.

    ``"pytorch"`` keeps PyTorch's default (what makes plain VGG38 collapse); ``"kaiming"``
    (He et al., fan-in) and ``"xavier"`` (Glorot, uniform) use the gain of ``activation``.
    The classifier head (the last ``nn.Linear``) gets a linear gain. Biases start at zero.
    """
    check_choice("init", scheme, INITS)
    check_choice("activation", activation, ACTIVATIONS)
    if scheme == "pytorch":
        return
    _, nonlinearity, param = _ACTIVATIONS[activation]
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    head = next((m for m in reversed(layers) if isinstance(m, nn.Linear)), None)
    for layer in layers:
        act = "linear" if layer is head else nonlinearity
        slope = None if layer is head else param
        if scheme == "kaiming":
            # SELU's self-normalisation wants LeCun normal, i.e. the linear gain.
            fan_in_gain = "linear" if act == "selu" else act
            nn.init.kaiming_normal_(layer.weight, a=slope or 0.0, nonlinearity=fan_in_gain)
        else:
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(act, slope))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
