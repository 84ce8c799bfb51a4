"""The optimizer side of a step: what the optimizer did with the gradients.

Per parameter: the update's norm (``||w_after - w_before||``, the change the step made), the
weight norm before the step and their ratio, and for Adam-family optimizers the mean ``|m|``
and mean ``sqrt(v)`` of its moment estimates (``exp_avg`` and ``exp_avg_sq`` in
``optimizer.state``); for the whole optimizer, the gradient norm the step used, after any
clipping.

:meth:`OptimizerStep.start` copies the weights before the step and hooks the optimizer's
``step`` (``register_step_post_hook``: after the step, whatever ran between, such as
Lightning's gradient clipping); the hook reduces what this rank holds to partial sums on the
device. :meth:`OptimizerStep.finish` combines them over the ranks that hold each parameter's
shards (one ``all_gather`` when any is sharded: FSDP, DTensor; none for whole parameters)
and copies the table to the host once. Exact under the same strategies as
:func:`~gradtrace.measure.grad_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gradtrace.compat import foreach_copy
from gradtrace.measure.collectives import all_gather_guarded
from gradtrace.measure.shards import (
    FSDP1Groups,
    held_here,
    param_shard_ranks,
    reduce_over_ranks,
    shard_mask,
)

__all__ = [
    "ADAM_COLUMNS",
    "OPTIMIZER_COLUMNS",
    "OptimizerStep",
    "StepValues",
    "is_adam_family",
    "optimizer_columns",
]

OPTIMIZER_COLUMNS: tuple[str, ...] = ("update_norm", "weight_norm", "update_ratio")
"""Per-layer columns for every optimizer: ``||dw||``, ``||w||`` before the step, their ratio."""
ADAM_COLUMNS: tuple[str, ...] = ("m_mean_abs", "sqrt_v_mean")
"""Per-layer columns for Adam-family optimizers: mean ``|exp_avg|`` and mean
``sqrt(exp_avg_sq)`` over the tensor, after the step (NaN where the state lacks them)."""

# Partial sums per parameter, in this order; the moment columns are NaN without that state.
_UPDATE_SQ, _WEIGHT_SQ, _GRAD_SQ, _M_ABS, _SQRT_V, _COUNT = range(6)

GradScale = Callable[[], "torch.Tensor | None"]


def optimizer_columns(adam: bool) -> tuple[str, ...]:
    """The per-layer columns of the optimizer side: :data:`OPTIMIZER_COLUMNS`, then
    :data:`ADAM_COLUMNS` when ``adam``."""
    return (*OPTIMIZER_COLUMNS, *ADAM_COLUMNS) if adam else OPTIMIZER_COLUMNS


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps Adam's moment estimates (its defaults have ``betas``:
    Adam, AdamW, NAdam, RAdam, ...)."""
    return "betas" in optimizer.defaults


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard, else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@dataclass
class StepValues:
    """One optimizer step's values, on the host, for the parameters given to
    :meth:`OptimizerStep.start` in that order."""

    update_norm: list[float]
    weight_norm: list[float]
    m_mean_abs: list[float]
    sqrt_v_mean: list[float]
    grad_norm_clipped: float
    """The norm of all the given parameters' gradients as the step used them (after any
    clipping, without a loss scale)."""

    def columns(self, row: int) -> dict[str, float]:
        """Row ``row``'s per-layer values: :data:`OPTIMIZER_COLUMNS` and
        :data:`ADAM_COLUMNS`."""
        update, weight = self.update_norm[row], self.weight_norm[row]
        ratio = update / weight if weight else (math.inf if update else 0.0)
        return {
            "update_norm": update,
            "weight_norm": weight,
            "update_ratio": ratio,
            "m_mean_abs": self.m_mean_abs[row],
            "sqrt_v_mean": self.sqrt_v_mean[row],
        }


