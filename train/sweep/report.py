"""A sweep's results: per-variant tables over seeds, paired verdicts for its claims, plots, and
claims.json for the verdicts page (`python -m train.sweep.verdicts`).

Every number comes from the finished runs through the columns of `train.sweep.columns`.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_playground.train import plots
from moe_playground.train.checkpoint import atomic_write_text
from moe_playground.train.config import load_config
from moe_playground.train.lm import LMRunConfig
from moe_playground.train.sweep.columns import COLUMNS, Column, RunRecord, domain_column
from moe_playground.train.sweep.runner import finished
from moe_playground.train.sweep.spec import Sweep, as_overrides, domain_names
from moe_playground.train.sweep.stats import CONFIDENCE, overall, paired_difference

CLAIMS_FILE = "claims.json"


@dataclass
class VariantResult:
    variant: str
    seeds: int
    values: dict[str, dict[int, float]]   # column key -> seed -> value (finished seeds with a value)
    sizes: dict[str, int | None]          # params, active_params, flops_per_token
    wall_s: list[float]
    failed: str

    @property
    def seeds_done(self) -> int:
        return len(self.values["val_loss"])

    def mean_std(self, key: str) -> tuple[float, float]:
        xs = list(self.values.get(key, {}).values())
        if not xs:
            return math.nan, math.nan
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class PairVerdict:
    claim: str        # the claim in words (or its test)
    source: str
    test: str         # the whole chain, e.g. "val_loss: a < b < c"
    metric: str
    a: str
    b: str
    n: int            # seeds both finished
    mean: float       # mean of value_a - value_b
    lo: float
    hi: float
    verdict: str      # of "a < b"
    overall: str      # of the whole chain


def sweep_columns(sweep: Sweep) -> tuple[list[Column], list[Column]]:
    """The main columns and one per data domain."""
    return list(COLUMNS), [domain_column(d) for d in domain_names(sweep.first_config())]


def collect(sweep: Sweep) -> list[VariantResult]:
    status = json.loads((sweep.dir / "status.json").read_text()) if (sweep.dir / "status.json").exists() else {}
    main, domains = sweep_columns(sweep)
    out = []
    for variant in sweep.variants:
        runs = [r for r in sweep.runs() if r.variant == variant]
        done = {r.seed: RunRecord.read(r.run_dir) for r in runs if finished(r.run_dir)}
        values = {}
        for col in main + domains:
            got = {s: col.read(rec) for s, rec in done.items()}
            values[col.key] = {s: float(v) for s, v in got.items() if v is not None and math.isfinite(v)}
        first = next(iter(done.values())).summary if done else {}
        out.append(VariantResult(
            variant, len(runs), values, {k: first.get(k) for k in ("params", "active_params", "flops_per_token")},
            [rec.summary["wall_s"] for rec in done.values() if "wall_s" in rec.summary],
            "; ".join(f"{r.name}: {status.get(r.name, {}).get('error', '')}" for r in runs
                      if status.get(r.name, {}).get("status") == "failed")))
    return out


def judge(sweep: Sweep, results: list[VariantResult]) -> list[PairVerdict]:
    """Every link of every claim: the paired difference over seeds, its interval and verdict."""
    by = {r.variant: r for r in results}
    out = []
    for c in sweep.claims:
        pairs = [(a, b, paired_difference(by[a].values.get(c.metric, {}), by[b].values.get(c.metric, {})))
                 for a, b in c.pairs]
        chain = overall([p.verdict for _, _, p in pairs])
        out += [PairVerdict(c.claim or c.text, c.source, c.text, c.metric, a, b, p.n, p.mean, p.lo, p.hi, p.verdict, chain)
                for a, b, p in pairs]
    return out


def _num(x: float, digits: int) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _fmt(mean: float, std: float, digits: int) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval(v: PairVerdict, digits: int) -> str:
    return "–" if math.isnan(v.lo) else f"[{v.lo:+.{digits}f}, {v.hi:+.{digits}f}]"


def verdict_table(verdicts: list[PairVerdict], digits: int = 4) -> list[str]:
    md = ["| claim | test | n | mean a − b | 95% CI | verdict |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        md.append(f"| {v.claim} | `{v.metric}: {v.a} < {v.b}` | {v.n} | {_num(v.mean, digits)} | {_interval(v, digits)} | "
                  f"**{v.verdict}** |")
    return md


def budget_line(sweep: Sweep, results: list[VariantResult]) -> str:
    cfg = sweep.first_config()
    t = cfg.train
    tokens = t.steps * t.batch_size * t.grad_accum * t.seq_len
    walls = [w for r in results for w in r.wall_s]
    line = (f"Budget run: {len(sweep.variants)} variants × {len(sweep.seeds)} seeds ({sweep.seeds}), each "
            f"{t.steps} steps of {t.batch_size * t.grad_accum} × {t.seq_len} tokens = {tokens / 1e6:.2f}M training tokens; "
            f"validation on {cfg.data.val_tokens:,}+ fixed tokens every {cfg.log.eval_every} steps and at the end")
    if walls:
        line += f"; training wall time per run {statistics.mean(walls) / 60:.1f} min on average (sum {sum(walls) / 3600:.2f} h)"
    line += "."
    if sweep.overlays:
        line += (f" **Run under {', '.join(f'`{_rel(o)}`' for o in sweep.overlays)}**, a smaller budget than "
                 f"`{_rel(sweep.path)}` alone gives" + (f" ({sweep.budget})" if sweep.budget else "") + ".")
    elif sweep.budget:
        line += f" {sweep.budget}"
    return line


def _val_curves(sweep: Sweep) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per variant: eval steps, mean and std over seeds of validation loss (finished runs only)."""
    out = {}
    for variant in sweep.variants:
        per_seed = [{m["step"]: m["val_loss"] for m in RunRecord.read(r.run_dir).rows if "val_loss" in m}
                    for r in sweep.runs() if r.variant == variant and finished(r.run_dir)]
        if per_seed:
            steps = sorted(set.intersection(*(set(s) for s in per_seed)))
            stats = [(statistics.mean(s[t] for s in per_seed), statistics.pstdev(s[t] for s in per_seed) if len(per_seed) > 1
                      else 0.0) for t in steps]
            out[variant] = (steps, [m for m, _ in stats], [sd for _, sd in stats])
    return out


