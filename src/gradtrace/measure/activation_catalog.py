"""What the activation statistics recognise around a layer's output.

* activations, as modules and as functions (``nn.ReLU``, ``F.relu``, ``x.sigmoid()``...), with
  the saturation bounds of the saturating ones;
* pass-throughs, whose output stands for their input: normalizations and ``Identity``
  (modules), normalization functions and reshapes/casts (functions);
* functions that apply a weight (``F.linear``, convolutions, embeddings, ``matmul``);
* :func:`activation_sources`: which module's output is each layer's output.

Torch alone; :mod:`gradtrace.measure.activations` watches the calls and
:mod:`gradtrace.measure.activation_sums` counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtrace.compat import NORM_BASE

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "NEUTRAL_FUNCTIONS",
    "NORM_TYPES",
    "PASS_THROUGH_FUNCTIONS",
    "PASS_THROUGH_MODULES",
    "WEIGHT_FUNCTIONS",
    "Bounds",
    "activation_sources",
    "is_bias",
    "module_bounds",
]

ACTIVATION_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,  # ReLU6 is a subclass
    nn.Sigmoid,
    nn.Tanh,
    nn.Threshold,
)
"""Activation modules (each calls one of :data:`ACTIVATION_FUNCTIONS`)."""
NORM_TYPES: tuple[type[nn.Module], ...] = (
    NORM_BASE,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Normalization layers (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm,
LocalResponseNorm, RMSNorm): they rescale a layer's output, they do not decide its activation."""
PASS_THROUGH_MODULES = (*NORM_TYPES, nn.Identity)
"""Modules whose output stands for their input when looking for a layer's activation."""

Bounds = tuple[float, float] | None


def _hardtanh_bounds(args: tuple, kwargs: dict) -> Bounds:
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(low), float(high)


def _functions(*names: str, owners: tuple[Any, ...] = (F, torch, torch.Tensor)) -> list[Any]:
    return [getattr(o, n) for n in names for o in owners if hasattr(o, n)]


def _fixed(bounds: Bounds) -> Callable[[tuple, dict], Bounds]:
    return lambda args, kwargs: bounds


ACTIVATION_FUNCTIONS: dict[Any, Callable[[tuple, dict], Bounds]] = {
    **dict.fromkeys(
        _functions(
            "relu",
            "relu_",
            "gelu",
            "silu",
            "mish",
            "elu",
            "elu_",
            "selu",
            "selu_",
            "celu",
            "celu_",
            "leaky_relu",
            "leaky_relu_",
            "softplus",
            "hardswish",
            "softsign",
            "threshold",
            "threshold_",
            "prelu",
            "rrelu",
            "rrelu_",
            "logsigmoid",
        ),
        _fixed(None),
    ),
    **dict.fromkeys(_functions("sigmoid", "sigmoid_", "hardsigmoid"), _fixed((0.0, 1.0))),
    **dict.fromkeys(_functions("tanh", "tanh_"), _fixed((-1.0, 1.0))),
    **dict.fromkeys(_functions("relu6"), _fixed((0.0, 6.0))),
    **dict.fromkeys(_functions("hardtanh", "hardtanh_"), _hardtanh_bounds),
}
"""Activation functions (as ``F.*``, ``torch.*`` and tensor methods, in-place forms included),
each with how to read its saturation bounds from the call (``None``: not saturating)."""
PASS_THROUGH_FUNCTIONS = frozenset(
    _functions(
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "local_response_norm",
        "rms_norm",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "movedim",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "to",
        "float",
        "half",
        "bfloat16",
        "type_as",
    )
)
"""Functions whose output stands for their input: normalizations, reshapes and casts."""
WEIGHT_FUNCTIONS = frozenset(
    _functions(
        "linear",
        "bilinear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "embedding",
        "embedding_bag",
        "matmul",
        "__matmul__",
        "mm",
        "bmm",
    )
)
"""Functions that apply a weight: called with a layer's weight outside that layer's module
(torchvision's Swin, LoRA's ``x @ A``, a tied head's ``F.linear(h, embedding.weight)``), their
output is the layer's output."""
NEUTRAL_FUNCTIONS = frozenset(
    _functions("detach", "register_hook", "requires_grad_", "retain_grad")
)
"""Functions that read a tensor without consuming it."""


def module_bounds(module: nn.Module) -> Bounds:
    """The output bounds of a saturating activation module, else ``None``."""
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    if isinstance(module, nn.Tanh):
        return -1.0, 1.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


def is_bias(name: str) -> bool:
    """Whether the parameter ``name`` is a bias: it has no output apart from its weight's."""
    return "bias" in name.rsplit(".", 1)[-1]


def activation_sources(
    layers: Iterable[tuple[str, nn.Module]], root: nn.Module
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Which module's output is each layer's output.

    ``layers`` are (parameter name, owning module) pairs in the gradient side's selection.
    Returns ``{layer: module}`` (each module once, under the first layer given for it: a
    ``weight`` before its ``bias``) and ``{layer: why it has no output of its own}`` for the
    layers whose output no module hook sees: ``nn.MultiheadAttention``'s input projection
    (computed inside its fused function; its output projection's output is the module's
    output), the inner weights of a recurrent layer (only the last layer's hidden states leave
    ``nn.LSTM``/``nn.GRU``/``nn.RNN``), bare parameters of a module that has children (a
    class token, a temperature; a function applying them may still give their output, see
    :meth:`ActivationCollector.attach`), and a second weight of one module. A bias is never in
    the second: its output is its weight's.
    """
    parent = {id(child): mod for mod in root.modules() for child in mod.children()}
    sources: dict[str, nn.Module] = {}
    missing: dict[str, str] = {}
    used: dict[int, str] = {}
    for name, module in layers:
        attribute = name.rsplit(".", 1)[-1]
        source: nn.Module | None = module
        up = parent.get(id(module))
        if isinstance(module, nn.MultiheadAttention):
            source = None
            reason = "computed inside nn.MultiheadAttention's fused attention"
        elif isinstance(up, nn.MultiheadAttention) and module is up.out_proj:
            source = up  # out_proj is applied with F.linear: the attention's output is its
        elif isinstance(module, nn.RNNBase):
            last = f"_l{module.num_layers - 1}"
            if not (attribute.endswith(last) or attribute.endswith(f"{last}_reverse")):
                source = None
                reason = f"inside {type(module).__name__}: only its last layer's output leaves it"
        elif any(True for _ in module.children()):
            source = None
            reason = f"a parameter of {type(module).__name__}, whose output is not one layer's"
        if source is not None and id(source) not in used:
            used[id(source)] = name
            sources[name] = source
        elif is_bias(name):
            continue
        elif source is None:
            missing[name] = reason
        else:
            missing[name] = f"shares its module's output with {used[id(source)]!r}"
    return sources, missing
