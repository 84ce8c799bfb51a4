"""The bench's measurements on the training step, one function per section of the report.

Each returns plain data: per-round samples, their :class:`~benchmarks.stats.Summary` and the
settings used. :mod:`benchmarks.report` turns them into JSON and markdown.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmarks.callbacks import GradNormLogging, TimedCallback, WandbWatch, start_wandb
from benchmarks.stats import Summary, interleave, overheads, ratios
from benchmarks.stepper import TrainerSteps
from benchmarks.workloads import (
    Matmul,
    OurBatches,
    PlainLoop,
    TorchvisionBatches,
    train_step_flops,
)
from gradtrace.classifier import ImageClassifier
from gradtrace.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = [
    "BenchConfig",
    "bench_data",
    "bench_memory",
    "bench_training",
    "cifar100_like",
    "describe_device",
    "quiet_fit_kwargs",
]

Log = Callable[[str], None]

MODELS = ("vgg08", "vgg38")
CIFAR100_TRAIN, CIFAR100_VAL, CIFAR100_TEST = 50_000, 2_500, 10_000
# figure key -> the name of its workload ("gradtrace+<name>"), each a Lightning block of VGG38
CALLBACKS = {
    "gradtrace": "GradientFlow",
    "grad_norm": "grad_norm",
    "wandb_watch": "wandb.watch",
    "activations_every_step": "GradientFlow(activations)",
    "activations_idle": "GradientFlow(activations, idle)",
}
# GradientFlow(activations=True) measures every this many steps in the "every 50 steps" figure
ACTIVATION_INTERVAL = 50
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchConfig:
    """How much to measure, and with which training settings, on one device.

    CPU: fp32, eager, one step per timed block. CUDA: bf16-mixed, ``torch.compile``, blocks of
    many steps (synchronised at block ends only, so host and device overlap as in training).
    """

    quick: bool
    device: str
    precision: str
    compile: bool
    batch_size: int = 100
    warmup: int = 1
    rounds: dict[str, int] | None = None
    steps_per_block: dict[str, int] | None = None
    data_rounds: int = 3
    data_batches: int = 30
    memory_steps: int = 2
    scaling_rounds: int = 1  # GPU only: rounds of 1 vs 2 training processes on the device
    scaling_warmup: int = 2
    scaling_steps: int = 3
    matmul_size: int = 2048
    gpu_steps: int = 100  # GPU only: training steps per epoch in the epoch-time runs

    @classmethod
    def for_device(cls, quick: bool, device: str | None = None) -> BenchConfig:
        """The bench's settings: ``--quick`` (< 3 minutes on 2 CPU cores) or full."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda":
            return cls(
                quick=quick,
                device="cuda",
                precision="bf16-mixed",
                compile=True,
                warmup=2,
                rounds={"vgg08": 3 if quick else 10, "vgg38": 3 if quick else 10},
                steps_per_block={"vgg08": 25, "vgg38": 25},
                data_rounds=3 if quick else 10,
                data_batches=40,
                memory_steps=3,
                scaling_rounds=1 if quick else 2,
                gpu_steps=60 if quick else 100,
                scaling_warmup=30,
                scaling_steps=100,
                matmul_size=8192,
            )
        return cls(
            quick=quick,
            device="cpu",
            precision="32-true",
            compile=False,
            warmup=1,
            # 5 rounds: the fewest whose range bounds the median with >= 90% confidence
            rounds={"vgg08": 5 if quick else 12, "vgg38": 5 if quick else 10},
            steps_per_block={"vgg08": 1, "vgg38": 1},
            data_rounds=3 if quick else 10,
            data_batches=20 if quick else 40,
            memory_steps=1 if quick else 2,
            matmul_size=2048,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, with the training pool they imply."""
        return {**asdict(self), "training_pool": self.training_pool()}

    def training_pool(self) -> int:
        """Images of synthetic training pool: CIFAR-100's 50,000, or more if one epoch
        (after the 2,500 validation images) would not hold every timed Lightning step.

        Timed blocks never cross an epoch's end; VGG38's fit runs the plain Lightning step
        and every callback's block, every round.
        """
        steps = max(
            (self.warmup + self.rounds[arch]) * self.steps_per_block[arch] * (1 + len(CALLBACKS))
            for arch in MODELS
        )
        return max(CIFAR100_TRAIN, (steps + 1) * self.batch_size + CIFAR100_VAL)


def describe_device(device: str) -> str:
    """``cuda: <GPU name>`` or ``cpu: <CPU model>, <n> cores, <t> torch threads``."""
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cifar100_like(batch_size: int = 100, pool: int = CIFAR100_TRAIN) -> ImageDataModule:
    """CIFAR-100-shaped synthetic data, set up: 100 classes of 3x32x32 images, a training
    pool of ``pool`` (CIFAR-100: 50,000, of which 2,500 for validation) and 10,000 test."""
    dm = ImageDataModule(
        "synthetic",
        num_classes=100,
        synthetic_sizes=(pool, CIFAR100_TEST),
        val_size=CIFAR100_VAL,
        batch_size=batch_size,
    )
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------
# Training step and callback overhead


def quiet_fit_kwargs(accelerator: str, precision: str) -> dict[str, Any]:
    """Trainer settings of every benchmarked fit: one device, one epoch, no validation,
    checkpoints, progress bar or summary; only the training loop's own work is timed."""
    return dict(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


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


def _activation_flows(log: Log) -> tuple[GradientFlow, GradientFlow] | str:
    """GradientFlow with activation statistics measuring every step, and one attached but
    measuring only every millionth step; or why they cannot be made (an older gradtrace)."""
    try:
        return (
            GradientFlow(every_n_steps=1, plot=False, activations=True),
            GradientFlow(every_n_steps=10**6, plot=False, activations=True),
        )
    except TypeError as err:
        log(f"GradientFlow(activations=True) is not available: {err}")
        return f"not available: GradientFlow(activations=True) raised {err}"


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
        flow = GradientFlow(every_n_steps=1, plot=False)
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
        # "logged every step": Lightning hands self.log values to the logger every
        # log_every_n_steps steps, so grad_norm's blocks log at every step.
        grad_norm_block = name == f"gradtrace+{CALLBACKS['grad_norm']}"
        stepper.trainer.log_every_n_steps = 1 if grad_norm_block else default_log_every

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


# ---------------------------------------------------------------------------------------------
# Data pipeline


def bench_data(cfg: BenchConfig, dm: ImageDataModule, log: Log, workers: int = 2) -> dict:
    """Batches/s of ImageDataModule vs torchvision's per-sample DataLoader, interleaved.

    On the CPU ImageDataModule is also timed with one torch thread: its batch operations are
    small, and with several intra-op threads on a busy machine every parallel region waits
    for a descheduled thread (milliseconds each), while DataLoader workers run one thread each.
    """
    log(f"data pipeline: {cfg.data_rounds} rounds of {cfg.data_batches} batches")
    dm.trainer = None  # stand-alone: no precision plugin from an earlier fit
    ours = OurBatches(dm, cfg.device)
    warmup = 2 * workers
    theirs = TorchvisionBatches(dm, workers=workers, device=cfg.device, warmup=warmup)
    batches = min(cfg.data_batches, (len(theirs) - warmup) // (cfg.data_rounds + 1))

    def one_thread() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return ours.run(batches)
        finally:
            torch.set_num_threads(threads)

    workloads: dict[str, Callable[[], float | None]] = {
        "gradtrace": lambda: ours.run(batches),
        "torchvision": lambda: theirs.run(batches),
    }
    if cfg.device == "cpu" and torch.get_num_threads() > 1:
        workloads["gradtrace_1_thread"] = one_thread
    try:
        samples = interleave(workloads, cfg.data_rounds, warmup=1)
    finally:
        theirs.close()
    rate = {name: [batches / t for t in times] for name, times in samples.items()}
    out = {
        "batches_per_s": {name: Summary.of(v) for name, v in rate.items()},
        "speedup": Summary.of(ratios(rate["gradtrace"], rate["torchvision"])),
        "batches_per_round": batches,
        "torchvision_workers": workers,
        "threads": torch.get_num_threads(),
    }
    if "gradtrace_1_thread" in rate:
        out["speedup_1_thread"] = Summary.of(
            ratios(rate["gradtrace_1_thread"], rate["torchvision"])
        )
    return out


# ---------------------------------------------------------------------------------------------
# Memory: in fresh processes


def child_environment() -> dict[str, str]:
    """This process's environment with the repository root on ``PYTHONPATH``, so that a
    child can import ``benchmarks`` (which is not installed) from any working directory."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _children(arg_lists: list[list[str]], timeout: float = 900) -> list[dict]:
    """Run ``python -m benchmarks.child ARGS --out FILE`` for each ARGS, all at once.

    Returns the JSON each wrote. Only for measurements that other processes do not disturb
    (memory); timings run one child at a time.
    """
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"result-{i}.json" for i in range(len(arg_lists))]
        cmds = [
            [sys.executable, "-m", "benchmarks.child", *args, "--out", str(out)]
            for args, out in zip(arg_lists, outs)
        ]
        procs = [
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=tmp,
                env=child_environment(),
            )
            for cmd in cmds
        ]
        results = []
        for cmd, proc, out in zip(cmds, procs, outs):
            try:
                output, _ = proc.communicate(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if proc.returncode != 0 or not out.exists():
                tail = "\n".join(output.splitlines()[-20:])
                raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{tail}")
            results.append(json.loads(out.read_text()))
        return results


def _training_flags(cfg: BenchConfig) -> list[str]:
    flags = ["--accelerator", cfg.device, "--precision", cfg.precision]
    return [*flags, "--compile"] if cfg.compile else flags


def bench_memory(cfg: BenchConfig, log: Log) -> dict:
    """Peak training memory per model, each in a fresh process (see ``child memory``).

    The processes run side by side: each measures only its own memory (resident set, or
    its own CUDA allocations).
    """
    log(f"peak memory: {', '.join(MODELS)}")
    args = [
        [
            "memory",
            "--arch",
            arch,
            "--steps",
            str(cfg.memory_steps),
            "--batch-size",
            str(cfg.batch_size),
            *_training_flags(cfg),
        ]
        for arch in MODELS
    ]
    return dict(zip(MODELS, _children(args)))
