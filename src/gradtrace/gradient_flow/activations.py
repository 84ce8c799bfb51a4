"""Activation statistics: the forward signal and its gradient, layer by layer.

The gradient of a weight is (roughly) its input times the gradient of its output, and the
coursework report's equation 2 multiplies one factor dE/dx per layer on the way to the input.
This module measures both sides of that product on measured steps:

* the layer's **output** ``z`` (the module's return value, before any activation):
  ``act_mean`` and ``act_std`` (Bessel-corrected, as ``torch.std``) over every element of the
  batch, and ``act_grad_mean_abs``, the mean of ``|dL/dz|`` (read with ``Tensor.register_hook``
  on ``z``: no full backward hooks);
* the **layer's activation output** ``a = f(z)``: the output of the activation module that
  takes ``z`` itself as its input, possibly through normalization layers and ``Identity``
  (``Conv -> BatchNorm -> ReLU`` gives the ReLU; tensors are followed by identity, so branches
  and shortcuts called in between do not matter). ``act_zero_frac`` is the fraction of exact
  zeros of ``a`` (dead ReLU units), or of ``z`` when no activation module takes it (a final
  classifier, or ``relu(z + shortcut)`` in a residual block, whose input is a new tensor);
  ``act_sat_frac`` is the fraction of ``a`` within 1% (of the output range) of the bounds of a
  saturating activation (``Sigmoid``, ``Tanh``, ``Hardtanh`` and its subclass ``ReLU6``),
  absent after any other.

Activations applied as functions (``F.relu`` inside ``forward``) are invisible to module hooks;
the zoo's models use modules. Under DDP every rank adds its partial sums into one tensor that is
reduced with one ``all_reduce``; ``L`` is then the loss whose gradient DDP averages (each rank's
``|dL_r/dz|`` is divided by the world size), so two processes give what one process with the
same global batch gives. Under AMP with a ``GradScaler`` the loss scale is divided out.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.gradient_flow.eager_hooks import EagerHooks, can_force_eager, contains_compiled

__all__ = [
    "ACTIVATION_STATS",
    "ActivationCollector",
    "ActivationsUnavailableError",
    "layer_modules",
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

SATURATION_TOLERANCE = 0.01
"""An output within this fraction of the activation's range from a bound counts as saturated."""

