"""GPU only: epoch times of the Table 1 networks and the projected wall time of Table 1.

Each distinct network of ``gradtrace/cli/configs/table1/*.yaml`` trains the way
``gradtrace fit --config`` would: the config's model, precision and GradientFlow, the data
resident on the GPU, channels_last, the CSV logger, checkpoints and the learning-rate
monitor, on CIFAR-100-sized synthetic data (47,500 training and 2,500 validation images,
batch 100). Two short epochs of ``gpu_steps`` steps each: the first warms up (and compiles),
the second is timed, training steps and validation apart. An epoch's time is then
``475 x (training s / step) + validation s``: the steady state without timing 475 steps of
each network.

Two configurations are timed, and Table 1 projected for each:

* **as configured**: exactly what the configs run: ``32-true``, TF32 off (the model's
  ``tf32: false``), eager;
* **fastest faithful**: the same plus ``torch.compile`` (``--model.compile true``). Faithful
  because every operation still runs in fp32 (no TF32, no bf16): compiling fuses and
  schedules the same operations, which changes only the order of floating-point sums (~1e-6
  relative; ``test_fast_path_keeps_the_gradient_flow_on_a_gpu`` holds its gradient flow within
  1e-4 of eager). Faster settings are not faithful: bf16-mixed moves plain VGG38's per-layer
  mean |grad| by ~10% at initialisation, TF32 rounds every convolution's inputs to 10
  mantissa bits (~1e-3).

Every measurement runs in a process of its own (:mod:`benchmarks.child`): ``torch.compile``
starts fresh for each network (in one process, the networks' forwards share one Dynamo code
object and the fifth network hits the recompile limit and runs eagerly), and a measurement
that overruns its limit is killed with everything it started (:mod:`benchmarks.bounded`).
A compiled measurement fails, rather than report eager times, if nothing was compiled or a
recompile limit was hit.

The projection sums ``max_epochs x epoch time`` over the table's rows. A small network can
leave an H100 idle (the host launches kernels slower than the GPU runs them), so the section
also measures the total throughput of 1 and of 2 training processes sharing the GPU (in the
fastest faithful configuration); if two get more done, running the rows two at a time divides
that projection by the speed-up (each run stays the same computation).
"""

from __future__ import annotations

import inspect
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from benchmarks.bounded import Deadline, kill_group, run_bounded
from benchmarks.config import (
    CIFAR100_TRAIN,
    CIFAR100_VAL,
    REPO_ROOT,
    BenchConfig,
    Log,
)
from benchmarks.stats import Summary
from gradtrace.classifier import ImageClassifier
from gradtrace.data.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = ["SETUPS", "Setup", "bench_gpu", "compiled_graphs", "epoch_time", "table1_rows"]

# Model settings that change the optimisation, not the network's cost per step.
_TRAINING_ONLY = frozenset({"lr", "lr_min", "optimizer", "scheduler", "weight_decay"})


@dataclass(frozen=True)
class Setup:
    """A configuration the projection is made for: its name in the report, whether it
    compiles, and its time limits per network (``limit_s``: killed after; ``least_s``: not
    started with less left)."""

    key: str
    label: str
    compile: bool
    limit_s: float
    least_s: float


# Measured in this order (what matters most first, should the time run out).
SETUPS = (
    Setup("as_configured", "as configured", compile=False, limit_s=150, least_s=30),
    Setup("fastest_faithful", "fastest faithful", compile=True, limit_s=300, least_s=75),
)
# One round of 1 then 2 training processes sharing the GPU (each compiles): its limit, and the
# least time left worth starting it with.
PAIR_LIMIT_S, PAIR_LEAST_S = 300.0, 120.0


def table1_rows() -> list[dict[str, Any]]:
    """Table 1's rows from the packaged configs: ``name``, ``model`` (the config's model
    settings), ``network`` (those that set the cost of a step, as a hashable key),
    ``epochs``, ``precision`` and ``gradient_flow`` (its GradientFlow's arguments)."""
    rows = []
    folder = resources.files("gradtrace") / "cli" / "configs" / "table1"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        config = yaml.safe_load(entry.read_text())
        model = dict(config["model"])
        network = tuple(sorted((k, v) for k, v in model.items() if k not in _TRAINING_ONLY))
        flows = [
            callback.get("init_args") or {}
            for callback in config["trainer"].get("callbacks") or []
            if callback["class_path"] == "gradtrace.GradientFlow"
        ]
        rows.append(
            {
                "name": entry.name.removesuffix(".yaml"),
                "model": model,
                "network": network,
                "epochs": int(config["trainer"]["max_epochs"]),
                "precision": str(config["trainer"]["precision"]),
                "gradient_flow": flows[0] if flows else {},
            }
        )
    return rows