def command(sweep: Sweep, report: Path | None) -> str:
    flags = "".join(f" --overlay {_rel(o)}" for o in sweep.overlays) + (f" --report {_rel(report)}" if report else "")
    return f"python -m train.sweep {_rel(sweep.path)}{flags}"


def write_results(sweep: Sweep, report: Path | None = None) -> list[VariantResult]:
    """results.csv, results.md, claims.json and plots in the sweep directory; with `report`, the same
    page with its images and claims.json copied next to it (<report dir>/<sweep name>/) for committing."""
    results = collect(sweep)
    verdicts = judge(sweep, results)
    main, domains = sweep_columns(sweep)
    d = sweep.dir
    d.mkdir(parents=True, exist_ok=True)
    cols = ["variant", "seeds_done", "seeds", *(f"{c.key}_{s}" for c in main + domains for s in ("mean", "std")),
            "val_loss_per_seed", "params", "active_params", "flops_per_token", "overrides", "failed"]
    with (d / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in results:
            row: dict[str, Any] = {"variant": r.variant, "seeds_done": r.seeds_done, "seeds": r.seeds, **r.sizes,
                                   "val_loss_per_seed": json.dumps(r.values["val_loss"]),
                                   "overrides": " ".join(as_overrides(sweep.variants[r.variant])), "failed": r.failed}
            for c in main + domains:
                row[f"{c.key}_mean"], row[f"{c.key}_std"] = r.mean_std(c.key)
            w.writerow(row)
    claims = {"sweep": sweep.name, "command": command(sweep, report), "budget": budget_line(sweep, results),
              "seeds": sweep.seeds, "confidence": CONFIDENCE, "verdicts": [asdict(v) for v in verdicts]}
    atomic_write_text(d / CLAIMS_FILE, json.dumps(claims, indent=1))

    images = []
    curves = _val_curves(sweep)
    if curves:
        plots.band_curves(curves, d / "val_loss.png", f"{sweep.name}: validation loss (mean ± std over seeds)",
                          "validation loss (nats/token)")
        images.append(("Validation loss during training (band: ± std over seeds)", "val_loss.png"))
    shown = [v for v in verdicts if not math.isnan(v.lo)]
    if shown:
        plots.intervals([f"{v.metric}: {v.a} < {v.b}" for v in shown], [v.mean for v in shown], [v.lo for v in shown],
                        [v.hi for v in shown], d / "paired_differences.png",
                        f"{sweep.name}: paired differences a − b ({CONFIDENCE:.0%} CI over seeds)", "a − b (below 0: the claim holds)")
        images.append((f"Each claim's paired difference a − b with its {CONFIDENCE:.0%} confidence interval (left of 0: "
                       "the claim holds)", "paired_differences.png"))
    for r in results:  # the training-time expert load of each MoE variant's first finished seed
        src = next((run.run_dir / "expert_load.png" for run in sweep.runs() if run.variant == r.variant
                    and finished(run.run_dir) and (run.run_dir / "expert_load.png").exists()), None)
        if src:
            shutil.copyfile(src, d / f"expert_load_{r.variant}.png")
            images.append((f"Expert load, {r.variant} ({src.parent.name}): share of routed tokens per expert over training",
                           f"expert_load_{r.variant}.png"))
    specialization = _specialization(sweep) if sweep.analyze else []
    images += [(caption, name) for caption, name, _ in specialization]

    md = [f"# Ablation: {sweep.name}", ""]
    if sweep.description:
        md += [sweep.description, ""]
    md += [f"Produced by `{command(sweep, report)}` (trainer config `{_rel(sweep.config)}` with "
           f"{' '.join(as_overrides(sweep.common)) or 'no common overrides'}).", "", budget_line(sweep, results), ""]
    if verdicts:
        undecided = [v for v in verdicts if v.verdict == "undecided"]
        md += ["## Verdicts", "",
               f"Each claim `a < b` is judged on the paired difference a − b over the seeds both finished (a seed fixes the "
               f"data order for every variant): its mean and {CONFIDENCE:.0%} confidence interval (t distribution over "
               "seeds). **holds**: the interval lies below 0; **reversed**: above 0; **undecided**: it contains 0. "
               "Nothing is tuned per variant.", "", *verdict_table(verdicts), ""]
        md.append(f"{len(verdicts) - len(undecided)} of {len(verdicts)} comparisons are decided at this budget"
                  + (f"; undecided: {', '.join(f'`{v.a} < {v.b}` ({v.metric})' for v in undecided)}." if undecided else "."))
        md.append("")
    md += ["## Results", "", "| variant | seeds | " + " | ".join(c.header for c in main) + " | params | active params | FLOPs/token |",
           "|---|---|" + "---|" * (len(main) + 3)]
    for r in results:
        md.append(f"| {r.variant} | {r.seeds_done}/{r.seeds} | " + " | ".join(_fmt(*r.mean_std(c.key), c.digits) for c in main)
                  + f" | {_count(r.sizes['params'])} | {_count(r.sizes['active_params'])} | {_count(r.sizes['flops_per_token'])} |")
    md += ["", "Mean ± standard deviation over seeds; – where a variant has no such metric (no MoE layer). "
           + " ".join(f"{c.header}: {c.doc}." for c in main), ""]
    if domains:
        md += ["Final validation loss by domain (nats/token over the domain's tokens; weighted by their token counts "
               "they average to val loss):", "", "| variant | " + " | ".join(c.header for c in domains) + " |",
               "|---|" + "---|" * len(domains),
               *(f"| {r.variant} | " + " | ".join(_fmt(*r.mean_std(c.key), c.digits) for c in domains) + " |" for r in results),
               ""]
    md += ["Final validation loss of each seed:", "", f"| variant | {' | '.join(f'seed {s}' for s in sweep.seeds)} |",
           f"|---|{'---|' * len(sweep.seeds)}",
           *(f"| {r.variant} | " + " | ".join(_num(r.values['val_loss'].get(s, math.nan), 4) for s in sweep.seeds) + " |"
             for r in results), ""]
    if sweep.notes:
        md += ["## Notes", "", sweep.notes, ""]
    md += ["## Variants", "", *(f"- `{v}`: `{' '.join(as_overrides(ov)) or '(the common config)'}`"
                                for v, ov in sweep.variants.items()), ""]
    failed = [r for r in results if r.failed]
    if failed:
        md += ["## Failed runs", "", *(f"- {r.failed}" for r in failed), ""]
    if specialization:
        md += ["## Expert specialization (routing by corpus domain)", ""]
        for _, _, table in specialization:
            md += [table, ""]
    if images:
        md += ["## Plots", "", *(f"{caption}:\n\n![{name}]({{img}}/{name})\n" for caption, name in images)]
    text = "\n".join(md)
    atomic_write_text(d / "results.md", text.replace("{img}/", ""))
    if report is not None:
        img_dir = report.parent / sweep.name
        img_dir.mkdir(parents=True, exist_ok=True)
        for name in [n for _, n in images] + [CLAIMS_FILE]:
            shutil.copyfile(d / name, img_dir / name)
        atomic_write_text(report, text.replace("{img}", sweep.name))
    return results


def _specialization(sweep: Sweep) -> list[tuple[str, str, str]]:
    """Routing-by-domain analysis of each MoE variant's first finished run: (caption, image, table)."""
    from moe_playground.train.analyze import analyze  # imported here: it loads models, which the plain runner never needs

    out = []
    for variant in sweep.variants:
        run = next((r for r in sweep.runs() if r.variant == variant and finished(r.run_dir)), None)
        if run is None or load_config(LMRunConfig, run.run_dir / "config.yaml").model.ffn != "moe":
            continue
        result = analyze(run.run_dir)
        last = max(result.layers)
        name = f"routing_{variant}.png"
        shutil.copyfile(result.images[last], sweep.dir / name)
        out.append((f"Mean routing probability by domain, {variant} ({run.name}), layer {last}", name,
                    f"**{variant}** ({run.name})\n\n{result.table}"))
    return out


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
