"""The fused CPU kernel of the routed experts (csrc/moe_experts.cpp), and its autograd.

On CPU, F.grouped_mm is a loop of matmuls over experts, each one split over all threads, with
the dispatch gather, the SwiGLU and its combine weight as separate passes over (N, D) and (N, H)
tensors that no longer fit in cache. The kernel instead splits the rows evenly over the threads;
each thread takes its rows a block at a time (one expert, at most BLOCK_ROWS rows), gathers the
block's tokens, and runs gate/up, SwiGLU and down on it single-threaded while it is in cache.
Backward does the same per block and adds each expert's weight gradient up over its blocks.
The block matmuls run torch's BLAS, or on CPUs where that leaves AVX-512 unused, a register-tiled
matmul of the kernel's own (own_matmul()).
The same extension holds the router's top-k, the dispatch plan's sort by expert, its combine, and a plan-free
path for sampling's small batches, routed and shared experts in one op (experts_tokens).

It is built on first use with torch.utils.cpp_extension (a C++ compiler and ninja; about 25 s,
then cached under TORCH_EXTENSIONS_DIR). Where it cannot be built, `kernel()` is None and says
why once; with MOE_PLAYGROUND_KERNEL=0 it is None without trying. Then the layer runs
F.grouped_mm, torch.topk and argsort instead.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "moe_experts.cpp"
# rows per block; measured on the benchmark's configs with the kernel's own matmul: coarse 48.4, 48.6,
# 48.9 and 53.1 ms at 128, 256, 512 and 1024 rows, fine 55.9-57.7 alike (with BLAS all alike)
BLOCK_ROWS = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
VECTOR_DTYPES = (torch.float32, torch.float64)  # what the kernel's own matmul and experts_tokens take (bf16 runs BLAS)
# compiler flags of the instruction sets torch.backends.cpu.get_cpu_capability() names on x86, as
# torch builds its own CPU kernels; elsewhere at::vec's portable code runs
VECTOR_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
                "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
MATMULS = ("auto", "blas", "own")  # MOE_PLAYGROUND_MATMUL's choices, see own_matmul


def own_matmul() -> bool:
    """Whether the kernel's block matmuls (float32 and float64) run its own register-tiled code
    rather than torch's BLAS. MOE_PLAYGROUND_MATMUL picks: "blas", "own", or "auto" (the default):
    own where the kernel is built for AVX-512 and the CPU is not Intel's. MKL, the BLAS of torch's
    x86 builds, runs its AVX-512 code only on Intel CPUs; on an AMD EPYC with AVX-512 the kernel's
    own matmul measured about 2x faster than MKL at the benchmark's blocks (and slower than MKL
    where built for AVX2 only, hence "auto" asks for AVX-512)."""
    choice = os.environ.get("MOE_PLAYGROUND_MATMUL", "auto")
    if choice not in MATMULS:
        raise ValueError(f"MOE_PLAYGROUND_MATMUL={choice!r} must be one of {MATMULS}")
    return choice == "own" or (choice == "auto" and avx512_not_intel())


@functools.cache
def avx512_not_intel() -> bool:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: leave it to BLAS
        return False
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")), "")
    return vendor not in ("", "GenuineIntel")


@functools.cache
def kernel():
    """torch.ops.moe_playground once the extension is built and loaded, or None (with one warning
    saying why) where it cannot be built."""
    if os.environ.get("MOE_PLAYGROUND_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load
        # ATen's parallel_for is a header-inlined `#pragma omp parallel` when torch runs on OpenMP:
        # without -fopenmp it silently runs every thread's share on one thread
        openmp = ["-fopenmp"] if torch._C.has_openmp else []
        # at::vec vectorizes for the instruction set named at build time, as torch's own kernels do
        # per CPU: one build per capability (a home directory shared by different CPUs keeps both)
        capability = torch.backends.cpu.get_cpu_capability()
        isa = [*VECTOR_FLAGS[capability], f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"] \
            if capability in VECTOR_FLAGS else []
        load(f"moe_playground_experts_{capability.lower()}", [str(SOURCE)], extra_cflags=["-O3", *openmp, *isa],
             extra_ldflags=openmp, is_python_module=False, verbose=False)
        register_flop_formulas(torch.ops.moe_playground)
        return torch.ops.moe_playground
    except Exception as e:  # no compiler, no ninja, a failed build: the grouped_mm path still works
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"the fused MoE expert kernel could not be built ({reason}); routed experts run "
                      f"F.grouped_mm instead (slower on CPU). Set MOE_PLAYGROUND_KERNEL=0 to skip the build.")
        return None


def register_flop_formulas(ops) -> None:
    """Matmul FLOPs of the training ops for torch.utils.flop_counter.FlopCounterMode (it counts only
    ops with a formula): the router's linear, and the experts' 6NDH forward, 12NDH backward."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    formulas = {
        ops.linear_forward: lambda x_TD, w_ED, **kw: 2 * x_TD[0] * x_TD[1] * w_ED[0],
        ops.linear_backward: lambda g_TE, x_TD, w_ED, **kw: 4 * x_TD[0] * x_TD[1] * w_ED[0],
        ops.experts_forward: lambda x_TD, token_N, ends_E, w_gate_up, w_down, *args, **kw:
            6 * token_N[0] * w_down[1] * w_down[2],
        ops.experts_backward: lambda g_TD, x_TD, token_N, ends_E, w_gate_up, w_down, *args, **kw:
            12 * token_N[0] * w_down[1] * w_down[2],
    }
    for op, formula in formulas.items():
        if op not in flop_registry:  # kernel() runs again after a cache_clear()
            register_flop_formula(op)(formula)


