"""Training-step time and peak memory of the memory layers against the dense floor, side by side.

    python -m benchmarks.memory_layer [--repeats 9] [--tokens 4096] [--configs ablation,wide]

For each config it times, interleaved round-robin so machine noise hits all alike, one
training step of the layer alone (forward, backward of a dense incoming gradient, and
`after_optimizer_step`, where the EMA slot memory applies its writes):
  dense_floor   models.transformer.SwiGLU with the same active FLOPs per token as the memory
                layer it is compared with (3 * D * hidden = the layer's active_parameters())
  pkm           models.memory.product_key.ProductKeyMemory (Memory+ gated output)
  ema_slot      models.memory.ema_slot.EMASlotMemory, its table filled before timing
Configs: "ablation", each memory variant as configs/ablations/memory.yaml trains it (width 64);
"wide", width 256 as in benchmarks.moe_layer, with a 65,536-entry product-key table.
Ratios are taken against the dense floor of the same row. Peak memory is the high-water
mark of tensor storage created during one forward+backward (benchmarks.moe_layer.PeakMemory),
above what was live before it: for the product-key table this includes its full-size dense
gradient. Prints a table, then one line of JSON with the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from moe_playground.benchmarks.moe_layer import interleaved, peak_bytes, step
from moe_playground.models.memory.ema_slot import EMASlotConfig, EMASlotMemory
from moe_playground.models.memory.product_key import ProductKeyConfig, ProductKeyMemory
from moe_playground.models.transformer import SwiGLU
from moe_playground.train.config import load_config
from moe_playground.train.lm import LMRunConfig
from moe_playground.train.sweep.spec import load_sweep

ABLATION = Path(__file__).resolve().parents[1] / "configs/ablations/memory.yaml"
WIDE = {  # the width of benchmarks.moe_layer (256); a 65,536-entry product-key table (16.8M values)
    "pkm": dict(d_model=256, n_keys=256, heads=4, query_dim=128, top_k=32),
    "ema_slot": dict(d_model=256, n_slots=4096, key_dim=64, top_k=32),
}
LAYERS = {"pkm": (ProductKeyMemory, ProductKeyConfig), "ema_slot": (EMASlotMemory, EMASlotConfig)}
CONFIG_NAMES = ["ablation", "wide"]


def layer_configs(name: str) -> dict[str, object]:
    """{kind: its layer config}: "ablation" takes each variant of configs/ablations/memory.yaml as it
    trains there, "wide" the WIDE sizes."""
    if name == "wide":
        return {kind: LAYERS[kind][1](**WIDE[kind]) for kind in LAYERS}
    sweep = load_sweep(ABLATION)
    out = {}
    for kind in LAYERS:
        run = next(r for r in sweep.runs() if r.variant == kind)
        cfg = load_config(LMRunConfig, sweep.config, run.overrides)
        out[kind] = replace(getattr(cfg, kind), d_model=cfg.model.d_model)
    return out


def train_step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """One training step of the layer alone: fresh gradients, forward + backward, then the
    layer's `after_optimizer_step` (where the EMA slot memory applies its writes)."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        step(model, x, g)
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per candidate (median reported)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--configs", default="ablation,wide", help=f"comma list from {CONFIG_NAMES}")
    args = ap.parse_args()
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIG_NAMES]
    if bad or args.repeats < 1 or args.tokens < 16:
        raise SystemExit(f"--configs must be from {CONFIG_NAMES} (got {bad}); --repeats must be >= 1, --tokens >= 16")

    rows, summary = [], {}
    for cname in names:
        torch.manual_seed(0)
        models = {}
        for kind, cfg in layer_configs(cname).items():
            models[kind] = LAYERS[kind][0](cfg).train()
            D = models[kind].cfg.d_model
            models[f"dense_floor_{kind}"] = SwiGLU(D, round(models[kind].active_parameters() / (3 * D)))
        x = torch.randn(args.tokens // 16, 16, D, requires_grad=True)  # sequences of 16 tokens
        g = torch.randn_like(x)
        times = interleaved({n: train_step(m, x, g) for n, m in models.items()}, args.repeats)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        peak = {n: peak_bytes(m, x, g) / 2**20 for n, m in models.items()}
        for kind in LAYERS:
            floor = f"dense_floor_{kind}"
            for n in (kind, floor):
                m = models[n]
                total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers() if b.is_floating_point())
                rows.append((cname, n, med[n], min(times[n]) * 1e3, peak[n], med[n] / med[floor], total))
            summary[f"{cname}/{kind}"] = {"time_over_dense": round(med[kind] / med[floor], 3),
                                          "peak_over_dense": round(peak[kind] / peak[floor], 3)}

    print(f"T={args.tokens} tokens, {args.repeats} interleaved rounds, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'config':9s} {'layer':18s} {'median ms':>10s} {'min ms':>8s} {'peak MiB':>9s} {'/dense':>7s} {'params+buffers':>14s}")
    for cname, n, m, lo, pk, r, total in rows:
        print(f"{cname:9s} {n:18s} {m:10.1f} {lo:8.1f} {pk:9.1f} {r:7.2f} {total:14,d}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
