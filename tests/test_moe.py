"""Proof of correctness for models/moe.py.

1. A slow per-token reference written from the papers' definitions; the fast
   layer matches it on many random configs (hypothesis), forward and gradients.
2. Exact properties: one expert == dense SwiGLU, uniform routing gives alpha,
   z-loss formula, conservation, capacity drops, float64 gradcheck.
3. Edges: finite at router logits of +-1e4 (fp32 and bf16 autocast, every score function,
   normalisation, routing and dispatch), fp32 router and one output dtype under autocast,
   causal position dropping, MoE++ zero / copy / constant experts and the routed-FLOPs metric.
4. Aux-loss-free bias and global-batch balancing: counts pooled over micro-batches and over
   gloo ranks equal one big batch's, counted once under activation checkpointing; the bias is
   identical across DDP ranks.
5. Parity with transformers' Mixtral, Qwen2-MoE and DeepSeek-V3 blocks.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from models import moe_kernel
from models.moe import MoE, MoEConfig, RoutedExperts, token_choice_dispatch
from models.transformer import SwiGLU

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# slow, per-token reference: plain loops over tokens and experts


def ref_expert(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    cfg = moe.cfg
    if e >= cfg.n_experts:  # MoE++: zero experts, then copy experts, then constant experts
        j = e - cfg.n_experts - cfg.n_zero_experts
        if j < 0:
            return torch.zeros_like(x_D)
        if j < cfg.n_copy_experts:
            return x_D
        c = j - cfg.n_copy_experts
        a = (moe.null_experts.gate_weight[2 * c:2 * c + 2] @ x_D).softmax(-1)
        return a[0] * x_D + a[1] * moe.null_experts.vector_CD[c]
    w_gate_up, w_down = moe.experts.w_gate_up[e], moe.experts.w_down[e]
    H = w_down.shape[0]
    h = x_D @ w_gate_up
    return (F.silu(h[:H]) * h[H:]) @ w_down


def ref_shared(moe: MoE, x_D: torch.Tensor) -> torch.Tensor:
    cfg = moe.cfg
    out = torch.zeros_like(x_D)
    if cfg.n_shared_experts == 0:
        return out
    W_gate_up, W_down = moe.shared.gate_up.weight, moe.shared.down.weight  # (2H, D), (D, H)
    H = W_down.shape[1]
    per = H // cfg.n_shared_experts
    for s in range(cfg.n_shared_experts):  # each shared expert on its own, summed
        g, u = W_gate_up[s * per:(s + 1) * per], W_gate_up[H + s * per:H + (s + 1) * per]
        out = out + W_down[:, s * per:(s + 1) * per] @ (F.silu(g @ x_D) * (u @ x_D))
    if cfg.shared_gate:
        out = out * torch.sigmoid(moe.shared_gate.weight[0] @ x_D)
    return out


def ref_route_token(moe: MoE, x_D: torch.Tensor):
    """-> logits, scores, probs, chosen experts (best first), their combine weights."""
    cfg = moe.cfg
    E, K = cfg.n_pool, cfg.experts_per_token
    logits = moe.router.weight.float() @ x_D.float()
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    probs = scores / scores.sum()
    choice = [float(scores[e].detach() + moe.router.expert_bias[e]) for e in range(E)]
    eligible = list(range(E))
    if cfg.n_groups > 1:
        size = E // cfg.n_groups
        group_score = []
        for g in range(cfg.n_groups):
            vals = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_score.append(sum(vals[:2]) if cfg.score_func == "sigmoid" else vals[0])
        best = sorted(range(cfg.n_groups), key=lambda g: -group_score[g])[:cfg.topk_groups]
        eligible = [e for e in range(E) if e // size in best]
    chosen = sorted(eligible, key=lambda e: -choice[e])[:K]
    weights = [scores[e] for e in chosen]
    if cfg.norm_topk:
        total = sum(weights)
        weights = [w / total for w in weights]
    return logits, scores, probs, chosen, [w * cfg.route_scale for w in weights]


def reference_moe(moe: MoE, x: torch.Tensor):
    """-> y, {loss name: value}, tokens_per_expert (list), drop_fraction, routed FLOPs per token."""
    cfg = moe.cfg
    E, K = cfg.n_pool, cfg.experts_per_token  # every expert the router scores
    n_ffn = cfg.n_experts  # of which the first n_ffn are FFN experts
    n_seq = x.shape[0] if x.dim() == 3 else 1
    xs = list(x.reshape(-1, cfg.d_model))
    T = len(xs)
    routes = [ref_route_token(moe, x_D) for x_D in xs]
    ys = [ref_shared(moe, x_D) for x_D in xs]

    if cfg.routing == "token_choice":
        per_expert = {e: [] for e in range(E)}  # e -> [(score, token, weight, k)]
        for t, (_, scores, _, chosen, weights) in enumerate(routes):
            for k, (e, w) in enumerate(zip(chosen, weights)):
                per_expert[e].append((float(scores[e]), t, w, k))
        counts = [len(per_expert[e]) for e in range(E)]
        C = math.ceil(cfg.capacity_factor * T * K / E) if cfg.capacity_factor else T * K
        S = T // n_seq  # position policy: position in the sequence, then sequence, then choice rank
        priority = (lambda a: -a[0]) if cfg.drop_policy == "score" else (lambda a: (a[1] % S, a[1] // S, a[3]))
        # zero-computation experts are never dropped
        kept = {e: sorted(per_expert[e], key=priority)[:C if e < n_ffn else None] for e in range(E)}
        dropped = sum(counts) - sum(len(v) for v in kept.values())
        drop_fraction = dropped / (T * K)
    else:  # expert choice: expert e takes its C best tokens
        C = min(math.ceil((cfg.capacity_factor or 1.0) * T * K / E), T)
        kept = {}
        for e in range(E):
            col = [(float(routes[t][1][e]), t) for t in range(T)]
            best = sorted(col, key=lambda a: -a[0])[:C]
            kept[e] = [(s, t, routes[t][1][e] * cfg.route_scale) for s, t in best]
        counts = [C] * E
        drop_fraction = sum(all(t not in [a[1] for a in kept[e]] for e in range(E)) for t in range(T)) / T
    for e in range(E):
        for _, t, w, *_ in kept[e]:
            ys[t] = ys[t] + w * ref_expert(moe, e, xs[t])
    y = torch.stack(ys).view(x.shape)
    flops = sum(len(kept[e]) for e in range(n_ffn)) * 2 * 3 * cfg.d_model * cfg.hidden_per_expert / T

    # losses, straight from the definitions
    def f(e, n_tok, cnt):
        return E / (K * n_tok) * cnt

    P = [sum(r[2][e] for r in routes) / T for e in range(E)]
    bal = sum(f(e, T, counts[e]) * P[e] for e in range(E))
    S = T // n_seq
    seq = 0.0
    for b in range(n_seq):
        rs = routes[b * S:(b + 1) * S]
        for e in range(E):
            cnt = sum(e in r[3] for r in rs)
            seq = seq + f(e, S, cnt) * sum(r[2][e] for r in rs) / S
    seq = seq / n_seq
    per_dev = E // cfg.n_devices
    dev = 0.0
    for d in range(cfg.n_devices):
        group = range(d * per_dev, (d + 1) * per_dev)
        dev = dev + sum(f(e, T, counts[e]) for e in group) / per_dev * sum(P[e] for e in group)
    z = sum(torch.logsumexp(r[0], -1) ** 2 for r in routes) / T
    losses = {"balance_loss": cfg.balance_alpha * bal, "seq_balance_loss": cfg.seq_balance_alpha * seq,
              "device_balance_loss": cfg.device_balance_alpha * dev, "z_loss": cfg.z_loss_coef * z}
    if cfg.routing == "expert_choice":
        losses = {k: cfg.z_loss_coef * z if k == "z_loss" else 0.0 for k in losses}
    return y, losses, counts, drop_fraction, flops


# -----------------------------------------------------------------------------
# fast layer == reference, on random configs


@st.composite
def moe_cases(draw):
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice"]))
    granularity = draw(st.integers(1, 2))
    n_routed = draw(st.integers(1, 6))
    E = n_routed * granularity
    tc = routing == "token_choice"
    n_groups = draw(st.sampled_from([g for g in (1, 2, 4) if E % g == 0])) if tc else 1
    # enough eligible experts for at least top_k = 1 (granularity experts per token)
    min_groups = math.ceil(granularity / (E // n_groups))
    topk_groups = draw(st.integers(min_groups, n_groups))
    max_k = min(n_routed, topk_groups * (E // n_groups) // granularity)
    n_devices = draw(st.sampled_from([d for d in (1, 2, 3) if E % d == 0]))
    n_shared = draw(st.integers(0, 2))
    # MoE++ zero-computation experts: token choice without groups or devices
    n_zero, n_copy, n_const = draw(st.lists(st.integers(0, 2), min_size=3, max_size=3)) \
        if tc and n_groups == 1 and n_devices == 1 and draw(st.booleans()) else (0, 0, 0)
    capacity_factor = draw(st.sampled_from([None, 0.5, 1.0, 1.5]))
    cfg = MoEConfig(
        d_model=draw(st.sampled_from([8, 12, 16])),
        n_routed_experts=n_routed,
        expert_hidden=granularity * draw(st.sampled_from([4, 8])),
        top_k=draw(st.integers(1, max_k)),
        granularity=granularity,
        n_shared_experts=n_shared,
        shared_gate=n_shared > 0 and draw(st.booleans()),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
        n_groups=n_groups,
        topk_groups=topk_groups,
        routing=routing,
        balance_alpha=0.1 if tc else 0.0,
        seq_balance_alpha=0.2 if tc else 0.0,
        device_balance_alpha=0.3 if tc else 0.0,
        n_devices=n_devices if tc else 1,
        z_loss_coef=0.01,
        n_zero_experts=n_zero,
        n_copy_experts=n_copy,
        n_constant_experts=n_const,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,  # the reference runs in eval mode: keep the training capacity
        drop_policy=draw(st.sampled_from(["score", "position"])),
        dispatch=draw(st.sampled_from(["fused", "fused", "grouped_mm", "padded_bmm", "auto", "loop"])),
        init_std=0.3,
    )
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 8)))
    if draw(st.booleans()):
        shape = (shape[0] * shape[1],)  # (T, D) input: one sequence
    return cfg, shape, draw(st.integers(0, 2**31 - 1)), tc and draw(st.booleans())


def all_grads(out, inputs):
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(moe_cases())
def test_fast_matches_reference(case):
    cfg, shape, seed, with_bias = case
    torch.manual_seed(seed)
    moe = MoE(cfg).eval()  # eval: no router noise, so both see the same routing
    if with_bias:  # selection-only bias, like aux-loss-free balancing leaves it
        moe.router.expert_bias.copy_(0.2 * torch.randn(cfg.n_experts))
    x = torch.randn(*shape, cfg.d_model, requires_grad=True)
    if cfg.dispatch == "grouped_mm":
        assert moe.experts.uses_grouped_mm(x.view(-1, cfg.d_model))

    y, aux = moe(x)
    y_ref, losses_ref, counts_ref, drop_ref, flops_ref = reference_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, value in aux.losses.items():
        torch.testing.assert_close(value, torch.as_tensor(losses_ref[name], dtype=value.dtype),
                                   atol=1e-6, rtol=1e-5, msg=name)
    assert aux.tokens_per_expert.tolist() == counts_ref
    assert aux.drop_fraction.item() == pytest.approx(drop_ref)
    assert aux.routed_flops_per_token.item() == pytest.approx(flops_ref)

    # gradients of an arbitrary function of the output and every loss
    g_out = torch.randn_like(y)
    params = [x] + list(moe.parameters())
    obj = (y * g_out).sum() + sum(aux.losses.values())
    obj_ref = (y_ref * g_out).sum() + sum(torch.as_tensor(v) for v in losses_ref.values())
    for g, g_ref in zip(all_grads(obj, params), all_grads(obj_ref, params)):
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# exact properties


def test_single_expert_is_dense_swiglu():
    cfg = MoEConfig(d_model=16, n_routed_experts=1, expert_hidden=24, top_k=1, init_std=0.2)
    moe = MoE(cfg)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.experts.w_gate_up[0].t())
        dense.down.weight.copy_(moe.experts.w_down[0].t())
    x = torch.randn(3, 5, 16)
    y, aux = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=1e-6)
    assert aux.tokens_per_expert.tolist() == [15]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_uniform_routing_gives_alpha(score_func):
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=3, score_func=score_func,
                    balance_alpha=0.37, seq_balance_alpha=0.11, device_balance_alpha=0.05, n_devices=4)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.router.weight)  # every expert equally likely for every token
    _, aux = moe(torch.randn(2, 32, 16))
    assert aux.balance_loss.item() == pytest.approx(0.37, abs=1e-6)
    assert aux.seq_balance_loss.item() == pytest.approx(0.11, abs=1e-6)
    assert aux.device_balance_loss.item() == pytest.approx(0.05, abs=1e-6)
    # and a skewed router is penalized above alpha
    with torch.no_grad():
        moe.router.weight.normal_(std=0.5)
        moe.router.weight[0] += 1.0
    _, aux = moe(torch.randn(2, 32, 16) + 1.0)
    assert aux.balance_loss.item() > 0.37


def test_z_loss_formula():
    cfg = MoEConfig(d_model=16, n_routed_experts=6, expert_hidden=8, top_k=2, z_loss_coef=0.003, init_std=0.5)
    moe = MoE(cfg)
    x = torch.randn(4, 7, 16)
    _, aux = moe(x)
    logits = x.reshape(-1, 16) @ moe.router.weight.t()
    expected = 0.003 * (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    torch.testing.assert_close(aux.z_loss, expected)


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 2.0])
def test_assignments_conserved(capacity_factor):
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=2, capacity_factor=capacity_factor,
                    init_std=0.5)
    moe = MoE(cfg)
    T = 64
    x = torch.randn(T, 16) + torch.randn(16)  # shared offset: a skewed load that overflows
    routing = moe.router(x)
    plan = token_choice_dispatch(routing, cfg.capacity(T), cfg.drop_policy, 1)
    routed = plan.counts_E.sum().item()
    expected_kept = torch.bincount(routing.idx_TK.flatten(), minlength=8).clamp(max=cfg.capacity(T)).sum().item()
    assert routed == expected_kept
    dropped = round(plan.drop_fraction.item() * T * 2)
    assert routed + dropped == T * 2
    _, aux = moe(x)
    assert aux.tokens_per_expert.sum().item() == T * 2  # metrics count the router's choice, before drops


def test_capacity_drops_lowest_scores():
    # 2 experts, top-1; every token prefers expert 0; capacity ceil(0.5 * 8 / 2) = 2
    cfg = MoEConfig(d_model=4, n_routed_experts=2, expert_hidden=4, top_k=1, capacity_factor=0.5,
                    drop_policy="score")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(8, 4)
    x[:, 0] = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.1, 0.2, 4.0, 0.3])  # expert-0 score grows with x[:, 0]
    x[:, 1:] = torch.randn(8, 3)
    y, aux = moe(x)
    kept = (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept == [1, 6]  # the two highest expert-0 scores
    assert aux.drop_fraction.item() == pytest.approx(6 / 8)
    assert aux.tokens_per_expert.tolist() == [8, 0]


def test_position_policy_drops_later_tokens_first():
    # the setup above, by position: expert 0 keeps the first two tokens (and then the second sequence's)
    cfg = MoEConfig(d_model=4, n_routed_experts=2, expert_hidden=4, top_k=1, capacity_factor=0.5,
                    drop_policy="position")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(8, 4)
    x[:, 0] = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.1, 0.2, 4.0, 0.3])
    kept = lambda y: (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept(moe(x)[0]) == [0, 1]
    # two sequences of 4: capacity 2 goes to position 0 of both (tokens 0 and 4), not to tokens 0 and 1
    assert kept(moe(x.view(2, 4, 4))[0].view(8, 4)) == [0, 4]


@pytest.mark.parametrize("top_k, n_experts", [(1, 2), (2, 4)])
def test_position_policy_is_causal(top_k, n_experts):
    """Changing the last position never changes an earlier position's output (of any sequence)
    under the position policy; under the score policy it does (the issue's repro)."""
    moved = {"score": 0.0, "position": 0.0}
    for seed in range(20):
        for policy in moved:
            torch.manual_seed(seed)
            moe = MoE(MoEConfig(d_model=8, n_routed_experts=n_experts, expert_hidden=8, top_k=top_k,
                                capacity_factor=1.0, drop_policy=policy, init_std=0.5))
            x = torch.randn(2, 4, 8)
            x2 = x.clone()
            x2[:, -1] = 3 * torch.randn(2, 8)
            y, aux = moe(x)
            y2, aux2 = moe(x2)
            moved[policy] = max(moved[policy], (y[:, :-1] - y2[:, :-1]).abs().max().item())
    assert moved["position"] < 1e-5  # rounding only: a grouped matmul's sums depend on the group's rows
    assert moved["score"] > 0.01


def test_eval_capacity():
    cfg = MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2, capacity_factor=0.5)
    x = torch.randn(32, 16)
    for eval_cf, eval_drops in [(None, False), (math.inf, False), (8.0, False), (0.5, True), (0.25, True)]:
        torch.manual_seed(0)
        moe = MoE(dataclasses.replace(cfg, eval_capacity_factor=eval_cf))
        assert moe(x)[1].drop_fraction > 0  # training always uses capacity_factor
        drop = moe.eval()(x)[1].drop_fraction
        assert (drop > 0) == eval_drops, eval_cf
        if eval_cf == 0.5:  # the training factor: evaluation drops as training does
            assert drop == moe.train()(x)[1].drop_fraction
        if eval_cf == 0.25:
            assert drop > moe.train()(x)[1].drop_fraction


