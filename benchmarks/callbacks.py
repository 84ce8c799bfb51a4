"""The callbacks the bench compares, switched on for their own timed blocks only.

All run in one fit (so every block sees the same model, data and machine state), each
measuring only while its block runs. The figure that means something for a callback's cost
is the time spent inside its own code divided by the block's time: a difference of two
noisy step times ("with" minus "without") has a spread of tens of percent on a shared
machine, the time inside the code a spread of tenths of a percent.

* :class:`TimedCallback`: any Lightning callback (GradientFlow, with or without activation
  statistics), timed inside its Lightning hooks *and* inside the module and tensor hooks it
  registers (forward, backward, gradient hooks), whatever it does where.
* :class:`GradNormLogging`: Lightning's recipe ``self.log_dict(grad_norm(self, 2))``.
* :class:`WandbWatch`: ``wandb.watch(model, log="gradients", log_freq=1)``, offline.
* :func:`flight_check_seconds`: one check of GradientFlow's flight recorder, which runs every
  ``K // 4`` steps (no timed block is that long).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm

from gradtrace.gradient_flow import GradientFlow
from gradtrace.measure.flight_recorder import FlightRecorder
from gradtrace.measure.selection import select_layers

__all__ = [
    "GradNormLogging",
    "TimedCallback",
    "WandbWatch",
    "flight_check_seconds",
    "keyed_gradient_flow",
    "start_wandb",
]

Log = Callable[[str], None]

# Hooks a callback runs once per training step: skipped (and untimed) outside its blocks.
_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
# Hooks of the fit's life cycle: always run, timed only inside the callback's blocks.
_LIFE_HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_end",
    "on_fit_end",
    "teardown",
)
# Where a callback can register code that runs inside forward or backward.
_REGISTRARS = (
    (torch.nn.Module, "register_forward_pre_hook"),
    (torch.nn.Module, "register_forward_hook"),
    (torch.nn.Module, "register_full_backward_pre_hook"),
    (torch.nn.Module, "register_full_backward_hook"),
    (torch.Tensor, "register_hook"),
    (torch.Tensor, "register_post_accumulate_grad_hook"),
)


class TimedCallback:
    """Switch ``callback`` on and off between blocks; add up the time spent inside it.

    Its per-step Lightning hooks (``on_train_batch_start`` ... ``on_train_batch_end``) run
    only while :attr:`active`; life-cycle hooks (``setup``, ``on_train_start``...) always
    run. The module and tensor hooks it registers from any of its hooks are wrapped too:
    they run, and are timed, only while :attr:`active`. Put ``callback`` (not this object)
    in the Trainer's callbacks.

    Args:
        callback: the callback to time; its hook methods are replaced on the instance.
    """

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = callback
        self.active = False
        self.seconds = 0.0
        """Seconds spent inside the callback while active (all blocks so far)."""
        for name in (*_STEP_HOOKS, *_LIFE_HOOKS):
            if getattr(type(callback), name) is not getattr(pl.Callback, name):
                setattr(callback, name, self._wrap_hook(getattr(callback, name), name))

    def _wrap_hook(self, hook: Callable[..., Any], name: str) -> Callable[..., Any]:
        per_step = name in _STEP_HOOKS

        @functools.wraps(hook)
        def run(*args: Any, **kwargs: Any) -> Any:
            if per_step and not self.active:
                return None
            with self._registering():
                return self._timed(hook, *args, **kwargs)

        return run

    def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def _wrap_registered(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return None  # None: a hook that changes nothing
            return self._timed(hook, *args, **kwargs)

        return run

    @contextlib.contextmanager
    def _registering(self) -> Iterator[None]:
        """While the callback's code runs, hooks it registers are wrapped by :meth:`_timed`."""
        originals = [(owner, name, getattr(owner, name)) for owner, name in _REGISTRARS]

        def wrapping(register: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(register)
            def wrapped(target: Any, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
                return register(target, self._wrap_registered(hook), *args, **kwargs)

            return wrapped

        for owner, name, register in originals:
            setattr(owner, name, wrapping(register))
        try:
            yield
        finally:
            for owner, name, register in originals:
                setattr(owner, name, register)


def keyed_gradient_flow(role: str, **kwargs: Any) -> GradientFlow:
    """A GradientFlow with a checkpoint state key and a CSV file of its own
    (``GradientFlow[role]``, ``gradient_flow_<role>.csv``).

    Lightning refuses two stateful callbacks with the same ``state_key`` in one Trainer, and
    the bench puts several GradientFlow callbacks in one fit (each active in its own blocks).
    """
    kwargs.setdefault("filename", f"gradient_flow_{role}.csv")
    state_key = f"GradientFlow[{role}]"
    keyed = {"state_key": property(lambda _: state_key)}
    return type(f"GradientFlow_{role}", (GradientFlow,), keyed)(**kwargs)


def flight_check_seconds(module: torch.nn.Module, capacity: int, repeats: int = 5) -> float:
    """Median seconds of one check of a flight recorder of ``capacity`` steps on ``module``'s
    layers: the spike rule over the ``capacity // 4`` rows written since the last check, each
    against 50 earlier ones (what ``GradientFlow(flight_recorder=capacity)`` does every
    ``capacity // 4`` steps; with no spike, as in a healthy run)."""
    layers = select_layers(module)
    device = next(module.parameters()).device
    interval = capacity // 4
    seconds = []
    for _ in range(repeats):
        recorder = FlightRecorder(layers, capacity, device)
        for step in range(capacity):  # a history for the rule, checked already
            recorder.end_step(step)
            if recorder.unchecked == interval:
                recorder.check(6.0)
        for step in range(capacity, capacity + interval):
            recorder.end_step(step)
        start = time.perf_counter()
        recorder.check(6.0)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


class GradNormLogging(pl.Callback):
    """Lightning's recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` before each step.

    :attr:`seconds` adds up the time spent computing and handing over the norms (Lightning
    writes them to the logger later in the step, with the other logged values).
    """

    def __init__(self) -> None:
        self.active = False
        self.seconds = 0.0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.active:
            start = time.perf_counter()
            pl_module.log_dict(grad_norm(pl_module, norm_type=2))
            self.seconds += time.perf_counter() - start


class WandbWatch(pl.Callback):
    """``wandb.watch(model, log="gradients", log_freq=1)`` while :attr:`active`.

    The hooks wandb.watch puts on the parameters compute the histograms during backward and
    stage them with ``commit=False``; a ``WandbLogger`` would commit them with its next
    ``log``. With no such logger here, the step ends with that commit (``run.log({...})``).
    :attr:`seconds` adds up the time of the histograms (wandb's ``log_tensor_stats``, which
    its hooks call) and of the commit.
    """

    def __init__(self, run: Any, model: torch.nn.Module) -> None:
        self.run, self.model = run, model
        self.active = False
        self.seconds = 0.0

    def switch(self, active: bool) -> None:
        """Watch or unwatch (between steps, outside the timing)."""
        history = self.run._torch  # wandb's TorchHistory: its hooks call log_tensor_stats
        if active and not self.active:
            self.run.watch(self.model, log="gradients", log_freq=1, idx=0)
            original = history.log_tensor_stats

            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            history.log_tensor_stats = timed
        elif self.active and not active:
            self.run.unwatch(self.model)
            del history.log_tensor_stats
        self.active = active

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.active:
            start = time.perf_counter()
            self.run.log({"trainer/global_step": trainer.global_step})
            self.seconds += time.perf_counter() - start


def start_wandb(workdir: Path, log: Log) -> Any:
    """An offline W&B run, or None (with the reason logged) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        log("wandb is not installed: wandb.watch is not measured (pip install 'gradtrace[wandb]')")
        return None
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        mode="offline",
        dir=str(workdir),
        project="gradtrace-bench",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
