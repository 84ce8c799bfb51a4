"""``all_gather_guarded`` on 2 gloo processes where computing fails on rank 1 only: both ranks
must leave the collective and raise (rank 1 its own error, rank 0 ``RankFailure``), none may
wait. Then a healthy gather. Writes ``rank<r>.json``: what each rank raised, and what the
healthy gather returned.

``python guarded_gather.py OUT PORT``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ranks import spawn_ranks

from gradtrace.measure.collectives import RankFailure, all_gather_guarded


def compute(rank: int) -> torch.Tensor:
    if rank == 1:
        raise ValueError("counting failed here")
    return torch.ones(2, 3)


def worker(rank: int) -> dict:
    try:
        all_gather_guarded(lambda: compute(rank), (2, 3), torch.float64)
        raised = None
    except (RankFailure, ValueError) as err:
        raised = f"{type(err).__name__}: {err}"
    healthy = all_gather_guarded(lambda: torch.full((2, 3), rank), (2, 3), torch.long)
    return {"raised": raised, "healthy": healthy.tolist()}


if __name__ == "__main__":
    spawn_ranks(worker, Path(sys.argv[1]), int(sys.argv[2]))
