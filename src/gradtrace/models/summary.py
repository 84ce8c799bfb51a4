"""Per-layer cost table: output shape, activation memory, parameters and MACs.

``summarize(model, input_size)`` runs one forward pass (eval mode, no grad) on zeros and
returns a :class:`CostTable`, the kind of table the lecture notes "Lecture 8: CNN
Architectures I" draw for AlexNet and GoogLeNet.

What is a row
    Every call of a leaf module that has parameters, does counted arithmetic, or is a pooling
    or normalisation layer (conv, linear, BN/LayerNorm/LRN, max/avg/adaptive pools, patch
    embeddings...). Element-wise layers (activations, dropout), identities and reshapes are
    not rows: their outputs are the size of their inputs and the lecture's tables fold them
    into the layer before. A non-leaf module gets a row of its own (kind ``"<Class> (own)"``)
    only if it holds parameters directly (ViT's class token and position embedding) or runs
    counted arithmetic outside its children (the attention matmuls of timm's ``Attention``).
    So every parameter that takes part in the forward pass is in exactly one row, and the
    rows' MACs add up to the whole pass. Modules that do not run (GoogLeNet's auxiliary
    heads in eval mode) have no row; their parameters are reported as ``params_not_run``.

Columns
    * ``output_shape``: of one sample (without the batch dimension); ``()`` for own rows.
    * ``memory_kb``: fp32 size of the row's output tensors for the whole batch, whatever
      dtype the model runs in (4 bytes x elements / 1024); 0 for own rows.
    * ``params``: parameters held by the module (each shared module counted once).
    * ``macs``: multiply-accumulates for the whole batch. Convolutions, matmuls and attention
      come from :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2).
      FlopCounterMode does not count pooling, so we register formulas for the 2-D pooling ops
      (``max_pool2d``, ``avg_pool2d``, their adaptive forms, and ``mean`` over dimensions,
      which is global average pooling): output elements x window area, the lecture's count,
      at 2 FLOPs per window element so that MACs = FLOPs / 2 holds for them too. 1-D and
      3-D pooling layers are rows with 0 MACs. Normalisation
      and element-wise arithmetic count as 0, as in the lecture's tables. FlopCounterMode
      also lacks a formula for PyTorch's fused CPU attention kernel; we add the standard one
      (``q @ k^T`` and ``scores @ v``) so that transformers count the same on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradtrace.compat import ATEN_ADAPTIVE_AVG_POOL2D, ATEN_CPU_ATTENTION, tree_leaves
from gradtrace.measure.activation_catalog import NORM_TYPES

__all__ = ["CostRow", "CostTable", "summarize"]

aten = torch.ops.aten

_POOL_TYPES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


# --- pooling formulas for FlopCounterMode (shapes in, FLOPs out) ---------------------------


def _first_shape(out_shape: Any) -> torch.Size:
    # max_pool2d_with_indices returns (values, indices); the others one tensor.
    return out_shape[0] if isinstance(out_shape[0], torch.Size) else out_shape


def _window_pool_flops(
    x_shape: Any, kernel_size: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    area = kernel_size[0] * kernel_size[-1]
    return 2 * math.prod(_first_shape(out_shape)) * area


def _bins(size_in: int, size_out: int) -> int:
    """Total length of the adaptive pooling bins along one dimension (PyTorch's bin edges)."""
    return sum(
        math.ceil((i + 1) * size_in / size_out) - (i * size_in) // size_out for i in range(size_out)
    )


def _adaptive_pool_flops(
    x_shape: Any, output_size: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    out = _first_shape(out_shape)
    lead = math.prod(out[:-2])
    return 2 * lead * _bins(x_shape[-2], out[-2]) * _bins(x_shape[-1], out[-1])


def _mean_flops(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # Every input element is added once: global average pooling.
    return 2 * math.prod(x_shape)


def _cpu_attention_flops(
    q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    # FlopCounterMode knows the CUDA attention kernels but not the fused CPU one:
    # scores = q @ k^T, then scores @ v, for every batch and head.
    *lead, s_q, d_q = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * math.prod(lead) * s_q * s_k * (d_q + d_v)


# Formulas FlopCounterMode lacks: pooling (ours, see the module docstring) and CPU attention.
_EXTRA_FORMULAS = {
    ATEN_CPU_ATTENTION: _cpu_attention_flops,
    aten.max_pool2d_with_indices: _window_pool_flops,
    aten.avg_pool2d: _window_pool_flops,
    ATEN_ADAPTIVE_AVG_POOL2D: _adaptive_pool_flops,
    aten.adaptive_max_pool2d: _adaptive_pool_flops,
    aten.mean: _mean_flops,
}


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostRow:
    """One layer of a :class:`CostTable`."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    memory_kb: float
    params: int
    macs: int


@dataclass(frozen=True)
class CostTable:
    """The rows of :func:`summarize` and their totals; ``str()`` and ``to_markdown()`` print it."""

    rows: tuple[CostRow, ...]
    input_size: tuple[int, ...]
    batch_size: int
    params_not_run: int = 0

    @property
    def total_params(self) -> int:
        """Parameters used by the forward pass (the sum of the rows)."""
        return sum(r.params for r in self.rows)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def total_memory_kb(self) -> float:
        return sum(r.memory_kb for r in self.rows)

    _HEADER = ("layer", "kind", "output", "memory (KB)", "params", "MACs (M)")

    def _cells(self) -> list[tuple[str, ...]]:
        cells = [
            (
                r.name,
                r.kind,
                "x".join(map(str, r.output_shape)) or "-",
                f"{r.memory_kb:,.1f}",
                f"{r.params:,}",
                f"{r.macs / 1e6:,.2f}",
            )
            for r in self.rows
        ]
        cells.append(
            (
                "total",
                "",
                "",
                f"{self.total_memory_kb:,.1f}",
                f"{self.total_params:,}",
                f"{self.total_macs / 1e6:,.2f}",
            )
        )
        return cells

    def _footer(self) -> str:
        shape = "x".join(map(str, self.input_size))
        text = f"input {shape}, batch {self.batch_size}; memory = fp32 outputs of the rows"
        if self.params_not_run:
            text += f"; {self.params_not_run:,} parameters in modules that did not run"
        return text

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in [self._HEADER, *cells]) for i in range(6)]

        def line(row: Sequence[str]) -> str:
            left = [row[i].ljust(widths[i]) for i in range(3)]
            right = [row[i].rjust(widths[i]) for i in range(3, 6)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(line(self._HEADER))
        body = [line(row) for row in cells[:-1]]
        return "\n".join([line(self._HEADER), rule, *body, rule, line(cells[-1]), self._footer()])

    def to_markdown(self) -> str:
        """The table as GitHub markdown, totals in bold."""
        cells = self._cells()
        lines = [
            "| " + " | ".join(self._HEADER) + " |",
            "|---|---|---|---:|---:|---:|",
            *("| " + " | ".join(row) + " |" for row in cells[:-1]),
            "| " + " | ".join(f"**{c}**" if c else "" for c in cells[-1]) + " |",
            "",
            self._footer(),
        ]
        return "\n".join(lines)


@dataclass
class _Call:
    module: nn.Module
    flops_at_start: int
    child_flops: int = 0


def summarize(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> CostTable:
    """One forward pass of ``model`` on zeros of shape ``(batch_size, *input_size)``.

    Runs in eval mode without gradients on the device (and in the floating dtype) of the
    model's parameters, then restores the model's mode. Works on the ``meta`` device too, so
    the cost of a large network can be tabulated without computing it. Pass the eager model,
    not its ``torch.compile`` wrapper: rows come from module hooks. See the module
    docstring for what the rows and columns are.

    Raises:
        ValueError: ``input_size`` is not a sequence of positive ints, or ``batch_size < 1``.
    """
    size = tuple(input_size)
    if not size or not all(isinstance(d, int) and d >= 1 for d in size):
        raise ValueError(f"input_size must be positive ints such as (3, 224, 224); got {size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    names = {m: name for name, m in model.named_modules()}

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    stack: list[_Call] = []
    rows: list[CostRow] = []
    counted: set[nn.Module] = set()

    def before(module: nn.Module, args: Any) -> None:
        stack.append(_Call(module, counter.get_total_flops()))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        call = stack.pop()
        inclusive = counter.get_total_flops() - call.flops_at_start
        if stack:
            stack[-1].child_flops += inclusive
        own_macs = (inclusive - call.child_flops) // 2
        leaf = next(module.children(), None) is None
        params = 0
        if module not in counted:
            counted.add(module)
            params = sum(p.numel() for p in module.parameters(recurse=False))
        name = names[module] or type(module).__name__
        if leaf and (params or own_macs or isinstance(module, _POOL_TYPES + NORM_TYPES)):
            tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            shape = tuple(tensors[0].shape[1:]) if tensors else ()
            memory = sum(t.numel() for t in tensors) * 4 / 1024
            rows.append(CostRow(name, type(module).__name__, shape, memory, params, own_macs))
        elif not leaf and (params or own_macs):
            rows.append(CostRow(name, f"{type(module).__name__} (own)", (), 0.0, params, own_macs))

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch_size, *size, device=device, dtype=dtype)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    not_run = sum(p.numel() for p in model.parameters()) - sum(r.params for r in rows)
    return CostTable(tuple(rows), size, batch_size, params_not_run=not_run)
