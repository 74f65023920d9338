"""Product-key memory layer (Lample et al. 2019) with the Memory+ gated output (Berges et al. 2024).

A table of E = n_keys**2 trained values, addressed by trained keys that are never
stored whole: the key of entry (i, j) is the concatenation of sub-key i of the first
half and sub-key j of the second. A query is split the same way; the best k entries
are among the k x k pairs of each half's k best sub-keys, so finding them costs
2 * n_keys = 2 * sqrt(E) comparisons instead of E. Each of H heads reads its own k
entries of the one shared table; the softmax-weighted sum of the read values is
gated by the token and projected back (Memory+).

Read top to bottom: config, lookup, the layer. Shape suffixes: T tokens, D model
width, H heads, Q query width of one head (two halves of Q/2), N sub-keys per half,
K entries read per head, V value width, E table entries.

    y, aux = ProductKeyMemory(ProductKeyConfig(d_model=256))(x)   # x: (B, S, D) or (T, D)
    aux.metrics   # read_share, table_read, dead_share (see models/memory/shared.py)

Causal: every token reads on its own; the query is normalised per token (Lample et al.
use BatchNorm, whose training statistics would mix positions and sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_playground.models.memory.shared import GatedOutput, MemoryAux, ReadTracker
from moe_playground.models.validate import check


# -----------------------------------------------------------------------------
# config

@dataclass
class ProductKeyConfig:
    # the token width; None when a model builds the layer, which passes its own (see train/lm.py)
    d_model: Optional[int] = 256
    n_keys: int = 128          # sub-keys per half: the table has n_keys**2 entries
    heads: int = 4             # independent lookups into the one table, summed
    query_dim: int = 64        # query width per head, split in two halves of query_dim / 2
    top_k: int = 32            # entries read per head
    value_dim: Optional[int] = None  # width of a table row; None: d_model
    gated: bool = True         # Memory+: out = W2(read * silu(W1 x)); False: out = read (Lample et al.)
    dead_after: int = 100      # an entry not read for this many optimizer steps counts as dead
    init_std: float = 0.02     # normal init of the query, gate and output weights

    def __post_init__(self):
        for name in ("n_keys", "heads", "query_dim", "top_k", "dead_after"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"pkm.{name}={v!r} must be an integer >= 1")
        check(self.d_model is None or (isinstance(self.d_model, int) and self.d_model >= 1),
              f"pkm.d_model={self.d_model!r} must be an integer >= 1, or None when a model passes its width")
        check(self.value_dim is None or (isinstance(self.value_dim, int) and self.value_dim >= 1),
              f"pkm.value_dim={self.value_dim!r} must be an integer >= 1, or None (the model width)")
        check(self.query_dim % 2 == 0, f"pkm.query_dim={self.query_dim} must be even (two half-queries)")
        check(self.top_k <= self.n_keys, f"pkm.top_k={self.top_k} must be <= n_keys={self.n_keys} "
              "(the best k entries are found among each half's k best sub-keys)")
        check(self.gated or self.value_dim in (None, self.d_model),
              f"pkm.value_dim={self.value_dim} must equal d_model={self.d_model} with gated=false "
              "(the read values are the output)")
        check(self.init_std > 0, f"pkm.init_std={self.init_std} must be > 0")

    @property
    def n_entries(self) -> int:
        return self.n_keys ** 2

    @property
    def width(self) -> int:
        """V: the width of a table row."""
        return self.value_dim or self.d_model


# -----------------------------------------------------------------------------
# lookup

def candidate_pairs(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (a, b) in two lists sorted best first whose pair can be among the k best sums:
    (a + 1) * (b + 1) <= k. Every pair (a', b') with a' <= a and b' <= b sums to at least as
    much, so a pair with (a + 1) * (b + 1) > k has k others at least as good. About k ln k
    pairs instead of k * k (303 instead of 4,096 at k = 64)."""
    r = torch.arange(1, k + 1, device=device)
    return ((r.unsqueeze(1) * r) <= k).nonzero().unbind(1)


