"""``GradientFlow``: the Lightning callback that measures per-layer gradients during training.

Thin glue over the pieces of this package: :func:`~gradtrace.gradient_flow.select_layers`
(which parameters), :func:`~gradtrace.gradient_flow.is_measured_step` (which steps),
:func:`~gradtrace.gradient_flow.grad_stats_table` (the values), the forward probe (layer order
and main path), :class:`~gradtrace.gradient_flow.diagnosis.Diagnosis` (warnings) and the
records (bounded history, CSV, loggers). Plots need matplotlib (``pip install
'gradtrace[plot]'``) and are skipped without it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradtrace.checks import check_choice, check_int
from gradtrace.gradient_flow.activations import (
    ACTIVATION_STATS,
    ActivationCollector,
    ActivationDiagnosis,
    ActivationsUnavailableError,
    layer_modules,
    loss_scale,
)
from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.diagnosis import Diagnosis, GradientFlowWarning
from gradtrace.gradient_flow.order import ForwardProbe, data_flow_order
from gradtrace.gradient_flow.records import BoundedHistory, CsvRecords, input_output_ratio
from gradtrace.gradient_flow.run_dir import run_directory
from gradtrace.gradient_flow.selection import Layer, parameter_names, select_layers
from gradtrace.gradient_flow.stats import STATS, grad_stats_table

__all__ = ["GradientFlow"]

NONFINITE_ACTIONS: tuple[str, ...] = ("warn", "raise")

# Write the CSV at least this often (seconds) even inside a long epoch.
_FLUSH_INTERVAL_S = 60.0


@dataclass
class _OptimizerLayers:
    """What one optimizer steps: every trainable parameter (for the global norm and the
    non-finite count) and, among them, the rows that are recorded layers."""

    names: list[str]
    params: list[torch.Tensor]
    layer_rows: list[int]
    path_rows: list[int]
    """Rows of main-path layers in data-flow order: input end first, output end last."""


@dataclass
class _PendingStep:
    """A measured step waiting for its optimizer step to finish (for ``update_ratio``)."""

    records: list[dict[str, Any]]
    params: list[torch.Tensor]
    before: list[torch.Tensor]


class GradientFlow(Callback):
    """Record per-layer gradient statistics at Lightning's logging steps, plot and diagnose.

    Add it to any Lightning ``Trainer``::

        from gradtrace import GradientFlow
        trainer = Trainer(callbacks=[GradientFlow()])

    **Layers.** By default the ``weight`` of every weight-bearing module (``Conv*``, ``Linear``,
    ``Embedding`` and subclasses), named as in ``pl_module.named_parameters()`` without
    ``torch.compile``/DDP/FSDP wrapper prefixes (``net.conv1.weight``). ``include`` adds
    parameters by name glob (``"*.bias"``, ``"net.cls_token"``) or owning module type
    (``"BatchNorm2d"``, ``nn.LayerNorm``); ``exclude`` removes them, applied last. Frozen
    parameters, and those without a gradient at a step, are not recorded.

    **Values** (``stats``), over the full tensor under every strategy
    (:func:`~gradtrace.gradient_flow.grad_stats`): ``mean_abs`` (mean ``|grad|``, the
    coursework report's Figure 2 measure), ``l2``, ``max_abs``, ``nonfinite`` (inf/nan
    entries); ``update_ratio`` (opt-in): ``||w_after - w_before|| / ||w_before||``.

    **Which gradients.** Those the optimizer uses, in ``on_before_optimizer_step``: unscaled
    under 16-mixed (divided by the GradScaler's scale when the optimizer unscales itself, as
    fused Adam does), averaged over DDP ranks, accumulated over ``accumulate_grad_batches``,
    before gradient clipping. Steps the GradScaler skips (inf/nan gradients) are recorded with
    ``scaler_skipped=1`` and never warned about.

    **When** (:func:`~gradtrace.gradient_flow.is_measured_step`): at step 0, at the steps
    Lightning's loggers write (``(step + 1) % log_every_n_steps == 0``, or ``every_n_steps``
    when given, or when training stops) and at the last step of the fit. ``step`` is
    Lightning's logging step (``_batches_that_stepped``, the step loggers and
    ``LearningRateMonitor`` use). Other steps cost nothing.

    **Order and main path.** Layers are in data-flow order (the order their modules are first
    called in the first training batch). The layers reachable through autograd from the
    model's primary output (the first tensor it returns) are the main path; auxiliary heads
    are recorded but are never the output end.

    **Outputs.** Logger metrics ``grad_flow/<stat>/<layer>``; summary scalars through
    ``pl_module.log`` (for ``EarlyStopping``, ``ModelCheckpoint``, the progress bar):
    ``grad_flow/input_output_ratio`` (input over output end of the main path's ``mean_abs``),
    ``grad_flow/grad_norm`` (L2 norm of all of the optimizer's gradients, before clipping) and
    ``grad_flow/nonfinite``, suffixed ``/optimizer_<i>`` for optimizers after the first;
    :attr:`history` (the last ``history_size`` records per layer); ``<run dir>/<filename>``
    (every record, written by global rank 0 at epoch ends, at the end of fit, on an exception
    and at least once a minute); with matplotlib and ``plot=True``, per-epoch plots and a
    final heatmap in ``<run dir>/gradient_flow/``, also sent to W&B and TensorBoard.
    ``histogram_every_n_steps`` sends gradient histograms (computed on the device) to
    TensorBoard and W&B.

    **Run directory**: ``dirpath`` if given, else derived like ``ModelCheckpoint``'s: the first
    logger's ``log_dir`` (CSV, TensorBoard), ``save_dir/name/version`` for other loggers (W&B:
    ``save_dir/project/run_id``), ``default_root_dir`` without loggers. A fit resumed from a
    checkpoint appends to the CSV when the directory is the same; in a new directory it starts
    a new CSV whose steps continue.

    **Diagnosis** (global rank 0, from step ``warmup_steps`` on, per optimizer): input end
    over output end of that optimizer's main path. Below ``vanishing_ratio`` or above
    ``exploding_ratio`` a :class:`GradientFlowWarning` is issued once, naming the step, the
    ratio and the pair of consecutive layers with the largest drop (or rise). Non-finite
    gradients warn once per layer (``on_nonfinite="warn"``) or stop training on every rank
    with :class:`NonFiniteGradientError` (``"raise"``). Warn-once flags, the last step, the
    layer order and the history are in :meth:`state_dict`, so a resumed fit keeps them.

    Args:
        include: name globs or module types (or type names) whose parameters are also layers.
        exclude: name globs or module types removed from the layers (applied last).
        stats: which of ``mean_abs``, ``l2``, ``max_abs``, ``nonfinite`` to record.
        update_ratio: also record ``||dw|| / ||w||`` (copies the layers on measured steps).
        every_n_steps: measure when ``(step + 1) % every_n_steps == 0`` (plus the first and
            last step); ``None`` follows ``Trainer(log_every_n_steps=...)``.
        history_size: records kept in :attr:`history` per layer (``None``: all).
        histogram_every_n_steps: send gradient histograms every this many steps (``None``:
            never).
        dirpath: directory of the CSV and plots (default: the run directory, above).
        plot: draw plots when matplotlib is installed (needs ``"mean_abs"`` in ``stats``).
        log_scale: log-scale y axis in the per-epoch plots.
        warmup_steps: steps before the vanishing/exploding check starts.
        vanishing_ratio: warn when input/output ``mean_abs`` falls below this (``None``: never).
        exploding_ratio: warn when input/output ``mean_abs`` exceeds this (``None``: never).
        on_nonfinite: ``"warn"`` or ``"raise"`` on inf/nan gradients.
        filename: name of the CSV file inside the run directory.
        activations: also record the activation statistics of the same layers on the same
            steps, as extra columns of the same rows (``act_mean``, ``act_std``,
            ``act_zero_frac``, ``act_sat_frac``, ``act_grad_mean_abs``; see
            :mod:`gradtrace.gradient_flow.activations` and ``docs/activations.md``).
        dead_fraction: warn when a layer's ``act_zero_frac`` exceeds this (``None``: never).
        saturated_fraction: warn when a layer's ``act_sat_frac`` exceeds this (``None``:
            never).
        activation_patience: measured steps in a row a layer must be dead or saturated before
            the warning.
    """

    def __init__(
        self,
        *,
        include: Sequence[str | type] = (),
        exclude: Sequence[str | type] = (),
        stats: Sequence[str] = STATS,
        update_ratio: bool = False,
        every_n_steps: int | None = None,
        history_size: int | None = 1000,
        histogram_every_n_steps: int | None = None,
        dirpath: str | Path | None = None,
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
        # Checks the thresholds now; a fresh one per fit in _reset_fit.
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
        check_int("every_n_steps", every_n_steps, 1, optional=True)
        check_int("history_size", history_size, 1, optional=True)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        check_int("warmup_steps", warmup_steps, 0)
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
        select_layers(torch.nn.Module(), include, exclude)  # checks the patterns now

        self.include = tuple(include) if not isinstance(include, (str, type)) else (include,)
        self.exclude = tuple(exclude) if not isinstance(exclude, (str, type)) else (exclude,)
        self.stats = tuple(s for s in STATS if s in stats)
        self.update_ratio = update_ratio
        self.every_n_steps = every_n_steps
        self.history_size = history_size
        self.histogram_every_n_steps = histogram_every_n_steps
        self.dirpath = dirpath
        self.plot = plot
        self.log_scale = log_scale
        self.filename = filename
        self.activations = activations
        self.dead_fraction = dead_fraction
        self.saturated_fraction = saturated_fraction
        self.activation_patience = activation_patience
        self.diagnosis = Diagnosis(vanishing_ratio, exploding_ratio, warmup_steps, on_nonfinite)

        self.csv_path: Path | None = None
        """Where the CSV goes (``<run dir>/<filename>``), known once training starts."""
        self.last_step: int | None = None
        """The last step measured."""
        self._history = BoundedHistory(history_size)
        self._order: list[str] = []
        self._main_path: set[str] = set()
        self._reset_fit()

    # ---------------------------------------------------------------- public helpers

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history_size`` records of every layer, in the order recorded: one dict
        per (step, layer) with ``step``, ``layer`` and one key per column of the CSV."""
        return self._history.records()

    @property
    def layer_order(self) -> list[str]:
        """Names of the layers recorded so far, in data-flow order (input first)."""
        recorded = {r["layer"] for r in self._history.records()}
        return sorted(recorded, key=self._rank_of)

    @property
    def main_path(self) -> list[str]:
        """The recorded layers on the path to the model's primary output, input first."""
        return [name for name in self.layer_order if name in self._main_path]

    def input_output_ratio(self, last_n: int = 1) -> float:
        """Input end over output end of the main path's ``mean_abs``, each averaged over its
        last ``last_n`` records. Far below 1: gradients vanish toward the input."""
        if not isinstance(last_n, int) or last_n < 1:
            raise ValueError(f"last_n must be a positive integer; got {last_n!r}")
        if "mean_abs" not in self.stats:
            raise ValueError("input_output_ratio needs 'mean_abs' in stats")
        path = self.main_path or self.layer_order
        return input_output_ratio(self.history, last_n, order=path)

    def is_measured_step(self, trainer: pl.Trainer) -> bool:
        """Whether the current training batch is measured (the one place that decides)."""
        return is_measured_step(trainer, self.every_n_steps)

    @property
    def columns(self) -> list[str]:
        """The columns of every record and of the CSV, in order (the one place that says)."""
        columns = ["step", "layer", *self.stats]
        if self.update_ratio:
            columns.append("update_ratio")
        if self._scaler_in_use:
            columns.append("scaler_skipped")
        if self.activations:
            columns += ACTIVATION_STATS
        return columns

    # ---------------------------------------------------------------- state

    def _reset_fit(self) -> None:
        """Per-fit state (rebuilt by every ``fit``)."""
        self._scaler_in_use = False
        self._layers: list[Layer] = []
        self._names: dict[int, str] = {}
        self._per_optimizer: dict[tuple[int, int], _OptimizerLayers] = {}
        self._probe: ForwardProbe | None = None
        self._order_final = False
        self._latest: dict[int, dict[str, float]] = {}
        self._pending: list[_PendingStep] = []
        self._csv: CsvRecords | None = None
        self._last_flush = time.monotonic()
        self._epoch_first_step = 0
        self._plots_unavailable = False
        self._run_dir: Path | None = None
        self._activation_collector = ActivationCollector()
        self._activation_diagnosis = ActivationDiagnosis(
            self.dead_fraction, self.saturated_fraction, self.activation_patience
        )
        self._activations_unavailable = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "diagnosis": self.diagnosis.state_dict(),
            "last_step": self.last_step,
            "order": list(self._order),
            "main_path": sorted(self._main_path),
            "history": self._history.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnosis.load_state_dict(state_dict["diagnosis"])
        self.last_step = state_dict["last_step"]
        self._order = list(state_dict["order"])
        self._main_path = set(state_dict["main_path"])
        self._history.load_state_dict(state_dict["history"])

    def _rank_of(self, name: str) -> tuple[int, str]:
        rank = self._order.index(name) if name in self._order else len(self._order)
        return (rank, name)

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = logging_step(trainer) > 0
        self._reset_fit()
        if not resumed:
            self._history = BoundedHistory(self.history_size)
            self._order, self._main_path = [], set()
            self.diagnosis.load_state_dict(Diagnosis(None, None, 0, "warn").state_dict())
            self.last_step = None
        if self.every_n_steps is None and trainer.log_every_n_steps < 1:
            raise ValueError(
                "GradientFlow(every_n_steps=None) follows Trainer(log_every_n_steps=...), which "
                f"is {trainer.log_every_n_steps}; pass every_n_steps explicitly"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler_in_use = scaler is not None and scaler.is_enabled()
        self._run_dir = run_directory(trainer, self.dirpath)  # every rank: it broadcasts
        self.csv_path = self._run_dir / self.filename
        self._layers = select_layers(pl_module, self.include, self.exclude)
        self._names = parameter_names(pl_module)
        if not self._order:
            self._order = list(self._names.values())
        if trainer.is_global_zero:
            self._csv = CsvRecords(self.csv_path, self.columns)
            self._csv.start(append=resumed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_first_step = logging_step(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._order_final and self._probe is None:
            self._probe = ForwardProbe(pl_module)
        # After the probe: compiler stances must be left in the reverse order.
        self._start_activations(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        activation_stats = self._finish_activations(trainer)  # every rank: one all_reduce
        if not self.is_measured_step(trainer):
            return
        step = logging_step(trainer)
        if not self._order_final:
            self._update_order(final=False)
        plan = self._plan(optimizer)
        present = [i for i, p in enumerate(plan.params) if p.grad is not None or _sharded(p)]
        if not present:
            return
        scale = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and _optimizer_handles_unscaling(optimizer):
            scale = scaler._get_scale_async()  # Lightning did not unscale: divide on the device
        stats = ("mean_abs", "l2", "max_abs", "nonfinite")
        named = [(plan.names[i], plan.params[i]) for i in present]
        _, table = grad_stats_table(named, stats, scale=scale)  # every rank: may be collective
        self._log_summary(pl_module, optimizer, table, plan, present)
        values = table.cpu().tolist()  # the one device-to-host copy of a measured step
        self.last_step = step
        row_of = {i: k for k, i in enumerate(present)}
        layer_rows = [i for i in plan.layer_rows if i in row_of]
        records = []
        for i in layer_rows:
            mean_abs, l2, max_abs, nonfinite = values[row_of[i]]
            values_of = {"mean_abs": mean_abs, "l2": l2, "max_abs": max_abs}
            values_of["nonfinite"] = int(nonfinite)
            record = {"step": step, "layer": plan.names[i], **{s: values_of[s] for s in self.stats}}
            record.update(activation_stats.get(plan.names[i], {}))
            records.append(record)
        skipped = self._scaler_in_use and any(values[k][3] for k in range(len(present)))
        if self._scaler_in_use:
            for record in records:
                record["scaler_skipped"] = int(skipped)
        latest = self._latest.setdefault(id(optimizer), {})
        for i in layer_rows:
            if math.isfinite(values[row_of[i]][0]):
                latest[plan.names[i]] = values[row_of[i]][0]
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._send_histograms(trainer, plan, layer_rows, step)
        if trainer.is_global_zero:
            if self.update_ratio:
                params = [plan.params[i] for i in layer_rows]
                with torch.no_grad():  # one batched copy of the weights before the step
                    before = list(torch._foreach_mul([p.detach() for p in params], 1.0))
                self._pending.append(_PendingStep(records, params, before))
            else:
                self._emit(trainer, records)
            path = [(plan.names[i], latest[plan.names[i]]) for i in plan.path_rows]
            self.diagnosis.check_path(step, [entry for entry in path if entry[0] in latest])
            self._diagnose_activations(step, activation_stats)
        if not skipped:
            sizes = [plan.params[i].numel() for i in layer_rows]
            bad = [
                (r["layer"], int(values[row_of[i]][3]), n)
                for r, i, n in zip(records, layer_rows, sizes)
                if values[row_of[i]][3]
            ]
            self.diagnosis.nonfinite(step, bad, report=trainer.is_global_zero)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._probe is not None:
            self._update_order(final=True)
        if self._pending:
            self._finish_update_ratios(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activation_collector.detach()  # a measured batch that never stepped
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        records = [r for r in self.history if r["step"] >= self._epoch_first_step]
        if records and self.plot:
            self._plot(trainer, "flow", records, f"epoch_{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activation_collector.detach()
        self._close_probe()
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        history = self.history
        if history and self.plot:
            self._plot(trainer, "heatmap", history, "heatmap")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._activation_collector.detach()
        self._close_probe()
        if not trainer.is_global_zero:
            return
        pending, self._pending = self._pending, []
        for entry in pending:  # the optimizer step never finished
            for record in entry.records:
                record["update_ratio"] = math.nan
            self._emit(trainer, entry.records)
        self._flush_csv()

    # ---------------------------------------------------------------- measuring

    def _start_activations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the activation hooks for a measured step (all its micro-batches)."""
        if not self.activations or self._activations_unavailable:
            return
        if self._activation_collector.attached or not self.is_measured_step(trainer):
            return  # attached: a later micro-batch of the same optimizer step
        layers = layer_modules((layer.name, layer.module) for layer in self._layers)
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

    def _plan(self, optimizer: torch.optim.Optimizer) -> _OptimizerLayers:
        """The parameters ``optimizer`` steps, in data-flow order, and which are layers."""
        key = (id(optimizer), sum(len(group["params"]) for group in optimizer.param_groups))
        plan = self._per_optimizer.get(key) if self._order_final else None
        if plan is not None:
            return plan
        found: dict[int, tuple[str, torch.Tensor]] = {}
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad and id(p) not in found:
                    found[id(p)] = (self._names.get(id(p), f"param_group{g}.{i}"), p)
        ordered = sorted(found.values(), key=lambda item: self._rank_of(item[0]))
        layer_ids = {id(layer.param) for layer in self._layers}
        names = [name for name, _ in ordered]
        layer_rows = [i for i, (_, p) in enumerate(ordered) if id(p) in layer_ids]
        on_path = [i for i in layer_rows if names[i] in self._main_path]
        plan = _OptimizerLayers(names, [p for _, p in ordered], layer_rows, on_path or layer_rows)
        self._per_optimizer[key] = plan
        return plan

    def _log_summary(
        self,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        table: torch.Tensor,
        plan: _OptimizerLayers,
        present: list[int],
    ) -> None:
        """Summary scalars through ``pl_module.log``, as device tensors (no host sync)."""
        optimizers = pl_module.trainer.optimizers
        index = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        suffix = f"/optimizer_{index}" if index else ""
        l2 = torch.nan_to_num(table[:, 1], nan=math.inf)
        scalars = {
            f"grad_flow/grad_norm{suffix}": l2.square().sum().sqrt(),
            f"grad_flow/nonfinite{suffix}": table[:, 3].sum(),
        }
        row_of = {i: k for k, i in enumerate(present)}
        path = [row_of[i] for i in plan.path_rows if i in row_of]
        if len(path) >= 2:
            scalars[f"grad_flow/input_output_ratio{suffix}"] = (
                table[path[0], 0] / table[path[-1], 0]
            )
        for key, value in scalars.items():
            pl_module.log(key, value.float(), on_step=True, on_epoch=False)

    def _update_order(self, final: bool) -> None:
        probe = self._probe
        if probe is None:
            return
        if final:
            self._close_probe()
            self._order_final = True
            self._per_optimizer.clear()  # built with the provisional order
            if not probe.called and self._names:
                import warnings

                from gradtrace.gradient_flow.diagnosis import GradientFlowWarning

                warnings.warn(
                    "GradientFlow could not see the forward pass (no module was called through "
                    "its hooks, e.g. compiled code on torch < 2.6), so layers are in "
                    "registration order, not data-flow order",
                    GradientFlowWarning,
                    stacklevel=2,
                )
        if probe.called:
            self._order = data_flow_order(probe.called, self._names)
        self._main_path = {name for i, name in self._names.items() if i in probe.main_path}

    def _close_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _finish_update_ratios(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, []
        with torch.no_grad():
            for entry in pending:
                deltas = torch._foreach_sub([p.detach() for p in entry.params], entry.before)
                norms = (
                    torch.stack(
                        [
                            torch.stack(torch._foreach_norm(deltas)),
                            torch.stack(torch._foreach_norm(entry.before)),
                        ]
                    )
                    .double()
                    .cpu()
                    .tolist()
                )
                for record, d, w in zip(entry.records, norms[0], norms[1]):
                    record["update_ratio"] = d / w if w else (math.inf if d else 0.0)
                self._emit(trainer, entry.records)

    # ---------------------------------------------------------------- reporting

    def _emit(self, trainer: pl.Trainer, records: list[dict[str, Any]]) -> None:
        """Store, log and write the records of one optimizer step (global rank 0): the one
        place records leave the callback."""
        if not records:
            return
        self._history.extend(records)
        if self._csv is not None:
            self._csv.add(records)
        step = records[0]["step"]
        metrics = {
            f"grad_flow/{key}/{r['layer']}": r[key]
            for r in records
            for key in self.columns[2:]
            if key in r
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if time.monotonic() - self._last_flush > _FLUSH_INTERVAL_S:
            self._flush_csv()

    def _send_histograms(
        self, trainer: pl.Trainer, plan: _OptimizerLayers, rows: list[int], step: int
    ) -> None:
        from gradtrace.gradient_flow.histograms import send_histograms

        grads = [(plan.names[i], plan.params[i].grad) for i in rows]
        send_histograms(trainer.loggers if trainer.is_global_zero else [], grads, step)

    def _flush_csv(self) -> None:
        self._last_flush = time.monotonic()
        if self._csv is not None:
            self._csv.flush()

    def _plot(
        self, trainer: pl.Trainer, kind: str, records: list[dict[str, Any]], stem: str
    ) -> None:
        if self._plots_unavailable or self._run_dir is None:
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
        path = plots.save_figure(fig, self._run_dir / "gradient_flow" / f"{stem}.png")
        plots.send_to_loggers(trainer.loggers, key, fig, path, step=logging_step(trainer))


def _sharded(param: torch.Tensor) -> bool:
    """A parameter whose gradient this rank may not hold (FSDP1 original parameters)."""
    return bool(getattr(param, "_fsdp_flattened", False))
