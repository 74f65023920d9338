"""Several runs' curves on one figure.

    python -m train.curves runs/dense runs/gshard [runs/...] [--metric val_loss] [--x step|tokens] [--out curves.png]

Any metric of metrics.jsonl (val_loss, train_loss, lr, tokens_per_s, layer0/max_vio, ...); each run is labelled by
its folder name. An existing --out is kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_playground.train import plots


def curves(run_dirs: list[Path], metric: str, x: str) -> dict[str, tuple[list, list[float], list[float]]]:
    """{run name: (x values, metric values, zeros)} for plots.band_curves; ValueError naming a run without the metric."""
    out = {}
    for run in run_dirs:
        rows = plots.read_metrics(run / "metrics.jsonl")
        if not rows:
            raise ValueError(f"{run}: no metrics.jsonl rows (is it a run directory of python -m train.lm?)")
        points = [(r[x], r[metric]) for r in rows if metric in r]
        if not points:
            keys = sorted({k for r in rows for k in r} - {"step", "tokens"})
            raise ValueError(f"{run}: no {metric!r} in its metrics; it has {', '.join(keys)}")
        out[run.name if run.name not in out else str(run)] = ([p[0] for p in points], [p[1] for p in points],
                                                              [0.0] * len(points))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.curves", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--metric", default="val_loss")
    p.add_argument("--x", choices=("step", "tokens"), default="step")
    p.add_argument("--out", type=Path, default=Path("curves.png"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    try:
        data = curves(args.runs, args.metric, args.x)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plots.band_curves(data, args.out, f"{args.metric} of {len(data)} runs", args.metric, xlabel=args.x)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
