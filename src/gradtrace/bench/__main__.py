"""``python -m gradtrace.bench [--quick] [--out DIR]``: run the bench, write the reports."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning
import torch

from gradtrace.bench import phases
from gradtrace.bench.gpu import bench_gpu
from gradtrace.bench.report import build_report, render_markdown


def caveats(cfg: phases.BenchConfig) -> list[str]:
    """What a reader must know to read the figures right."""
    notes = [
        "Lightning blocks are timed inside the fit from one `on_train_batch_start` to the "
        "one after the block: whole iterations of Lightning's loop (fetching and augmenting "
        "the next batch, the step, callbacks, logging), without the fit's start-up. The plain "
        "loop's blocks include its own batch cutting and augmentation.",
        "Callbacks are switched on for their own blocks only, in one fit: GradientFlow "
        "(every_n_steps=1, plot=False) measures and logs every step of its blocks; grad_norm "
        "is `self.log_dict(grad_norm(module, 2))` in `on_before_optimizer_step` with "
        "`log_every_n_steps=1` during its blocks; `wandb.watch(log='gradients', log_freq=1)` "
        "is attached before its blocks and removed after (offline run), each step ending "
        "with the `run.log` commit a WandbLogger would make. All log through a CSVLogger. "
        "GradientFlow's per-epoch plot is a per-epoch cost and not part of these figures.",
        "Callback cost is given two ways: the difference between interleaved blocks with and "
        "without the callback (the issue's definition; on a noisy machine its spread can "
        "exceed the 2% goal either way), and the time spent inside the callback's own code "
        "divided by its block's time (precise on a CPU; on a GPU it includes waiting for the "
        "device, as the callback's one device-to-host copy waits for backward to finish). "
        "grad_norm's direct figure leaves out Lightning writing its values to the logger.",
        "Peak memory is measured in a fresh process per model, after a warm-up fit: "
        + (
            "`torch.cuda.max_memory_allocated` minus what was allocated before the model."
            if cfg.device == "cuda"
            else "peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus "
            "the RSS before the model was built: weights, gradients, Adam state, "
            "activations and allocator slack."
        ),
        "Host syncs are counted with a dispatch mode; on the CPU nothing actually waits, and "
        "some ops check their inputs with `.item()` only on the CPU (`F.one_hot`), so CPU "
        "counts are an upper bound of a GPU's. Adam's `.item()` reads its step counters, "
        "which live on the CPU unless `capturable`/`fused`: no device wait.",
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
            "On a CPU shared with other processes, torch's intra-op threads make small ops "
            "(the data pipeline's) wait milliseconds at each parallel region for a "
            "descheduled thread, so ImageDataModule's CPU rate collapses on a busy machine; "
            "the one-thread figure shows it without that effect (DataLoader workers run one "
            "thread each). On a GPU the pipeline runs on the device.",
            "Scaling on a CPU: two DDP processes share the same cores (Lightning gives each "
            "cores/processes threads), so no gain is expected on a quiet machine; on a busy "
            "one, the single process's two intra-op threads wait for each other (as above) "
            "and one-thread processes look faster.",
            "GPU section skipped: no CUDA device. The GPU code paths (bf16-mixed, compile, "
            "device-resident data, epoch times, Table 1 projection, processes per GPU) did "
            "not run for this report.",
        ]
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds (< 3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    args = parser.parse_args(argv)

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)

    # Lightning's info lines and known warnings would drown the progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning)

    cfg = phases.BenchConfig.for_device(args.quick)
    device = phases.describe_device(cfg.device)
    log(f"{'quick' if cfg.quick else 'full'} bench on {device}")
    with tempfile.TemporaryDirectory(prefix="gradtrace-bench-") as tmp:
        workdir = Path(tmp)
        host_syncs = phases.bench_host_syncs(cfg, workdir / "syncs", log)
        pool = cfg.training_pool()
        log(f"CIFAR-100-shaped synthetic data, training pool of {pool:,} images")
        dm = phases.cifar100_like(cfg.batch_size, pool)
        training = phases.bench_training(cfg, dm, workdir / "training", log)
        data = phases.bench_data(cfg, dm, log)
        memory = phases.bench_memory(cfg, log)
        scaling = phases.bench_scaling(cfg, log)
        del dm
        gpu = bench_gpu(cfg, workdir / "gpu", log)
    report = build_report(
        device=device,
        settings=cfg.to_dict(),
        training=training,
        data=data,
        memory=memory,
        scaling=scaling,
        host_syncs=host_syncs,
        gpu=gpu,
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
        caveats=caveats(cfg),
        elapsed_s=time.perf_counter() - start,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(render_markdown(report))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")


if __name__ == "__main__":
    main()
