"""What a test knows without GradientFlow: gradients, the autograd firing order, module outputs.

:class:`IndependentCapture` is a Lightning callback that records, with plain PyTorch only,
what ``GradientFlow`` claims to measure, so a test can compare the two:

* every trainable parameter's gradient in ``on_before_optimizer_step`` (float64 copies), keyed
  by the logging step (batches that stepped so far) and the parameter's name;
* on the first batch, the order in which autograd accumulates each parameter's gradient
  (``register_post_accumulate_grad_hook``), one sequence per backward call;
* on the first ``window`` batches, which modules were called and the float64 sum and count of
  each module's first output tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gradtrace.measure.order import primary_output  # which tensor is "the output"

__all__ = ["IndependentCapture", "clean_name", "expected_stats"]

_WRAPPERS = ("_orig_mod.",)


def clean_name(name: str) -> str:
    """A parameter name without the prefix ``torch.compile`` inserts."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def expected_stats(grad: torch.Tensor) -> dict[str, float]:
    g = grad.double()
    return {
        "mean_abs": g.abs().mean().item(),
        "l2": g.norm().item(),
        "max_abs": g.abs().max().item(),
        "nonfinite": int((~torch.isfinite(g)).sum().item()),
    }


class IndependentCapture(pl.Callback):
    """See the module docstring. ``window``: batches whose module outputs are summed (the
    micro-batches of the first optimizer step)."""

    def __init__(self, window: int = 1) -> None:
        self.window = window
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self.firing: list[list[str]] = []
        self.called: dict[str, list[float]] = {}  # module name -> [sum, count, calls]
        self.module_types: dict[str, type[nn.Module]] = {}
        self._step = 0
        self._stepped = False
        self._output_hooks: list[Any] = []
        self._firing_hooks: list[Any] = []
        self._batches = 0

    def _names(self, pl_module: pl.LightningModule) -> dict[int, str]:
        return {id(p): clean_name(n) for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stepped = False
        if self._batches == 0:
            names = {clean_name(n): m for n, m in pl_module.named_modules()}
            self.module_types = {name: type(module) for name, module in names.items()}
            for name, module in names.items():
                self._output_hooks.append(module.register_forward_hook(self._output_hook(name)))
            self.firing.append([])
            by_id = self._names(pl_module)
            for p in pl_module.parameters():
                if p.requires_grad:
                    name = by_id[id(p)]
                    hook = p.register_post_accumulate_grad_hook(
                        lambda p, name=name: self.firing[-1].append(name)
                    )
                    self._firing_hooks.append(hook)

    def _output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            entry = self.called.setdefault(name, [0.0, 0.0, 0.0])
            entry[2] += 1
            tensor = primary_output(output)
            if tensor is not None and tensor.is_floating_point():
                entry[0] += tensor.detach().double().sum().item()
                entry[1] += tensor.numel()

        return hook

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.firing and self.firing[-1] and self._batches == 0:
            self.firing.append([])  # a new backward call of the first batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True
        by_id = self._names(pl_module)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grads[(self._step, by_id[id(p)])] = p.grad.detach().double().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        for handle in self._firing_hooks:
            handle.remove()
        self._firing_hooks = []
        if self._batches >= self.window:
            for handle in self._output_hooks:
                handle.remove()
            self._output_hooks = []
        if self._stepped:
            self._step += 1

    # ------------------------------------------------------------------ checks

    def assert_values_match(self, history: Iterable[dict[str, Any]], rel: float = 1e-5) -> None:
        """Every record equals the statistics of the gradient captured at its step."""
        records = list(history)
        assert records, "nothing was recorded"
        for record in records:
            grad = self.grads[(record["step"], record["layer"])]
            want = expected_stats(grad)
            for stat in ("mean_abs", "l2", "max_abs"):
                got = record[stat]
                assert got == pytest.approx(want[stat], rel=rel, abs=1e-12), (record, stat)
            assert record["nonfinite"] == want["nonfinite"], record

    def input_and_output_ends(
        self, layers: Iterable[str], main_path: Iterable[str]
    ) -> tuple[str, str] | None:
        """For one optimizer's ``layers``: the last whose gradient autograd accumulated in the
        first backward call that reached them (the input end), and the first among
        ``main_path`` (the output end)."""
        layers = set(layers)
        main = set(main_path) & layers
        for sequence in self.firing:
            fired = [name for name in sequence if name in layers]
            if fired:
                on_path = [name for name in fired if name in main] or fired
                return fired[-1], on_path[0]
        return None

    def module_mean(self, module_name: str) -> float:
        total, count, _ = self.called[module_name]
        return total / count if count else math.nan
