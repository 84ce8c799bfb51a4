"""A name -> builder registry in the spirit of timm's ``create_model``.

Every architecture registers a builder function ``builder(num_classes, in_chans, **options)``.
Aliases (``vgg38``) register the same builder with some options fixed. ``create_model`` checks
names and keywords before anything is built, so a typo fails with the valid choices listed.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name."""

    name: str
    builder: Builder
    family: str
    input_size: tuple[int, int, int]
    num_classes: int
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options a caller may set, with their defaults (fixed ones excluded)."""
        params = inspect.signature(self.builder).parameters
        return {
            name: p.default
            for name, p in params.items()
            if name not in ("num_classes", "in_chans") and name not in self.fixed
        }


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str | None = None,
    *,
    family: str,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    description: str = "",
    **fixed: Any,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` as ``name`` (default: the function's name).

    ``fixed`` options are applied on every build and may not be overridden, which is how an
    alias such as ``vgg38`` (``vgg`` with ``depth=38``) is declared.
    """

    def decorator(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        params = inspect.signature(builder).parameters
        for required in ("num_classes", "in_chans"):
            if required not in params:
                raise TypeError(f"builder for {key!r} must accept {required!r}")
        unknown = sorted(set(fixed) - set(params))
        if unknown:
            raise TypeError(f"{key!r} fixes options its builder does not take: {unknown}")
        _REGISTRY[key] = ModelInfo(
            name=key,
            builder=builder,
            family=family,
            input_size=input_size,
            num_classes=num_classes,
            fixed=dict(fixed),
            description=description or (inspect.getdoc(builder) or "").split("\n")[0],
        )
        return builder

    return decorator


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (and ``family``), sorted."""
    return sorted(
        name
        for name, info in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (family is None or info.family == family)
    )


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; ``ValueError`` naming the closest names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(list_models())}"
        raise ValueError(
            f"unknown model {name!r}; {hint} (see gradtrace.models.list_models())"
        ) from None


def create_model(
    name: str, num_classes: int | None = None, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"vgg38"`` or ``"resnet56"``.
        num_classes: size of the classifier output; ``None`` uses the model's default.
        in_chans: number of input image channels.
        **kwargs: the model's options (see ``model_info(name).options``).

    Raises:
        ValueError: unknown name, unknown option, an option the alias fixes, or a bad value.
    """
    info = model_info(name)
    options = info.options
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        fixed = {k: info.fixed[k] for k in unknown if k in info.fixed}
        if fixed:
            raise ValueError(
                f"{name!r} fixes {fixed}; build the family's base model to change it "
                f"(valid options for {name!r}: {', '.join(options) or 'none'})"
            )
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; "
            f"valid options: {', '.join(options) or 'none'}"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return info.builder(
        num_classes=info.num_classes if num_classes is None else num_classes,
        in_chans=in_chans,
        **info.fixed,
        **kwargs,
    )
