"""The sweep file: reading, inheriting, overlays, claims, validation of every run's config up front.

A sweep file (YAML):

    config: ../lm/base.yaml      # the trainer config every run starts from (relative to this file)
    inherit: common.yaml         # optional: another sweep file whose keys this one starts from
    set: {train.steps: 300}      # overrides for every run (merged over the inherited ones)
    variants:                    # named variants, each a mapping of overrides ...
      dense: {model.ffn: dense}
    grid:                        # ... or a grid: the cross product of override lists
      moe.top_k: [1, 2]
    seeds: [0, 1, 2]             # every variant runs once per seed (train.seed)
    expect:                      # claims, each judged by a paired confidence interval over seeds
      - "val_loss: a < b"
      - {test: "val_loss: a < b < c", claim: "in words", source: "paper, figure"}

An overlay is a sweep file's fragment (no variants, grid or config) merged over a sweep file
the way a child merges over what it inherits: `--overlay configs/ablations/tiny.yaml` (or
`--tiny`) runs any sweep at seconds per run, in its own directory.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from moe_playground.train.checkpoint import check_run_name
from moe_playground.train.config import ConfigError, load_config, read_yaml_mapping
from moe_playground.train.data import DOMAINS, KNOWLEDGE, text_files
from moe_playground.train.lm import LMRunConfig
from moe_playground.train.sweep.columns import COLUMNS, DOMAIN_PREFIX

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
    "expect": "claims to judge: 'metric: a < b < c' (a has the lowest value), or a mapping with keys "
              "test (that string), claim (in words) and source (where the claim comes from)",
    "notes": "observations by whoever ran the sweep, printed under the claims",
    "budget": "a sentence on the compute budget this file is sized for, printed on the page",
}
OVERLAY_KEYS = ("out_dir", "set", "seeds", "jobs", "analyze", "notes", "budget")
TINY_OVERLAY = Path(__file__).resolve().parents[2] / "configs" / "ablations" / "tiny.yaml"
CLAIM_KEYS = ("test", "claim", "source")


class SweepError(ConfigError):
    """Bad sweep file: the message names the problem and what is allowed."""


@dataclass
class Run:
    variant: str
    seed: int
    overrides: list[str]      # key=value for load_config / the trainer command line
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass(frozen=True)
class Claim:
    metric: str
    order: list[str]          # variants, lowest value first
    text: str                 # the test as written: "metric: a < b"
    claim: str = ""           # in words
    source: str = ""

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.order, self.order[1:]))


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
    claims: list[Claim] = field(default_factory=list)
    notes: str = ""
    budget: str = ""
    overlays: list[Path] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.out_dir / self.name

    def runs(self) -> list[Run]:
        """Seed by seed, every variant of a seed before the next seed: a sweep stopped early leaves whole
        seeds, which is what paired comparisons need."""
        return [Run(v, s, [*as_overrides(self.common), *as_overrides(ov), f"train.seed={s}",
                           f"out_dir={self.dir}", f"run_name={v}-s{s}"], self.dir / f"{v}-s{s}")
                for s in self.seeds for v, ov in self.variants.items()]

    def first_config(self) -> LMRunConfig:
        """The trainer config of the first run (what every variant shares, and the data)."""
        return load_config(LMRunConfig, self.config, self.runs()[0].overrides)


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


def _raw(path: Path, seen: tuple[Path, ...], allowed: dict[str, str] | tuple[str, ...], kind: str) -> dict[str, Any]:
    raw = OmegaConf.to_container(read_yaml_mapping(path, seen, kind=kind), resolve=False)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        listed = "\n".join(f"  {k}: {SWEEP_KEYS[k]}" for k in allowed)
        raise SweepError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}. Allowed in a {kind} file:\n{listed}")
    return raw


def _over(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child`'s keys over `parent`'s; `set` merged key by key; a child's grid or variants replace both."""
    if "grid" in child or "variants" in child:
        parent = {k: v for k, v in parent.items() if k not in ("grid", "variants")}
    return {**parent, **child, "set": {**(parent.get("set") or {}), **(child.get("set") or {})}}


