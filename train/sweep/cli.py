"""python -m train.sweep: run a sweep file's runs, then write its results (see train/sweep/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_playground.train.checkpoint import RunDirError, clear_run_dir, mark_run_dir, run_dir_lock
from moe_playground.train.config import ConfigError
from moe_playground.train.sweep import __doc__ as DOC
from moe_playground.train.sweep.report import write_results
from moe_playground.train.sweep.runner import execute
from moe_playground.train.sweep.spec import TINY_OVERLAY, SweepError, load_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=DOC, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file, e.g. configs/ablations/deepseekmoe.yaml")
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="a sweep-file fragment (out_dir, set, seeds, jobs, analyze, notes, budget) merged over the "
                        "sweep file; may be given more than once")
    p.add_argument("--tiny", action="store_true", help=f"the same as --overlay {TINY_OVERLAY.name} (seconds per run)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once, each a process with cores/jobs threads")
    p.add_argument("--threads", type=int, default=None, help="threads to split between the jobs (default: all cores)")
    p.add_argument("--report", type=Path, default=None, help="also write the results page here, images beside it")
    p.add_argument("--collect", action="store_true", help="only (re)write tables and plots from the runs there are")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep directory's runs and results and run everything again")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    try:
        if args.jobs is not None and args.jobs < 1:
            raise SweepError(f"--jobs={args.jobs} must be >= 1")
        sweep = load_sweep(args.sweep, [*([TINY_OVERLAY] if args.tiny else []), *args.overlay])
        with run_dir_lock(sweep.dir):  # one sweep process per sweep directory; RunDirBusy for a second
            if args.overwrite:
                clear_run_dir(sweep.dir)
            mark_run_dir(sweep.dir)
            if not args.collect:
                status = execute(sweep, args.jobs or sweep.jobs, args.threads)
            results = write_results(sweep, args.report)
    except (ConfigError, RunDirError) as e:  # SweepError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((sweep.dir / "results.md").read_text())
    failed = [] if args.collect else [n for n, s in status.items() if s["status"] == "failed"]
    print(f"results: {sweep.dir / 'results.csv'}, {sweep.dir / 'results.md'}" + (f"; report: {args.report}" if args.report else ""))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in {sweep.dir / 'status.json'}); "
              "re-run the same command to retry them", file=sys.stderr)
    return 1 if failed or any(r.seeds_done == 0 for r in results) else 0
