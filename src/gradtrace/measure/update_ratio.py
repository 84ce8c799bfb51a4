"""``update_ratio``: ``||w_after - w_before|| / ||w_before||`` over one optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradtrace.compat import foreach_copy, foreach_norm, foreach_sub

__all__ = ["PendingUpdate"]


@dataclass
class PendingUpdate:
    """Records of a measured step waiting for its optimizer step to finish."""

    records: list[dict[str, Any]]
    params: list[torch.Tensor]
    before: list[torch.Tensor]

    @classmethod
    def snapshot(cls, records: list[dict[str, Any]], params: list[torch.Tensor]) -> PendingUpdate:
        with torch.no_grad():  # one batched copy of the weights before the step
            before = foreach_copy([p.detach() for p in params])
        return cls(records, params, before)

    def finish(self) -> list[dict[str, Any]]:
        """Fill ``update_ratio`` into the records (one device-to-host copy) and return them."""
        with torch.no_grad():
            deltas = foreach_sub([p.detach() for p in self.params], self.before)
            norms = torch.stack(
                [
                    torch.stack(foreach_norm(deltas, 2.0)),
                    torch.stack(foreach_norm(self.before, 2.0)),
                ]
            )
        delta_norms, weight_norms = norms.double().cpu().tolist()
        for record, d, w in zip(self.records, delta_norms, weight_norms):
            record["update_ratio"] = d / w if w else (math.inf if d else 0.0)
        return self.records

    def abandon(self) -> list[dict[str, Any]]:
        """The optimizer step never finished: ``update_ratio`` is nan."""
        for record in self.records:
            record["update_ratio"] = math.nan
        return self.records
