"""Mixture-of-Experts feed-forward layer (DeepSeekMoE / DeepSeek-V3 / Mixtral / Qwen2-MoE family).

Read top to bottom: config, moving rows, experts, router, balance losses,
dispatch plans, the layer. Tensor names carry their shape: T tokens, D model
width, E routed experts, K experts per token, H hidden width of one expert,
A token-expert assignments that reach an expert (T*K when nothing is dropped),
N rows the experts run (A, or E*M when every expert is padded to M rows),
B sequences, S tokens per sequence (or T*K slots in SlotMap), C tokens per
expert under expert-choice routing.

    y, aux = MoE(MoEConfig(...))(x)          # x: (B, S, D) or (T, D)
    loss = task_loss + sum(aux.losses.values())
    ...optimizer.step(); moe.after_optimizer_step()   # aux-loss-free bias, global-batch counts
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moe_playground.models import moe_kernel
from moe_playground.models.transformer import SwiGLU
from moe_playground.models.validate import check


# -----------------------------------------------------------------------------
# config

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTINGS = ("token_choice", "expert_choice")
DISPATCHES = ("fused", "grouped_mm", "auto", "padded_bmm", "loop")
DISPATCHES_GROUPED = ("fused", "grouped_mm", "auto")  # run F.grouped_mm where the fused kernel does not
DISPATCHES_KERNEL = ("fused", "auto")  # run the fused kernel where it runs
DROP_POLICIES = ("score", "position")
BALANCE_SCOPES = ("micro_batch", "global")


@dataclass
class MoEConfig:
    # the token width; None when a model builds the layer, which passes its own (see train/lm.py)
    d_model: Optional[int] = 256
    n_routed_experts: int = 8
    expert_hidden: int = 512
    top_k: int = 2
    # DeepSeekMoE fine-grained segmentation: every expert is split into
    # `granularity` experts of expert_hidden // granularity and top_k is
    # multiplied by it, so routed parameters and FLOPs per token stay the
    # same. Shared experts come on top of that; DeepSeekMoE instead carves
    # them out of the fine-grained ones (mN - Ks routed, top mK - Ks):
    # MoEConfig.fine_grained builds that recipe.
    granularity: int = 1
    # Shared experts see every token. Each has shared_expert_hidden units;
    # None means the size of one (fine-grained) routed expert,
    # expert_hidden // granularity, as in DeepSeekMoE.
    n_shared_experts: int = 0
    shared_expert_hidden: Optional[int] = None
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared output
    # router
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = False  # renormalize the chosen k weights to sum to 1
    route_scale: float = 1.0
    n_groups: int = 1  # DeepSeek-V3 group-limited routing
    topk_groups: int = 1
    router_jitter: float = 0.0  # multiplicative noise on the router input (train only)
    noisy_gating: bool = False  # Shazeer et al. 2017 learned-noise top-k (train only)
    routing: str = "token_choice"  # "token_choice" | "expert_choice" (non-causal)
    # token choice ignores the router's choice and assigns round robin (token t's k-th slot goes to
    # expert (t*K + k) mod E), so every expert gets T*K/E assignments; combine weights still come from
    # the router's scores of those experts. For benchmarks and debugging, like torchtitan's
    # _debug_force_load_balance, Megatron's moe_router_force_load_balancing, MegaBlocks'
    # uniform_expert_assignment.
    force_uniform_routing: bool = False
    # load balancing, each its own coefficient
    balance_alpha: float = 0.0  # expert-level
    # what the expert-level and device-level losses count f over: "micro_batch" (this forward's
    # tokens) or "global": every micro-batch since the last optimizer step and every DDP rank
    # (Qwen, arXiv 2501.11873; Megatron's global_aux_loss), so a micro-batch of one domain is not
    # pushed to spread over all experts. Only the counts are pooled (no gradient crosses ranks);
    # P stays this micro-batch's. Costs one all-reduce of E counts per layer and micro-batch.
    balance_scope: str = "micro_batch"
    seq_balance_alpha: float = 0.0  # sequence-level (DeepSeek-V3)
    device_balance_alpha: float = 0.0  # device-level (DeepSeekMoE)
    n_devices: int = 1  # experts are split into this many groups for the device loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing gamma; 0 = off
    # MoE++ zero-computation experts (arXiv 2410.07348), in the router's pool beside the routed
    # FFN experts, so a token can spend less compute: a zero expert outputs 0 (the slot is
    # skipped), a copy expert outputs its input x, a constant expert a1*x + a2*v with a learned
    # vector v and [a1, a2] = softmax(W_c x). They cost O(D) per token and are never dropped by
    # capacity. Token choice only. MoEAux.metrics["routed_flops_per_token"] reports what the
    # routed experts really computed.
    n_zero_experts: int = 0
    n_copy_experts: int = 0
    n_constant_experts: int = 0
    # capacity: None = dropless; else each expert keeps ceil(cf * T * K / E) tokens (E counts
    # every expert in the router's pool, zero-computation ones included)
    capacity_factor: Optional[float] = None
    # which assignments an over-full expert keeps (token choice). "position" (default): earlier
    # positions first (of every sequence in the batch), a token's first choice before its second
    # (GShard, Switch); causal, a token's output never depends on later positions, which a
    # language model needs for its training to match its decoding. "score": its highest router
    # scores (Megatron's "probs"); not causal, a later token can evict an earlier one.
    drop_policy: str = "position"
    # capacity in eval mode: None = dropless evaluation; a factor (Switch's eval capacity) keeps
    # that many per expert, e.g. the training capacity_factor to evaluate as trained
    eval_capacity_factor: Optional[float] = None
    # how the experts run on their tokens: "fused" (the CPU kernel of models/moe_kernel.py:
    # gather, gate/up, SwiGLU and down per block of rows in cache, rows split over threads, with
    # BLAS or its own AVX-512 matmul, see moe_kernel.own_matmul; grouped_mm where it does not run:
    # other devices and dtypes, torch.compile, no compiler),
    # "grouped_mm" (F.grouped_mm, one grouped matmul per projection), "padded_bmm" (every
    # expert's group padded to the largest, one bmm), "auto" (fused where the kernel runs, else
    # padded_bmm while padding adds <= 25% rows, else grouped_mm), "loop" (a Python loop over
    # experts). On an oversubscribed CPU, grouped_mm pays a thread sync per expert and per
    # matmul, while one bmm or the kernel pays it once (or set OMP_WAIT_POLICY=PASSIVE, see
    # benchmarks/moe_layer.py). Under torch.compile, grouped_mm runs only in bf16; other dtypes
    # fall back to padded_bmm. Inference with fewer rows than experts loops over the experts
    # that have rows where the kernel does not run. Inference on small batches (no grad, no
    # capacity) skips the plan: under "fused" and "auto" one C++ op for routed and shared experts
    # up to 64 assignments per expert (RoutedExperts.few_tokens_limit), else a Python loop up to 4 tokens.
    dispatch: str = "fused"
    init_std: float = 0.02  # normal init of the router and every expert weight

    def __post_init__(self):
        for name in ("n_routed_experts", "expert_hidden", "top_k", "granularity", "n_groups", "topk_groups",
                     "n_devices"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"moe.{name}={v!r} must be an integer >= 1")
        for name in ("n_zero_experts", "n_copy_experts", "n_constant_experts"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"moe.{name}={v!r} must be an integer >= 0")
        check(self.d_model is None or (isinstance(self.d_model, int) and self.d_model >= 1),
              f"moe.d_model={self.d_model!r} must be an integer >= 1, or None when a model passes its width")
        check(self.balance_scope in BALANCE_SCOPES,
              f"moe.balance_scope={self.balance_scope!r} must be one of {BALANCE_SCOPES}")
        check(self.n_shared_experts >= 0,
              f"moe.n_shared_experts={self.n_shared_experts} must be >= 0")
        check(self.shared_expert_hidden is None or self.shared_expert_hidden >= 1,
              f"moe.shared_expert_hidden={self.shared_expert_hidden} must be >= 1 or None")
        check(self.expert_hidden % self.granularity == 0,
              f"moe.expert_hidden={self.expert_hidden} must be divisible by "
              f"granularity={self.granularity}")
        check(self.top_k <= self.n_routed_experts,
              f"moe.top_k={self.top_k} must be <= n_routed_experts={self.n_routed_experts}")
        check(self.score_func in SCORE_FUNCS,
              f"moe.score_func={self.score_func!r} must be one of {SCORE_FUNCS}")
        check(self.routing in ROUTINGS, f"moe.routing={self.routing!r} must be one of {ROUTINGS}")
        check(self.dispatch in DISPATCHES,
              f"moe.dispatch={self.dispatch!r} must be one of {DISPATCHES}")
        check(not self.shared_gate or self.n_shared_experts > 0,
              "moe.shared_gate=True needs n_shared_experts >= 1")
        E, K = self.n_experts, self.experts_per_token
        check(E % self.n_groups == 0,
              f"moe.n_groups={self.n_groups} must divide the number of experts "
              f"n_routed_experts*granularity={E}")
        check(self.topk_groups <= self.n_groups,
              f"moe.topk_groups={self.topk_groups} must be <= n_groups={self.n_groups}")
        check(self.topk_groups * (E // self.n_groups) >= K,
              f"moe.topk_groups={self.topk_groups} leaves {self.topk_groups * (E // self.n_groups)} "
              f"eligible experts, fewer than top_k*granularity={K}")
        check(E % self.n_devices == 0,
              f"moe.n_devices={self.n_devices} must divide the number of experts {E}")
        check(0.0 <= self.router_jitter < 1.0,
              f"moe.router_jitter={self.router_jitter} must be in [0, 1)")
        check(self.route_scale > 0, f"moe.route_scale={self.route_scale} must be > 0")
        check(self.init_std > 0, f"moe.init_std={self.init_std} must be > 0")
        for name in ("balance_alpha", "seq_balance_alpha", "device_balance_alpha",
                     "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            check(v >= 0, f"moe.{name}={v} must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"moe.capacity_factor={self.capacity_factor} must be > 0 or None (dropless)")
        check(self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
              f"moe.eval_capacity_factor={self.eval_capacity_factor} must be > 0, .inf (dropless) "
              "or None (capacity_factor)")
        check(self.drop_policy in DROP_POLICIES,
              f"moe.drop_policy={self.drop_policy!r} must be one of {DROP_POLICIES}")
        if self.routing == "expert_choice":
            # Every expert takes the same number of tokens, so there is nothing
            # to balance, and groups / per-token top-k do not apply.
            for name in ("balance_alpha", "seq_balance_alpha", "device_balance_alpha",
                         "bias_update_rate"):
                check(getattr(self, name) == 0,
                      f"moe.{name}={getattr(self, name)} must be 0 with routing='expert_choice' "
                      "(expert choice is balanced by construction)")
            check(self.n_groups == 1,
                  f"moe.n_groups={self.n_groups} must be 1 with routing='expert_choice'")
        if self.n_null_experts:
            for name, ok, why in (("routing", self.routing == "token_choice", "'token_choice'"),
                                  ("n_groups", self.n_groups == 1, "1"), ("n_devices", self.n_devices == 1, "1")):
                check(ok, f"moe.{name}={getattr(self, name)!r} must be {why} with zero-computation experts "
                          f"(n_zero_experts + n_copy_experts + n_constant_experts = {self.n_null_experts})")

    @property
    def n_experts(self) -> int:
        """Routed experts after fine-grained segmentation."""
        return self.n_routed_experts * self.granularity

    @property
    def n_null_experts(self) -> int:
        """MoE++ zero-computation experts (zero, copy, constant)."""
        return self.n_zero_experts + self.n_copy_experts + self.n_constant_experts

    @property
    def n_pool(self) -> int:
        """Experts the router scores: the routed FFN experts, then zero, copy and constant ones."""
        return self.n_experts + self.n_null_experts

    @property
    def experts_per_token(self) -> int:
        return self.top_k * self.granularity

    @property
    def hidden_per_expert(self) -> int:
        return self.expert_hidden // self.granularity

    @property
    def shared_hidden(self) -> int:
        """Total hidden width of all shared experts (they are fused into one SwiGLU)."""
        per = self.shared_expert_hidden or self.hidden_per_expert
        return self.n_shared_experts * per

    @classmethod
    def fine_grained(cls, dense_hidden: int, n_experts: int, top_k: int, granularity: int,
                     n_shared_experts: int, **kwargs) -> MoEConfig:
        """DeepSeekMoE's recipe from a conventional MoE of n_experts (N) experts of dense_hidden
        units, top_k (K) per token: split each into granularity (m) experts of dense_hidden / m
        and isolate Ks = n_shared_experts of them as shared experts, which leaves mN - Ks routed
        experts, top mK - Ks. Total parameters and FLOPs per token stay those of the N x top-K MoE."""
        check(dense_hidden % granularity == 0,
              f"dense_hidden={dense_hidden} must be divisible by granularity={granularity}")
        check(0 <= n_shared_experts < granularity * top_k,
              f"n_shared_experts={n_shared_experts} must be in [0, granularity*top_k={granularity * top_k})")
        return cls(n_routed_experts=granularity * n_experts - n_shared_experts,
                   expert_hidden=dense_hidden // granularity, top_k=granularity * top_k - n_shared_experts,
                   n_shared_experts=n_shared_experts, **kwargs)

    def capacity(self, n_tokens: int, training: bool = True) -> Optional[int]:
        """Token-choice assignments each expert keeps; None = all of them."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if factor is None or math.isinf(factor):
            return None
        return math.ceil(factor * n_tokens * self.experts_per_token / self.n_pool)


