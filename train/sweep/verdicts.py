"""python -m train.sweep.verdicts: one page of every claim the shipped sweeps test, with its source,
our verdict, the interval and a link to the sweep's page (docs/results/README.md).

The page is built from committed files only: the sweep files in configs/ablations/ (the claims)
and the claims.json each results page keeps beside it (docs/results/<sweep>/claims.json, written
by `python -m train.sweep <file> --report docs/results/<sweep>.md`). A claim whose sweep has no
claims.json yet, or whose test changed since, is listed as not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from moe_playground.train.checkpoint import atomic_write_text
from moe_playground.train.config import ConfigError
from moe_playground.train.sweep.report import CLAIMS_FILE
from moe_playground.train.sweep.spec import Sweep, load_sweep, read_sweep_file
from moe_playground.train.sweep.stats import HOLDS, REVERSED, UNDECIDED

ROOT = Path(__file__).resolve().parents[2]
NOT_MEASURED = "not measured"


def shipped_sweeps(folder: Path) -> list[Sweep]:
    """The sweep files in `folder` that define variants (inherited-only files and overlays skipped)."""
    return [load_sweep(f) for f in sorted(folder.glob("*.yaml")) if {"variants", "grid"} & set(read_sweep_file(f))]


def _row(claim: str, source: str, test: str, verdict: str, interval: str, seeds: str, page: str) -> str:
    return f"| {claim} | {source} | `{test}` | **{verdict}** | {interval} | {seeds} | {page} |"


def build_page(sweeps_dir: Path, results_dir: Path) -> str:
    rows, budgets, counts = [], [], {HOLDS: 0, REVERSED: 0, UNDECIDED: 0, NOT_MEASURED: 0}
    for sweep in shipped_sweeps(sweeps_dir):
        page = f"[{sweep.name}]({sweep.name}.md)" if (results_dir / f"{sweep.name}.md").exists() else "–"
        f = results_dir / sweep.name / CLAIMS_FILE
        measured = json.loads(f.read_text()) if f.exists() else {"verdicts": []}
        by_test = {(v["test"], v["a"], v["b"]): v for v in measured["verdicts"]}
        if measured["verdicts"]:
            budgets.append(f"- **{sweep.name}**: {measured['budget']} Command: `{measured['command']}`.")
        else:
            budgets.append(f"- **{sweep.name}**: not yet run with paired seeds and the fixed validation set"
                           + (f"; {page} predates them (mean ± std only)." if page != "–" else "."))
        for c in sweep.claims:
            for a, b in c.pairs:
                v = by_test.get((c.text, a, b))
                test = f"{c.metric}: {a} < {b}"
                if v is None or v["n"] == 0:  # no sweep run, or no finished seed of one of the two
                    counts[NOT_MEASURED] += 1
                    rows.append(_row(c.claim or c.text, c.source or "–", test, NOT_MEASURED, "–", "–", page))
                    continue
                counts[v["verdict"]] += 1
                interval = "–" if v["lo"] is None or math.isnan(v["lo"]) else \
                    f"{v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]"
                rows.append(_row(c.claim or c.text, c.source or "–", test, v["verdict"], interval, str(v["n"]), page))
    md = ["# Verdicts of the ablations", "",
          "Every claim the shipped sweeps (`configs/ablations/`) test, with where it comes from and what our runs say. "
          "A claim `a < b` is judged on the paired difference a − b of the metric over seeds (each seed fixes the data "
          "order for every variant): mean and 95% confidence interval (t distribution over seeds). **holds**: the "
          "interval lies below 0; **reversed**: above 0, the claim is contradicted at this scale; **undecided**: it "
          "contains 0, the runs cannot tell. A chain `a < b < c` is judged link by link.", "",
          "Regenerate with `python -m train.sweep.verdicts` (from the committed claims.json of each page).", "",
          f"Totals: {counts[HOLDS]} hold, {counts[REVERSED]} reversed, {counts[UNDECIDED]} undecided, "
          f"{counts[NOT_MEASURED]} not measured.", "",
          "| claim | source | test | verdict | mean a − b [95% CI] | seeds | page |", "|---|---|---|---|---|---|---|",
          *rows, "", "## Budgets", "", *budgets, ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep.verdicts", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweeps", type=Path, default=ROOT / "configs" / "ablations", help="folder of sweep files")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="folder of results pages")
    args = p.parse_args(argv)
    try:
        text = build_page(args.sweeps, args.results)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.results / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
