"""Measurements that need a fresh process: ``python -m benchmarks.child KIND ... --out F``.

``memory``: peak training memory of one model. A fresh process, because an allocator keeps
memory it has freed and reuses it, so RSS deltas in a process that already trained another
model say little. A tiny warm-up fit first loads everything Lightning imports lazily, then
the peak is reset (CPU: ``/proc/self/clear_refs``; CUDA: ``reset_peak_memory_stats``) and the
model trains ``--steps`` batches. Reported: peak minus the memory in use just before the model
was built (CPU: resident set size; CUDA: ``max_memory_allocated``), i.e. weights, gradients,
optimizer state, activations and workspaces.

``throughput``: images/s of ``--steps`` training steps after ``--warmup`` steps (the GPU
section runs one or two of these side by side on one GPU). With ``--wait-for-go`` it prints
``ready`` after the warm-up and waits for a line on stdin, so that several processes can
time the same window.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.config import quiet_fit_kwargs
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule


def _trainer(args: argparse.Namespace, **kwargs: Any) -> pl.Trainer:
    defaults = quiet_fit_kwargs(args.accelerator, args.precision)
    return pl.Trainer(**{**defaults, "logger": False, **kwargs})


def _data(batch_size: int, batches: int) -> ImageDataModule:
    """Synthetic CIFAR-100-shaped data with just enough training images for ``batches``."""
    pool = batches * batch_size + 100
    return ImageDataModule(
        "synthetic",
        num_classes=100,
        synthetic_sizes=(pool, 100),
        val_size=100,
        batch_size=batch_size,
        augment="crop_flip",  # CIFAR's augmentation (synthetic data defaults to none)
    )


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.accelerator == "cuda"
    dm = _data(args.batch_size, args.steps + 1)
    warm = ImageClassifier(
        "coursework_vgg", num_classes=100, arch_kwargs={"width": 4}, compile=False
    )
    _trainer(args, max_steps=2).fit(warm, dm)
    del warm
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        baseline = _rss_bytes("VmRSS")
    model = ImageClassifier(args.arch, num_classes=100, compile=args.compile)
    _trainer(args, max_steps=args.steps).fit(model, dm)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        what = "torch.cuda.max_memory_allocated"
    else:
        peak = _rss_bytes("VmHWM")
        what = "peak resident set size (VmHWM)"
    return {
        "arch": args.arch,
        "peak_mb": (peak - baseline) / 2**20,
        "baseline_mb": baseline / 2**20,
        "measure": what,
        "steps": args.steps,
        "batch_size": args.batch_size,
    }


class _Timer(pl.Callback):
    def __init__(self, warmup: int, steps: int, wait_for_go: bool, cuda: bool) -> None:
        self.warmup, self.steps, self.wait_for_go, self.cuda = warmup, steps, wait_for_go, cuda
        self.start = self.elapsed = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == self.warmup:
            if self.wait_for_go:
                print("ready", flush=True)
                sys.stdin.readline()
            self.start = self._now()
        elif step == self.warmup + self.steps:
            self.elapsed = self._now() - self.start
            trainer.should_stop = True


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.accelerator == "cuda"
    dm = _data(args.batch_size, args.warmup + args.steps + 1)
    model = ImageClassifier(args.arch, num_classes=100, compile=args.compile)
    timer = _Timer(args.warmup, args.steps, args.wait_for_go, cuda)
    trainer = _trainer(
        args,
        max_steps=args.warmup + args.steps + 1,
        callbacks=[timer],
    )
    trainer.fit(model, dm)
    if not timer.elapsed:
        raise RuntimeError("the run ended before its timed steps finished")
    return {
        "arch": args.arch,
        "images_per_s": args.steps * args.batch_size / timer.elapsed,
        "seconds": timer.elapsed,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("memory", "throughput"))
    parser.add_argument("--arch", required=True)
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--wait-for-go", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = memory(args) if args.kind == "memory" else throughput(args)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