@pytest.mark.parametrize("dispatch", ["loop", "padded_bmm", "fused"])
def test_gradcheck_float64(dispatch):
    cfg = MoEConfig(d_model=4, n_routed_experts=4, expert_hidden=6, top_k=2, n_shared_experts=1, shared_gate=True,
                    score_func="sigmoid", norm_topk=True, capacity_factor=0.75, dispatch=dispatch, balance_alpha=0.1,
                    seq_balance_alpha=0.1, device_balance_alpha=0.1, n_devices=2, z_loss_coef=0.1, init_std=0.5)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    names, params = zip(*moe.named_parameters())

    def fn(x, *ps):
        y, aux = torch.func.functional_call(moe, dict(zip(names, ps)), (x,))
        return y, *aux.losses.values()

    _, aux = moe(x)
    assert aux.drop_fraction > 0  # the capacity path, with empty slots, is under test too
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["fused", "grouped_mm", "padded_bmm"])
def test_backward_from_sum(dispatch):
    """grouped_mm rejects a stride-0 incoming gradient; y.sum().backward() must still work."""
    moe = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=16, top_k=2, dispatch=dispatch))
    x = torch.randn(2, 8, 16, requires_grad=True)
    assert moe.experts.uses_grouped_mm(x.view(-1, 16)) == (dispatch != "padded_bmm")
    moe(x)[0].sum().backward()
    assert x.grad is not None and moe.experts.w_gate_up.grad.abs().sum() > 0


