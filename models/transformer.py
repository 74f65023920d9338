"""A small decoder-only language model.

Pre-norm blocks of RMSNorm -> causal self-attention (grouped-query when
n_kv_head < n_head) with rotary position embeddings -> RMSNorm -> feed-forward,
tied or untied input/output embeddings: the Llama architecture, so a model maps
one to one onto transformers' LlamaForCausalLM (train/hf/). The
feed-forward block of each layer comes from a factory, so a sparse layer (the
MoE of models/moe.py, the memory layers of models/memory/) plugs in without touching this file: a block may return
either `y` or `(y, aux)`, where `aux` carries auxiliary losses (`aux.losses`,
a dict of scalar tensors) and metrics (`aux.metrics`). A sparse block also
initialises itself (`reset_parameters(out_scale)`) and may keep state across
micro-batches (`after_optimizer_step()`).

A trainer sees only the model's side of that: `out.aux_losses` to add to the
objective, `out.aux_metrics` to log, `model.after_optimizer_step()`.

Decoding reuses keys and values: `model(idx, cache=cache)` with a `KVCache`
runs only the new positions (train/sample.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_playground.models.validate import check


# model.ffn: "dense" SwiGLU everywhere, or the sparse block a factory builds (train/lm.py maps each name to its layer)
FFN_KINDS = ("dense", "moe", "pkm", "ema_slot")


@dataclass
class TransformerConfig:
    vocab_size: int = 256          # byte-level by default; the data pipeline sets it from the tokenizer
    max_seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None   # key/value heads (grouped-query attention); None = n_head
    d_model: int = 128
    ffn_hidden: int = 512          # hidden width of the dense SwiGLU
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True    # the output projection is the input embedding (False: its own matrix)
    # which feed-forward block each layer gets: "dense" everywhere, or a sparse one of FFN_KINDS on
    # the layers chosen by moe_layer_freq (every n-th) after the first `first_k_dense` dense ones (DeepSeekMoE)
    ffn: str = "dense"
    moe_layer_freq: int = 1
    first_k_dense: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "ffn_hidden", "moe_layer_freq"):
            check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        check(self.d_model % self.n_head == 0, f"model.n_head={self.n_head} must divide model.d_model={self.d_model}")
        check(self.n_kv_head is None or (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0),
              f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (or be null for n_head)")
        check((self.d_model // self.n_head) % 2 == 0, f"model.d_model/n_head={self.d_model // self.n_head} must be even (rotary embeddings rotate pairs)")
        check(self.ffn in FFN_KINDS, f"model.ffn={self.ffn!r} must be one of {FFN_KINDS}")
        check(0 <= self.first_k_dense <= self.n_layer, f"model.first_k_dense={self.first_k_dense} must be in [0, n_layer={self.n_layer}]")
        check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        check(self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0, "model.rope_theta, norm_eps and init_std must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def is_sparse_layer(self, i: int) -> bool:
        return self.ffn != "dense" and i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_layer_freq == 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """exp(i * position * frequency) as complex numbers, shape (max_len, head_dim / 2)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return torch.polar(torch.ones(max_len, head_dim // 2), torch.outer(torch.arange(max_len, dtype=torch.float32), freqs))


def apply_rotary(x_BNTH: torch.Tensor, rot_TH: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x1, x2) of every head by the position's angle: one complex product."""
    x_BNTh = torch.view_as_complex(x_BNTH.float().unflatten(-1, (-1, 2)))  # (B, N, T, H/2) complex
    return torch.view_as_real(x_BNTh * rot_TH).flatten(-2).type_as(x_BNTH)


class KVCache:
    """Keys and values of every position run so far, per layer: decoding feeds only the new tokens."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer  # (B, n_kv_head, positions, head_dim)
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        """Positions held (read between forwards: during one, the earlier layers already hold more)."""
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values; returns every position's."""
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.dropout = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.dropout
        # [q | k | v] in one matmul: n_head query heads, then n_kv_head key and value heads
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, rot_TH: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, D = x_BTD.shape
        # (B, T, (n_head + 2 n_kv) head_dim) -> (B, heads, T, head_dim) each
        q, k, v = self.qkv(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2).split(
            [self.n_head, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rotary(q, rot_TH), apply_rotary(k, rot_TH)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        past = k.shape[2] - T
        # a query at position past + i sees keys 0 .. past + i (with no past, that is is_causal)
        mask = None if past == 0 or T == 1 else (
            torch.arange(past + T, device=x_BTD.device) <= past + torch.arange(T, device=x_BTD.device)[:, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up of a fused [gate | up] tensor, with a hand-written backward that
    writes d[gate | up] straight into one buffer: autograd's chunk backward would
    concatenate the two halves, a full extra pass over the largest activation."""

    @staticmethod
    def forward(ctx, gate_up_AH2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up_AH2)
        gate_AH, up_AH = gate_up_AH2.chunk(2, dim=-1)
        return F.silu(gate_AH) * up_AH

    @staticmethod
    def backward(ctx, d_AH: torch.Tensor) -> torch.Tensor:
        (gate_up_AH2,) = ctx.saved_tensors
        gate_AH, up_AH = gate_up_AH2.chunk(2, dim=-1)
        d_gate_up_AH2 = torch.empty_like(gate_up_AH2)
        d_gate_AH, d_up_AH = d_gate_up_AH2.chunk(2, dim=-1)
        torch.mul(d_AH, F.silu(gate_AH), out=d_up_AH)
        torch.ops.aten.silu_backward.grad_input(d_AH * up_AH, gate_AH, grad_input=d_gate_AH)
        return d_gate_up_AH2


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused in one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(SwiGLUActivation.apply(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, rot_TH: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> tuple[torch.Tensor, Any]:
        x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), rot_TH, cache, layer))
        out = self.ffn(self.ffn_norm(x_BTD))
        y_BTD, aux = out if isinstance(out, tuple) else (out, None)
        return x_BTD + self.drop(y_BTD), aux


@dataclass
class LMOutput:
    logits: torch.Tensor                 # (B, T, vocab)
    loss: torch.Tensor | None            # mean next-token cross-entropy, when targets are given
    aux: dict[int, Any]                  # layer index -> what its feed-forward block reported

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """`layer{i}/{name}` -> each auxiliary loss (already times its coefficient): add their sum to the loss."""
        return {f"layer{i}/{name}": v for i, a in self.aux.items() for name, v in a.losses.items()}

    @property
    def aux_metrics(self) -> dict[str, torch.Tensor]:
        """`layer{i}/{name}` -> each block metric, detached: scalars, or per-expert vectors (loads)."""
        return {f"layer{i}/{name}": v for i, a in self.aux.items() for name, v in a.metrics.items()}


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, ffn_factory: Callable[[int], nn.Module] | None = None):
        """`ffn_factory(layer)` builds the feed-forward block of the layers `cfg.is_sparse_layer` picks."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, ffn_factory(i) if cfg.is_sparse_layer(i) and ffn_factory else SwiGLU(cfg.d_model, cfg.ffn_hidden))
            for i in range(cfg.n_layer)
        )
        if cfg.ffn != "dense" and ffn_factory is None:
            raise ValueError(f"model.ffn={cfg.ffn!r} needs an ffn_factory for its sparse layers")
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        rot = rotary_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope", rot, persistent=False)
        self.reset_parameters()

    def sparse_blocks(self) -> list[nn.Module]:
        """The feed-forward blocks the factory built (they own their initialisation and state)."""
        return [b.ffn for i, b in enumerate(self.blocks) if self.cfg.is_sparse_layer(i)]

    def reset_parameters(self) -> None:
        """Every weight has one owner: a sparse block initialises itself (with its own std,
        e.g. moe.init_std), this model everything else with model.init_std. Both scale the
        residual-branch outputs down with depth (GPT-2), so the stream's variance stays put."""
        out_scale = 1 / math.sqrt(2 * self.cfg.n_layer)
        sparse = {id(m) for f in self.sparse_blocks() for m in f.modules()}
        for m in self.modules():
            if id(m) not in sparse and isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.down.weight")):  # a dense block's, not a sparse one's
                nn.init.normal_(p, std=self.cfg.init_std * out_scale)
        for f in self.sparse_blocks():
            f.reset_parameters(out_scale=out_scale)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def after_optimizer_step(self) -> None:
        """Call once after every optimizer step: sparse blocks step what they keep across micro-batches."""
        for f in self.sparse_blocks():
            f.after_optimizer_step()

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None) -> LMOutput:
        """Logits of every position of `idx_BT`; with a `cache`, `idx_BT` continues the positions it holds."""
        past = cache.length if cache is not None else 0
        T = past + idx_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x_BTD = self.drop(self.embed(idx_BT))
        rot_TH = self.rope[past:T]
        aux = {}
        for i, block in enumerate(self.blocks):
            x_BTD, aux[i] = block(x_BTD, rot_TH, cache, i)
        x_BTD = self.norm(x_BTD)
        logits = F.linear(x_BTD, self.embed.weight) if self.head is None else self.head(x_BTD)
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
        return LMOutput(logits, loss, {i: a for i, a in aux.items() if a is not None})

    # ---- size and cost -------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """Parameters one token uses: sparse blocks report their own via `active_parameters()`."""
        total = self.num_parameters()
        for block in self.blocks:
            if hasattr(block.ffn, "active_parameters"):
                total += block.ffn.active_parameters() - sum(p.numel() for p in block.ffn.parameters())
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x active matmul weights (forward 2, backward 4), plus
        attention scores and values (12 x layers x width x context, as in the PaLM appendix).
        The embedding counts once, as the output projection (the lookup is free); an untied one not at all."""
        T = seq_len or self.cfg.max_seq_len
        free = sum(p.numel() for n, p in self.named_parameters() if "norm" in n)
        free += 0 if self.head is None else self.embed.weight.numel()
        return 6 * (self.active_parameters() - free) + 12 * self.cfg.n_layer * self.cfg.d_model * T
