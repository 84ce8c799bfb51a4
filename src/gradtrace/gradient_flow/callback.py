"""``GradientFlow``: a Lightning callback measuring per-layer gradients during training.

It records what the coursework report's Figures 2, 3 and 5 show (the mean absolute gradient
of every layer's weights, input to output) at every logged optimizer step, writes it to the
loggers, ``callback.history`` and ``<log_dir>/gradient_flow.csv``, draws gradient-flow plots,
and warns when gradients vanish or explode. It needs only torch and Lightning; plots need
matplotlib (``pip install 'gradtrace[plot]'``) and are skipped without it.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradtrace.checks import check_choice, check_int
from gradtrace.gradient_flow.activations import (
    ACTIVATION_STATS,
    ActivationCollector,
    ActivationDiagnosis,
    ActivationsUnavailableError,
    layer_modules,
    loss_scale,
)
from gradtrace.gradient_flow.selection import select_layers

__all__ = [
    "STATS",
    "GradientFlow",
    "GradientFlowWarning",
    "NonFiniteGradientError",
    "input_output_ratio",
    "parameter_names",
    "read_history",
]

STATS: tuple[str, ...] = ("mean_abs", "l2", "max_abs", "nonfinite")
"""The per-layer statistics ``GradientFlow`` can record, in column order."""

NONFINITE_ACTIONS: tuple[str, ...] = ("warn", "raise")

# Children that wrappers (torch.compile, DDP/DataParallel, FSDP, activation checkpointing) insert
# between a model and its layers; their names never appear in layer names.
_WRAPPER_CHILDREN = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)

# Write the CSV at least this often (seconds) even inside a long epoch.
_FLUSH_INTERVAL_S = 60.0


class GradientFlowWarning(UserWarning):
    """Gradients vanish, explode, or are not finite (issued by :class:`GradientFlow`)."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or nan and ``GradientFlow(on_nonfinite="raise")`` stops training."""


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")