class OptimizerStep:
    """The optimizer side of one step of ``optimizer`` over ``params`` (see the module
    docstring). Build it with :meth:`start` before the step, read it with :meth:`finish`
    after; every rank must call both when any parameter is sharded."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        fsdp1_groups: FSDP1Groups | None,
        grad_scale: GradScale | None,
    ) -> None:
        self.params = list(params)
        self._optimizer = optimizer
        self._grad_scale = grad_scale
        self._fsdp1_groups = fsdp1_groups
        self._param_ranks = [param_shard_ranks(p, fsdp1_groups) for p in self.params]
        self._grad_ranks = [held_here(p, fsdp1_groups).shard_ranks for p in self.params]
        with torch.no_grad():
            self._before = foreach_copy([_local(p.detach()) for p in self.params])
        self._table: torch.Tensor | None = None
        self._handle = optimizer.register_step_post_hook(self._after_step)

    @classmethod
    def start(
        cls,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        *,
        fsdp1_groups: FSDP1Groups | None = None,
        grad_scale: GradScale | None = None,
    ) -> OptimizerStep:
        """Copy ``params``' weights now (before ``optimizer`` steps) and hook its next step.

        Args:
            optimizer: the optimizer about to step.
            params: the parameters to measure (the optimizer's, or some of them).
            fsdp1_groups: how FSDP1 shards them
                (:func:`~gradtrace.measure.shards.fsdp1_shard_groups`).
            grad_scale: returns the loss scale the gradients still carry when the step runs
                (an optimizer that unscales itself under a GradScaler), else ``None``.
        """
        return cls(optimizer, params, fsdp1_groups, grad_scale)

    @property
    def stepped(self) -> bool:
        """Whether the optimizer has stepped since :meth:`start` (a GradScaler skips steps
        with inf/nan gradients)."""
        return self._table is not None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._handle.remove()  # one step only
        with torch.no_grad():
            self._table = self._partial_sums()

    def _partial_sums(self) -> torch.Tensor:
        """``[params x 6]`` sums over what this rank holds, on the parameters' device."""
        device = self._before[0].device if self._before else torch.device("cpu")
        # float64 off the GPU: the CPU's float32 sums add element after element.
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        scale = self._grad_scale() if self._grad_scale is not None else None
        nan = torch.full((), math.nan, dtype=dtype, device=device)

        def total(values: torch.Tensor | None, held: torch.Tensor) -> torch.Tensor:
            if not held.numel():  # none of it here (FSDP1: another rank's slice)
                return nan.new_zeros(())
            return nan if values is None else values.to(dtype).sum()

        rows = []
        for p, before in zip(self.params, self._before):
            grad = held_here(p, self._fsdp1_groups).grad
            state = self._optimizer.state.get(p, {})
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            rows.append(
                torch.stack(
                    [
                        total((_local(p.detach()).to(dtype) - before.to(dtype)).square(), before),
                        total(before.square(), before),
                        total(grad.square(), grad) if grad is not None else nan.new_zeros(()),
                        total(_local(m).abs() if m is not None else None, before),
                        total(_local(v).sqrt() if v is not None else None, before),
                    ]
                )
            )
        if not rows:
            return torch.zeros(0, 6, dtype=dtype, device=device)
        table = torch.stack(rows)
        if scale is not None:  # gradients still multiplied by the loss scale
            table[:, _GRAD_SQ] /= scale.to(device, dtype).square()
        counts = torch.tensor([float(b.numel()) for b in self._before], dtype=dtype)
        return torch.cat([table, counts.to(device, non_blocking=True)[:, None]], dim=1)

    def finish(self, group: Any = None) -> StepValues | None:
        """The step's values (``None`` if the optimizer never stepped): partial sums
        combined over the ranks that hold each sharded parameter (one ``all_gather`` of the
        ``[params x 6]`` table when any is sharded), copied to the host once."""
        self._handle.remove()
        table = self._table
        if table is None:
            return None
        distributed = dist.is_available() and dist.is_initialized()
        rank_lists = (self._param_ranks, self._grad_ranks)
        sharded = any(ranks is not None for ranks in (*rank_lists[0], *rank_lists[1]))
        if sharded and distributed and dist.get_world_size(group) > 1:
            gathered = all_gather_guarded(lambda: table, table.shape, table.dtype, group)
            table = table.to(gathered.device)
            param_sums, grad_sums = (
                self._combine(gathered, table, ranks, group) for ranks in rank_lists
            )
            table = torch.cat(
                [param_sums[:, :_GRAD_SQ], grad_sums[:, _GRAD_SQ:_M_ABS], param_sums[:, _M_ABS:]],
                dim=1,
            )
        sums = table.double().cpu().tolist()  # the one device-to-host copy
        count = [max(row[_COUNT], 1.0) for row in sums]
        return StepValues(
            update_norm=[math.sqrt(row[_UPDATE_SQ]) for row in sums],
            weight_norm=[math.sqrt(row[_WEIGHT_SQ]) for row in sums],
            m_mean_abs=[row[_M_ABS] / n for row, n in zip(sums, count)],
            sqrt_v_mean=[row[_SQRT_V] / n for row, n in zip(sums, count)],
            grad_norm_clipped=math.sqrt(sum(row[_GRAD_SQ] for row in sums)),
        )

    @staticmethod
    def _combine(
        gathered: torch.Tensor,
        table: torch.Tensor,
        shard_ranks: Sequence[tuple[int, ...] | None],
        group: Any,
    ) -> torch.Tensor:
        """``table`` with each sharded row (``shard_ranks`` not ``None``) summed over its
        shard group in ``gathered``; a row whole here is this rank's own."""
        mask = shard_mask(shard_ranks, group, table.device)
        combined = reduce_over_ranks(gathered, mask, "sum")
        rows = [ranks is not None for ranks in shard_ranks]
        sharded_rows = torch.tensor(rows, device=table.device)[:, None]
        return torch.where(sharded_rows, combined, table)

    def abandon(self) -> None:
        """Stop waiting for the step (a batch that failed before it)."""
        self._handle.remove()
