"""The toy LM and its trainer: causality, learning, resume, checkpoints, NaN, bad input, DDP."""

import json
import re
from pathlib import Path

import pytest
import torch

from models.transformer import Transformer, TransformerConfig
from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.data import BPETokenizer
from train.lm import RESUME_SAFE, LMRunConfig, ModelTooLarge, NonFiniteLoss, main, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/lm/tiny.yaml")


def tiny(tmp_path, *overrides):
    return load_config(LMRunConfig, TINY, [f"out_dir={tmp_path}", *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- the model ---------------------------------------------------------------------------


def test_shapes_and_causality():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=32, ffn_hidden=64)).eval()
    idx = torch.randint(50, (2, 16))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, 50) and out.loss.ndim == 0 and out.aux == {}
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    diff = (model(changed).logits - out.logits).abs().amax(dim=(0, 2))
    assert diff[:10].max() == 0, "a future token changed an earlier logit"
    assert diff[10:].min() > 0, "the changed token should affect its own and later positions"


def test_parameter_and_flop_counts():
    cfg = TransformerConfig(vocab_size=256, n_layer=2, d_model=32, n_head=2, ffn_hidden=64)
    model = Transformer(cfg)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert model.num_parameters() == 256 * 32 + 2 * per_layer + 32
    assert model.active_parameters() == model.num_parameters()
    assert model.flops_per_token(16) == 6 * (model.num_parameters() - 5 * 32) + 12 * 2 * 32 * 16


