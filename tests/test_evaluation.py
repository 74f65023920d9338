"""Evaluation over the whole validation set: per-domain losses, frozen-model MaxVio, nothing changed."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from train.config import load_config
from train.data import build_corpus, sample_windows
from train.evaluation import evaluate, max_vio, window_starts
from train.lm import LMRunConfig, build_model

TINY = "configs/lm/tiny.yaml"


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(LMRunConfig, TINY, ["model.ffn=moe", "moe.n_routed_experts=4", "moe.expert_hidden=32", "moe.top_k=2",
                                          "moe.bias_update_rate=0.01", "data.val_tokens=3000"])
    torch.manual_seed(0)
    return cfg, build_model(cfg), build_corpus(cfg.data), Accelerator(cpu=True)


def test_every_token_once_and_domain_losses_average_to_the_total(setup):
    cfg, model, corpus, acc = setup
    row = evaluate(model, corpus, cfg, acc)
    S = cfg.train.seq_len
    starts = window_starts(corpus.val, S)
    assert len(starts) == (len(corpus.val.tokens) - 1) // S and torch.equal(starts[1:] - starts[:-1], torch.full_like(starts[1:], S))
    # reference: the model's own mean loss, window by window
    model.eval()
    with torch.no_grad():
        x, y, dom = sample_windows(corpus.val, starts, S)
        nll = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none")
        assert row["val_loss"] == pytest.approx(model(x, y).loss.item(), abs=1e-5)
    weights = {name: (dom == d).sum().item() for d, name in enumerate(corpus.domain_names)}
    assert set(weights) == {k.split("/")[1] for k in row if k.startswith("val_loss/")} and all(weights.values())
    assert sum(row[f"val_loss/{n}"] * w for n, w in weights.items()) / sum(weights.values()) == pytest.approx(row["val_loss"], abs=1e-4)
    assert row["val_loss/knowledge"] == pytest.approx(nll[dom.flatten() == len(weights) - 1].mean().item(), abs=1e-5)


def test_maxvio_of_the_frozen_model_over_all_validation_tokens(setup):
    cfg, model, corpus, acc = setup
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    picks = {}

    def count(i):
        def hook(module, inputs, routing):
            picks[i] = picks.get(i, 0) + torch.bincount(routing.idx_TK.flatten(), minlength=4)
        return hook

    handles = [b.ffn.router.register_forward_hook(count(i)) for i, b in enumerate(model.blocks)]
    try:
        row = evaluate(model, corpus, cfg, acc)
    finally:
        for h in handles:
            h.remove()
    assert model.training, "evaluation must give the model back in the mode it found it"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(b.ffn.load_E.sum() == 0 for b in model.blocks), "evaluation fed the aux-loss-free bias's loads"
    for i, load in picks.items():
        assert load.sum() == 2 * ((len(corpus.val.tokens) - 1) // cfg.train.seq_len) * cfg.train.seq_len
        assert row[f"layer{i}/val_max_vio"] == pytest.approx(max_vio(load), abs=1e-6)
    assert row["val_max_vio"] == pytest.approx(sum(max_vio(v) for v in picks.values()) / 2, abs=1e-6)


def test_a_dense_model_reports_no_maxvio():
    cfg = load_config(LMRunConfig, TINY, ["data.val_tokens=500"])
    row = evaluate(build_model(cfg), build_corpus(cfg.data), cfg, Accelerator(cpu=True))
    assert "val_loss" in row and not any("max_vio" in k for k in row)
