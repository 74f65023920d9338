"""The MoE layer inside the toy LM and its trainer."""

import json
import math
from pathlib import Path

import pytest
import torch

from models.moe import MoE, RoutedExperts
from models.transformer import SwiGLU
from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.data import build_corpus, sample_windows
from train.lm import LMRunConfig, build_model, train

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_have_equal_active_parameters():
    dense = build_model(load_config(LMRunConfig, ROOT / "configs/lm/dense.yaml")).active_parameters()
    for name in ("gshard", "deepseekmoe"):
        model = build_model(load_config(LMRunConfig, ROOT / f"configs/lm/{name}.yaml"))
        routers = sum(m.router.weight.numel() for m in model.modules() if isinstance(m, MoE))
        # every token uses as many expert weights as the dense FFN; only the routers are extra
        assert model.active_parameters() == dense + routers, name
        assert model.num_parameters() > 1.5 * model.active_parameters()


def test_layer_placement_follows_first_k_dense_and_frequency():
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml",
                      ["model.n_layer=5", "model.ffn=moe", "model.first_k_dense=1", "model.moe_layer_freq=2",
                       "moe.n_routed_experts=4", "moe.expert_hidden=16", "moe.top_k=1"])
    kinds = [type(b.ffn) for b in build_model(cfg).blocks]
    assert kinds == [SwiGLU, MoE, SwiGLU, MoE, SwiGLU]