def test_forced_uniform_routing_balances_every_expert():
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=3, force_uniform_routing=True,
                    init_std=0.5)
    moe = MoE(cfg)
    x = torch.randn(64, 16) + 2 * torch.randn(16)  # a skewed router would pile these onto a few experts
    routing = moe.router(x)
    assert torch.bincount(routing.idx_TK.flatten(), minlength=8).tolist() == [24] * 8
    assert (routing.idx_TK.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    torch.testing.assert_close(routing.weights_TK, routing.scores_TE.gather(1, routing.idx_TK))
    _, aux = moe(x)
    assert aux.max_vio == 0
    assert MoE(dataclasses.replace(cfg, force_uniform_routing=False)).eval()(x)[1].max_vio > 0.5


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "padded_bmm", "auto", "loop"])
def test_inference_path_matches_training_path(routing, dispatch):
    """Without autograd the layer takes other paths (plain gathers, no autograd.Function, a loop over
    the experts that have rows when rows are fewer than experts): same outputs."""
    cfg = MoEConfig(d_model=16, n_routed_experts=16, expert_hidden=16, top_k=2, routing=routing, dispatch=dispatch,
                    capacity_factor=1.0, eval_capacity_factor=1.0, n_shared_experts=1, n_copy_experts=int(
                        routing == "token_choice"), init_std=0.5)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    for T in (1, 3, 64):  # 2 and 6 rows for 16 experts: the loop; 128: the dispatch as configured
        x = torch.randn(T, 16)
        with torch.no_grad():
            y = moe(x)[0]
        torch.testing.assert_close(y, moe(x)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_few_tokens_path_matches_planned_path(score_func, kernel, monkeypatch):
    """Sampling-sized batches without grad skip the dispatch plan (RoutedExperts.few_tokens: in C++
    through moe_kernel.experts_tokens, or in Python where that does not run): same outputs and
    expert counts as the planned path, with shared and zero-computation experts."""
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=16, top_k=3, n_shared_experts=1, n_zero_experts=1,
                    n_copy_experts=1, score_func=score_func, init_std=0.5)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    in_cpp = []
    if kernel:
        op = moe_kernel.experts_tokens
        monkeypatch.setattr(moe_kernel, "experts_tokens", lambda *a: in_cpp.append(1) or op(*a))
    else:
        monkeypatch.setattr(moe_kernel, "usable_for_tokens", lambda x_TD: False)
    # the limits: 64 assignments per expert through the C++ op (8 experts, top-3: 170 tokens), 4 in Python
    assert moe.experts.few_tokens_limit(torch.zeros(1, 16), 3) == (170 if kernel else 4)
    monkeypatch.setattr(RoutedExperts, "few_tokens_limit", lambda self, x_TD, top_k: 4)
    planned = []
    monkeypatch.setattr(moe, "planned", lambda *a: planned.append(1) or MoE.planned(moe, *a))
    for shape in ((1, 16), (1, 1, 16), (4, 16), (5, 16)):
        x = torch.randn(*shape)
        with torch.no_grad():
            planned.clear(), in_cpp.clear()
            y_few, aux_few = moe(x)
            assert len(planned) == (shape[0] > 4)  # the plan runs only above the few-token limit
            assert len(in_cpp) == (kernel and shape[0] <= 4)
            moe.experts.few_tokens_limit = lambda x_TD, top_k: 0  # this instance: always the plan
            y_planned, aux_planned = moe(x)
            del moe.experts.few_tokens_limit
        # (the C++ op runs the shared experts' dot products in its own summation order)
        torch.testing.assert_close(y_few, y_planned, atol=1e-5, rtol=1e-5)
        assert torch.equal(aux_few.tokens_per_expert, aux_planned.tokens_per_expert)
        torch.testing.assert_close(y_few, moe(x)[0], atol=1e-5, rtol=1e-5)  # and the training (autograd) path


