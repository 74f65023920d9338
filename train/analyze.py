"""Expert specialization: which experts does each corpus domain route to?

    python -m train.analyze runs/<run> [--windows 128]

Loads a trained MoE run (its config.yaml and latest checkpoint), runs validation
windows through it with forward hooks on every router, and writes
<run>/analysis/:
  routing_layer<i>.png   domains x experts heatmap of the mean routing probability
  routing.md             how concentrated each domain's routing is, per MoE layer
  routing.json           the numbers behind both

Concentration, per domain (tokens labelled by the domain of the input token):
  entropy   entropy of the domain's assignment shares / ln(E): 1 = spread evenly, 0 = one expert
  top       the expert that gets most of the domain's top-k assignments, and its share of them (uniform: 1/E)
  top-K     share of assignments that go to the domain's K most-used experts (uniform: K/E)
  TV        total variation distance between the domain's assignment shares and those of all tokens:
            0 = the domain routes like the average token, 1 = to experts no other domain uses
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_playground.models.moe import MoE
from moe_playground.train import plots
from moe_playground.train.checkpoint import latest_checkpoint, load_checkpoint
from moe_playground.train.config import ConfigError, load_config
from moe_playground.train.data import build_corpus
from moe_playground.train.lm import TOKENIZER_FILE, LMRunConfig, build_model


class AnalysisError(ValueError):
    """The run cannot be analysed: the message says why."""


@dataclass
class Analysis:
    domains: list[str]
    layers: list[int]                    # indices of the MoE layers
    tokens_D: torch.Tensor               # tokens per domain
    probs: dict[int, torch.Tensor]       # layer -> (domains, E) mean routing probability
    picks: dict[int, torch.Tensor]       # layer -> (domains, E) share of the domain's top-k assignments
    top_k: int
    table: str                           # markdown, one table per layer
    images: dict[int, Path]


def load_run(run_dir: Path) -> tuple[LMRunConfig, torch.nn.Module]:
    """The run's config and its model with the latest checkpoint's weights, in eval mode."""
    if not (run_dir / "config.yaml").is_file():
        raise AnalysisError(f"{run_dir}: no config.yaml; give a run directory written by python -m train.lm")
    cfg = load_config(LMRunConfig, run_dir / "config.yaml")
    if cfg.model.ffn != "moe":
        raise AnalysisError(f"{run_dir}: model.ffn={cfg.model.ffn!r} has no MoE layer to analyse")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise AnalysisError(f"{run_dir}: no checkpoint yet; train the run first")
    model = build_model(cfg)
    weights, _ = load_checkpoint(ckpt)
    model.load_state_dict(weights)
    return cfg, model.eval()


@torch.no_grad()
def routing_by_domain(run_dir: Path, n_windows: int = 128) -> Analysis:
    """Mean routing probabilities and top-k picks per domain over evenly spaced validation windows."""
    cfg, model = load_run(run_dir)
    corpus = build_corpus(cfg.data, run_dir / TOKENIZER_FILE)
    moe = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}
    n_dom = len(corpus.domain_names)
    E = next(iter(moe.values())).cfg.n_pool  # the router's pool: FFN experts, then any zero-computation ones
    prob_sum = {i: torch.zeros(n_dom, E, dtype=torch.float64) for i in moe}
    pick_sum = {i: torch.zeros(n_dom, E, dtype=torch.float64) for i in moe}
    tokens_D = torch.zeros(n_dom, dtype=torch.float64)
    seen = {}

    def hook(layer: int):
        def save(module, inputs, routing):  # the Router's output: a Routing with probs_TE and idx_TK
            seen[layer] = routing
        return save

    handles = [m.router.register_forward_hook(hook(i)) for i, m in moe.items()]
    S = cfg.train.seq_len
    hi = len(corpus.val.tokens) - S - 1
    starts = torch.linspace(0, hi, n_windows).long()
    try:
        for chunk in starts.split(cfg.train.batch_size):
            idx_BS = chunk.unsqueeze(-1) + torch.arange(S)                  # (B, S) positions
            model(corpus.val.tokens[idx_BS])
            dom_T = corpus.val.domains[idx_BS].reshape(-1)                  # (B*S,), the routers' token order
            onehot_TD = torch.nn.functional.one_hot(dom_T, n_dom).double()
            tokens_D += onehot_TD.sum(0)
            for i, routing in seen.items():
                prob_sum[i] += onehot_TD.T @ routing.probs_TE.double()
                picks_TE = torch.zeros_like(routing.probs_TE, dtype=torch.float64).scatter_(1, routing.idx_TK, 1.0)
                pick_sum[i] += onehot_TD.T @ picks_TE
    finally:
        for h in handles:
            h.remove()
    present = tokens_D > 0
    probs = {i: p[present] / tokens_D[present, None] for i, p in prob_sum.items()}
    picks = {i: p[present] / p[present].sum(-1, keepdim=True) for i, p in pick_sum.items()}
    domains = [d for d, ok in zip(corpus.domain_names, present.tolist()) if ok]
    K = next(iter(moe.values())).cfg.experts_per_token
    return Analysis(domains, list(moe), tokens_D[present], probs, picks, K, "", {})


def concentration(a: Analysis, layer: int) -> list[dict]:
    """One row per domain (and one for all tokens): see the module docstring."""
    picks_DE = a.picks[layer]
    E = picks_DE.shape[1]
    w_D = a.tokens_D / a.tokens_D.sum()
    rows = []
    everyone_E = (w_D[:, None] * picks_DE).sum(0)
    for name, s_E, n in [*zip(a.domains, picks_DE, a.tokens_D.tolist()), ("all", everyone_E, a.tokens_D.sum().item())]:
        entropy = float(torch.special.entr(s_E).sum() / math.log(E))
        ranked = s_E.sort(descending=True)
        rows.append({"domain": name, "tokens": int(n), "entropy": entropy, "top_expert": int(ranked.indices[0]),
                     "top_share": float(ranked.values[0]), "topk_share": float(ranked.values[:a.top_k].sum()),
                     "tv": float(0.5 * (s_E - everyone_E).abs().sum())})
    return rows


def analyze(run_dir: str | Path, n_windows: int = 128) -> Analysis:
    """Write <run>/analysis/ (heatmaps, routing.md, routing.json) and return the numbers."""
    run_dir = Path(run_dir)
    a = routing_by_domain(run_dir, n_windows)
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    E = a.probs[a.layers[0]].shape[1]
    md, record = [], {"domains": a.domains, "tokens": a.tokens_D.tolist(), "top_k": a.top_k, "layers": {}}
    for i in a.layers:
        a.images[i] = out / f"routing_layer{i}.png"
        plots.heatmap(a.probs[i].tolist(), a.domains, "expert", a.images[i],
                      f"{run_dir.name}, layer {i}: mean routing probability by domain", "probability")
        rows = concentration(a, i)
        record["layers"][str(i)] = {"mean_prob": a.probs[i].tolist(), "pick_share": a.picks[i].tolist(), "concentration": rows}
        md += [f"Layer {i} ({E} routed experts, {a.top_k} per token; uniform routing: entropy 1, top share "
               f"{1 / E:.3f}, top-{a.top_k} share {a.top_k / E:.3f}, TV 0)", "",
               f"| domain | tokens | entropy | top expert (share) | top-{a.top_k} share | TV from all |", "|---|---|---|---|---|---|"]
        md += [f"| {r['domain']} | {r['tokens']} | {r['entropy']:.3f} | {r['top_expert']} ({r['top_share']:.3f}) | "
               f"{r['topk_share']:.3f} | {r['tv']:.3f} |" for r in rows]
        md.append("")
    a.table = "\n".join(md).strip()
    (out / "routing.md").write_text(f"# Routing by domain: {run_dir}\n\n{a.table}\n")
    (out / "routing.json").write_text(json.dumps(record, indent=1))
    return a


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory of a trained MoE model, e.g. runs/gshard")
    p.add_argument("--windows", type=int, default=128, help="validation windows to route (default 128)")
    args = p.parse_args(argv)
    try:
        if args.windows < 1:
            raise AnalysisError(f"--windows={args.windows} must be >= 1")
        a = analyze(args.run_dir, args.windows)
    except (AnalysisError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.table)
    print(f"\nwrote {args.run_dir / 'analysis'}: routing.md, routing.json, " + ", ".join(p.name for p in a.images.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
