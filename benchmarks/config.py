"""What the bench measures with: its settings per device, the data, the Trainer's settings."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradtrace.data.datamodule import ImageDataModule

__all__ = [
    "ACTIVATION_INTERVAL",
    "CALLBACKS",
    "CIFAR100_VAL",
    "DEFAULT_CADENCE",
    "FLIGHT_RECORDER",
    "MODELS",
    "REPO_ROOT",
    "BenchConfig",
    "Log",
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
    "flight_recorder_idle": "GradientFlow(flight_recorder, idle)",
}
# GradientFlow(activations=True) measures every this many steps in the "every 50 steps" figure
ACTIVATION_INTERVAL = 50
# Lightning's default log_every_n_steps: GradientFlow measures every this many steps by default
DEFAULT_CADENCE = 50
# GradientFlow(flight_recorder=...) in its figure: the steps its ring keeps
FLIGHT_RECORDER = 200
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
    shared_gpu_rounds: int = 1  # GPU only: rounds of 1 vs 2 training processes on the device
    shared_gpu_warmup: int = 2
    shared_gpu_steps: int = 3
    gpu_steps: int = 100  # GPU only: training steps per epoch in the epoch-time runs
    transformer_rounds: int = 20  # the text Transformer section (CPU in every run)
    transformer_steps_per_block: int = 4
    transformer_batch_size: int = 16

    @classmethod
    def for_device(cls, quick: bool, device: str | None = None) -> BenchConfig:
        """The bench's settings: ``--quick`` (1 to 3 minutes on 2 CPU cores) or full."""
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
                shared_gpu_rounds=1 if quick else 2,
                gpu_steps=60 if quick else 100,
                shared_gpu_warmup=30,
                shared_gpu_steps=100,
            )
        return cls(
            quick=quick,
            device="cpu",
            precision="32-true",
            compile=False,
            warmup=1,
            # 5 rounds: the fewest whose range bounds the median with >= 90% confidence. The
            # full run's blocks and rounds narrow the ratios' intervals below their goals'
            # margins (a 0.95x goal: high/low under 1.05).
            rounds={"vgg08": 5 if quick else 40, "vgg38": 5 if quick else 16},
            steps_per_block={"vgg08": 1 if quick else 4, "vgg38": 1 if quick else 2},
            transformer_rounds=5 if quick else 20,
            transformer_steps_per_block=2 if quick else 4,
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
        augment="crop_flip",  # CIFAR's augmentation (synthetic data defaults to none)
    )
    dm.setup("fit")
    return dm


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