def parameter_names(module: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its name in ``module``, wrapper prefixes removed.

    Names are those of ``module.named_parameters()`` (same order, shared parameters once),
    except that the children which ``torch.compile`` (``_orig_mod``), DDP/DataParallel
    (``module``), FSDP and activation checkpointing insert are left out, so a compiled
    ``features.0.weight`` is still called ``features.0.weight``.
    """
    names: dict[int, str] = {}
    seen: set[int] = set()

    def visit(mod: nn.Module, prefix: str) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        for pname, param in mod._parameters.items():
            if param is not None and id(param) not in names:
                names[id(param)] = prefix + pname
        for cname, child in mod._modules.items():
            if child is None:
                continue
            wrapped = cname in _WRAPPER_CHILDREN or (
                cname == "module" and isinstance(mod, _DATA_PARALLEL)
            )
            visit(child, prefix if wrapped else f"{prefix}{cname}.")

    visit(module, "")
    return names


class _ForwardOrder:
    """Find the order in which modules owning parameters are first called (data-flow order).

    Forward pre-hooks are registered on every module that owns parameters directly, for one
    training batch. Hooks do not fire inside ``torch.compile``d code that was compiled before
    they existed, and hooks present while compiling get baked into the graph, so that batch
    runs under ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6).
    """

    def __init__(self, root: nn.Module) -> None:
        self.called: list[nn.Module] = []
        self._seen: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._stance: Any = None
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            # Constructing it switches the stance; __exit__ restores the previous one.
            self._stance = set_stance("force_eager")
        elif _contains_compiled(root):
            # Old torch: hooks would be compiled into the graph and fire forever after.
            return
        for mod in root.modules():
            if any(p is not None for p in mod._parameters.values()):
                self._handles.append(mod.register_forward_pre_hook(self._record))

    def _record(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.called.append(module)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None


def _contains_compiled(root: nn.Module) -> bool:
    return any(
        "_orig_mod" in mod._modules or getattr(mod, "_compiled_call_impl", None) is not None
        for mod in root.modules()
    )


def _norm_values(tensors: list[torch.Tensor], ords: Sequence[float]) -> list[float]:
    """Norms of every tensor for every order: ``[ord0 of each tensor, ord1 of each, ...]``.

    Batched: one ``torch._foreach_norm`` per order (per device and dtype), one stack and one
    device-to-host copy per device. Half-precision tensors are reduced in float32 so that sums
    over large layers cannot overflow.
    """
    n = len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    per_device: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
    for (device, dtype), idx in groups.items():
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        group = [tensors[i] for i in idx]
        norms = torch.stack([v for o in ords for v in torch._foreach_norm(group, o, dtype=acc)])
        per_device.setdefault(device, []).append((idx, norms))
    out = [math.nan] * (len(ords) * n)
    for parts in per_device.values():
        flat = parts[0][1] if len(parts) == 1 else torch.cat([t.double() for _, t in parts])
        values = flat.cpu().tolist()
        offset = 0
        for idx, _ in parts:
            m = len(idx)
            for k in range(len(ords)):
                for j, i in enumerate(idx):
                    out[k * n + i] = values[offset + k * m + j]
            offset += len(ords) * m
    return out


@dataclass
class _PendingStep:
    """A logged step waiting for its optimizer step to finish (for ``update_ratio``)."""

    records: list[dict[str, Any]]
    means: dict[str, float]
    params: list[torch.Tensor]
    before: list[torch.Tensor]


class GradientFlow(Callback):
    """Record per-layer gradient statistics at every logged optimizer step, plot and diagnose.

    Add it to any Lightning ``Trainer``::

        from gradtrace import GradientFlow
        trainer = Trainer(callbacks=[GradientFlow()])

    **What is measured.** For every parameter tensor of the optimizer that is stepping (a
    "layer", named as in ``pl_module.named_parameters()`` with ``torch.compile``/DDP wrapper
    prefixes removed; biases only with ``include_bias=True``; frozen parameters and those
    without a gradient that step are skipped):

    * ``mean_abs``: mean of ``|grad|`` (the report's Figure 2 measure),
    * ``l2``: the L2 norm of the gradient,
    * ``max_abs``: the largest ``|grad|`` entry,
    * ``nonfinite``: how many entries are inf or nan,
    * ``update_ratio`` (opt-in): ``||w_after - w_before|| / ||w_before||`` over the optimizer
      step; around 1e-3 is the classic healthy value.

    **Which gradients.** It runs in ``on_before_optimizer_step``, so it sees the gradients the
    optimizer uses: after AMP unscaling (16-mixed), after DDP's all-reduce (every rank holds
    the averaged gradient), accumulated over ``accumulate_grad_batches`` (one record per
    optimizer step), and *before* gradient clipping (``gradient_clip_val`` is applied after
    this hook). With a GradScaler (16-mixed), inf/nan gradients are normal on steps the scaler
    skips: they are recorded but neither warned about nor raised.

    **When.** At steps where ``step % every_n_steps == 0``, ``step`` being Lightning's logging
    step (``trainer.fit_loop.epoch_loop._batches_that_stepped``, the step loggers use; equal to
    ``trainer.global_step`` with one optimizer). Step 0, the initialisation, is always
    measured. Other steps cost nothing. A logged step costs a few batched device operations
    (``torch._foreach_norm``) and one device-to-host copy; non-finite entries are counted only
    when a norm is not finite.

    **Manual optimization and several optimizers.** ``on_before_optimizer_step`` fires once per
    ``LightningOptimizer.step()``; each call records the parameters of the optimizer that is
    stepping, under the logging step of the current batch (Lightning counts a batch once
    however many optimizers step in it). A parameter stepped twice in one logged batch gets
    two records with the same step.

    **Layer order.** Data-flow order: the order in which the modules owning the parameters are
    first called in the first training batch (found with forward pre-hooks that are then
    removed; the batch runs eagerly under ``torch.compiler.set_stance("force_eager")`` so
    compiled models are covered). Within a module, parameters keep their registration order
    (weight before bias); a container's own parameters (e.g. a positional embedding) take the
    container's place, before its children; parameters of modules never called (e.g. used
    directly in ``training_step``) come last, in registration order.

    **Reports.** Logger metrics ``grad_flow/<stat>/<layer>`` (every logger in
    ``trainer.loggers``); :attr:`history` (list of dicts with ``step``, ``layer`` and one key
    per stat); ``<log_dir>/gradient_flow.csv`` with the same columns, written by global rank
    0 at every epoch end, at the end of fit, on an exception and at least once a minute
    (``log_dir`` is ``trainer.log_dir``, else ``trainer.default_root_dir``; a new fit starts
    the file afresh, a fit resumed from a checkpoint appends to it); with matplotlib
    and ``plot=True``, one gradient-flow plot per epoch (``<log_dir>/gradient_flow/
    epoch_XXX.png``) and a layer x step heatmap at the end of fit (``heatmap.png``), also sent
    to W&B (``log_image``) and TensorBoard (``add_figure``) loggers.

    **Diagnosis** (global rank 0, from step ``warmup_steps`` on): the ratio of the input-side
    (first) to the output-side (last) layer's ``mean_abs``. Below ``vanishing_ratio`` or above
    ``exploding_ratio`` a :class:`GradientFlowWarning` is issued once, naming the step, the
    ratio and the pair of consecutive layers with the largest drop (or rise) toward the
    input. Pass ``None`` to switch a check off. Non-finite gradients warn once per layer
    (``on_nonfinite="warn"``) or stop training with :class:`NonFiniteGradientError` naming the
    first such layer in data-flow order and the step (``"raise"``, checked on every rank so
    DDP ranks stop together).

    Args:
        stats: which of ``mean_abs``, ``l2``, ``max_abs``, ``nonfinite`` to record.
        update_ratio: also record ``||dw|| / ||w||`` of each logged step (copies the
            parameters on logged steps).
        include_bias: also record bias parameters (names ending in ``bias``).
        every_n_steps: measure every this many steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        plot: draw plots when matplotlib is installed (needs ``"mean_abs"`` in ``stats``).
        log_scale: log-scale y axis in the per-epoch plots.
        warmup_steps: steps before the vanishing/exploding check starts.
        vanishing_ratio: warn when first/last ``mean_abs`` falls below this (``None``: never).
        exploding_ratio: warn when first/last ``mean_abs`` exceeds this (``None``: never).
        on_nonfinite: ``"warn"`` or ``"raise"`` on inf/nan gradients.
        filename: name of the CSV file inside the log directory.
        activations: also record the activation statistics of the same layers on the same
            steps (``act_mean``, ``act_std``, ``act_zero_frac``, ``act_sat_frac``,
            ``act_grad_mean_abs``; see ``docs/activations.md`` and
            :mod:`gradtrace.gradient_flow.activations`): extra columns of the same rows.
        dead_fraction: warn when a layer's ``act_zero_frac`` exceeds this (``None``: never).
        saturated_fraction: warn when a layer's ``act_sat_frac`` exceeds this (``None``:
            never).
        activation_patience: how many measured steps in a row a layer must be dead or
            saturated before the warning.
    """

    def __init__(
        self,
        *,
        stats: Sequence[str] = ("mean_abs", "l2", "max_abs", "nonfinite"),
        update_ratio: bool = False,
        include_bias: bool = False,
        every_n_steps: int | None = None,
        plot: bool = True,
        log_scale: bool = True,
        warmup_steps: int = 20,
        vanishing_ratio: float | None = 1e-3,
        exploding_ratio: float | None = 1e4,
        on_nonfinite: str = "warn",
        filename: str = "gradient_flow.csv",
        activations: bool = False,
        dead_fraction: float | None = 0.9,
        saturated_fraction: float | None = 0.9,
        activation_patience: int = 3,
    ) -> None:
        super().__init__()
        check_choice("activations", activations, (False, True))
        check_int("activation_patience", activation_patience, 1)
        # Checks the thresholds now; a fresh one per fit in _reset.
        ActivationDiagnosis(dead_fraction, saturated_fraction, activation_patience)
        if isinstance(stats, str):
            stats = (stats,)
        stats = tuple(stats)
        if not stats:
            raise ValueError(f"stats must name at least one of {', '.join(STATS)}; got none")
        for stat in stats:
            check_choice("stats entry", stat, STATS)
        if plot and "mean_abs" not in stats:
            raise ValueError(
                f"plot=True draws mean_abs, so stats must include 'mean_abs'; got {stats}"
                " (or pass plot=False)"
            )
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be a positive integer or None; got {every_n_steps!r}"
            )
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        if vanishing_ratio is not None and not (
            isinstance(vanishing_ratio, (int, float)) and 0 < vanishing_ratio < 1
        ):
            raise ValueError(
                f"vanishing_ratio must be a number in (0, 1) or None; got {vanishing_ratio!r}"
            )
        if exploding_ratio is not None and not (
            isinstance(exploding_ratio, (int, float)) and 1 < exploding_ratio < math.inf
        ):
            raise ValueError(
                f"exploding_ratio must be a finite number > 1 or None; got {exploding_ratio!r}"
            )
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(
                f"filename must be a plain file name such as 'gradient_flow.csv'; got {filename!r}"
            )

        self.stats = tuple(s for s in STATS if s in stats)
        self.update_ratio = update_ratio
        self.include_bias = include_bias
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.log_scale = log_scale
        self.warmup_steps = warmup_steps
        self.vanishing_ratio = vanishing_ratio
        self.exploding_ratio = exploding_ratio
        self.on_nonfinite = on_nonfinite
        self.filename = filename
        self.activations = activations
        self.dead_fraction = dead_fraction
        self.saturated_fraction = saturated_fraction
        self.activation_patience = activation_patience

        self.history: list[dict[str, Any]] = []
        """One dict per (logged step, layer): ``step``, ``layer`` and one key per stat."""
        self.csv_path: Path | None = None
        """Where the CSV goes (``<log_dir>/<filename>``), known once training starts."""
        self._columns = ["step", "layer", *self.stats] + (["update_ratio"] if update_ratio else [])
        self._columns += list(ACTIVATION_STATS) if activations else []
        self._reset()

    # ---------------------------------------------------------------- public helpers

    @property
    def layer_order(self) -> list[str]:
        """Names of the layers measured so far, in data-flow order (input first)."""
        measured = {r["layer"] for r in self.history} | set(self._latest)
        return sorted(measured, key=self._rank_of)

    def input_output_ratio(self, last_n: int = 1) -> float:
        """First over last layer's ``mean_abs`` (data-flow order), each averaged over its last
        ``last_n`` records. Far below 1: gradients vanish toward the input."""
        if not isinstance(last_n, int) or last_n < 1:
            raise ValueError(f"last_n must be a positive integer; got {last_n!r}")
        if "mean_abs" not in self.stats:
            raise ValueError("input_output_ratio needs 'mean_abs' in stats")
        return input_output_ratio(self.history, last_n, order=self.layer_order)

    # ---------------------------------------------------------------- state

    def _reset(self) -> None:
        self._interval = 1
        self._names: dict[int, str] = {}
        self._rank: dict[str, int] = {}
        # (id(optimizer), number of its parameters) -> its measurable parameters, in order
        self._candidates: dict[tuple[int, int], list[tuple[str, nn.Parameter]]] = {}
        self._order_finder: _ForwardOrder | None = None
        self._order_final = False
        self._latest: dict[str, float] = {}
        self._pending: list[_PendingStep] = []
        self._written = 0
        self._last_flush = time.monotonic()
        self._epoch_start = 0
        self._warned_vanishing = False
        self._warned_exploding = False
        self._warned_nonfinite: set[str] = set()
        self._plots_unavailable = False
        self._log_dir: Path | None = None
        self._activation_collector = ActivationCollector()
        self._activation_diagnosis = ActivationDiagnosis(
            self.dead_fraction, self.saturated_fraction, self.activation_patience
        )
        self._activations_unavailable = False

    def _rank_of(self, name: str) -> tuple[int, str]:
        return (self._rank.get(name, len(self._rank)), name)

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = trainer.fit_loop.epoch_loop._batches_that_stepped > 0
        history = self.history
        self._reset()
        if resumed:
            self.history = history
            self._written = len(history)
        else:
            self.history = []
        if self.every_n_steps is not None:
            self._interval = self.every_n_steps
        elif trainer.log_every_n_steps < 1:
            raise ValueError(
                "GradientFlow(every_n_steps=None) follows Trainer(log_every_n_steps=...), which "
                f"is {trainer.log_every_n_steps}; pass every_n_steps explicitly"
            )
        else:
            self._interval = trainer.log_every_n_steps
        # trainer.log_dir broadcasts from rank 0: every rank must ask.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._log_dir = Path(log_dir)
        self.csv_path = self._log_dir / self.filename
        self._names = parameter_names(pl_module)
        self._rank = {name: i for i, name in enumerate(self._names.values())}
        if trainer.is_global_zero:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            if not (resumed and self.csv_path.exists()):
                with self.csv_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._columns)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = len(self.history)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._order_final and self._order_finder is None:
            self._order_finder = _ForwardOrder(pl_module)
        # After the order finder: the compiler stances must be left in reverse order.
        self._start_activations(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        activation_stats = self._finish_activations(trainer)  # every rank: one all_reduce
        if step % self._interval:
            return
        # Rank 0 reports; with "raise" every rank checks so that DDP ranks stop together.
        if not (trainer.is_global_zero or self.on_nonfinite == "raise"):
            return
        if not self._order_final:
            self._update_order(final=False)
        named = self._grads_of(optimizer)
        if not named:
            return
        names = [name for name, _ in named]
        params = [p for _, p in named]
        # Sparse gradients (e.g. nn.Embedding(sparse=True)): their stored values give the
        # same L1/L2/max and non-finite count; the mean is over the dense size.
        grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params]
        ords = [1.0]
        if "l2" in self.stats:
            ords.append(2.0)
        if "max_abs" in self.stats:
            ords.append(math.inf)
        n = len(grads)
        values = _norm_values(grads, ords)  # one device-to-host copy
        by_ord = {o: values[k * n : (k + 1) * n] for k, o in enumerate(ords)}
        means = [l1 / p.numel() for l1, p in zip(by_ord[1.0], params)]
        nonfinite = [0] * n
        for i, v in enumerate(by_ord[1.0]):
            if not math.isfinite(v):  # rare: count the entries, one more sync each
                nonfinite[i] = int((~torch.isfinite(grads[i])).sum())
        if trainer.is_global_zero:
            columns = {
                "mean_abs": means,
                "l2": by_ord.get(2.0),
                "max_abs": by_ord.get(math.inf),
                "nonfinite": nonfinite,
            }
            records = [
                {
                    "step": step,
                    "layer": name,
                    **{s: columns[s][i] for s in self.stats},
                    **activation_stats.get(name, {}),
                }
                for i, name in enumerate(names)
            ]
            self._diagnose_activations(step, activation_stats)
            step_means = dict(zip(names, means))
            if self.update_ratio:
                with torch.no_grad():  # one batched copy of the weights before the step
                    before = list(torch._foreach_mul([p.detach() for p in params], 1.0))
                self._pending.append(_PendingStep(records, step_means, params, before))
            else:
                self._commit(trainer, records, step_means)
        bad = [(names[i], nonfinite[i], params[i].numel()) for i in range(n) if nonfinite[i]]
        if bad:
            self._handle_nonfinite(trainer, step, bad)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._order_finder is not None:
            self._update_order(final=True)
        if self._pending:
            self._finish_update_ratios(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activation_collector.detach()  # a measured batch that never stepped
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        records = self.history[self._epoch_start :]
        if records and self.plot:
            self._plot(trainer, "flow", records, f"epoch_{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activation_collector.detach()
        self._close_order_finder()
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        if self.history and self.plot:
            self._plot(trainer, "heatmap", self.history, "heatmap")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._activation_collector.detach()
        self._close_order_finder()
        if not trainer.is_global_zero:
            return
        pending, self._pending = self._pending, []
        for entry in pending:  # the optimizer step never finished
            for record in entry.records:
                record["update_ratio"] = math.nan
            self._commit(trainer, entry.records, entry.means)
        if self.csv_path is not None:
            self._flush_csv()

    # ---------------------------------------------------------------- measuring

    def _start_activations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the activation hooks for a measured step (all its micro-batches)."""
        if not self.activations or self._activations_unavailable:
            return
        if self._activation_collector.attached:
            return  # a later micro-batch of the same optimizer step
        if trainer.fit_loop.epoch_loop._batches_that_stepped % self._interval:
            return
        layers = layer_modules((layer.name, layer.module) for layer in select_layers(pl_module))
        try:
            self._activation_collector.attach(pl_module, layers)
        except ActivationsUnavailableError as err:
            self._activations_unavailable = True
            if trainer.is_global_zero:
                warnings.warn(
                    f"GradientFlow: no activation statistics: {err}",
                    GradientFlowWarning,
                    stacklevel=2,
                )

    def _finish_activations(self, trainer: pl.Trainer) -> dict[str, dict[str, float]]:
        """The measured step's activation statistics, reduced over ranks; hooks removed."""
        collector = self._activation_collector
        if not collector.attached:
            return {}
        collector.detach()
        return collector.compute(grad_scale=loss_scale(trainer.precision_plugin))

    def _diagnose_activations(self, step: int, stats: Mapping[str, Mapping[str, float]]) -> None:
        for message in self._activation_diagnosis.update(step, stats):
            warnings.warn(message, GradientFlowWarning, stacklevel=2)

    def _grads_of(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) with a gradient in ``optimizer``, in data-flow order."""
        groups = optimizer.param_groups
        key = (id(optimizer), sum(len(group["params"]) for group in groups))
        candidates = self._candidates.get(key) if self._order_final else None
        if candidates is None:
            found: dict[int, tuple[str, nn.Parameter]] = {}
            for g, group in enumerate(groups):
                for i, p in enumerate(group["params"]):
                    name = self._names.get(id(p), f"param_group{g}.{i}")
                    if id(p) not in found and (self.include_bias or not _is_bias(name)):
                        found[id(p)] = (name, p)
            candidates = sorted(found.values(), key=lambda item: self._rank_of(item[0]))
            self._candidates[key] = candidates
        return [(name, p) for name, p in candidates if p.grad is not None]

    def _update_order(self, final: bool) -> None:
        finder = self._order_finder
        if finder is None:
            return
        if final:
            self._close_order_finder()
            self._order_final = True
            self._candidates.clear()  # built with the provisional order
            if not finder.called and self._names:
                warnings.warn(
                    "GradientFlow could not see the forward pass (no module was called through "
                    "its hooks, e.g. compiled code on torch < 2.6), so layers are in "
                    "registration order, not data-flow order",
                    GradientFlowWarning,
                    stacklevel=2,
                )
        if not finder.called:
            return
        ordered: list[str] = []
        placed: set[str] = set()
        for mod in finder.called:
            for param in mod._parameters.values():
                name = self._names.get(id(param)) if param is not None else None
                if name is not None and name not in placed:
                    ordered.append(name)
                    placed.add(name)
        ordered += [name for name in self._names.values() if name not in placed]
        self._rank = {name: i for i, name in enumerate(ordered)}

    def _close_order_finder(self) -> None:
        if self._order_finder is not None:
            self._order_finder.close()
            self._order_finder = None

    def _finish_update_ratios(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, []
        tensors: list[torch.Tensor] = []
        with torch.no_grad():
            for entry in pending:
                tensors += torch._foreach_sub([p.detach() for p in entry.params], entry.before)
                tensors += entry.before
        values = _norm_values(tensors, [2.0])  # one device-to-host copy
        offset = 0
        for entry in pending:
            n = len(entry.records)
            deltas, norms = values[offset : offset + n], values[offset + n : offset + 2 * n]
            offset += 2 * n
            for record, d, w in zip(entry.records, deltas, norms):
                record["update_ratio"] = d / w if w else (math.inf if d else 0.0)
            self._commit(trainer, entry.records, entry.means)

    # ---------------------------------------------------------------- reporting

    def _commit(
        self, trainer: pl.Trainer, records: list[dict[str, Any]], means: dict[str, float]
    ) -> None:
        """Store, log and diagnose the records of one optimizer step (global rank 0)."""
        if not records:
            return
        self.history.extend(records)
        step = records[0]["step"]
        metrics = {  # activation columns only where the layer has them
            f"grad_flow/{key}/{r['layer']}": r[key]
            for r in records
            for key in self._columns[2:]
            if key in r
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for name, value in means.items():
            if math.isfinite(value):
                self._latest[name] = value
        if step >= self.warmup_steps:
            self._diagnose(step)
        if time.monotonic() - self._last_flush > _FLUSH_INTERVAL_S:
            self._flush_csv()

    def _diagnose(self, step: int) -> None:
        check_vanishing = self.vanishing_ratio is not None and not self._warned_vanishing
        check_exploding = self.exploding_ratio is not None and not self._warned_exploding
        if not (check_vanishing or check_exploding):
            return
        order = sorted(self._latest, key=self._rank_of)
        if len(order) < 2:
            return
        values = [self._latest[name] for name in order]
        if values[-1] == 0:
            return
        ratio = values[0] / values[-1]
        # factor[i]: how much mean |grad| changes from layer i+1 to layer i (toward the input)
        pairs = [
            (values[i] / values[i + 1], order[i + 1], order[i])
            for i in range(len(order) - 1)
            if values[i + 1] > 0
        ]
        if check_vanishing and ratio < self.vanishing_ratio:
            self._warned_vanishing = True
            factor, upper, lower = min(pairs)
            warnings.warn(
                f"Gradients vanish at step {step}: mean |grad| of the input-side layer "
                f"{order[0]!r} is {ratio:.3g} times that of the output-side layer {order[-1]!r} "
                f"(vanishing_ratio={self.vanishing_ratio:g}). The largest drop is from "
                f"{upper!r} to {lower!r} (x{factor:.3g} toward the input). Batch normalization, "
                "residual connections or another initialisation usually help.",
                GradientFlowWarning,
                stacklevel=2,
            )
        if check_exploding and ratio > self.exploding_ratio:
            self._warned_exploding = True
            factor, upper, lower = max(pairs)
            warnings.warn(
                f"Gradients explode at step {step}: mean |grad| of the input-side layer "
                f"{order[0]!r} is {ratio:.3g} times that of the output-side layer {order[-1]!r} "
                f"(exploding_ratio={self.exploding_ratio:g}). The largest rise is from "
                f"{upper!r} to {lower!r} (x{factor:.3g} toward the input). Gradient clipping, "
                "normalization or a smaller initialisation usually help.",
                GradientFlowWarning,
                stacklevel=2,
            )

    def _handle_nonfinite(
        self, trainer: pl.Trainer, step: int, bad: list[tuple[str, int, int]]
    ) -> None:
        """``bad``: (layer, non-finite count, size) in data-flow order."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return  # the GradScaler skips this step and lowers its scale: expected in fp16
        if self.on_nonfinite == "raise":
            name, count, numel = bad[0]
            others = f"; also in {', '.join(repr(b[0]) for b in bad[1:])}" if len(bad) > 1 else ""
            raise NonFiniteGradientError(
                f"non-finite gradient at step {step}: first in layer {name!r} "
                f"({count} of {numel} entries are inf or nan){others}"
            )
        if not trainer.is_global_zero:
            return
        for name, count, numel in bad:
            if name in self._warned_nonfinite:
                continue
            self._warned_nonfinite.add(name)
            warnings.warn(
                f"non-finite gradient at step {step} in layer {name!r}: {count} of {numel} "
                "entries are inf or nan",
                GradientFlowWarning,
                stacklevel=2,
            )

    def _flush_csv(self) -> None:
        """Append the records not yet on disk to the CSV (global rank 0)."""
        self._last_flush = time.monotonic()
        if self.csv_path is None or self._written >= len(self.history):
            return
        rows = self.history[self._written :]
        with self.csv_path.open("a", newline="") as f:
            writer = csv.writer(f)
            for record in rows:
                writer.writerow([record.get(column, "") for column in self._columns])
        self._written = len(self.history)

    def _plot(
        self, trainer: pl.Trainer, kind: str, records: list[dict[str, Any]], stem: str
    ) -> None:
        if self._plots_unavailable or self._log_dir is None:
            return
        try:
            import matplotlib  # noqa: F401  (optional: the "plot" extra)
        except ImportError as err:
            self._plots_unavailable = True
            rank_zero_info(
                f"GradientFlow: no gradient-flow plots ({err}); install matplotlib "
                "(pip install 'gradtrace[plot]') to get them. The CSV and logger metrics are "
                "unaffected."
            )
            return
        from gradtrace import plots

        order = sorted({r["layer"] for r in records}, key=self._rank_of)
        if kind == "flow":
            title = f"Gradient flow, epoch {trainer.current_epoch}"
            fig = plots.plot_gradient_flow(
                records, layers=order, log_scale=self.log_scale, title=title
            )
            key = "grad_flow/plot"
        else:
            fig = plots.plot_gradient_heatmap(records, layers=order, title="Gradient flow")
            key = "grad_flow/heatmap"
        path = plots.save_figure(fig, self._log_dir / "gradient_flow" / f"{stem}.png")
        plots.send_to_loggers(
            trainer.loggers, key, fig, path, step=trainer.fit_loop.epoch_loop._batches_that_stepped
        )


