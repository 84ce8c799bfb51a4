"""Drive ``Trainer.fit`` a few training steps at a time, so it can be interleaved.

``Trainer.fit`` is one call that runs until the end. To interleave Lightning's steps with
other workloads (a plain PyTorch loop) in one process, the fit runs in a helper
thread that waits at every ``on_train_batch_start`` until the caller asks for more steps.
Only one of the two threads ever runs at a time (a strict hand-over through two queues), so
nothing overlaps; the timing is taken inside the fit's thread.

A block of ``k`` steps is timed from ``on_train_batch_start`` of its first batch to
``on_train_batch_start`` of the batch after its last: exactly ``k`` whole iterations of
Lightning's loop (fetching and augmenting the next batch, the step, callbacks, logging),
without the fit's start-up. On CUDA the device is synchronised at both ends of a block only,
so the steps inside a block overlap with the host as in a normal run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["TrainerSteps"]


class _StopFit(Exception):
    """Raised inside the fit's thread to end it where it waits."""


class _Baton(pl.Callback):
    """Holds the fit at each batch start until the caller hands over a number of steps."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.commands: queue.Queue[int | None] = queue.Queue()
        self.results: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._sync = sync
        self._remaining = 0
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._remaining > 1:  # inside a block
            self._remaining -= 1
            return
        if self._remaining == 1:  # the block's last step has finished
            self._sync()
            self.results.put(("steps", time.perf_counter() - self._start))
            self._remaining = 0
        else:
            self.results.put(("ready", None))
        command = self.commands.get()
        if command is None:
            raise _StopFit
        self._remaining = command
        self._sync()
        self._start = time.perf_counter()


def _cuda_sync() -> None:
    torch.cuda.synchronize()


def _no_sync() -> None:
    pass


class TrainerSteps:
    """A ``Trainer.fit`` that runs ``steps`` training steps per :meth:`run` call.

    Args:
        model, datamodule: what to fit.
        sync_cuda: synchronise the CUDA device at the ends of each timed block.
        **trainer_kwargs: for ``lightning.pytorch.Trainer``; a callback of ours is put first
            in ``callbacks``. The fit must have enough batches for every step asked for (set
            ``max_epochs=1`` and no validation to keep epoch ends out of the timings).

    Use as a context manager (or call :meth:`close`) so the fit ends and its thread joins.
    :attr:`trainer` is the Trainer, to change between blocks while the fit waits.
    """

    def __init__(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        *,
        sync_cuda: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        self._baton = _Baton(_cuda_sync if sync_cuda else _no_sync)
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        self.trainer = pl.Trainer(callbacks=[self._baton, *callbacks], **trainer_kwargs)
        self._model, self._datamodule = model, datamodule
        self._thread: threading.Thread | None = None
        self._finished = False
        self.steps_run = 0
        """Training steps run so far through :meth:`run` (all of them timed)."""

    def _fit(self) -> None:
        try:
            self.trainer.fit(self._model, datamodule=self._datamodule)
        except _StopFit:
            self._baton.results.put(("closed", None))
        except BaseException as err:  # handed to the caller's thread
            self._baton.results.put(("error", err))
        else:
            self._baton.results.put(("finished", None))

    def _receive(self) -> tuple[str, Any]:
        kind, value = self._baton.results.get()
        if kind == "error":
            self._finished = True
            raise RuntimeError(f"the fit failed: {value!r}") from value
        if kind in ("finished", "closed"):
            self._finished = True
        return kind, value

    def start(self) -> None:
        """Start the fit and wait until it is ready for its first step (start-up excluded)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._fit, name="bench-fit", daemon=True)
        self._thread.start()
        kind, _ = self._receive()
        if kind != "ready":
            raise RuntimeError("the fit ended before its first training batch")

    def run(self, steps: int = 1) -> float:
        """Run ``steps`` consecutive training steps; return their wall time in seconds."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        self.start()
        if self._finished:
            raise RuntimeError("the fit has ended; no more steps can run")
        self._baton.commands.put(steps)
        kind, value = self._receive()
        if kind != "steps":
            raise RuntimeError(
                f"the fit ended after {self.steps_run} timed steps, before {steps} more could "
                "run: give it more batches (max_epochs, data size) or ask for fewer steps"
            )
        self.steps_run += steps
        return float(value)

    def close(self) -> None:
        """End the fit where it waits (the rest of the epoch is skipped) and join its thread."""
        if self._thread is None:
            return
        if not self._finished:
            self._baton.commands.put(None)
            self._receive()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> TrainerSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
