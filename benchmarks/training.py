"""The training step: gradtrace vs a plain PyTorch loop, and the cost of each callback.

:func:`bench_training` returns per-round samples and their
:class:`~benchmarks.stats.Summary`; :mod:`benchmarks.report` turns them into JSON and markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmarks.callbacks import GradNormLogging, TimedCallback, WandbWatch, start_wandb
from benchmarks.config import (
    ACTIVATION_INTERVAL,
    CALLBACKS,
    MODELS,
    BenchConfig,
    Log,
    quiet_fit_kwargs,
)
from benchmarks.data import OurBatches
from benchmarks.stats import Summary, interleave, overheads, ratios
from benchmarks.stepper import TrainerSteps
from benchmarks.workloads import Matmul, PlainLoop, train_step_flops
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = ["bench_training"]


def _trainer_kwargs(cfg: BenchConfig, root: Path) -> dict[str, Any]:
    return dict(
        quiet_fit_kwargs(cfg.device, cfg.precision),
        logger=CSVLogger(root, name="bench"),
        default_root_dir=root,
    )


def bench_training(cfg: BenchConfig, dm: ImageDataModule, workdir: Path, log: Log) -> dict:
    """Lightning vs plain steps for each model; callbacks, matmul and data on VGG38.

    VGG08's rounds: a plain-loop block and a Lightning block. VGG38's rounds, in rotating
    order: a plain-loop block; Lightning blocks with no extra callback, with GradientFlow,
    with grad_norm logging, with wandb.watch, with GradientFlow's activation statistics
    measuring and attached but idle (each switched on for its own block only, in one fit);
    a dense matmul; a run of the data pipeline.
    """
    return {
        "models": {
            arch: _bench_model(cfg, dm, arch, arch == "vgg38", workdir / arch, log)
            for arch in MODELS
        }
    }


def _gradient_flow(role: str, **kwargs: Any) -> GradientFlow:
    """A GradientFlow with a checkpoint state key of its own (``GradientFlow[role]``).

    Lightning refuses two stateful callbacks with the same ``state_key`` in one Trainer, and
    the bench puts several GradientFlow callbacks in one fit (each active in its own blocks).
    """
    state_key = f"GradientFlow[{role}]"
    keyed = {"state_key": property(lambda _: state_key)}
    return type(f"GradientFlow_{role}", (GradientFlow,), keyed)(**kwargs)


def _activation_flows(log: Log) -> tuple[GradientFlow, GradientFlow] | str:
    """GradientFlow with activation statistics measuring every step, and one attached but
    measuring only every millionth step; or why they cannot be made (an older gradtrace)."""
    try:
        return (
            _gradient_flow("activations", every_n_steps=1, plot=False, activations=True),
            _gradient_flow("idle", every_n_steps=10**6, plot=False, activations=True),
        )
    except TypeError as err:
        log(f"GradientFlow(activations=True) is not available: {err}")
        return "not available: this GradientFlow has no activations argument"


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
        flow = _gradient_flow("gradients", every_n_steps=1, plot=False)
        clocks[CALLBACKS["gradtrace"]] = TimedCallback(flow)
        clocks[CALLBACKS["grad_norm"]] = GradNormLogging()
        callbacks += [flow, clocks[CALLBACKS["grad_norm"]]]
        run = start_wandb(root, log)
        if run is not None:
            clocks[CALLBACKS["wandb_watch"]] = WandbWatch(run, model.net)
            callbacks.append(clocks[CALLBACKS["wandb_watch"]])
        else:
            not_measured["wandb_watch"] = "not available: wandb is not installed"
        activations = _activation_flows(log)
        if isinstance(activations, str):
            not_measured["activations_every_step"] = activations
            not_measured[f"activations_every_{ACTIVATION_INTERVAL}"] = activations
        else:
            for key, callback in zip(("activations_every_step", "activations_idle"), activations):
                clocks[CALLBACKS[key]] = TimedCallback(callback)
                callbacks.append(callback)
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
        # "logged every step": Lightning hands self.log values (grad_norm's, GradientFlow's
        # summary scalars) to the logger every log_every_n_steps steps, so the blocks of
        # callbacks measuring every step log at every step too.
        every_step = {CALLBACKS[k] for k in ("gradtrace", "grad_norm", "activations_every_step")}
        logs_every_step = name.removeprefix("gradtrace+") in every_step
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
        if full:
            dtype = torch.bfloat16 if cfg.precision.startswith("bf16") else torch.float32
            matmul = Matmul(cfg.matmul_size, cfg.device, dtype)
            workloads["matmul"] = matmul.run
            data = OurBatches(dm, cfg.device)
            workloads["data"] = lambda: data.run(cfg.data_batches)
        samples = interleave(workloads, rounds, warmup=cfg.warmup, between=switch)
        switch("")
    finally:
        stepper.close()
        if run is not None:
            run.finish()

    per_step = {name: [t / block for t in times] for name, times in samples.items()}
    result: dict[str, Any] = {
        "seconds_per_step": {
            k: Summary.of(v) for k, v in per_step.items() if k not in ("matmul", "data")
        },
        # throughput ratio = plain time / gradtrace time, round by round
        "train_step_ratio": Summary.of(ratios(samples["plain"], samples["gradtrace"])),
        "steps_per_block": block,
    }
    if not full:
        return result
    result["callback_overhead"] = {
        key: Summary.of(overheads(samples[f"gradtrace+{name}"], samples["gradtrace"]))
        for key, name in CALLBACKS.items()
        if f"gradtrace+{name}" in samples and key != "activations_idle"
    }
    # the warm-up rounds' calls come first; keep the recorded rounds'
    fractions = {
        key: ratios(hook_seconds[name][-rounds:], samples[f"gradtrace+{name}"])
        for key, name in CALLBACKS.items()
        if name in hook_seconds
    }
    idle = fractions.pop("activations_idle", None)
    if idle is not None:
        # One measuring step and (interval - 1) idle ones, round by round: the cost of
        # GradientFlow(activations=True, every_n_steps=interval) averaged over its interval.
        n = ACTIVATION_INTERVAL
        fractions[f"activations_every_{n}"] = [
            (measuring + (n - 1) * waiting) / n
            for measuring, waiting in zip(fractions["activations_every_step"], idle)
        ]
    result["callback_hook_fraction"] = {key: Summary.of(v) for key, v in fractions.items()}
    result["not_measured"] = not_measured
    # data batches/s over training steps/s, both from the same round
    result["data_vs_model"] = Summary.of(
        [(cfg.data_batches / d) * t for d, t in zip(samples["data"], per_step["gradtrace"])]
    )
    flops = train_step_flops(arch, cfg.batch_size, num_classes=dm.num_classes)
    step_rate = [flops / t for t in per_step["gradtrace"]]
    matmul_rate = [matmul.flops / t for t in samples["matmul"]]
    result["flops"] = {
        "train_step_flops": flops,
        "train_step_flops_per_s": Summary.of(step_rate),
        "matmul_flops_per_s": Summary.of(matmul_rate),
        "matmul_size": cfg.matmul_size,
        "flops_fraction": Summary.of(ratios(step_rate, matmul_rate)),
    }
    return result
