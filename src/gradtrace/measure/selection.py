"""Which parameters are "layers": names without wrapper prefixes, default set, include/exclude.

By default a layer is the ``weight`` of a weight-bearing module (``Conv*``, ``Linear``,
``Embedding``/``EmbeddingBag``, including their subclasses and lazy variants), the input
projection of ``nn.MultiheadAttention`` and the weights of recurrent layers (``nn.LSTM``,
``nn.GRU``, ``nn.RNN`` and their cells); ``include`` adds parameters by glob on their names or
by the type of the module owning them, ``exclude`` removes them (applied last).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from gradtrace.compat import CONV_BASE, own_children, own_parameters

__all__ = ["WEIGHT_BEARING", "Layer", "is_default_layer", "parameter_names", "select_layers"]

WEIGHT_BEARING: tuple[type[nn.Module], ...] = (
    CONV_BASE,
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
)
"""Module types whose ``weight`` is a layer by default (subclasses included: ``LazyLinear``,
``LazyConv2d``, ``NonDynamicallyQuantizableLinear``, timm's ``Conv2dSame``...)."""

# nn.MultiheadAttention keeps its input projection as bare parameters (packed or q/k/v).
_ATTENTION_WEIGHTS = frozenset(
    {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def is_default_layer(owner: nn.Module, parameter_name: str) -> bool:
    """Whether ``owner``'s parameter called ``parameter_name`` (its own name, e.g. ``weight``)
    is a layer by default: the ``weight`` of a :data:`WEIGHT_BEARING` module, the input
    projection of ``nn.MultiheadAttention`` (its output projection is a ``Linear``), and every
    ``weight_*`` matrix of a recurrent layer (``weight_ih_l0``, ``weight_hh_l0``, ...)."""
    if isinstance(owner, WEIGHT_BEARING):
        return parameter_name == "weight"
    if isinstance(owner, nn.MultiheadAttention):
        return parameter_name in _ATTENTION_WEIGHTS
    if isinstance(owner, _RECURRENT):
        return parameter_name.startswith("weight_")
    return False


# Children that wrappers (torch.compile, DDP/DataParallel, FSDP, activation checkpointing) insert
# between a model and its layers; their names never appear in layer names.
_WRAPPER_CHILDREN = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


@dataclass(frozen=True)
class Layer:
    """One measured parameter: its name, the tensor, and the module that owns it."""

    name: str
    """Name as in ``named_parameters()`` without wrapper prefixes, e.g. ``net.conv1.weight``."""
    param: nn.Parameter
    module: nn.Module
    """The module whose ``_parameters`` hold ``param`` (e.g. the ``Conv2d``)."""
    module_name: str
    """``module``'s name without wrapper prefixes (``""`` for the root)."""


def _visit(root: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module, str]]:
    """(name, parameter, owner, owner name) in registration order, each parameter once."""
    found: list[tuple[str, nn.Parameter, nn.Module, str]] = []
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def visit(mod: nn.Module, prefix: str) -> None:
        if id(mod) in seen_modules:
            return
        seen_modules.add(id(mod))
        for pname, param in own_parameters(mod):
            if param is not None and id(param) not in seen_params:
                seen_params.add(id(param))
                found.append((prefix + pname, param, mod, prefix[:-1]))
        for cname, child in own_children(mod):
            if child is None:
                continue
            wrapped = cname in _WRAPPER_CHILDREN or (
                cname == "module" and isinstance(mod, _DATA_PARALLEL)
            )
            visit(child, prefix if wrapped else f"{prefix}{cname}.")

    visit(root, "")
    return found


def parameter_names(module: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its name in ``module``, wrapper prefixes removed.

    Names are those of ``module.named_parameters()`` (same order, shared parameters once),
    except that the children which ``torch.compile`` (``_orig_mod``), DDP/DataParallel
    (``module``), FSDP and activation checkpointing insert are left out, so a compiled
    ``features.0.weight`` is still called ``features.0.weight``.
    """
    return {id(param): name for name, param, _, _ in _visit(module)}


def _matches(pattern: str | type, name: str, owner: nn.Module) -> bool:
    if isinstance(pattern, type):
        return isinstance(owner, pattern)
    return fnmatch.fnmatchcase(name, pattern) or any(
        cls.__name__ == pattern for cls in type(owner).__mro__
    )


def _check_patterns(label: str, patterns: Iterable[str | type]) -> tuple[str | type, ...]:
    if isinstance(patterns, (str, type)):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        if not (isinstance(pattern, str) and pattern) and not (
            isinstance(pattern, type) and issubclass(pattern, nn.Module)
        ):
            raise ValueError(
                f"{label} entries must be name globs such as '*.bias' or module types such as "
                f"'BatchNorm2d' / nn.LayerNorm; got {pattern!r}"
            )
    return patterns


def select_layers(
    module: nn.Module,
    include: Sequence[str | type] = (),
    exclude: Sequence[str | type] = (),
    *,
    trainable_only: bool = True,
) -> list[Layer]:
    """The layers of ``module`` that gradient statistics are recorded for, in registration order.

    Default: :func:`is_default_layer` (the ``weight`` of every :data:`WEIGHT_BEARING` module,
    attention input projections, recurrent weights). ``include`` adds every
    parameter whose name matches one of its fnmatch globs (``"*.bias"``, ``"net.cls_token"``,
    ``"*norm*.weight"``) or whose owning module is of one of its types (a class, or a class
    name such as ``"BatchNorm2d"``, matched on the whole MRO). ``exclude`` removes parameters
    the same way, applied last. Frozen parameters (``requires_grad=False``) are left out unless
    ``trainable_only=False``.

    Raises:
        ValueError: an ``include``/``exclude`` entry is neither a non-empty string nor a
            module type.
    """
    include = _check_patterns("include", include)
    exclude = _check_patterns("exclude", exclude)
    layers = []
    for name, param, owner, owner_name in _visit(module):
        if trainable_only and not param.requires_grad:
            continue
        default = is_default_layer(owner, name.rsplit(".", 1)[-1])
        chosen = default or any(_matches(p, name, owner) for p in include)
        if chosen and not any(_matches(p, name, owner) for p in exclude):
            layers.append(Layer(name, param, owner, owner_name))
    return layers
