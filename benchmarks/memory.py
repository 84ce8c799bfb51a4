"""Peak training memory, each model in a fresh process (``benchmarks.child memory``).

:func:`run_children` runs ``python -m benchmarks.child`` processes; the GPU section uses
:func:`child_environment` for its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.config import MODELS, REPO_ROOT, BenchConfig, Log

__all__ = ["bench_memory", "child_environment", "run_children"]


def child_environment() -> dict[str, str]:
    """This process's environment with the repository root on ``PYTHONPATH``, so that a
    child can import ``benchmarks`` (which is not installed) from any working directory."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_children(arg_lists: list[list[str]], timeout: float = 900) -> list[dict]:
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
    return dict(zip(MODELS, run_children(args)))
