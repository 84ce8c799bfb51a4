"""Layer order (data flow, input first) and the main path (what leads to the model's output).

A parameter's place is where its gradient enters the backward pass: the longest chain of
autograd nodes from the loss to the node that accumulates its gradient. The layer farthest
from the loss is the input end, the nearest the output end, wherever the parameter is used:
inside a module, through ``F.linear`` (``nn.MultiheadAttention``'s output projection), as a
bare parameter (a temperature dividing the logits is nearest the loss), tied (an embedding
reused as the output head sits where the data enters), in a branch that only some batches
take, or across several losses (a GAN's generator lies farther from its loss than the
critic).

Both are found on *watched* batches: the first training batch of a fit, and the batch after
a measured step at which a parameter without a place had a gradient. While a batch is
watched, forward pre-hooks record the order in which modules owning parameters are first
called and the tensors autograd sees in place of a parameter (FSDP's unsharded copies and
views), and forward hooks on the outermost calls catch the model's primary output (the first
tensor it returns, e.g. GoogLeNet's main logits in ``AuxLogits``); the parameters reachable
through autograd from it are the main path, so auxiliary heads are never the output end. Each
loss of the batch is walked once, in ``on_before_backward``. Parameters that autograd cannot
reach (reentrant activation checkpointing, FSDP1's flat parameters) keep their place in call
order, next to the layers they were called after.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradtrace.measure.diagnosis import GradientFlowWarning
from gradtrace.measure.eager_hooks import EagerHooks, can_force_eager, contains_compiled
from gradtrace.measure.selection import select_layers

__all__ = [
    "ForwardProbe",
    "LayerOrder",
    "backward_depths",
    "primary_output",
]

# Times a parameter that has a gradient but no place may ask for another watched batch (a
# branch taken rarely, or one autograd never reaches).
_REWATCH_LIMIT = 3


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


def backward_depths(output: torch.Tensor) -> dict[Any, int]:
    """Every autograd node behind ``output``, with the length of the longest chain of nodes
    from ``output``'s own node to it (0 for that node). Empty when ``output`` has no graph."""
    root = output.grad_fn
    if root is None:
        return {}
    # Reverse post-order of a depth-first walk is a topological order (iterative: graphs of
    # deep networks outgrow Python's recursion limit).
    post: list[Any] = []
    seen = {root}
    stack = [(root, iter(root.next_functions))]
    while stack:
        node, children = stack[-1]
        for child, _ in children:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, iter(child.next_functions)))
                break
        else:
            stack.pop()
            post.append(node)
    depth = {root: 0}
    for node in reversed(post):
        below = depth[node] + 1
        for child, _ in node.next_functions:
            if child is not None and depth.get(child, -1) < below:
                depth[child] = below
    return depth


