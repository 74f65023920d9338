"""Proof of correctness for the fused CPU expert kernel (models/moe_kernel.py, models/csrc).

1. The kernel against a float64 reference written with plain einsums: the combined output and
   every gradient (input, both expert weights, combine weights), on 1 and 2 threads, with blocks
   so small that an expert spans several blocks and both threads (the partial weight-gradient
   sums), padding rows, an expert without rows, and bf16.
2. The layer on the kernel (dispatch="fused") against the same layer on F.grouped_mm, under token
   choice with drops and under expert choice, forward and gradients.
3. Where the kernel cannot be built, "fused" says so once and runs grouped_mm.
4. The few-token op (sampling) against the same reference, zero-computation indices skipped.
5. The router's helpers: top-k indices pick torch.topk's values (NaN included, ties to the lower
   index, where torch leaves the order open), and the sort by expert equals argsort(stable=True).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import moe_kernel
from models.moe import MoE, MoEConfig


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def routed_rows(T: int, E: int, K: int, n_pad: int, empty: int, seed: int = 0):
    """Rows grouped by expert as the layer builds them: token_N, ends_E and combine weights, with
    n_pad padding rows (token T) at the end of the last expert and no rows for expert `empty`."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    scores[:, empty] = -torch.inf
    idx_TK = scores.topk(K, dim=-1).indices
    order = idx_TK.flatten().argsort(stable=True)
    token_N = torch.cat([order // K, torch.full((n_pad,), T)])
    counts_E = torch.bincount(idx_TK.flatten(), minlength=E)
    counts_E[-1] += n_pad
    weight_N = torch.cat([torch.rand(T * K, generator=g)[order], torch.zeros(n_pad)])
    return token_N, counts_E, weight_N


def reference(x_TD, w_gate_up, w_down, weight_N, token_N, counts_E):
    """sum over a token's rows of weight * SwiGLU_e(x), one einsum per projection."""
    T, D = x_TD.shape
    H = w_down.shape[1]
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    x_ND = F.pad(x_TD, (0, 0, 0, 1))[token_N]  # token T: a zero row
    gate_up = torch.einsum("nd,ndh->nh", x_ND, w_gate_up[expert_N])
    h_NH = F.silu(gate_up[:, :H]) * gate_up[:, H:] * weight_N[:, None]
    out_ND = torch.einsum("nh,nhd->nd", h_NH, w_down[expert_N])
    return x_TD.new_zeros(T + 1, D).index_add(0, token_N, out_ND)[:T]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("block_rows", [5, 1024])
@pytest.mark.parametrize("dtype, matmul", [(torch.float32, "own"), (torch.float32, "blas"), (torch.float64, "own"),
                                           (torch.bfloat16, "auto")])
def test_kernel_matches_reference(monkeypatch, threads, n_threads, block_rows, dtype, matmul):
    """Widths that leave whole and partial vector strips (D = 52, 2H = 56) for the kernel's own
    matmul; blocks of 5 rows leave row tiles of every height."""
    assert moe_kernel.kernel() is not None, "the kernel must build here (a C++ compiler and ninja)"
    threads(n_threads)
    monkeypatch.setattr(moe_kernel, "BLOCK_ROWS", block_rows)
    monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", matmul)
    T, D, H, E, K = 37, 52, 28, 6, 2
    token_N, counts_E, weight_N = routed_rows(T, E, K, n_pad=3, empty=2)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(T, D, generator=g), torch.randn(E, D, 2 * H, generator=g) / D ** 0.5,
              torch.randn(E, H, D, generator=g) / H ** 0.5, weight_N]
    g_TD = torch.randn(T, D, generator=g)

    ref = [t.double().requires_grad_() for t in inputs]
    reference(*ref, token_N, counts_E).backward(g_TD.double())
    ours = [t.to(dtype).requires_grad_() for t in inputs]
    combine = lambda out_ND: out_ND.new_zeros(T + 1, D).index_add_(0, token_N, out_ND)[:T]  # noqa: E731
    y = moe_kernel.fused_experts(*ours, token_N, counts_E.cumsum(0), combine)
    y.backward(g_TD.to(dtype))

    tol = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
           torch.bfloat16: dict(atol=0.1, rtol=0.05)}[dtype]
    torch.testing.assert_close(y.double(), reference(*[t.detach() for t in ref], token_N, counts_E), **tol)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weight"), ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol, msg=name)
    assert ours[1].grad[2].abs().sum() == 0 and ours[2].grad[2].abs().sum() == 0  # the empty expert
    with torch.no_grad():  # inference: the same output without saving gate_up
        torch.testing.assert_close(moe_kernel.fused_experts(*ours, token_N, counts_E.cumsum(0), combine), y.detach())


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_fused_layer_matches_grouped_mm(monkeypatch, routing):
    cfg = dict(d_model=16, n_routed_experts=8, expert_hidden=8, top_k=2, n_shared_experts=1, routing=routing,
               capacity_factor=1.0, init_std=0.3)
    monkeypatch.setattr(moe_kernel, "BLOCK_ROWS", 4)  # several blocks per expert
    torch.manual_seed(0)
    fused = MoE(MoEConfig(**cfg, dispatch="fused"))
    grouped = MoE(MoEConfig(**cfg, dispatch="grouped_mm"))
    grouped.load_state_dict(fused.state_dict())
    x = torch.randn(4, 16, 16)
    results = []
    for moe in (fused, grouped):
        xg = x.clone().requires_grad_()
        y, aux = moe(xg)
        (y.square().mean() + sum(aux.losses.values())).backward()
        results.append((y, xg.grad, [p.grad for p in moe.parameters()]))
    assert fused.experts.w_gate_up.grad.abs().sum() > 0
    for a, b in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_falls_back_to_grouped_mm_when_the_kernel_cannot_build(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load", no_compiler)
    moe_kernel.kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .*Ninja is required.*F.grouped_mm"):
            assert moe_kernel.kernel() is None
        moe = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2))
        x = torch.randn(8, 16, requires_grad=True)
        assert not moe_kernel.usable(x) and moe.experts.uses_grouped_mm(x)
        moe(x)[0].sum().backward()
        assert moe.experts.w_gate_up.grad.abs().sum() > 0
    finally:
        moe_kernel.kernel.cache_clear()  # the next caller builds (loads from cache) again


