"""One training process of the GPU section: ``python -m benchmarks.child ... --out F``.

Writes the images/s of ``--steps`` training steps after ``--warmup`` steps (the GPU
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

from benchmarks.config import CIFAR100_VAL, cifar100_like, quiet_fit_kwargs
from gradtrace.classifier import ImageClassifier


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
    pool = (args.warmup + args.steps + 1) * args.batch_size + CIFAR100_VAL
    dm = cifar100_like(args.batch_size, pool)
    model = ImageClassifier(args.arch, num_classes=100, compile=args.compile)
    timer = _Timer(args.warmup, args.steps, args.wait_for_go, cuda)
    trainer = pl.Trainer(
        **quiet_fit_kwargs(args.accelerator, args.precision),
        logger=False,
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
    args.out.write_text(json.dumps(throughput(args)))


if __name__ == "__main__":
    main()
