"""Layer order (data flow, input first) and the main path (what leads to the model's output).

Both are found on one training batch: forward pre-hooks record the order in which modules
owning parameters are first called; forward hooks on the LightningModule and its direct
children catch the outermost calls' primary outputs (the first tensor of a tuple/list/dict
output, e.g. GoogLeNet's main logits in ``AuxLogits``), and the parameters reachable through
autograd from those outputs are the main path. Auxiliary heads feed only the loss, never an
outermost output, so they are off the main path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ForwardProbe", "data_flow_order", "primary_output", "reachable_parameters"]


def primary_output(output: Any) -> torch.Tensor | None:
    """The first tensor of ``output`` (depth first through tuples, lists and dict values)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = primary_output(item)
            if found is not None:
                return found
    return None


def reachable_parameters(output: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``output``'s autograd graph accumulates a gradient in."""
    found: set[int] = set()
    if output.grad_fn is None:
        return found
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _contains_compiled(root: nn.Module) -> bool:
    return any(
        "_orig_mod" in mod._modules or getattr(mod, "_compiled_call_impl", None) is not None
        for mod in root.modules()
    )


class ForwardProbe:
    """Watch one forward pass of ``root``: module call order and the main-path parameters.

    Hooks do not fire inside ``torch.compile``d code compiled before they existed, and hooks
    present while compiling get baked into the graph, so the watched batch runs under
    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6). Call :meth:`close` after the
    batch: it removes every hook.
    """

    def __init__(self, root: nn.Module) -> None:
        self.called: list[nn.Module] = []
        """Modules owning parameters, in the order they were first called."""
        self.main_path: set[int] = set()
        """``id`` of the parameters reachable from the outermost calls' primary outputs."""
        self._seen: set[int] = set()
        self._depth = 0
        self._handles: list[RemovableHandle] = []
        self._stance: Any = None
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            # Constructing it switches the stance; __exit__ restores the previous one.
            self._stance = set_stance("force_eager")
        elif _contains_compiled(root):
            # Old torch: hooks would be compiled into the graph and fire forever after.
            return
        for mod in root.modules():
            if any(p is not None for p in mod._parameters.values()):
                self._handles.append(mod.register_forward_pre_hook(self._record))
        outer = [root, *(c for c in root.children() if any(True for _ in c.parameters()))]
        for mod in outer:
            self._handles.append(mod.register_forward_pre_hook(self._enter))
            self._handles.append(mod.register_forward_hook(self._leave))

    def _record(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.called.append(module)

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            tensor = primary_output(output)
            if tensor is not None:
                self.main_path |= reachable_parameters(tensor)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None


def data_flow_order(called: Iterable[nn.Module], names: dict[int, str]) -> list[str]:
    """Parameter names in data-flow order: those of the ``called`` modules in call order
    (registration order within a module; a container's own parameters take its place, before
    its children), then every other name of ``names`` in registration order."""
    ordered: list[str] = []
    placed: set[str] = set()
    for mod in called:
        for param in mod._parameters.values():
            name = names.get(id(param)) if param is not None else None
            if name is not None and name not in placed:
                ordered.append(name)
                placed.add(name)
    return ordered + [name for name in names.values() if name not in placed]
