"""Temporary module hooks that fire on every call, ``torch.compile``d code included.

Hooks do not fire inside code compiled before they existed, and hooks present while compiling
get baked into the graph. So while any of gradtrace's hooks are registered (a watched batch, a
measured step), compiled code runs eagerly under ``torch.compiler.set_stance("force_eager")``
(torch >= 2.6). The stance is process-wide, so it is counted: set when the first set of hooks
appears, restored when the last one goes, in whatever order they go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradtrace.compat import is_compiled_module

__all__ = ["EagerHooks", "can_force_eager", "contains_compiled"]


def can_force_eager() -> bool:
    """Whether this torch can run compiled code eagerly on demand (``set_stance``, >= 2.6)."""
    return getattr(torch.compiler, "set_stance", None) is not None


def contains_compiled(root: nn.Module) -> bool:
    """Whether ``root`` is or holds a ``torch.compile``d module."""
    return any(is_compiled_module(mod) for mod in root.modules())


class _EagerStance:
    """``force_eager`` while at least one :class:`EagerHooks` holds hooks."""

    def __init__(self) -> None:
        self.users = 0
        self._context: Any = None

    def acquire(self) -> None:
        self.users += 1
        if self.users == 1 and can_force_eager():
            # Constructing it switches the stance; __exit__ restores the previous one.
            self._context = torch.compiler.set_stance("force_eager")

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


_STANCE = _EagerStance()


class EagerHooks:
    """A set of hook handles; while it holds any, compiled code runs eagerly."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        """Whether hooks are registered now."""
        return bool(self._handles)

    def add(self, handle: RemovableHandle) -> None:
        """Keep ``handle`` (from ``register_forward_hook`` and the like) until :meth:`close`."""
        if not self._handles:
            _STANCE.acquire()
        self._handles.append(handle)

    def close(self) -> None:
        """Remove every hook and restore the compiler stance (safe to call twice)."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _STANCE.release()
