"""``GradientFlow``: the Lightning callback that measures per-layer gradients during training.

Thin glue over the pieces of this package: :func:`~gradtrace.measure.select_layers`
(which parameters), :func:`~gradtrace.gradient_flow.is_measured_step` (which steps),
:func:`~gradtrace.measure.grad_stats_table` (the values), the layer order (where each
gradient enters the backward pass), the activation recorder, the diagnosis and the records
(bounded history, CSV, loggers). Every feature runs guarded (:mod:`.faults`): an internal
error switches that feature off with one warning and training goes on. Plots need matplotlib
(``pip install 'gradtrace[plot]'``) and are skipped without it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradtrace.checks import check_choice, check_int
from gradtrace.gradient_flow.activation_recorder import ActivationDiagnosis, ActivationRecorder
from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.figures import draw_figure, matplotlib_missing
from gradtrace.gradient_flow.histogram_loggers import send_histograms
from gradtrace.gradient_flow.output_dir import output_directory
from gradtrace.gradient_flow.step import OptimizerLayers, measure, plan_layers
from gradtrace.measure.activations import ACTIVATION_STATS
from gradtrace.measure.diagnosis import Diagnosis, GradientFlowWarning
from gradtrace.measure.faults import Faults
from gradtrace.measure.order import LayerOrder
from gradtrace.measure.records import BoundedHistory, CsvRecords, input_output_ratio
from gradtrace.measure.selection import Layer, parameter_names, select_layers
from gradtrace.measure.shards import (
    FSDP1Groups,
    deepspeed_zero_stage,
    fsdp1_shard_groups,
    is_sharded,
)
from gradtrace.measure.stats import STATS
from gradtrace.measure.update_ratio import PendingUpdate

__all__ = ["GradientFlow"]

# Write the CSV at least this often (seconds) even inside a long epoch.
_FLUSH_INTERVAL_S = 60.0
_DEFAULT_FILENAME = "gradient_flow.csv"
_NAMESPACE = "grad_flow"


@dataclass
class _StepRecords:
    """One optimizer step's records, held until the end of its batch (activation statistics
    and update ratios are known only then)."""

    records: list[dict[str, Any]]
    summary: dict[str, float]
    update: PendingUpdate | None = None


class GradientFlow(Callback):
    """Record per-layer gradient statistics at Lightning's logging steps, plot and diagnose.

    Add it to any Lightning ``Trainer``::

        from gradtrace import GradientFlow
        trainer = Trainer(callbacks=[GradientFlow(activations=True)])

    At step 0, at every step Lightning's loggers write and at the last step it records, for
    each layer (by default the weights of convolutions, linear and embedding layers,
    attention input projections and recurrent layers), the gradient the optimizer is about to
    use (``mean_abs``, ``l2``, ``max_abs``, ``nonfinite``; exact under DDP, FSDP and DTensor),
    in data-flow order (where each gradient enters the backward pass). Records go to the
    loggers (``grad_flow/<stat>/<layer>``, plus ``grad_flow/grad_norm``,
    ``grad_flow/input_output_ratio`` and ``grad_flow/nonfinite``), to :attr:`history` and to
    ``<run dir>/<filename>``; plots go to ``<run dir>/<filename stem>/``. A
    :class:`GradientFlowWarning` says when gradients vanish, explode or are not finite, and,
    with ``activations=True``, when units are dead or saturated. An internal error switches
    the failing feature off with one warning; only ``on_nonfinite="raise"`` stops a run.
    The full reference is ``docs/callback.md``.

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
        dirpath: directory of the CSV and plots (default: the first logger's directory, as
            ``ModelCheckpoint`` finds it; ``default_root_dir/gradient_flow`` without one).
        plot: draw plots when matplotlib is installed (needs ``"mean_abs"`` in ``stats``).
        log_scale: log-scale y axis in the per-epoch plots.
        warmup_steps: steps before the vanishing/exploding check starts.
        vanishing_ratio: warn when input/output ``mean_abs`` falls below this (``None``: never).
        exploding_ratio: warn when input/output ``mean_abs`` exceeds this (``None``: never).
        on_nonfinite: ``"warn"`` or ``"raise"`` on inf/nan gradients.
        filename: name of the CSV file inside the run directory.
        activations: also record the activation statistics of the same layers on the same
            steps, as extra columns of the same rows (``act_mean``, ``act_std``,
            ``act_zero_frac``, ``act_sat_frac``, ``act_grad_mean_abs``; ``docs/activations.md``).
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
        filename: str = _DEFAULT_FILENAME,
        activations: bool = False,
        dead_fraction: float | None = 0.9,
        saturated_fraction: float | None = 0.9,
        activation_patience: int = 3,
    ) -> None:
        super().__init__()
        check_choice("activations", activations, (False, True))
        check_int("activation_patience", activation_patience, 1)
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
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(
                f"filename must be a plain file name such as 'gradient_flow.csv'; got {filename!r}"
            )
        select_layers(torch.nn.Module(), include, exclude)  # checks the patterns now
        self.diagnosis = Diagnosis(vanishing_ratio, exploding_ratio, warmup_steps, on_nonfinite)

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
        self.activation_diagnosis = ActivationDiagnosis(
            dead_fraction, saturated_fraction, activation_patience
        )

        self.csv_path: Path | None = None
        """Where the CSV goes (``<run dir>/<filename>``, or ``<stem>-v<N>.csv`` beside an
        earlier fit's), known once training starts."""
        self.namespace = _NAMESPACE
        """Prefix of every metric name: ``grad_flow``, or ``grad_flow-<filename stem>`` for
        the second and later GradientFlow of one Trainer."""
        self.last_step: int | None = None
        """The last step measured."""
        self._history = BoundedHistory(history_size)
        self._order = LayerOrder()
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
        return sorted(recorded, key=self._order.rank_of)

    @property
    def main_path(self) -> list[str]:
        """The recorded layers on the path to the model's primary output, input first."""
        return [name for name in self.layer_order if name in self._order.main_path]

    @property
    def faults(self) -> dict[str, BaseException]:
        """Features switched off in this fit after an internal error, with the error."""
        return dict(self._faults.failed)

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
        self._faults = Faults()
        self._scaler_in_use = False
        self._grads_unavailable = False  # DeepSpeed: the optimizer steps flat partitions
        self._layers: list[Layer] = []
        self._names: dict[int, str] = {}
        self._fsdp1_groups: FSDP1Groups | None = None
        self._plans: dict[tuple[int, int, int], OptimizerLayers] = {}
        self._batch: list[_StepRecords] = []
        self._stepped = False
        self._csv: CsvRecords | None = None
        self._last_flush = time.monotonic()
        self._epoch_first_step = 0
        self._plots_unavailable = False
        self._run_dir: Path | None = None
        self._activations = ActivationRecorder(self.activation_diagnosis)

    @property
    def state_key(self) -> str:
        # Two GradientFlows in one Trainer (e.g. gradients and activations at other cadences)
        # keep their own state in a checkpoint, told apart by where they write.
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {
            "diagnosis": self.diagnosis.state_dict(),
            "activation_diagnosis": self.activation_diagnosis.state_dict(),
            "last_step": self.last_step,
            "order": self._order.state_dict(),
            "history": self._history.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnosis.load_state_dict(state_dict["diagnosis"])
        self.activation_diagnosis.load_state_dict(state_dict["activation_diagnosis"])
        self.last_step = state_dict["last_step"]
        self._order.load_state_dict(state_dict["order"])
        self._history.load_state_dict(state_dict["history"])

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = logging_step(trainer) > 0
        self._reset_fit()
        if not resumed:
            self._history = BoundedHistory(self.history_size)
            self.diagnosis.reset()
            self.activation_diagnosis.reset()
            self.last_step = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler_in_use = scaler is not None and scaler.is_enabled()
        self.namespace = self._find_namespace(trainer)
        self._run_dir = output_directory(trainer, self.dirpath)  # every rank: it broadcasts
        self.csv_path = self._run_dir / self.filename
        with self._faults.guard("gradients"):
            self._layers = select_layers(pl_module, self.include, self.exclude)
            self._names = parameter_names(pl_module)
            # The FSDP1 root wraps pl_module (trainer.model): read its units' sharding here,
            # since the measuring hook passes parameters, not the module.
            self._fsdp1_groups = fsdp1_shard_groups(trainer.model or pl_module)
            self._check_settings(trainer)
        with self._faults.guard("order"):
            self._order.start(self._names, keep=resumed)
        if trainer.is_global_zero:
            with self._faults.guard("files"):
                self._csv = CsvRecords(self.csv_path, self.columns)
                earlier = self._csv.start(resume_step=logging_step(trainer) if resumed else None)
                self.csv_path = self._csv.path
                if earlier is not None:
                    rank_zero_info(
                        f"GradientFlow: {earlier} holds an earlier fit's records; this fit "
                        f"writes {self.csv_path.name} beside it"
                    )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_first_step = logging_step(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stepped = False
        self._faults.run("order", self._order.watch, pl_module)
        if self.activations and self._faults.active("activations") and self._measured(trainer):
            self._faults.run(
                "activations", self._activations.start, trainer, pl_module, self._layers
            )

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._order.watching:
            self._faults.run("order", self._order.backward, loss)
        self._activations.pause()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations.resume()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations.pause()  # between micro-batches of an accumulated measured step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations.resume()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        if self._grads_unavailable or not self._faults.active("gradients"):
            return
        if not self._measured(trainer):
            return
        with self._faults.guard("gradients"):
            self._measure(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._order.watching:
            with self._faults.guard("order"):
                self._order.end_watch()
                self._plans.clear()  # built with the provisional order
        # Automatic optimization may accumulate over several batches before it steps.
        if self._activations.attached and (self._stepped or not pl_module.automatic_optimization):
            self._add_activation_stats(trainer)
        self._finish_batch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations.close()  # a measured batch that never stepped
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        records = [r for r in self.history if r["step"] >= self._epoch_first_step]
        if records and self.plot:
            self._plot(trainer, "flow", records, f"epoch_{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations.close()
        self._order.close()
        if not trainer.is_global_zero:
            return
        self._flush_csv()
        history = self.history
        if history and self.plot:
            self._plot(trainer, "heatmap", history, "heatmap")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._activations.close()
        self._order.close()
        batch, self._batch = self._batch, []
        if not trainer.is_global_zero:
            return
        for entry in batch:  # the batch never finished
            if entry.update is not None:
                entry.update.abandon()
            self._emit(trainer, entry.records, entry.summary)
        self._flush_csv()

    # ---------------------------------------------------------------- measuring

    def _measured(self, trainer: pl.Trainer) -> bool:
        measured = False
        with self._faults.guard("gradients"):
            measured = self.is_measured_step(trainer)
        return measured

    def _check_settings(self, trainer: pl.Trainer) -> None:
        """Settings known only at train start: said with one warning each, never raised."""
        zero_stage = deepspeed_zero_stage(trainer.strategy)
        self._grads_unavailable = zero_stage is not None
        if self._grads_unavailable:
            warnings.warn(
                f"GradientFlow does not measure under DeepSpeed (ZeRO stage {zero_stage}): its "
                "optimizer steps flat partitions, not the model's parameters, so this run "
                "records nothing. gradtrace.grad_stats(pl_module) in on_before_optimizer_step "
                "reads ZeRO's gradient partitions exactly (with fp16, pass "
                "scale=<the DeepSpeed optimizer's loss_scale>)",
                GradientFlowWarning,
                stacklevel=3,
            )
        if self.every_n_steps is None and trainer.log_every_n_steps < 1:
            warnings.warn(
                f"GradientFlow follows Trainer(log_every_n_steps={trainer.log_every_n_steps}): "
                "only the first and the last step are measured; pass every_n_steps to measure "
                "more",
                GradientFlowWarning,
                stacklevel=3,
            )
        if self.update_ratio and any(is_sharded(layer.param) for layer in self._layers):
            self._faults.disable("update_ratio", ValueError("sharded parameters"))
            warnings.warn(
                "GradientFlow(update_ratio=True) needs whole parameters on global rank 0; with "
                "sharded parameters (FSDP, DTensor) this fit records no update ratios",
                GradientFlowWarning,
                stacklevel=3,
            )

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Measure ``optimizer``'s layers (every rank); hold the records until the batch ends."""
        step = logging_step(trainer)
        if self._order.watching:
            self._faults.run("order", self._order.update)
        plan = self._plan(optimizer)
        measured = measure(plan, optimizer, trainer.precision_plugin, self._fsdp1_groups)
        if measured is None:
            return
        self._order.note_gradients(plan.names[i] for i in measured.present)
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        suffix = f"/optimizer_{index}" if index else ""
        summary = measured.summary_values(self.namespace, suffix)
        for key, value in summary.items():
            # The loggers get them with the per-layer values (step 0 included); this is for
            # EarlyStopping, ModelCheckpoint and the progress bar.
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=False)
        self.last_step = step
        records = measured.records(step, self.stats)
        skipped = self._scaler_in_use and measured.any_nonfinite
        if self._scaler_in_use:
            for record in records:
                record["scaler_skipped"] = int(skipped)
        entry = _StepRecords(records, summary)
        self._batch.append(entry)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._faults.run(
                "histograms", self._send_histograms, trainer, plan, measured.layer_rows, step
            )
        if trainer.is_global_zero:
            if self.update_ratio:
                params = [plan.params[i] for i in measured.layer_rows]
                entry.update = self._faults.run(
                    "update_ratio", PendingUpdate.snapshot, records, params
                )
            self._faults.run("diagnosis", self.diagnosis.check_path, step, measured.path_means())
        if not skipped:  # a GradScaler skips such steps: expected in fp16
            self.diagnosis.nonfinite(
                step, measured.nonfinite_layers(), report=trainer.is_global_zero
            )

    def _plan(self, optimizer: torch.optim.Optimizer) -> OptimizerLayers:
        """The parameters ``optimizer`` steps, in data-flow order, and which are layers."""
        params = sum(len(group["params"]) for group in optimizer.param_groups)
        key = (id(optimizer), params, self._order.version)
        plan = self._plans.get(key)
        if plan is None:
            layer_ids = {id(layer.param) for layer in self._layers}
            order = self._order
            plan = plan_layers(optimizer, self._names, layer_ids, order.rank_of, order.main_path)
            self._plans[key] = plan
        return plan

    def _add_activation_stats(self, trainer: pl.Trainer) -> None:
        """Read the measured batch's activation statistics into its records (every rank)."""
        stats: dict[str, dict[str, float]] = {}
        with self._faults.guard("activations"):
            stats = self._activations.finish(trainer)  # every rank: one all_reduce
        for entry in self._batch:
            for record in entry.records:
                record.update(stats.get(record["layer"], {}))
        if stats:
            blank = (r["layer"] for e in self._batch for r in e.records if "act_mean" not in r)
            self._activations.report_blank(trainer, blank)
        if stats and trainer.is_global_zero:
            self._faults.run("diagnosis", self._activations.diagnose, logging_step(trainer), stats)

    def _finish_batch(self, trainer: pl.Trainer) -> None:
        """The batch is over: fill in update ratios and emit its records (global rank 0)."""
        batch, self._batch = self._batch, []
        if not trainer.is_global_zero:
            return
        for entry in batch:
            if entry.update is not None:
                self._faults.run("update_ratio", entry.update.finish)
            self._emit(trainer, entry.records, entry.summary)

    # ---------------------------------------------------------------- reporting

    def _find_namespace(self, trainer: pl.Trainer) -> str:
        """``grad_flow``, unless other GradientFlows of this Trainer use it (see
        :attr:`namespace`)."""
        flows = [cb for cb in trainer.callbacks if isinstance(cb, GradientFlow)]
        taken: set[str] = set()
        for flow in flows:
            base = _NAMESPACE
            if len(flows) > 1 and flow.filename != _DEFAULT_FILENAME:
                base = f"{_NAMESPACE}-{Path(flow.filename).stem}"
            name, k = base, 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
            taken.add(name)
            if flow is self:
                return name
        return _NAMESPACE

    def _emit(
        self, trainer: pl.Trainer, records: list[dict[str, Any]], summary: dict[str, float]
    ) -> None:
        """Store, log and write the records of one optimizer step (global rank 0): the one
        place records leave the callback."""
        if not records:
            return
        self._history.extend(records)
        if self._csv is not None:
            self._faults.run("files", self._csv.add, records)
        self._faults.run("loggers", self._log_metrics, trainer, records, summary)
        if time.monotonic() - self._last_flush > _FLUSH_INTERVAL_S:
            self._flush_csv()

    def _log_metrics(
        self, trainer: pl.Trainer, records: list[dict[str, Any]], summary: dict[str, float]
    ) -> None:
        metrics = {
            f"{self.namespace}/{key}/{r['layer']}": r[key]
            for r in records
            for key in self.columns[2:]
            if key in r
        }
        metrics.update(summary)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=records[0]["step"])

    def _send_histograms(
        self, trainer: pl.Trainer, plan: OptimizerLayers, rows: list[int], step: int
    ) -> None:
        # Every rank: with sharded gradients each takes part in combining its shards.
        named = [(plan.names[i], plan.params[i]) for i in rows]
        send_histograms(
            trainer.loggers,
            named,
            step,
            write=trainer.is_global_zero,
            fsdp1_groups=self._fsdp1_groups,
        )

    def _flush_csv(self) -> None:
        self._last_flush = time.monotonic()
        if self._csv is not None:
            self._faults.run("files", self._csv.flush)

    def _plot(
        self, trainer: pl.Trainer, kind: str, records: list[dict[str, Any]], stem: str
    ) -> None:
        if self._plots_unavailable or self.csv_path is None or not self._faults.active("plots"):
            return
        missing = matplotlib_missing()
        if missing is not None:
            self._plots_unavailable = True
            rank_zero_info(
                f"GradientFlow: no gradient-flow plots ({missing}); install matplotlib "
                "(pip install 'gradtrace[plot]') to get them. The CSV and logger metrics are "
                "unaffected."
            )
            return
        order = sorted({r["layer"] for r in records}, key=self._order.rank_of)
        path = self.csv_path.parent / self.csv_path.stem / f"{stem}.png"
        step = logging_step(trainer)
        self._faults.run(
            "plots", draw_figure, trainer, kind, records, order, path, step, self.log_scale
        )
