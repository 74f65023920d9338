"""Speed and peak memory of the MoE layer, side by side.

    python -m benchmarks.moe_layer [--sections headline,latency,grid] [--repeats 9] [--tokens 4096]
                                   [--grid-tokens 256,4096,16384] [--threads 2]

Every timing interleaves its candidates round-robin, so machine noise hits all alike, and reports
the median. Three sections:

headline  forward+backward at --tokens tokens on two configs (fine: 64 x 128, top-6, 2 shared;
          coarse: 8 x 512, top-2):
            moe           this layer as configured by default (dispatch="fused": the CPU kernel
                          of models/moe_kernel.py, its block matmuls as moe_kernel.own_matmul()
                          picks for this CPU, printed above the table)
            moe_blas      the same kernel with torch's BLAS for its block matmuls, the router and the
                          shared experts (MOE_PLAYGROUND_MATMUL=blas, as moe_grouped and moe_padded);
                          the dense floor and transformers run BLAS
            moe_grouped   this layer with dispatch="grouped_mm" (F.grouped_mm, what "fused" falls
                          back to where the kernel cannot run; the extension's routing helpers,
                          top-k, sort and combine, still run here)
            moe_padded    this layer with dispatch="padded_bmm" (dispatch="auto" runs the kernel
                          where it can, so it times as moe)
            dense_floor   models.transformer.SwiGLU with the same active FLOPs per token (what no
                          sparse layer can beat), with the same cat-free activation backward
            dense_kernel  the same dense SwiGLU through the fused kernel (one expert, every token
                          one row): the floor for `moe`'s own matmul, where torch's BLAS is slower
            hf_<impl>     transformers' Qwen2MoeSparseMoeBlock under each experts implementation;
                          batched_mm gathers a full copy of the expert weights for every
                          token-expert pair, so it is skipped, and said so, above --max-gib
          with each one's peak memory: the high-water mark of tensor storage created during one
          forward+backward (tracked op by op with a dispatch mode), above what was live before.
          The fused kernel's outputs are counted; its per-thread block buffers are not (at most
          threads x BLOCK_ROWS (256) rows x (2D + 4H) values, the transposed weights of one expert and two
          experts' weight gradients per thread).
latency   sampling-sized batches (T in 1, 4, 8, 64), forward only, eval mode, no grad: moe and
          moe_grouped (its torch path, as where the kernel cannot run: a Python loop over the tokens
          up to 4, then its plan) against the dense floor on both configs; `plan` is moe with the few-token path
          off (every batch through the dispatch plan; moe takes the few-token path,
          moe_kernel.experts_tokens with the shared experts in the same op, while T*k <= 64 per
          expert: RoutedExperts.few_tokens_limit). Each timing is a loop of calls of about 20 ms. T tokens
          reach up to T*k distinct experts, so the MoE must read more weight bytes than the dense
          floor: column `bytes` is that ratio (router, shared experts and every expert chosen at
          least once / the dense floor's weights), a floor on the time ratio wherever reading
          weights dominates.
grid      efficiency = time of one matmul chain of the same FLOPs (all T*(k + shared) rows through
          one expert-sized SwiGLU, forward+backward) / this layer's time, over E in 8, 32, 64,
          128, k in 1, 2, 6, 8, without and with 2 shared experts, T in --grid-tokens; experts of
          128 hidden units, d_model 256. Under learned-like routing (router weights ~ N(0, 1/D),
          so logits have unit spread and loads are uneven as in a trained router: its MaxVio is
          printed) and forced uniform routing (MoEConfig.force_uniform_routing).
          The issue's target: >= 0.9 wherever T*k/E >= 64 rows per expert; a cell that misses it
          is marked with !. `rt` is the router's own forward+backward (scores, top-k, combine
          weights) over the chain's time: work every token-choice layer adds to the chain, so
          where rt > 1/0.9 - 1 = 0.11 the target needs routed experts faster than the chain.
The last line is JSON with the ratios.

On a CPU shared with other busy processes, run it (and training) with OMP_WAIT_POLICY=PASSIVE:
OpenMP's spinning threads otherwise lose their time slices at every parallel region's barrier,
and a grouped matmul opens one per expert (measured at 2 threads on an oversubscribed 2-core
machine: the fine config at 12.9x the dense floor by default, 1.25x passive).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable
from unittest import mock

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_playground.models import moe_kernel
from moe_playground.models.moe import MoE, MoEConfig
from moe_playground.models.transformer import SwiGLU

CONFIGS = {
    # DeepSeekMoE-style: 64 fine-grained experts, top-6, 2 shared experts of the same size
    "fine": dict(d_model=256, n_routed_experts=64, expert_hidden=128, top_k=6, n_shared_experts=2),
    # GShard/Mixtral-style: 8 experts, top-2
    "coarse": dict(d_model=256, n_routed_experts=8, expert_hidden=512, top_k=2),
}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
# headline rows timed with MOE_PLAYGROUND_MATMUL=blas: where the kernel cannot run (grouped_mm and
# padded_bmm are its fallbacks) its own matmul does not run either, for the router and shared experts too
BLAS_ROWS = ("moe_blas", "moe_grouped", "moe_padded")
SECTIONS = ("headline", "latency", "grid")
LATENCY_TOKENS = (1, 4, 8, 64)
GRID = dict(E=(8, 32, 64, 128), k=(1, 2, 6, 8), shared=(0, 2), d_model=256, hidden=128)
TARGET_ROWS_PER_EXPERT, TARGET_EFFICIENCY = 64, 0.9


class DenseOnKernel(nn.Module):
    """A dense SwiGLU of `hidden` units run by the fused MoE kernel as a single expert that every token
    reaches once, so it runs the kernel's block matmuls."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.randn(1, d_model, 2 * hidden) * 0.02)
        self.w_down = nn.Parameter(torch.randn(1, hidden, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        T = x_TD.shape[0]
        y_TD = moe_kernel.fused_experts(x_TD, self.w_gate_up, self.w_down, x_TD.new_ones(T), torch.arange(T),
                                        torch.tensor([T]), lambda out_TD: out_TD)  # one row per token: no sum
        return y_TD.view(x.shape)


def build(name: str, cfg: MoEConfig) -> nn.Module:
    if name.startswith("moe"):
        dispatch = {"moe": "fused", "moe_blas": "fused", "moe_plan": "fused", "moe_grouped": "grouped_mm",
                    "moe_padded": "padded_bmm"}[name]
        return MoE(MoEConfig(**{**cfg.__dict__, "dispatch": dispatch}))
    if name.startswith("dense"):
        dense = DenseOnKernel if name == "dense_kernel" else SwiGLU
        return dense(cfg.d_model, cfg.experts_per_token * cfg.hidden_per_expert + cfg.shared_hidden)
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    hf_cfg = Qwen2MoeConfig(hidden_size=cfg.d_model, moe_intermediate_size=cfg.hidden_per_expert,
                            shared_expert_intermediate_size=cfg.shared_hidden, num_experts=cfg.n_experts,
                            num_experts_per_tok=cfg.experts_per_token, norm_topk_prob=cfg.norm_topk,
                            experts_implementation=name.removeprefix("hf_"))
    block = Qwen2MoeSparseMoeBlock(hf_cfg)
    for p in block.parameters():  # transformers leaves 3-D expert weights uninitialized
        nn.init.normal_(p, std=0.02)
    return block


def step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    out = model(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(g)  # a dense incoming gradient, as from a real loss


def train_step(model: nn.Module, x: torch.Tensor, g: torch.Tensor, matmul: str | None = None) -> Callable[[], None]:
    """One forward+backward; matmul: MOE_PLAYGROUND_MATMUL for its duration (the fused kernel's block matmuls)."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        with mock.patch.dict(os.environ, {"MOE_PLAYGROUND_MATMUL": matmul} if matmul else {}):
            step(model, x, g)
    return run


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` rounds of `inner` calls, candidates round-robin
    within each round; one untimed warm-up round first (allocator, oneDNN kernels)."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[n].append((time.perf_counter() - t0) / inner)
    return times


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages ops create (freed ones dropped as their weak refs expire); views
    of the tensors in `existing` (weights, inputs) are not new storage."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    model.zero_grad(set_to_none=True)
    x.grad = None
    with PeakMemory([*model.parameters(), *model.buffers(), x, g]) as mem:
        step(model, x, g)
    return mem.peak


def headline(args, summary: dict) -> None:
    candidates = ["moe", "moe_blas", "moe_grouped", "moe_padded", "dense_floor", "dense_kernel"] + \
        [f"hf_{i}" for i in HF_IMPLS]
    rows, skipped = [], []
    for cname in args.configs:
        cfg = MoEConfig(**CONFIGS[cname])
        torch.manual_seed(0)
        pair_gib = args.tokens * cfg.experts_per_token * 3 * cfg.hidden_per_expert * cfg.d_model * 4 / 2**30
        todo = [n for n in candidates if n != "hf_batched_mm" or pair_gib <= args.max_gib]
        if len(todo) < len(candidates):
            skipped.append(f"{cname}: hf_batched_mm skipped, its per-pair weight copies need {pair_gib:.1f} GiB "
                           f"forward alone (> --max-gib {args.max_gib})")
        models = {n: build(n, cfg) for n in todo}
        x = torch.randn(args.tokens // 8, 8, cfg.d_model, requires_grad=True)
        g = torch.randn_like(x)
        times = interleaved({n: train_step(m, x, g, "blas" if n in BLAS_ROWS else None) for n, m in models.items()},
                            args.repeats)
        med = median_ms(times)
        peak = {n: peak_bytes(m, x, g) / 2**20 for n, m in models.items()}
        for n in todo:
            rows.append((cname, n, med[n], min(times[n]) * 1e3, peak[n], med[n] / med["dense_floor"],
                         med[n] / med["dense_kernel"]))
        hf_best = min((n for n in todo if n.startswith("hf_")), key=med.get)
        summary[cname] = {
            "moe_over_dense": round(med["moe"] / med["dense_floor"], 3),
            "moe_blas_over_dense": round(med["moe_blas"] / med["dense_floor"], 3),
            "moe_over_dense_kernel": round(med["moe"] / med["dense_kernel"], 3),
            "moe_grouped_over_dense": round(med["moe_grouped"] / med["dense_floor"], 3),
            "moe_padded_over_dense": round(med["moe_padded"] / med["dense_floor"], 3),
            "moe_over_hf_best": round(med["moe"] / med[hf_best], 3),
            "hf_best": hf_best,
            "moe_peak_over_dense": round(peak["moe"] / peak["dense_floor"], 3),
            "moe_peak_over_hf_best": round(peak["moe"] / peak[hf_best], 3),
        }
    print(f"\n## headline: T={args.tokens}, forward+backward, {args.repeats} interleaved rounds")
    print(f"{'config':8s} {'impl':16s} {'median ms':>10s} {'min ms':>8s} {'peak MiB':>9s} {'/dense':>7s} "
          f"{'/dense_kernel':>13s}")
    for cname, n, m, lo, pk, r, rk in rows:
        print(f"{cname:8s} {n:16s} {m:10.1f} {lo:8.1f} {pk:9.1f} {r:7.2f} {rk:13.2f}")
    for line in skipped:
        print(line)


def weight_bytes_ratio(moe: MoE, dense: nn.Module, x: torch.Tensor) -> float:
    """Weight bytes the MoE reads on x (every expert chosen at least once, router, shared) / the dense floor's."""
    with torch.no_grad():
        touched = int((moe(x)[1].tokens_per_expert > 0).sum())
    per_expert = moe.experts.w_gate_up[0].numel() + moe.experts.w_down[0].numel()
    rest = sum(p.numel() for n, p in moe.named_parameters() if not n.startswith("experts."))
    return (touched * per_expert + rest) / sum(p.numel() for p in dense.parameters())


def latency(args, summary: dict) -> None:
    print(f"\n## latency: forward only, eval, no grad (sampling); median of {args.repeats} rounds")
    print(f"{'config':8s} {'T':>4s} {'moe us':>9s} {'grouped us':>10s} {'plan us':>9s} {'dense us':>9s} {'moe/dense':>10s} "
          f"{'grouped/dense':>13s} {'plan/dense':>11s} {'bytes':>6s}")
    for cname in args.configs:
        cfg = MoEConfig(**CONFIGS[cname])
        torch.manual_seed(0)
        models = {n: build(n, cfg).eval() for n in ("moe", "moe_grouped", "moe_plan", "dense_floor")}
        models["moe_plan"].load_state_dict(models["moe"].state_dict())
        models["moe_plan"].experts.few_tokens_limit = lambda x_TD, top_k: 0
        for T in LATENCY_TOKENS:
            x = torch.randn(T, cfg.d_model)
            with torch.no_grad():
                models["moe"](x)  # a first call pays one-time costs (at T=1: loading the kernel, ~80 ms)
                t0 = time.perf_counter()
                models["moe"](x)
                inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))  # ~20 ms per timing
                med = median_ms(interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, args.repeats, inner))
            r, rg, rp = (med[n] / med["dense_floor"] for n in ("moe", "moe_grouped", "moe_plan"))
            floor = weight_bytes_ratio(models["moe"], models["dense_floor"], x)
            print(f"{cname:8s} {T:4d} {med['moe'] * 1e3:9.1f} {med['moe_grouped'] * 1e3:10.1f} {med['moe_plan'] * 1e3:9.1f} "
                  f"{med['dense_floor'] * 1e3:9.1f} {r:10.2f} {rg:13.2f} {rp:11.2f} {floor:6.2f}")
            summary.setdefault(f"latency_{cname}", {})[f"T{T}"] = round(r, 3)
            summary[f"latency_{cname}"][f"T{T}_plan"] = round(rp, 3)
            summary[f"latency_{cname}"][f"T{T}_weight_bytes"] = round(floor, 2)


