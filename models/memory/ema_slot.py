"""EMA slot memory: a table of key/value slots written without gradient, read by top-k attention.

Each slot holds a key and a value. Training tokens write into the table: a write
(key k, value v) merges into the nearest filled slot when their cosine similarity is at
least `threshold`, by the exponential moving average

    key <- w * key + (1 - w) * k,    value <- w * value + (1 - w) * v,

and otherwise overwrites the least used slot. Nothing else changes a slot. A token
reads the table by attention over its top-k slots, and the read passes through the
Memory+ gate and output projection (models/memory/shared.py). Only the query, gate and
output weights are trained; the slots are buffers (saved with the model).

What a token writes: its key is its own query (normalised, detached), its value the
layer input of the *next* position of its sequence, so a slot pairs a context with
what followed it (the last position of a sequence writes nothing). Similar contexts
merge into one slot, whose value becomes a running average of what followed them.

When writes happen, and why it is causal. A write is never seen by the forward pass
that made it: a training forward reads the table as it stood at the start of the
optimizer step, computes its writes and their target slots against that same table,
and queues them; `after_optimizer_step()` applies the step's queue (every micro-batch,
every DDP rank in rank order) at once. So no position of a batch, earlier or later,
in the same sequence or another, ever reads a write made in that batch: a token's
output depends only on its own prefix and on the table, which is a function of
earlier optimizer steps, as trained weights are. Evaluation (eval mode) writes and
counts nothing, and decoding reads the same table training ended with. Resuming is
exact because the queue is empty whenever the trainer checkpoints (right after
`after_optimizer_step`): the slots, their usage and fill marks are buffers in the state
dict. (Activation checkpointing would run a forward twice and queue its writes twice.)

The rule for many writes in one step, which is what `write` implements and the tests
check: targets are chosen against the table at the start of the step; writes that
merge into the same slot apply in order (the closed form of applying the EMA once
per write); writes that match no slot overwrite the least used slots that no write
merges into, least used first (lowest index among equals); when there are more such
writes than those slots, the last ones win. Usage per slot is
`usage <- usage_decay * usage + reads + merges` each step; an overwritten slot
starts again at usage 1.

Shape suffixes: T tokens, B sequences, S positions, D model width, Q key width,
L slots, K slots read per token, N writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_playground.models.memory.shared import GatedOutput, MemoryAux, ReadTracker, all_gather_rows
from moe_playground.models.validate import check


@dataclass
class EMASlotConfig:
    # the token width; None when a model builds the layer, which passes its own (see train/lm.py)
    d_model: Optional[int] = 256
    n_slots: int = 1024
    key_dim: int = 32          # width of the query and of a slot's key
    top_k: int = 32            # slots each token reads
    ema: float = 0.9           # w: a merging write moves a slot to w * slot + (1 - w) * new
    threshold: float = 0.8     # cosine similarity to the nearest filled slot at or above which a write merges
    usage_decay: float = 0.99  # usage <- usage_decay * usage + reads + merges, every optimizer step
    dead_after: int = 100      # a slot not read for this many optimizer steps counts as dead
    init_std: float = 0.02     # normal init of the query, gate and output weights

    def __post_init__(self):
        for name in ("n_slots", "key_dim", "top_k", "dead_after"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"ema_slot.{name}={v!r} must be an integer >= 1")
        check(self.d_model is None or (isinstance(self.d_model, int) and self.d_model >= 1),
              f"ema_slot.d_model={self.d_model!r} must be an integer >= 1, or None when a model passes its width")
        check(self.top_k <= self.n_slots, f"ema_slot.top_k={self.top_k} must be <= n_slots={self.n_slots}")
        check(0.0 <= self.ema < 1.0, f"ema_slot.ema={self.ema} must be in [0, 1)")
        check(-1.0 <= self.threshold <= 1.0, f"ema_slot.threshold={self.threshold} must be a cosine similarity in [-1, 1]")
        check(0.0 <= self.usage_decay <= 1.0, f"ema_slot.usage_decay={self.usage_decay} must be in [0, 1]")
        check(self.init_std > 0, f"ema_slot.init_std={self.init_std} must be > 0")


class EMASlotMemory(nn.Module):
    """forward(x) -> (y, MemoryAux); x is (B, S, D), or (T, D) for one sequence."""

    def __init__(self, cfg: EMASlotConfig):
        super().__init__()
        if cfg.d_model is None:
            raise ValueError("ema_slot.d_model=None: give the token width (a model passes its own)")
        self.cfg = cfg
        L, D, Q = cfg.n_slots, cfg.d_model, cfg.key_dim
        self.query = nn.Linear(D, Q, bias=False)
        self.output = GatedOutput(D, D)
        self.register_buffer("keys", torch.zeros(L, Q))
        self.register_buffer("values", torch.zeros(L, D))
        self.register_buffer("usage", torch.zeros(L))
        self.register_buffer("filled", torch.zeros(L, dtype=torch.bool))
        self.reads = ReadTracker(L, cfg.dead_after)
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this step's writes, not state
        self.reset_parameters()

    def reset_parameters(self, out_scale: float = 1.0) -> None:
        """Query and gate ~ N(0, init_std), the output projection N(0, init_std * out_scale)
        (a model scales its residual branches with depth). The slots are left as they are."""
        nn.init.normal_(self.query.weight, std=self.cfg.init_std)
        nn.init.normal_(self.output.gate.weight, std=self.cfg.init_std)
        nn.init.normal_(self.output.out.weight, std=self.cfg.init_std * out_scale)

    def active_parameters(self) -> int:
        """Weights one token multiplies by: query, gate, output, every slot key (scored) and the
        top_k slot values read. The slots are buffers: counted here for FLOPs, not in parameters()."""
        cfg = self.cfg
        trained = sum(p.numel() for p in self.parameters())
        return trained + cfg.n_slots * cfg.key_dim + cfg.top_k * cfg.d_model

    # ---- reading -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MemoryAux]:
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model or x.dim() not in (2, 3):
            raise ValueError(f"EMASlotMemory expects (B, S, {cfg.d_model}) or (T, {cfg.d_model}), got {tuple(x.shape)}")
        x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
        x_TD = x_BSD.reshape(-1, cfg.d_model)
        q_TQ = F.rms_norm(self.query(x_TD), (cfg.key_dim,))   # RMS 1 per token
        keys_LQ = self.keys.to(q_TQ.dtype)
        with torch.no_grad():  # the search: every slot scored, no autograd over the (T, L) scores
            dots_TL = q_TQ @ keys_LQ.t()
            if not self.filled.all():
                dots_TL = dots_TL.masked_fill(~self.filled, torch.finfo(dots_TL.dtype).min)
            slot_TK = dots_TL.topk(cfg.top_k, dim=-1, sorted=False).indices
            valid_TK = self.filled[slot_TK]
        # the k chosen scores again, with autograd; empty slots get weight 0, and a token with no
        # filled slot among its k reads nothing
        scores_TK = torch.einsum("tq,tkq->tk", q_TQ, keys_LQ[slot_TK]).float() / math.sqrt(cfg.key_dim)
        scores_TK = scores_TK.masked_fill(~valid_TK, torch.finfo(torch.float32).min)
        weights_TK = F.softmax(scores_TK, dim=-1) * valid_TK
        read_TD = F.embedding_bag(slot_TK, self.values, mode="sum", per_sample_weights=weights_TK)
        y_TD = self.output(x_TD, read_TD)
        with torch.no_grad():
            metrics = self.reads.metrics(self.reads.count(slot_TK[valid_TK]))
            metrics["filled"] = self.filled.float().mean()
            if self.training:
                B, S = x_BSD.shape[:2]
                slot_BS = self.nearest_slot(q_TQ, dots_TL).view(B, S)
                metrics["write_match"] = self.queue_writes(q_TQ.view(B, S, -1), x_BSD, slot_BS)
        return y_TD.view(x.shape), MemoryAux(metrics)

    # ---- writing -------------------------------------------------------------------------

    def nearest_slot(self, key_NQ: torch.Tensor, dots_NL: torch.Tensor) -> torch.Tensor:
        """For each key, the filled slot of highest cosine similarity if it reaches the threshold, else -1.
        `dots_NL`: the keys' dot products with the slot keys (the read computed them already); the
        key's own norm does not change which slot is nearest, so only the slot norms scale them."""
        sim_NL = dots_NL * self.keys.norm(dim=-1).clamp_min(1e-12).reciprocal()
        if not self.filled.all():
            sim_NL = sim_NL.masked_fill(~self.filled, torch.finfo(sim_NL.dtype).min)
        best_N, slot_N = sim_NL.max(dim=-1)
        cos_N = best_N / key_NQ.norm(dim=-1).clamp_min(1e-12)
        return torch.where(self.filled[slot_N] & (cos_N >= self.cfg.threshold), slot_N, -1)

    @torch.no_grad()
    def queue_writes(self, q_BSQ: torch.Tensor, x_BSD: torch.Tensor, slot_BS: torch.Tensor) -> torch.Tensor:
        """Queue this forward's writes (key: query at s, value: input at s + 1) with their target
        slots (`slot_BS`, matched against the table as it is now); returns the share that merge."""
        key_NQ = q_BSQ[:, :-1].reshape(-1, q_BSQ.shape[-1]).to(self.keys.dtype)
        value_ND = x_BSD[:, 1:].reshape(-1, x_BSD.shape[-1]).to(self.values.dtype)
        slot_N = slot_BS[:, :-1].reshape(-1)
        self.queue.append((key_NQ, value_ND, slot_N))
        return (slot_N >= 0).float().mean() if slot_N.numel() else slot_N.new_zeros((), dtype=torch.float32)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call once after every optimizer step: apply the step's queued writes (all micro-batches,
        all DDP ranks) and update usage; every rank ends with the same table."""
        reads_L = self.reads.flush()
        if self.queue:
            key_NQ, value_ND, slot_N = (all_gather_rows(torch.cat(parts)) for parts in zip(*self.queue))
        else:  # no training forward since the last step
            key_NQ, value_ND, slot_N = self.keys[:0], self.values[:0], torch.zeros(0, dtype=torch.long, device=self.keys.device)
        self.queue = []
        self.write(key_NQ, value_ND, slot_N, reads_L)

    @torch.no_grad()
    def write(self, key_NQ: torch.Tensor, value_ND: torch.Tensor, slot_N: torch.Tensor, reads_L: torch.Tensor) -> None:
        """Apply writes in order: slot_N[n] >= 0 merges write n into that slot by the EMA, -1 overwrites
        a least used slot (see the module docstring for the rule); then update usage with `reads_L`."""
        w, L = self.cfg.ema, self.cfg.n_slots
        merge_N = slot_N >= 0
        into_M = slot_N[merge_N]
        merges_L = torch.bincount(into_M, minlength=L)
        # write n merging into a slot that m later writes also merge into ends weighted (1 - w) * w^m,
        # and the slot's old content w^(writes into it)
        order_M = into_M.argsort(stable=True)
        rank_M = torch.empty_like(into_M)
        rank_M[order_M] = torch.arange(into_M.numel(), device=into_M.device) - (merges_L.cumsum(0) - merges_L)[into_M[order_M]]
        coef_M = (1 - w) * torch.pow(w, (merges_L[into_M] - 1 - rank_M).to(self.keys.dtype))
        merged_L = merges_L > 0
        keep_L = torch.pow(w, merges_L[merged_L].to(self.keys.dtype)).unsqueeze(1)
        for table, new in ((self.keys, key_NQ), (self.values, value_ND)):
            table[merged_L] *= keep_L
            table.index_add_(0, into_M, coef_M.unsqueeze(1) * new[merge_N])

        self.usage.mul_(self.cfg.usage_decay).add_(reads_L.to(self.usage.dtype) + merges_L)
        free_F = (~merged_L).nonzero().squeeze(1)
        free_F = free_F[self.usage[free_F].argsort(stable=True)]   # least used first, lowest index among equals
        new_N = (~merge_N).nonzero().squeeze(1)
        n = min(new_N.numel(), free_F.numel())
        target, new_N = free_F[:n], new_N[new_N.numel() - n:]      # the last writes win
        self.keys[target] = key_NQ[new_N]
        self.values[target] = value_ND[new_N]
        self.filled[target] = True
        self.usage[target] = 1.0
