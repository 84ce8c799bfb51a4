"""The gradient noise scale of "An Empirical Model of Large-Batch Training" (McCandlish, Kaplan,
Amodei et al., 2018): ``B_simple = tr(Sigma) / |G|^2``, the batch size around which a bigger
batch stops shortening training (``G``: the true gradient; ``Sigma``: the covariance of one
sample's gradient).

The mean gradient of ``B`` independent samples has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, so the
squared norms at two batch sizes give unbiased estimates of both terms (the paper's Appendix
A.1), :func:`estimate_noise_scale`. Their ratio is biased and noisy from one step to the next,
so the paper averages numerator and denominator separately and divides the averages:
:class:`RunningNoiseScale`. The two batch sizes come free from data parallelism and gradient
accumulation: each rank's gradient of each micro-batch (:class:`LocalGradientNorms`) is the
small batch, the gradient the optimizer uses the big one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from gradtrace.checks import check_range

__all__ = [
    "LocalGradientNorms",
    "NoiseScaleEstimate",
    "RunningNoiseScale",
    "estimate_from_micro_batches",
    "estimate_noise_scale",
]


class NoiseScaleEstimate(NamedTuple):
    """Unbiased estimates of the two terms of the noise scale, from one step."""

    grad_sq: float
    """``|G|^2``, the squared norm of the true gradient."""
    trace: float
    """``tr(Sigma)``, the trace of one sample's gradient covariance."""

    @property
    def noise_scale(self) -> float:
        """``trace / grad_sq`` (``nan`` when ``grad_sq`` is 0)."""
        return self.trace / self.grad_sq if self.grad_sq else math.nan