# -----------------------------------------------------------------------------
# moving rows between tokens and expert rows
#
# Under token choice token t owns K slots, t*K + k. A kept assignment joins a
# slot to one row of the experts' input (rows grouped by expert, maybe padded).
# Dispatch copies each token into its rows; combine sums each token's rows in
# slot order (deterministic). The two are each other's adjoint, so each one's
# backward is the other, and both stay gathers: autograd would take a gather's
# backward through index_add_, many times slower on a multi-threaded CPU.

def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call where t has it already: a no-op .to() still costs ~0.7 us, and a
    one-token forward makes a dozen."""
    return t if t.dtype == dtype else t.to(dtype)


class SlotMap:
    def __init__(self, slot_A: torch.Tensor, row_A: torch.Tensor, T: int, K: int, n_rows: int):
        A = slot_A.numel()
        self.T, self.K = T, K
        # row -> its token, or T (a zero row appended) for a padding row
        self.token_N = torch.full((n_rows,), T, dtype=slot_A.dtype, device=slot_A.device)
        self.token_N[row_A] = slot_A // K
        # slot -> its row, or n_rows (a zero row appended) for a dropped assignment
        self.row_S = torch.full((T * K,), n_rows, dtype=slot_A.dtype, device=slot_A.device)
        self.row_S[slot_A] = row_A
        self.pad_rows, self.dropped = A < n_rows, A < T * K

    # without autograd the plain gathers run: an autograd.Function call costs more than the
    # gather itself at sampling-sized batches
    def dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:  # (T, D) -> (N, D)
        return _Dispatch.apply(x_TD, self) if needs_grad(x_TD) else self._dispatch(x_TD)

    def combine(self, out_ND: torch.Tensor) -> torch.Tensor:  # (N, D) -> (T, D)
        return _Combine.apply(out_ND, self) if needs_grad(out_ND) else self._combine(out_ND)

    def _dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:
        return (F.pad(x_TD, (0, 0, 0, 1)) if self.pad_rows else x_TD).index_select(0, self.token_N)

    def _combine(self, out_ND: torch.Tensor) -> torch.Tensor:
        if moe_kernel.usable(out_ND):  # one pass, rows read in place
            return moe_kernel.sum_slots(out_ND, self.row_S, self.K)
        out_ND = F.pad(out_ND, (0, 0, 0, 1)) if self.dropped else out_ND
        if self.K == 1:
            return out_ND.index_select(0, self.row_S)
        # tokens in K chunks, so the slot-ordered copy is never larger than the (T, D) output
        y_TD = out_ND.new_empty(self.T, out_ND.shape[-1])
        chunk = max(1, -(-self.T // self.K))  # (an empty batch: no chunk)
        for t in range(0, self.T, chunk):
            y_chunk = y_TD[t:t + chunk]
            rows = self.row_S[t * self.K:(t + y_chunk.shape[0]) * self.K]
            torch.sum(out_ND.index_select(0, rows).view(y_chunk.shape[0], self.K, -1), dim=1, out=y_chunk)
        return y_TD


class TokenRows:
    """Expert choice's rows: row n copies token token_N[n]; a token has any number of rows (or none).
    Same interface as SlotMap; combine sums each token's rows with index_add_."""

    def __init__(self, token_N: torch.Tensor, T: int):
        self.token_N, self.T = token_N, T

    def dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _Dispatch.apply(x_TD, self) if needs_grad(x_TD) else self._dispatch(x_TD)

    def combine(self, out_ND: torch.Tensor) -> torch.Tensor:
        return _Combine.apply(out_ND, self) if needs_grad(out_ND) else self._combine(out_ND)

    def _dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.index_select(0, self.token_N)

    def _combine(self, out_ND: torch.Tensor) -> torch.Tensor:
        return out_ND.new_zeros(self.T, out_ND.shape[-1]).index_add_(0, self.token_N, out_ND)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, slots):
        ctx.slots = slots
        return slots._dispatch(x_TD)

    @staticmethod
    def backward(ctx, g_ND):
        return ctx.slots._combine(g_ND), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_ND, slots):
        ctx.slots = slots
        return slots._combine(out_ND)

    @staticmethod
    def backward(ctx, g_TD):
        return ctx.slots._dispatch(g_TD.contiguous()), None


