"""Routing-by-domain analysis: numbers checked against the layer's own load counts, and the table's arithmetic."""

import json
from pathlib import Path

import pytest
import torch

from train.analyze import Analysis, analyze, concentration, main
from train.config import load_config
from train.data import build_corpus
from train.lm import LMRunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/lm/tiny.yaml")
MOE = ["model.ffn=moe", "moe.n_routed_experts=4", "moe.expert_hidden=32", "moe.top_k=2", "train.steps=20"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    cfg = load_config(LMRunConfig, TINY, [f"out_dir={tmp_path_factory.mktemp('runs')}", *MOE])
    return Path(train(cfg)["run_dir"]), cfg


def test_analysis_matches_the_layers_own_counts_and_writes_its_files(moe_run):
    run_dir, cfg = moe_run
    a = analyze(run_dir, n_windows=16)
    corpus = build_corpus(cfg.data, run_dir / "tokenizer.json")
    S = cfg.train.seq_len
    starts = torch.linspace(0, len(corpus.val.tokens) - S - 1, 16).long()
    domains = corpus.val.domains[starts[:, None] + torch.arange(S)]
    assert a.tokens_D.sum() == 16 * S
    assert a.tokens_D.tolist() == [float((domains == d).sum()) for d in range(len(corpus.domain_names)) if (domains == d).any()]

    # the same windows through the model: its layers' own per-expert counts equal the hook's picks
    from train.analyze import load_run
    _, model = load_run(run_dir)
    counts = {i: 0 for i in a.layers}
    with torch.no_grad():
        for chunk in starts.split(cfg.train.batch_size):
            out = model(corpus.val.tokens[chunk[:, None] + torch.arange(S)])
            for i in a.layers:
                counts[i] = counts[i] + out.aux[i].metrics["tokens_per_expert"].double()
    for i in a.layers:
        assert torch.allclose(a.probs[i].sum(-1), torch.ones(len(a.domains), dtype=torch.float64))
        everyone = [r for r in concentration(a, i) if r["domain"] == "all"][0]
        share = counts[i] / counts[i].sum()
        assert everyone["top_share"] == pytest.approx(share.max().item())
        assert everyone["top_expert"] == int(share.argmax())

    out = run_dir / "analysis"
    assert {p.name for p in out.iterdir()} >= {"routing.md", "routing.json", "routing_layer0.png", "routing_layer1.png"}
    record = json.loads((out / "routing.json").read_text())
    assert record["domains"] == a.domains and set(record["layers"]) == {"0", "1"}
    md = (out / "routing.md").read_text()
    assert all(f"| {d} |" in md for d in a.domains)


def test_concentration_numbers_by_hand():
    # domain x routes everything to expert 0; domain y splits evenly over experts 0..3 (E=4, K=1)
    picks = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    a = Analysis(["x", "y"], [0], torch.tensor([100.0, 300.0], dtype=torch.float64), {0: picks}, {0: picks}, 1, "", {})
    x, y, everyone = concentration(a, 0)
    assert (x["entropy"], x["top_expert"], x["top_share"]) == (0.0, 0, 1.0)
    assert y["entropy"] == pytest.approx(1.0) and y["topk_share"] == pytest.approx(0.25)
    # all tokens: 0.25 * [1,0,0,0] + 0.75 * [.25]*4 = [0.4375, 0.1875, 0.1875, 0.1875]
    assert everyone["top_share"] == pytest.approx(0.4375)
    assert x["tv"] == pytest.approx(0.5625) and y["tv"] == pytest.approx(0.1875)


def test_dense_and_missing_runs_are_refused(tmp_path, capsys):
    dense = train(load_config(LMRunConfig, TINY, [f"out_dir={tmp_path}", "train.steps=2", "train.warmup_steps=1", "log.eval_every=2"]))
    assert main([dense["run_dir"]]) == 2
    assert "has no MoE layer" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
