"""Forward+backward time and peak memory of the MoE layer, side by side.

    python -m benchmarks.moe_layer [--repeats 9] [--tokens 4096]

For each config it times, interleaved round-robin so machine noise hits all alike:
  moe           this layer as configured by default (dispatch="grouped_mm")
  moe_auto      this layer with dispatch="auto" (here: one padded bmm per projection)
  dense_floor   models.transformer.SwiGLU with the same active FLOPs per token (what no sparse
                layer can beat), with the same cat-free activation backward the MoE uses
  hf_<impl>     transformers' Qwen2MoeSparseMoeBlock under each experts implementation;
                batched_mm gathers a full copy of the expert weights for every
                token-expert pair (T*K*3*H*D floats, 9.6 GB forward alone on the fine
                config), so it is skipped, and said so, above --max-gib
Ratios are taken against the dense floor. Peak memory is the high-water
mark of tensor storage created during one forward+backward (tracked op by op
with a dispatch mode), above what was live before it. Prints a table, then one
line of JSON with the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_playground.models.moe import MoE, MoEConfig
from moe_playground.models.transformer import SwiGLU

CONFIGS = {
    # DeepSeekMoE-style: 64 fine-grained experts, top-6, 2 shared experts of the same size
    "fine": dict(d_model=256, n_routed_experts=64, expert_hidden=128, top_k=6, n_shared_experts=2),
    # GShard/Mixtral-style: 8 experts, top-2
    "coarse": dict(d_model=256, n_routed_experts=8, expert_hidden=512, top_k=2),
}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def build(name: str, cfg: MoEConfig) -> nn.Module:
    if name.startswith("moe"):
        dispatch = {"moe": "grouped_mm", "moe_auto": "auto"}[name]
        return MoE(MoEConfig(**{**cfg.__dict__, "dispatch": dispatch}))
    if name.startswith("dense"):
        return SwiGLU(cfg.d_model, cfg.experts_per_token * cfg.hidden_per_expert + cfg.shared_hidden)
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


class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages ops create (freed ones dropped as their weak refs expire)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    model.zero_grad(set_to_none=True)
    x.grad = None
    with PeakMemory() as mem:
        step(model, x, g)
    return mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per candidate (median reported)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--configs", default="fine,coarse", help=f"comma list from {list(CONFIGS)}")
    ap.add_argument("--max-gib", type=float, default=4.0,
                    help="skip hf_batched_mm when its per-pair weight copies would exceed this")
    args = ap.parse_args()
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad or args.repeats < 1 or args.tokens < 1:
        raise SystemExit(f"--configs must be from {list(CONFIGS)} (got {bad}); --repeats and --tokens must be >= 1")

    candidates = ["moe", "moe_auto", "dense_floor"] + [f"hf_{i}" for i in HF_IMPLS]
    rows, summary, skipped = [], {}, []
    for cname in names:
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
        for m in models.values():  # warm up (allocator, oneDNN kernels)
            step(m, x, g)
        times = {n: [] for n in todo}
        for _ in range(args.repeats):
            for n, m in models.items():
                m.zero_grad(set_to_none=True)
                x.grad = None
                t0 = time.perf_counter()
                step(m, x, g)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        peak = {n: peak_bytes(m, x, g) / 2**20 for n, m in models.items()}
        for n in todo:
            rows.append((cname, n, med[n], min(times[n]) * 1e3, peak[n], med[n] / med["dense_floor"]))
        hf_best = min((n for n in todo if n.startswith("hf_")), key=med.get)
        summary[cname] = {
            "moe_over_dense": round(med["moe"] / med["dense_floor"], 3),
            "moe_auto_over_dense": round(med["moe_auto"] / med["dense_floor"], 3),
            "moe_over_hf_best": round(med["moe"] / med[hf_best], 3),
            "hf_best": hf_best,
            "moe_peak_over_dense": round(peak["moe"] / peak["dense_floor"], 3),
            "moe_peak_over_hf_best": round(peak["moe"] / peak[hf_best], 3),
        }

    print(f"T={args.tokens} tokens, {args.repeats} interleaved rounds, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'config':8s} {'impl':16s} {'median ms':>10s} {'min ms':>8s} {'peak MiB':>9s} {'/dense':>7s}")
    for cname, n, m, lo, pk, r in rows:
        print(f"{cname:8s} {n:16s} {m:10.1f} {lo:8.1f} {pk:9.1f} {r:7.2f}")
    for line in skipped:
        print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
