"""The sweep runner: expansion, validation up front, failures recorded, resume after a kill, results."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train import checkpoint as ckpt
from train.config import load_config, to_yaml
from train.lm import LMRunConfig
from train.sweep.cli import main
from train.sweep.columns import layer_metric
from train.sweep.runner import run_state
from train.sweep.spec import TINY_OVERLAY, SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["deepseekmoe", "balancing", "capacity", "router"]


def sweep_file(tmp_path, body: str, name: str = "s") -> Path:
    """A sweep file in tmp_path: the deepseekmoe sweep with the tiny overlay's keys, no claims, runs in
    tmp_path, and `body`'s keys over all that (its `set` merged key by key)."""
    tiny = yaml.safe_load(TINY_OVERLAY.read_text())
    extra = yaml.safe_load(body) or {}
    keys = {"inherit": str(ROOT / "configs/ablations/deepseekmoe.yaml"), **tiny, "expect": [], "out_dir": str(tmp_path / "out"),
            **{k: v for k, v in extra.items() if k != "set"}, "set": {**tiny["set"], **(extra.get("set") or {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


# ---- the sweep file ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_run_under_the_tiny_overlay(name):
    full = load_sweep(ROOT / f"configs/ablations/{name}.yaml")
    tiny = load_sweep(ROOT / f"configs/ablations/{name}.yaml", [TINY_OVERLAY])
    assert len(full.seeds) >= 5 and full.claims and list(full.variants) == list(tiny.variants)
    assert [c.text for c in full.claims] == [c.text for c in tiny.claims]
    assert tiny.dir != full.dir
    big, small = full.first_config(), tiny.first_config()
    assert small.train.steps < big.train.steps and small.model.d_model < big.model.d_model
    assert small.data.val_tokens < big.data.val_tokens


def test_an_overlay_may_not_define_variants(tmp_path):
    (tmp_path / "o.yaml").write_text("variants: {a: {}}\n")
    with pytest.raises(SweepError, match="unknown key.*'variants'.*Allowed in a overlay file"):
        load_sweep(ROOT / "configs/ablations/deepseekmoe.yaml", [tmp_path / "o.yaml"])


def test_grid_is_the_cross_product_with_one_run_dir_per_seed(tmp_path):
    s = load_sweep(sweep_file(tmp_path, "seeds: [3, 4]\ngrid:\n  moe.top_k: [1, 2]\n  moe.score_func: [softmax, sigmoid]\n"
                              "set: {model.ffn: moe, moe.n_routed_experts: 4, moe.expert_hidden: 32}\n"))
    assert list(s.variants) == ["top_k=1,score_func=softmax", "top_k=1,score_func=sigmoid",
                                "top_k=2,score_func=softmax", "top_k=2,score_func=sigmoid"]
    runs = s.runs()
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    assert [r.seed for r in runs] == [3] * 4 + [4] * 4  # whole seeds first: a sweep stopped early stays paired
    run = next(r for r in runs if r.variant == "top_k=2,score_func=sigmoid" and r.seed == 4)
    cfg = load_config(LMRunConfig, s.config, run.overrides)
    assert (cfg.moe.top_k, cfg.moe.score_func, cfg.train.seed, cfg.model.d_model) == (2, "sigmoid", 4, 32)
    assert cfg.run_dir == run.run_dir


def test_tiny_router_sweep_keeps_active_and_total_parameters_equal():
    from train.lm import build_model
    s = load_sweep(ROOT / "configs/ablations/router.yaml", [TINY_OVERLAY])
    sizes = set()
    for r in s.runs():
        if r.seed == s.seeds[0]:
            m = build_model(load_config(LMRunConfig, s.config, r.overrides))
            # the router (one row per expert) and MoE++'s zero-computation experts (O(width)) are the only differences
            extra = sum(p.numel() for b in m.blocks for part in (b.ffn.router, b.ffn.null_experts) if part is not None
                        for p in part.parameters())
            sizes.add((m.num_parameters() - extra, m.active_parameters() - extra))
    assert len(sizes) == 1 and len(s.variants) == 8


@pytest.mark.parametrize("body, message", [
    ("grids: {moe.top_k: [1]}\n", "unknown key(s) 'grids'"),
    ("grid: {}\n", "the grid is empty"),
    ("grid: {moe.top_k: []}\n", "grid.moe.top_k must be a non-empty list"),
    ("grid: {moe.top_k: [1, 2, 1]}\n", "grid.moe.top_k lists a value twice"),
    ("variants: {a: {moe.top_kk: 2}}\n", "run a-s0: override 'moe.top_kk=2': unknown key 'moe.top_kk' (did you mean 'moe.top_k'?)"),
    ("variants: {a: {train.lr: -1}}\n", "run a-s0: train.lr=-1.0 must be > 0"),
    ("variants: {a: {}, b: {model.ffn: moe, moe.top_k: 9, moe.n_routed_experts: 8}}\n", "run b-s0: moe.top_k=9 must be <="),
    ("variants: {a: {}}\ngrid: {moe.top_k: [1]}\n", "exactly one of 'grid'"),
    ("variants: {a: {}}\nseeds: []\n", "seeds must be a non-empty list"),
    ("variants: {a: {}, b: {}}\nexpect: ['val_loss: a < c']\n", "expect entry 'val_loss: a < c'"),
    ("variants: {a: {}, b: {}}\nexpect: ['val_loss/poetry: a < b']\n", "val_loss/knowledge"),
    ("variants: {a: {}, b: {}}\nexpect: [{test: 'val_loss: a < b', why: x}]\n", "(unknown: why)"),
    ("variants: {a/b: {}}\n", "variant name 'a/b'"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path, capsys, body, message):
    assert main([str(sweep_file(tmp_path, body))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_dir_left_by_another_config_is_refused(tmp_path):
    s = load_sweep(sweep_file(tmp_path, "variants: {a: {}}\nseeds: [0]\n"))
    run = s.runs()[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(to_yaml(load_config(LMRunConfig, s.config, [*run.overrides, "train.lr=0.5"])))
    with pytest.raises(SweepError, match="different config"):
        run_state(run, s)
    # the fields a resumed run may change (threads, progress) do not count
    (run.run_dir / "config.yaml").write_text(to_yaml(load_config(LMRunConfig, s.config, [*run.overrides, "train.threads=7"])))
    assert run_state(run, s) == "restart"


# ---- results arithmetic --------------------------------------------------------------------


def test_layer_metrics_average_layers_over_the_last_fifth_of_training():
    rows = [{"step": s, "layer0/max_vio": float(s), "layer1/max_vio": float(s) + 1} for s in range(10, 101, 10)]
    rows.insert(3, {"step": 35, "val_loss": 1.0})  # a row without the metric is ignored
    # steps >= 80: 80, 90, 100 -> layer mean (80.5, 90.5, 100.5) -> 90.5
    assert layer_metric(rows, "max_vio") == pytest.approx(90.5)
    assert layer_metric(rows, "drop_fraction") is None


# ---- running ---------------------------------------------------------------------------------


def test_sweep_runs_records_a_failure_writes_results_and_skips_finished_runs(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single line of text\n")  # a valid data.path, whose split is empty at run time
    path = sweep_file(tmp_path, "analyze: true\nseeds: [0, 1]\nvariants:\n"
                      "  moe: {model.ffn: moe, moe.n_routed_experts: 4, moe.expert_hidden: 32, moe.top_k: 1}\n"
                      f"  broken: {{data.path: {tmp_path / 'one.txt'}}}\n"
                      "expect: ['val_loss: moe < broken']\n")
    out = tmp_path / "out" / "s"
    assert main([str(path), "--jobs", "2"]) == 1  # a run failed
    captured = capsys.readouterr()
    assert "2 run(s) failed: broken-s0, broken-s1" in captured.err

    status = json.loads((out / "status.json").read_text())
    assert {n: s["status"] for n, s in status.items()} == {"moe-s0": "done", "moe-s1": "done",
                                                            "broken-s0": "failed", "broken-s1": "failed"}
    assert "empty split" in status["broken-s0"]["error"]
    with (out / "results.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["moe"]["seeds_done"] == "2" and rows["broken"]["seeds_done"] == "0"
    finals = [json.loads((out / f"moe-s{s}" / "summary.json").read_text())["final_val_loss"] for s in (0, 1)]
    assert float(rows["moe"]["val_loss_mean"]) == pytest.approx(sum(finals) / 2, abs=1e-6)
    assert float(rows["moe"]["val_loss_std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, abs=1e-6)
    assert 0 <= float(rows["moe"]["max_vio_mean"]) <= 3 and rows["broken"]["max_vio_mean"] == "nan"
    assert int(rows["moe"]["params"]) > int(rows["moe"]["active_params"])
    assert "empty split" in rows["broken"]["failed"]
    md = (out / "results.md").read_text()
    assert "| moe | 2/2 |" in md and "| broken | 0/2 | – |" in md and "## Failed runs" in md
    assert "| `val_loss: moe < broken` | 0 | – | – | **undecided** |" in md  # nothing to pair with
    assert "| moe | " in md.split("Final validation loss by domain")[1]  # the per-domain table
    assert "routing by corpus domain" in md and "| arithmetic |" in md
    for png in ("val_loss.png", "expert_load_moe.png", "routing_moe.png"):
        assert (out / png).stat().st_size > 1000, png

    # again: finished runs are skipped (not re-run, nothing rewritten), failed ones are retried
    done_at = (out / "moe-s0" / "DONE").stat().st_mtime_ns
    assert main([str(path), "--jobs", "2", "--report", str(tmp_path / "docs" / "page.md")]) == 1
    assert "2 already done, 2 to run" in capsys.readouterr().out
    assert (out / "moe-s0" / "DONE").stat().st_mtime_ns == done_at
    assert (out / "logs" / "moe-s0.log").read_text().count("=== ") == 1
    assert (out / "logs" / "broken-s0.log").read_text().count("=== ") == 2
    page = (tmp_path / "docs" / "page.md").read_text()
    assert "![val_loss.png](s/val_loss.png)" in page and (tmp_path / "docs" / "s" / "val_loss.png").exists()


def test_a_sweep_killed_with_kill_9_takes_its_trainer_along_and_resumes_the_run(tmp_path):
    path = sweep_file(tmp_path, "seeds: [0]\nvariants: {dense: {model.ffn: dense}}\n"
                      "set: {train.steps: 300, log.ckpt_every: 10, log.eval_every: 100}\n")
    run_dir = tmp_path / "out" / "s" / "dense-s0"
    proc = subprocess.Popen([sys.executable, "-m", "train.sweep", str(path)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    trainer = int((run_dir / ckpt.LOCK_FILE).read_text())  # the process holding the run
    os.kill(proc.pid, signal.SIGKILL)  # the sweep alone, mid-run
    proc.wait()
    deadline = time.time() + 30
    while Path(f"/proc/{trainer}").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{trainer}").exists(), "the trainer outlived its sweep"
    assert (run_dir / "checkpoints" / "latest").exists() and not (run_dir / "DONE").exists()

    assert main([str(path)]) == 0
    log = (tmp_path / "out" / "s" / "logs" / "dense-s0.log").read_text()
    assert "=== " in log and " resume: " in log and "--resume" in log
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # no step logged twice, none missing at the end
    assert (run_dir / "DONE").exists()


def test_a_run_whose_metrics_two_trainers_wrote_never_counts(tmp_path, capsys):
    path = sweep_file(tmp_path, "seeds: [0]\nvariants: {dense: {model.ffn: dense}}\nset: {train.steps: 10}\n")
    assert main([str(path)]) == 0
    run_dir = tmp_path / "out" / "s" / "dense-s0"
    rows = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(rows + rows)  # steps 10, 20, ..., 10, 20, ...: two writers
    capsys.readouterr()
    assert main([str(path)]) == 1
    assert "metrics.jsonl is not one increasing sequence of steps" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "s" / "status.json").read_text())["dense-s0"]["status"] == "failed"
    assert "| dense | 0/1 |" in (tmp_path / "out" / "s" / "results.md").read_text()


def test_sweep_overwrite_deletes_only_a_sweep_directory_made_here(tmp_path, capsys):
    path = sweep_file(tmp_path, "seeds: [0]\nvariants: {dense: {model.ffn: dense}}\nset: {train.steps: 5}\n")
    folder = tmp_path / "out" / "s"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("the user's")
    assert main([str(path), "--overwrite"]) == 2
    assert "not a run directory made by this project" in capsys.readouterr().err
    assert (folder / "mine.txt").read_text() == "the user's"
    (folder / "mine.txt").unlink()
    assert main([str(path)]) == 0
    assert main([str(path), "--overwrite"]) == 0
    assert (folder / "dense-s0" / "DONE").exists() and "=== " in (folder / "logs" / "dense-s0.log").read_text()


def test_a_seed_fixes_the_data_order_for_every_variant(tmp_path, monkeypatch):
    """Paired comparisons rest on this: two variants of one seed train on the same windows in the same order."""
    import train.lm as lm
    from train.data import sample_windows

    seen = []
    monkeypatch.setattr(lm, "sample_windows", lambda stream, starts, n: seen[-1].append(starts.clone()) or
                        sample_windows(stream, starts, n))
    s = load_sweep(sweep_file(tmp_path, "seeds: [0, 1]\nset: {train.steps: 6, log.eval_every: 6}\nvariants:\n"
                              "  dense: {model.ffn: dense}\n"
                              "  moe: {model.ffn: moe, moe.n_routed_experts: 4, moe.expert_hidden: 32, moe.top_k: 2}\n"))
    order = {}
    for run in s.runs():
        seen.append([])
        lm.train(load_config(LMRunConfig, s.config, [*run.overrides, "log.progress=false"]))
        order[run.variant, run.seed] = torch.cat(seen[-1])
    assert torch.equal(order["dense", 0], order["moe", 0]) and torch.equal(order["dense", 1], order["moe", 1])
    assert not torch.equal(order["dense", 0], order["dense", 1])
