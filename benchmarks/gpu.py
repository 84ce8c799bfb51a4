"""GPU only: epoch times of the Table 1 networks and the projected wall time of Table 1.

Each distinct network of ``gradtrace/configs/table1/*.yaml`` trains the way
``gradtrace fit --config`` would: bf16-mixed, channels_last, ``torch.compile``, the data
resident on the GPU, GradientFlow, the CSV logger, checkpoints and the learning-rate monitor,
on CIFAR-100-sized synthetic data (47,500 training and 2,500 validation images, batch 100).
Two short epochs of ``gpu_steps`` steps each: the first compiles (training and evaluation
graphs), the second is timed, training steps and validation apart. An epoch's time is then
``475 x (training s / step) + validation s``: the steady state without timing 475 steps of
each of five networks (``make gpu-check`` has 8 minutes in all).

The projection sums ``max_epochs x epoch time`` over the table's rows. A small network can
leave an H100 idle (the host launches kernels slower than the GPU runs them), so the section
also measures the total throughput of 1 and of 2 training processes sharing the GPU; if two
get more done, running the rows two at a time divides the wall time by that speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from benchmarks.config import REPO_ROOT, BenchConfig, Log, cifar100_like
from benchmarks.stats import Summary
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = ["bench_gpu", "epoch_time", "table1_rows"]

# Model settings that change the optimisation, not the network's cost per step.
_TRAINING_ONLY = frozenset({"lr", "lr_min", "optimizer", "scheduler", "weight_decay"})


def table1_rows() -> list[dict[str, Any]]:
    """Table 1's rows from the packaged configs: ``name``, ``model`` (the config's model
    settings), ``network`` (those that set the cost of a step, as a hashable key), ``epochs``."""
    rows = []
    folder = resources.files("gradtrace") / "configs" / "table1"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        config = yaml.safe_load(entry.read_text())
        model = dict(config["model"])
        network = tuple(sorted((k, v) for k, v in model.items() if k not in _TRAINING_ONLY))
        rows.append(
            {
                "name": entry.name.removesuffix(".yaml"),
                "model": model,
                "network": network,
                "epochs": int(config["trainer"]["max_epochs"]),
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


def epoch_time(
    model_settings: dict[str, Any],
    dm: ImageDataModule,
    steps: int,
    root: Path,
    *,
    accelerator: str = "cuda",
    precision: str = "bf16-mixed",
    compile: bool = True,
) -> dict[str, float]:
    """Seconds of one epoch of ``dm`` as ``gradtrace fit`` trains it (see the module's
    docstring): ``compile_s`` (the first, short epoch), ``train_s`` (training steps of a
    full epoch, from ``steps`` timed ones), ``val_s`` and ``epoch_s`` (their sum)."""
    model = ImageClassifier(**model_settings, num_classes=dm.num_classes, compile=compile)
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
            GradientFlow(),
            ModelCheckpoint(monitor="val/acc", mode="max", save_top_k=1),
            ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
            LearningRateMonitor(logging_interval="step"),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, dm)
    steps_per_epoch = dm.split("train")[1].numel() // dm.batch_size
    train_s = timer.train_s / steps * steps_per_epoch
    return {
        "compile_s": timer.compile_s,
        "train_s": train_s,
        "val_s": timer.val_s,
        "epoch_s": train_s + timer.val_s,
    }


def _child_environment() -> dict[str, str]:
    """This process's environment with the repository root on ``PYTHONPATH``, so that a
    child can import ``benchmarks`` (which is not installed) from any working directory."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _concurrent_throughput(
    cfg: BenchConfig, arch: str, processes: int, workdir: Path
) -> list[float]:
    """Images/s of each of ``processes`` training processes sharing the GPU, same window."""
    outs = [workdir / f"concurrent-{processes}-{i}.json" for i in range(processes)]
    command = [sys.executable, "-m", "benchmarks.child", "--arch", arch]
    command += ["--accelerator", "cuda", "--precision", cfg.precision]
    command += ["--compile"] if cfg.compile else []
    command += ["--warmup", str(cfg.shared_gpu_warmup), "--steps", str(cfg.shared_gpu_steps)]
    procs = [
        subprocess.Popen(
            [*command, "--wait-for-go", "--out", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_child_environment(),
        )
        for out in outs
    ]
    try:
        for proc in procs:  # every process has compiled and warmed up
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "ready":
                    break
            else:
                raise RuntimeError(f"a {arch} throughput process ended before its warm-up")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            proc.communicate(timeout=300)
            if proc.returncode:
                raise RuntimeError(f"a {arch} throughput process failed ({proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [json.loads(out.read_text())["images_per_s"] for out in outs]


def bench_gpu(
    cfg: BenchConfig, workdir: Path, log: Log, budget_s: float | None = None
) -> dict[str, Any]:
    """Epoch times, 1 vs 2 processes per GPU and the Table 1 projection (CUDA only).

    With ``budget_s``, no new measurement starts after that many seconds: networks left
    untimed are listed in ``not_measured`` and the projection covers the measured rows only
    (``rows_projected``); without time for 1 vs 2 processes, one run per GPU is assumed.
    """
    if cfg.device != "cuda":
        return {"skipped": "no CUDA device"}
    start = time.monotonic()

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - start > budget_s

    dm = cifar100_like(cfg.batch_size)  # exactly CIFAR-100's split sizes
    rows = table1_rows()
    networks: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        networks.setdefault(row["network"], {"name": row["name"], "model": row["model"]})
    epoch_times: dict[str, dict[str, float]] = {}
    not_measured: list[str] = []
    for network in networks.values():
        if out_of_time():
            not_measured.append(network["name"])
            continue
        log(f"gpu: epoch time of {network['name']} ({cfg.gpu_steps} steps x 2 epochs)")
        root = workdir / "epochs" / network["name"]
        epoch_times[network["name"]] = epoch_time(network["model"], dm, cfg.gpu_steps, root)
    projected = [row for row in rows if networks[row["network"]]["name"] in epoch_times]
    total = sum(
        row["epochs"] * epoch_times[networks[row["network"]]["name"]]["epoch_s"]
        for row in projected
    )

    pair_over_alone = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for _ in range(cfg.shared_gpu_rounds):
            if out_of_time():
                not_measured.append("1 vs 2 processes per GPU")
                break
            log("gpu: 1 vs 2 training processes on one GPU (vgg38)")
            alone = sum(_concurrent_throughput(cfg, "vgg38", 1, Path(tmp)))
            pair = sum(_concurrent_throughput(cfg, "vgg38", 2, Path(tmp)))
            pair_over_alone.append(pair / alone)
    speedup = Summary.of(pair_over_alone or [1.0])
    best = total / speedup.median if speedup.median > 1.05 else total
    return {
        "device": torch.cuda.get_device_name(),
        "steps_per_epoch": dm.split("train")[1].numel() // dm.batch_size,
        "val_batches": dm.split("val")[1].numel() // dm.batch_size,
        "timed_steps": cfg.gpu_steps,
        "epoch_times": epoch_times,
        "rows": [
            {"name": r["name"], "network": networks[r["network"]]["name"], "epochs": r["epochs"]}
            for r in rows
        ],
        "rows_projected": len(projected),
        "not_measured": not_measured,
        "table1_minutes_one_run_at_a_time": total / 60,
        "two_processes_speedup": speedup,
        "table1_minutes": best / 60,
        "runs_per_gpu": 2 if best < total else 1,
    }
