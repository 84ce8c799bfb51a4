"""The flight recorder: the last K steps of every layer, kept on the device, read when the
loss spikes.

At every step :class:`FlightRecorder` adds, per layer, three *local partial sums* to a
preallocated ring buffer on the device: the sum of squares of the gradient this rank holds,
of the change the optimizer step made to this rank's part of the weight, and of a fixed
share of the layer module's output (:data:`ACTIVATION_SHARE`; with its element count, kept on
the host), plus the loss. Writing a row is tensor operations only, with no host
synchronisation. A check (:meth:`FlightRecorder.check`) reads the rows written since the last
one to the host at once (one ``all_gather`` of their losses over ranks, so that every rank
decides alike) and applies the spike rule of :mod:`~gradtrace.measure.departures`; on a
spike, :meth:`FlightRecorder.norms` combines the ring over ranks (one more ``all_gather``)
for finding the first layer that left its own history. Torch alone: the Lightning side is
:mod:`gradtrace.gradient_flow.flight`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradtrace.compat import foreach_copy, foreach_norm, foreach_sub_, is_deepspeed_zero12
from gradtrace.measure.collectives import all_gather_stacked
from gradtrace.measure.departures import LOSS_FLOOR, SETTLE, SIDES, WINDOW, robust_z
from gradtrace.measure.order import primary_output
from gradtrace.measure.selection import Layer
from gradtrace.measure.shards import (
    FSDP1Groups,
    held_here,
    param_shard_ranks,
    reduce_over_ranks,
    shard_mask,
)

__all__ = ["ACTIVATION_MIN", "ACTIVATION_SHARE", "FlightRecorder"]

_GRADIENT, _UPDATE, _ACTIVATION = range(len(SIDES))

ACTIVATION_SHARE = 32
"""The activation side reads the first ``1 / ACTIVATION_SHARE`` of each output's leading
dimension (of a batch-first output, the first 1/32 of the batch, rounded up), at least
:data:`ACTIVATION_MIN` entries: a fixed share, so that a layer's series stays comparable from
step to step, for little more than the cost of a hook (reading whole outputs, memory-bound,
costs ~2% of a VGG38 step on a CPU)."""
ACTIVATION_MIN = 2
"""Fewest leading entries (samples) the activation side reads: one sample's RMS is noisy
enough to make a chance departure now and then."""


class FlightRecorder:
    """The last ``capacity`` steps of ``layers``' partial sums, in a ring on ``device``.

    Per step: :meth:`add_loss` (each loss backpropagated), :meth:`add_gradients` and
    :meth:`snapshot_weights` before each optimizer step, :meth:`finish_updates` after it,
    :meth:`end_step` once the step is over (writes the row); :meth:`attach` hooks the modules
    whose outputs are the layers' activations. Every rank of a multi-process run must call
    :meth:`check` and :meth:`norms` alike (each issues one collective).
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        capacity: int,
        device: torch.device,
        fsdp1_groups: FSDP1Groups | None = None,
    ) -> None:
        self.names = [layer.name for layer in layers]
        self.capacity = capacity
        self.rows = 0
        """Rows written so far (the ring holds the last ``capacity``)."""
        self.steps: list[int] = [-1] * capacity
        """The step of each ring position."""
        self.paused = False
        """While True, module outputs are not counted (backward, validation)."""
        self.fault: BaseException | None = None
        """The first error inside a module hook (the hooks stop counting after it)."""
        self._layers = list(layers)
        self._row_of = {id(layer.param): i for i, layer in enumerate(layers)}
        self._fsdp1_groups = fsdp1_groups
        n = len(layers)
        self._dtype = torch.float32 if device.type == "mps" else torch.float64
        self._ring = torch.zeros(capacity, len(SIDES), n, device=device, dtype=self._dtype)
        self._ring_loss = torch.zeros(capacity, device=device, dtype=self._dtype)
        self._sums = torch.zeros(len(SIDES), n, device=device, dtype=self._dtype)
        self._loss = torch.zeros((), device=device, dtype=self._dtype)
        self._counts = [[0] * n for _ in range(capacity)]  # activation elements, on the host
        self._count = [0] * n
        self._outputs: list[torch.Tensor] = []  # this step's activation norms
        self._output_rows: list[int] = []
        self._pending: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = []
        self._grad_ranks: list[tuple[int, ...] | None] = [None] * n
        self._weight_ranks = [param_shard_ranks(y.param, fsdp1_groups) for y in layers]
        # Plain parameters: neither FSDP1's flattened views, DTensors nor DeepSpeed's.
        self._plain = [
            ranks is None and not hasattr(y.param, "ds_id") and not is_deepspeed_zero12(y.param)
            for ranks, y in zip(self._weight_ranks, layers)
        ]
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._handles: list[Any] = []
        self._checked = 0
        self._losses: deque[float] = deque(maxlen=max(capacity, WINDOW))  # global, checked
        self._last_spike: int | None = None  # the last row that spiked

    # ---------------------------------------------------------------- every step

    def attach(self, sources: Mapping[str, nn.Module]) -> None:
        """Count the output of ``sources[name]`` as layer ``name``'s activation, every call
        (forward hooks until :meth:`close`)."""
        rows = {name: i for i, name in enumerate(self.names)}
        for name, module in sources.items():
            hook = partial(self._output_hook, rows[name])
            self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        """Remove the module hooks (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _output_hook(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        if self.paused or self.fault is not None:
            return
        try:  # an error here must never reach the model's forward pass
            out = primary_output(output)
            if out is None or not out.is_floating_point():
                return
            half = out.dtype in (torch.float16, torch.bfloat16)
            share = out.detach()
            if share.dim() > 0:  # a contiguous block of the batch-first output, read fast
                share = share[: max(-(-share.shape[0] // ACTIVATION_SHARE), ACTIVATION_MIN)]
            norm = torch.linalg.vector_norm(share, dtype=torch.float32 if half else None)
            self._outputs.append(norm)
            self._output_rows.append(row)
            self._count[row] += share.numel()
        except Exception as err:  # handed to the caller by end_step
            self.fault = err

    def add_loss(self, loss: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add a loss that is backpropagated (divided by ``scale``, a GradScaler's)."""
        value = loss.detach().to(self._loss.device, self._dtype)
        self._loss += value if scale is None else value / scale.to(value).reshape(())

    def add_gradients(
        self, params: Sequence[torch.Tensor], scale: torch.Tensor | None = None
    ) -> None:
        """Add the squares of the gradients this rank holds of ``params`` (those that are
        layers), divided by ``scale ** 2`` when they still carry a loss scale."""
        rows, grads = [], []
        for param in params:
            row = self._row_of.get(id(param))
            if row is None:
                continue
            grad = param.grad
            # A plain parameter with a dense gradient is whole here: no need to ask how it is
            # held (every step, for every layer: the Python adds up).
            if not self._plain[row] or type(grad) is not torch.Tensor or grad.is_sparse:
                held = held_here(param, self._fsdp1_groups)
                self._grad_ranks[row], grad = held.shard_ranks, held.grad
            if grad is not None and grad.numel():
                rows.append(row)
                grads.append(grad)
        squares, rows = self._squares(grads, rows)
        if squares is not None:
            if scale is not None:
                squares = squares / scale.to(squares).square()
            self._sums[_GRADIENT].index_add_(0, self._index(rows), squares)

    def snapshot_weights(self, params: Sequence[torch.Tensor]) -> None:
        """Copy this rank's part of the layers among ``params`` before the optimizer steps."""
        rows = [self._row_of[id(p)] for p in params if id(p) in self._row_of]
        if not rows:
            return
        local = [_local(self._layers[row].param.detach()) for row in rows]
        with torch.no_grad():
            self._pending.append((rows, local, foreach_copy(local)))

    def finish_updates(self) -> None:
        """The optimizer stepped: add the squares of the changes since the snapshots (zero for
        a step the GradScaler skipped)."""
        for rows, local, before in self._pending:
            with torch.no_grad():
                foreach_sub_(before, local)  # the copy is ours: no new tensors
                squares, order = self._squares(before, rows)
            if squares is not None:
                self._sums[_UPDATE].index_add_(0, self._index(order), squares)
        self._pending = []

    def end_step(self, step: int) -> None:
        """Write the step's row into the ring (tensor operations only) and start the next.

        Raises:
            Exception: the first error of a module hook since the last step."""
        if self.fault is not None:
            raise self.fault
        if self._outputs:
            norms = torch.stack(self._outputs).to(self._sums.device, self._dtype)
            self._sums[_ACTIVATION].index_add_(0, self._index(self._output_rows), norms.square())
        position = self.rows % self.capacity
        self._ring[position].copy_(self._sums)
        self._ring_loss[position].copy_(self._loss)
        self._counts[position], self.steps[position] = self._count, step
        self._sums.zero_()
        self._loss.zero_()
        self._count = [0] * len(self.names)
        self._outputs, self._output_rows = [], []
        self.rows += 1

    @property
    def unchecked(self) -> int:
        """Rows written since the last :meth:`check`."""
        return self.rows - self._checked

    def _squares(
        self, tensors: Sequence[torch.Tensor], rows: Sequence[int]
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Sums of squares of ``tensors`` (batched per device and dtype; half precision in
        float32) on the ring's device, and the rows they belong to, in the same order."""
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, tensor in enumerate(tensors):
            groups.setdefault((tensor.device, tensor.dtype), []).append(k)
        parts, order = [], []
        for (_, dtype), members in groups.items():
            half = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
            norms = foreach_norm([tensors[k] for k in members], 2.0, dtype=half)
            parts.append(torch.stack(norms).to(self._sums.device, self._dtype))
            order += [rows[k] for k in members]
        if not parts:
            return None, []
        return torch.cat(parts).square(), order

    def _index(self, rows: Sequence[int]) -> torch.Tensor:
        """``rows`` as a long tensor on the ring's device, made once per distinct list."""
        key = tuple(rows)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= 64:  # rows that keep changing (a loop over time steps)
                self._indices.clear()
            index = torch.tensor(key, dtype=torch.long).to(self._sums.device, non_blocking=True)
            self._indices[key] = index
        return index

    # ---------------------------------------------------------------- checks

    def _positions(self, first: int, stop: int) -> list[int]:
        """Ring positions of rows ``first .. stop - 1`` (row numbers since the start)."""
        return [row % self.capacity for row in range(first, stop)]

    def check(
        self, threshold: float, *, scaler_in_use: bool = False, group: Any = None
    ) -> list[tuple[int, float, float]]:
        """Apply the spike rule to the rows written since the last check: ``(row, global
        loss, z)`` for each that starts a spike. A row spikes when its loss has a robust z over
        ``threshold`` against the previous :data:`WINDOW` losses, or when it holds a
        non-finite loss or value (``z`` is inf; non-finite gradients are expected when
        ``scaler_in_use``); one that spikes within :data:`SETTLE` rows of the last spiking
        row belongs to that row's spike. One device-to-host copy; under several processes first one
        ``all_gather`` of the rows' losses and non-finite flags, so every rank sees the mean
        loss over ranks and decides alike."""
        first, stop = self._checked, self.rows
        if first == stop:
            return []
        positions = torch.tensor(self._positions(first, stop)).to(
            self._ring.device, non_blocking=True
        )
        values = self._ring[positions][:, 1:] if scaler_in_use else self._ring[positions]
        nonfinite = (~values.isfinite()).flatten(1).any(1).to(self._dtype)
        local = torch.stack([self._ring_loss[positions], nonfinite], dim=1)
        if _world(group) > 1:
            gathered = all_gather_stacked(local, group)
            local = torch.stack([gathered[..., 0].mean(0), gathered[..., 1].amax(0)], dim=1)
        losses, flags = local.cpu().T.tolist()  # the one device-to-host copy of a check
        starts = []
        for k, (loss, flag) in enumerate(zip(losses, flags)):
            z = robust_z(loss, list(self._losses)[-WINDOW:], LOSS_FLOOR)
            spiking = bool(flag) or not math.isfinite(loss) or (z is not None and z > threshold)
            row = first + k
            if spiking:
                if self._last_spike is None or row - self._last_spike > SETTLE:
                    starts.append((row, loss, z if z is not None and z > threshold else math.inf))
                self._last_spike = row
            self._losses.append(loss)
        self._checked = stop
        return starts

    def window(self) -> tuple[list[int], list[int], list[float]]:
        """The rows the ring holds, oldest first: row numbers, steps and global losses (as
        checked)."""
        rows = list(range(max(0, self.rows - self.capacity), self._checked))
        losses = list(self._losses)[len(self._losses) - len(rows) :]
        return rows, [self.steps[row % self.capacity] for row in rows], losses

    def norms(self, rows: Sequence[int], group: Any = None) -> torch.Tensor:
        """``[rows x sides x layers]`` on the host: gradient L2, update L2 and activation RMS
        of each layer at each of ``rows``, over every rank: gradients and updates summed over
        each layer's shard group (a whole tensor taken once), activations and their element
        counts over every rank (one ``all_gather`` of the ring under several processes)."""
        positions = self._positions(rows[0], rows[-1] + 1)
        device = self._ring.device
        counts = torch.tensor([self._counts[p] for p in positions], dtype=self._dtype)
        index = torch.tensor(positions).to(device, non_blocking=True)
        table = torch.cat([self._ring[index], counts.to(device, non_blocking=True)[:, None]], 1)
        if _world(group) > 1:
            gathered = all_gather_stacked(table, group)  # [ranks x rows x columns x layers]
            table = table.to(gathered.device)
            combined = gathered.sum(0)  # activations and their counts: every rank's
            for side, ranks in ((_GRADIENT, self._grad_ranks), (_UPDATE, self._weight_ranks)):
                mask = shard_mask(ranks, group, table.device)
                summed = reduce_over_ranks(gathered[:, :, side].transpose(1, 2), mask, "sum")
                whole = torch.tensor([r is None for r in ranks], device=table.device)
                combined[:, side] = torch.where(whole, table[:, side], summed.T)
            table = combined
        table = table.double().cpu()
        sums, count = table[:, : len(SIDES)], table[:, len(SIDES)]
        # no output seen: 0, which the reading takes as no value (not 0/0, a non-finite one)
        sums[:, _ACTIVATION] = torch.where(count > 0, sums[:, _ACTIVATION] / count, 0.0)
        return sums.sqrt()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard, else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _world(group: Any) -> int:
    """Processes in ``group`` (1 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)
