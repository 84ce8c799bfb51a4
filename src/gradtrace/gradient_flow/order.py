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

from gradtrace.gradient_flow.eager_hooks import EagerHooks, can_force_eager, contains_compiled

__all__ = [
    "ForwardProbe",
    "LayerOrder",
    "data_flow_order",
    "primary_output",
    "reachable_parameters",
]


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
        self._hooks = EagerHooks()
        if not can_force_eager() and contains_compiled(root):
            # Old torch: hooks would be compiled into the graph and fire forever after.
            return
        for mod in root.modules():
            if any(p is not None for p in mod._parameters.values()):
                self._hooks.add(mod.register_forward_pre_hook(self._record))
        outer = [root, *(c for c in root.children() if any(True for _ in c.parameters()))]
        for mod in outer:
            self._hooks.add(mod.register_forward_pre_hook(self._enter))
            self._hooks.add(mod.register_forward_hook(self._leave))

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
        self._hooks.close()


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


class LayerOrder:
    """The layer order and main path of one model, found on its first training batch and
    kept across a resumed fit (:meth:`state_dict`)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.main_path: set[str] = set()
        self.final = False
        """Whether the watched batch is over (the order no longer changes this fit)."""
        self._rank: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._probe: ForwardProbe | None = None

    def start(self, names: dict[int, str], keep: bool) -> None:
        """A fit begins: ``names`` maps ``id(parameter)`` to its name; ``keep`` keeps what an
        earlier (resumed) fit found until the first batch is watched again."""
        self.close()
        self._names = names
        self.final = False
        if not keep:
            self.main_path = set()
            self._set([])
        if not self.order:
            self._set(list(names.values()))  # registration order until a batch is watched

    def watch(self, root: nn.Module) -> None:
        """Before a training batch: watch its forward pass if the order is not final yet."""
        if not self.final and self._probe is None:
            self._probe = ForwardProbe(root)

    def update(self, final: bool) -> None:
        """Take what the watched forward pass showed; ``final`` at the end of the batch."""
        probe = self._probe
        if probe is None:
            return
        if final:
            self.close()
            self.final = True
            if not probe.called and self._names:
                import warnings

                from gradtrace.gradient_flow.diagnosis import GradientFlowWarning

                warnings.warn(
                    "GradientFlow could not see the forward pass (no module was called through "
                    "its hooks, e.g. compiled code on torch < 2.6), so layers are in "
                    "registration order, not data-flow order",
                    GradientFlowWarning,
                    stacklevel=3,
                )
        if probe.called:
            self._set(data_flow_order(probe.called, self._names))
        self.main_path = {name for i, name in self._names.items() if i in probe.main_path}

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def rank_of(self, name: str) -> tuple[int, str]:
        """Sort key: position in the order (unknown names last, by name)."""
        return (self._rank.get(name, len(self._rank)), name)

    def _set(self, order: list[str]) -> None:
        self.order = order
        self._rank = {name: i for i, name in enumerate(order)}

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "main_path": sorted(self.main_path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(list(state["order"]))
        self.main_path = set(state["main_path"])