def test_trainer_adds_aux_losses_logs_layer_metrics_and_steps_the_bias(tmp_path):
    overrides = [f"out_dir={tmp_path}", "train.steps=20", "model.ffn=moe", "model.first_k_dense=1",
                 "moe.n_routed_experts=4", "moe.expert_hidden=32", "moe.top_k=2", "moe.balance_alpha=0.01",
                 "moe.z_loss_coef=0.001", "moe.bias_update_rate=0.01"]
    train(load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml", [*overrides, "train.stop_at=10"]))
    summary = train(load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml", overrides), resume=True)
    run = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert "layer0/balance_loss" not in last, "layer 0 is dense"
    assert 0 < last["layer1/balance_loss"] < 0.1 and last["layer1/z_loss"] > 0
    assert {"layer1/max_vio", "layer1/drop_fraction", "layer1/router_entropy"} <= last.keys()
    assert (run / "expert_load.png").exists()
    assert summary["active_params"] < summary["params"]
    weights, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    # the load heatmap's counts survive the resume: all 20 steps' routed assignments are in them
    assert state["expert_load"]["layer1/tokens_per_expert"].sum() == 20 * 8 * 32 * 2
    bias = weights["blocks.1.ffn.router.expert_bias"]
    assert bias.abs().sum() > 0, "20 bias steps of 0.01 should have moved the bias"
    assert abs(bias.mean().item()) < 1e-6, "the bias is re-centred to mean zero"


def test_balance_loss_reaches_the_router_gradient():
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml",
                      ["model.ffn=moe", "moe.n_routed_experts=4", "moe.expert_hidden=16", "moe.top_k=1"])
    idx = torch.randint(256, (2, 16))
    grads = []
    for alpha in (0.0, 10.0):
        torch.manual_seed(0)
        cfg.moe.balance_alpha = alpha
        model = build_model(cfg)
        out = model(idx, idx)
        (out.loss + sum(v for a in out.aux.values() for v in a.losses.values())).backward()
        grads.append(model.blocks[0].ffn.router.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_moe_width_comes_from_the_model():
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml", ["model.ffn=moe", "model.d_model=48"])
    assert cfg.moe.d_model is None
    assert {b.ffn.cfg.d_model for b in build_model(cfg).blocks} == {48}
    with pytest.raises((ConfigError, ValueError), match="moe.d_model=64"):
        load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml", ["model.ffn=moe", "moe.d_model=64"])


def test_moe_init_std_reaches_every_moe_weight():
    """moe.init_std initialises all five MoE weight groups; output projections are depth-scaled as the model's are."""
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml",
                      ["model.ffn=moe", "model.first_k_dense=1", "model.d_model=64", "moe.n_routed_experts=8",
                       "moe.expert_hidden=64", "moe.n_shared_experts=1", "moe.shared_gate=true", "moe.init_std=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    moe, dense = model.blocks[1].ffn, model.blocks[0].ffn
    depth = 1 / math.sqrt(2 * cfg.model.n_layer)
    want = {moe.router.weight: 0.5, moe.experts.w_gate_up: 0.5, moe.shared.gate_up.weight: 0.5,
            moe.shared_gate.weight: 0.5, moe.experts.w_down: 0.5 * depth, moe.shared.down.weight: 0.5 * depth,
            dense.gate_up.weight: 0.02, dense.down.weight: 0.02 * depth, model.blocks[1].attn.out.weight: 0.02 * depth}
    for p, std in want.items():
        assert p.std().item() == pytest.approx(std, rel=0.25), tuple(p.shape)


def test_trainer_logs_aux_averaged_over_micro_batches(tmp_path):
    """Logged aux losses and metrics are the mean over every micro-batch of the step, like train_loss."""
    overrides = [f"out_dir={tmp_path}", "train.steps=1", "train.warmup_steps=0", "train.grad_accum=2",
                 "log.log_every=1", "model.ffn=moe", "moe.n_routed_experts=4", "moe.expert_hidden=16",
                 "moe.top_k=1", "moe.balance_alpha=0.1"]
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml", overrides)
    summary = train(cfg)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    # the same two micro-batches through the same initial model, by hand
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    corpus = build_corpus(cfg.data)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    c = cfg.train
    starts = torch.randint(len(corpus.train.tokens) - c.seq_len - 1, (2 * c.batch_size,), generator=gen).view(2, -1)
    outs = [model(*sample_windows(corpus.train, s, c.seq_len)[:2]) for s in starts]
    for key in ("layer0/balance_loss", "layer0/max_vio", "layer1/router_entropy"):
        values = [o.aux_losses.get(key, o.aux_metrics.get(key)).item() for o in outs]
        assert values[0] != pytest.approx(values[1], abs=1e-6), key  # else the mean proves nothing
        assert row[key] == pytest.approx(sum(values) / 2, abs=2e-6), key


def test_capacity_ablation_names_its_drop_policy_and_evaluates_as_trained():
    """The defaults are position dropping and dropless evaluation; the capacity ablation compares
    both policies, so every capacity variant pins the policy its name says and validates at its
    training capacity."""
    from train.sweep.spec import load_sweep
    sweep = load_sweep(ROOT / "configs/ablations/capacity.yaml")
    policies = set()
    for run in sweep.runs():
        moe = load_config(LMRunConfig, sweep.config, run.overrides).moe
        assert moe.capacity(1024, training=False) == moe.capacity(1024, training=True), run.variant
        if moe.capacity_factor is not None:
            assert run.variant.endswith(moe.drop_policy), run.variant
            policies.add(moe.drop_policy)
    assert policies == {"score", "position"}


@pytest.mark.slow
def test_compiled_lm_with_moe_matches_eager(monkeypatch):
    """torch.compile of a toy LM with MoE layers runs and matches eager, loss, aux losses and
    gradients; fp32 grouped_mm does not compile, so the layer falls back to padded_bmm and says so once."""
    cfg = load_config(LMRunConfig, ROOT / "configs/lm/tiny.yaml",
                      ["model.ffn=moe", "moe.n_routed_experts=4", "moe.expert_hidden=32", "moe.top_k=2",
                       "moe.n_shared_experts=1", "moe.balance_alpha=0.01", "moe.z_loss_coef=0.001"])
    assert cfg.moe.dispatch == "fused"
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(cfg.model.vocab_size, (2, 16))
    torch._dynamo.reset()
    monkeypatch.setattr(RoutedExperts, "warned_compile", False)  # as in a fresh process
    compiled = torch.compile(model)
    results = []
    with pytest.warns(UserWarning, match="under torch.compile") as caught:
        for run in (model, compiled, compiled):
            model.zero_grad(set_to_none=True)
            out = run(idx, idx)
            aux = sum(out.aux_losses.values())
            (out.loss + aux).backward()
            results.append((out.loss.detach(), aux.detach(), [p.grad.clone() for p in model.parameters()]))
    assert sum("under torch.compile" in str(w.message) for w in caught) == 1
    eager = results[0]
    for got in results[1:]:
        torch.testing.assert_close(got[0], eager[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], eager[1], atol=1e-6, rtol=1e-5)
        for g, g_eager in zip(got[2], eager[2]):
            torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-4)
