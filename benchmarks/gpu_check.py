"""``make gpu-check``: everything that needs a GPU, in one run of at most 8 minutes.

On one CUDA GPU (sized for an H100/H200): the ``gpu``-marked tests, then the bench's GPU
section (bf16-mixed, channels_last, ``torch.compile``, data on the GPU; epoch times of the
Table 1 networks; one vs two training processes per GPU), whose Table 1 projection goes into
``reports/bench.md`` and ``reports/bench.json`` (the other sections of an earlier
``make bench`` are kept). Without CUDA it prints one line and exits 0.

``python -m benchmarks.gpu_check [--out reports]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# The tests get at most TESTS_LIMIT_S; the GPU section starts no new measurement later than
# FINISH_S before TOTAL_LIMIT_S (a network's two short epochs take about a minute, compile
# included), so that the last one and the report finish inside 8 minutes.
TESTS_LIMIT_S = 150
TOTAL_LIMIT_S = 8 * 60
FINISH_S = 90


def _run_gpu_tests(root: Path) -> str:
    """Run the ``gpu``-marked tests; return pytest's summary line (or why it stopped)."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "gpu"]
    command += ["-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=TESTS_LIMIT_S
        )
    except subprocess.TimeoutExpired:
        return f"stopped after {TESTS_LIMIT_S} s"
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "no output"
    return summary if done.returncode in (0, 5) else f"FAILED (exit {done.returncode}): {summary}"


def _previous_report(out: Path) -> dict | None:
    try:
        return json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; the GPU tests and the bench's GPU section skipped")
        return 0

    from benchmarks import config
    from benchmarks.gpu import bench_gpu
    from benchmarks.report import build_report, to_jsonable, write_reports

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[gpu-check {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)

    root = Path(__file__).resolve().parents[1]
    log("gpu-marked tests")
    tests = _run_gpu_tests(root)
    log(f"tests: {tests}")

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = config.BenchConfig.for_device(quick=True, device="cuda")
    with tempfile.TemporaryDirectory(prefix="gradtrace-gpu-check-") as tmp:
        budget = TOTAL_LIMIT_S - FINISH_S - (time.perf_counter() - start)
        gpu = bench_gpu(cfg, Path(tmp), log, budget_s=budget)
    gpu["gpu_tests"] = tests
    gpu["made_by"] = "make gpu-check"

    report = _previous_report(args.out)
    if report is None:
        report = build_report(
            device=config.describe_device("cuda"),
            settings=cfg.to_dict(),
            environment={"python": platform.python_version(), "torch": torch.__version__},
            caveats=["Made by `make gpu-check` alone: only the GPU section was measured."],
            elapsed_s=time.perf_counter() - start,
            gpu=gpu,
        )
    else:
        report["gpu"] = to_jsonable(gpu)
    write_reports(report, args.out)
    log(f"Table 1 projection: {gpu['table1_minutes']:.1f} min; wrote {args.out / 'bench.md'}")
    return 0 if not tests.startswith(("FAILED", "stopped")) else 1


if __name__ == "__main__":
    sys.exit(main())