_ACTIVATIONS = (
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
# Skipped when looking for a layer's activation: they rescale, they do not decide.
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_PASS_THROUGH = (*_NORMS, nn.Identity)

# A layer call waiting for its activation: (layer index, zeros of its own output, its size).
_Waiting = tuple[int, torch.Tensor, int]

# Columns of the partial-sum table, one row per layer.
_N, _SUM, _SUMSQ, _ZEROS, _N_ZERO, _SAT, _N_SAT, _GRAD, _N_GRAD = range(9)


class ActivationsUnavailableError(RuntimeError):
    """Activation hooks cannot see the forward pass (a compiled model on torch < 2.6)."""


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output bounds of a saturating activation, else ``None``."""
    if isinstance(module, nn.Sigmoid):
        return 0.0, 1.0
    if isinstance(module, nn.Tanh):
        return -1.0, 1.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


def layer_modules(layers: Iterable[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """``{name: module}`` with each module once, under the first name given for it.

    ``layers`` are (parameter name, owning module) pairs in the gradient side's selection; a
    module's output belongs to its first selected parameter (a layer's ``weight`` comes before
    its ``bias``), so activation columns land on the ``weight`` rows.
    """
    named: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in layers:
        if id(module) not in seen:
            seen.add(id(module))
            named[name] = module
    return named


def loss_scale(precision_plugin: Any) -> float:
    """The loss scale of an enabled AMP ``GradScaler`` (Lightning's ``16-mixed``), else 1.

    Read before the scaler's ``update()``: the scale this step's backward pass used.
    """
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


class ActivationCollector:
    """Hooks that measure the activation statistics of chosen layers over one measured step.

    ``attach`` registers forward hooks (on the chosen layers and on every leaf module, to find
    the activation that takes each layer's output) and switches ``torch.compile``d code to
    eager execution (``torch.compiler.set_stance("force_eager")``) so the hooks fire; every
    forward and backward pass until ``compute`` adds to the same sums (micro-batches of
    gradient accumulation included). ``detach`` removes every hook and restores the stance;
    the tensor hooks on layer outputs go with their autograd graph. Between steps nothing is
    registered.

    Usage::

        collector = ActivationCollector()
        collector.attach(model, {"conv1.weight": model.conv1, "fc.weight": model.fc})
        loss = loss_fn(model(x), y)
        loss.backward()
        stats = collector.compute()  # {"conv1.weight": {"act_mean": ..., ...}, ...}
        collector.detach()
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._hooks = EagerHooks()
        self._parts: list[list[Any]] = []
        # id(tensor) -> (the tensor, weakly; layer calls whose activation would consume it)
        self._pending: dict[int, tuple[weakref.ref, list[_Waiting]]] = {}

    @property
    def attached(self) -> bool:
        """Whether hooks are registered now."""
        return self._hooks.active

    def attach(self, root: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        """Register the hooks on ``layers`` (``{name: module}``) and the leaf modules of ``root``.

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
        self._names = list(layers)
        self._parts = [[0, None, None, None, 0, None, 0, None, 0] for _ in self._names]
        self._pending = {}
        index = {id(module): i for i, module in enumerate(layers.values())}
        for module in root.modules():
            i = index.get(id(module))
            if i is not None:
                self._hooks.add(module.register_forward_hook(self._layer_hook(i)))
            elif not module._modules:
                self._hooks.add(module.register_forward_hook(self._leaf_hook))

    def detach(self) -> None:
        """Remove every hook and restore the compiler stance (safe to call twice); what was
        measured stays for ``compute``."""
        self._resolve_pending()
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
        """
        self._resolve_pending()
        if not self._names:
            return {}
        counts = torch.zeros(len(self._parts), len(self._parts[0]), dtype=torch.float64)
        slots: list[int] = []
        sums: list[torch.Tensor] = []
        for r, part in enumerate(self._parts):
            for c, value in enumerate(part):
                if isinstance(value, torch.Tensor):
                    slots.append(r * counts.shape[1] + c)
                    sums.append(value)
                elif value:
                    counts[r, c] = value
        device = sums[0].device if sums else torch.device("cpu")
        table = counts.to(device)
        if sums:  # the device-side sums, placed with one stack and one scatter
            stacked = torch.stack([t.to(device, torch.float64) for t in sums])
            table.view(-1)[torch.tensor(slots, device=device)] = stacked
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(process_group)
            if world > 1:
                if dist.get_backend(process_group) == "nccl" and table.device.type == "cpu":
                    table = table.cuda()
                dist.all_reduce(table, group=process_group)
        rows = table.cpu().tolist()  # one device-to-host copy
        self._parts = [[0, None, None, None, 0, None, 0, None, 0] for _ in self._names]
        out: dict[str, dict[str, float]] = {}
        for name, row in zip(self._names, rows):
            n = row[_N]
            if not n:
                continue
            variance = (row[_SUMSQ] - row[_SUM] ** 2 / n) / (n - 1) if n > 1 else math.nan
            stats = {
                "act_mean": row[_SUM] / n,
                "act_std": math.sqrt(max(variance, 0.0)) if n > 1 else math.nan,
                "act_zero_frac": row[_ZEROS] / row[_N_ZERO],
            }
            if row[_N_SAT]:
                stats["act_sat_frac"] = row[_SAT] / row[_N_SAT]
            if row[_N_GRAD]:
                stats["act_grad_mean_abs"] = row[_GRAD] / row[_N_GRAD] / world / grad_scale
            out[name] = stats
        return out

    # ------------------------------------------------------------------ hooks

    def _layer_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # This call may consume another layer's output (e.g. a selected BatchNorm).
            carried = self._next_module(module, args, output)
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            z = output.detach()
            part = self._parts[i]
            part[_N] += z.numel()
            total = torch.sum(z, dtype=torch.float64)
            squares = torch.linalg.vector_norm(z, 2, dtype=torch.float64).square()
            part[_SUM] = total if part[_SUM] is None else part[_SUM] + total
            part[_SUMSQ] = squares if part[_SUMSQ] is None else part[_SUMSQ] + squares
            if output.requires_grad:
                output.register_hook(self._grad_hook(i))
            # Zeros of z itself count unless an activation consumes z.
            own = (i, (z == 0).sum(), z.numel())
            self._pending[id(output)] = (weakref.ref(output), [*carried, own])

        return hook

    def _leaf_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._next_module(module, args, output)  # a forward hook must return None

    def _grad_hook(self, i: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            part = self._parts[i]
            part[_N_GRAD] += grad.numel()
            total = torch.linalg.vector_norm(grad.detach(), 1, dtype=torch.float64)
            part[_GRAD] = total if part[_GRAD] is None else part[_GRAD] + total

        return hook

    def _next_module(self, module: nn.Module, args: Any, output: Any) -> list[_Waiting]:
        """A hooked module was called: if its input is a pending layer output, it decides
        that layer's activation. Returns what a pass-through module carries to its output."""
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        entry = self._pending.pop(id(source), None) if source is not None else None
        if entry is None or entry[0]() is not source:
            if entry is not None:  # an id reused by another tensor: the old one is gone
                self._resolve(entry[1])
            return []
        waiting = entry[1]
        if isinstance(module, _PASS_THROUGH) and isinstance(output, torch.Tensor):
            return self._carry(waiting, output)
        if isinstance(module, _ACTIVATIONS) and isinstance(output, torch.Tensor):
            self._resolve(waiting, output.detach(), _bounds(module))
        else:
            self._resolve(waiting)
        return []

    def _carry(self, waiting: list[_Waiting], output: torch.Tensor) -> list[_Waiting]:
        """Conv -> BatchNorm -> activation: the norm's output stands for the layer's."""
        self._pending[id(output)] = (weakref.ref(output), waiting)
        return waiting

    def _resolve_pending(self) -> None:
        """Layers whose output no activation consumed: count the zeros of their own output."""
        pending, self._pending = self._pending, {}
        for _, waiting in pending.values():
            self._resolve(waiting)

    def _resolve(
        self,
        waiting: list[_Waiting],
        activated: torch.Tensor | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        """Add zero (and saturation) counts for waiting layers: of ``activated`` when an
        activation consumed their output, else each layer's own count."""
        if activated is not None:
            zeros = (activated == 0).sum()
            if bounds is not None:
                low, high = bounds
                margin = SATURATION_TOLERANCE * (high - low)
                saturated = ((activated <= low + margin) | (activated >= high - margin)).sum()
        for i, own_zeros, own_count in waiting:
            part = self._parts[i]
            count, total = (
                (own_zeros, own_count) if activated is None else (zeros, activated.numel())
            )
            part[_ZEROS] = count if part[_ZEROS] is None else part[_ZEROS] + count
            part[_N_ZERO] += total
            if activated is not None and bounds is not None:
                part[_SAT] = saturated if part[_SAT] is None else part[_SAT] + saturated
                part[_N_SAT] += activated.numel()
