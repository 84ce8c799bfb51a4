"""The callback side of the gradient noise scale (``GradientFlow(noise_scale=True)``).

On a measured step, :class:`NoiseScaleRecorder` hooks the optimizer's parameters when the
batch starts (:class:`~gradtrace.measure.noise_scale.LocalGradientNorms`), counts each backward
pass (one per micro-batch) apart, and in ``on_before_optimizer_step`` compares them with the
gradient the optimizer uses: small batch = one micro-batch on one rank, big batch = all of them
(:func:`~gradtrace.measure.noise_scale.estimate_from_micro_batches`). Under DDP every rank's
sums travel in one ``all_gather`` that carries a failure flag, so an error on one rank switches
the feature off on every rank instead of leaving the others waiting; nothing that can fail on
one rank alone runs after it.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.data import extract_batch_size

from gradtrace.compat import (
    foreach_norm,
    is_fsdp1_flattened,
    loss_scale_tensor,
    optimizer_handles_unscaling,
)
from gradtrace.gradient_flow.settings import deepspeed_zero_stage
from gradtrace.measure.collectives import all_gather_guarded
from gradtrace.measure.diagnosis import GradientFlowWarning
from gradtrace.measure.noise_scale import (
    LocalGradientNorms,
    NoiseScaleEstimate,
    RunningNoiseScale,
    estimate_from_micro_batches,
)

__all__ = ["NoiseScaleRecorder", "noise_scale_unavailable"]

# warnings.warn's stacklevel that points past start() and Faults.run at Lightning's call of
# the callback's hook.
_HOOK_CALLER = 4
_ROW = 4  # a rank's sums: squared norms, the big gradient's, inverse sizes, micro-batches


def noise_scale_unavailable(
    *,
    world_size: int,
    accumulate_grad_batches: int,
    automatic_optimization: bool,
    optimizers: int,
    sharded: bool,
) -> str | None:
    """Why a fit with these settings cannot estimate the noise scale (``None``: it can)."""
    if sharded:
        return (
            "it needs each rank's own gradient of each backward pass, which no hook sees when "
            "parameters are sharded (FSDP, DTensor)"
        )
    if optimizers != 1:
        return f"it follows one optimizer's gradient; this fit has {optimizers}"
    if world_size >= 2 or (automatic_optimization and accumulate_grad_batches >= 2):
        return None
    if not automatic_optimization:
        return (
            "under manual optimization only DDP with 2 or more processes gives a second batch "
            "size; this fit runs 1 process"
        )
    return (
        "it needs two batch sizes: DDP with 2 or more processes, or accumulate_grad_batches "
        ">= 2; this fit runs 1 process with accumulate_grad_batches=1"
    )


def _is_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether a rank holds pieces of parameters: Lightning's FSDP or model-parallel strategy,
    FSDP1's flattened parameters or DTensors however they were made."""
    if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    params = (trainer.model or pl_module).parameters()
    return any(is_fsdp1_flattened(p) or hasattr(p, "device_mesh") for p in params)