class ForwardProbe:
    """Watch the forward passes of one batch of ``root``: module call order, the tensors that
    stand in for parameters, and the main path.

    Hooks do not fire inside ``torch.compile``d code compiled before they existed, and hooks
    present while compiling get baked into the graph, so the watched batch runs under
    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6). Call :meth:`close` after the
    batch: it removes every hook. An error inside a hook never reaches the model: the probe
    stops watching and keeps the error in :attr:`error`.
    """

    def __init__(self, root: nn.Module, names: Mapping[int, str]) -> None:
        self.called: list[nn.Module] = []
        """Modules owning parameters, in the order they were first called."""
        self.main_path: set[str] = set()
        """Names of the parameters reachable from the outermost calls' primary outputs."""
        self.stand_ins: dict[Any, str] = {}
        """``id`` of a leaf tensor, or the autograd node of a non-leaf one, that a module used
        in place of its registered parameter (FSDP), mapped to the parameter's name."""
        self.error: BaseException | None = None
        """The first error inside one of the probe's hooks."""
        self._names = names
        self._owned: dict[int, list[tuple[str, str]]] = {}  # module -> (attribute, name)
        self._kept: list[torch.Tensor] = []  # stand-ins stay alive while their ids are keys
        self._seen: set[int] = set()
        self._depth = 0
        self._hooks = EagerHooks()
        if not can_force_eager() and contains_compiled(root):
            # Old torch: hooks would be compiled into the graph and fire forever after.
            return
        owned = self._owned
        for layer in select_layers(root, include=["*"]):
            attribute = layer.name.rsplit(".", 1)[-1]
            owned.setdefault(id(layer.module), []).append((attribute, layer.name))
        outer = [root, *(c for c in root.children() if any(True for _ in c.parameters()))]
        try:
            for mod in root.modules():
                if id(mod) in owned:
                    self._hooks.add(mod.register_forward_pre_hook(self._record))
            for mod in outer:
                self._hooks.add(mod.register_forward_pre_hook(self._enter))
                self._hooks.add(mod.register_forward_hook(self._leave, always_call=True))
        except BaseException:
            self._hooks.close()  # no hook of a half-done probe stays behind
            raise

    def _guarded(self, fn: Any, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except Exception as err:
            self.error = err

    def _record(self, module: nn.Module, args: Any) -> None:
        self._guarded(self._called, module)

    def _called(self, module: nn.Module) -> None:
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.called.append(module)
        for attribute, name in self._owned[id(module)]:
            tensor = getattr(module, attribute, None)
            if not isinstance(tensor, torch.Tensor) or id(tensor) in self._names:
                continue
            if tensor.grad_fn is not None:
                self.stand_ins[tensor.grad_fn] = name
            else:
                self.stand_ins[id(tensor)] = name
                self._kept.append(tensor)

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._guarded(self._outer_output, output)

    def _outer_output(self, output: Any) -> None:
        tensor = primary_output(output)
        if tensor is not None:
            self.main_path |= set(self.parameter_depths(backward_depths(tensor)))

    def parameter_depths(self, depths: Mapping[Any, int]) -> dict[str, int]:
        """``{parameter name: depth}`` for the nodes of :func:`backward_depths` where a
        parameter's gradient enters: its ``AccumulateGrad`` node, or a stand-in's node."""
        found: dict[str, int] = {}
        for node, depth in depths.items():
            variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
            if variable is not None:
                key: Any = id(variable)
                name = self._names.get(key) or self.stand_ins.get(key)
            else:
                name = self.stand_ins.get(node)
            if name is not None and found.get(name, -1) < depth:
                found[name] = depth
        return found

    def call_order(self) -> list[str]:
        """Parameter names in call order: those of the called modules in the order they were
        first called (registration order within a module; a container's own parameters take
        its place, before its children), then every other name in registration order."""
        called = [name for mod in self.called for _, name in self._owned[id(mod)]]
        ordered = list(dict.fromkeys(called))
        placed = set(ordered)
        return ordered + [name for name in self._names.values() if name not in placed]

    def close(self) -> None:
        self._hooks.close()
        self._kept = []


def _merge(depths: Mapping[str, int], sequence: list[str]) -> list[str]:
    """The names of ``sequence`` (call order) with those in ``depths`` sorted farthest from the
    loss first (ties in ``sequence`` order); each other name follows the one it comes after
    in ``sequence``."""
    position = {name: i for i, name in enumerate(sequence)}
    placed = sorted(depths, key=lambda name: (-depths[name], position.get(name, len(position))))
    followers: dict[str | None, list[str]] = {}
    anchor: str | None = None
    for name in sequence:
        if name in depths:
            anchor = name
        else:
            followers.setdefault(anchor, []).append(name)
    ordered = list(followers.get(None, []))
    for name in placed:
        ordered.append(name)
        ordered += followers.get(name, [])
    return ordered


class LayerOrder:
    """The layer order and main path of one model, found on watched batches and kept across a
    resumed fit (:meth:`state_dict`)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.main_path: set[str] = set()
        self.depths: dict[str, int] = {}
        """Longest distance (in autograd nodes) from a loss to where each parameter's gradient
        enters, the largest over the watched batches' losses."""
        self.version = 0
        """Changes whenever :attr:`order` or :attr:`main_path` may have changed."""
        self._sequence: list[str] = []
        self._rank: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._probe: ForwardProbe | None = None
        self._watch_next = True
        self._rewatches: dict[str, int] = {}
        self._warned_blind = False

    @property
    def watching(self) -> bool:
        """Whether the current batch is watched."""
        return self._probe is not None

    def start(self, names: dict[int, str], keep: bool) -> None:
        """A fit begins: ``names`` maps ``id(parameter)`` to its name; ``keep`` keeps what an
        earlier (resumed) fit found until the first batch is watched again."""
        self.close()
        self._names = names
        self._watch_next = True
        self._rewatches = {}
        self._warned_blind = False
        if not keep:
            self.main_path = set()
            self.depths = {}
            self._set([])
        self._sequence = list(names.values())  # registration order until a batch is watched
        if not self.order:
            self._set(list(self._sequence))

    def watch(self, root: nn.Module) -> None:
        """Before a training batch: watch it if it is the first of the fit or was asked for."""
        if self._watch_next and self._probe is None:
            self._watch_next = False
            self._probe = ForwardProbe(root, self._names)

    def backward(self, loss: torch.Tensor) -> None:
        """A watched batch's loss, before its backward pass: place the parameters behind it."""
        if self._probe is None or not isinstance(loss, torch.Tensor):
            return
        for name, depth in self._probe.parameter_depths(backward_depths(loss)).items():
            if self.depths.get(name, -1) < depth:
                self.depths[name] = depth
        self.update()

    def update(self) -> None:
        """Take what the watched batch showed so far.

        Raises:
            Exception: what failed inside the probe's hooks (the probe is closed).
        """
        probe = self._probe
        if probe is None:
            return
        if probe.error is not None:
            self.close()
            raise probe.error
        if probe.called:
            self._sequence = probe.call_order()
        self.main_path |= probe.main_path
        self._set(_merge(self.depths, self._sequence))

    def end_watch(self) -> None:
        """After a watched batch: final order for now; hooks removed."""
        probe = self._probe
        if probe is None:
            return
        self.update()
        self.close()
        # Compiled code on torch < 2.6: no module call seen, and autograd shows one compiled
        # node for all parameters (no order among them).
        blind = not probe.called and len(set(self.depths.values())) <= 1 < len(self._names)
        if blind and not self._warned_blind:
            self._warned_blind = True
            warnings.warn(
                "GradientFlow could not see the forward pass (no module was called through "
                "its hooks, e.g. compiled code on torch < 2.6), so layers are in "
                "registration order where autograd does not tell their place",
                GradientFlowWarning,
                stacklevel=3,
            )

    def note_gradients(self, names: Iterable[str]) -> None:
        """At a measured step, ``names`` had gradients: any without a place yet asks for the
        next batch to be watched (a few times at most per parameter)."""
        for name in names:
            if name in self.depths:
                continue
            tries = self._rewatches.get(name, 0)
            if tries < _REWATCH_LIMIT:
                self._rewatches[name] = tries + 1
                self._watch_next = True

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
        self.version += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": list(self.order),
            "main_path": sorted(self.main_path),
            "depths": dict(self.depths),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(list(state["order"]))
        self.main_path = set(state["main_path"])
        self.depths = dict(state.get("depths", {}))  # absent in checkpoints of gradtrace 0.1
