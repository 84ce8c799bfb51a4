"""Runs of the ``gradtrace`` command: quiet trainer flags, the metrics a run logged, and the
settings and check of one training on two CPU processes against one process."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gradtrace.measure import read_history

__all__ = [
    "DDP_EQUALITY_OVERRIDES",
    "QUIET",
    "assert_same_training",
    "last_value",
    "metrics_rows",
]

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


# One training on 2 gloo processes vs 1 process with the same global batch: synthetic data on
# the CPU, GradientFlow at every step. The model brings no BatchNorm (per-rank batch statistics
# differ from the global batch's; SyncBatchNorm needs GPUs), no dropout (per-rank masks) and
# trains with SGD, not Adam: Adam's first updates are close to sign(grad), so the rounding of
# the all-reduce's other summation order flips tiny entries and the runs drift apart by 1e-2
# within eight steps; under SGD they agree to 1e-6 step after step.
DDP_EQUALITY_OVERRIDES = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[200, 50]",
    "--data.val_size=20",
    "--trainer.max_epochs=1",
    "--trainer.log_every_n_steps=4",
    "--trainer.accelerator=cpu",
    "--trainer.callbacks+=gradtrace.GradientFlow",
    "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks.plot=false",
    *QUIET,
]


def assert_same_training(single: Path, ddp: Path) -> None:
    """The two runs' gradient records and final metrics agree."""
    flow_single = read_history(single / "gradient_flow.csv")
    flow_ddp = read_history(ddp / "gradient_flow.csv")
    assert [(r["step"], r["layer"]) for r in flow_ddp] == [
        (r["step"], r["layer"]) for r in flow_single
    ]
    for a, b in zip(flow_single, flow_ddp):
        assert b["mean_abs"] == pytest.approx(a["mean_abs"], rel=1e-3, abs=1e-9)
        assert b["l2"] == pytest.approx(a["l2"], rel=1e-3, abs=1e-9)
    rows_single = metrics_rows(single)
    rows_ddp = metrics_rows(ddp)
    for key in ("val/loss", "val/acc", "train/loss"):
        assert last_value(rows_ddp, key) == pytest.approx(last_value(rows_single, key), rel=1e-4)
    # The per-step loss is the global batch's too (rank 0's half-batch loss before).
    step_losses = [[float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
                   for rows in (rows_single, rows_ddp)]  # fmt: skip
    assert step_losses[1] == pytest.approx(step_losses[0], rel=1e-5)
    assert len(step_losses[0]) > 1
