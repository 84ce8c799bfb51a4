"""GPU only: epoch times of the Table 1 networks and the projected wall time of Table 1.

Each distinct architecture of ``gradtrace/configs/table1/*.yaml`` trains two epochs of
CIFAR-100-sized synthetic data (47,500 training and 2,500 validation images, batch 100) the
way ``gradtrace fit --config`` would: bf16-mixed, channels_last, ``torch.compile``, the data
resident on the GPU, GradientFlow, the CSV logger, checkpoints and the learning-rate monitor.
The second epoch (training + validation, compile done) is the steady-state epoch time.

The projection sums ``max_epochs x epoch time`` over the table's rows. A small network can
leave an H100 idle (the host launches kernels slower than the GPU runs them), so the bench
also measures the total throughput of 1 and of 2 training processes sharing the GPU; if two
get more done, running the rows two at a time divides the wall time by that speed-up.
"""

from __future__ import annotations

import json
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

from gradtrace.bench.phases import BenchConfig, Log, cifar100_like
from gradtrace.bench.stats import Summary
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = ["bench_gpu", "table1_rows"]

Arch = tuple[str, int, bool, bool]  # (arch, depth, batch_norm, residual)


def table1_rows() -> list[dict[str, Any]]:
    """The rows of Table 1 from the packaged configs: name, architecture key and epochs."""
    rows = []
    folder = resources.files("gradtrace") / "configs" / "table1"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        config = yaml.safe_load(entry.read_text())
        model = config["model"]
        key = (
            model["arch"],
            int(model.get("depth", 8)),
            bool(model.get("batch_norm", False)),
            bool(model.get("residual", False)),
        )
        rows.append(
            {
                "name": entry.name.removesuffix(".yaml"),
                "arch": key,
                "epochs": int(config["trainer"]["max_epochs"]),
            }
        )
    return rows


def _label(arch: Arch) -> str:
    name, depth, bn, rc = arch
    return f"{name}{depth:02d}" + ("-bn" if bn else "") + ("-rc" if rc else "")


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.cuda.synchronize()  # validation runs before this hook
        self.seconds.append(time.perf_counter() - self._start)


def _epoch_time(arch: Arch, dm: ImageDataModule, root: Path) -> list[float]:
    name, depth, bn, rc = arch
    model = ImageClassifier(
        name, num_classes=dm.num_classes, depth=depth, batch_norm=bn, residual=rc, compile=True
    )
    timer = _EpochTimer()
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_epochs=2,
        logger=CSVLogger(root, name=_label(arch)),
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
    return timer.seconds


def _concurrent_throughput(
    cfg: BenchConfig, arch: str, processes: int, workdir: Path
) -> list[float]:
    """Images/s of each of ``processes`` training processes sharing the GPU, same window."""
    outs = [workdir / f"concurrent-{processes}-{i}.json" for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradtrace.bench.child",
                "throughput",
                "--arch",
                arch,
                "--accelerator",
                "cuda",
                "--precision",
                cfg.precision,
                *(["--compile"] if cfg.compile else []),
                "--warmup",
                str(cfg.scaling_warmup),
                "--steps",
                str(cfg.scaling_steps),
                "--wait-for-go",
                "--out",
                str(out),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
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
            proc.communicate(timeout=900)
            if proc.returncode:
                raise RuntimeError(f"a {arch} throughput process failed ({proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [json.loads(out.read_text())["images_per_s"] for out in outs]


def bench_gpu(cfg: BenchConfig, workdir: Path, log: Log) -> dict:
    """Epoch times, the Table 1 projection, and 1 vs 2 processes per GPU."""
    if cfg.device != "cuda":
        return {"skipped": "no CUDA device"}
    dm = cifar100_like(cfg.batch_size)  # exactly CIFAR-100's split sizes: a real epoch
    rows = table1_rows()
    epoch_times: dict[str, Any] = {}
    for arch in dict.fromkeys(row["arch"] for row in rows):
        log(f"gpu: epoch time of {_label(arch)}")
        seconds = _epoch_time(arch, dm, workdir / "epochs")
        epoch_times[_label(arch)] = {"first_epoch_s": seconds[0], "epoch_s": seconds[-1]}
    total = sum(row["epochs"] * epoch_times[_label(row["arch"])]["epoch_s"] for row in rows)

    log("gpu: 1 vs 2 training processes on one GPU (vgg38)")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        alone, pair = [], []
        for _ in range(cfg.scaling_rounds):
            alone.append(sum(_concurrent_throughput(cfg, "vgg38", 1, Path(tmp))))
            pair.append(sum(_concurrent_throughput(cfg, "vgg38", 2, Path(tmp))))
    speedup = Summary.of([p / a for p, a in zip(pair, alone)])
    best = total / speedup.median if speedup.median > 1.05 else total
    return {
        "device": torch.cuda.get_device_name(),
        "epoch_times": epoch_times,
        "rows": [
            {"name": r["name"], "arch": _label(r["arch"]), "epochs": r["epochs"]} for r in rows
        ],
        "table1_minutes_one_run_at_a_time": total / 60,
        "two_processes_speedup": speedup,
        "table1_minutes": best / 60,
        "runs_per_gpu": 2 if best < total else 1,
    }
