"""Pieces both memory layers use: their aux report, the Memory+ gated output, a record of which entries were read.

Shape suffixes: T tokens, D model width, V value width, E table entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MemoryAux:
    """No auxiliary loss; the table's read metrics (detached scalars)."""
    metrics: dict[str, torch.Tensor]

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        return {}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over DDP ranks, in place (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (same shape on every rank), concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class GatedOutput(nn.Module):
    """Memory+ (Berges et al. 2024, "Memory layers at scale"): out = W2(read * silu(W1 x)).

    The read memory (V wide) is gated by the token itself through a SiLU, like the up
    branch of a SwiGLU, then projected back to the model width."""

    def __init__(self, d_model: int, value_dim: int):
        super().__init__()
        self.gate = nn.Linear(d_model, value_dim, bias=False)   # W1
        self.out = nn.Linear(value_dim, d_model, bias=False)    # W2

    def forward(self, x_TD: torch.Tensor, read_TV: torch.Tensor) -> torch.Tensor:
        return self.out(read_TV * F.silu(self.gate(x_TD)))


class ReadTracker(nn.Module):
    """Which of E table entries were read, and when, for usage metrics.

    Buffers (saved with the model, so a resumed run reports the same): `last_read` (E,), the
    optimizer step at which each entry was last read (-1: never), and `step`, the steps done.
    Reads are counted in training forwards into `pending` (a plain attribute: empty whenever
    the trainer checkpoints, right after `after_optimizer_step`) and recorded once per step,
    summed over DDP ranks, so every rank keeps the same record."""

    def __init__(self, n_entries: int, dead_after: int):
        super().__init__()
        self.dead_after = dead_after
        self.register_buffer("last_read", torch.full((n_entries,), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.pending = torch.zeros(n_entries)

    def count(self, idx: torch.Tensor) -> torch.Tensor:
        """Reads of each entry in `idx` (any shape); added to `pending` in training mode."""
        counts_E = torch.bincount(idx.reshape(-1), minlength=self.last_read.numel()).float()
        if self.training:
            self.pending = self.pending.to(counts_E.device) + counts_E
        return counts_E

    def metrics(self, counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
        """read_share: share of the entries this forward read; table_read: share ever read in training;
        dead_share: share not read in the last `dead_after` optimizer steps (0 until that many have run)."""
        return {"read_share": (counts_E > 0).float().mean(),
                "table_read": (self.last_read >= 0).float().mean(),
                "dead_share": (self.last_read < self.step - self.dead_after).float().mean()}

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Once per optimizer step: record the step's reads (summed over ranks) and return their counts."""
        counts_E = all_reduce_sum(self.pending.to(self.last_read.device))
        self.last_read[counts_E > 0] = self.step
        self.step += 1
        self.pending = torch.zeros_like(counts_E)
        return counts_E
