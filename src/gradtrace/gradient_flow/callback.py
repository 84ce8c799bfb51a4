"""``GradientFlow``: the Lightning callback that measures per-layer gradients during training.

Its hooks follow a training step and hand off to one fit's state (:mod:`.fit_state`): at train
start the layers (:mod:`.fit_layers`) and settings (:mod:`.settings`); on a measured batch the
gradients before each optimizer step, held (:mod:`.held_records`) until the batch ends, then
reported (:mod:`.reporting`); at every step the flight recorder and the noise scale
(:mod:`.step_instruments`); figures at each epoch's end (:mod:`.figures`). Every feature runs
guarded (:mod:`gradtrace.measure.faults`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from gradtrace.gradient_flow.activation_recorder import ActivationDiagnosis
from gradtrace.gradient_flow.cadence import is_measured_step, logging_step
from gradtrace.gradient_flow.fit_state import FitState
from gradtrace.gradient_flow.flight import Spike
from gradtrace.gradient_flow.output_dir import output_directory
from gradtrace.gradient_flow.reporting import (
    DEFAULT_FILENAME,
    NAMESPACE,
    metric_namespaces,
    record_columns,
)
from gradtrace.gradient_flow.settings import (
    check_arguments,
    check_flight_recorder,
    check_noise_scale,
)
from gradtrace.measure.diagnosis import Diagnosis
from gradtrace.measure.noise_scale import RunningNoiseScale
from gradtrace.measure.order import LayerOrder
from gradtrace.measure.records import BoundedHistory, input_output_ratio
from gradtrace.measure.stats import STATS

__all__ = ["GradientFlow"]


class GradientFlow(Callback):
    """Record per-layer gradient statistics at Lightning's logging steps, plot and diagnose.
    What is recorded when, where it goes and what is warned about: ``docs/callback.md``.

    Example::

        from gradtrace import GradientFlow

        flow = GradientFlow(activations=True)
        Trainer(callbacks=[flow]).fit(model, data)
        flow.input_output_ratio(last_n=5)  # far below 1: gradients vanish toward the input

    Args:
        include: name globs or module types (or type names) whose parameters are also layers.
        exclude: name globs or module types removed from the layers (applied last).
        stats: which of ``mean_abs``, ``l2``, ``max_abs``, ``nonfinite`` to record.
        optimizer_stats: also record the optimizer side of measured steps: per layer the
            update's norm, the weight norm, their ratio and (Adam family) the mean ``|m|`` and
            ``sqrt(v)``; the gradient norm after clipping as a summary scalar.
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
        flight_recorder: keep the last this many steps (>= 20) of every layer's gradient,
            update and activation norms on the device, at every step; when the loss spikes or
            goes non-finite, write ``spike_<step>.csv`` and ``.png`` into the run directory and
            warn, naming the first layer to depart from its own history (``None``: off;
            ``docs/instruments.md``).
        spike_threshold: the loss's robust z-score over its previous 50 steps above which
            the flight recorder calls a spike (also a layer's departure threshold).
        noise_scale: also log the gradient noise scale on measured steps, ``<namespace>/
            noise_scale`` and its terms (needs DDP or ``accumulate_grad_batches >= 2``;
            ``docs/instruments.md``).
        noise_scale_decay: decay of the noise scale's running averages, in (0, 1).
    """

    def __init__(
        self,
        *,
        include: Sequence[str | type] = (),
        exclude: Sequence[str | type] = (),
        stats: Sequence[str] = STATS,
        optimizer_stats: bool = False,
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
        filename: str = DEFAULT_FILENAME,
        activations: bool = False,
        dead_fraction: float | None = 0.9,
        saturated_fraction: float | None = 0.9,
        activation_patience: int = 3,
        flight_recorder: int | None = None,
        spike_threshold: float = 6.0,
        noise_scale: bool = False,
        noise_scale_decay: float = 0.9,
    ) -> None:
        super().__init__()
        self.stats, self.include, self.exclude = check_arguments(
            include=include,
            exclude=exclude,
            stats=stats,
            plot=plot,
            every_n_steps=every_n_steps,
            history_size=history_size,
            histogram_every_n_steps=histogram_every_n_steps,
            filename=filename,
            activations=activations,
            activation_patience=activation_patience,
        )
        check_flight_recorder(flight_recorder, spike_threshold)
        check_noise_scale(noise_scale, noise_scale_decay)
        self.noise_scale = noise_scale
        self._noise_scale_average = RunningNoiseScale(noise_scale_decay)
        self.flight_recorder = flight_recorder
        self.spike_threshold = spike_threshold
        self.diagnosis = Diagnosis(vanishing_ratio, exploding_ratio, warmup_steps, on_nonfinite)
        self.optimizer_stats = optimizer_stats
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
        self.namespace = NAMESPACE
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
        return dict(self._fit.faults.failed)

    @property
    def spikes(self) -> list[Spike]:
        """What the flight recorder found in this fit: each loss spike (or non-finite loss or
        value) with the first layer to depart from its own history and the CSV written."""
        return self._fit.instruments.spikes

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
        return record_columns(
            self.stats,
            optimizer_stats=self.optimizer_stats,
            adam=self._fit.adam_in_use,
            scaler_in_use=self._fit.scaler_in_use,
            activations=self.activations,
        )

    # ---------------------------------------------------------------- state

    def _reset_fit(self) -> None:
        """Per-fit state (rebuilt by every ``fit``)."""
        self._fit = FitState(
            order=self._order,
            history=self._history,
            histogram_every_n_steps=self.histogram_every_n_steps,
            optimizer_stats=self.optimizer_stats,
            plot=self.plot,
            log_scale=self.log_scale,
            activation_diagnosis=self.activation_diagnosis,
            flight_recorder=self.flight_recorder,
            spike_threshold=self.spike_threshold,
            noise_scale=self.noise_scale,
            noise_scale_average=self._noise_scale_average,
        )

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
            "noise_scale": self._noise_scale_average.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnosis.load_state_dict(state_dict["diagnosis"])
        self.activation_diagnosis.load_state_dict(state_dict["activation_diagnosis"])
        self.last_step = state_dict["last_step"]
        self._order.load_state_dict(state_dict["order"])
        self._history.load_state_dict(state_dict["history"])
        if "noise_scale" in state_dict:  # absent from checkpoints written before it existed
            self._noise_scale_average.load_state_dict(state_dict["noise_scale"])

    # ---------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = logging_step(trainer) > 0
        csv_path = self._start_fit(trainer, resumed=resumed)
        fit = self._fit
        fit.select_layers(trainer, pl_module, self.include, self.exclude, self.every_n_steps)
        with fit.faults.guard("order"):
            self._order.start(fit.layers.names, keep=resumed)
        if trainer.is_global_zero:  # a resumed fit appends to its CSV from its step on
            resume_step = logging_step(trainer) if resumed else None
            self.csv_path = self._fit.outlets.open_csv(csv_path, self.columns, resume_step)
        fit.instruments.start(trainer, pl_module, fit.layers, csv_path.parent, self._order.rank_of)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.epoch_first_step = logging_step(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        fit = self._fit
        fit.stepped = False
        fit.faults.run("order", self._order.watch, pl_module)
        if self.activations and fit.faults.active("activations") and self._measured(trainer):
            fit.faults.run(
                "activations", fit.activations.start, trainer, pl_module, fit.layers.layers
            )
        measured = lambda: self._measured(trainer)  # noqa: E731
        fit.instruments.batch_start(trainer, pl_module, batch, batch_idx, measured)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._order.watching:
            self._fit.faults.run("order", self._order.backward, loss)
        self._fit.activations.pause()
        self._fit.instruments.before_backward(loss)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.activations.resume()
        self._fit.instruments.after_backward()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.activations.pause()  # between micro-batches of an accumulated measured step
        self._fit.instruments.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.activations.resume()
        self._fit.instruments.resume()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        fit = self._fit
        fit.stepped = True
        step = (trainer, pl_module, optimizer)
        noise_scale = fit.instruments.before_optimizer_step(*step, self.namespace)
        if fit.grads_unavailable or not fit.faults.active("gradients"):
            return
        if self._measured(trainer):
            with fit.faults.guard("gradients"):
                settings = {"stats": self.stats, "namespace": self.namespace}
                measured = fit.measure_gradients(
                    *step, **settings, diagnosis=self.diagnosis, extra_summary=noise_scale
                )
                self.last_step = self.last_step if measured is None else measured

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._fit.end_batch(trainer, pl_module, self.columns[2:], self.namespace)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.activations.close()  # a measured batch that never stepped
        if trainer.is_global_zero:
            self._fit.outlets.flush()
            epoch = [r for r in self.history if r["step"] >= self._fit.epoch_first_step]
            stem = f"epoch_{trainer.current_epoch:03d}"
            self._fit.figures.draw(trainer, "flow", epoch, self.csv_path, stem)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.activations.close()
        self._order.close()
        if trainer.is_global_zero:
            self._fit.outlets.flush()
            self._fit.figures.draw(trainer, "heatmap", self.history, self.csv_path, "heatmap")
        self._fit.instruments.train_end(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._fit.activations.close()
        self._order.close()
        self._release_records(trainer, stepped=False)  # the batch never finished
        if trainer.is_global_zero:
            self._fit.outlets.flush()
        self._fit.instruments.exception(trainer)

    # ---------------------------------------------------------------- the steps of a fit

    def _start_fit(self, trainer: pl.Trainer, *, resumed: bool) -> Path:
        """Fresh per-fit state (a fit that does not resume also forgets the last one's records
        and warnings) and the metric namespace; returns where the CSV goes."""
        if not resumed:
            self._history = BoundedHistory(self.history_size)
            self.diagnosis.reset()
            self.activation_diagnosis.reset()
            self._noise_scale_average.reset()
            self.last_step = None
        self._reset_fit()
        self._fit.configure(trainer)
        flows = [cb for cb in trainer.callbacks if isinstance(cb, GradientFlow)]
        namespaces = metric_namespaces([flow.filename for flow in flows])
        self.namespace = next((n for f, n in zip(flows, namespaces) if f is self), NAMESPACE)
        run_dir = output_directory(trainer, self.dirpath)  # every rank: it broadcasts
        self.csv_path = run_dir / self.filename
        return self.csv_path

    def _measured(self, trainer: pl.Trainer) -> bool:
        return self._fit.measured(trainer, self.every_n_steps)

    def _release_records(self, trainer: pl.Trainer, *, stepped: bool) -> None:
        values = self.columns[2:]  # after step and layer
        self._fit.release_records(trainer, values, self.namespace, stepped=stepped)
