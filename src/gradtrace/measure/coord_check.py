"""Coordinate check across width: does each layer's scale stay put as the network widens?

"Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer" (Yang
et al. 2022, arXiv:2203.03466) calls a parametrisation right when, after a few steps of
training, every layer's activations and their change since initialisation keep the same
typical entry size at every width; microsoft/mup's ``coord_check`` plots that by hand.
:func:`coord_check` builds the model at several widths (one seed or more each), trains it
``steps`` steps on one fixed batch and records, per layer of the main path in data-flow order
(:mod:`~gradtrace.measure.order`) and per step ``t = 0 .. steps`` (the model after ``t``
optimizer steps):

* ``act_rms``: root mean square of the layer's output on the batch (its module's output,
  before any activation function), ``sqrt(mean(x**2))``. mup's default is ``mean(|x|)``; the
  RMS is the "coordinate size" of the theory (``||x|| / sqrt(n)``), scales with width as
  ``mean(|x|)`` does (their ratio depends on the shape of the distribution, not its scale),
  and is what the probe's ``act_rms`` measures too;
* ``change_rms``: RMS of ``x_t - x_0``, the change training has made to that output: the
  update's size where it matters, in what the layer computes. Under Adam every weight entry
  moves by about the learning rate whatever the width, so a layer's output moves by about
  ``lr * fan_in``: the growth a wrong parametrisation shows after a few steps;
* ``update_rms``: RMS per entry of step ``t``'s weight update, ``||W_t - W_(t-1)|| /
  sqrt(numel)`` (NaN at step 0): what the optimizer's parametrisation sets (Adam at one
  learning rate: flat; muP's ``lr / fan_in``: shrinking as 1/width, by design).

Then, per layer, the least-squares slope of ``log(median over seeds)`` against ``log(width)``
at the last step: 0 when a statistic stays put, 1 when it grows in proportion to width.
A layer **grows** when its activation or its change has a slope above :data:`FLAT_SLOPE` (a
factor of 1.5 over a width range of 8), **shrinks** when one is below ``-FLAT_SLOPE`` and none
grows, and is **flat** otherwise. Under the standard parametrisation with Adam the hidden and
output layers grow; under muP every layer is flat.

Every forward pass runs in training mode on the same batch with the same random state (the
same dropout masks), so the change is training's alone. The layers' outputs at step 0 are
kept to measure the change: about the memory of one training step's activations. Needs torch
alone; the global random state is restored afterwards.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradtrace.checks import check_int
from gradtrace.measure.activation_catalog import activation_sources
from gradtrace.measure.order import LayerOrder, primary_output
from gradtrace.measure.probe import Batch, LossFunction, classification_loss
from gradtrace.measure.selection import Layer, parameter_names, select_layers

__all__ = [
    "COORD_STATS",
    "FLAT_SLOPE",
    "VERDICT_STATS",
    "CoordCheckResult",
    "coord_check",
    "width_slope",
]

COORD_STATS: tuple[str, ...] = ("act_rms", "change_rms", "update_rms")
"""Per-layer values of a coordinate-check record (see the module docstring)."""

FLAT_SLOPE = 0.2
"""Largest ``|slope|`` of log value against log width that still counts as flat: over widths
64 .. 512 a factor of ``8 ** 0.2 = 1.5``. Under muP an MLP's slopes stay within about 0.1,
while under the standard parametrisation with Adam its output layer's exceed 0.5."""

VERDICT_STATS: tuple[str, ...] = ("act_rms", "change_rms")
"""The statistics a verdict reads: the layer's output and its change since initialisation."""