class _PhaseTimer(pl.Callback):
    """Times the second epoch's training steps and its validation pass (synchronised)."""

    def __init__(self, cuda: bool) -> None:
        self.compile_s = self.train_s = self.val_s = 0.0
        self._cuda = cuda
        self._start = time.perf_counter()

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.compile_s = self._now() - self._start
            self._start = self._now()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.train_s = self._now() - self._start
            self._start = self._now()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.val_s = self._now() - self._start


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def epoch_time(
    model_settings: dict[str, Any],
    dm: ImageDataModule,
    steps: int,
    root: Path,
    *,
    accelerator: str = "cuda",
    precision: str = "32-true",
    compile: bool = False,
    gradient_flow: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Seconds of one epoch of ``dm`` as ``gradtrace fit`` trains it (see the module's
    docstring): ``compile_s`` (the first, short epoch), ``train_s`` (training steps of a
    full epoch, from ``steps`` timed ones), ``val_s``, ``epoch_s`` (their sum) and
    ``graphs_compiled``.

    With ``compile``, ``torch.compile`` starts from a clean state and the fit fails rather
    than run eagerly: on a recompile limit, or when it compiled nothing.
    """
    model = ImageClassifier(**{**model_settings, "compile": compile}, num_classes=dm.num_classes)
    timer = _PhaseTimer(cuda=accelerator == "cuda")
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=2,
        limit_train_batches=steps,
        num_sanity_val_steps=0,
        logger=CSVLogger(root),
        callbacks=[
            timer,
            GradientFlow(**(gradient_flow or {})),
            ModelCheckpoint(monitor="val/acc", mode="max", save_top_k=1),
            ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
            LearningRateMonitor(logging_interval="step"),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    if compile:
        torch._dynamo.reset()
    graphs_before = compiled_graphs()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        trainer.fit(model, dm)
    graphs = compiled_graphs() - graphs_before
    if compile and graphs == 0:
        raise RuntimeError("torch.compile compiled no graph: the network ran eagerly")
    steps_per_epoch = dm.split("train")[1].numel() // dm.batch_size
    train_s = timer.train_s / steps * steps_per_epoch
    return {
        "compile_s": timer.compile_s,
        "train_s": train_s,
        "val_s": timer.val_s,
        "epoch_s": train_s + timer.val_s,
        "graphs_compiled": graphs,
    }


def _child_environment() -> dict[str, str]:
    """This process's environment with the repository root on ``PYTHONPATH``, so that a
    child can import ``benchmarks`` (which is not installed) from any working directory."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _measure_epoch(
    row: dict[str, Any], setup: Setup, cfg: BenchConfig, workdir: Path, timeout_s: float
) -> tuple[dict[str, float] | None, str]:
    """Epoch times of ``row``'s network in ``setup``, in a child process killed after
    ``timeout_s``: ``(times, "")``, or ``(None, why not)``."""
    out = workdir / f"{setup.key}-{row['name']}.json"
    command = [sys.executable, "-m", "benchmarks.child", "epoch-time"]
    command += ["--model", json.dumps(row["model"]), "--precision", row["precision"]]
    command += ["--gradient-flow", json.dumps(row["gradient_flow"])]
    command += ["--compile"] if setup.compile else []
    command += ["--steps", str(cfg.gpu_steps), "--batch-size", str(cfg.batch_size)]
    command += ["--root", str(workdir / setup.key / row["name"]), "--out", str(out)]
    done = run_bounded(command, timeout_s, cwd=REPO_ROOT, env=_child_environment())
    if done.timed_out:
        return None, f"stopped at its {timeout_s:.0f} s limit"
    if done.returncode:
        return None, f"failed (exit {done.returncode}): {_last_line(done.stderr)}"
    return json.loads(out.read_text()), ""


