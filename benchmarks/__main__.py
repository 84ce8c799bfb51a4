"""``python -m benchmarks [--quick] [--out DIR]``: run the bench, write the reports."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning
import torch

from benchmarks import config
from benchmarks.collectives import bench_collectives
from benchmarks.gpu import bench_gpu
from benchmarks.report import build_report, write_reports
from benchmarks.training import bench_training
from benchmarks.transformer import bench_transformer


def caveats(cfg: config.BenchConfig) -> list[str]:
    """What a reader must know to read the figures right."""
    notes = [
        "Lightning blocks are timed inside the fit from one `on_train_batch_start` to the "
        "one after the block: whole iterations of Lightning's loop (fetching and augmenting "
        "the next batch, the step, callbacks, logging), without the fit's start-up. The plain "
        "loop's blocks include its own batch cutting and augmentation.",
        "Callbacks are switched on for their own blocks only, in one fit: GradientFlow "
        "(every_n_steps=1, plot=False) measures and logs every step of its blocks (it sends "
        "what it measures to the logger itself); "
        "GradientFlow(activations=True) measures every step of one kind of block and is "
        "attached but idle (every_n_steps=10**6) in another; grad_norm "
        "is `self.log_dict(grad_norm(module, 2))` in `on_before_optimizer_step` with "
        "`log_every_n_steps=1` during its blocks; `wandb.watch(log='gradients', log_freq=1)` "
        "is attached before its blocks and removed after (offline run), each step ending "
        "with the `run.log` commit a WandbLogger would make. All log through a CSVLogger. "
        "GradientFlow's per-epoch plot is a per-epoch cost and not part of these figures.",
        "A callback's cost is the time inside its own code ÷ its block's time: GradientFlow's "
        "Lightning hooks and every module or tensor hook it registers, wandb's histogram "
        "code and commit, grad_norm + log_dict (Lightning writing the values to the logger "
        "left out). Not the difference of step times with and without it (the step times "
        "are listed): on a shared machine its spread is tens of percent either way. On a GPU the "
        "time inside includes waiting for the device (one device-to-host copy per logged "
        "step waits for backward to finish), so it is an upper bound there.",
        f"Activations every {config.ACTIVATION_INTERVAL} steps: per round, (time in the "
        f"measuring block's hooks + {config.ACTIVATION_INTERVAL - 1} x the idle block's) ÷ "
        f"({config.ACTIVATION_INTERVAL} x the step), i.e. one measured and "
        f"{config.ACTIVATION_INTERVAL - 1} unmeasured steps, without timing 50 steps a round.",
        f"Flight recorder: GradientFlow(flight_recorder={config.FLIGHT_RECORDER}) at the "
        "default cadence, per round: (time in the hooks of a block where it records every step, "
        f"its measuring idle, + 1/{config.DEFAULT_CADENCE} of GradientFlow measuring every "
        f"step's + one check, timed apart, ÷ {config.FLIGHT_RECORDER // 4}) ÷ the step: a check "
        f"runs every {config.FLIGHT_RECORDER // 4} steps, longer than any timed block.",
        "Text Transformer (CPU, fp32, in every run): a plain-loop block, a Lightning block, "
        "a block where GradientFlow measures every step and one where a second GradientFlow "
        "is attached but measures nothing, per round; at the default cadence "
        "(log_every_n_steps=50) the cost is (the measuring block's time in hooks + 49 x the "
        "idle one's) ÷ 50 steps, round by round.",
        "Verdicts: a goal is judged on the median's distribution-free confidence interval "
        "(order statistics, 95% where the rounds allow it): pass when the whole interval "
        "meets the goal, FAIL when none of it does, and inconclusive when it straddles the "
        "goal, is wider than the goal's margin (the distance from no effect: 2 percentage "
        "points for a 2% cost; for ratios, on a log scale: high/low under 1/0.95 for a "
        "0.95x goal) or holds the median less than 90% of the time (under 5 rounds).",
    ]
    if cfg.device == "cuda":
        notes += [
            "GPU run: bf16-mixed, channels_last, torch.compile, data on the GPU, for both "
            "gradtrace and the plain loop; timed in blocks of "
            f"{cfg.steps_per_block['vgg38']} steps, synchronised at block ends only. The "
            "direct (in-hook) callback figures include waiting for the GPU.",
        ]
    if cfg.device == "cpu":
        notes += [
            "CPU run: fp32, eager (no torch.compile: compiling takes minutes on two cores), "
            "one training step per timed block. Absolute times on a shared CPU mean little; "
            "the ratios are what the bench is for. If other processes share the cores, "
            "rounds vary a lot (see the spreads).",
            "GPU section skipped: no CUDA device. The GPU code paths (bf16-mixed, compile, "
            "device-resident data, epoch times as configured and compiled, Table 1 "
            "projections, processes per GPU) did not run for this report.",
        ]
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="5 rounds per figure (1 to 3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    parser.add_argument(
        "--note", default="", help="a first caveat, e.g. what else ran on the machine meanwhile"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)

    # Lightning's info lines and known warnings would drown the progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning)

    cfg = config.BenchConfig.for_device(args.quick)
    device = config.describe_device(cfg.device)
    log(f"{'quick' if cfg.quick else 'full'} bench on {device}")
    with tempfile.TemporaryDirectory(prefix="gradtrace-bench-") as tmp:
        workdir = Path(tmp)
        pool = cfg.training_pool()
        log(f"CIFAR-100-shaped synthetic data, training pool of {pool:,} images")
        dm = config.cifar100_like(cfg.batch_size, pool)
        training = bench_training(cfg, dm, workdir / "training", log)
        del dm
        transformer = bench_transformer(
            cfg.transformer_rounds,
            cfg.transformer_steps_per_block,
            cfg.warmup,
            cfg.transformer_batch_size,
            workdir / "transformer",
            log,
        )
        collectives = bench_collectives(log)
        gpu = bench_gpu(cfg, workdir / "gpu", log)
    report = build_report(
        device=device,
        settings=cfg.to_dict(),
        training=training,
        collectives=collectives,
        gpu=gpu,
        transformer=transformer,
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
        caveats=([args.note] if args.note else []) + caveats(cfg),
        elapsed_s=time.perf_counter() - start,
    )
    write_reports(report, args.out)
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")


if __name__ == "__main__":
    main()
