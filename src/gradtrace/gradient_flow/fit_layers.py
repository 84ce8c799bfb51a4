"""One fit's layers and how they are measured, on every rank: which parameters are layers,
each optimizer's parameters in data-flow order (:func:`~.step.plan_layers`, rebuilt when the
layer order changes), the measurement of a step, and the other readers of the same gradients
and weights: histograms, and the optimizer side of the step (what it did with them)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from gradtrace.compat import loss_scale_tensor, optimizer_handles_unscaling
from gradtrace.gradient_flow.held_records import PendingOptimizerStep
from gradtrace.gradient_flow.histogram_loggers import send_histograms
from gradtrace.gradient_flow.step import Measurement, OptimizerLayers, measure, plan_layers
from gradtrace.measure.faults import Faults
from gradtrace.measure.optimizer_stats import OptimizerStep
from gradtrace.measure.order import LayerOrder
from gradtrace.measure.selection import Layer, parameter_names, select_layers
from gradtrace.measure.shards import FSDP1Groups, fsdp1_shard_groups

__all__ = ["FitLayers"]


class FitLayers:
    """The layers of one fit (none until :meth:`select`), ordered by ``order``, with
    histograms every ``histogram_every_n_steps`` (``None``: never) and the optimizer side of
    measured steps with ``optimizer_stats``; each feature's failures go to ``faults``."""

    def __init__(
        self,
        order: LayerOrder,
        faults: Faults,
        histogram_every_n_steps: int | None,
        optimizer_stats: bool,
    ) -> None:
        self.layers: list[Layer] = []
        self.names: dict[int, str] = {}
        """Every parameter's name, by ``id``."""
        self.fsdp1_groups: FSDP1Groups | None = None
        self._order = order
        self._faults = faults
        self._histogram_every_n_steps = histogram_every_n_steps
        self._optimizer_stats = optimizer_stats
        self._plans: dict[tuple[int, int, int], OptimizerLayers] = {}

    def select(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        include: Sequence[str | type],
        exclude: Sequence[str | type],
    ) -> None:
        """Find ``pl_module``'s layers and parameter names (at train start)."""
        self.layers = select_layers(pl_module, include, exclude)
        self.names = parameter_names(pl_module)
        # The FSDP1 root wraps pl_module (trainer.model): read its units' sharding here,
        # since the measuring hook passes parameters, not the module.
        self.fsdp1_groups = fsdp1_shard_groups(trainer.model or pl_module)

    def measure(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Measurement | None:
        """Measure the layers ``optimizer`` steps (every rank must: sharded gradients are
        combined in one collective); ``None`` when no parameter has a gradient. Tells the
        layer order which parameters had one."""
        plan = self._plan(optimizer)
        measured = measure(plan, optimizer, trainer.precision_plugin, self.fsdp1_groups)
        if measured is not None:
            self._order.note_gradients(plan.names[i] for i in measured.present)
        return measured

    def end_order_watch(self) -> None:
        """A watched batch is over: the layer order is settled until the next one."""
        if self._order.watching:
            with self._faults.guard("order"):
                self._order.end_watch()
                self._plans.clear()  # built with the provisional order

    def send_histograms_if_due(self, trainer: pl.Trainer, measured: Measurement, step: int) -> None:
        """Send the measured layers' gradient histograms to the loggers that take them, every
        ``histogram_every_n_steps``. Every rank calls it: with sharded gradients each takes
        part in combining its shards."""
        every = self._histogram_every_n_steps
        if every and step % every == 0:
            self._faults.run("histograms", self._send_histograms, trainer, measured, step)

    def start_optimizer_side(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        measured: Measurement,
        clipped_norm_key: str,
        adam: bool,
    ) -> PendingOptimizerStep | None:
        """With ``optimizer_stats``, copy the weights ``optimizer`` is about to step and hook
        its step (every rank), to fill the records of ``measured`` once it has stepped."""
        if not (self._optimizer_stats and self._faults.active("optimizer_stats")):
            return None
        plan = measured.plan
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaled = scaler is not None and scaler.is_enabled()
        # An optimizer that unscales itself steps with the gradients still scaled.
        grad_scale = None
        if scaled and optimizer_handles_unscaling(optimizer):
            grad_scale = lambda: loss_scale_tensor(scaler)  # noqa: E731
        with self._faults.guard("optimizer_stats"):
            step = OptimizerStep.start(
                optimizer,
                [plan.params[i] for i in measured.present],
                fsdp1_groups=self.fsdp1_groups,
                grad_scale=grad_scale,
            )
            row = {i: k for k, i in enumerate(measured.present)}
            rows = [row[i] for i in measured.layer_rows]
            return PendingOptimizerStep(step, rows, clipped_norm_key, adam)
        return None

    def _send_histograms(self, trainer: pl.Trainer, measured: Measurement, step: int) -> None:
        plan = measured.plan
        named = [(plan.names[i], plan.params[i]) for i in measured.layer_rows]
        write = trainer.is_global_zero
        send_histograms(trainer.loggers, named, step, write=write, fsdp1_groups=self.fsdp1_groups)

    def _plan(self, optimizer: torch.optim.Optimizer) -> OptimizerLayers:
        """The parameters ``optimizer`` steps, in data-flow order (first updated from the
        backward passes of a watched batch), and which are layers."""
        if self._order.watching:
            self._faults.run("order", self._order.update)
        params = sum(len(group["params"]) for group in optimizer.param_groups)
        key = (id(optimizer), params, self._order.version)
        plan = self._plans.get(key)
        if plan is None:
            layer_ids = {id(layer.param) for layer in self.layers}
            order = self._order
            plan = plan_layers(optimizer, self.names, layer_ids, order.rank_of, order.main_path)
            self._plans[key] = plan
        return plan