def width_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(value)`` against ``log(width)`` over the pairs with a
    positive finite value: the exponent ``a`` of ``value ~ width ** a``; NaN with fewer than
    two such pairs (at two distinct widths)."""
    points = [
        (math.log(w), math.log(v))
        for w, v in zip(widths, values)
        if w > 0 and v > 0 and math.isfinite(v)
    ]
    if len({x for x, _ in points}) < 2:
        return math.nan
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


@dataclass(frozen=True)
class CoordCheckResult:
    """What :func:`coord_check` measured.

    ``records`` hold one dict per (width, seed, step, main-path layer): ``width``, ``seed``,
    ``step`` (optimizer steps taken, 0 = as built), ``layer``, ``depth`` (relative, 0 = input
    layer, 1 = output layer), :data:`COORD_STATS` (NaN where not measured) and ``loss`` (of
    that step's forward pass).
    """

    records: list[dict[str, Any]] = field(repr=False)
    layers: list[str]
    """The main path in data-flow order (the same at every width)."""
    off_path: list[str]
    """Measured layers that do not lead to the primary output (auxiliary heads): not recorded."""
    widths: tuple[int, ...]
    """In increasing order."""
    seeds: tuple[int, ...]
    steps: int

    def medians(self, stat: str = "act_rms", step: int | None = None) -> dict[str, list[float]]:
        """``{layer: [median of stat over the seeds at each width]}`` at ``step`` (default:
        the last), layers in data-flow order, widths increasing.

        Raises:
            ValueError: a statistic not in :data:`COORD_STATS`, or a step not recorded.
        """
        if stat not in COORD_STATS:
            raise ValueError(f"stat must be one of {', '.join(COORD_STATS)}; got {stat!r}")
        step = self.steps if step is None else step
        if not 0 <= step <= self.steps:
            raise ValueError(f"step must be in 0..{self.steps} (the steps recorded); got {step}")
        values: dict[tuple[str, int], list[float]] = {}
        for record in self.records:
            if record["step"] == step:
                values.setdefault((record["layer"], record["width"]), []).append(record[stat])
        return {
            layer: [_median(values.get((layer, width), [])) for width in self.widths]
            for layer in self.layers
        }

    def slopes(self, stat: str = "act_rms", step: int | None = None) -> dict[str, float]:
        """``{layer: slope of log(median stat) against log(width)}`` at ``step`` (default: the
        last; see :func:`width_slope`)."""
        return {
            layer: width_slope(self.widths, values)
            for layer, values in self.medians(stat, step).items()
        }

    def verdicts(
        self,
        stats: Sequence[str] = VERDICT_STATS,
        step: int | None = None,
        flat: float = FLAT_SLOPE,
    ) -> dict[str, str]:
        """``{layer: "grows" | "shrinks" | "flat" | "unmeasured"}``: grows when one of
        ``stats`` has a slope above ``flat``, shrinks when one is below ``-flat`` and none
        grows, flat when every measured slope is within ``flat`` of 0, unmeasured when none
        could be measured (a layer whose output no module gives)."""
        slopes = [self.slopes(stat, step) for stat in stats]
        out = {}
        for layer in self.layers:
            finite = [s[layer] for s in slopes if math.isfinite(s[layer])]
            if not finite:
                out[layer] = "unmeasured"
            elif max(finite) > flat:
                out[layer] = "grows"
            elif min(finite) < -flat:
                out[layer] = "shrinks"
            else:
                out[layer] = "flat"
        return out


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


class _OutputWatch:
    """Forward hooks on the modules whose outputs are the layers': per forward pass, each
    layer's sums of squares of its outputs and of their change since the first pass, whose
    outputs it keeps (one per call of the module: a shared module is called several times)."""

    def __init__(self, sources: Mapping[str, nn.Module]) -> None:
        self.initial: dict[str, list[torch.Tensor]] = {name: [] for name in sources}
        self.sums: dict[str, list[torch.Tensor]] = {}
        """``{layer: [sum of squares, sum of squared changes]}`` of this pass."""
        self.entries: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.first_pass = True
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in sources.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = primary_output(output)
            if out is None or not out.is_floating_point():
                return
            out = out.detach().float()
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            if self.first_pass:
                self.initial[name].append(out.clone())
                change = out.new_zeros(())
            elif call < len(self.initial[name]) and self.initial[name][call].shape == out.shape:
                change = (out - self.initial[name][call]).square().sum()
            else:  # a call the first pass did not make: no start to compare with
                change = out.new_full((), math.nan)
            square = out.square().sum()
            if name in self.sums:
                self.sums[name] = [self.sums[name][0] + square, self.sums[name][1] + change]
            else:
                self.sums[name] = [square, change]
            self.entries[name] = self.entries.get(name, 0) + out.numel()

        return hook

    def take(self) -> dict[str, tuple[float, float]]:
        """``{layer: (RMS of its outputs, RMS of their change)}`` of the pass just run."""
        names = list(self.sums)
        sums = torch.stack([t for name in names for t in self.sums[name]]).tolist() if names else []
        out = {
            name: (
                math.sqrt(sums[2 * i] / self.entries[name]),
                math.sqrt(sums[2 * i + 1] / self.entries[name]),
            )
            for i, name in enumerate(names)
        }
        self.sums, self.entries, self.calls, self.first_pass = {}, {}, {}, False
        return out

    def close(self) -> None:
        """Remove the hooks and drop the kept outputs."""
        for handle in self._handles:
            handle.remove()
        self.initial = {}


def _train(
    net: nn.Module,
    data: Batch,
    seed: int,
    steps: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: LossFunction,
    layers: list[Layer],
) -> tuple[LayerOrder, list[dict[str, dict[str, float]]], list[float]]:
    """Train ``steps`` steps on ``data``: the layer order, ``{layer: stats}`` per step 0 ..
    steps and the loss of each step's forward pass."""
    inputs, targets = data
    sources, _ = activation_sources(((y.name, y.module) for y in layers), net)
    order = LayerOrder()
    order.start(parameter_names(net), keep=False)
    watch = _OutputWatch(sources)
    trainer = make_optimizer(net)
    per_step: list[dict[str, dict[str, float]]] = []
    losses: list[float] = []
    updates = [math.nan] * len(layers)
    try:
        for step in range(steps + 1):
            torch.manual_seed(seed)  # the same dropout masks in every pass
            if step < steps:
                trainer.zero_grad(set_to_none=True)
                if step == 0:  # the first pass shows the data-flow order
                    order.watch(net)
                loss = loss_fn(net(inputs), targets)
                order.backward(loss)
                loss.backward()
                order.end_watch()
            else:
                with torch.no_grad():
                    loss = loss_fn(net(inputs), targets)
            outputs = watch.take()
            losses.append(float(loss.detach()))
            stats = {}
            for y, update in zip(layers, updates):
                act, change = outputs.get(y.name, (math.nan, math.nan))  # no module output
                stats[y.name] = {"act_rms": act, "change_rms": change, "update_rms": update}
            per_step.append(stats)
            if step < steps:
                before = [y.param.detach().clone() for y in layers]
                trainer.step()
                norms = [
                    torch.linalg.vector_norm(y.param.detach() - b) for y, b in zip(layers, before)
                ]
                sizes = [y.param.numel() for y in layers]
                updates = [n / math.sqrt(s) for n, s in zip(torch.stack(norms).tolist(), sizes)]
    finally:
        watch.close()
        order.close()
    return order, per_step, losses


def coord_check(
    build: Callable[[int], nn.Module],
    widths: Iterable[int],
    batch: Batch | Callable[[int], Batch],
    *,
    steps: int = 3,
    seeds: Iterable[int] = (0,),
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    loss_fn: LossFunction = classification_loss,
    include: Sequence[str | type] = (),
    exclude: Sequence[str | type] = (),
) -> CoordCheckResult:
    """Each layer's activation, its change and its weight update after ``steps`` steps, at
    every width (see the module docstring).

    Args:
        build: builds the model at a width, called once per width and seed after
            ``torch.manual_seed(seed)``.
        widths: two widths or more (the values the slopes are fitted against).
        batch: ``(inputs, targets)`` on the model's device, or a function of the seed giving
            it; the same batch at every width.
        steps: optimizer steps on the batch.
        seeds: the seeds; slopes are fitted to the median over them.
        optimizer: builds the optimizer from the model, so that per-layer learning rates
            (muP's) can be set with parameter groups (default: Adam, lr 1e-3, on all
            parameters).
        loss_fn: ``loss_fn(output, targets)``; default
            :func:`~gradtrace.measure.probe.classification_loss`.
        include, exclude: which parameters are layers, as in
            :func:`~gradtrace.measure.select_layers`.

    Raises:
        ValueError: fewer than two distinct widths, a width below 1, ``steps`` below 1, no
            seed or a repeated one, a model with no layer on its main path, or main paths
            whose layers differ between widths.
    """
    widths = tuple(widths)
    for width in widths:
        check_int("each width", width, 1)
    if len(set(widths)) < 2:
        raise ValueError(f"coord_check needs two distinct widths or more; got {list(widths)}")
    check_int("steps", steps, 1)
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"coord_check needs one seed or more, each once; got {list(seeds)}")
    make_optimizer = optimizer or (lambda model: torch.optim.Adam(model.parameters(), lr=1e-3))
    widths = tuple(sorted(set(widths)))
    records: list[dict[str, Any]] = []
    main: list[str] = []
    off: list[str] = []
    first = ""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        for width in widths:
            for seed in seeds:
                torch.manual_seed(seed)
                net = build(width).train()
                data = batch(seed) if callable(batch) else batch
                layers = select_layers(net, include, exclude)
                order, per_step, losses = _train(
                    net, data, seed, steps, make_optimizer, loss_fn, layers
                )
                ranked = sorted((y.name for y in layers), key=order.rank_of)
                path = [name for name in ranked if name in order.main_path]
                if not path:
                    raise ValueError(f"no layer on the main path of the model at width {width}")
                if not main:
                    main, first = path, f"width {width}"
                    off = [name for name in ranked if name not in order.main_path]
                elif path != main:
                    raise ValueError(_differ(main, first, path, f"width {width}"))
                for step, (stats, loss) in enumerate(zip(per_step, losses)):
                    for i, name in enumerate(path):
                        depth = i / (len(path) - 1) if len(path) > 1 else 0.0
                        records.append(
                            {
                                "width": width,
                                "seed": seed,
                                "step": step,
                                "layer": name,
                                "depth": depth,
                                **stats[name],
                                "loss": loss,
                            }
                        )
    return CoordCheckResult(records, main, off, widths, seeds, steps)


def _differ(main: list[str], where: str, other: list[str], other_where: str) -> str:
    missing = [name for name in main if name not in other]
    extra = [name for name in other if name not in main]
    detail = (
        f"{len(main)} vs {len(other)} layers"
        + (f", only at {where}: {missing[:3]}" if missing else "")
        + (f", only at {other_where}: {extra[:3]}" if extra else "")
    )
    return (
        f"the model's main-path layers differ between {where} and {other_where} ({detail}); "
        "a width knob must change layer sizes, not which layers there are"
    )