# -----------------------------------------------------------------------------
# experts

class _GatheredGroupedMM(torch.autograd.Function):
    """grouped_mm(rows._dispatch(x_TD), w_EDN) that saves x_TD, not its (A, D) gathered copy: the
    backward gathers again (a copy pass is cheaper than keeping K copies of every token alive)."""

    @staticmethod
    def forward(ctx, x_TD, w_EDN, rows, offs_E):
        ctx.rows, ctx.offs_E = rows, offs_E
        ctx.save_for_backward(x_TD, w_EDN)
        return F.grouped_mm(rows._dispatch(x_TD), w_EDN, offs=offs_E)

    @staticmethod
    def backward(ctx, g_AN):
        x_TD, w_EDN = ctx.saved_tensors
        g_AN = g_AN.contiguous()  # grouped_mm rejects stride-0 gradients (from y.sum())
        g_x = g_w = None
        if ctx.needs_input_grad[1]:
            g_w = F.grouped_mm(ctx.rows._dispatch(x_TD).t(), g_AN, offs=ctx.offs_E)
        if ctx.needs_input_grad[0]:
            g_x = ctx.rows._combine(F.grouped_mm(g_AN, w_EDN.transpose(-2, -1), offs=ctx.offs_E))
        return g_x, g_w, None, None


class _WeightedSwiGLU(torch.autograd.Function):
    """silu(gate) * up * weight of a fused [gate | up] tensor and per-row combine weights. Saves only
    its inputs (the product is recomputed in backward for the weight's gradient) and writes
    d[gate | up] into one buffer, as models.transformer.SwiGLUActivation does."""

    @staticmethod
    def forward(ctx, gate_up_AH2, weight_A1):
        ctx.save_for_backward(gate_up_AH2, weight_A1)
        gate_AH, up_AH = gate_up_AH2.chunk(2, dim=-1)
        return (F.silu(gate_AH) * up_AH).mul_(weight_A1)

    @staticmethod
    def backward(ctx, d_AH):
        gate_up_AH2, weight_A1 = ctx.saved_tensors
        gate_AH, up_AH = gate_up_AH2.chunk(2, dim=-1)
        d_gate_up_AH2 = torch.empty_like(gate_up_AH2)
        d_gate_AH, d_up_AH = d_gate_up_AH2.chunk(2, dim=-1)
        # one (A, H) temporary alive at a time, as in SwiGLUActivation: peak memory
        torch.mul(d_AH, F.silu(gate_AH), out=d_up_AH)  # d * silu(gate), weight still to come
        d_weight_A1 = (d_up_AH * up_AH).sum(dim=-1, keepdim=True)
        d_up_AH.mul_(weight_A1)
        torch.ops.aten.silu_backward.grad_input((d_AH * weight_A1).mul_(up_AH), gate_AH, grad_input=d_gate_AH)
        return d_gate_up_AH2, d_weight_A1


