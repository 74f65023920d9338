"""Run an ablation from a sweep file: a trainer config, a grid or named variants, times seeds.

    python -m train.sweep configs/ablations/<name>.yaml [--jobs N] [--report docs/results/<name>.md]
    python -m train.sweep configs/ablations/<name>.yaml --collect      # tables and plots only

A sweep file (YAML):

    config: ../lm/base.yaml      # the trainer config every run starts from (relative to this file)
    inherit: common.yaml         # optional: another sweep file whose keys this one starts from
    set: {train.steps: 300}      # overrides for every run (merged over the inherited ones)
    variants:                    # named variants, each a mapping of overrides ...
      dense: {model.ffn: dense}
    grid:                        # ... or a grid: the cross product of override lists
      moe.top_k: [1, 2]
    seeds: [0, 1, 2]             # every variant runs once per seed (train.seed)

Each run is its own trainer run directory <out_dir>/<name>/<variant>-s<seed>/, trained by
`python -m train.lm` in a subprocess, so a crash stays in its run and `--jobs N` runs N at
once, each with cores/N threads. Re-running the command skips finished runs (DONE marker and
metrics that are one increasing sequence of steps), resumes killed ones from their last checkpoint
and retries failed ones. The sweep directory is locked while a sweep runs in it, and on Linux the
trainers die with the sweep however it ends. Every run's config
is validated before the first one starts. When the runs are done the sweep directory gets
results.csv, results.md and PNG plots (see `collect`).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import OmegaConf
from tqdm import tqdm

from moe_playground.train import plots
from moe_playground.train.checkpoint import (DONE_MARKER, RunDirError, atomic_write_text, check_run_name, clear_run_dir, latest_checkpoint,
                              mark_run_dir, run_dir_lock)
from moe_playground.train.config import ConfigError, load_config, read_yaml_mapping
from moe_playground.train.lm import LMRunConfig, config_changes

SWEEP_KEYS = {
    "name": "sweep name (default: the file name)",
    "description": "a paragraph for the top of results.md",
    "config": "trainer config file, relative to the sweep file",
    "inherit": "another sweep file whose keys this one starts from",
    "out_dir": "where sweep directories go (default: runs/sweeps)",
    "set": "overrides for every run, a mapping of key.sub: value",
    "grid": "a mapping of key.sub: [values]; runs take the cross product",
    "variants": "a mapping of variant name: {key.sub: value}",
    "seeds": "list of integer seeds (train.seed)",
    "jobs": "runs at once (default 1; --jobs overrides)",
    "analyze": "true: routing-by-domain analysis of each MoE variant's first seed",
    "expect": "claims to check, e.g. 'val_loss: a < b < c' (a has the lowest value)",
    "notes": "observations by whoever ran the sweep, printed under the claims",
}
METRICS = ("val_loss", "max_vio", "drop_fraction", "tokens_per_s")  # names `expect` may use
TAIL = 0.2  # layer metrics are averaged over the logged steps of the last 20% of training


class SweepError(ConfigError):
    """Bad sweep file: the message names the problem and what is allowed."""


# ---- the sweep file ------------------------------------------------------------------------


@dataclass
class Run:
    variant: str
    seed: int
    overrides: list[str]      # key=value for load_config / the trainer command line
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Sweep:
    name: str
    path: Path
    config: Path
    out_dir: Path
    variants: dict[str, dict[str, Any]]   # variant -> its overrides (on top of `common`)
    common: dict[str, Any]
    seeds: list[int]
    jobs: int = 1
    analyze: bool = False
    description: str = ""
    expect: list[str] = field(default_factory=list)
    notes: str = ""

    @property
    def dir(self) -> Path:
        return self.out_dir / self.name

    def runs(self) -> list[Run]:
        return [Run(v, s, [*as_overrides(self.common), *as_overrides(ov), f"train.seed={s}",
                           f"out_dir={self.dir}", f"run_name={v}-s{s}"], self.dir / f"{v}-s{s}")
                for v, ov in self.variants.items() for s in self.seeds]


def _text(v: Any) -> str:
    """A YAML value as OmegaConf's dotlist parses it back (a string YAML would read otherwise, e.g.
    "{out_dir}/x", quoted)."""
    if isinstance(v, str):
        try:
            plain = yaml.safe_load(v) == v
        except yaml.YAMLError:
            plain = False
        return v if plain else json.dumps(v)
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def as_overrides(mapping: dict[str, Any]) -> list[str]:
    """{key.sub: value} -> ['key.sub=value'], for load_config and the trainer's command line."""
    return [f"{k}={_text(v)}" for k, v in mapping.items()]


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sweep file's keys, merged over the file it inherits from (`set` merged key by key)."""
    path = path.resolve()
    raw = OmegaConf.to_container(read_yaml_mapping(path, seen, kind="sweep"), resolve=False)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        allowed = "\n".join(f"  {k}: {v}" for k, v in SWEEP_KEYS.items())
        raise SweepError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}. Allowed:\n{allowed}")
    if "config" in raw:  # relative to the file that names it
        raw["config"] = str((path.parent / str(raw["config"])).resolve())
    if "inherit" not in raw:
        return raw
    parent = _read(path.parent / str(raw.pop("inherit")), seen + (path,))
    if "grid" in raw or "variants" in raw:  # a child picks its own way of making variants
        parent.pop("grid", None)
        parent.pop("variants", None)
    merged_set = {**(parent.get("set") or {}), **(raw.get("set") or {})}
    return {**parent, **raw, "set": merged_set}


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SweepError(f"{path}: {what} must be a mapping of key.sub: value, got {value!r}")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file, then validate every run's config with the trainer's schema."""
    path = Path(path)
    raw = _read(path)
    if "config" not in raw:
        raise SweepError(f"{path}: missing 'config' (the trainer config every run starts from)")
    if ("grid" in raw) == ("variants" in raw):
        raise SweepError(f"{path}: give exactly one of 'grid' (cross product of override lists) "
                         "or 'variants' (named override mappings)")
    if "grid" in raw:
        grid = _mapping(raw["grid"], "grid", path)
        if not grid:
            raise SweepError(f"{path}: the grid is empty; give at least one key.sub: [values]")
        for k, vs in grid.items():
            if not isinstance(vs, list) or not vs:
                raise SweepError(f"{path}: grid.{k} must be a non-empty list of values, got {vs!r}")
            if len({_text(v) for v in vs}) != len(vs):
                raise SweepError(f"{path}: grid.{k} lists a value twice: {vs!r}")
        # a grid point is named by its values: "score_func=softmax,granularity=2"
        variants = {",".join(f"{k.split('.')[-1]}={_text(v)}" for k, v in zip(grid, combo)): dict(zip(grid, combo))
                    for combo in itertools.product(*grid.values())}
    else:
        variants = _mapping(raw["variants"], "variants", path)
        if not variants:
            raise SweepError(f"{path}: 'variants' is empty; name at least one")
        for v, ov in variants.items():
            if not str(v) or "/" in str(v) or " " in str(v):
                raise SweepError(f"{path}: variant name {v!r} must be non-empty, without '/' or spaces")
            _mapping(ov if ov is not None else {}, f"variants.{v}", path)
        variants = {str(v): ov or {} for v, ov in variants.items()}
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    jobs = raw.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"{path}: jobs must be an integer >= 1, got {jobs!r}")
    expect = raw.get("expect") or []
    for claim in expect:
        _parse_claim(claim, variants, path)
    name = str(raw.get("name") or path.stem)
    try:
        check_run_name(name, "name")
    except ValueError as e:
        raise SweepError(f"{path}: {e}") from None
    sweep = Sweep(name=name, path=path, config=Path(raw["config"]),
                  out_dir=Path(raw.get("out_dir", "runs/sweeps")), variants=variants,
                  common=_mapping(raw.get("set") or {}, "set", path), seeds=seeds, jobs=jobs,
                  analyze=bool(raw.get("analyze", False)), description=str(raw.get("description", "")).strip(),
                  expect=list(expect), notes=str(raw.get("notes", "")).strip())
    for run in sweep.runs():  # every variant's config, before the first run starts (seeds are plain ints)
        if run.seed != seeds[0]:
            continue
        try:
            load_config(LMRunConfig, sweep.config, run.overrides)
        except ConfigError as e:
            raise SweepError(f"{path}: run {run.name}: {e}") from None
    return sweep


def _parse_claim(claim: Any, variants: dict[str, Any], path: Path) -> tuple[str, list[str]]:
    """'val_loss: a < b < c' -> ('val_loss', [a, b, c])."""
    metric, sep, order = str(claim).partition(":")
    names = [n.strip() for n in order.split("<")]
    if not sep or metric.strip() not in METRICS or len(names) < 2 or not all(n in variants for n in names):
        raise SweepError(f"{path}: expect entry {claim!r} must look like 'metric: a < b' with metric one of "
                         f"{', '.join(METRICS)} and a, b variants of this sweep ({', '.join(variants)})")
    return metric.strip(), names


# ---- running --------------------------------------------------------------------------------


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
            summary = _summary(sweep.dir / name)
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


def _summary(run_dir: Path) -> dict:
    f = run_dir / "summary.json"
    return json.loads(f.read_text()) if f.exists() else {}


# ---- results --------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def layer_metric(rows: list[dict], name: str) -> float | None:
    """`layer{i}/<name>` averaged over MoE layers and the logged rows of the last TAIL of training."""
    rows = [r for r in rows if any(k.endswith(f"/{name}") for k in r)]
    if not rows:
        return None
    last = rows[-1]["step"]
    tail = [r for r in rows if r["step"] >= (1 - TAIL) * last]
    return statistics.mean(v for r in tail for k, v in r.items() if k.endswith(f"/{name}"))


def collect(sweep: Sweep) -> list[dict]:
    """One row per variant: mean and std over finished seeds, sizes, FLOPs/token, tokens/s."""
    rows = []
    status = json.loads((sweep.dir / "status.json").read_text()) if (sweep.dir / "status.json").exists() else {}
    for variant in sweep.variants:
        runs = [r for r in sweep.runs() if r.variant == variant]
        done = [r for r in runs if finished(r.run_dir)]
        summaries = [_summary(r.run_dir) for r in done]
        metrics = [plots.read_metrics(r.run_dir / "metrics.jsonl") for r in done]
        row: dict[str, Any] = {"variant": variant, "seeds_done": len(done), "seeds": len(runs),
                               "val_loss_per_seed": {r.seed: s.get("final_val_loss") for r, s in zip(done, summaries)}}
        for key, values in (("val_loss", [s.get("final_val_loss") for s in summaries]),
                            ("max_vio", [layer_metric(m, "max_vio") for m in metrics]),
                            ("drop_fraction", [layer_metric(m, "drop_fraction") for m in metrics]),
                            ("tokens_per_s", [s.get("tokens_per_s") for s in summaries])):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        first = summaries[0] if summaries else {}
        row.update(params=first.get("params"), active_params=first.get("active_params"),
                   flops_per_token=first.get("flops_per_token"),
                   overrides=" ".join(as_overrides(sweep.variants[variant])),
                   failed="; ".join(f"{r.name}: {status.get(r.name, {}).get('error', '')}" for r in runs
                                    if status.get(r.name, {}).get("status") == "failed"))
        rows.append(row)
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _val_curves(sweep: Sweep) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per variant: eval steps, mean and std over seeds of validation loss (finished runs only)."""
    out = {}
    for variant in sweep.variants:
        per_seed = []
        for r in sweep.runs():
            if r.variant == variant and finished(r.run_dir):
                per_seed.append({m["step"]: m["val_loss"] for m in plots.read_metrics(r.run_dir / "metrics.jsonl")
                                 if "val_loss" in m})
        if per_seed:
            steps = sorted(set.intersection(*(set(s) for s in per_seed)))
            stats = [_mean_std([s[t] for s in per_seed]) for t in steps]
            out[variant] = (steps, [m for m, _ in stats], [sd for _, sd in stats])
    return out


