"""Temporary module hooks that fire on every call, ``torch.compile``d code included.

Hooks do not fire inside code compiled before they existed, and hooks present while compiling
get baked into the graph. So while gradtrace's hooks are registered (one probed batch, one
measured step), compiled code runs eagerly under ``torch.compiler.set_stance("force_eager")``
(torch >= 2.6), and removing them restores the stance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["EagerHooks", "can_force_eager", "contains_compiled"]


def can_force_eager() -> bool:
    """Whether this torch can run compiled code eagerly on demand (``set_stance``, >= 2.6)."""
    return getattr(torch.compiler, "set_stance", None) is not None


def contains_compiled(root: nn.Module) -> bool:
    """Whether ``root`` is or holds a ``torch.compile``d module."""
    return any(
        "_orig_mod" in mod._modules or getattr(mod, "_compiled_call_impl", None) is not None
        for mod in root.modules()
    )


class EagerHooks:
    """A set of hook handles; while it holds any, compiled code runs eagerly."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._stance: Any = None

    @property
    def active(self) -> bool:
        """Whether hooks are registered now."""
        return bool(self._handles)

    def add(self, handle: RemovableHandle) -> None:
        """Keep ``handle`` (from ``register_forward_hook`` and the like) until :meth:`close`."""
        if self._stance is None and can_force_eager():
            # Constructing it switches the stance; __exit__ restores the previous one.
            self._stance = torch.compiler.set_stance("force_eager")
        self._handles.append(handle)

    def close(self) -> None:
        """Remove every hook and restore the compiler stance (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
