"""What gradtrace's own commands print: their results, one progress line per run, no noise.

:func:`quiet_output` is entered by the ``gradtrace`` command, the demo and the Table 1 smoke
runs, never on import, so a library user's own Lightning script keeps every message Lightning
and other packages print. Inside it:

- Lightning's info messages (the "Tip: ... litlogger/litmodels" lines, the "GPU available"
  device banners) are not printed; its warnings still are;
- deprecation warnings raised by other packages (torch's ``LeafSpec`` through Lightning, ...)
  are silenced; gradtrace's own are shown;
- Lightning's warning that a short epoch has fewer batches than ``log_every_n_steps`` is
  silenced: gradtrace's commands log the last step of every epoch anyway; so is its warning
  that a checkpoint directory is not empty: a gradtrace run's directory is fixed, and a
  resumed run writes into it again;
- every warning that is shown prints as one line, ``Category: message``, without the source
  line that Python's default format adds;
- gradtrace's own info lines (e.g. the data settings a run uses) are printed, message only.

:class:`StepProgress` is the one progress line per run: step, loss, elapsed time and ETA.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["StepProgress", "one_line_warning", "quiet_output"]

# Loggers through which Lightning prints its info lines (rank_zero_info and the accelerators).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_active = False  # inside quiet_output already (the demo wraps short_run, which enters it too)
_SILENCED_MESSAGES = (
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r".*does not have many workers",  # gradtrace's batches are cut in memory, no workers
    # A run's directory is fixed (resumed runs write into it again): not a mistake here.
    r"Checkpoint directory .* exists and is not empty",
)


def one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """``warnings.formatwarning`` without the file, line number and source line."""
    return f"{category.__name__}: {message}\n"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # tqdm.write prints above a progress line that is being drawn instead of after it.
    from tqdm import tqdm

    text = one_line_warning(message, category, filename, lineno, line)
    tqdm.write(text, file=file or sys.stderr, end="")


@contextmanager
def quiet_output() -> Iterator[None]:
    """Silence Lightning's info lines and other packages' deprecation warnings; print every
    remaining warning on one line. Restores all of it on exit; nested uses change nothing."""
    global _active
    if _active:
        yield
        return
    _active = True
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    ours = logging.getLogger("gradtrace")
    saved = (ours.level, ours.propagate)
    handler = logging.StreamHandler()  # stderr, message only
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            # ``module`` is the module the warning is attributed to: anything but gradtrace.
            warnings.filterwarnings("ignore", category=category, module=r"(?!gradtrace)")
        for message in _SILENCED_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        for name in _LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.showwarning = _show_warning  # catch_warnings restores it
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # printed once, even when the caller configured logging
        try:
            yield
        finally:
            _active = False
            ours.removeHandler(handler)
            ours.level, ours.propagate = saved
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


class StepProgress(Callback):
    """One line per run, updated in place: ``label: step/total steps, loss, elapsed<ETA``.

    Uses tqdm (a Lightning dependency). The line is redrawn at most once a second, and stays on
    screen when the run ends. Under DDP only rank 0 draws it.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from tqdm import tqdm

        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._bar = tqdm(
            total=total,
            initial=trainer.global_step,
            desc=self.label,
            bar_format="{desc}: step {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}]",
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._bar is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._bar.set_postfix_str(f"loss {float(loss):.3f}", refresh=False)
        self._bar.update(trainer.global_step - self._bar.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