def test_auto_dispatch_pads_only_when_cheap(monkeypatch):
    experts = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=16, top_k=1, dispatch="auto")).experts
    x = torch.randn(44, 16)
    assert moe_kernel.usable(x) and not experts.wants_padding(torch.tensor([10, 12, 11, 11]), x)  # the kernel
    monkeypatch.setattr(moe_kernel, "usable", lambda x_TD: False)  # where it cannot run:
    assert experts.wants_padding(torch.tensor([10, 12, 11, 11]), x)  # 48 rows padded from 44: +9%
    assert not experts.wants_padding(torch.tensor([30, 4, 5, 5]), x)  # 120 rows from 44: grouped_mm


def test_router_runs_in_fp32_under_bf16():
    moe = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=16, top_k=2)).to(torch.bfloat16)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    assert moe.router(x.view(-1, 16)).logits_TE.dtype == torch.float32
    y, _ = moe(x)
    assert y.dtype == torch.bfloat16


def test_expert_choice_is_balanced_and_non_causal():
    cfg = MoEConfig(d_model=8, n_routed_experts=4, expert_hidden=8, top_k=1, routing="expert_choice", init_std=0.5)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(1, 16, 8)
    y, aux = moe(x)
    assert aux.tokens_per_expert.tolist() == [4, 4, 4, 4] and aux.max_vio.item() == 0
    x2 = x.clone()
    x2[0, -1] = 10 * moe.router.weight[0].detach()  # only the last token changes: now expert 0 wants it
    y2, _ = moe(x2)
    assert not torch.allclose(y[0, :-1], y2[0, :-1])  # earlier tokens changed: not causal
    tc = MoE(MoEConfig(d_model=8, n_routed_experts=4, expert_hidden=8, top_k=1, init_std=0.5))
    torch.testing.assert_close(tc(x)[0][0, :-1], tc(x2)[0][0, :-1])  # token choice is per token


