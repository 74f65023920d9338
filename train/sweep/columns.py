"""The result columns of a sweep, declared once: what each measures, how it is read from a
finished run, its header and digits. Tables, results.csv, `expect` claims and the verdicts
page all go through COLUMNS (and `domain_column` for the per-domain losses)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_playground.train import plots

TAIL = 0.2  # training-time layer metrics are averaged over the logged steps of the last 20% of training


def layer_metric(rows: list[dict], name: str) -> float | None:
    """`layer{i}/<name>` averaged over MoE layers and the logged rows of the last TAIL of training."""
    rows = [r for r in rows if any(k.endswith(f"/{name}") for k in r)]
    if not rows:
        return None
    last = rows[-1]["step"]
    tail = [r for r in rows if r["step"] >= (1 - TAIL) * last]
    return statistics.mean(v for r in tail for k, v in r.items() if k.endswith(f"/{name}"))


@dataclass(frozen=True)
class RunRecord:
    """What a finished run left: its metrics rows and summary."""
    rows: list[dict]
    summary: dict

    @classmethod
    def read(cls, run_dir: Path) -> "RunRecord":
        f = run_dir / "summary.json"
        return cls(plots.read_metrics(run_dir / "metrics.jsonl"), json.loads(f.read_text()) if f.exists() else {})

    def final(self, key: str) -> float | None:
        """`key` in the last row that has it (the final evaluation for val_* keys)."""
        return next((r[key] for r in reversed(self.rows) if key in r), None)


@dataclass(frozen=True)
class Column:
    key: str        # the name results.csv and `expect` claims use
    header: str
    digits: int
    read: Callable[[RunRecord], float | None]
    doc: str = ""


def final_eval(key: str) -> Callable[[RunRecord], float | None]:
    return lambda run: run.final(key)


COLUMNS: tuple[Column, ...] = (
    Column("val_loss", "val loss", 4, final_eval("val_loss"),
           doc="final loss on the whole fixed validation set (nats/token)"),
    Column("val_max_vio", "MaxVio (val)", 3, final_eval("val_max_vio"),
           doc="final model, frozen: (max − mean) / mean expert load with loads summed over every validation token, "
               "mean over MoE layers"),
    Column("max_vio", "MaxVio (train)", 3, lambda run: layer_metric(run.rows, "max_vio"),
           doc=f"per training batch, mean over MoE layers and the logged steps of the last {TAIL:.0%} of training"),
    Column("drop_fraction", "drop fraction", 4, lambda run: layer_metric(run.rows, "drop_fraction"),
           doc="share of token-expert assignments dropped by capacity in training, averaged like MaxVio (train)"),
    Column("tokens_per_s", "tokens/s", 0, lambda run: run.summary.get("tokens_per_s"),
           doc="training tokens over training wall time, on a shared CPU, so noisy"),
)
DOMAIN_PREFIX = "val_loss/"


def domain_column(domain: str) -> Column:
    key = DOMAIN_PREFIX + domain
    return Column(key, domain, 4, final_eval(key), doc=f"final validation loss on the {domain} domain's tokens")


def column(key: str) -> Column | None:
    """The column a claim's metric names: one of COLUMNS or val_loss/<domain>."""
    if key.startswith(DOMAIN_PREFIX) and len(key) > len(DOMAIN_PREFIX):
        return domain_column(key[len(DOMAIN_PREFIX):])
    return next((c for c in COLUMNS if c.key == key), None)
