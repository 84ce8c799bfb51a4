"""Gradient and activation flow of a model on one batch, without a training run.

:func:`probe` runs one forward and backward pass (after ``steps`` optimizer steps on the same
batch, 0 by default: the model at initialisation) and measures, per layer of the main path in
data-flow order (:mod:`~gradtrace.measure.order`; auxiliary heads are off it), the mean
``|grad|`` of the weight and the scale of the layer's output (root mean square). Several seeds
(a model builder called once per seed) give a median and a spread::

    from gradtrace.measure.probe import probe, random_batch
    from gradtrace.models import create_model

    result = probe(lambda: create_model("vgg38"), lambda seed: random_batch((3, 32, 32), 100,
                   64, seed), seeds=range(3))
    result.ratio, result.slope  # medians over the seeds

Two numbers summarise a profile:

* the input/output ratio: the first main-path layer's mean ``|grad|`` over the last one's
  (far below 1: the gradient vanishes toward the input; far above: it grows toward it);
* the slope: a least-squares fit of ``log10(mean |grad|)`` against relative depth (0 for the
  input layer, 1 for the output layer), in decades per unit of depth. A vanishing gradient has
  a positive slope (it rises toward the output), a gradient that grows toward the input a
  negative one; a flat profile is near 0.

Needs torch alone. The model is never changed: each seed probes its own copy or build, and
the global random state is restored afterwards.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtrace.checks import check_int
from gradtrace.measure.activation_catalog import activation_sources
from gradtrace.measure.activations import ActivationCollector
from gradtrace.measure.order import LayerOrder, primary_output
from gradtrace.measure.selection import parameter_names, select_layers
from gradtrace.measure.stats import grad_stats_table

__all__ = [
    "PROBE_STATS",
    "ProbeResult",
    "classification_loss",
    "log_slope",
    "median_range",
    "probe",
    "random_batch",
]

PROBE_STATS: tuple[str, ...] = ("mean_abs", "act_rms", "act_zero_frac", "act_sat_frac")
"""Per-layer values of a probe record: mean |grad| of the weight, root mean square of the
layer's output (``sqrt(act_mean**2 + act_std**2)`` of the activation statistics, whose std is
Bessel-corrected: the RMS times at most ``sqrt(n / (n - 1))`` for ``n`` output values), its
fraction of exact zeros, and of saturated values (only after a saturating activation)."""

Batch = tuple[torch.Tensor, torch.Tensor]
LossFunction = Callable[[Any, torch.Tensor], torch.Tensor]


def classification_loss(
    output: Any, targets: torch.Tensor, aux_weight: float = 0.3
) -> torch.Tensor:
    """Cross-entropy of the model's primary output plus ``aux_weight`` times each auxiliary
    head's, as in training.

    The primary output is the first tensor of ``output`` (or its ``logits`` attribute); the
    auxiliary heads are the other tensors of the same shape in it (gradtrace's ``AuxLogits``,
    torchvision's ``GoogLeNetOutputs``). A model in eval mode returns its logits alone.
    """
    logits = getattr(output, "logits", None)
    logits = logits if isinstance(logits, torch.Tensor) else primary_output(output)
    if logits is None:
        raise ValueError(f"the model's output holds no tensor: {type(output).__name__}")
    loss = F.cross_entropy(logits, targets)
    heads = [t for t in _tensors(output) if t is not logits and t.shape == logits.shape]
    if heads and aux_weight:
        loss = loss + aux_weight * sum(F.cross_entropy(t, targets) for t in heads)
    return loss


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def random_batch(
    input_size: Sequence[int], num_classes: int, batch_size: int = 64, seed: int = 0
) -> Batch:
    """Standard normal images of ``input_size`` (C, H, W) and uniform labels: what the inputs
    look like after normalisation, with no dataset needed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *input_size, generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return inputs, targets


def log_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``log10(value)`` against relative depth (``i / (n - 1)``) over the
    positive finite ``values`` (input first); NaN with fewer than two of them."""
    n = len(values)
    points = [
        (i / (n - 1), math.log10(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)
    ]
    if len(points) < 2:
        return math.nan
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe` measured.

    ``records`` hold one dict per (seed, layer) of the main path, in data-flow order:
    ``seed``, ``step`` (the optimizer steps taken before measuring), ``layer``, ``depth``
    (relative, 0 = input layer, 1 = output layer) and :data:`PROBE_STATS` (NaN where not
    measured), the format of ``GradientFlow.history`` (``step`` aside), so that
    :func:`gradtrace.plots.plot_gradient_flow` and the other history readers take them.
    """

    records: list[dict[str, Any]] = field(repr=False)
    layers: list[str]
    """The main path in data-flow order (of the first seed's model)."""
    off_path: list[str]
    """Measured layers that do not lead to the primary output (auxiliary heads)."""
    seeds: tuple[int, ...]
    steps: int
    losses: tuple[float, ...]
    """The loss of the measured pass, per seed."""

    def per_seed(self, stat: str = "mean_abs") -> dict[int, list[float]]:
        """``{seed: [stat of each main-path layer, input first]}``."""
        out: dict[int, list[float]] = {seed: [] for seed in self.seeds}
        for record in self.records:
            out[record["seed"]].append(record[stat])
        return out

    @property
    def ratios(self) -> list[float]:
        """Input/output ratio of mean |grad| of each seed (see the module docstring)."""
        return [_ratio(values) for values in self.per_seed().values()]

    @property
    def slopes(self) -> list[float]:
        """Slope of log10 mean |grad| per unit of relative depth, of each seed."""
        return [log_slope(values) for values in self.per_seed().values()]

    @property
    def ratio(self) -> float:
        """Median input/output ratio over the seeds."""
        return _median(self.ratios)

    @property
    def slope(self) -> float:
        """Median slope over the seeds."""
        return _median(self.slopes)

    def layer_median(self, stat: str = "mean_abs") -> dict[str, float]:
        """``{layer: median of stat over the seeds}`` along the main path."""
        values: dict[str, list[float]] = {name: [] for name in self.layers}
        for record in self.records:
            values.setdefault(record["layer"], []).append(record[stat])
        return {name: _median(v) for name, v in values.items()}

    def first_problem(
        self, dead_fraction: float = 0.9, saturated_fraction: float = 0.9
    ) -> str | None:
        """The first main-path layer whose median fraction of exact zeros exceeds
        ``dead_fraction`` (``"<layer> (dead, 97%)"``) or of saturated outputs exceeds
        ``saturated_fraction`` (``"... (saturated, 95%)"``); ``None`` when no layer is."""
        zeros = self.layer_median("act_zero_frac")
        saturated = self.layer_median("act_sat_frac")
        for name in self.layers:
            if zeros[name] > dead_fraction:
                return f"{name} (dead, {zeros[name]:.0%})"
            if saturated[name] > saturated_fraction:
                return f"{name} (saturated, {saturated[name]:.0%})"
        return None


def median_range(values: Sequence[float], fmt: str, missing: str = "-") -> str:
    """``median [min, max]`` of the finite ``values`` (the median alone for one), each in
    format ``fmt``, or ``missing`` when none is finite: a probe's spread over its seeds."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return missing
    median = statistics.median(finite)
    if len(finite) == 1:
        return format(median, fmt)
    return f"{median:{fmt}} [{finite[0]:{fmt}}, {finite[-1]:{fmt}}]"


def _ratio(values: Sequence[float]) -> float:
    if len(values) < 2 or not values[-1]:
        return math.nan
    return values[0] / values[-1]


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _rms(stats: Mapping[str, float]) -> float:
    mean, std = stats.get("act_mean", math.nan), stats.get("act_std", math.nan)
    return math.sqrt(mean * mean + std * std)


def _measure(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFunction,
    include: Sequence[str | type],
    exclude: Sequence[str | type],
    activations: bool,
) -> tuple[list[str], list[str], dict[str, dict[str, float]], float]:
    """One forward and backward pass: (main path, off path, {layer: stats}, loss)."""
    inputs, targets = batch
    layers = select_layers(model, include, exclude)
    order = LayerOrder()
    order.start(parameter_names(model), keep=False)
    collector = ActivationCollector() if activations else None
    model.zero_grad(set_to_none=True)
    try:
        order.watch(model)
        if collector is not None:
            sources, _ = activation_sources(((y.name, y.module) for y in layers), model)
            collector.attach(model, sources, {y.name: y.param for y in layers})
        loss = loss_fn(model(inputs), targets)
        order.backward(loss)
        loss.backward()
        order.end_watch()
        if collector is not None:
            collector.detach()
            act = collector.compute()
        else:
            act = {}
    finally:
        order.close()
        if collector is not None:
            collector.detach()
    names, table = grad_stats_table(layers, ("mean_abs",))
    grads = dict(zip(names, table[:, 0].tolist()))
    ranked = sorted(grads, key=order.rank_of)
    main = [name for name in ranked if name in order.main_path]
    off = [name for name in ranked if name not in order.main_path]
    stats = {
        name: {
            "mean_abs": grads[name],
            "act_rms": _rms(act[name]) if name in act else math.nan,
            "act_zero_frac": act.get(name, {}).get("act_zero_frac", math.nan),
            "act_sat_frac": act.get(name, {}).get("act_sat_frac", math.nan),
        }
        for name in grads
    }
    return main, off, stats, float(loss.detach())


def probe(
    model: nn.Module | Callable[[], nn.Module],
    batch: Batch | Callable[[int], Batch],
    *,
    seeds: Iterable[int] = (0,),
    steps: int = 0,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: LossFunction = classification_loss,
    include: Sequence[str | type] = (),
    exclude: Sequence[str | type] = (),
    activations: bool = True,
) -> ProbeResult:
    """Gradient and activation flow of ``model`` on one batch (see the module docstring).

    Args:
        model: the model (probed on a copy; one seed only), or a function building it, called
            once per seed after ``torch.manual_seed(seed)``.
        batch: ``(inputs, targets)`` on the model's device, or a function of the seed giving
            it (e.g. ``lambda seed: random_batch((3, 32, 32), 10, seed=seed)``).
        seeds: the seeds; the results' median and spread are over them.
        steps: optimizer steps on the batch before measuring (0: the model as built).
        optimizer: builds the optimizer for ``steps`` from the parameters (default: Adam,
            lr 1e-3).
        loss_fn: ``loss_fn(output, targets)``; default :func:`classification_loss`.
        include, exclude: which parameters are layers, as in
            :func:`~gradtrace.measure.select_layers` (default: every weight-bearing module's
            weight).
        activations: also measure the layers' outputs (``act_*``).

    Raises:
        ValueError: no seed, a repeated seed, a negative ``steps``, several seeds for a model
            instance, or a model with fewer than two layers on its main path.
    """
    seeds = tuple(seeds)
    check_int("steps", steps, 0)
    if not seeds:
        raise ValueError("probe needs at least one seed; got none")
    if len(set(seeds)) < len(seeds):
        # per_seed() groups the records by seed: a repeated one would merge two profiles.
        raise ValueError(f"probe's seeds must differ; got {list(seeds)}")
    if isinstance(model, nn.Module) and len(seeds) > 1:
        raise ValueError(
            f"probing {len(seeds)} seeds needs a function that builds the model "
            "(e.g. lambda: create_model('vgg38')), not a built model"
        )
    make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
    records: list[dict[str, Any]] = []
    losses: list[float] = []
    layers: list[str] = []
    off_path: list[str] = []
    # torch.manual_seed also seeds every CUDA device: restore those too when CUDA is in use
    # (forking an uninitialised CUDA would initialise it, for a model that may not need it).
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        for seed in seeds:
            torch.manual_seed(seed)
            net = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
            net.train()
            data = batch(seed) if callable(batch) else batch
            if steps:
                trainer = make_optimizer(net.parameters())
                for _ in range(steps):
                    trainer.zero_grad(set_to_none=True)
                    loss_fn(net(data[0]), data[1]).backward()
                    trainer.step()
            main, off, stats, loss = _measure(net, data, loss_fn, include, exclude, activations)
            if len(main) < 2:
                raise ValueError(
                    f"probe needs two layers or more on the model's main path; found {main}"
                )
            if not layers:
                layers, off_path = main, off
            losses.append(loss)
            for i, name in enumerate(main):
                depth = i / (len(main) - 1)
                records.append(
                    {"seed": seed, "step": steps, "layer": name, "depth": depth, **stats[name]}
                )
    return ProbeResult(records, layers, off_path, seeds, steps, tuple(losses))