def test_noise_only_in_training():
    cfg = MoEConfig(d_model=8, n_routed_experts=8, expert_hidden=8, top_k=2, router_jitter=0.2, noisy_gating=True)
    moe = MoE(cfg)
    x = torch.randn(32, 8)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], moe(x)[0])
    moe.train()
    y1, y2 = moe(x)[0], moe(x)[0]
    assert not torch.allclose(y1, y2)
    y1.pow(2).sum().backward()
    assert moe.router.noise_weight.grad.abs().sum() > 0  # the noise scale is learned


def test_active_parameters():
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=32, top_k=2, granularity=2,
                    n_shared_experts=2, shared_gate=True)
    moe = MoE(cfg)
    router, shared, gate = 16 * 16, 3 * 16 * 2 * 16, 16
    assert moe.active_parameters() == router + shared + gate + 4 * 3 * 16 * 16
    # fine-grained segmentation keeps routed parameters and active parameters fixed
    coarse = MoE(MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=32, top_k=2))
    assert coarse.experts.w_down.numel() == moe.experts.w_down.numel()
    assert coarse.active_parameters() - 8 * 16 == moe.active_parameters() - router - shared - gate


def test_fine_grained_recipe_keeps_total_and_active_parameters():
    """DeepSeekMoE: N=8 experts of 256, top-2 -> m=4, Ks=1: 31 routed of 64, top-7, 1 shared."""
    cfg = MoEConfig.fine_grained(dense_hidden=256, n_experts=8, top_k=2, granularity=4, n_shared_experts=1,
                                 d_model=32)
    assert (cfg.n_routed_experts, cfg.expert_hidden, cfg.top_k, cfg.n_shared_experts) == (31, 64, 7, 1)
    fine, coarse = MoE(cfg), MoE(MoEConfig(d_model=32, n_routed_experts=8, expert_hidden=256, top_k=2))
    experts = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("router"))
    assert experts(fine) == experts(coarse)
    routers = lambda m: m.router.weight.numel()
    assert fine.active_parameters() - routers(fine) == coarse.active_parameters() - routers(coarse)
    # the granularity option alone adds shared experts on top: more active parameters
    on_top = MoE(MoEConfig(d_model=32, n_routed_experts=8, expert_hidden=256, top_k=2, granularity=4,
                           n_shared_experts=1))
    assert on_top.active_parameters() - routers(on_top) > coarse.active_parameters() - routers(coarse)
    with pytest.raises(ValueError, match="^n_shared_experts=8"):
        MoEConfig.fine_grained(dense_hidden=256, n_experts=8, top_k=2, granularity=4, n_shared_experts=8)


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=9), "moe.top_k=9"),
    (dict(expert_hidden=10, granularity=4), "moe.expert_hidden=10"),
    (dict(score_func="relu"), "moe.score_func='relu'"),
    (dict(n_groups=3), "moe.n_groups=3"),
    (dict(n_groups=4, topk_groups=5), "moe.topk_groups=5"),
    (dict(n_groups=8, topk_groups=1), "moe.topk_groups=1"),
    (dict(capacity_factor=0.0), "moe.capacity_factor=0.0"),
    (dict(shared_gate=True), "moe.shared_gate=True"),
    (dict(routing="expert_choice", balance_alpha=0.01), "moe.balance_alpha=0.01"),
    (dict(dispatch="magic"), "moe.dispatch='magic'"),
    (dict(drop_policy="random"), "moe.drop_policy='random'"),
    (dict(eval_capacity_factor=0.0), "moe.eval_capacity_factor=0.0"),
    (dict(balance_scope="batch"), "moe.balance_scope='batch'"),
    (dict(d_model=0), "moe.d_model=0"),
    (dict(n_zero_experts=-1), "moe.n_zero_experts=-1"),
    (dict(n_copy_experts=1, routing="expert_choice"), "moe.routing='expert_choice'"),
    (dict(n_constant_experts=1, n_groups=2), "moe.n_groups=2"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match="^" + field.replace("(", r"\(")):
        MoEConfig(**kwargs)


# -----------------------------------------------------------------------------
# edges: router logits far out, bf16 autocast

DISPATCHES = ["grouped_mm", "padded_bmm", "auto", "loop"]


def test_sigmoid_norm_topk_finite_when_every_chosen_score_underflows():
    """Issue repro: logits of -120 make every sigmoid score 0 in fp32, so s / sum(s) was 0/0."""
    cfg = MoEConfig(d_model=4, n_routed_experts=2, expert_hidden=4, top_k=1, score_func="sigmoid", norm_topk=True)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.fill_(-1.0)
    x = torch.full((1, 4), 30.0)
    assert moe.router(x).scores_TE.max() == 0  # the case under test: every score underflowed
    y, _ = moe(x)
    # renormalised over one chosen expert its weight is 1 (the limit of s / s), so y is that expert's output
    torch.testing.assert_close(y[0], ref_expert(moe, 0, x[0]))


