"""``make gpu-check``: everything that needs a GPU, in one run of at most 8 minutes.

On one CUDA GPU (sized for an H100/H200): the ``gpu``-marked tests, then the bench's GPU
section (:mod:`benchmarks.gpu`: epoch times of the Table 1 networks as the configs run them
and in the fastest faithful configuration, one vs two training processes per GPU), whose
Table 1 projections go into ``reports/bench.md`` and ``reports/bench.json`` (the other
sections of an earlier ``make bench`` are kept). Without CUDA it prints one line and exits 0.

The 8 minutes are a hard bound: every step runs in a child process group that is killed at
its limit (the tests at :data:`TESTS_LIMIT_S`, each GPU measurement at its own limit or when
the time left runs out); what was cut, and why, is in the report.

The ``gpu``-marked tests it runs on one GPU (when this was written; ``pytest -m gpu
--collect-only -q`` lists the current ones):

* ``tests/test_activations.py::test_16_mixed_divides_the_loss_scale_out``
* ``tests/test_bench.py::test_epoch_time_on_a_gpu_compiled_without_falling_back_to_eager``
* ``tests/test_datamodule.py::test_cuda_device_resident_batches``
* ``tests/test_fast_path.py::test_fast_path_keeps_the_gradient_flow_on_a_gpu``
* ``tests/test_fast_path.py::test_no_host_syncs_from_gradtrace_on_unlogged_gpu_steps``
* ``tests/test_gradient_flow_values.py::test_fp16_fused_adam_matches_fp32_on_a_gpu``
* ``tests/test_histograms.py::test_counts_ranges_and_sums_match_numpy[cuda]``

The ``gpu``-marked tests that need 2 to 4 GPUs skip on one (pytest lists them as skipped,
with the GPU count they need): DDP and FSDP on 2 GPUs (``test_activations.py``,
``test_cluster.py``, ``test_gradient_flow_distributed.py``), ``grad_stats`` over 2 and 4 GPU
processes (``test_stats.py``) and the ``test_*_on_2_gpus`` tests. Run ``pytest -m gpu`` on a
machine with 4 GPUs for them.

``python -m benchmarks.gpu_check [--out reports]`` from the repository root.
"""

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

import torch

from benchmarks.bounded import run_bounded

# The tests get at most TESTS_LIMIT_S; the GPU section gets what is left of TOTAL_LIMIT_S
# but REPORT_S (Python's start-up before the clock starts, and writing the report), so that
# the whole ends within 8 minutes.
TESTS_LIMIT_S = 150
TOTAL_LIMIT_S = 8 * 60
REPORT_S = 30


def _run_gpu_tests(root: Path) -> str:
    """Run the ``gpu``-marked tests; return pytest's summary line (or why it stopped)."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "gpu"]
    command += ["-p", "no:cacheprovider"]
    done = run_bounded(command, TESTS_LIMIT_S, cwd=root)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    if done.timed_out:
        return f"stopped at the {TESTS_LIMIT_S} s limit"
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

    start = time.monotonic()

    def log(message: str) -> None:
        print(f"[gpu-check {time.monotonic() - start:6.1f}s] {message}", file=sys.stderr)

    root = Path(__file__).resolve().parents[1]
    log("gpu-marked tests")
    tests = _run_gpu_tests(root)
    log(f"tests: {tests}")

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = config.BenchConfig.for_device(quick=True, device="cuda")
    with tempfile.TemporaryDirectory(prefix="gradtrace-gpu-check-") as tmp:
        budget = TOTAL_LIMIT_S - REPORT_S - (time.monotonic() - start)
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
            elapsed_s=time.monotonic() - start,
            gpu=gpu,
        )
    else:
        report["gpu"] = to_jsonable(gpu)
    write_reports(report, args.out)
    for cut in gpu["cut"]:
        log(f"cut: {cut}")
    minutes = {key: setup["table1_minutes"] for key, setup in gpu["setups"].items()}
    log(f"Table 1 projection (min): {minutes}; wrote {args.out / 'bench.md'}")
    return 0 if not tests.startswith(("FAILED", "stopped")) else 1


if __name__ == "__main__":
    sys.exit(main())