class NoiseScaleRecorder:
    """Hooks on measured steps only, one estimate per measured optimizer step, averaged into
    ``average`` (kept by the callback across a resumed fit). ``requested``: whether
    ``noise_scale=True``. Only :meth:`step` raises: the other methods keep their error for it,
    so that every rank still takes part in its collective."""

    def __init__(self, average: RunningNoiseScale, requested: bool) -> None:
        self.average = average
        self._requested = requested
        self._enabled = False
        self._norms = LocalGradientNorms()
        self._params: list[torch.Tensor] = []
        self._measuring = False
        self._batch_size = 0
        self._sizes: list[int] = []
        self._error: Exception | None = None

    @property
    def requested(self) -> bool:
        """Whether ``noise_scale=True`` asked for it (it may still find it cannot)."""
        return self._requested

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At train start: whether this fit can estimate it; say once why not."""
        if not self._requested or deepspeed_zero_stage(trainer.strategy) is not None:
            return  # under DeepSpeed GradientFlow records nothing, and says so
        reason = noise_scale_unavailable(
            world_size=trainer.world_size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            automatic_optimization=pl_module.automatic_optimization,
            optimizers=len(trainer.optimizers),
            sharded=_is_sharded(trainer, pl_module),
        )
        self._enabled = reason is None
        if reason is not None and trainer.is_global_zero:
            warnings.warn(
                f"GradientFlow(noise_scale=True) logs no noise scale in this fit: {reason} "
                "(docs/instruments.md)",
                GradientFlowWarning,
                stacklevel=_HOOK_CALLER,
            )

    def batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """A measured batch (or micro-batch) begins: hooks on, its size noted."""
        if not self._enabled:
            return
        # A step measured from a later micro-batch on (the fit's last batch, should_stop) would
        # miss the earlier ones' gradients: Lightning starts accumulating where this holds.
        window_start = batch_idx % trainer.accumulate_grad_batches == 0
        if not (self._measuring or window_start or not pl_module.automatic_optimization):
            return
        self._measuring = True  # first: this rank takes part in the step's collective
        try:
            if not self._norms.attached:
                optimizer = trainer.optimizers[0]
                self._params = [p for g in optimizer.param_groups for p in g["params"]]
                self._norms.attach(self._params)
            self._batch_size = extract_batch_size(batch)
        except Exception as err:  # raised by step(), on every rank
            self._error = self._error or err

    def backward_start(self) -> None:
        """A backward pass begins: a micro-batch of its own."""
        if not self._measuring:
            return
        try:
            self._norms.open()
            self._sizes.append(self._batch_size)
        except Exception as err:  # raised by step(), on every rank
            self._error = self._error or err

    def backward_end(self) -> None:
        self._norms.close()

    def step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        namespace: str,
    ) -> dict[str, float] | None:
        """The measured step's summary scalars (every rank: one collective under DDP), also
        logged through ``pl_module``; ``None`` when the step is not measured, ``{}`` when it
        gives no estimate."""
        if not self._measuring:
            return None
        try:
            estimate = self._estimate(trainer, pl_module, optimizer)
        except Exception:
            self.close()
            raise
        if estimate is None or not self.average.update(estimate):
            return {}
        values = {
            "noise_scale": self.average.value,
            "noise_scale_step": estimate.noise_scale,
            "noise_scale_trace": self.average.trace,
            "noise_scale_grad_sq": self.average.grad_sq,
        }
        summary = {f"{namespace}/{key}": value for key, value in values.items()}
        for key, value in summary.items():  # for EarlyStopping and the progress bar
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=False)
        return summary

    def batch_end(self, stepped: bool) -> None:
        """The batch is over: a measured step ends once its optimizer has stepped."""
        if stepped:
            self.close()

    def close(self) -> None:
        """Remove the hooks and forget the step."""
        self._norms.detach()
        self._measuring = False
        self._sizes = []
        self._error = None

    def _estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> NoiseScaleEstimate | None:
        world = trainer.world_size
        if world > 1:
            rows = all_gather_guarded(
                lambda: self._local_row(trainer, pl_module, optimizer), (1, _ROW), torch.float64
            )
            totals = rows.sum(dim=(0, 1)).tolist()
        else:
            totals = self._local_row(trainer, pl_module, optimizer)[0].tolist()
        squared_norms, mean_sq_norm, inverse_sizes, micro_batches = totals
        # Manual optimization: how a user's several backward passes add up is unknown.
        if not pl_module.automatic_optimization and micro_batches != world:
            return None
        # Every rank holds the same (averaged) gradient: the gather added it world times.
        return estimate_from_micro_batches(
            squared_norms, micro_batches, inverse_sizes, mean_sq_norm / world
        )

    def _local_row(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        """``[1 x 4]``: this rank's sum of its micro-batches' squared gradient norms, the squared
        norm of the mean of every micro-batch's gradient (the optimizer's gradient), the sum of
        the inverses of the micro-batch sizes, and their number."""
        error = self._error or self._norms.error
        if error is not None:
            raise error
        norms = self._norms.take()
        sizes, self._sizes = self._sizes, []
        zero = torch.zeros((), dtype=torch.float64, device=self._norms.device)
        small = torch.stack([n.to(zero) for n in norms]).sum() if norms else zero
        grads = [p.grad for p in self._params if p.grad is not None]
        dtype = torch.float64 if zero.device.type == "cpu" else torch.float32
        grad_norms = [n.to(zero) for n in foreach_norm(grads, 2.0, dtype)] if grads else []
        big = torch.stack(grad_norms).square().sum() if grad_norms else zero
        # Automatic optimization divides each micro-batch's loss by accumulate_grad_batches
        # and adds their gradients: both are brought back to mean gradients.
        divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        small = small * divisor**2
        if norms:
            big = big * (divisor / len(norms)) ** 2
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: the hooks saw scaled gradients
            scale_sq = loss_scale_tensor(scaler).to(zero) ** 2
            small = small / scale_sq
            if optimizer_handles_unscaling(optimizer):  # Lightning left .grad scaled
                big = big / scale_sq
        counts = torch.tensor([sum(1.0 / size for size in sizes), len(sizes)], dtype=torch.float64)
        counts = counts.to(zero.device, non_blocking=True)
        return torch.cat([torch.stack([small, big]), counts]).unsqueeze(0)