def extreme_moe(score_func: str, norm_topk: bool, routing: str, dispatch: str) -> MoE:
    """Router logits of +-1e4; one token's logits are all about -1e4 (every sigmoid score underflows)."""
    tc = routing == "token_choice"
    cfg = MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=16, top_k=2, score_func=score_func,
                    norm_topk=norm_topk, routing=routing, dispatch=dispatch, capacity_factor=1.0,
                    balance_alpha=0.1 * tc, seq_balance_alpha=0.1 * tc, device_balance_alpha=0.1 * tc,
                    n_devices=2, z_loss_coef=1e-3, n_shared_experts=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        u = F.normalize(torch.randn(16), dim=0)
        w = u + 0.3 * F.normalize(torch.randn(4, 16), dim=-1)  # every expert leans towards u
        moe.router.weight.copy_(1e4 * w / 16)
    return moe


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_finite_at_extreme_router_logits(score_func, routing, autocast):
    for dispatch in DISPATCHES:
        for norm_topk in (False, True):
            moe = extreme_moe(score_func, norm_topk, routing, dispatch)
            x = torch.randn(2, 6, 16) * 4
            x[0, 0] = -16 * F.normalize(moe.router.weight[0].detach(), dim=0)
            x.requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = moe.router(x.detach().view(-1, 16)).logits_TE
                y, aux = moe(x)
                obj = y.float().square().mean() + sum(aux.losses.values())
            assert logits.abs().max() > 5e3 and (logits[0] < -1e3).all()  # the edge under test
            obj.backward()
            case = f"{dispatch} norm_topk={norm_topk}"
            assert torch.isfinite(y).all(), case
            assert all(torch.isfinite(v) for v in aux.losses.values()), case
            assert all(torch.isfinite(p.grad).all() for p in [x, *moe.parameters()] if p.grad is not None), case


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_is_fp32_under_autocast(score_func):
    cfg = MoEConfig(d_model=64, n_routed_experts=16, expert_hidden=16, top_k=2, score_func=score_func,
                    norm_topk=True, z_loss_coef=1.0, init_std=1.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(512, 64)
    want, (_, want_aux) = moe.router(x), moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (_, aux) = moe.router(x), moe(x)
    for name in ("logits_TE", "scores_TE", "probs_TE", "weights_TK"):
        assert getattr(got, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    assert torch.equal(got.idx_TK, want.idx_TK)  # no choice flips on bf16 rounding
    assert aux.z_loss.dtype == torch.float32 and aux.z_loss > 10  # large enough that bf16 would round it
    torch.testing.assert_close(aux.z_loss, want_aux.z_loss)


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_one_output_dtype_under_autocast(routing):
    for dispatch in DISPATCHES:
        null = 1 if routing == "token_choice" else 0  # a copy and a constant expert too, where allowed
        moe = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=16, top_k=2, routing=routing,
                            dispatch=dispatch, n_shared_experts=1, n_copy_experts=null, n_constant_experts=null))
        x = torch.randn(2, 8, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
        assert y.dtype == torch.bfloat16, dispatch  # as an nn.Linear under autocast
        y.float().sum().backward()
        assert moe.experts.w_gate_up.grad.dtype == torch.float32


# -----------------------------------------------------------------------------
# MoE++ zero-computation experts


def routed_to(e: int, **kwargs) -> MoE:
    """One FFN expert, then a zero, a copy and a constant expert (pool indices 1, 2, 3); top-1 with
    norm_topk (combine weight 1); a selection bias sends every token to pool expert e."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, n_routed_experts=1, expert_hidden=8, top_k=1, norm_topk=True, n_zero_experts=1,
                        n_copy_experts=1, n_constant_experts=1, init_std=0.5, **kwargs))
    with torch.no_grad():
        moe.router.expert_bias[e] = 100.0
    return moe


def test_zero_copy_and_constant_experts():
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, aux = routed_to(1)(x)  # zero expert
    assert torch.equal(y, torch.zeros_like(x)) and aux.routed_flops_per_token == 0
    y, _ = routed_to(2)(x)  # copy expert
    assert torch.equal(y, x)
    moe = routed_to(3)  # constant expert: a1*x + a2*v, [a1, a2] = softmax(W_c x)
    y, aux = moe(x)
    a = (x @ moe.null_experts.gate_weight.t()).softmax(-1)
    v = moe.null_experts.vector_CD[0]
    torch.testing.assert_close(y, a[..., :1] * x + a[..., 1:] * v)
    assert not torch.allclose(y, x, atol=1e-2) and aux.routed_flops_per_token == 0
    y.square().sum().backward()  # both the vector and its gate are learned
    assert moe.null_experts.vector_CD.grad.abs().sum() > 0 and moe.null_experts.gate_weight.grad.abs().sum() > 0
    # with a shared expert, the zero expert leaves exactly the shared output
    moe = routed_to(1, n_shared_experts=1)
    torch.testing.assert_close(moe(x)[0], moe.shared(x))


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_routed_flops_on_hand_made_routing(capacity_factor):
    """4 FFN experts, then a zero and a copy expert; token t's input is one-hot on t, so router
    row e scores token t by weight[e, t]. Each token picks two of the pool by hand."""
    choices = [(0, 1), (0, 4), (4, 5), (5, 3), (0, 2)]  # 2 + 1 + 0 + 1 + 2 FFN assignments
    T, D, H = len(choices), 8, 16
    cfg = MoEConfig(d_model=D, n_routed_experts=4, expert_hidden=H, top_k=2, n_zero_experts=1, n_copy_experts=1,
                    capacity_factor=capacity_factor, dispatch="loop")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        for t, (a, b) in enumerate(choices):
            moe.router.weight[a, t], moe.router.weight[b, t] = 5.0, 4.0
    x = torch.eye(D)[:T]
    with FlopCounterMode(display=False) as counter:
        _, aux = moe(x)
    assert aux.tokens_per_expert.tolist() == [3, 1, 1, 1, 2, 2]
    # capacity ceil(0.75 * 5 * 2 / 6) = 2: expert 0 keeps tokens 0 and 1 (position order), drops token 4
    kept = 6 if capacity_factor is None else 5
    assert aux.drop_fraction.item() == pytest.approx((6 - kept) / (T * 2))
    assert aux.routed_flops_per_token.item() == pytest.approx(kept * 2 * 3 * D * H / T)
    router_flops = 2 * T * D * cfg.n_pool  # everything else the counter saw is the experts' matmuls
    assert (counter.get_total_flops() - router_flops) / T == pytest.approx(aux.routed_flops_per_token.item())


# -----------------------------------------------------------------------------
# activation checkpointing: the recomputed forward counts nothing


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["global", "bias"])
def test_checkpointed_forward_counts_once(kind, use_reentrant):
    make = (lambda: global_moe()) if kind == "global" else (lambda: skewed_moe(0.01))
    plain, ckpt = make(), make()
    x = torch.randn(2, 8, 16)
    y, aux = plain(x)
    (y.square().mean() + sum(aux.losses.values())).backward()

    def run(x):
        y, aux = ckpt(x)
        return y, sum(aux.losses.values())

    y2, loss2 = checkpoint(run, x.requires_grad_(), use_reentrant=use_reentrant)
    (y2.square().mean() + loss2).backward()  # recomputes the forward
    torch.testing.assert_close(ckpt.load_E, aux.tokens_per_expert.float())  # counted once, not twice
    torch.testing.assert_close(plain.load_E, ckpt.load_E)
    for (name, p), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, msg=name)


# -----------------------------------------------------------------------------
# aux-loss-free balancing


def skewed_moe(bias_update_rate: float) -> MoE:
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=2, score_func="sigmoid",
                    norm_topk=True, bias_update_rate=bias_update_rate, init_std=0.1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight[:2, 0] = 2.0  # inputs have x[0] ~ 1, so experts 0 and 1 win almost always
    return moe


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_bias_rule_balances(rate):
    moe = skewed_moe(rate)
    gen = torch.Generator().manual_seed(1)
    vio = []
    for _ in range(150):
        x = torch.randn(256, 16, generator=gen)
        x[:, 0] += 1.0
        _, aux = moe(x)
        vio.append(aux.max_vio.item())
        moe.update_bias()
    first, last = sum(vio[:5]) / 5, sum(vio[-5:]) / 5
    assert first > 1.5  # skewed to start with
    if rate > 0:
        assert last < 0.25 * first
        assert abs(moe.router.expert_bias.mean().item()) < 1e-6  # re-centred
        assert moe.router.expert_bias[:2].max() < moe.router.expert_bias[2:].min()
    else:
        assert last > 0.9 * first
        assert moe.router.expert_bias.abs().sum() == 0


def test_bias_accumulates_micro_batches_and_skips_eval():
    moe = skewed_moe(0.01)
    x = torch.randn(64, 16)
    _, a1 = moe(x)
    _, a2 = moe(x[:32])
    torch.testing.assert_close(moe.load_E, (a1.tokens_per_expert + a2.tokens_per_expert).float())
    moe.eval()
    moe(x)
    torch.testing.assert_close(moe.load_E, (a1.tokens_per_expert + a2.tokens_per_expert).float())
    moe.update_bias()
    assert moe.load_E.sum() == 0
    assert "router.expert_bias" in moe.state_dict() and "load_E" not in moe.state_dict()


# -----------------------------------------------------------------------------
# global-batch balancing


def global_moe(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=2, balance_alpha=0.1,
                         device_balance_alpha=0.1, n_devices=2, balance_scope="global", init_std=0.5))


def test_global_balance_pools_counts_over_micro_batches():
    moe = global_moe()
    x = torch.randn(3, 16, 16) + torch.arange(3.0).view(3, 1, 1) * torch.randn(16)  # micro-batches route apart
    auxes = [moe(m)[1] for m in x.split(1)]
    one_batch = global_moe().eval()(x)[1].tokens_per_expert  # eval: one batch's own counts
    assert torch.equal(moe.load_E, one_batch.float())
    for i, aux in enumerate(auxes):  # each micro-batch: the counts pooled so far, its own P
        pooled = sum(a.tokens_per_expert for a in auxes[:i + 1]).float()
        f = 8 * pooled / pooled.sum()
        P = moe.router(x[i]).probs_TE.mean(0)
        torch.testing.assert_close(aux.balance_loss, 0.1 * (f * P).sum())
        torch.testing.assert_close(aux.device_balance_loss, 0.1 * (f.view(2, 4).mean(1) * P.view(2, 4).sum(1)).sum())
        local = auxes[i].tokens_per_expert.float()
        torch.testing.assert_close(aux.micro_balance_loss, 0.1 * (8 * local / local.sum() * P).sum())
    assert not torch.allclose(auxes[-1].balance_loss, auxes[-1].micro_balance_loss)
    assert "micro_balance_loss" in auxes[-1].metrics
    moe.after_optimizer_step()
    assert moe.load_E.sum() == 0


GLOBAL_BALANCE_SCRIPT = """
import sys, torch, torch.distributed as dist
from tests.test_moe import global_moe
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
moe = global_moe()
x = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(10)) + torch.randn(2, 1, 1, 16)
for micro in x[rank]:  # this rank's two micro-batches
    moe(micro)[0].sum().backward()