def _wait_for_ready(proc: subprocess.Popen, deadline: float) -> None:
    """Read ``proc``'s stdout until its ``ready`` line, until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b"\n"
    while b"\nready\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("a throughput process ended before its warm-up")
            seen += chunk


def _concurrent_throughput(
    cfg: BenchConfig, precision: str, processes: int, workdir: Path, timeout_s: float
) -> list[float]:
    """Images/s of each of ``processes`` VGG38 training processes sharing the GPU, timed over
    the same window (fastest faithful configuration); all are killed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    outs = [workdir / f"concurrent-{processes}-{i}.json" for i in range(processes)]
    command = [sys.executable, "-m", "benchmarks.child", "throughput", "--arch", "vgg38"]
    command += ["--accelerator", "cuda", "--precision", precision, "--compile"]
    command += ["--warmup", str(cfg.shared_gpu_warmup), "--steps", str(cfg.shared_gpu_steps)]
    procs = [
        subprocess.Popen(
            [*command, "--wait-for-go", "--out", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_child_environment(),
            start_new_session=True,  # killed with everything it starts
        )
        for out in outs
    ]
    try:
        for proc in procs:  # every process has compiled and warmed up
            _wait_for_ready(proc, deadline)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            if proc.returncode:
                raise RuntimeError(f"a throughput process failed ({proc.returncode})")
    finally:
        for proc in procs:
            kill_group(proc)  # also its compile workers, should they linger
            proc.wait()
    return [json.loads(out.read_text())["images_per_s"] for out in outs]


def bench_gpu(
    cfg: BenchConfig,
    workdir: Path,
    log: Log,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Epoch times in both configurations (:data:`SETUPS`), 1 vs 2 processes per GPU and the
    Table 1 projections (CUDA only).

    Each measurement gets its own time limit; with ``budget_s`` the whole ends within that
    many seconds (``clock``'s): a measurement is not started without enough time left, or is
    killed when the budget ends. What was cut, and why, is listed in ``cut``; a projection
    covers the measured rows only (``rows_projected``); without 1 vs 2 processes, one run per
    GPU is assumed.
    """
    if cfg.device != "cuda":
        return {"skipped": "no CUDA device"}
    deadline = Deadline(budget_s, clock)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = table1_rows()
    networks: dict[tuple, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: len(r["name"])):  # named by its plainest row
        networks.setdefault(row["network"], row)
    precisions = sorted({row["precision"] for row in rows})
    tf32_default = inspect.signature(ImageClassifier).parameters["tf32"].default
    tf32 = {bool(row["model"].get("tf32", tf32_default)) for row in rows}
    cut: list[str] = []
    setups: dict[str, dict[str, Any]] = {}
    for setup in SETUPS:
        epoch_times: dict[str, dict[str, float]] = {}
        for network in networks.values():
            what = f"{network['name']} ({setup.label})"
            timeout = deadline.timeout(setup.limit_s, setup.least_s)
            if timeout is None:
                cut.append(f"{what}: not started, {max(deadline.left(), 0):.0f} s left")
                continue
            log(f"gpu: epoch time of {what}, {cfg.gpu_steps} steps x 2 epochs")
            times, why = _measure_epoch(network, setup, cfg, workdir, timeout)
            if times is None:
                cut.append(f"{what}: {why}")
                log(f"gpu: {what}: {why}")
            else:
                epoch_times[network["name"]] = times
        projected = [row for row in rows if networks[row["network"]]["name"] in epoch_times]
        total_s = sum(
            row["epochs"] * epoch_times[networks[row["network"]]["name"]]["epoch_s"]
            for row in projected
        )
        setups[setup.key] = {
            "label": setup.label,
            "compile": setup.compile,
            "epoch_times": epoch_times,
            "rows_projected": len(projected),
            "table1_minutes": total_s / 60,
        }

    pair_over_alone = []
    for _ in range(cfg.shared_gpu_rounds):
        what = "1 vs 2 processes per GPU"
        timeout = deadline.timeout(PAIR_LIMIT_S, PAIR_LEAST_S)
        if timeout is None:
            cut.append(f"{what}: not started, {max(deadline.left(), 0):.0f} s left")
            break
        log("gpu: 1 vs 2 training processes on one GPU (vgg38, fastest faithful)")
        start = time.monotonic()
        try:
            alone = sum(_concurrent_throughput(cfg, precisions[0], 1, workdir, timeout))
            left = timeout - (time.monotonic() - start)
            pair = sum(_concurrent_throughput(cfg, precisions[0], 2, workdir, left))
        except (TimeoutError, subprocess.TimeoutExpired):
            cut.append(f"{what}: stopped at its {timeout:.0f} s limit")
            break
        except RuntimeError as error:
            cut.append(f"{what}: {error}")
            break
        pair_over_alone.append(pair / alone)
    speedup = Summary.of(pair_over_alone or [1.0])
    fastest = setups["fastest_faithful"]["table1_minutes"]
    runs_per_gpu = 2 if speedup.median > 1.05 else 1
    return {
        "device": torch.cuda.get_device_name(),
        "precision": ", ".join(precisions),
        "tf32": ", ".join("on" if allowed else "off" for allowed in sorted(tf32)),
        "steps_per_epoch": (CIFAR100_TRAIN - CIFAR100_VAL) // cfg.batch_size,
        "val_batches": CIFAR100_VAL // cfg.batch_size,
        "timed_steps": cfg.gpu_steps,
        "setups": setups,
        "rows": [
            {"name": r["name"], "network": networks[r["network"]]["name"], "epochs": r["epochs"]}
            for r in rows
        ],
        "cut": cut,
        "two_processes_speedup": speedup,
        "two_processes_measured": bool(pair_over_alone),
        "runs_per_gpu": runs_per_gpu,
        "table1_minutes": fastest / runs_per_gpu,
    }