def test_kernel_ops_reject_bad_row_maps_before_any_work():
    """The ops are public (torch.ops.moe_playground.*): a row map that would read or write out of
    bounds is an error naming the argument, not a crash."""
    ops = moe_kernel.kernel()
    T, D, H, E = 5, 8, 4, 3
    x, w_gu, w_dn = torch.randn(T, D), torch.randn(E, D, 2 * H), torch.randn(E, H, D)
    token, ends, weight = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([2, 4, 6]), torch.rand(6)
    ops.experts_forward(x, token, ends, w_gu, w_dn, weight, False, 4, True)  # token 5 = T: a zero row, allowed
    bad = {
        "token_N values must be tokens in \\[0, T\\]": dict(token=torch.tensor([0, 1, 2, 3, 4, 6])),
        "token_N values": dict(token=torch.tensor([0, 1, -1, 3, 4, 5])),
        "ends_E must be non-decreasing": dict(ends=torch.tensor([4, 2, 6])),
        "ends_E\\[-1\\] must equal the number of rows": dict(ends=torch.tensor([2, 4, 7])),
        "ends_E must be a contiguous int64 tensor of E = 3": dict(ends=torch.tensor([2, 6])),
        "expert weights must be": dict(w_dn=torch.randn(E, H + 1, D)),
        "weights must be contiguous, on x_TD's device and of its dtype": dict(weight=torch.rand(6).double()),
        "R \\(rows per block\\) must be >= 1": dict(R=0),
    }
    for message, change in bad.items():
        args = dict(x=x, token=token, ends=ends, w_gu=w_gu, w_dn=w_dn, weight=weight, R=4) | change
        with pytest.raises(RuntimeError, match=message):
            ops.experts_forward(args["x"], args["token"], args["ends"], args["w_gu"], args["w_dn"], args["weight"],
                                False, args["R"], True)