def input_output_ratio(
    history: Sequence[Mapping[str, Any]], last_n: int = 1, order: Sequence[str] | None = None
) -> float:
    """First over last layer's ``mean_abs`` in ``history`` (``GradientFlow.history`` or
    :func:`read_history`), each averaged over its last ``last_n`` records.

    ``order`` lists the layers input first; by default the order in which they first appear,
    which is data-flow order in what ``GradientFlow`` records and writes. Far below 1:
    gradients vanish toward the input.
    """
    layers = list(order) if order is not None else list(dict.fromkeys(r["layer"] for r in history))
    if len(layers) < 2:
        raise ValueError(
            f"input_output_ratio needs records of at least two layers; have {len(layers)}"
        )

    def average(layer: str) -> float:
        values = [r["mean_abs"] for r in history if r["layer"] == layer][-last_n:]
        return sum(values) / len(values)

    first, last = average(layers[0]), average(layers[-1])
    return first / last if last else math.inf


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``gradient_flow.csv`` back as the list of dicts of ``GradientFlow.history``.

    ``step`` and ``nonfinite`` become ``int``, ``layer`` stays a string, every other column
    (``mean_abs``, ``l2``, ``max_abs``, ``update_ratio``) becomes ``float``.
    """
    history: list[dict[str, Any]] = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            record: dict[str, Any] = {}
            for key, value in row.items():
                if key == "layer":
                    record[key] = value
                elif key in ("step", "nonfinite"):
                    record[key] = int(value)
                else:
                    record[key] = float(value) if value != "" else math.nan
            history.append(record)
    return history
