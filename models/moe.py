"""Mixture-of-Experts feed-forward layer.

Read top to bottom: config, experts, router, balance losses, dispatch, the layer.
Tensor names carry their shape: T tokens, D model width, E routed experts,
K experts per token, H expert hidden width, A = T*K token-expert assignments,
B sequences, S tokens per sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


# -----------------------------------------------------------------------------
# config

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTINGS = ("token_choice", "expert_choice")
DISPATCHES = ("grouped_mm", "loop")


@dataclass
class MoEConfig:
    d_model: int = 256
    n_routed_experts: int = 8
    expert_hidden: int = 512
    top_k: int = 2
    # DeepSeekMoE fine-grained segmentation: every expert is split into
    # `granularity` experts of expert_hidden // granularity and top_k is
    # multiplied by it, so parameters and FLOPs per token stay the same.
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
    # load balancing, each its own coefficient
    balance_alpha: float = 0.0  # expert-level
    seq_balance_alpha: float = 0.0  # sequence-level (DeepSeek-V3)
    device_balance_alpha: float = 0.0  # device-level (DeepSeekMoE)
    n_devices: int = 1  # experts are split into this many groups for the device loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing gamma; 0 = off
    # capacity: None = dropless; else each expert keeps ceil(cf * T * K / E) tokens
    capacity_factor: Optional[float] = None
    dispatch: str = "grouped_mm"  # "grouped_mm" | "loop"

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        for name in ("d_model", "n_routed_experts", "expert_hidden", "top_k", "granularity",
                     "n_groups", "topk_groups", "n_devices"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"moe.{name}={v!r} must be an integer >= 1")
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
        for name in ("balance_alpha", "seq_balance_alpha", "device_balance_alpha",
                     "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            check(v >= 0, f"moe.{name}={v} must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"moe.capacity_factor={self.capacity_factor} must be > 0 or None (dropless)")
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

    @property
    def n_experts(self) -> int:
        """Routed experts after fine-grained segmentation."""
        return self.n_routed_experts * self.granularity

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

    def capacity(self, n_tokens: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.experts_per_token / self.n_experts)
