"""Running a sweep: every unfinished run in its own trainer process, `jobs` at a time.

Each run is its own trainer run directory <out_dir>/<name>/<variant>-s<seed>/, trained by
`python -m train.lm` in a subprocess, so a crash stays in its run and `jobs` run at once, each
with cores/jobs threads. Re-running skips finished runs (DONE marker and metrics that are one
increasing sequence of steps), resumes killed ones from their last checkpoint and retries failed
ones. On Linux the trainers die with the sweep however it ends.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from moe_playground.train import plots
from moe_playground.train.checkpoint import DONE_MARKER, atomic_write_text, latest_checkpoint
from moe_playground.train.config import ConfigError, load_config
from moe_playground.train.lm import LMRunConfig, config_changes
from moe_playground.train.sweep.columns import RunRecord
from moe_playground.train.sweep.spec import Run, Sweep, SweepError


def finished(run_dir: Path) -> bool:
    """The run finished (DONE marker) and its metrics are one increasing sequence of steps, as one
    trainer writes them: a run that two trainers wrote at once never counts."""
    try:
        steps = [m["step"] for m in plots.read_metrics(run_dir / "metrics.jsonl")]
    except (ValueError, KeyError):  # a line torn by two writers
        return False
    return (run_dir / DONE_MARKER).exists() and bool(steps) and all(a < b for a, b in zip(steps, steps[1:]))


def run_state(run: Run, sweep: Sweep) -> str:
    """'done', 'broken' (finished, metrics not one sequence of steps), 'resume' (has a checkpoint),
    'restart' (started, no checkpoint) or 'new'.

    A run directory left by a different config is refused rather than silently reused.
    """
    cfg_file = run.run_dir / "config.yaml"
    if cfg_file.exists():
        try:
            changed = config_changes(load_config(LMRunConfig, cfg_file), load_config(LMRunConfig, sweep.config, run.overrides))
        except ConfigError:
            changed = {"config.yaml": "does not load"}
        if changed:
            raise SweepError(f"{run.run_dir} was trained with a different config than {sweep.path} now gives "
                             f"({', '.join(changed)}); pass --overwrite to start the sweep again, or give the sweep another name")
    if (run.run_dir / DONE_MARKER).exists():
        return "done" if finished(run.run_dir) else "broken"
    if latest_checkpoint(run.run_dir) is not None:
        return "resume"
    return "restart" if run.run_dir.exists() else "new"


BROKEN = ("finished, but its metrics.jsonl is not one increasing sequence of steps (two trainers wrote it at once?), "
          "so it does not count; move its run directory away to run it again")


def _die_with_sweep() -> Callable[[], None] | None:
    """Popen's preexec_fn on Linux: the trainer gets SIGTERM when the sweep dies, even by kill -9, so no
    trainer outlives its sweep. (Elsewhere the run directory's lock still keeps a re-run off a live trainer.)"""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork; the child only calls it
    parent, pr_set_pdeathsig = os.getpid(), 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def _command(run: Run, sweep: Sweep, state: str, threads: int) -> list[str]:
    flag = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(state, [])
    return [sys.executable, "-m", "moe_playground.train.lm", str(sweep.config), *run.overrides,
            f"train.threads={threads}", "log.progress=false", *flag]


def _error_of(log: Path) -> str:
    """The trainer's 'error: ...' line, else the last line of its output (a traceback's last line)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][len("error: "):] if errors else lines[-1] if lines else "no output").strip()


def execute(sweep: Sweep, jobs: int, threads_total: int | None = None) -> dict[str, dict]:
    """Run every unfinished run, `jobs` at a time; returns {run name: status record}.

    Records go to <sweep dir>/status.json as runs end, logs to <sweep dir>/logs/<run>.log.
    """
    runs = sweep.runs()
    states = {r.name: run_state(r, sweep) for r in runs}
    sweep.dir.mkdir(parents=True, exist_ok=True)
    (sweep.dir / "logs").mkdir(exist_ok=True)
    status_file = sweep.dir / "status.json"
    status = {r.name: {"variant": r.variant, "seed": r.seed, "status": {"done": "done", "broken": "failed"}.get(states[r.name], "pending")}
              for r in runs}
    for r in runs:
        if states[r.name] == "broken":
            status[r.name]["error"] = BROKEN
            print(f"FAILED {r.name}: {BROKEN}", file=sys.stderr)
    todo = [r for r in runs if status[r.name]["status"] == "pending"]
    threads = max(1, (threads_total or os.cpu_count() or 1) // jobs)
    print(f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.variants)} variants x {len(sweep.seeds)} seeds), "
          f"{sum(st == 'done' for st in states.values())} already done, {len(todo)} to run, {jobs} at a time with {threads} thread(s) each; "
          f"directory {sweep.dir}", flush=True)
    atomic_write_text(status_file, json.dumps(status, indent=1))

    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    durations: list[float] = []
    # a live bar on a terminal; in a log file (nohup) only the plain lines below
    bar = tqdm(total=len(todo), desc=sweep.name, unit="run", disable=None, dynamic_ncols=True)
    t0, last_line = time.perf_counter(), time.perf_counter()

    def progress() -> str:
        left = len(queue) + len(running)
        eta = statistics.mean(durations) * math.ceil(left / jobs) if durations else None
        return (f"[{_clock(time.perf_counter() - t0)}] {len(durations)}/{len(todo)} ended; running: "
                f"{', '.join(running) or '-'}; time left ~{_clock(eta) if eta is not None else '?'}")

    queue, die_with_sweep = list(todo), _die_with_sweep()
    while queue or running:
        while queue and len(running) < jobs:
            r = queue.pop(0)
            state = states[r.name]
            log = (sweep.dir / "logs" / f"{r.name}.log").open("a")
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {' '.join(_command(r, sweep, state, threads))}\n")
            log.flush()
            proc = subprocess.Popen(_command(r, sweep, state, threads), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_sweep)
            running[r.name] = (proc, time.perf_counter(), log)
            status[r.name].update(status="running", action=state)
            bar.write(f"start {r.name} ({state})")
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            took = time.perf_counter() - start
            durations.append(took)
            summary = RunRecord.read(sweep.dir / name).summary
            if proc.returncode == 0 and summary.get("finished") and finished(sweep.dir / name):
                status[name].update(status="done", seconds=round(took, 1))
                bar.write(f"done  {name} in {took:.0f}s: val loss {summary.get('final_val_loss')}")
            else:
                err = _error_of(sweep.dir / "logs" / f"{name}.log") if proc.returncode else BROKEN
                status[name].update(status="failed", seconds=round(took, 1), returncode=proc.returncode, error=err)
                bar.write(f"FAILED {name} (exit {proc.returncode}): {err}")
            atomic_write_text(status_file, json.dumps(status, indent=1))
            bar.update(1)
            bar.write(progress())
            last_line = time.perf_counter()
        if running and time.perf_counter() - last_line > 60:
            bar.write(progress())
            last_line = time.perf_counter()
        bar.set_postfix_str(", ".join(running), refresh=False)
        time.sleep(0.5)
    bar.close()
    atomic_write_text(status_file, json.dumps(status, indent=1))
    return status



def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