def usable(x_TD: torch.Tensor) -> bool:
    """The fused experts run CPU tensors of DTYPES outside torch.compile, once the kernel has been built."""
    return x_TD.dtype in DTYPES and runs_on(x_TD)


def runs_on(t: torch.Tensor) -> bool:
    """The kernel's ops take CPU tensors outside torch.compile, once the extension has been built."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and kernel() is not None


def usable_for_tokens(x_TD: torch.Tensor) -> bool:
    """experts_tokens (and the kernel's own matmul) runs float32 and float64 CPU tensors outside torch.compile."""
    return x_TD.dtype in VECTOR_DTYPES and runs_on(x_TD)


def runs_own_matmul(x_TD: torch.Tensor) -> bool:
    """The fused experts on x_TD run the kernel's own block matmuls (float32 and float64, own_matmul())."""
    return usable_for_tokens(x_TD) and own_matmul()


# linear() runs the kernel from this many rows: it transposes the weight on every call, measured
# forward at 64 x 256 weights: 13.4 vs 2.1 us at 1 row, 20.9 vs 13.3 at 64, 31.6 vs 40.6 at 256
LINEAR_MIN_ROWS = 256


def linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """F.linear(x_TD, w_ED) (no bias), on the kernel's own matmul where it runs (the router's logits:
    the same reason as the experts', torch's BLAS leaving AVX-512 unused) and the batch is large."""
    if x_TD.shape[0] >= LINEAR_MIN_ROWS and runs_own_matmul(x_TD) and w_ED.dtype == x_TD.dtype \
            and w_ED.device.type == "cpu":
        return _Linear.apply(x_TD.contiguous(), w_ED.contiguous())
    return torch.nn.functional.linear(x_TD, w_ED)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_ED):
        ctx.save_for_backward(x_TD, w_ED)
        return kernel().linear_forward(x_TD, w_ED)

    @staticmethod
    def backward(ctx, g_TE):
        d_x_TD, d_w_ED = kernel().linear_backward(g_TE.contiguous(), *ctx.saved_tensors)
        return d_x_TD, d_w_ED