def test_grouped_query_attention_and_untied_head_counts():
    cfg = TransformerConfig(vocab_size=256, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64, tie_embeddings=False)
    model = Transformer(cfg)
    per_layer = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32  # k and v: 2 heads of 8
    assert model.num_parameters() == 2 * 256 * 32 + 2 * per_layer + 32
    assert model.flops_per_token(16) == 6 * (model.num_parameters() - 5 * 32 - 256 * 32) + 12 * 2 * 32 * 16
    with pytest.raises(ValueError, match="n_kv_head=3 must divide model.n_head=4"):
        TransformerConfig(n_head=4, n_kv_head=3)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """n_kv_head=2 of 4 heads: the same function as full attention whose k/v weights repeat each kv head
    for its group of query heads (heads 0, 1 share kv head 0, as in transformers' repeat_kv)."""
    torch.manual_seed(0)
    small = Transformer(TransformerConfig(vocab_size=50, max_seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                          ffn_hidden=64)).eval()
    full = Transformer(TransformerConfig(vocab_size=50, max_seq_len=16, n_layer=2, n_head=4, d_model=32, ffn_hidden=64)).eval()
    state = small.state_dict()
    for i in range(2):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([32, 16, 16])
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k.view(2, 8, 32).repeat_interleave(2, 0).flatten(0, 1),
                                                          v.view(2, 8, 32).repeat_interleave(2, 0).flatten(0, 1)])
    full.load_state_dict(state)
    idx = torch.randint(50, (2, 16))
    torch.testing.assert_close(small(idx).logits, full(idx).logits)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_kv_cache_equals_full_recomputation(ffn):
    from train.lm import build_model
    cfg = load_config(LMRunConfig, TINY, [f"model.ffn={ffn}", "model.n_kv_head=1", "model.tie_embeddings=false"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    idx = torch.randint(256, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    parts = [model(idx[:, :7], cache=cache).logits]                 # a prompt
    parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(7, 17)]  # one token at a time
    parts.append(model(idx[:, 17:], cache=cache).logits)             # a chunk after a past
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model(torch.zeros(2, 13, dtype=torch.long), cache=cache)


# ---- training ------------------------------------------------------------------------------


def test_loss_goes_down_and_run_dir_is_complete(tmp_path):
    summary = train(tiny(tmp_path))
    rows = metrics(summary["run_dir"])
    assert rows[-1]["val_loss"] < rows[0]["train_loss"] - 1.0
    run = Path(summary["run_dir"])
    for name in ("config.yaml", "loss.png", "summary.json", ckpt.DONE_MARKER):
        assert (run / name).exists(), name
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s"} <= rows[0].keys()
    # the saved config loads back to the same config
    assert load_config(LMRunConfig, run / "config.yaml") == tiny(tmp_path)


def test_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    train(tiny(tmp_path))
    before = (tmp_path / "tiny/metrics.jsonl").read_text()
    assert main([TINY, f"out_dir={tmp_path}"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "tiny/metrics.jsonl").read_text() == before
    assert main([TINY, "--overwrite", f"out_dir={tmp_path}", "train.steps=10"]) == 0  # flags may sit among overrides
    assert metrics(tmp_path / "tiny")[-1]["step"] == 10


def test_resume_is_exact(tmp_path):
    full = train(tiny(tmp_path / "a"))
    train(tiny(tmp_path / "b", "train.stop_at=20"))
    assert not (tmp_path / "b/tiny" / ckpt.DONE_MARKER).exists()
    train(tiny(tmp_path / "b"), resume=True)
    a, b = metrics(full["run_dir"]), metrics(tmp_path / "b/tiny")
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [{k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.parametrize("change", ["train.lr=0.001", "data.seed=1", "data.n_samples=1000", "train.batch_size=4",
                                    "model.n_layer=3"])
def test_resume_with_a_changed_config_is_refused_and_lists_the_keys(tmp_path, capsys, change):
    train(tiny(tmp_path, "train.stop_at=10"))
    before = metrics(tmp_path / "tiny")
    key, value = change.split("=")
    assert main([TINY, f"out_dir={tmp_path}", change, "train.steps=60", "--resume", "--allow-changes"]) == 2
    err = capsys.readouterr().err
    assert f"with a different config, it would mix two in one run: {key} " in err and f"-> {value}" in err.replace("'", "")
    assert "train.steps" not in err.split(". Resume")[0]  # allowed with --allow-changes: not listed
    assert metrics(tmp_path / "tiny") == before


def test_resume_allows_named_safe_changes_and_records_them(tmp_path, capsys):
    train(tiny(tmp_path, "train.stop_at=10"))
    assert main([TINY, f"out_dir={tmp_path}", "train.steps=50", "--resume"]) == 2
    assert "train.steps 40 -> 50" in capsys.readouterr().err
    assert main([TINY, f"out_dir={tmp_path}", "train.steps=50", "log.log_every=10", "--resume", "--allow-changes"]) == 0
    assert metrics(tmp_path / "tiny")[-1]["step"] == 50
    [record] = [json.loads(line) for line in (tmp_path / "tiny/config_changes.jsonl").read_text().splitlines()]
    assert record == {"step": 10, "changes": {"train.steps": [40, 50], "log.log_every": [5, 10]}}
    assert load_config(LMRunConfig, tmp_path / "tiny/config.yaml").train.steps == 50
    assert {"train.steps", "log.log_every"} <= set(RESUME_SAFE)


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete state"])
def test_resume_skips_a_broken_newest_checkpoint_for_the_previous_one(tmp_path, capsys, damage):
    train(tiny(tmp_path, "train.stop_at=20"))
    newest = ckpt.latest_checkpoint(tmp_path / "tiny")
    assert newest.name == "step_00000020" and (newest.parent / "step_00000010").is_dir()
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "zero":
        weights.write_bytes(bytes(weights.stat().st_size))
    else:
        (newest / "state.pt").unlink()
    assert main([TINY, f"out_dir={tmp_path}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step_00000010 (step 10); skipped" in out and str(newest) in out
    rows = metrics(tmp_path / "tiny")
    assert [r["step"] for r in rows] == list(range(5, 41, 5))


def test_resume_with_no_checkpoint_that_loads_names_the_file(tmp_path, capsys):
    train(tiny(tmp_path, "train.stop_at=10"))
    broken = ckpt.latest_checkpoint(tmp_path / "tiny") / "model.safetensors"
    broken.write_bytes(b"")
    assert main([TINY, f"out_dir={tmp_path}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{broken} is broken" in err and "start again with --overwrite" in err


def test_keeps_the_newest_checkpoints(tmp_path):
    train(tiny(tmp_path, "log.keep_checkpoints=2"))
    assert sorted(p.name for p in (tmp_path / "tiny/checkpoints").glob("step_*")) == ["step_00000030", "step_00000040"]


def test_an_absurd_model_fails_before_any_work_naming_the_sizes(tmp_path, capsys, monkeypatch):
    def no_data(*args):
        raise AssertionError("the corpus was built before the size check")

    monkeypatch.setattr("train.lm.build_corpus", no_data)
    assert main([TINY, f"out_dir={tmp_path}", "model.d_model=100000", "model.n_head=1"]) == 2
    err = capsys.readouterr().err
    assert "parameters need about" in err and "GiB for weights, gradients and AdamW state" in err and "free on" in err
    with pytest.raises(ModelTooLarge, match="too large to build"):  # too large even to count its bytes
        train(tiny(tmp_path, "model.d_model=1000000000", "model.n_head=1"))
    assert not any(tmp_path.iterdir())


def test_summary_throughput_is_tokens_over_wall_time_and_train_loss_a_window_mean(tmp_path):
    every = train(tiny(tmp_path / "a", "train.steps=10", "log.log_every=1", "log.eval_every=10"))
    fives = train(tiny(tmp_path / "b", "train.steps=10", "log.log_every=5", "log.eval_every=10"))
    s = json.loads((Path(fives["run_dir"]) / "summary.json").read_text())
    assert s["tokens"] == 10 * 8 * 32 and s["wall_s"] > 0
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["wall_s"], rel=1e-3)
    assert s["tokens_per_s_median_window"] > 0
    per_step = [r["train_loss"] for r in metrics(every["run_dir"])]
    means = [r["train_loss"] for r in metrics(fives["run_dir"])]
    assert means == pytest.approx([sum(per_step[:5]) / 5, sum(per_step[5:]) / 5], abs=2e-5)


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train(tiny(tmp_path, "train.stop_at=10"))
    run = tmp_path / "tiny"
    good = ckpt.latest_checkpoint(run)
    weights, _ = ckpt.load_checkpoint(good)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # the weights file is written, the state file is not
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path), resume=True)
    assert ckpt.latest_checkpoint(run) == good
    again, state = ckpt.load_checkpoint(good)
    assert state["step"] == 10 and all(torch.equal(again[k], weights[k]) for k in weights)
    assert not list(run.glob("checkpoints/**/*.tmp"))
    monkeypatch.undo()
    assert train(tiny(tmp_path), resume=True)["finished"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = Transformer.forward
    calls = {"n": 0}

    def flaky(self, idx, targets=None):
        out = real(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 13:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", flaky)
    with pytest.raises(NonFiniteLoss, match="at step 13"):
        train(tiny(tmp_path))
    good = ckpt.latest_checkpoint(tmp_path / "tiny")
    weights, state = ckpt.load_checkpoint(good)
    assert state["step"] == 10 and all(torch.isfinite(w).all() for w in weights.values())


# ---- bad input -------------------------------------------------------------------------------

BAD = [
    (["model.n_layr=3"], "did you mean 'model.n_layer'"),
    (["train.lr=fast"], "train.lr"),
    (["train.lr=-0.1"], "train.lr=-0.1 must be > 0"),
    (["model.n_layer=0"], "model.n_layer=0 must be >= 1"),
    (["model.n_head=3"], "model.n_head=3 must divide model.d_model=32"),
    (["data.path=/no/such/corpus.txt"], "data.path=/no/such/corpus.txt: no such file"),
    (["train.seq_len=64"], "train.seq_len=64 must be <= model.max_seq_len=32"),
    (["model.ffn=sparse"], "model.ffn='sparse' must be"),
    (["train.steps"], "must look like key.sub=value"),
    (["model={a:[1]"], "override 'model={a:[1]': its value is not valid YAML"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[o[0] for o, _ in BAD])
def test_bad_config_fails_before_writing(tmp_path, capsys, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(tmp_path, *overrides)
    assert main([TINY, f"out_dir={tmp_path}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_too_little_data_fails_before_writing(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("only a few words here\n" * 3)
    out = tmp_path / "runs"
    assert main([TINY, f"out_dir={out}", f"data.path={tmp_path / 'short.txt'}", "data.val_fraction=0.5"]) == 2
    assert "split" in capsys.readouterr().err and not out.exists()


def test_bpe_run_saves_its_tokenizer_and_resumes_with_it(tmp_path, monkeypatch):
    overrides = ["data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=300"]
    train(tiny(tmp_path, "train.stop_at=10", *overrides))
    assert (tmp_path / "tiny/tokenizer.json").exists()

    def retrain(*args):
        raise AssertionError("a resumed run retrained its tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", retrain)
    assert train(tiny(tmp_path, *overrides), resume=True)["finished"]


def test_missing_config_file_and_bad_base(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(LMRunConfig, tmp_path / "loop.yaml")


# ---- two processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_at_equal_global_batch(tmp_path, one_and_two_processes):
    one_and_two_processes([TINY, "train.steps=12", "log.log_every=1", "log.eval_every=6", "model.dropout=0.0"], 8, 29517)
    a, b = metrics(tmp_path / "one/tiny"), metrics(tmp_path / "two/tiny")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 12
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    # same windows, gradients averaged by DDP: only float summation order differs
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 2e-3, (x, y)
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 2e-3


# ---- logging users already read ----------------------------------------------------------------


def test_curves_command_plots_several_runs(tmp_path, capsys):
    from train.curves import main as curves_main
    for name in ("a", "b"):
        train(tiny(tmp_path, f"run_name={name}", "train.steps=10", "log.eval_every=5", "log.ckpt_every=10"))
    out = tmp_path / "curves.png"
    assert curves_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert curves_main([str(tmp_path / "a"), "--out", str(out)]) == 2          # kept without --overwrite
    assert "exists" in capsys.readouterr().err
    assert curves_main([str(tmp_path / "a"), "--metric", "val_los", "--out", str(tmp_path / "x.png")]) == 2
    assert "no 'val_los' in its metrics; it has" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_tensorboard_logging_is_optional(tmp_path):
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="needs the tensorboard package"):
            tiny(tmp_path, "log.tensorboard=true")
        return
    run = Path(train(tiny(tmp_path, "log.tensorboard=true", "train.steps=10"))["run_dir"])
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