def read_sweep_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sweep file's keys, merged over the file it inherits from."""
    path = path.resolve()
    raw = _raw(path, seen, SWEEP_KEYS, "sweep")
    if "config" in raw:  # relative to the file that names it
        raw["config"] = str((path.parent / str(raw["config"])).resolve())
    if "inherit" not in raw:
        return raw
    return _over(read_sweep_file(path.parent / str(raw.pop("inherit")), seen + (path,)), raw)


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SweepError(f"{path}: {what} must be a mapping of key.sub: value, got {value!r}")
    return value


def domain_names(cfg: LMRunConfig) -> list[str]:
    """The domains a run's data has (what `val_loss/<domain>` may name)."""
    if cfg.data.path is None:
        return list(DOMAINS) + ([KNOWLEDGE] if cfg.data.knowledge_entities else [])
    return [f.stem for f in text_files(Path(cfg.data.path))]


def parse_claim(entry: Any, variants: dict[str, Any], domains: list[str], path: Path) -> Claim:
    """'val_loss: a < b < c' (or {test: ..., claim: ..., source: ...}) -> Claim."""
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(CLAIM_KEYS))
        if unknown or "test" not in entry:
            raise SweepError(f"{path}: expect entry {entry!r} must have a 'test' and may have {', '.join(CLAIM_KEYS[1:])}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        words = {k: str(entry.get(k, "")).strip() for k in CLAIM_KEYS[1:]}
        entry = entry["test"]
    else:
        words = {}
    metric, sep, order = str(entry).partition(":")
    metric, names = metric.strip(), [n.strip() for n in order.split("<")]
    metrics = [c.key for c in COLUMNS] + [DOMAIN_PREFIX + d for d in domains]
    if not sep or metric not in metrics or len(names) < 2 or not all(n in variants for n in names):
        raise SweepError(f"{path}: expect entry {entry!r} must look like 'metric: a < b' with metric one of "
                         f"{', '.join(metrics)} and a, b variants of this sweep ({', '.join(variants)})")
    return Claim(metric, names, f"{metric}: {' < '.join(names)}", **words)


def load_sweep(path: str | Path, overlays: list[str | Path] = ()) -> Sweep:
    """Read and check a sweep file (and overlays merged over it, in order), then validate every
    variant's config with the trainer's schema."""
    path = Path(path)
    raw = read_sweep_file(path)
    for overlay in map(Path, overlays):
        raw = _over(raw, _raw(overlay.resolve(), (), OVERLAY_KEYS, "overlay"))
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
    name = str(raw.get("name") or path.stem)
    try:
        check_run_name(name, "name")
    except ValueError as e:
        raise SweepError(f"{path}: {e}") from None
    sweep = Sweep(name=name, path=path, config=Path(raw["config"]),
                  out_dir=Path(raw.get("out_dir", "runs/sweeps")), variants=variants,
                  common=_mapping(raw.get("set") or {}, "set", path), seeds=seeds, jobs=jobs,
                  analyze=bool(raw.get("analyze", False)), description=str(raw.get("description", "")).strip(),
                  notes=str(raw.get("notes", "")).strip(), budget=str(raw.get("budget", "")).strip(),
                  overlays=[Path(o) for o in overlays])
    for run in sweep.runs():  # every variant's config, before the first run starts (seeds are plain ints)
        if run.seed != seeds[0]:
            continue
        try:
            load_config(LMRunConfig, sweep.config, run.overrides)
        except ConfigError as e:
            raise SweepError(f"{path}: run {run.name}: {e}") from None
    domains = domain_names(sweep.first_config())
    sweep.claims = [parse_claim(c, variants, domains, path) for c in raw.get("expect") or []]
    return sweep
