"""Building blocks shared by the hand-written families: norm and activation layers by name,
weight initialisation, and the auxiliary-logits return type.

Models take torchvision-style factories, ``norm_layer: Callable[[int], nn.Module]`` (called
with a channel count) and ``act_layer: Callable[[], nn.Module]``; the CLI and YAML files name
them instead (``norm: group``, ``activation: tanh``), resolved by the two tables here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from gradtrace.checks import check_choice

__all__ = [
    "ACTIVATIONS",
    "ACT_LAYERS",
    "GROUP_NORM_GROUPS",
    "INITS",
    "NORMS",
    "NORM_LAYERS",
    "ActLayer",
    "AuxLogits",
    "LayerNorm2d",
    "NormLayer",
    "group_norm",
    "init_weights",
    "resolve_act_layer",
    "resolve_norm_layer",
]

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]


class AuxLogits(NamedTuple):
    """What a model with auxiliary classifiers (GoogLeNet) returns in training mode.

    ``logits`` are the main head's; ``aux`` holds the auxiliary heads' logits, input side
    first. In eval mode such models return plain logits.
    """

    logits: torch.Tensor
    aux: tuple[torch.Tensor, ...]


class LayerNorm2d(nn.GroupNorm):
    """Layer normalisation of conv feature maps: each sample is normalised over all of its
    (C, H, W) units, then scaled and shifted per channel.

    This is "Layer Normalization" (Ba et al., arXiv:1607.06450) applied to a conv layer as
    "Group Normalization" (Wu & He, arXiv:1803.08494, section 3.1) defines it: group
    normalisation with a single group. (torchvision's ConvNeXt ``LayerNorm2d`` normalises
    over the channels of each position instead.)
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)


# "Group Normalization" uses 32 groups; that would leave one channel per group (instance
# normalisation) in the 32-wide coursework VGG and the 16-wide CIFAR ResNet stage. 8 groups
# keep 2 to 64 channels per group across the zoo's conv widths (16 to 512).
GROUP_NORM_GROUPS = 8


def group_norm(num_channels: int, num_groups: int = GROUP_NORM_GROUPS) -> nn.GroupNorm:
    """``nn.GroupNorm(num_groups, num_channels)``; ``ValueError`` if the groups do not divide
    the channels (pass ``norm_layer=functools.partial(group_norm, num_groups=G)`` for other G)."""
    if num_channels % num_groups:
        raise ValueError(
            f"group normalisation with {num_groups} groups needs a channel count divisible by "
            f"{num_groups}; got {num_channels} channels"
        )
    return nn.GroupNorm(num_groups, num_channels)


# name -> norm layer factory; "none" is nn.Identity (which ignores the channel count).
NORM_LAYERS: dict[str, NormLayer] = {
    "batch": nn.BatchNorm2d,
    "group": group_norm,
    "layer": LayerNorm2d,
    "none": nn.Identity,
}
# name -> activation factory
ACT_LAYERS: dict[str, ActLayer] = {
    "leaky_relu": partial(nn.LeakyReLU, 0.01),
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
NORMS: tuple[str, ...] = tuple(NORM_LAYERS)
ACTIVATIONS: tuple[str, ...] = tuple(ACT_LAYERS)
INITS: tuple[str, ...] = ("pytorch", "kaiming", "xavier")


def resolve_norm_layer(
    norm: str | None,
    norm_layer: NormLayer | None,
    batch_norm: bool = False,
    default: str = "none",
) -> NormLayer:
    """The norm layer factory a model uses, from its three spellings.

    ``norm`` names one of :data:`NORMS`; ``norm_layer`` is a factory; ``batch_norm=True`` is
    the shorthand for ``norm="batch"``. Give at most one (``batch_norm=True`` with
    ``norm="batch"`` agrees and is accepted); none gives ``default``.
    """
    if norm is not None:
        check_choice("norm", norm, NORMS)
    given = [f"norm={norm!r}"] if norm is not None else []
    given += ["norm_layer"] if norm_layer is not None else []
    given += ["batch_norm=True"] if batch_norm and norm != "batch" else []
    if len(given) > 1:
        raise ValueError(f"give the normalisation once; got {' and '.join(given)}")
    if norm_layer is not None:
        return norm_layer
    return NORM_LAYERS["batch" if batch_norm else norm or default]


def resolve_act_layer(activation: str | None, act_layer: ActLayer | None, default: str) -> ActLayer:
    """The activation factory a model uses: ``activation`` names one of :data:`ACTIVATIONS`,
    ``act_layer`` is a factory; give at most one, none gives ``default``."""
    if activation is not None:
        check_choice("activation", activation, ACTIVATIONS)
        if act_layer is not None:
            raise ValueError(
                f"give the activation once; got activation={activation!r} and act_layer"
            )
    return act_layer or ACT_LAYERS[activation or default]


# activation type -> (nonlinearity name for nn.init gains); LeakyReLU adds its slope.
# ELU is the identity for positive inputs, so the ReLU gain is the usual choice.
_GAINS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LeakyReLU, "leaky_relu"),
    (nn.ReLU, "relu"),
    (nn.ELU, "relu"),
    (nn.SELU, "selu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
)


def _nonlinearity(scheme: str, activation: nn.Module) -> tuple[str, float | None]:
    for cls, name in _GAINS:
        if isinstance(activation, cls):
            slope = activation.negative_slope if isinstance(activation, nn.LeakyReLU) else None
            return name, slope
    known = ", ".join(cls.__name__ for cls, _ in _GAINS)
    raise ValueError(
        f"init={scheme!r} needs the gain of the activation, known for {known}; "
        f"got {type(activation).__name__} (use init='pytorch')"
    )


def init_weights(model: nn.Module, scheme: str, activation: nn.Module) -> None:
    """Re-initialise conv and linear weights of ``model``.

    ``"pytorch"`` keeps PyTorch's default (what makes plain VGG38 collapse); ``"kaiming"``
    (He et al., fan-in) and ``"xavier"`` (Glorot, uniform) use the gain of ``activation``, an
    instance of the model's activation layer. The classifier head (the last ``nn.Linear``)
    gets a linear gain. Biases start at zero.
    """
    check_choice("init", scheme, INITS)
    if scheme == "pytorch":
        return
    nonlinearity, param = _nonlinearity(scheme, activation)
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