def product_key_topk(q_THQ: torch.Tensor, subkeys_H2NQ: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries of every head: (scores_THK, entry_THK) in no particular order, entry = i * N + j.

    The score of entry (i, j) is q1 . c1_i + q2 . c2_j. Every one of the k best pairs has
    its i among the k best c1 scores (else k pairs (i', j) with better i' would beat it),
    and likewise its j; of the k x k pairs of the two top-k lists only `candidate_pairs`
    can make the top k. The search runs without autograd; the k chosen scores are
    gathered again from the half scores, so backward never touches the candidates."""
    N = subkeys_H2NQ.shape[2]
    q1_THQ, q2_THQ = q_THQ.chunk(2, dim=-1)
    s1_THN = torch.einsum("thq,hnq->thn", q1_THQ, subkeys_H2NQ[:, 0])
    s2_THN = torch.einsum("thq,hnq->thn", q2_THQ, subkeys_H2NQ[:, 1])
    with torch.no_grad():
        s1_THK, i1_THK = s1_THN.topk(k, dim=-1)   # sorted, best first
        s2_THK, i2_THK = s2_THN.topk(k, dim=-1)
        a_P, b_P = candidate_pairs(k, q_THQ.device)
        best_THK = (s1_THK[..., a_P] + s2_THK[..., b_P]).topk(k, dim=-1, sorted=False).indices
        i_THK = i1_THK.gather(-1, a_P[best_THK])
        j_THK = i2_THK.gather(-1, b_P[best_THK])
    scores_THK = s1_THN.gather(-1, i_THK) + s2_THN.gather(-1, j_THK)
    return scores_THK, i_THK * N + j_THK


# -----------------------------------------------------------------------------
# the layer

class ProductKeyMemory(nn.Module):
    """forward(x) -> (y, MemoryAux). Gradients reach the query network, the sub-keys of the
    chosen entries, the values of the read entries (no other row) and the gate."""

    def __init__(self, cfg: ProductKeyConfig):
        super().__init__()
        if cfg.d_model is None:
            raise ValueError("pkm.d_model=None: give the token width (a model passes its own)")
        self.cfg = cfg
        D, H, Q, V = cfg.d_model, cfg.heads, cfg.query_dim, cfg.width
        self.query = nn.Linear(D, H * Q, bias=False)
        self.subkeys = nn.Parameter(torch.empty(H, 2, cfg.n_keys, Q // 2))
        self.values = nn.Parameter(torch.empty(cfg.n_entries, V))
        self.output = GatedOutput(D, V) if cfg.gated else None
        self.reads = ReadTracker(cfg.n_entries, cfg.dead_after)
        self.reset_parameters()

    def reset_parameters(self, out_scale: float = 1.0) -> None:
        """Query, gate ~ N(0, init_std); sub-keys ~ N(0, 1/sqrt(Q/2)), so a normalised half-query
        scores ~ N(0, 1); table rows ~ N(0, 1/sqrt(V)), unit norm (Lample et al.). The layer's
        output projection (W2, or the table itself when ungated) is scaled by out_scale, as a
        model scales its residual branches with depth."""
        cfg = self.cfg
        nn.init.normal_(self.query.weight, std=cfg.init_std)
        nn.init.normal_(self.subkeys, std=(cfg.query_dim // 2) ** -0.5)
        nn.init.normal_(self.values, std=cfg.width ** -0.5 * (1.0 if cfg.gated else out_scale))
        if self.output is not None:
            nn.init.normal_(self.output.gate.weight, std=cfg.init_std)
            nn.init.normal_(self.output.out.weight, std=cfg.init_std * out_scale)

    def active_parameters(self) -> int:
        """Weights one token multiplies by: query, all sub-keys (scored), heads * top_k table rows, gate."""
        cfg = self.cfg
        gate = sum(p.numel() for p in self.output.parameters()) if self.output is not None else 0
        return self.query.weight.numel() + self.subkeys.numel() + cfg.heads * cfg.top_k * cfg.width + gate

    def lookup(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_THK, entry_THK): each head's k entries and their softmax weights (float32)."""
        cfg = self.cfg
        q_THQ = self.query(x_TD).view(-1, cfg.heads, cfg.query_dim)
        # each half normalised to RMS 1, per token
        q_THQ = F.rms_norm(q_THQ.unflatten(-1, (2, -1)), (cfg.query_dim // 2,)).flatten(-2)
        scores_THK, entry_THK = product_key_topk(q_THQ, self.subkeys, cfg.top_k)
        return F.softmax(scores_THK.float(), dim=-1), entry_THK

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MemoryAux]:
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model or x.dim() not in (2, 3):
            raise ValueError(f"ProductKeyMemory expects (B, S, {cfg.d_model}) or (T, {cfg.d_model}), got {tuple(x.shape)}")
        x_TD = x.reshape(-1, cfg.d_model)
        weights_THK, entry_THK = self.lookup(x_TD)
        T = x_TD.shape[0]
        # weighted sum of the read rows without materialising them (T*H*K*V): one embedding bag
        read_TV = F.embedding_bag(entry_THK.view(T, -1), self.values, mode="sum",
                                  per_sample_weights=weights_THK.view(T, -1).to(self.values.dtype))
        y_TD = self.output(x_TD, read_TV) if self.output is not None else read_TV
        with torch.no_grad():
            metrics = self.reads.metrics(self.reads.count(entry_THK))
        return y_TD.view(x.shape), MemoryAux(metrics)

    def after_optimizer_step(self) -> None:
        """Call once after every optimizer step: records the step's reads for the usage metrics."""
        self.reads.flush()