def check_claims(sweep: Sweep, rows: list[dict]) -> list[str]:
    """Each `expect` claim, pair by pair: holds or not, and whether the gap exceeds the seed spread."""
    by = {r["variant"]: r for r in rows}
    lines = []
    for claim in sweep.expect:
        metric, names = _parse_claim(claim, sweep.variants, sweep.path)
        verdicts, all_hold = [], True
        for a, b in zip(names, names[1:]):
            (ma, sa), (mb, sb) = (by[a][f"{metric}_mean"], by[a][f"{metric}_std"]), (by[b][f"{metric}_mean"], by[b][f"{metric}_std"])
            if math.isnan(ma) or math.isnan(mb):
                verdicts.append(f"{a} vs {b}: no finished runs to compare")
                all_hold = False
                continue
            gap, noise = mb - ma, math.hypot(sa, sb)
            holds = gap > 0
            all_hold &= holds
            size = "larger than" if abs(gap) > noise else "within"
            verdicts.append(f"{a} {'<' if holds else '≥'} {b} ({ma:.4g} vs {mb:.4g}; gap {gap:+.3g}, {size} the seed spread {noise:.2g})")
        lines.append(f"- Claim `{claim}`: **{'holds' if all_hold else 'does not hold'}** at this scale. " + "; ".join(verdicts) + ".")
    return lines


