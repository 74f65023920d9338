"""FramePack pipeline: simulator, measures, trainer (loss, resume, run-dir safety), results page."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from train.checkpoint import RunDirError
from train.config import load_config
from train.framepack import report
from train.framepack.data import SimConfig, _draw, render, simulate, videos_for_seeds
from train.framepack.evaluate import components, drift, frame_measures, object_stats, sharpness
from train.framepack.train import FramePackRunConfig, load_trained, train
from train.plots import read_metrics

SMOKE = "configs/framepack/smoke.yaml"


# ---- simulator --------------------------------------------------------------------------------


def test_simulator_is_deterministic_by_seed_and_extends_to_any_length():
    cfg = SimConfig()
    a = videos_for_seeds(cfg, 32, 40, [3, 4])
    b = videos_for_seeds(cfg, 32, 90, [4, 3])
    assert torch.equal(a.frames_BLHW[0], b.frames_BLHW[1, :40]) and torch.equal(a.frames_BLHW[1], b.frames_BLHW[0, :40])
    assert not torch.equal(a.frames_BLHW[0], a.frames_BLHW[1])
    g1, g2 = (simulate(cfg, 32, 10, torch.Generator().manual_seed(7), 4) for _ in range(2))
    assert torch.equal(g1.frames_BLHW, g2.frames_BLHW)


def test_shapes_stay_inside_the_frame_and_bounce():
    cfg = SimConfig(max_speed=3.0)
    v = simulate(cfg, 32, 300, torch.Generator().manual_seed(0), 16)
    x = v.centers_BLK2
    assert v.frames_BLHW.sum((-1, -2)).min() > 0  # something is always on screen
    # redraw every frame on a canvas 8 px wider on each side: nothing may lie outside the frame
    gen = torch.Generator().manual_seed(0)
    present, radius, kind, _, _ = _draw(cfg, 32, gen, 16)
    assert ((x >= radius[:, None, :, None] - 1e-5) & (x <= 32 - radius[:, None, :, None] + 1e-5)).all()
    for t in range(0, 300, 7):
        padded = render(x[:, t], radius, kind, present, 32, pad=8)
        assert padded.sum() == padded[:, 8:-8, 8:-8].sum() == v.frames_BLHW[:, t].sum()
    steps = x.diff(dim=1)
    flips = (steps[:, 1:] * steps[:, :-1] < 0).any(-1)  # a velocity component changed sign: a bounce
    assert flips[present[:, None, :].expand_as(flips)].any()


# ---- measures ------------------------------------------------------------------------------------


def test_measures_see_objects_blur_and_drift():
    cfg = SimConfig(min_shapes=2, max_shapes=2)
    v = videos_for_seeds(cfg, 32, 20, [1, 2, 3])
    truth = v.frames_BLHW
    m = frame_measures(truth, truth, v.centers_BLK2, v.present_BK)
    n_true = object_stats(truth.flatten(0, 1))[0]
    assert set(n_true.tolist()) == {1, 2}  # two shapes, sometimes overlapping (one object, centred between them)
    apart = n_true.view(3, 20) == 2
    assert m["mse"].max() == 0 and m["binarity"].min() == 1 and m["count_err"].max() == 0
    assert m["centroid_err"][apart].max() < 0.5 < m["centroid_err"][~apart].max()
    blurred = F.avg_pool2d(truth.flatten(0, 1)[:, None], 5, 1, 2)[:, 0].view_as(truth)
    mb = frame_measures(blurred, truth, v.centers_BLK2, v.present_BK)
    assert (mb["binarity"] < 0.9).all() and (sharpness(blurred) < sharpness(truth)).all() and mb["mse"].min() > 0
    empty = frame_measures(torch.zeros_like(truth), truth, v.centers_BLK2, v.present_BK)
    assert torch.allclose(empty["centroid_err"], torch.full_like(empty["centroid_err"], 16.0))
    assert torch.equal(empty["count_err"], n_true.float().view_as(empty["count_err"]))
    assert torch.allclose(drift(torch.arange(20.0).expand(2, 20)), torch.full((2,), 17.0))  # 3 frames each end


def test_components_separate_and_join():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 5:7, 5:7] = True
    assert (components(mask)[0, 1:, 0] > 0).sum() == 2
    mask[0, 3:5, 3:5] = True  # diagonal bridge: one 8-connected component
    assert (components(mask)[0, 1:, 0] > 0).sum() == 1


# ---- trainer -----------------------------------------------------------------------------------


def smoke(tmp_path, *overrides):
    return load_config(FramePackRunConfig, SMOKE, [f"out_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("head", ["regression", "flow"])
def test_tiny_training_run_lowers_the_loss(tmp_path, head):
    cfg = smoke(tmp_path, "train.steps=40", "log.eval_every=20", f"model.head={head}")
    summary = train(cfg)
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] and summary["finished"]
    for f in ("DONE", "rollouts.png", "loss.png", "config.yaml"):
        assert (cfg.run_dir / f).is_file()


def test_resume_continues_exactly_and_refuses_a_changed_config(tmp_path):
    straight = smoke(tmp_path, "run_name=a")
    train(straight)
    half = smoke(tmp_path, "run_name=b", "train.stop_at=10")
    train(half)
    assert not (half.run_dir / "DONE").exists()
    with pytest.raises(RunDirError, match="model.d_model"):
        train(smoke(tmp_path, "run_name=b", "model.d_model=16", "model.n_head=2"), resume=True)
    with pytest.raises(RunDirError, match="--resume"):
        train(smoke(tmp_path, "run_name=b"))  # neither resume nor overwrite: refused, nothing lost
    train(smoke(tmp_path, "run_name=b"), resume=True)
    a, _ = load_trained(straight.run_dir)
    b, _ = load_trained(half.run_dir)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=k)
    steps = [r["step"] for r in read_metrics(half.run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps))
    # a longer run: refused unless allowed, then recorded
    with pytest.raises(RunDirError, match="allow-changes"):
        train(smoke(tmp_path, "run_name=b", "train.steps=40"), resume=True)
    assert train(smoke(tmp_path, "run_name=b", "train.steps=40"), resume=True, allow_changes=True)["step"] == 40
    record = json.loads((half.run_dir / "config_changes.jsonl").read_text())
    assert record == {"step": 30, "changes": {"train.steps": [30, 40]}}


# ---- the results page ------------------------------------------------------------------------------


@pytest.mark.slow
def test_results_page_end_to_end(tmp_path):
    out = tmp_path / "page" / "framepack.md"
    rc = load_config(report.ResultsConfig, "configs/framepack/results_smoke.yaml",
                     [f"out_dir={tmp_path}", "notes=the blur starts at frame 4"])
    text = report.run(rc, report.Path("configs/framepack/results_smoke.yaml"), out, "cmd")
    assert out.read_text() == text
    assert "## What the run shows\n\nthe blur starts at frame 4\n" in text
    for arm in ("packed, causal", "packed, bidirectional", "packed, inverted", "reference (no packing, causal)"):
        assert f"| {arm} |" in text
    assert "## Which FramePack claims hold at this scale" in text
    for seed in (0, 1):
        for L in (16, 32):
            assert (rc.run_dir / f"seed{seed}" / f"rollouts_len{L}.png").is_file()
    assert (out.parent / "framepack" / "context_and_time.png").is_file()
    results = json.loads((rc.run_dir / "results.json").read_text())
    timing = results["0"]["timing"]
    assert timing["packed@32"]["tokens_max"] <= timing["packed@16"]["tokens_max"] + 16 < timing["reference@32"]["tokens_max"]
    # a second run reuses the trained models (DONE) and measures the same quality (timings vary)
    mtime = (rc.run_dir / "packed_seed0" / "DONE").stat().st_mtime
    report.run(rc, report.Path("configs/framepack/results_smoke.yaml"), out, "cmd")
    assert json.loads((rc.run_dir / "results.json").read_text())["0"]["quality"] == results["0"]["quality"]
    assert (rc.run_dir / "packed_seed0" / "DONE").stat().st_mtime == mtime
    # a finished run of another config is never silently reused
    changed = load_config(report.ResultsConfig, "configs/framepack/results_smoke.yaml",
                          [f"out_dir={tmp_path}", f"overrides=[{','.join(rc.overrides)},train.lr=0.01]"])
    with pytest.raises(RunDirError, match="train.lr"):
        report.run(changed, report.Path("configs/framepack/results_smoke.yaml"), out, "cmd")