one_batch = global_moe().eval()(x.flatten(0, 1))[1].tokens_per_expert
local = sum(global_moe().eval()(m)[1].tokens_per_expert for m in x[rank])
assert not torch.equal(local.float(), one_batch.float() / 2), "ranks routed alike: the test would prove nothing"
assert torch.equal(moe.load_E, one_batch.float()), (moe.load_E, one_batch)
print("GLOBAL_COUNTS_OK", flush=True)  # flushed: the report survives an abort in teardown
dist.barrier()  # neither rank tears down while the other still talks to it
dist.destroy_process_group()
"""


def test_global_balance_pools_counts_over_ranks(tmp_path):
    """2 processes under gloo, 2 micro-batches each: the pooled counts are those of the 4 as one batch."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", GLOBAL_BALANCE_SCRIPT, str(r), str(tmp_path / "rendezvous")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [r.communicate(timeout=120)[0] for r in ranks]
    # the marker, not the exit code: gloo's teardown can abort a process after its work is done
    assert all("GLOBAL_COUNTS_OK" in log for log in logs), "\n".join(logs)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from models.moe import MoE, MoEConfig, token_choice_dispatch

    rank, world = int(sys.argv[1]), 2
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same init on both ranks
    cfg = MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=2, score_func="sigmoid",
                    bias_update_rate=0.01)
    model = DDP(MoE(cfg), broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data on each rank
    local_loads = []
    for step in range(3):
        for micro in range(2):  # gradient accumulation
            x = torch.randn(32, 16) + rank * torch.arange(16) / 8  # rank-dependent routing
            with model.no_sync() if micro == 0 else torch.enable_grad():
                y, aux = model(x)
                y.pow(2).mean().backward()
        local_loads.append(model.module.load_E.clone())
        opt.step(); opt.zero_grad()
        model.module.update_bias()
    bias = model.module.router.expert_bias
    biases, loads = [torch.zeros_like(bias) for _ in range(world)], [torch.zeros_like(local_loads[0]) for _ in range(world)]
    dist.all_gather(biases, bias)
    dist.all_gather(loads, local_loads[0])
    assert not torch.equal(loads[0], loads[1]), "ranks saw the same loads: the test would prove nothing"
    assert torch.equal(biases[0], biases[1]), f"bias differs across ranks: {biases}"
    assert bias.abs().sum() > 0
    print(f"DDP_BIAS_OK rank {rank}", flush=True)  # flushed: the report survives an abort in teardown
    dist.barrier()  # neither rank tears down while the other still talks to it
    dist.destroy_process_group()
""")


def test_bias_identical_across_ddp_ranks(tmp_path):
    script = tmp_path / "ddp_bias.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    # each rank's report, not its exit code: gloo's teardown can abort a process after its work is done
    for rank, out in enumerate(outs):
        assert f"DDP_BIAS_OK rank {rank}" in out, "\n".join(outs)


# -----------------------------------------------------------------------------
# parity with transformers (weights copied over; each block in float32, eval mode)

IMPLS = ["eager", "grouped_mm", "batched_mm"]


def copy_experts(moe: MoE, hf_experts) -> None:
    # transformers stores (E, 2H, D) and (E, D, H), i.e. (out, in); this layer stores (in, out)
    with torch.no_grad():
        hf_experts.gate_up_proj.copy_(moe.experts.w_gate_up.transpose(1, 2))
        hf_experts.down_proj.copy_(moe.experts.w_down.transpose(1, 2))


def copy_mlp(moe: MoE, hf_mlp) -> None:
    gate, up = moe.shared.gate_up.weight.chunk(2, dim=0)
    with torch.no_grad():
        hf_mlp.gate_proj.weight.copy_(gate)
        hf_mlp.up_proj.weight.copy_(up)
        hf_mlp.down_proj.weight.copy_(moe.shared.down.weight)


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_mixtral(impl):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
    hf_cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                           experts_implementation=impl)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, n_routed_experts=8, expert_hidden=16, top_k=2, norm_topk=True, init_std=0.2))
    hf = MixtralSparseMoeBlock(hf_cfg).eval()
    copy_experts(moe, hf.experts)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(moe(x)[0], hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_qwen2_moe(impl):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    hf_cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=48,
                            num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, experts_implementation=impl)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, n_routed_experts=8, expert_hidden=16, top_k=3, n_shared_experts=1,
                        shared_expert_hidden=48, shared_gate=True, init_std=0.2))
    hf = Qwen2MoeSparseMoeBlock(hf_cfg).eval()
    copy_experts(moe, hf.experts)
    copy_mlp(moe, hf.shared_expert)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.shared_expert_gate.weight.copy_(moe.shared_gate.weight)
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(moe(x)[0], hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_deepseek_v3(impl):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE
    hf_cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
                              norm_topk_prob=True, experts_implementation=impl)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, n_routed_experts=16, expert_hidden=16, top_k=4, n_shared_experts=2,
                        score_func="sigmoid", norm_topk=True, route_scale=2.5, n_groups=4, topk_groups=2,
                        init_std=0.2))
    # a positive bias keeps every biased score positive: there a 0 mask (older transformers) and
    # this layer's -inf mask choose the same experts (5.23 itself masks with -inf)
    with torch.no_grad():
        moe.router.expert_bias.copy_(0.3 * torch.rand(16))
    hf = DeepseekV3MoE(hf_cfg).eval()
    copy_experts(moe, hf.experts)
    copy_mlp(moe, hf.shared_experts)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.gate.e_score_correction_bias.copy_(moe.router.expert_bias)
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(moe(x)[0], hf(x), atol=1e-5, rtol=1e-5)
    # the bias must have mattered: without it the routing (and output) differs
    with torch.no_grad():
        moe.router.expert_bias.zero_()
    assert not torch.allclose(moe(x)[0], hf(x), atol=1e-4)


def test_balance_loss_matches_transformers():
    """transformers' load_balancing_loss_func (Switch) uses f_i = counts_i / T, which sums to K,
    and returns E * sum_i f_i P_i; this layer uses f_i = E/(K*T) counts_i, so uniform routing
    gives alpha rather than K. Same selection and P (softmax, no bias, no groups):
    ours / alpha * K == theirs."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    K, E = 3, 8
    moe = MoE(MoEConfig(d_model=16, n_routed_experts=E, expert_hidden=8, top_k=K, balance_alpha=0.01, init_std=0.3))
    x = torch.randn(4, 16, 16)
    _, aux = moe(x)
    logits = moe.router(x.view(-1, 16)).logits_TE
    theirs = load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    torch.testing.assert_close(aux.balance_loss / 0.01 * K, theirs)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_runs(training):
    """A batch of no tokens (sequences of length 0) goes through forward and backward, training and
    inference paths, with no routed work counted."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2, n_shared_experts=1,
                        shared_gate=True)).train(training)
    x = torch.randn(2, 0, 16, requires_grad=training)
    with torch.set_grad_enabled(training):
        y, aux = moe(x)
    assert y.shape == x.shape and aux.routed_flops_per_token == 0 and aux.tokens_per_expert.sum() == 0
    if training:
        y.sum().backward()
        assert x.grad.shape == x.shape
