"""Paired verdicts: the t interval, the verdict logic on made-up numbers, a sweep's page and claims.json
from made-up finished runs, and the verdicts page built from them."""

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from train.checkpoint import DONE_MARKER
from train.sweep import verdicts
from train.sweep.report import write_results
from train.sweep.spec import TINY_OVERLAY, load_sweep
from train.sweep.stats import HOLDS, REVERSED, UNDECIDED, overall, paired_difference, t_cdf, t_quantile

ROOT = Path(__file__).resolve().parents[1]


# ---- the interval and the verdict ------------------------------------------------------------


def test_t_quantile_inverts_the_cdf_and_approaches_the_normal():
    for df in (1, 2, 4, 9):
        q = t_quantile(0.975, df)
        assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-6)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)  # the textbook value
    assert t_quantile(0.975, 1) > t_quantile(0.975, 4) > t_quantile(0.975, 200) > 1.96
    assert t_quantile(0.975, 200) == pytest.approx(1.972, abs=2e-3)
    with pytest.raises(ValueError, match="0.5 <= p < 1"):
        t_quantile(1.0, 3)


def test_interval_matches_its_definition():
    a = {0: 1.0, 1: 2.0, 2: 1.5, 3: 1.2}
    b = {0: 1.1, 1: 2.3, 2: 1.6, 3: 1.2, 9: 5.0}  # seed 9 has no partner: left out
    p = paired_difference(a, b)
    d = [-0.1, -0.3, -0.1, 0.0]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    assert p.n == 4 and p.mean == pytest.approx(mean)
    assert p.hi - p.mean == pytest.approx(t_quantile(0.975, 3) * sd / 2)


def test_verdicts_on_made_up_numbers():
    r = random.Random(0)
    shared = {s: r.gauss(0, 0.05) for s in range(5)}  # seed noise both variants share: cancels in the difference
    base = {s: 2.0 + shared[s] for s in range(5)}

    def shifted(gap, jitter):
        return {s: base[s] + gap + r.gauss(0, jitter) for s in range(5)}

    # a clear gap, far smaller than the seed spread (0.05) but larger than the paired noise: holds
    assert paired_difference(base, shifted(0.01, 0.001)).verdict == HOLDS
    # the same gap the other way: reversed
    assert paired_difference(shifted(0.01, 0.001), base).verdict == REVERSED
    # a gap inside its interval: undecided
    assert paired_difference(base, shifted(0.001, 0.02)).verdict == UNDECIDED
    # one seed cannot give an interval
    assert paired_difference({0: 1.0}, {0: 2.0}).verdict == UNDECIDED
    assert paired_difference({}, {0: 2.0}).n == 0
    assert overall([HOLDS, HOLDS]) == HOLDS and overall([HOLDS, UNDECIDED]) == UNDECIDED
    assert overall([HOLDS, REVERSED, UNDECIDED]) == REVERSED


# ---- a sweep's page from made-up runs ------------------------------------------------------------


def made_up_sweep(tmp_path: Path, values: dict[str, dict[int, float]]):
    """A tiny sweep (variants a, b, c; seeds 0-4) whose runs are finished run directories holding `values`
    as their final val_loss (and val_loss/knowledge = val_loss + 1), written by hand."""
    tiny = yaml.safe_load(TINY_OVERLAY.read_text())
    body = {"inherit": str(ROOT / "configs/ablations/deepseekmoe.yaml"), **tiny, "out_dir": str(tmp_path / "out"),
            "seeds": [0, 1, 2, 3, 4], "variants": {v: {} for v in values},
            "expect": [{"test": "val_loss: a < b < c", "claim": "a beats b beats c", "source": "a made-up paper"},
                       "val_loss/knowledge: c < a"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(body))
    sweep = load_sweep(tmp_path / "s.yaml")
    for run in sweep.runs():
        v = values[run.variant][run.seed]
        run.run_dir.mkdir(parents=True)
        rows = [{"step": 10, "train_loss": 3.0}, {"step": 20, "train_loss": 2.5, "val_loss": v, "val_loss/knowledge": v + 1}]
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run.run_dir / "summary.json").write_text(json.dumps({"final_val_loss": v, "wall_s": 60.0, "params": 100}))
        (run.run_dir / DONE_MARKER).write_text("")
    return sweep


def test_page_and_claims_json_judge_each_link(tmp_path):
    seeds = range(5)
    noise = {s: 0.05 * math.sin(3 * s) for s in seeds}
    values = {"a": {s: 2.0 + noise[s] for s in seeds},
              "b": {s: 2.01 + noise[s] + 0.0005 * (-1) ** s for s in seeds},   # a < b: holds
              "c": {s: 2.01 + noise[s] + 0.005 * (-1) ** s for s in seeds}}    # b < c: undecided
    sweep = made_up_sweep(tmp_path, values)
    report = tmp_path / "docs" / "results" / "s.md"
    write_results(sweep, report)
    claims = json.loads((report.parent / "s" / "claims.json").read_text())
    links = {(v["a"], v["b"], v["metric"]): v for v in claims["verdicts"]}
    ab, bc, ca = links["a", "b", "val_loss"], links["b", "c", "val_loss"], links["c", "a", "val_loss/knowledge"]
    assert ab["verdict"] == HOLDS and ab["n"] == 5 and ab["mean"] == pytest.approx(-0.01 - 0.0001, abs=1e-9)
    assert bc["verdict"] == UNDECIDED and ab["overall"] == bc["overall"] == UNDECIDED
    assert ca["verdict"] == REVERSED  # c's knowledge loss is higher than a's on every seed
    page = report.read_text()
    assert "| a beats b beats c | `val_loss: a < b` | 5 |" in page and "**holds**" in page
    assert "2 of 3 comparisons are decided" in page and "undecided: `b < c` (val_loss)" in page
    assert "5 seeds ([0, 1, 2, 3, 4])" in page and "1.0 min on average" in page
    assert (report.parent / "s" / "paired_differences.png").stat().st_size > 1000

    # the verdicts page reads the committed claims.json; a sweep without one is "not measured"
    sweeps_dir = tmp_path / "sweeps"
    sweeps_dir.mkdir()
    (sweeps_dir / "s.yaml").write_text((tmp_path / "s.yaml").read_text())
    (sweeps_dir / "other.yaml").write_text(yaml.safe_dump({"inherit": str(tmp_path / "s.yaml"), "name": "other"}))
    (sweeps_dir / "overlay.yaml").write_text("seeds: [1]\n")  # no variants: not a sweep of its own
    text = verdicts.build_page(sweeps_dir, report.parent)
    assert "Totals: 1 hold, 1 reversed, 1 undecided, 3 not measured." in text
    assert "| a beats b beats c | a made-up paper | `val_loss: a < b` | **holds** | -0.0101 [" in text
    assert "| [s](s.md) |" in text and "**other**: not yet run" in text