def experts_tokens(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
                   ) -> torch.Tensor:
    """Inference on a small batch: y_TD[t] = sum_k weight_TK[t, k] * SwiGLU_e(x_TD[t]) over the chosen
    experts e = idx_TK[t, k] < E (indices from E on, zero-computation experts, are skipped), plus the
    shared experts' SwiGLU times weight_T[t] where shared = (gate_up (2S, D), down (D, S), weight_T or
    None for 1), their weights in nn.Linear's layout. No plan and no row maps: each chosen expert's
    weights are read once for all its tokens, the experts and slices of the shared ones split over
    threads."""
    gate_up, down, weight_T = shared if shared is not None else (None, None, None)
    return kernel().experts_tokens(*(t.contiguous() for t in (x_TD, idx_TK, weight_TK, w_gate_up, w_down)),
                                   *(None if t is None else t.contiguous() for t in (gate_up, down, weight_T)))


def sum_slots(rows_ND: torch.Tensor, row_S: torch.Tensor, K: int) -> torch.Tensor:
    """Token choice's combine: y_TD[t] = sum_k rows_ND[row_S[t * K + k]], k in order (row N: a zero
    row), in one pass over the rows where they lie (index_select then sum would first copy them all
    into slot order)."""
    return kernel().sum_slots(rows_ND.contiguous(), row_S.contiguous(), K)


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """scores_TE.topk(k, dim=-1).indices: largest first, NaN above all; on CPU equal scores go to the
    lower index (torch.topk leaves their order open). A per-row selection for the router's handful
    of k: 2x faster than torch.topk at 64 experts, top-6."""
    if runs_on(scores_TE):
        return kernel().topk_indices(scores_TE.contiguous(), k)
    return scores_TE.topk(k, dim=-1).indices


def stable_argsort(key_A: torch.Tensor, n_keys: int) -> torch.Tensor:
    """key_A.argsort(stable=True) for int64 keys in [0, n_keys): on CPU a counting sort (30x faster
    than argsort for the dispatch plan's 24,576 assignments over 64 experts)."""
    if runs_on(key_A) and key_A.dtype == torch.int64:
        return kernel().sort_by_key(key_A.contiguous(), n_keys)
    return key_A.argsort(stable=True)


def fused_experts(x_TD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weight_N: torch.Tensor,
                  token_N: torch.Tensor, ends_E: torch.Tensor, combine) -> torch.Tensor:
    """combine(out_ND), out_ND[n] = weight_N[n] * SwiGLU_e(x_TD[token_N[n]]) for the expert e that
    owns row n (rows grouped by expert, ends_E[e] the end of e's rows; token T: a zero row).
    combine sums each token's rows, (N, D) -> (T, D); its adjoint is the gather by token_N."""
    x_TD, w_gate_up, w_down, weight_N = (t.contiguous() for t in (x_TD, w_gate_up, w_down, weight_N))
    token_N, ends_E = token_N.to(torch.int64).contiguous(), ends_E.to(torch.int64).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_gate_up, w_down, weight_N)):
        return _FusedExperts.apply(x_TD, w_gate_up, w_down, weight_N, token_N, ends_E, combine)
    out_ND, _ = kernel().experts_forward(x_TD, token_N, ends_E, w_gate_up, w_down, weight_N, False, BLOCK_ROWS,
                                         own_matmul())
    return combine(out_ND)


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_gate_up, w_down, weight_N, token_N, ends_E, combine):
        ctx.own_matmul = own_matmul()  # backward runs the same matmul
        out_ND, gate_up_NH2 = kernel().experts_forward(x_TD, token_N, ends_E, w_gate_up, w_down, weight_N,
                                                       True, BLOCK_ROWS, ctx.own_matmul)
        ctx.save_for_backward(x_TD, w_gate_up, w_down, weight_N, token_N, ends_E, gate_up_NH2)
        ctx.combine = combine
        return combine(out_ND)

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_gate_up, w_down, weight_N, token_N, ends_E, gate_up_NH2 = ctx.saved_tensors
        d_x_ND, d_w_gate_up, d_w_down, d_weight_N = kernel().experts_backward(
            g_TD.contiguous(), x_TD, token_N, ends_E, w_gate_up, w_down, weight_N, gate_up_NH2, BLOCK_ROWS,
            ctx.own_matmul)
        return ctx.combine(d_x_ND), d_w_gate_up, d_w_down, d_weight_N, None, None, None
