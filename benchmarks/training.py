"""The training step: gradtrace vs a plain PyTorch loop, and the cost of each callback.

:func:`bench_training` returns per-round samples and their
:class:`~benchmarks.stats.Summary`; :mod:`benchmarks.report` turns them into JSON and markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from benchmarks.callbacks import (
    GradNormLogging,
    TimedCallback,
    WandbWatch,
    flight_check_seconds,
    keyed_gradient_flow,
    start_wandb,
)
from benchmarks.config import (
    ACTIVATION_INTERVAL,
    CALLBACKS,
    DEFAULT_CADENCE,
    FLIGHT_RECORDER,
    MODELS,
    BenchConfig,
    Log,
    quiet_fit_kwargs,
)
from benchmarks.stats import Summary, interleave, ratios
from benchmarks.stepper import TrainerSteps
from benchmarks.workloads import PlainLoop
from gradtrace.classifier import ImageClassifier
from gradtrace.data.datamodule import ImageDataModule

__all__ = ["bench_training"]


def _trainer_kwargs(cfg: BenchConfig, root: Path) -> dict[str, Any]:
    return dict(
        quiet_fit_kwargs(cfg.device, cfg.precision),
        logger=CSVLogger(root, name="bench"),
        default_root_dir=root,
    )


def bench_training(cfg: BenchConfig, dm: ImageDataModule, workdir: Path, log: Log) -> dict:
    """Lightning vs plain steps for each model; the callbacks' costs on VGG38.

    VGG08's rounds: a plain-loop block and a Lightning block. VGG38's rounds, in rotating
    order: a plain-loop block; Lightning blocks with no extra callback, with GradientFlow,
    with grad_norm logging, with wandb.watch, with GradientFlow's activation statistics
    measuring and attached but idle, with GradientFlow's flight recorder (recording, its
    measuring idle) (each switched on for its own block only, in one fit).
    """
    return {
        "models": {
            arch: _bench_model(cfg, dm, arch, arch == "vgg38", workdir / arch, log)
            for arch in MODELS
        }
    }


def _timed_blocks(
    stepper: TrainerSteps, block: int, clock: Any, record: list[float]
) -> Callable[[], float]:
    """A workload running ``block`` steps that records the seconds ``clock`` added meanwhile."""

    def run() -> float:
        before = clock.seconds
        elapsed = stepper.run(block)
        record.append(clock.seconds - before)
        return elapsed

    return run


def _bench_model(
    cfg: BenchConfig, dm: ImageDataModule, arch: str, full: bool, root: Path, log: Log
) -> dict[str, Any]:
    rounds = cfg.rounds[arch]
    block = cfg.steps_per_block[arch]
    steps_per_epoch = dm.split("train")[1].numel() // cfg.batch_size
    needed = (cfg.warmup + rounds) * block * (1 + len(CALLBACKS) if full else 1) + 1
    if needed > steps_per_epoch:
        raise ValueError(
            f"{arch}: {needed} Lightning steps do not fit in one epoch of {steps_per_epoch}"
        )
    log(f"training step: {arch}, {rounds} rounds of {block}-step blocks")
    model = ImageClassifier(arch, num_classes=dm.num_classes, compile=cfg.compile)
    clocks: dict[str, Any] = {}
    callbacks: list[pl.Callback] = []
    not_measured: dict[str, str] = {}
    run = None
    if full:
        flow = keyed_gradient_flow("gradients", every_n_steps=1, plot=False)
        clocks[CALLBACKS["gradtrace"]] = TimedCallback(flow)
        clocks[CALLBACKS["grad_norm"]] = GradNormLogging()
        callbacks += [flow, clocks[CALLBACKS["grad_norm"]]]
        run = start_wandb(root, log)
        if run is not None:
            clocks[CALLBACKS["wandb_watch"]] = WandbWatch(run, model.net)
            callbacks.append(clocks[CALLBACKS["wandb_watch"]])
        else:
            not_measured["wandb_watch"] = "not available: wandb is not installed"
        # activation statistics measuring every step, and attached but idle (every 10**6)
        for key, every in (("activations_every_step", 1), ("activations_idle", 10**6)):
            callback = keyed_gradient_flow(key, every_n_steps=every, plot=False, activations=True)
            clocks[CALLBACKS[key]] = TimedCallback(callback)
            callbacks.append(callback)
        # the flight recorder records every step; its measuring is idle here (every 10**6)
        flight = keyed_gradient_flow(
            "flight_recorder_idle", every_n_steps=10**6, plot=False, flight_recorder=FLIGHT_RECORDER
        )
        clocks[CALLBACKS["flight_recorder_idle"]] = TimedCallback(flight)
        callbacks.append(flight)
    stepper = TrainerSteps(
        model,
        dm,
        sync_cuda=cfg.device == "cuda",
        callbacks=callbacks,
        **_trainer_kwargs(cfg, root),
    )
    default_log_every = stepper.trainer.log_every_n_steps

    def switch(name: str) -> None:
        for clock_name, clock in clocks.items():
            if isinstance(clock, WandbWatch):
                clock.switch(name == f"gradtrace+{clock_name}")
            else:
                clock.active = name == f"gradtrace+{clock_name}"
        # "logged every step": Lightning hands self.log values (grad_norm's) to the logger
        # every log_every_n_steps steps, so grad_norm's blocks log at every step. GradientFlow
        # logs what it measures itself.
        logs_every_step = name == f"gradtrace+{CALLBACKS['grad_norm']}"
        stepper.trainer.log_every_n_steps = 1 if logs_every_step else default_log_every

    try:
        stepper.start()  # sets the data up (on the device when it is device-resident)
        images, labels = dm.split("train")
        plain = PlainLoop(
            arch,
            images,
            labels,
            dm.mean,
            dm.std,
            num_classes=dm.num_classes,
            batch_size=cfg.batch_size,
            device=cfg.device,
            precision=cfg.precision,
            compile=cfg.compile,
            total_steps=steps_per_epoch,
        )
        workloads: dict[str, Callable[[], float | None]] = {
            "plain": lambda: plain.run(block),
            "gradtrace": lambda: stepper.run(block),
        }
        hook_seconds: dict[str, list[float]] = {}
        for name, clock in clocks.items():
            workloads[f"gradtrace+{name}"] = _timed_blocks(
                stepper, block, clock, hook_seconds.setdefault(name, [])
            )
        samples = interleave(workloads, rounds, warmup=cfg.warmup, between=switch)
        switch("")
    finally:
        stepper.close()
        if run is not None:
            run.finish()

    result: dict[str, Any] = {
        "seconds_per_step": {k: Summary.of([t / block for t in v]) for k, v in samples.items()},
        # throughput ratio = plain time / gradtrace time, round by round
        "train_step_ratio": Summary.of(ratios(samples["plain"], samples["gradtrace"])),
        "steps_per_block": block,
    }
    if not full:
        return result
    # the warm-up rounds' calls come first; keep the recorded rounds'
    fractions = {
        key: ratios(hook_seconds[name][-rounds:], samples[f"gradtrace+{name}"])
        for key, name in CALLBACKS.items()
        if name in hook_seconds
    }
    # One measuring step and (interval - 1) idle ones, round by round: the cost of
    # GradientFlow(activations=True, every_n_steps=interval) averaged over its interval.
    n = ACTIVATION_INTERVAL
    fractions[f"activations_every_{n}"] = [
        (measuring + (n - 1) * waiting) / n
        for measuring, waiting in zip(
            fractions["activations_every_step"], fractions.pop("activations_idle")
        )
    ]
    fractions["flight_recorder"] = _flight_recorder_fractions(
        model, fractions, samples[f"gradtrace+{CALLBACKS['flight_recorder_idle']}"], block
    )
    result["callback_hook_fraction"] = {key: Summary.of(v) for key, v in fractions.items()}
    result["not_measured"] = not_measured
    return result


def _flight_recorder_fractions(
    model: ImageClassifier, fractions: dict[str, list[float]], blocks: list[float], block: int
) -> list[float]:
    """GradientFlow(flight_recorder=FLIGHT_RECORDER) at the default cadence, round by round:
    the recording block's time in hooks, 1/DEFAULT_CADENCE of the every-step measuring
    block's, and one check (timed apart: one every FLIGHT_RECORDER // 4 steps, longer than
    any block) per FLIGHT_RECORDER // 4 steps, over the step time of the recording block."""
    check = flight_check_seconds(model.net, FLIGHT_RECORDER) / (FLIGHT_RECORDER // 4)
    recording = fractions.pop("flight_recorder_idle")
    return [
        rec + measuring / DEFAULT_CADENCE + check / (seconds / block)
        for rec, measuring, seconds in zip(recording, fractions["gradtrace"], blocks)
    ]
