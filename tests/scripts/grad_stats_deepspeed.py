"""``grad_stats`` under DeepSpeed ZeRO stages 1, 2 and 3, and stage 2 with the optimizer
offloaded to the CPU, on ``--world`` gloo CPU processes (``DS_ACCELERATOR=cpu``, fp32, SGD);
each rank writes the stats, the collective count and the histograms as JSON, per setup.

Used by tests/test_stats.py against one process on the model and batch of
grad_stats_distributed.py: every rank sees the full batch, so DeepSpeed's average of the
ranks' gradients is the one-process gradient.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from grad_stats_distributed import GradientsMeasured, batch, make_model, measure_gradients
from ranks import spawn_ranks
from torch import nn


def zero(stage: int, offload: bool = False) -> GradientsMeasured:
    """``offload``: ZeRO-Offload of the optimizer, whose gradient partitions then live on the
    CPU (torch's SGD instead of DeepSpeed's compiled CPU optimizer)."""
    import deepspeed

    model = make_model()
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x, y = batch()
    engine.backward(nn.functional.mse_loss(engine(x), y))
    return measure_gradients(engine.module)  # where Lightning calls on_before_optimizer_step


def join(rank: int, world: int) -> None:
    import importlib

    import deepspeed

    # DeepSpeed's CPU backend compiles its shared-memory collectives on first use (about 50 s
    # on a fresh machine, every CI run); gloo carries the same collectives, and the gradient
    # partitions under test do not depend on which. (The attribute deepspeed.comm.torch is
    # torch itself: the module is reached by its name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def worker(rank: int) -> dict[str, GradientsMeasured]:
    results = {f"zero{stage}": zero(stage) for stage in (1, 2, 3)}
    results["zero2_offload"] = zero(2, offload=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, default=29541)
    args = parser.parse_args()
    spawn_ranks(
        worker, args.out, args.port, world=args.world, join=join, env={"DS_ACCELERATOR": "cpu"}
    )


if __name__ == "__main__":
    main()