def grid_cell(E: int, k: int, shared: int, T: int, uniform: bool, repeats: int) -> tuple[float, float, float]:
    """-> (efficiency, MaxVio of the routing, the router's forward+backward time / the chain's) of one cell."""
    D, H = GRID["d_model"], GRID["hidden"]
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, n_routed_experts=E, expert_hidden=H, top_k=k, n_shared_experts=shared,
                        force_uniform_routing=uniform))
    with torch.no_grad():
        moe.router.weight.normal_(std=D ** -0.5)  # learned-like: unit-spread logits, uneven loads
    chain = SwiGLU(D, H)  # every row of the same work through one expert-sized SwiGLU
    x = torch.randn(T, D, requires_grad=True)
    xc = torch.randn(T * (k + shared), D, requires_grad=True)
    g_TK = torch.randn(T, k)

    def router() -> None:  # what every token-choice layer adds to the chain: scores, top-k, their backward
        moe.zero_grad(set_to_none=True)
        x.grad = None
        moe.router(x).weights_TK.backward(g_TK)

    times = median_ms(interleaved({"moe": train_step(moe, x, torch.randn_like(x)),
                                   "chain": train_step(chain, xc, torch.randn_like(xc)), "router": router}, repeats))
    with torch.no_grad():
        max_vio = moe(x)[1].max_vio.item()
    return times["chain"] / times["moe"], max_vio, times["router"] / times["chain"]