def looped_mm(a_AD: torch.Tensor, w_EDN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """grouped_mm without autograd, skipping experts without rows (grouped_mm visits all E)."""
    out_AN, start = a_AD.new_empty(a_AD.shape[0], w_EDN.shape[-1]), 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_AD[start:start + n], w_EDN[e], out=out_AN[start:start + n])
            start += n
    return out_AN


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights, run on tokens already sorted by expert.

    The gate and up projections are fused into one (E, D, 2H) weight so each
    group of tokens needs one matmul for both; its last dim is [gate | up].
    forward takes per-row combine weights and applies them on the narrower of
    the hidden (H) and output (D) activations: same result, fewer bytes moved.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, D, H = cfg.n_experts, cfg.d_model, cfg.hidden_per_expert
        self.dispatch = cfg.dispatch
        self.w_gate_up = nn.Parameter(torch.empty(E, D, 2 * H))
        self.w_down = nn.Parameter(torch.empty(E, H, D))

    def uses_grouped_mm(self, x_AD: torch.Tensor) -> bool:
        """grouped_mm on CPU takes fp32/bf16/fp16 and needs every row 16-byte aligned."""
        if self.dispatch not in DISPATCHES_GROUPED or x_AD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if self.compile_fallback(x_AD.dtype):
            return False
        H = self.w_down.shape[1]
        return all(n * x_AD.element_size() % 16 == 0 for n in (x_AD.shape[1], H, 2 * H))

    def compile_fallback(self, dtype: torch.dtype) -> bool:
        """Under torch.compile the fused kernel does not run, and grouped_mm's fake-tensor check takes
        bf16 only: other dtypes run padded_bmm instead (one warning)."""
        if self.dispatch not in DISPATCHES_GROUPED or dtype == torch.bfloat16 \
                or not torch.compiler.is_compiling():
            return False
        if not RoutedExperts.warned_compile:
            RoutedExperts.warned_compile = True
            warnings.warn(f"MoE dispatch={self.dispatch!r} under torch.compile: the fused kernel does not compile "
                          f"and grouped_mm compiles only in bf16, so the {dtype} experts run "
                          f"dispatch='padded_bmm' (same results)")
        return True

    warned_compile = False

    def wants_padding(self, counts_E: torch.Tensor, x_TD: torch.Tensor) -> bool:
        if self.dispatch == "padded_bmm" or self.compile_fallback(x_TD.dtype):
            return True
        # auto pads only where the fused kernel cannot run: it beats padding even under uniform
        # routing (benchmarks/moe_layer.py headline: moe against moe_padded)
        return self.dispatch == "auto" and not moe_kernel.usable(x_TD) \
            and counts_E.numel() * counts_E.max().item() <= 1.25 * counts_E.sum().item()

    def forward(self, x_TD: torch.Tensor, rows: SlotMap | TokenRows, counts_E: torch.Tensor,
                weight_A: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """rows.combine of the experts' outputs on rows.dispatch(x_TD): rows grouped by expert,
        counts_E[e] rows for expert e, in order; weight_A: combine weights. padded: every expert
        has the same number of rows (padding rows are zero)."""
        # x_TD comes in the compute dtype (autocast's, if on) and every operand is cast to it,
        # so the output dtype does not depend on which ops autocast happens to list
        w_gate_up, w_down = cast(self.w_gate_up, x_TD.dtype), cast(self.w_down, x_TD.dtype)
        if not padded and self.dispatch in DISPATCHES_KERNEL and moe_kernel.usable(x_TD):
            return moe_kernel.fused_experts(x_TD, w_gate_up, w_down, weight_A.to(x_TD.dtype), rows.token_N,
                                            counts_E.cumsum(0), rows._combine)
        return rows.combine(self.rows_out(x_TD, w_gate_up, w_down, rows, counts_E, weight_A, padded))

    def rows_out(self, x_TD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, rows: SlotMap | TokenRows,
                 counts_E: torch.Tensor, weight_A: torch.Tensor, padded: bool) -> torch.Tensor:
        """forward's rows before the combine, without the fused kernel."""
        E, H, D = self.w_down.shape
        weight_A1 = weight_A.to(x_TD.dtype).unsqueeze(-1)
        if padded:  # (E*M, D) -> (E, M, D): one batched matmul per projection
            x_EMD = rows.dispatch(x_TD).view(E, -1, D)
            h_EMH = self.activation(torch.bmm(x_EMD, w_gate_up), weight_A1.view(E, -1, 1))
            return torch.bmm(h_EMH, w_down).flatten(0, 1)
        grad = needs_grad(x_TD, w_gate_up)
        if self.uses_grouped_mm(x_TD) and (grad or weight_A.shape[0] >= self.loop_below_rows_per_expert * E):
            offs_E = counts_E.cumsum(0, dtype=torch.int32)  # cumulative ends, as grouped_mm wants
            if grad:
                gate_up_AH2 = _GatheredGroupedMM.apply(x_TD, w_gate_up, rows, offs_E)
            else:
                gate_up_AH2 = F.grouped_mm(rows._dispatch(x_TD), w_gate_up, offs=offs_E)
            return F.grouped_mm(self.activation(gate_up_AH2, weight_A1), w_down, offs=offs_E)
        if not grad:  # inference: one matmul per expert that has rows, into one buffer
            counts = counts_E.tolist()
            h_AH = self.activation(looped_mm(rows._dispatch(x_TD), w_gate_up, counts), weight_A1)
            return looped_mm(h_AH, w_down, counts)
        x_AD, out_AD, start = rows.dispatch(x_TD), [], 0
        for e, n in enumerate(counts_E.tolist()):
            h_nH = self.activation(x_AD[start:start + n] @ w_gate_up[e], weight_A1[start:start + n])
            out_AD.append(h_nH @ w_down[e])
            start += n
        return torch.cat(out_AD)

    # inference runs looped_mm below this many rows per expert (most experts then have none: grouped_mm
    # would still visit them all); measured crossover on CPU, benchmarks/moe_layer.py latency section
    loop_below_rows_per_expert = 1.0
    # inference on at most few_tokens_limit() tokens skips the dispatch plan: few_tokens. Through
    # moe_kernel.experts_tokens while the T*K assignments are at most 64 per expert: measured against
    # the plan (benchmarks/moe_layer.py latency, `plan` column, and forward at larger T), the fine
    # config (64 experts, top-6, 2 shared) 472 vs 727 us at 64 tokens, 2722 vs 2949 at 512 (48 per
    # expert), 5422 vs 5235 at 1024 (96 per expert); coarse (8 experts, top-2) 1185 vs 1194 at 256
    # (64 per expert), 4131 vs 4317 at 1024. Through the Python loop, where that op does not run, up
    # to 4 tokens
    few_rows_per_expert = 64
    few_tokens_max_python = 4

    def few_tokens_limit(self, x_TD: torch.Tensor, top_k: int) -> int:
        if self.runs_tokens_op(x_TD):
            return max(1, self.few_rows_per_expert * self.w_down.shape[0] // top_k)
        return self.few_tokens_max_python

    def runs_tokens_op(self, x_TD: torch.Tensor) -> bool:
        """few_tokens runs moe_kernel.experts_tokens: under the fused kernel's dispatch ("fused", or
        "auto"), where the op runs; another dispatch chosen keeps its own torch path."""
        return self.dispatch in DISPATCHES_KERNEL and moe_kernel.usable_for_tokens(x_TD)

    def few_tokens(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                   shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """forward's result, without grad, for a small batch straight from the router's choices: no plan,
        row maps or combine, which at one token cost more than the experts' matmuls. In C++ where
        moe_kernel.experts_tokens runs, with the shared experts' (gate_up, down, weight_T) if given;
        else each token runs its K experts on views of the weights."""
        E = self.w_down.shape[0]
        w_gate_up, w_down = cast(self.w_gate_up, x_TD.dtype), cast(self.w_down, x_TD.dtype)
        if self.runs_tokens_op(x_TD):
            return moe_kernel.experts_tokens(x_TD, idx_TK, cast(weight_TK, x_TD.dtype), w_gate_up, w_down, shared)
        assert shared is None, "the shared experts run in the same op only where moe_kernel.experts_tokens runs"
        y_TD = torch.zeros_like(x_TD)
        for t, (experts, weights) in enumerate(zip(idx_TK.tolist(), weight_TK.tolist())):
            x_1D, y_1D = x_TD[t:t + 1], y_TD[t:t + 1]
            chosen = [(e, w) for e, w in zip(experts, weights) if e < E]  # from E on: zero-computation experts
            if not chosen:
                continue
            # at one row per matmul every op costs about as much as its arithmetic, so the K
            # experts share one activation, and each down projection accumulates its weighted
            # output in place (addmm_ with the combine weight as a scalar)
            gate_KH, up_KH = torch.cat([x_1D @ w_gate_up[e] for e, _ in chosen]).chunk(2, dim=-1)
            h_KH = F.silu(gate_KH).mul_(up_KH)
            for k, (e, w) in enumerate(chosen):
                y_1D.addmm_(h_KH[k:k + 1], w_down[e], alpha=w)
        return y_TD

    @staticmethod
    def activation(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up * combine weight, on the hidden side: the down projection's output then
        needs no extra pass, and backward keeps nothing but gate_up."""
        if needs_grad(gate_up, weight):
            return _WeightedSwiGLU.apply(gate_up, weight)
        gate, up = gate_up.chunk(2, dim=-1)  # no autograd.Function call: its overhead counts at tiny batches
        return (F.silu(gate) * up).mul_(weight)


class ZeroComputationExperts(nn.Module):
    """MoE++'s zero-computation experts (Jin et al. 2024, arXiv 2410.07348), pool indices from
    `first` on: zero experts (output 0), then copy experts (output x), then constant experts
    (output a1*x + a2*v_c, [a1, a2] = softmax(W_c x), v_c and W_c learned). forward returns the
    weighted sum of their outputs over each token's chosen slots; nothing is gathered or sorted."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        C, D = cfg.n_constant_experts, cfg.d_model
        self.first_copy = cfg.n_experts + cfg.n_zero_experts
        self.first_constant = self.first_copy + cfg.n_copy_experts
        self.vector_CD = nn.Parameter(torch.empty(C, D)) if C else None
        self.gate_weight = nn.Parameter(torch.empty(2 * C, D)) if C else None  # rows c*2, c*2+1: W_c

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        w_TK = weight_TK.to(x_TD.dtype)
        copy_TK = (idx_TK >= self.first_copy) & (idx_TK < self.first_constant)
        x_coef_T = (w_TK * copy_TK).sum(dim=-1)
        out_TD = None
        if self.vector_CD is not None:
            T, K = idx_TK.shape
            C = self.vector_CD.shape[0]
            const_TK = idx_TK >= self.first_constant
            c_TK = (idx_TK - self.first_constant).clamp(min=0)
            a_TC2 = F.linear(x_TD, self.gate_weight.to(x_TD.dtype)).view(T, C, 2).softmax(dim=-1).to(x_TD.dtype)
            a_TK2 = a_TC2.gather(1, c_TK.unsqueeze(-1).expand(T, K, 2))
            wc_TK = w_TK * const_TK
            x_coef_T = x_coef_T + (wc_TK * a_TK2[..., 0]).sum(dim=-1)
            v_coef_TC = x_TD.new_zeros(T, C).scatter_add(1, c_TK, wc_TK * a_TK2[..., 1])
            out_TD = v_coef_TC @ self.vector_CD.to(x_TD.dtype)
        y_TD = x_coef_T.unsqueeze(-1) * x_TD
        return y_TD if out_TD is None else y_TD + out_TD


# -----------------------------------------------------------------------------
# router

@dataclass
class Routing:
    """What the router decided for T tokens (fp32)."""
    logits_TE: torch.Tensor
    scores_TE: torch.Tensor  # softmax or sigmoid of the logits
    probs_TE: torch.Tensor  # per-token distribution over experts (sigmoid scores renormalized)
    idx_TK: torch.Tensor  # chosen experts (token choice); empty under expert choice
    weights_TK: torch.Tensor  # combine weights of the chosen experts
    scores_TK: torch.Tensor  # raw router scores of the chosen experts: capacity priority


class Router(nn.Module):
    """Scores every expert for every token in fp32 and picks experts.

    Selection uses scores + expert_bias (aux-loss-free balancing); the combine
    weights always come from the unbiased scores.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_pool, cfg.d_model))
        # Shazeer et al. 2017: learned per-expert noise scale, softplus(x . w_noise)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.n_pool, cfg.d_model)) if cfg.noisy_gating else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_pool))  # persistent: saved in checkpoints

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32, or fp64 under gradcheck
        # autocast would run these linears in bf16: a near-tie between two experts then flips
        # on rounding, and the z-loss squares a bf16 logsumexp (entering the context only when
        # autocast is on: it costs ~5 us, 5% of a one-token forward)
        device = x_TD.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
            x_TD = cast(x_TD, dtype)
            if self.training and self.cfg.router_jitter > 0:  # Switch Transformer input jitter
                eps = self.cfg.router_jitter
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)
            logits_TE = moe_kernel.linear(x_TD, cast(self.weight, dtype))
            if self.training and self.noise_weight is not None:
                noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(dtype)))
                logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def log_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """log(score) up to a per-token constant: the logits (softmax) or logsigmoid (sigmoid).

        Renormalising any subset of a token's scores, s / sum(s), is then a softmax of these
        over the subset: the same value, but finite where every score of the subset underflows
        to 0 (sigmoid of a logit below -88 in fp32), where s / sum(s) is 0/0 and one token's
        NaN would reach every weight through the balance losses.
        """
        return logits if self.cfg.score_func == "softmax" else F.logsigmoid(logits)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = self.log_scores(logits_TE).softmax(dim=-1)
        if cfg.routing == "expert_choice":
            empty = logits_TE.new_zeros(0, 0)
            return Routing(logits_TE, scores_TE, probs_TE, empty.long(), empty, empty)

        # --- token choice: top-k over (biased, group-limited) scores
        with torch.no_grad():
            choice_TE = scores_TE + cast(self.expert_bias, scores_TE.dtype)
            if cfg.n_groups > 1:
                choice_TE = self.limit_groups(choice_TE)
            idx_TK = moe_kernel.topk_indices(choice_TE, cfg.experts_per_token)
            if cfg.force_uniform_routing:
                T, K = idx_TK.shape
                idx_TK = torch.arange(T * K, device=idx_TK.device).view(T, K) % choice_TE.shape[-1]
        scores_TK = scores_TE.gather(1, idx_TK)
        weights_TK = scores_TK
        if cfg.norm_topk:
            weights_TK = self.log_scores(logits_TE.gather(1, idx_TK)).softmax(dim=-1)
        if cfg.route_scale != 1:
            weights_TK = weights_TK * cfg.route_scale
        return Routing(logits_TE, scores_TE, probs_TE, idx_TK, weights_TK, scores_TK.detach())

    def limit_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group-limited routing: only experts in the best topk_groups groups stay eligible.

        A group scores the sum of its top-2 experts (DeepSeek-V3, sigmoid) or
        its best expert (DeepSeek-V2, softmax). Masked experts get -inf, not 0:
        with a bias, eligible scores can be negative and a 0 would win over them.
        """
        cfg = self.cfg
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, cfg.n_groups, E // cfg.n_groups)
        top = 2 if cfg.score_func == "sigmoid" else 1
        group_TG = choice_TGe.topk(min(top, E // cfg.n_groups), dim=-1).values.sum(dim=-1)
        best_TG = group_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


# -----------------------------------------------------------------------------
# balance losses

def load_fraction(counts_E: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """f_i = E/(K*T) * counts_i: the counts sum to K*T (the tokens they were counted over, which
    may be more than P's under global balancing), so uniform routing gives f_i = 1."""
    return counts_E.to(dtype) * (counts_E.numel() / counts_E.sum())


def balance_loss(counts_E: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """sum_i f_i * P_i with P_i the mean probability.

    Normalized so perfectly uniform routing gives exactly 1 (then multiply by alpha).
    Gradients reach the router through P only (counts are discrete).
    """
    return (load_fraction(counts_E, probs_TE.dtype) * probs_TE.mean(dim=0)).sum()


def seq_balance_loss(idx_BSK: torch.Tensor, probs_BSE: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: the expert-level loss per sequence, averaged."""
    B, S, K = idx_BSK.shape
    E = probs_BSE.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, idx_BSK.reshape(B, S * K), torch.ones_like(counts_BE[:, :1]).expand(B, S * K))
    f_BE = counts_BE * (E / (K * S))
    return (f_BE * probs_BSE.mean(dim=1)).sum(dim=-1).mean()


def device_balance_loss(counts_E: torch.Tensor, probs_TE: torch.Tensor, n_devices: int) -> torch.Tensor:
    """DeepSeekMoE device-level loss: experts in n_devices contiguous groups.

    f'_d is the mean f_i over group d, P'_d the summed P_i; uniform routing gives 1.
    """
    f_DE = load_fraction(counts_E, probs_TE.dtype).view(n_devices, -1)
    P_DE = probs_TE.mean(dim=0).view(n_devices, -1)
    return (f_DE.mean(dim=-1) * P_DE.sum(dim=-1)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


# -----------------------------------------------------------------------------
# dispatch plans: which assignment goes to which expert, in expert order

@dataclass
class Dispatch:
    token_A: Optional[torch.Tensor]  # token of each kept assignment, grouped by expert (None: no plan, only counts)
    weight_A: Optional[torch.Tensor]  # its combine weight
    counts_E: torch.Tensor  # kept assignments per routed FFN expert (sums to A)
    routed_E: torch.Tensor  # assignments the router chose per expert of the pool, before capacity drops
    drop_fraction: torch.Tensor  # token choice: dropped / (T*K); expert choice: tokens no expert took / T
    slot_A: Optional[torch.Tensor] = None  # token choice: index t*K + k of each kept assignment


def token_choice_dispatch(routing: Routing, capacity: Optional[int], drop_policy: str, n_seq: int,
                          n_ffn: Optional[int] = None) -> Dispatch:
    """Sort the T*K assignments by expert; with a capacity, each expert keeps its `capacity`
    first in drop_policy's order (see MoEConfig.drop_policy). The T tokens are n_seq sequences.
    Experts n_ffn and up of the pool are zero-computation ones: never dropped, left out of the plan."""
    T, K = routing.idx_TK.shape
    E = routing.logits_TE.shape[-1]
    n_ffn = E if n_ffn is None else n_ffn
    expert_A = routing.idx_TK.reshape(-1)  # (T*K,), assignment a is token a // K
    routed_E = torch.bincount(expert_A, minlength=E)
    if capacity is None:
        order_A = moe_kernel.stable_argsort(expert_A, E)
        counts_E = routed_E
    else:
        # the assignments in priority order, then stably by expert: each expert's first in priority
        if drop_policy == "score":
            by_priority_A = routing.scores_TK.reshape(-1).argsort(descending=True, stable=True)
        else:  # position: slot (b, s, k) ranks by (s, b, k); top-k lists a token's choices best first
            slot_BSK = torch.arange(T * K, device=expert_A.device).view(n_seq, T // n_seq, K)
            by_priority_A = slot_BSK.transpose(0, 1).reshape(-1)
        order_A = by_priority_A[moe_kernel.stable_argsort(expert_A[by_priority_A], E)]
        starts_E = routed_E.cumsum(0) - routed_E
        rank_A = torch.arange(T * K, device=expert_A.device) - starts_E[expert_A[order_A]]
        order_A = order_A[rank_A < capacity]
        counts_E = routed_E.clamp(max=capacity)
    if n_ffn < E:  # in expert order the FFN experts' assignments come first
        counts_E = counts_E[:n_ffn]
        order_A = order_A[:int(counts_E.sum())]
    weight_A = routing.weights_TK.reshape(-1).index_select(0, order_A)
    drop_fraction = (routed_E[:n_ffn].sum() - counts_E.sum()).to(routing.logits_TE.dtype) / (T * K)
    return Dispatch(order_A // K, weight_A, counts_E, routed_E, drop_fraction, slot_A=order_A)


def expert_choice_dispatch(routing: Routing, capacity: int, route_scale: float) -> Dispatch:
    """Zhou et al. 2022: every expert takes its `capacity` best-scoring tokens of the whole batch."""
    scores_TE = routing.scores_TE
    T, E = scores_TE.shape
    C = min(capacity, T)
    weight_CE, token_CE = scores_TE.topk(C, dim=0)
    # (C, E) -> (E, C) -> (E*C,): grouped by expert
    token_A, weight_A = token_CE.t().reshape(-1), weight_CE.t().reshape(-1)
    counts_E = torch.full((E,), C, dtype=torch.long, device=scores_TE.device)
    taken_T = torch.zeros(T, dtype=torch.bool, device=scores_TE.device).index_fill_(0, token_A, True)
    return Dispatch(token_A, weight_A * route_scale, counts_E, counts_E, 1 - taken_T.float().mean())



# -----------------------------------------------------------------------------
# the layer

def recomputing() -> bool:
    """True while the autograd engine runs a backward pass: a forward that runs then is activation
    checkpointing's recomputation (torch.utils.checkpoint, reentrant or not) of one already counted."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class MoEAux:
    """Each auxiliary loss (already times its coefficient; zero when off) and the routing metrics."""
    balance_loss: torch.Tensor
    seq_balance_loss: torch.Tensor
    device_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # (E,) assignments the router chose per expert, before capacity drops
    drop_fraction: torch.Tensor
    kept_per_expert: torch.Tensor = field(repr=False)  # (E,) assignments each routed FFN expert ran
    flops_per_kept: float = field(repr=False)  # forward FLOPs of one kept assignment per token, 2 * 3*D*H / T
    # balance_scope="global": the expert-level loss with this micro-batch's own counts, to log
    # beside balance_loss (whose counts are pooled); None otherwise
    micro_balance_loss: Optional[torch.Tensor] = None
    # the router's per-token distributions, for router_entropy
    probs_TE: Optional[torch.Tensor] = field(default=None, repr=False)

    # the metrics below are computed when first read: sampling never reads them, and at one token
    # their ops cost ~10% of the layer's forward
    @cached_property
    def routed_flops_per_token(self) -> torch.Tensor:
        """Forward FLOPs of the routed FFN experts per token, as computed: 2 * 3*D*H per kept
        assignment (zero-computation experts and dropped assignments cost none; shared experts and
        the router are not routed)."""
        return self.kept_per_expert.sum() * self.flops_per_kept

    @cached_property
    def max_vio(self) -> torch.Tensor:
        """(max load - mean load) / mean load."""
        load_E = self.tokens_per_expert.float()
        return (load_E.max() - load_E.mean()) / load_E.mean()

    @cached_property
    def router_entropy(self) -> torch.Tensor:
        """Mean over tokens of the entropy of probs_TE, in nats."""
        return torch.special.entr(self.probs_TE.detach()).sum(dim=-1).mean()

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        return {"balance_loss": self.balance_loss, "seq_balance_loss": self.seq_balance_loss,
                "device_balance_loss": self.device_balance_loss, "z_loss": self.z_loss}

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached tensors, so reading them every step costs no device sync; float() them to log."""
        metrics = {"tokens_per_expert": self.tokens_per_expert, "drop_fraction": self.drop_fraction,
                   "max_vio": self.max_vio, "router_entropy": self.router_entropy,
                   "routed_flops_per_token": self.routed_flops_per_token}
        if self.micro_balance_loss is not None:
            metrics["micro_balance_loss"] = self.micro_balance_loss
        return metrics


class MoE(nn.Module):
    """Routed SwiGLU experts plus optional shared experts; forward(x) -> (y, MoEAux).

    Under routing="expert_choice" the layer is NOT causal: each expert picks
    its tokens among all tokens of the batch, so a token's output depends on
    later tokens (and other sequences). Do not use it for autoregressive
    decoding.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.d_model is None:
            raise ValueError("moe.d_model=None: give the token width (a model passes its own)")
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.null_experts = ZeroComputationExperts(cfg) if cfg.n_null_experts else None
        self.shared = SwiGLU(cfg.d_model, cfg.shared_hidden) if cfg.n_shared_experts else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None
        # routed counts since the last after_optimizer_step(), pooled over DDP ranks under
        # balance_scope="global"; a plain attribute, not a buffer, so neither checkpoints nor
        # DDP buffer broadcasts touch it
        self.load_E = torch.zeros(cfg.n_pool)
        self.reset_parameters()

    def reset_parameters(self, out_scale: float = 1.0) -> None:
        """Every weight of the layer ~ N(0, init_std); the output projections (routed and shared
        down) get init_std * out_scale: a model scales its residual branches' outputs with depth
        (GPT-2) through out_scale, and leaves the rest of this layer's initialisation to it."""
        std = self.cfg.init_std
        outputs = {id(self.experts.w_down)} | ({id(self.shared.down.weight)} if self.shared else set())
        for p in self.parameters():
            nn.init.normal_(p, std=std * out_scale if id(p) in outputs else std)
        if self.router.noise_weight is not None:
            nn.init.zeros_(self.router.noise_weight)  # start noiseless-ish: softplus(0) = 0.69

    def active_parameters(self) -> int:
        """Parameters one token uses: router, shared experts and top_k routed experts."""
        cfg = self.cfg
        routed = cfg.experts_per_token * 3 * cfg.d_model * cfg.hidden_per_expert
        dense = [self.router, self.shared, self.shared_gate, self.null_experts]
        return routed + sum(p.numel() for m in dense if m is not None for p in m.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model or x.dim() not in (2, 3):
            raise ValueError(f"MoE expects (B, S, {cfg.d_model}) or (T, {cfg.d_model}), got {tuple(x.shape)}")
        n_seq = x.shape[0] if x.dim() == 3 else 1
        x_TD = x.reshape(-1, cfg.d_model)
        T = x_TD.shape[0]
        # the experts compute in autocast's dtype when it is on (as nn.Linear would), else in x's
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xe_TD = cast(x_TD, dtype)

        routing = self.router(x_TD)
        few = cfg.routing == "token_choice" and T <= self.experts.few_tokens_limit(xe_TD, cfg.experts_per_token) \
            and cfg.capacity(T, self.training) is None and not needs_grad(xe_TD, self.experts.w_gate_up) \
            and not torch.compiler.is_compiling()  # its per-token loop would break the graph
        # in the few-token op the shared experts run beside the routed ones (their weights as they are)
        shared_too = few and self.shared is not None and self.experts.runs_tokens_op(xe_TD) and self.plain_shared()
        y_TD, plan = self.few_tokens(x_TD, xe_TD, routing, shared_too) if few else self.planned(xe_TD, routing, n_seq)
        if self.null_experts is not None:
            y_TD = y_TD + self.null_experts(xe_TD, routing.idx_TK, routing.weights_TK)

        if self.shared is not None and not shared_too:
            y_TD = y_TD + self.shared_out(x_TD, xe_TD)
        return y_TD.view(x.shape), self.aux(routing, plan, n_seq)

    def shared_out(self, x_TD: torch.Tensor, xe_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output (times the Qwen2-MoE gate, if any). Where the fused kernel runs
        its own matmul (faster than torch's BLAS there: benchmarks/moe_layer.py, dense_kernel), the
        shared SwiGLU runs through it as one expert that every token reaches, the gate as the rows'
        combine weights, on batches of at least shared_on_kernel_min_tokens; else, or when its
        linears are not plain nn.Linear without hooks (a LoRA wrapper, say), the module runs."""
        if not (x_TD.shape[0] >= self.shared_on_kernel_min_tokens
                and moe_kernel.runs_own_matmul(xe_TD) and self.plain_shared()):
            shared_TD = self.shared(x_TD)
            return shared_TD if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        T = xe_TD.shape[0]
        gate_up, down, weight_T = self.shared_weights(x_TD, xe_TD.dtype)
        w_gate_up, w_down = gate_up.t().unsqueeze(0), down.t().unsqueeze(0)  # (1, D, 2H), (1, H, D): the kernel's layout
        weight_T = xe_TD.new_ones(T) if weight_T is None else weight_T
        rows_T = torch.arange(T, device=xe_TD.device)
        return moe_kernel.fused_experts(xe_TD, w_gate_up, w_down, weight_T, rows_T, rows_T.new_full((1,), T),
                                        lambda out_TD: out_TD)  # one row per token, in order: nothing to sum

    # the kernel path copies the weights into its layout (and their gradients back) on every call:
    # measured on the fine config's shared experts (256 x 256), kernel against module, forward only:
    # 1 token 137 vs 28 us, 64 tokens 208 vs 198, 256 tokens 360 vs 548; forward+backward alike
    # (64: 701 vs 630 us, 256: 1225 vs 1807)
    shared_on_kernel_min_tokens = 128

    def shared_weights(self, x_TD: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
        """A plain shared SwiGLU as the kernel's ops take it: its gate_up (2H, D) and down (D, H) weights
        in nn.Linear's layout and in dtype, and the Qwen2-MoE gate's weight per token (None: no gate)."""
        gate_T = None if self.shared_gate is None else cast(torch.sigmoid(self.shared_gate(x_TD)).squeeze(-1), dtype)
        return cast(self.shared.gate_up.weight, dtype), cast(self.shared.down.weight, dtype), gate_T

    def plain_shared(self) -> bool:
        """The shared experts are a plain SwiGLU of bias-free nn.Linear layers without hooks (no LoRA
        wrapper, say), so the kernel may run their weights in place of their forward. (Written out
        attribute by attribute: at one token it runs on every layer's forward.)"""
        shared = self.shared
        if type(shared) is not SwiGLU:
            return False
        gate_up, down = shared.gate_up, shared.down
        return type(gate_up) is nn.Linear and type(down) is nn.Linear and gate_up.bias is None and down.bias is None \
            and not (shared._forward_hooks or shared._forward_pre_hooks or gate_up._forward_hooks
                     or gate_up._forward_pre_hooks or down._forward_hooks or down._forward_pre_hooks)

    def planned(self, xe_TD: torch.Tensor, routing: Routing, n_seq: int) -> tuple[torch.Tensor, Dispatch]:
        """The routed experts' output through a dispatch plan: assignments sorted by expert, gathered
        into rows, run per expert group, weighted and summed back to their tokens."""
        cfg, T = self.cfg, xe_TD.shape[0]
        if cfg.routing == "token_choice":
            plan = token_choice_dispatch(routing, cfg.capacity(T, self.training), cfg.drop_policy, n_seq,
                                         cfg.n_experts)
        else:
            capacity = math.ceil((cfg.capacity_factor or 1.0) * T * cfg.experts_per_token / cfg.n_pool)
            plan = expert_choice_dispatch(routing, capacity, cfg.route_scale)

        # gather -> experts -> weighted sum back to the tokens
        if plan.slot_A is not None:  # token choice
            counts_E, row_A = plan.counts_E, torch.arange(plan.slot_A.numel(), device=xe_TD.device)
            padded = self.experts.wants_padding(counts_E, xe_TD)
            if padded:  # every expert's group padded with zero rows to the largest, M
                E, M = counts_E.numel(), int(counts_E.max())
                expert_A = torch.repeat_interleave(torch.arange(E, device=xe_TD.device), counts_E)
                row_A = expert_A * M + row_A - (counts_E.cumsum(0) - counts_E)[expert_A]
                counts_E = torch.full_like(counts_E, M)
            n_rows = int(counts_E.sum())
            slots = SlotMap(plan.slot_A, row_A, T, cfg.experts_per_token, n_rows)
            weight_N = plan.weight_A.new_zeros(n_rows).index_copy(0, row_A, plan.weight_A) if padded else plan.weight_A
        else:  # expert choice: a token can reach any number of experts; every group has the same size
            counts_E, slots, weight_N = plan.counts_E, TokenRows(plan.token_A, T), plan.weight_A
            padded = self.experts.wants_padding(counts_E, xe_TD)
        return self.experts(xe_TD, slots, counts_E, weight_N, padded), plan

    def few_tokens(self, x_TD: torch.Tensor, xe_TD: torch.Tensor, routing: Routing,
                   shared_too: bool) -> tuple[torch.Tensor, Dispatch]:
        """Inference on a small batch (sampling; up to RoutedExperts.few_tokens_limit tokens):
        RoutedExperts.few_tokens (with the shared experts if shared_too), and a plan with only the counts."""
        routed_E = torch.bincount(routing.idx_TK.flatten(), minlength=self.cfg.n_pool)
        plan = Dispatch(None, None, routed_E[:self.cfg.n_experts], routed_E, routing.logits_TE.new_zeros(()))
        shared = self.shared_weights(x_TD, xe_TD.dtype) if shared_too else None
        return self.experts.few_tokens(xe_TD, routing.idx_TK, routing.weights_TK, shared), plan

    def aux(self, routing: Routing, plan: Dispatch, n_seq: int) -> MoEAux:
        cfg = self.cfg
        T, E = routing.logits_TE.shape
        zero = routing.logits_TE.new_zeros(())
        counts_E = plan.routed_E
        pooled = self.training and cfg.balance_scope == "global"
        if self.training and (cfg.bias_update_rate > 0 or pooled) and not recomputing():
            # once per forward: activation checkpointing's recomputed forward must not count twice
            self.load_E = self.load_E.to(counts_E.device) + (self.all_reduce(counts_E.float()) if pooled else counts_E)
        balance_counts_E = self.load_E if pooled else counts_E
        def coef(c: float, loss_fn) -> torch.Tensor:
            return c * loss_fn() if c > 0 else zero

        probs_TE = routing.probs_TE
        return MoEAux(
            balance_loss=coef(cfg.balance_alpha, lambda: balance_loss(balance_counts_E, probs_TE)),
            seq_balance_loss=coef(cfg.seq_balance_alpha, lambda: seq_balance_loss(
                routing.idx_TK.view(n_seq, T // n_seq, -1), probs_TE.view(n_seq, T // n_seq, E))),
            device_balance_loss=coef(cfg.device_balance_alpha, lambda: device_balance_loss(
                balance_counts_E, probs_TE, cfg.n_devices)),
            z_loss=coef(cfg.z_loss_coef, lambda: z_loss(routing.logits_TE)),
            tokens_per_expert=counts_E.detach(),
            drop_fraction=plan.drop_fraction,
            kept_per_expert=plan.counts_E.detach(),
            flops_per_kept=6 * cfg.d_model * cfg.hidden_per_expert / max(T, 1),  # an empty batch ran none
            micro_balance_loss=coef(cfg.balance_alpha, lambda: balance_loss(counts_E, probs_TE.detach()))
            if pooled else None,
            probs_TE=routing.probs_TE,
        )

    @staticmethod
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        """Sum over DDP ranks (a no-op without a process group); no gradient flows through it."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call once after every optimizer step: the aux-loss-free bias step, if on, and a new
        step's pooled counts for global balancing. Every rank ends with the same bias."""
        if self.cfg.bias_update_rate > 0:
            self.update_bias()
        else:
            self.load_E = torch.zeros_like(self.load_E)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3), from the loads since the last call,
        which it then clears; after_optimizer_step() calls it.

        b_i += gamma * sign(mean load - load_i), then re-centred to mean zero.
        Loads are summed over all micro-batches since the last call and over
        all DDP ranks, so every rank applies the same update.
        """
        bias_E = self.router.expert_bias
        load_E = self.load_E.to(device=bias_E.device, dtype=torch.float32)
        if self.cfg.balance_scope != "global":  # pooled counts are summed over ranks already
            load_E = self.all_reduce(load_E)
        bias_E += (self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)
        bias_E -= bias_E.mean()
        self.load_E = torch.zeros_like(load_E)
