"""One measured optimizer step: which parameters the optimizer steps, their statistics (one
``grad_stats_table`` call, one device-to-host copy), and what they become: records, summary
scalars and non-finite reports."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradtrace.compat import is_fsdp1_flattened, loss_scale_tensor, optimizer_handles_unscaling
from gradtrace.measure.shards import FSDP1Groups
from gradtrace.measure.stats import STATS, grad_stats_table

__all__ = ["Measurement", "OptimizerLayers", "measure", "plan_layers"]


@dataclass
class OptimizerLayers:
    """What one optimizer steps, in data-flow order: every trainable parameter (for the
    global norm and the non-finite count) and, among them, the rows that are layers."""

    names: list[str]
    params: list[torch.Tensor]
    layer_rows: list[int]
    path_rows: list[int]
    """Rows of main-path layers: input end first, output end last (all layers if none is
    known to be on the main path)."""
    positions: list[int]
    """Each row's position among the optimizer's parameters: the same on every rank, whatever
    order each rank's watched batches gave (the collective's rows follow it)."""


def plan_layers(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    layer_ids: set[int],
    rank_of: Callable[[str], Any],
    main_path: set[str],
) -> OptimizerLayers:
    """The parameters ``optimizer`` steps (``requires_grad``, each once), sorted by
    ``rank_of`` their name; ``layer_ids``: ``id`` of the selected layers."""
    found: dict[int, tuple[str, torch.Tensor, int]] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if p.requires_grad and id(p) not in found:
                found[id(p)] = (names.get(id(p), f"param_group{g}.{i}"), p, len(found))
    ordered = sorted(found.values(), key=lambda item: rank_of(item[0]))
    ordered_names = [name for name, _, _ in ordered]
    layer_rows = [i for i, (_, p, _) in enumerate(ordered) if id(p) in layer_ids]
    on_path = [i for i in layer_rows if ordered_names[i] in main_path]
    return OptimizerLayers(
        ordered_names,
        [p for _, p, _ in ordered],
        layer_rows,
        on_path or layer_rows,
        [position for _, _, position in ordered],
    )


@dataclass
class Measurement:
    """All four statistics of one optimizer's gradients at one step."""

    plan: OptimizerLayers
    present: list[int]
    """Rows of ``plan`` measured (those with a gradient on some rank)."""
    values: list[list[float]]
    """``[len(present) x 4]`` :data:`STATS`, on the host."""

    def _row(self) -> dict[int, int]:
        return {i: k for k, i in enumerate(self.present)}

    @property
    def layer_rows(self) -> list[int]:
        row = self._row()
        return [i for i in self.plan.layer_rows if i in row]

    def layer_values(self) -> list[tuple[str, list[float], int]]:
        """(layer name, its four statistics, its number of elements), in data-flow order."""
        row = self._row()
        return [
            (self.plan.names[i], self.values[row[i]], self.plan.params[i].numel())
            for i in self.layer_rows
        ]

    @property
    def any_nonfinite(self) -> bool:
        return any(values[3] for values in self.values)

    def records(self, step: int, stats: Sequence[str]) -> list[dict[str, Any]]:
        records = []
        for name, values, _ in self.layer_values():
            by_stat = dict(zip(STATS, values))
            by_stat["nonfinite"] = int(by_stat["nonfinite"])
            records.append({"step": step, "layer": name, **{s: by_stat[s] for s in stats}})
        return records

    def nonfinite_layers(self) -> list[tuple[str, int, int]]:
        """(layer, non-finite count, size) of the layers holding inf/nan, in data-flow order."""
        return [(name, int(v[3]), n) for name, v, n in self.layer_values() if v[3]]

    def path_means(self) -> list[tuple[str, float]]:
        """(layer, finite ``mean_abs``) along the main path, input end first."""
        row = self._row()
        path = [
            (self.plan.names[i], self.values[row[i]][0]) for i in self.plan.path_rows if i in row
        ]
        return [(name, value) for name, value in path if math.isfinite(value)]

    def summary_values(self, prefix: str, suffix: str = "") -> dict[str, float]:
        """Global gradient norm, non-finite count and main-path input/output ratio, named
        ``<prefix>/<scalar><suffix>``, from the host copy of the table (no further sync)."""
        l2 = [math.inf if math.isnan(v[1]) else v[1] for v in self.values]
        values = {
            "grad_norm": math.sqrt(sum(v * v for v in l2)),
            "nonfinite": float(sum(v[3] for v in self.values)),
        }
        ends = self._path_ends()
        if ends is not None:
            first, last = self.values[ends[0]][0], self.values[ends[1]][0]
            ratio = first / last if last else (math.inf if first else math.nan)
            values["input_output_ratio"] = ratio
        return {f"{prefix}/{key}{suffix}": value for key, value in values.items()}

    def _path_ends(self) -> tuple[int, int] | None:
        """Rows of ``table`` of the main path's input and output ends (``None``: under two)."""
        row = self._row()
        path = [row[i] for i in self.plan.path_rows if i in row]
        return (path[0], path[-1]) if len(path) >= 2 else None


def measure(
    plan: OptimizerLayers,
    optimizer: torch.optim.Optimizer,
    precision_plugin: Any,
    fsdp1_groups: FSDP1Groups | None = None,
) -> Measurement | None:
    """Measure ``plan``'s gradients (``None`` if none has one). Every rank must call it: with
    sharded gradients it issues the one collective (``fsdp1_groups``: how FSDP1 shards them,
    :func:`~gradtrace.measure.shards.fsdp1_shard_groups`)."""
    # FSDP1 ranks hold a slice of a gradient or None: every rank takes every such row, so
    # that the tables they combine have the same rows.
    present = [i for i, p in enumerate(plan.params) if p.grad is not None or is_fsdp1_flattened(p)]
    if not present:
        return None
    scale = None
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled() and optimizer_handles_unscaling(optimizer):
        scale = loss_scale_tensor(scaler)  # Lightning did not unscale: divide on the device
    # Sharded gradients are combined row by row over ranks: rows in the optimizer's order.
    canonical = sorted(range(len(present)), key=lambda k: plan.positions[present[k]])
    named = [(plan.names[present[k]], plan.params[present[k]]) for k in canonical]
    _, table = grad_stats_table(named, STATS, scale=scale, fsdp1_groups=fsdp1_groups)
    rows = table.cpu().tolist()  # the one device-to-host copy of a measured step
    values: list[list[float]] = [[] for _ in present]
    for row, k in zip(rows, canonical):  # back to the plan's (data-flow) order
        values[k] = row
    return Measurement(plan, present, values)
