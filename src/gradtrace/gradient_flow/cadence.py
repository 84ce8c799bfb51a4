"""Which training steps are measured: the steps Lightning writes to its loggers, plus the first
and the last step of the fit.

Lightning's loggers, ``LearningRateMonitor`` and ``DeviceStatsMonitor`` write when
their ``should_update_logs`` holds, i.e. when
``(batches_that_stepped + 1) % log_every_n_steps == 0`` or ``trainer.should_stop``, and they
write at step ``batches_that_stepped`` (before it is incremented at the end of the batch).
Following the same rule puts every gradient record on a step where the other metrics are.
"""

from __future__ import annotations

import lightning.pytorch as pl

from gradtrace.compat import batches_that_stepped

__all__ = ["is_last_step", "is_measured_step", "logging_step"]


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers use for the current batch (``_batches_that_stepped``):
    counted once per batch that steps, however many optimizers step in it."""
    return batches_that_stepped(trainer)


def is_last_step(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is the last one of the fit (``max_steps`` reached, or
    the last batch of the last epoch of ``max_epochs``)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    steps_done = max(trainer.global_step, logging_step(trainer))
    if trainer.max_steps is not None and 0 < trainer.max_steps <= steps_done + 1:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    progress = epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches


def is_measured_step(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether the current training batch is measured: step 0 (the initialisation), every step
    Lightning's loggers write (its ``should_update_logs`` rule with ``log_every_n_steps``, or
    ``every_n_steps`` when given: ``(step + 1) % every_n_steps == 0``; also when
    ``trainer.should_stop``), and the last step of the fit.

    Call it from a training hook (``on_train_batch_start`` ... ``on_train_batch_end``); it
    answers for the batch being trained and is the same on every rank.
    """
    step = logging_step(trainer)
    if step == 0 or trainer.should_stop:
        return True
    interval = trainer.log_every_n_steps if every_n_steps is None else every_n_steps
    if interval > 0 and (step + 1) % interval == 0:
        return True
    return is_last_step(trainer)
