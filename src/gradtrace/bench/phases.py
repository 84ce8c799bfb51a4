"""The bench's measurements, one function per section of the report.

Each returns plain data: per-round samples, their :class:`~gradtrace.bench.stats.Summary`
and the settings used. :mod:`gradtrace.bench.report` turns them into JSON and markdown.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm

from gradtrace.bench.stats import Summary, interleave, overheads, ratios
from gradtrace.bench.stepper import TrainerSteps
from gradtrace.bench.workloads import (
    HostSyncCounter,
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
    "bench_host_syncs",
    "bench_memory",
    "bench_scaling",
    "bench_training",
    "cifar100_like",
    "describe_device",
    "quiet_fit_kwargs",
]

Log = Callable[[str], None]

MODELS = ("vgg08", "vgg38")
CIFAR100_TRAIN, CIFAR100_VAL, CIFAR100_TEST = 50_000, 2_500, 10_000
# callback_overhead key -> the name of its workload ("gradtrace+<name>")
CALLBACKS = {"gradtrace": "GradientFlow", "grad_norm": "grad_norm", "wandb_watch": "wandb.watch"}


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
    scaling_rounds: int = 1
    scaling_warmup: int = 2
    scaling_steps: int = 3
    matmul_size: int = 2048

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
            rounds={"vgg08": 4 if quick else 12, "vgg38": 3 if quick else 10},
            steps_per_block={"vgg08": 1, "vgg38": 1},
            data_rounds=3 if quick else 10,
            data_batches=20 if quick else 40,
            memory_steps=1 if quick else 2,
            scaling_rounds=1 if quick else 2,
            scaling_warmup=1 if quick else 2,
            scaling_steps=2 if quick else 6,
            matmul_size=2048,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, with the training pool they imply."""
        return {**asdict(self), "training_pool": self.training_pool()}

    def training_pool(self) -> int:
        """Images of synthetic training pool: CIFAR-100's 50,000, or more if one epoch
        (after the 2,500 validation images) would not hold every timed Lightning step.

        Timed blocks never cross an epoch's end; VGG38's fit runs the plain Lightning step
        and the three callbacks' blocks, every round.
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


class _ScheduledGradientFlow(GradientFlow):
    """``GradientFlow(every_n_steps=1)`` that measures only while :attr:`active` (its turn).

    :attr:`seconds` adds up the time spent in its measuring hook.
    """

    active = False
    seconds = 0.0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.active:
            start = time.perf_counter()
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.seconds += time.perf_counter() - start


class _GradNormLogging(pl.Callback):
    """Lightning's recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` before each step.

    :attr:`seconds` adds up the time spent computing and handing over the norms (Lightning
    writes them to the logger later in the step, with the other logged values).
    """

    active = False
    seconds = 0.0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.active:
            start = time.perf_counter()
            pl_module.log_dict(grad_norm(pl_module, norm_type=2))
            self.seconds += time.perf_counter() - start


class _WandbWatch(pl.Callback):
    """``wandb.watch(model, log="gradients", log_freq=1)`` while :attr:`active`.

    The hooks wandb.watch puts on the parameters compute the histograms during backward and
    stage them with ``commit=False``; a ``WandbLogger`` would commit them with its next
    ``log``. With no such logger here, the step ends with that commit (``run.log({...})``).
    :attr:`seconds` adds up the time of the histograms (wandb's ``log_tensor_stats``, which
    its hooks call) and of the commit.
    """

    def __init__(self, run: Any, model: torch.nn.Module) -> None:
        self.run, self.model = run, model
        self.active = False
        self.seconds = 0.0

    def switch(self, active: bool) -> None:
        """Watch or unwatch (between steps, outside the timing)."""
        history = self.run._torch  # wandb's TorchHistory: its hooks call log_tensor_stats
        if active and not self.active:
            self.run.watch(self.model, log="gradients", log_freq=1, idx=0)
            original = history.log_tensor_stats

            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            history.log_tensor_stats = timed
        elif self.active and not active:
            self.run.unwatch(self.model)
            del history.log_tensor_stats
        self.active = active

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.active:
            start = time.perf_counter()
            self.run.log({"trainer/global_step": trainer.global_step})
            self.seconds += time.perf_counter() - start


def _start_wandb(workdir: Path, log: Log) -> Any:
    """An offline W&B run, or None (with the reason logged) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        log("wandb is not installed: wandb.watch is not measured (pip install 'gradtrace[wandb]')")
        return None
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        mode="offline",
        dir=str(workdir),
        project="gradtrace-bench",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


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
    with grad_norm logging and with wandb.watch (each switched on for its own block only, in
    one fit); a dense matmul; a run of the data pipeline.
    """
    return {
        "models": {
            arch: _bench_model(cfg, dm, arch, arch == "vgg38", workdir / arch, log)
            for arch in MODELS
        },
        "host_overhead": bench_host_overhead(cfg, workdir / "overhead", log),
    }


def bench_host_overhead(
    cfg: BenchConfig, root: Path, log: Log, block: int = 20, rounds: int = 5
) -> dict[str, Any]:
    """Lightning's own time per step: a tiny network (width 4, batch 2) in both loops.

    With almost no arithmetic, the difference of the step times is the host time the
    Trainer, ImageClassifier and ImageDataModule add to every step. On a GPU that time is
    only hidden while the device is busier than the host; for small networks it is not.
    On the CPU it runs with one torch thread: with more, tiny ops mostly measure how long
    the threads take to meet (long on a busy machine), not Python.
    """
    log(f"host overhead per step: tiny network, {rounds} rounds of {block} steps")
    threads = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(1)
    dm = cifar100_like(batch_size=2, pool=2 * block * (rounds + 2) + CIFAR100_VAL + 100)
    options = {"width": 4}
    model = ImageClassifier("coursework_vgg", num_classes=dm.num_classes, arch_kwargs=options)
    stepper = TrainerSteps(model, dm, sync_cuda=cfg.device == "cuda", **_trainer_kwargs(cfg, root))
    try:
        stepper.start()
        images, labels = dm.split("train")
        plain = PlainLoop(
            "coursework_vgg",
            images,
            labels,
            dm.mean,
            dm.std,
            num_classes=dm.num_classes,
            model_options=options,
            batch_size=2,
            device=cfg.device,
            precision=cfg.precision,
            total_steps=labels.numel() // 2,
        )
        samples = interleave(
            {"plain": lambda: plain.run(block), "gradtrace": lambda: stepper.run(block)},
            rounds,
            warmup=1,
        )
    finally:
        stepper.close()
        torch.set_num_threads(threads)
    per_step = {name: [t / block for t in times] for name, times in samples.items()}
    return {
        "torch_threads": 1 if cfg.device == "cpu" else threads,
        "seconds_per_step": {name: Summary.of(v) for name, v in per_step.items()},
        "extra_seconds_per_step": Summary.of(
            [g - p for g, p in zip(per_step["gradtrace"], per_step["plain"])]
        ),
        "block": block,
    }


def _timing_hooks(
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
    gradient_flow = _ScheduledGradientFlow(every_n_steps=1, plot=False)
    grad_norms = _GradNormLogging()
    callbacks: list[pl.Callback] = [gradient_flow, grad_norms] if full else []
    run = _start_wandb(root, log) if full else None
    watch = _WandbWatch(run, model.net) if run is not None else None
    if watch is not None:
        callbacks.append(watch)
    stepper = TrainerSteps(
        model,
        dm,
        sync_cuda=cfg.device == "cuda",
        callbacks=callbacks,
        **_trainer_kwargs(cfg, root),
    )
    default_log_every = stepper.trainer.log_every_n_steps

    def switch(name: str) -> None:
        gradient_flow.active = name == "gradtrace+GradientFlow"
        grad_norms.active = name == "gradtrace+grad_norm"
        # "logged every step": Lightning hands self.log values to the logger every
        # log_every_n_steps steps, so grad_norm's blocks log at every step.
        stepper.trainer.log_every_n_steps = 1 if grad_norms.active else default_log_every
        if watch is not None:
            watch.switch(name == "gradtrace+wandb.watch")

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
        if full:
            clocks = {"GradientFlow": gradient_flow, "grad_norm": grad_norms, "wandb.watch": watch}
            for name, clock in clocks.items():
                if clock is not None:
                    workloads[f"gradtrace+{name}"] = _timing_hooks(
                        stepper, block, clock, hook_seconds.setdefault(name, [])
                    )
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
        if f"gradtrace+{name}" in samples
    }
    # the warm-up rounds' calls come first; keep the recorded rounds'
    result["callback_hook_fraction"] = {
        key: Summary.of(ratios(hook_seconds[name][-rounds:], samples[f"gradtrace+{name}"]))
        for key, name in CALLBACKS.items()
        if name in hook_seconds
    }
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
# Memory, scaling: in fresh processes


def _children(arg_lists: list[list[str]], timeout: float = 900) -> list[dict]:
    """Run ``python -m gradtrace.bench.child ARGS --out FILE`` for each ARGS, all at once.

    Returns the JSON each wrote. Only for measurements that other processes do not disturb
    (memory); timings run one child at a time.
    """
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"result-{i}.json" for i in range(len(arg_lists))]
        cmds = [
            [sys.executable, "-m", "gradtrace.bench.child", *args, "--out", str(out)]
            for args, out in zip(arg_lists, outs)
        ]
        procs = [
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp
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


def bench_scaling(cfg: BenchConfig, log: Log, arch: str = "vgg08") -> dict:
    """Training throughput with 1 and 2 DDP processes (CPU: gloo), interleaved by round."""
    processes = 2 if cfg.device == "cpu" else min(2, torch.cuda.device_count())
    if processes < 2:
        return {"skipped": "one GPU: DDP scaling needs at least two"}
    log(f"scaling: {arch}, 1 vs {processes} DDP processes, {cfg.scaling_rounds} round(s)")

    def throughput(devices: int) -> dict:
        [result] = _children(
            [
                [
                    "throughput",
                    "--arch",
                    arch,
                    "--devices",
                    str(devices),
                    "--warmup",
                    str(cfg.scaling_warmup),
                    "--steps",
                    str(cfg.scaling_steps),
                    "--batch-size",
                    str(cfg.batch_size),
                    *_training_flags(cfg),
                ]
            ]
        )
        return result

    runs: dict[int, list[dict]] = {1: [], processes: []}
    for order in range(cfg.scaling_rounds):
        for devices in (1, processes) if order % 2 == 0 else (processes, 1):
            runs[devices].append(throughput(devices))
    rates = {n: [r["images_per_s"] for r in rs] for n, rs in runs.items()}
    return {
        "arch": arch,
        "processes": processes,
        "backend": "gloo" if cfg.device == "cpu" else "nccl",
        "images_per_s": {str(n): Summary.of(v) for n, v in rates.items()},
        "speedup": Summary.of(ratios(rates[processes], rates[1])),
        "threads_per_process": {str(n): rs[0]["threads"] for n, rs in runs.items()},
        "per_process_batch": cfg.batch_size,
    }


# ---------------------------------------------------------------------------------------------
# Host syncs


def _count_syncs(cfg: BenchConfig, every: int, workdir: Path, steps: int = 5) -> dict[str, float]:
    dm = ImageDataModule(
        "synthetic", num_classes=10, synthetic_sizes=(800, 50), val_size=100, batch_size=16
    )
    model = ImageClassifier("coursework_vgg", num_classes=10, arch_kwargs={"width": 8})
    counter = HostSyncCounter(device_only=cfg.device != "cpu")

    class Window(pl.Callback):  # from the third step (past first-step set-up) to the epoch end
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            counter.active = trainer.global_step >= 2

        def on_train_epoch_end(self, *args: Any) -> None:
            counter.active = False

    kwargs = _trainer_kwargs(cfg, workdir)
    kwargs.update(max_steps=steps, log_every_n_steps=every, precision="32-true")
    trainer = pl.Trainer(
        callbacks=[Window(), GradientFlow(every_n_steps=every, plot=False)], **kwargs
    )
    with counter:
        trainer.fit(model, dm)
    counted = steps - 2
    return {source: n / counted for source, n in sorted(counter.counts.items())}


def bench_host_syncs(cfg: BenchConfig, workdir: Path, log: Log) -> dict:
    """Ops that would make the host wait for the GPU, per training step, by their source.

    A small model on the CPU with gradtrace's defaults (ImageClassifier, ImageDataModule,
    GradientFlow): once on steps where nothing is logged (``log_every_n_steps=50``), once
    logging everything every step.
    """
    log("host syncs per training step")
    return {
        "unlogged_step": _count_syncs(cfg, every=50, workdir=workdir / "unlogged"),
        "logged_step": _count_syncs(cfg, every=1, workdir=workdir / "logged"),
    }