def grid(args, summary: dict) -> None:
    misses, hits, router_bound = [], 0, []
    for uniform in (False, True):
        routing = "forced uniform" if uniform else "learned-like"
        print(f"\n## grid, {routing} routing: efficiency (one-matmul-chain time / ours), forward+backward, "
              f"d_model {GRID['d_model']}, experts of {GRID['hidden']}, {args.grid_repeats} rounds; "
              f"! = below {TARGET_EFFICIENCY} with >= {TARGET_ROWS_PER_EXPERT} rows per expert; "
              f"rt = the router's own forward+backward time / the chain's")
        print(f"{'E':>4s} {'k':>2s} {'shared':>6s} " + " ".join(f"{f'T={T}':>22s}" for T in args.grid_tokens))
        for E in GRID["E"]:
            for k in GRID["k"]:
                if k > E:
                    continue
                for shared in GRID["shared"]:
                    cells = []
                    for T in args.grid_tokens:
                        eff, vio, rt = grid_cell(E, k, shared, T, uniform, args.grid_repeats)
                        target = T * k / E >= TARGET_ROWS_PER_EXPERT
                        miss = target and eff < TARGET_EFFICIENCY
                        hits += target and not miss
                        if miss:
                            misses.append(f"E{E}k{k}s{shared}T{T}{'u' if uniform else ''}")
                            # reaching the target would take experts faster than the chain by this much
                            router_bound.append(1 / TARGET_EFFICIENCY - rt < 1)
                        cells.append(f"{eff:5.2f}{'!' if miss else ' '} rt {rt:4.2f}" + ("" if uniform else f" vio {vio:4.2f}"))
                    print(f"{E:4d} {k:2d} {shared:6d} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"grid: {hits} of {hits + len(misses)} cells with >= {TARGET_ROWS_PER_EXPERT} rows per expert reach "
          f"efficiency {TARGET_EFFICIENCY}" + (
              f"; in {sum(router_bound)} of the {len(misses)} misses the router alone takes more than "
              f"1/{TARGET_EFFICIENCY} - 1 = {1 / TARGET_EFFICIENCY - 1:.2f} of the chain's time, so the target needs "
              f"routed experts faster than one matmul chain of the same FLOPs" if misses else ""))
    summary["grid_misses"] = misses
    summary["grid_misses_router_bound"] = [m for m, b in zip(misses, router_bound) if b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {list(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per candidate (median reported)")
    ap.add_argument("--tokens", type=int, default=4096, help="headline batch in tokens")
    ap.add_argument("--configs", default="fine,coarse", help=f"comma list from {list(CONFIGS)}")
    ap.add_argument("--grid-tokens", default="256,4096,16384", help="comma list of T for the grid")
    ap.add_argument("--grid-repeats", type=int, default=3, help="timed rounds per grid cell")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--max-gib", type=float, default=4.0,
                    help="skip hf_batched_mm when its per-pair weight copies would exceed this")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    args.configs = [c for c in args.configs.split(",") if c]
    try:
        args.grid_tokens = [int(t) for t in args.grid_tokens.split(",") if t]
    except ValueError:
        raise SystemExit(f"--grid-tokens must be a comma list of integers, got {args.grid_tokens!r}") from None
    bad = [s for s in sections if s not in SECTIONS] + [c for c in args.configs if c not in CONFIGS]
    if bad or min(args.repeats, args.grid_repeats, args.tokens, *args.grid_tokens, args.threads or 1) < 1:
        raise SystemExit(f"--sections must be from {list(SECTIONS)}, --configs from {list(CONFIGS)} (got {bad}); "
                         "--repeats, --grid-repeats, --tokens, --grid-tokens and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fused kernel's block matmuls: "
          f"{'its own' if moe_kernel.own_matmul() else 'BLAS'} (MOE_PLAYGROUND_MATMUL="
          f"{os.environ.get('MOE_PLAYGROUND_MATMUL', 'auto')})")
    summary = {}
    for name in sections:
        {"headline": headline, "latency": latency, "grid": grid}[name](args, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