@pytest.mark.parametrize("T", [7, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [None, "gated", "ungated"])
def test_experts_tokens_matches_reference(threads, T, dtype, shared):
    """The small-batch op (sampling): each token through its chosen experts, weighted and summed;
    indices from E on (zero-computation experts) contribute nothing; plus the shared experts in
    nn.Linear's layout, times their gate. H = 20 leaves a partial vector; S = 44 shared hidden units
    run as slices of 20, 20 and 4; 7 tokens over 5 experts, top-3, put several rows on an expert,
    200 tokens more than the 64 rows of one work item (an expert's rows, the shared slices' tokens).
    The same bits on 1 thread and 3 (the work split differs, the summation order does not)."""
    D, H, E, K, S = 24, 20, 5, 3, 44
    g = torch.Generator().manual_seed(0)
    x, w_gu, w_dn = torch.randn(T, D, generator=g), torch.randn(E, D, 2 * H, generator=g), torch.randn(E, H, D, generator=g)
    idx_TK = torch.randint(E + 2, (T, K), generator=g)  # E and E+1: skipped
    idx_TK[0] = torch.tensor([E, E + 1, E])  # a token with no routed expert
    weight_TK = torch.rand(T, K, generator=g)
    s_gu, s_dn, s_w = torch.randn(2 * S, D, generator=g), torch.randn(D, S, generator=g), torch.rand(T, generator=g)
    kept = idx_TK < E
    token_N, expert_N = kept.nonzero(as_tuple=True)[0], idx_TK[kept]
    order = expert_N.argsort(stable=True)
    expected = reference(x.double(), w_gu.double(), w_dn.double(), weight_TK[kept][order].double(), token_N[order],
                         torch.bincount(expert_N, minlength=E))
    if shared:
        gate, up = (x.double() @ s_gu.double().t()).chunk(2, dim=-1)
        shared_TD = (F.silu(gate) * up) @ s_dn.double().t()
        expected = expected + (shared_TD * s_w.double()[:, None] if shared == "gated" else shared_TD)
    x, weight_TK, w_gu, w_dn, s_gu, s_dn, s_w = (t.to(dtype) for t in (x, weight_TK, w_gu, w_dn, s_gu, s_dn, s_w))
    shared_args = None if shared is None else (s_gu, s_dn, s_w if shared == "gated" else None)
    threads(1)
    one_thread = moe_kernel.experts_tokens(x, idx_TK, weight_TK, w_gu, w_dn, shared_args)
    threads(3)
    ours = moe_kernel.experts_tokens(x, idx_TK, weight_TK, w_gu, w_dn, shared_args)
    assert ours.dtype == dtype and torch.equal(ours, one_thread)
    if shared is None:
        assert torch.equal(ours[0], torch.zeros(D, dtype=dtype))
    torch.testing.assert_close(ours.double(), expected, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}))
    with pytest.raises(RuntimeError, match="idx_TK must be >= 0"):
        moe_kernel.experts_tokens(x, idx_TK - 1, weight_TK, w_gu, w_dn)
    with pytest.raises(RuntimeError, match="idx_TK \\(int64\\) and weight_TK must be contiguous \\(T, K\\)"):
        moe_kernel.experts_tokens(x, idx_TK[:3], weight_TK, w_gu, w_dn)
    with pytest.raises(RuntimeError, match="shared experts' weights must be \\(2S, D\\) and \\(D, S\\)"):
        moe_kernel.experts_tokens(x, idx_TK, weight_TK, w_gu, w_dn, (s_gu[:, :-1], s_dn, None))
    with pytest.raises(RuntimeError, match="shared_weight_T must be a \\(T,\\) tensor"):
        moe_kernel.experts_tokens(x, idx_TK, weight_TK, w_gu, w_dn, (s_gu, s_dn, s_w[:-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 3])
def test_sum_slots_is_the_token_choice_combine(threads, dtype, K):
    """Each token's K slots summed, row N (a dropped assignment) counting as zero: the padded gather
    and sum it replaces, on 1 thread and 2."""
    T, N, D = 50, 120, 20
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(N, D, generator=g).to(dtype)
    row_S = torch.randint(N + 1, (T * K,), generator=g)
    row_S[:K] = N  # a token whose every assignment was dropped
    expected = F.pad(rows.double(), (0, 0, 0, 1))[row_S].view(T, K, D).sum(1)
    for n_threads in (1, 2):
        threads(n_threads)
        ours = moe_kernel.sum_slots(rows, row_S, K)
        assert ours.dtype == dtype and torch.equal(ours[0], torch.zeros(D, dtype=dtype))
        torch.testing.assert_close(ours.double(), expected, **(dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16
                                                                else dict(atol=1e-5, rtol=1e-5)))
    with pytest.raises(RuntimeError, match="row_S values must be rows in \\[0, N\\]"):
        moe_kernel.sum_slots(rows, row_S + 1, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("E, k", [(8, 1), (8, 8), (64, 6), (5, 2)])
def test_topk_indices_pick_torch_topk_values_ties_to_the_lower_index(dtype, E, k):
    g = torch.Generator().manual_seed(E * k)
    scores = torch.randn(300, E, generator=g).softmax(dim=-1).to(dtype)
    scores[:50] = scores[:50].mul(4).round().div(4)  # many ties (0, 0.25, ...)
    scores[50, 3] = scores[51, 0] = float("nan")  # NaN counts as the largest
    ours = moe_kernel.topk_indices(scores, k)
    tied = (scores.unsqueeze(-1) == scores.unsqueeze(-2)).triu(1).flatten(1).any(dim=-1)
    assert tied[:50].all() and not tied.all()
    assert torch.equal(ours[~tied], scores[~tied].topk(k, dim=-1).indices)  # rows without ties: torch.topk's
    # every row: the first k of a stable descending sort (equal scores in index order, NaN first)
    assert torch.equal(ours, scores.sort(dim=-1, descending=True, stable=True).indices[:, :k])


def test_stable_argsort_is_argsort_stable():
    g = torch.Generator().manual_seed(0)
    for n_keys, A in ((1, 7), (64, 24576), (130, 500)):
        key = torch.randint(n_keys, (A,), generator=g)
        assert torch.equal(moe_kernel.stable_argsort(key, n_keys), key.argsort(stable=True))
    with pytest.raises(RuntimeError, match="keys must lie in \\[0, n_keys\\), n_keys = 4"):
        moe_kernel.stable_argsort(torch.tensor([0, 4, 1]), 4)


def test_matmul_choice_follows_the_environment(monkeypatch):
    """MOE_PLAYGROUND_MATMUL: "own" and "blas" force the kernel's block matmuls, "auto" asks whether
    the CPU has AVX-512 that MKL leaves unused, anything else is an error naming the choices."""
    for choice, own in (("own", True), ("blas", False)):
        monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", choice)
        assert moe_kernel.own_matmul() is own
    monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", "auto")
    for not_intel in (True, False):
        monkeypatch.setattr(moe_kernel, "avx512_not_intel", lambda: not_intel)
        assert moe_kernel.own_matmul() is not_intel
    monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", "mkl")
    with pytest.raises(ValueError, match="MOE_PLAYGROUND_MATMUL='mkl' must be one of \\('auto', 'blas', 'own'\\)"):
        moe_kernel.own_matmul()


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts_through_the_kernel_match_the_module(monkeypatch, shared_gate):
    """Where the kernel runs its own matmul, the shared SwiGLU runs through it (one expert that every
    token reaches, the Qwen2-MoE gate as combine weights) from shared_on_kernel_min_tokens tokens:
    the module's output and gradients. A hook on the module (or a wrapper around its linears) keeps
    the module's own forward."""
    cfg = MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2, n_shared_experts=2,
                    shared_gate=shared_gate, init_std=0.3)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(2, 5, 16)
    monkeypatch.setattr(MoE, "shared_on_kernel_min_tokens", 10)
    kernel_calls = []
    fused = moe_kernel.fused_experts
    monkeypatch.setattr(moe_kernel, "fused_experts", lambda *a: kernel_calls.append(1) or fused(*a))

    def run(own: bool):
        monkeypatch.setattr(moe_kernel, "own_matmul", lambda: own)
        kernel_calls.clear()
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = moe(xg)[0]
        y.square().sum().backward()
        return [y, xg.grad] + [p.grad for p in moe.parameters()], len(kernel_calls)

    on_kernel, calls = run(True)
    assert calls == 2  # the routed experts, then the shared ones
    on_module, calls = run(False)
    assert calls == 1
    assert moe.shared.gate_up.weight.grad.abs().sum() > 0
    monkeypatch.setattr(MoE, "shared_on_kernel_min_tokens", 11)
    assert run(True)[1] == 1
    for a, b in zip(on_kernel, on_module):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    seen = []
    moe.shared.register_forward_hook(lambda *args: seen.append(1))
    assert run(True)[1] == 1 and seen == [1]


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts_in_the_small_batch_op_match_the_module(monkeypatch, shared_gate):
    """Inference on a small batch runs the shared experts inside moe_kernel.experts_tokens, beside the
    routed ones: the same output as the module (which a hook on it brings back, seen running)."""
    given = []
    op = moe_kernel.experts_tokens
    monkeypatch.setattr(moe_kernel, "experts_tokens", lambda *a: given.append(a[-1] is not None) or op(*a))
    cfg = MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2, n_shared_experts=2,
                    shared_gate=shared_gate, init_std=0.3)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        in_op = moe(x)[0]
        seen = []
        moe.shared.register_forward_hook(lambda *args: seen.append(1))
        on_module = moe(x)[0]
    assert seen == [1] and given == [True, False]
    torch.testing.assert_close(in_op, on_module, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_router_linear_matches_f_linear(monkeypatch, threads, n_threads, dtype):
    """The router's logits on the kernel's own matmul: F.linear's output and both gradients, with
    widths that leave partial vector strips and row tiles (D = 52, E = 13)."""
    threads(n_threads)
    monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", "own")
    monkeypatch.setattr(moe_kernel, "LINEAR_MIN_ROWS", 137)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(137, 52, generator=g, dtype=dtype), torch.randn(13, 52, generator=g, dtype=dtype)
    g_TE = torch.randn(137, 13, generator=g, dtype=dtype)
    ours, ref = [(x.clone().requires_grad_(), w.clone().requires_grad_()) for _ in range(2)]
    y = moe_kernel.linear(*ours)
    assert type(y.grad_fn).__name__.startswith("_Linear")  # the kernel's, from LINEAR_MIN_ROWS rows
    assert not type(moe_kernel.linear(ours[0][:136], ours[1]).grad_fn).__name__.startswith("_Linear")
    y.backward(g_TE)
    y_ref = torch.nn.functional.linear(*ref)
    y_ref.backward(g_TE)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else {}
    for a, b in ((y, y_ref), (ours[0].grad, ref[0].grad), (ours[1].grad, ref[1].grad)):
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises(RuntimeError, match="linear takes contiguous float or double \\(T, D\\) inputs"):
        moe_kernel.kernel().linear_forward(x, w[:, :50].contiguous())


def test_flop_counter_counts_the_kernel_ops(monkeypatch):
    """FlopCounterMode sees the router's linear (2TDE forward, 4TDE backward) and the fused experts
    (6NDH forward, 12NDH backward, N = T*K rows): nothing else in the layer is a matmul."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setenv("MOE_PLAYGROUND_MATMUL", "own")  # the router's linear on the kernel too
    monkeypatch.setattr(moe_kernel, "LINEAR_MIN_ROWS", 1)
    T, D, E, H, K = 40, 16, 8, 12, 2
    moe = MoE(MoEConfig(d_model=D, n_routed_experts=E, expert_hidden=H, top_k=K))
    x = torch.randn(T, D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        moe(x)[0].sum().backward()
    assert counter.get_total_flops() == 6 * T * D * E + 18 * T * K * D * H


@pytest.mark.parametrize("dispatch", ["fused", "auto", "grouped_mm", "padded_bmm", "loop"])
def test_small_batch_op_only_under_the_kernels_dispatch(monkeypatch, dispatch):
    """The small-batch op belongs to the fused kernel ("fused", or "auto" where it runs): a dispatch
    chosen otherwise keeps its torch path, the Python loop up to 4 tokens, then its plan."""
    moe = MoE(MoEConfig(d_model=16, n_routed_experts=8, expert_hidden=16, top_k=2, n_shared_experts=1,
                        dispatch=dispatch)).eval()
    calls = []
    op = moe_kernel.experts_tokens
    monkeypatch.setattr(moe_kernel, "experts_tokens", lambda *a: calls.append(1) or op(*a))
    ours = dispatch in ("fused", "auto")
    assert moe.experts.few_tokens_limit(torch.zeros(1, 16), 2) == (8 * 64 // 2 if ours else 4)
    with torch.no_grad():
        moe(torch.randn(3, 16))
    assert calls == ([1] if ours else [])
