"""Run one function on several local processes, each writing what it returns as JSON.

Every multi-process script of the tests goes through :func:`spawn_ranks`. Each rank joins the
group over TCP on ``127.0.0.1:port``, runs ``work(rank)``, waits at a barrier (no rank tears
the group down while another still talks to it), writes ``out/rank<r>.json`` atomically,
destroys the group and leaves with ``os._exit``. Skipping the interpreter's teardown matters:
gloo's and DeepSpeed's C++ threads still alive at exit once aborted a rank on a busy machine
("terminate called without an active exception") after its work was done. A rank whose work
raises prints the traceback and exits 1, so ``mp.spawn`` fails the script.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn_ranks"]


def spawn_ranks(
    work: Callable[[int], Any],
    out: Path,
    port: int,
    *,
    world: int = 2,
    device: str = "cpu",
    join: Callable[[int, int], None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``work(rank)`` on ``world`` processes and write each result to
    ``out/rank<r>.json``. ``work`` and ``join`` must be module-level functions (or partials
    of them) of the calling script. ``join(rank, world)`` joins the group (default:
    ``init_process_group``, NCCL with ``device="cuda"``, else gloo); ``env`` is added to each
    rank's environment before it joins."""
    mp.spawn(_rank_main, args=(work, out, port, world, device, join, env or {}), nprocs=world)


def _rank_main(
    rank: int,
    work: Callable[[int], Any],
    out: Path,
    port: int,
    world: int,
    device: str,
    join: Callable[[int, int], None] | None,
    env: dict[str, str],
) -> None:
    status = 1
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            **env,
        )
        torch.set_num_threads(1)
        if device == "cuda":
            torch.cuda.set_device(rank)
        if join is not None:
            join(rank, world)
        else:
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world)
        result = work(rank)
        dist.barrier()
        partial = out / f"rank{rank}.json.partial"
        partial.write_text(json.dumps(result))
        partial.replace(out / f"rank{rank}.json")
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