def write_results(sweep: Sweep, report: Path | None = None) -> list[dict]:
    """results.csv, results.md and plots in the sweep directory; with `report`, the same page
    with its images copied next to it (<report dir>/<sweep name>/) for committing."""
    rows = collect(sweep)
    d = sweep.dir
    d.mkdir(parents=True, exist_ok=True)
    cols = ["variant", "seeds_done", "seeds", *(f"{k}_{s}" for k in METRICS for s in ("mean", "std")),
            "val_loss_per_seed", "params", "active_params", "flops_per_token", "overrides", "failed"]
    with (d / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({**r, "val_loss_per_seed": json.dumps(r["val_loss_per_seed"])} for r in rows)

    images = []
    curves = _val_curves(sweep)
    if curves:
        plots.band_curves(curves, d / "val_loss.png", f"{sweep.name}: validation loss (mean ± std over seeds)",
                          "validation loss (nats/token)")
        images.append(("Validation loss during training (band: ± std over seeds)", "val_loss.png"))
        ok = [r for r in rows if r["seeds_done"]]
        plots.bar_chart([r["variant"] for r in ok], [r["val_loss_mean"] for r in ok], [r["val_loss_std"] for r in ok],
                        d / "final_val_loss.png", f"{sweep.name}: final validation loss", "validation loss (nats/token)")
        images.append(("Final validation loss (error bar: std over seeds)", "final_val_loss.png"))
    for r in rows:  # the training-time expert load of each MoE variant's first finished seed
        src = next((run.run_dir / "expert_load.png" for run in sweep.runs() if run.variant == r["variant"]
                    and finished(run.run_dir) and (run.run_dir / "expert_load.png").exists()), None)
        if src:
            shutil.copyfile(src, d / f"expert_load_{r['variant']}.png")
            images.append((f"Expert load, {r['variant']} ({src.parent.name}): share of routed tokens per expert over training",
                           f"expert_load_{r['variant']}.png"))
    specialization = _specialization(sweep) if sweep.analyze else []
    images += [(caption, name) for caption, name, _ in specialization]

    md = [f"# Ablation: {sweep.name}", ""]
    if sweep.description:
        md += [sweep.description, ""]
    md += [f"Produced by `python -m train.sweep {_rel(sweep.path)}` ({len(sweep.seeds)} seeds: {sweep.seeds}; "
           f"trainer config `{_rel(sweep.config)}` with {' '.join(as_overrides(sweep.common)) or 'no common overrides'}).",
           "", "| variant | seeds | val loss | MaxVio | drop fraction | params | active params | FLOPs/token | tokens/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['seeds_done']}/{r['seeds']} | {_fmt(r['val_loss_mean'], r['val_loss_std'], 4)} | "
                  f"{_fmt(r['max_vio_mean'], r['max_vio_std'], 3)} | {_fmt(r['drop_fraction_mean'], r['drop_fraction_std'], 4)} | "
                  f"{_count(r['params'])} | {_count(r['active_params'])} | {_count(r['flops_per_token'])} | "
                  f"{_fmt(r['tokens_per_s_mean'], r['tokens_per_s_std'], 0)} |")
    md += ["", "Mean ± standard deviation over seeds. Val loss: final validation loss (nats/token). MaxVio "
           "((max expert load − mean load) / mean load, per batch) and drop fraction (share of token-expert "
           f"assignments dropped by capacity) are averaged over MoE layers and the logged steps of the last "
           f"{TAIL:.0%} of training; – where the variant has no MoE layer. Tokens/s is each run's training tokens over "
           "its training wall time, on a shared 2-core CPU, so it is noisy.", ""]
    md += ["Final validation loss of each seed:", "", f"| variant | {' | '.join(f'seed {s}' for s in sweep.seeds)} |",
           f"|---|{'---|' * len(sweep.seeds)}",
           *(f"| {r['variant']} | " + " | ".join(f"{r['val_loss_per_seed'][s]:.4f}" if s in r["val_loss_per_seed"] else "–"
                                                for s in sweep.seeds) + " |" for r in rows), ""]
    claims = check_claims(sweep, rows)
    if claims:
        md += ["## Does the expected ordering hold?", "", *claims,
               "", "A gap counts as larger than the seed spread when it exceeds sqrt(std_a² + std_b²).", ""]
    if sweep.notes:
        md += ["## Notes", "", sweep.notes, ""]
    md += ["## Variants", "", *(f"- `{v}`: `{' '.join(as_overrides(ov)) or '(the common config)'}`"
                                for v, ov in sweep.variants.items()), ""]
    failed = [r for r in rows if r["failed"]]
    if failed:
        md += ["## Failed runs", "", *(f"- {r['failed']}" for r in failed), ""]
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
        for _, name in images:
            shutil.copyfile(d / name, img_dir / name)
        atomic_write_text(report, text.replace("{img}", sweep.name))
    return rows


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


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file, e.g. configs/ablations/deepseekmoe.yaml")
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
        sweep = load_sweep(args.sweep)
        with run_dir_lock(sweep.dir):  # one sweep process per sweep directory; RunDirBusy for a second
            if args.overwrite:
                clear_run_dir(sweep.dir)
            mark_run_dir(sweep.dir)
            if not args.collect:
                status = execute(sweep, args.jobs or sweep.jobs, args.threads)
            rows = write_results(sweep, args.report)
    except (ConfigError, RunDirError) as e:  # SweepError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((sweep.dir / "results.md").read_text())
    failed = [] if args.collect else [n for n, s in status.items() if s["status"] == "failed"]
    print(f"results: {sweep.dir / 'results.csv'}, {sweep.dir / 'results.md'}" + (f"; report: {args.report}" if args.report else ""))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in {sweep.dir / 'status.json'}); "
              "re-run the same command to retry them", file=sys.stderr)
    return 1 if failed or any(r["seeds_done"] == 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
