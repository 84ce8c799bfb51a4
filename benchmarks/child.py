"""One measurement of the GPU section in a process of its own:
``python -m benchmarks.child {throughput,epoch-time} ... --out F`` writes its result to ``F``.

``throughput``: the images/s of ``--steps`` training steps after ``--warmup`` steps (the GPU
section runs one or two of these side by side on one GPU). With ``--wait-for-go`` it prints
``ready`` after the warm-up and waits for a line on stdin, so that several processes can
time the same window.

``epoch-time``: :func:`benchmarks.gpu.epoch_time` of one network on CIFAR-100-shaped data.
A process per network gives ``torch.compile`` a fresh start each time and lets the parent
kill a measurement at its time limit.
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

from benchmarks.config import CIFAR100_TRAIN, CIFAR100_VAL, cifar100_like, quiet_fit_kwargs
from benchmarks.gpu import epoch_time
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
    """Images/s of ``args.steps`` training steps of ``args.arch`` after a warm-up."""
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


def measure_epoch_time(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`benchmarks.gpu.epoch_time` of the network ``args.model`` (JSON settings)."""
    return epoch_time(
        json.loads(args.model),
        cifar100_like(args.batch_size, args.pool),
        args.steps,
        args.root,
        accelerator=args.accelerator,
        precision=args.precision,
        compile=args.compile,
        gradient_flow=json.loads(args.gradient_flow),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    timed = commands.add_parser("throughput", help="images/s of a few training steps")
    timed.add_argument("--arch", required=True)
    timed.add_argument("--steps", type=int, default=2)
    timed.add_argument("--warmup", type=int, default=2)
    timed.add_argument("--wait-for-go", action="store_true")
    epoch = commands.add_parser("epoch-time", help="epoch time of one network")
    epoch.add_argument("--model", required=True, help="the model's settings, as JSON")
    epoch.add_argument("--gradient-flow", default="{}", help="GradientFlow's arguments, as JSON")
    epoch.add_argument("--steps", type=int, default=60, help="timed training steps")
    epoch.add_argument("--pool", type=int, default=CIFAR100_TRAIN, help="training pool")
    epoch.add_argument("--root", type=Path, required=True, help="the fit's run folder")
    for command in (timed, epoch):
        command.add_argument("--accelerator", choices=("cpu", "cuda"), default="cuda")
        command.add_argument("--precision", default="32-true")
        command.add_argument("--compile", action="store_true")
        command.add_argument("--batch-size", type=int, default=100)
        command.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    measure = throughput if args.command == "throughput" else measure_epoch_time
    args.out.write_text(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