def estimate_noise_scale(
    small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
) -> NoiseScaleEstimate:
    """Both terms from the squared norms of mean gradients over ``small_batch`` and
    ``big_batch`` samples (``small_sq_norm`` itself may be a mean over several small batches)::

        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(
            f"the batch sizes must satisfy 0 < small_batch < big_batch; got {small_batch!r}"
            f" and {big_batch!r}"
        )
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1 / small_batch - 1 / big_batch)
    return NoiseScaleEstimate(grad_sq, trace)


def estimate_from_micro_batches(
    squared_norms_sum: float, micro_batches: float, inverse_sizes_sum: float, mean_sq_norm: float
) -> NoiseScaleEstimate | None:
    """Both terms from ``micro_batches`` mean gradients (each over its own micro-batch, on any
    rank): the sum of their squared norms, the sum of the inverses of their sizes, and the
    squared norm of their mean (the gradient a data-parallel optimizer step uses). ``None``
    with fewer than two micro-batches.

    Small batch: one micro-batch, ``B_small`` = the harmonic mean of their sizes; big batch:
    their mean, ``B_big = micro_batches * B_small``. Exact for unequal sizes too: the mean
    of ``n`` mean gradients over ``b_i`` samples has ``E|.|^2 = |G|^2 + tr(Sigma) sum(1 / b_i) /
    n^2``, and the mean of their squared norms ``|G|^2 + tr(Sigma) sum(1 / b_i) / n``.
    """
    if micro_batches < 2:
        return None
    small_batch = micro_batches / inverse_sizes_sum
    small_sq_norm = squared_norms_sum / micro_batches
    return estimate_noise_scale(
        small_sq_norm, small_batch, mean_sq_norm, micro_batches * small_batch
    )


class RunningNoiseScale:
    """Exponential moving averages (weight ``1 - decay`` on each new step) of both terms of
    :class:`NoiseScaleEstimate`; :attr:`value` divides them, as the paper does.

    The averages start from zero and are divided by the weight they have gathered (Adam's bias
    correction), so the first steps are not pulled toward zero; their ratio is the same either
    way.
    """

    def __init__(self, decay: float = 0.9) -> None:
        check_range("decay", decay, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        """Forget every step (a new fit)."""
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0  # the average of a constant 1: what the terms are divided by
        self.steps = 0
        """Steps averaged so far."""

    def update(self, estimate: NoiseScaleEstimate) -> bool:
        """Average one step in; a step with a non-finite term (a GradScaler's skipped step) is
        left out. Returns whether it was averaged in."""
        if not (math.isfinite(estimate.grad_sq) and math.isfinite(estimate.trace)):
            return False
        keep = self.decay
        self._grad_sq = keep * self._grad_sq + (1 - keep) * estimate.grad_sq
        self._trace = keep * self._trace + (1 - keep) * estimate.trace
        self._weight = keep * self._weight + (1 - keep)
        self.steps += 1
        return True

    @property
    def grad_sq(self) -> float:
        """The running ``|G|^2`` (``nan`` before the first step)."""
        return self._grad_sq / self._weight if self._weight else math.nan

    @property
    def trace(self) -> float:
        """The running ``tr(Sigma)`` (``nan`` before the first step)."""
        return self._trace / self._weight if self._weight else math.nan

    @property
    def value(self) -> float:
        """The running noise scale: the running ``tr(Sigma)`` over the running ``|G|^2``."""
        return self._trace / self._grad_sq if self._grad_sq else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_sq": self._grad_sq,
            "trace": self._trace,
            "weight": self._weight,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_sq = float(state["grad_sq"])
        self._trace = float(state["trace"])
        self._weight = float(state["weight"])
        self.steps = int(state["steps"])


class LocalGradientNorms:
    """The squared L2 norm of the gradient that each backward pass computes for the attached
    parameters: this process's own gradient of one micro-batch.

    A tensor hook (``param.register_hook``) receives a parameter's gradient of one backward pass
    before autograd adds it to ``.grad``: before gradient accumulation adds it to the earlier
    micro-batches' and before DDP's reducer (which runs after that addition) averages it over
    ranks. Between :meth:`open` and :meth:`close` each hook adds its gradient's squared norm to
    that backward pass's accumulator on the device (float64 on the CPU, where a float32 sum
    drifts), with no host synchronisation. An error in a hook never reaches the backward pass:
    it is kept in :attr:`error`, and the hooks stop adding.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._open: torch.Tensor | None = None
        self._device = torch.device("cpu")
        self.squared_norms: list[torch.Tensor] = []
        """One 0-d tensor per backward pass opened since the last :meth:`take`."""
        self.error: Exception | None = None
        """The first error a hook met, if any."""

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def device(self) -> torch.device:
        """Where the accumulators are: the first attached parameter's device."""
        return self._device

    def attach(self, params: Iterable[torch.Tensor]) -> None:
        """Hook ``params`` (those that require a gradient, each once)."""
        self.detach()
        seen: set[int] = set()
        for param in params:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                if not self._handles:
                    self._device = param.device
                self._handles.append(param.register_hook(self._add))

    def open(self) -> None:
        """A backward pass begins: its gradients go to a new accumulator."""
        dtype = torch.float64 if self._device.type == "cpu" else torch.float32
        self._open = torch.zeros((), dtype=dtype, device=self._device)
        self.squared_norms.append(self._open)

    def close(self) -> None:
        """The backward pass is over: gradients until the next :meth:`open` are not counted."""
        self._open = None

    def take(self) -> list[torch.Tensor]:
        """The squared norms of the backward passes since the last call, and forget them."""
        self.close()
        norms, self.squared_norms = self.squared_norms, []
        return norms

    def detach(self) -> None:
        """Remove the hooks and forget what they counted (and any error)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.take()
        self.error = None

    def _add(self, grad: torch.Tensor) -> None:
        if self._open is None or self.error is not None:
            return
        try:
            with torch.no_grad():
                values = grad.coalesce().values() if grad.is_sparse else grad
                norm = torch.linalg.vector_norm(values.detach(), dtype=self._open.dtype)
                self._open.add_(norm.square().to(self._open.device))
        except Exception as err:  # carried to the step, never into the backward pass
            self.error = err
