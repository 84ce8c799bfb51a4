"""Activation statistics: the forward signal and its gradient, layer by layer.

The gradient of a weight is (roughly) its input times the gradient of its output, and the
coursework report's equation 2 multiplies one factor dE/dx per layer on the way to the input.
This module watches both sides of that product on measured steps (the statistics are
defined in :mod:`~gradtrace.measure.activation_sums`).

Functions are seen through a ``torch.overrides.TorchFunctionMode`` that is active only while a
module of the model runs, on measured steps. Every layer call is kept until the step is
computed, so no call's counts are lost whichever tensors are freed in between. Under DDP every
rank adds its partial sums into one tensor that is reduced with one ``all_reduce``; ``L`` is
then the loss whose gradient DDP averages (each rank's ``|dL_r/dz|`` is divided by the world
size), so two processes give what one process with the same global batch gives. Under AMP
with a ``GradScaler`` the loss scale is divided out. An error inside a hook never reaches the
model: the collector stops counting and :meth:`ActivationCollector.compute` raises
:class:`ActivationFault` on every rank, after the same ``all_reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from gradtrace.measure.activation_catalog import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_MODULES,
    NEUTRAL_FUNCTIONS,
    PASS_THROUGH_FUNCTIONS,
    PASS_THROUGH_MODULES,
    WEIGHT_FUNCTIONS,
    module_bounds,
)
from gradtrace.measure.activation_sums import (
    LayerCall,
    N,
    add_gradient,
    add_output,
    count_activated,
    empty_row,
    layer_stats,
    reduce_table,
    sums_table,
)
from gradtrace.measure.eager_hooks import EagerHooks, can_force_eager, contains_compiled
from gradtrace.measure.order import primary_output

__all__ = [
    "ACTIVATION_STATS",
    "ActivationCollector",
    "ActivationFault",
    "ActivationsUnavailableError",
    "loss_scale",
]

ACTIVATION_STATS: tuple[str, ...] = (
    "act_mean",
    "act_std",
    "act_zero_frac",
    "act_sat_frac",
    "act_grad_mean_abs",
)
"""The per-layer activation statistics, in column order."""


class ActivationsUnavailableError(RuntimeError):
    """Activation hooks cannot see the forward pass (a compiled model on torch < 2.6)."""


class ActivationFault(RuntimeError):
    """A hook of the collector failed on some rank; nothing of the step is reported."""

    def __init__(
        self, message: str, layer: str | None = None, error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.layer = layer
        """The layer whose hook failed, where known (on the rank where it failed)."""
        self.error = error
        """The error itself (on the rank where it failed)."""


def loss_scale(precision_plugin: Any) -> float:
    """The loss scale of an enabled AMP ``GradScaler`` (Lightning's ``16-mixed``), else 1.

    Read before the scaler's ``update()``: the scale this step's backward pass used.
    """
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


class _ConsumerMode(TorchFunctionMode):
    """Sees which function takes a layer's output first (active only inside module calls)."""

    def __init__(self, collector: ActivationCollector) -> None:
        super().__init__()
        self.collector = collector

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        collector = self.collector
        if not args or collector.busy or collector.inside_module:
            return out
        if collector.waiting or (func in WEIGHT_FUNCTIONS and collector.weight_layers):
            collector.guarded(None, collector.function_called, func, args, kwargs, out)
        return out


class ActivationCollector:
    """Hooks that measure the activation statistics of chosen layers over one measured step.

    ``attach`` registers forward hooks (on the chosen layers, and on every module of the root
    to follow each layer's output to the activation that takes it) and switches
    ``torch.compile``d code to eager execution (``torch.compiler.set_stance("force_eager")``)
    so the hooks fire; every forward and backward pass until ``compute`` adds to the same sums
    (micro-batches of gradient accumulation included). ``pause``/``resume`` leave out forward
    passes that recompute activations during backward (activation checkpointing). ``detach``
    removes every hook and restores the stance; the tensor hooks on layer outputs go with their
    autograd graph. Between steps nothing is registered.

    Usage::

        collector = ActivationCollector()
        collector.attach(model, {"conv1.weight": model.conv1, "fc.weight": model.fc})
        loss = loss_fn(model(x), y)
        loss.backward()
        stats = collector.compute()  # {"conv1.weight": {"act_mean": ..., ...}, ...}
        collector.detach()
    """

    def __init__(self) -> None:
        self.waiting: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """Layer outputs (weakly) whose activation is not known yet, with their layer calls."""
        self.busy = False
        """True while the collector's own code runs (its tensor operations are not the
        model's)."""
        self.inside_module = 0
        """Depth of activation/normalization module calls (they are judged as modules)."""
        self.paused = False
        self.fault: tuple[str | None, BaseException] | None = None
        """The first error inside a hook: (layer, error)."""
        self.weight_layers: dict[int, int] = {}
        """``id`` of a layer's weight -> the layer's index, for functions that apply it."""
        self._names: list[str] = []
        self._hooks = EagerHooks()
        self._parts: list[list[Any]] = []
        self._function_parts: list[list[Any]] = []
        self._running: set[int] = set()  # layers whose own module is running
        self._calls: list[LayerCall] = []
        self._mode = _ConsumerMode(self)
        self._mode_active = False
        self._depth = 0

    @property
    def attached(self) -> bool:
        """Whether hooks are registered now."""
        return self._hooks.active

    def attach(
        self,
        root: nn.Module,
        layers: Mapping[str, nn.Module],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Register the hooks on ``layers`` (``{name: module whose output is the layer's}``)
        and on the modules of ``root``.

        ``weights`` (``{name: the layer's weight}``, names of ``layers`` or others) adds the
        outputs of functions that apply a weight (``F.linear``, convolutions, ``F.embedding``,
        ``matmul``) outside its own module: they are a layer's outputs when its module never
        runs in the step (torchvision's Swin applies its ``qkv`` weights with ``F.linear``).

        Raises:
            ActivationsUnavailableError: ``root`` holds ``torch.compile``d code and this torch
                (< 2.6) cannot run it eagerly, so hooks would never fire.
        """
        if self._hooks.active:
            raise RuntimeError("ActivationCollector.attach: already attached; call detach first")
        if not can_force_eager() and contains_compiled(root):
            raise ActivationsUnavailableError(
                "activation statistics need the measured step to run eagerly, which needs "
                f"torch.compiler.set_stance (torch >= 2.6; this is {torch.__version__}); "
                "train without torch.compile or switch activations off"
            )
        weights = weights or {}
        self._names = list(dict.fromkeys([*layers, *weights]))
        self._reset_counts()
        self.fault = None
        self.paused = False
        self._depth = self.inside_module = 0
        self._running = set()
        position = {name: i for i, name in enumerate(self._names)}
        self.weight_layers = {id(weight): position[name] for name, weight in weights.items()}
        index = {id(module): position[name] for name, module in layers.items()}
        try:
            for module in root.modules():
                deciding = isinstance(module, (*ACTIVATION_MODULES, *PASS_THROUGH_MODULES))
                i = index.get(id(module))
                self._hooks.add(module.register_forward_pre_hook(self._enter_hook(deciding, i)))
                if i is not None:
                    self._hooks.add(module.register_forward_hook(self._layer_hook(i)))
                leave = self._leave_hook(deciding, i)
                self._hooks.add(module.register_forward_hook(leave, always_call=True))
        except BaseException:
            self._hooks.close()  # no hook of a half-done attach stays behind
            raise

    def pause(self) -> None:
        """Stop counting forward passes until :meth:`resume` (call before ``backward``: a
        checkpointed block's recomputation is not a new forward pass)."""
        self.paused = True

    def resume(self) -> None:
        """Count forward passes again (call after ``backward``)."""
        self.paused = False

    def detach(self) -> None:
        """Remove every hook and restore the compiler stance (safe to call twice); what was
        measured stays for ``compute``."""
        self._depth = 0
        self._leave_mode()  # a forward pass that raised before its outermost call ended
        self._hooks.close()

    def compute(
        self, *, grad_scale: float = 1.0, process_group: Any = None
    ) -> dict[str, dict[str, float]]:
        """The statistics of every layer called since ``attach``, reduced over DDP ranks.

        Every rank of ``process_group`` (default: the default group, when torch.distributed is
        initialized) must call it: the partial sums of all layers are summed with one
        ``all_reduce``. ``grad_scale``: the AMP loss scale to divide out of ``dL/dz``.
        Returns ``{layer: {stat: value}}`` in the order of ``layers``; ``act_sat_frac`` only
        for layers followed by a saturating activation, ``act_grad_mean_abs`` only for outputs
        that took part in a backward pass; layers never called are left out.

        Raises:
            ActivationFault: a hook failed on this or another rank since ``attach``.
        """
        if self.fault is None:
            self.guarded(None, self._resolve_all)
        table = sums_table([*self._parts, *self._function_parts], failed=self.fault is not None)
        rows, world = reduce_table(table, process_group)
        self._reset_counts()
        faults = rows.pop()[0]
        if self.fault is not None:
            layer, err = self.fault
            where = f" at layer {layer!r}" if layer else ""
            raise ActivationFault(f"{type(err).__name__}{where}: {err}", layer, err) from err
        if faults:
            raise ActivationFault(f"a hook failed on {int(faults)} other rank(s)")
        modules, functions = rows[: len(self._names)], rows[len(self._names) :]
        # A layer's module outputs when it ran (every rank agrees after the reduction), else
        # the outputs of functions that applied its weight.
        rows = [own if own[N] else used for own, used in zip(modules, functions)]
        out: dict[str, dict[str, float]] = {}
        for name, row in zip(self._names, rows):
            stats = layer_stats(row, world, grad_scale)
            if stats is not None:
                out[name] = stats
        return out

    # ------------------------------------------------------------------ bookkeeping

    def _reset_counts(self) -> None:
        self._parts = [empty_row() for _ in self._names]
        self._function_parts = [empty_row() for _ in self._names]
        self._calls = []
        self.waiting = WeakIdKeyDictionary()

    def guarded(self, layer: str | None, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` as the collector's own code; an error stops all counting (the
        model's forward and backward passes go on)."""
        if self.fault is not None:
            return
        self.busy = True
        try:
            fn(*args)
        except Exception as err:
            self.fault = (layer, err)
        finally:
            self.busy = False

    # ------------------------------------------------------------------ hooks

    def _enter_hook(self, deciding: bool, layer: int | None) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._depth += 1
            if deciding:
                self.inside_module += 1
            if layer is not None:
                self._running.add(layer)
            if self._depth == 1:
                self.guarded(None, self._enter_mode)

        return hook

    def _leave_hook(self, deciding: bool, layer: int | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if layer is not None:
                self._running.discard(layer)
            if deciding:
                self.inside_module -= 1
                if self.waiting and not self.paused:
                    self.guarded(None, self._module_called, module, args, output)
            self._depth -= 1
            if self._depth == 0:
                self._leave_mode()

        return hook

    def _enter_mode(self) -> None:
        self._mode.__enter__()
        self._mode_active = True

    def _leave_mode(self) -> None:
        """Leave the function mode entered by the outermost module call (errors included)."""
        if not self._mode_active:
            return
        self._mode_active = False
        try:
            self._mode.__exit__(None, None, None)
        except Exception as err:
            if self.fault is None:
                self.fault = (None, err)

    def _layer_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.paused:
                self.guarded(self._names[i], self._layer_called, i, output)

        return hook

    def _layer_called(self, i: int, output: Any, part: list[Any] | None = None) -> None:
        """Layer ``i`` produced ``output``: add it to ``part`` (its module outputs' sums)."""
        output = primary_output(output)
        if output is None or not output.is_floating_point():
            return
        part = self._parts[i] if part is None else part
        call = add_output(part, output.detach())
        if output.requires_grad:
            output.register_hook(self._grad_hook(i, part))
        self._calls.append(call)
        self.waiting[output] = [*self.waiting.get(output, []), call]

    def _grad_hook(self, i: int, part: list[Any]) -> Any:
        def hook(grad: torch.Tensor) -> None:
            self.guarded(self._names[i], self._grad_arrived, part, grad)

        return hook

    def _grad_arrived(self, part: list[Any], grad: torch.Tensor) -> None:
        """``dL/dz`` of a layer output arrived: add it to ``part``."""
        add_gradient(part, grad)

    def _module_called(self, module: nn.Module, args: Any, output: Any) -> None:
        """An activation, normalization or Identity module ran on a waiting layer output."""
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        calls = self.waiting.pop(source, None) if source is not None else None
        if not calls or not isinstance(output, torch.Tensor):
            return
        if isinstance(module, PASS_THROUGH_MODULES):
            self.waiting[output] = [*self.waiting.get(output, []), *calls]
        else:
            count_activated(calls, output.detach(), module_bounds(module))

    def function_called(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """A torch function ran inside a module call: it may take a waiting layer output
        first, and it may apply a layer's weight outside that layer's module."""
        if not isinstance(out, torch.Tensor) or getattr(func, "__name__", "") == "__get__":
            return  # .shape, .size(), .dim(): a look, not a use
        source = args[0]
        calls = None
        if isinstance(source, torch.Tensor) and func not in NEUTRAL_FUNCTIONS and self.waiting:
            calls = self.waiting.pop(source, None)
        if calls:
            bounds_of = ACTIVATION_FUNCTIONS.get(func)
            if bounds_of is not None:
                count_activated(calls, out.detach(), bounds_of(args, kwargs))
            elif func in PASS_THROUGH_FUNCTIONS:
                self.waiting[out] = [*self.waiting.get(out, []), *calls]
            else:
                count_activated(calls)
        if func in WEIGHT_FUNCTIONS and self.weight_layers and not self.paused:
            for value in (*args, *kwargs.values()):
                i = self.weight_layers.get(id(value)) if isinstance(value, torch.Tensor) else None
                if i is not None and i not in self._running:
                    self._layer_called(i, out, self._function_parts[i])
                    return

    def _resolve_all(self) -> None:
        """Layer calls no activation decided: count the zeros of their own output."""
        count_activated([call for call in self._calls if not call.resolved])
        self.waiting = WeakIdKeyDictionary()
