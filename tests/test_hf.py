"""transformers round trips: export (dense -> Llama, MoE -> Mixtral / Qwen2-MoE / GLM-4-MoE) with equal logits,
greedy generate() equal to our sampler, fast tokenizers, a peft LoRA on the export, clear errors before
anything is written; the sampler itself."""

import json
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.export import main as export_main
from train.lm import LMRunConfig, build_model, train
from train.sampling import generate
from train.trained import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/lm/tiny.yaml")

# name -> (overrides, the architecture it must export as)
EXPORTS = {
    "dense_gqa_untied": (["model.n_kv_head=1", "model.tie_embeddings=false", "model.rope_theta=500.0",
                          "model.norm_eps=1e-6"], "LlamaForCausalLM"),
    "mixtral": (["model.ffn=moe", "moe.n_routed_experts=4", "moe.norm_topk=true"], "MixtralForCausalLM"),
    "gshard_qwen2": (["model.ffn=moe", "moe.n_routed_experts=4", "model.first_k_dense=1"], "Qwen2MoeForCausalLM"),
    "qwen2_shared": (["model.ffn=moe", "moe.n_shared_experts=1", "moe.shared_gate=true", "moe.shared_expert_hidden=24"],
                     "Qwen2MoeForCausalLM"),
    "deepseek_v3_router": (["model.ffn=moe", "moe.score_func=sigmoid", "moe.n_routed_experts=8", "moe.top_k=2",
                            "moe.n_groups=4", "moe.topk_groups=2", "moe.route_scale=2.5", "moe.norm_topk=true",
                            "moe.n_shared_experts=1", "moe.bias_update_rate=0.05", "model.first_k_dense=1"],
                           "Glm4MoeForCausalLM"),
}


def tiny_run(tmp_path, name, *overrides):
    cfg = load_config(LMRunConfig, TINY, [f"out_dir={tmp_path}", f"run_name={name}", "train.steps=6", "train.warmup_steps=1",
                                          "log.eval_every=6", "log.ckpt_every=6", *overrides])
    return Path(train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {name: tiny_run(tmp, name, *overrides) for name, (overrides, _) in EXPORTS.items()}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_offline_with_equal_logits_and_generate(runs, tmp_path, name, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "export"
    assert export_main([str(runs[name]), "--out", str(out)]) == 0
    assert EXPORTS[name][1] in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == EXPORTS[name][1]
    assert not list(out.glob("*.py")), "the export must need no custom code"
    run = load_run(runs[name])
    if name == "deepseek_v3_router":  # the learned expert bias is exported, and matters
        assert run.model.blocks[1].ffn.router.expert_bias.abs().max() > 0
    text = "12+34=46\nsort 3 1 2 -> 1 2 3\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == run.tokenizer.encode(text) and tok.decode(ids[0]) == text
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run.model(ids).logits, atol=1e-4, rtol=0)
    prompt = run.tokenizer.encode("rev abc ->")
    ours = list(generate(run.model, prompt, 12, temperature=0))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert theirs == ours


def test_peft_lora_attaches_to_an_export(runs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = tmp_path / "export"
    assert export_main([str(runs["gshard_qwen2"]), "--out", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(256, (2, 16))
    with torch.no_grad():
        before = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    out_ = model(ids, labels=ids)
    torch.testing.assert_close(out_.logits, before)  # LoRA's B starts at zero
    out_.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bpe_tokenizer_exports_as_the_same_fast_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    run = tiny_run(tmp_path, "bpe", "data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=300",
                   "train.steps=2", "log.eval_every=2", "log.ckpt_every=2")
    assert export_main([str(run), "--out", str(tmp_path / "export")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    ours = load_run(run).tokenizer
    text = "def f(x): return x * 3\nThe red fox sees a cat. ünïcode"
    assert tok(text).input_ids == ours.encode(text) and len(set(ours.encode(text))) > 10
    assert tok.decode(ours.encode(text)) == text


def test_unexportable_config_errors_before_writing(tmp_path, capsys):
    # deepseekmoe.yaml's layer: softmax scores not renormalised + ungated shared experts + a dense first layer
    run = tiny_run(tmp_path, "dsmoe", "model.ffn=moe", "model.first_k_dense=1", "moe.n_shared_experts=1")
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mixtral lacks moe.norm_topk=false" in err and "qwen2_moe lacks moe.shared_gate=false" in err
    assert "glm4_moe lacks moe.score_func='softmax'" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    # capacity at evaluation: no architecture drops tokens
    run = tiny_run(tmp_path, "cap", "model.ffn=moe", "moe.norm_topk=true", "moe.eval_capacity_factor=1.0")
    assert export_main([str(run), "--out", str(out)]) == 2
    assert "dropless only" in capsys.readouterr().err and not out.exists()


def test_export_never_overwrites_and_names_a_bad_run(runs, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert export_main([str(runs["mixtral"]), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert export_main([str(tmp_path), "--out", str(tmp_path / "other")]) == 2
    assert "not a run directory" in capsys.readouterr().err and not (tmp_path / "other").exists()


# ---- the sampler -------------------------------------------------------------------------------


def test_sampler_greedy_top_k_and_seeds(runs):
    run = load_run(runs["mixtral"])
    prompt = run.tokenizer.encode("sort 5 1 ->")
    greedy = list(generate(run.model, prompt, 10, temperature=0))
    idx = list(prompt)  # greedy by full recomputation, no cache
    for _ in range(10):
        with torch.no_grad():
            idx.append(int(run.model(torch.tensor([idx])).logits[0, -1].argmax()))
    assert greedy == idx[len(prompt):]
    assert list(generate(run.model, prompt, 10, temperature=1.0, top_k=1)) == greedy
    draw = lambda seed: list(generate(run.model, prompt, 10, temperature=2.0, generator=torch.Generator().manual_seed(seed)))
    assert draw(0) == draw(0) and draw(0) != draw(1)
    with pytest.raises(ValueError, match="must fit model.max_seq_len=32"):
        list(generate(run.model, prompt, 32 - len(prompt) + 1))


def test_sample_command_streams_and_summary_has_domain_samples(runs, capsys):
    from train.sample import main as sample_main
    assert sample_main([str(runs["mixtral"]), "--prompt", "12+", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    run = load_run(runs["mixtral"])
    expected = run.tokenizer.decode(list(generate(run.model, run.tokenizer.encode("12+"), 8, temperature=0)))
    assert capsys.readouterr().out == "12+" + expected + "\n"
    samples = json.loads((runs["mixtral"] / "summary.json").read_text())["samples"]
    from train.data import DOMAINS
    assert set(samples) == {*DOMAINS, "knowledge"}  # the tiny config's corpus: every skill domain and the facts
    assert all(s["prompt"] for s in samples.values())
    assert sample_main([str(runs["mixtral"]), "--prompt", "x" * 40]) == 2


# ---- import: a transformers Llama-family folder as a run's start -------------------------------


def llama_folder(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    from train.data import ByteTokenizer
    from train.hf.tokenizer import to_fast_tokenizer
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 5e5}, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).save_pretrained(path)
    to_fast_tokenizer(ByteTokenizer(), 64).save_pretrained(path)
    return path


def test_import_llama_first_batch_loss_equals_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    from train.data import build_corpus, sample_windows
    folder = llama_folder(tmp_path / "llama")
    cfg = load_config(LMRunConfig, TINY, [f"out_dir={tmp_path}", f"init_from={folder}", "data.tokenizer=pretrained",
                                          "train.steps=1", "train.warmup_steps=0", "log.log_every=1", "log.eval_every=1"])
    summary = train(cfg)
    first = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    # the trainer's first global batch, redrawn
    corpus = build_corpus(cfg.data, folder)
    starts = torch.randint(len(corpus.train.tokens) - 33, (8,), generator=torch.Generator().manual_seed(cfg.train.seed))
    x, y, _ = sample_windows(corpus.train, starts, 32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        hf_loss = hf(input_ids=torch.cat([x, y[:, -1:]], 1), labels=torch.cat([x, y[:, -1:]], 1)).loss.item()
    assert abs(first["train_loss"] - hf_loss) < 1e-4 and hf_loss > 1.0
    saved = load_config(LMRunConfig, Path(summary["run_dir"]) / "config.yaml")
    assert (saved.model.n_kv_head, saved.model.tie_embeddings, saved.model.rope_theta, saved.model.vocab_size) == (2, False, 5e5, 300)
    # the run exports back to a Llama with the checkpoint's own tokenizer
    assert export_main([summary["run_dir"], "--out", str(tmp_path / "export")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, load_run(summary["run_dir"]).model(x).logits, atol=1e-4, rtol=0)
    assert (tmp_path / "export" / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_import_refuses_what_is_not_a_llama(tmp_path, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM
    from train.lm import main
    folder = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=2)).save_pretrained(folder)
    assert main([TINY, f"out_dir={tmp_path}", f"init_from={folder}", "data.tokenizer=pretrained"]) == 2
    assert "not a Llama-family model" in capsys.readouterr().err and not (tmp_path / "tiny").exists()
    llama = llama_folder(tmp_path / "llama", attention_bias=True)
    assert main([TINY, f"out_dir={tmp_path}", f"init_from={llama}", "data.tokenizer=pretrained"]) == 2
    assert "attention_bias" in capsys.readouterr().err and not (tmp_path / "tiny").exists()
    assert main([TINY, f"out_dir={tmp_path}", f"init_from={tmp_path}", "data.tokenizer=pretrained"]) == 2
    assert "neither a transformers model folder" in capsys.readouterr().err


# ---- upcycling ------------------------------------------------------------------------------------


def upcycled(run_dir, *overrides):
    from train import warmstart
    cfg = warmstart.resolve(load_config(LMRunConfig, TINY, [f"init_from={run_dir}", "model.ffn=moe", *overrides]))
    torch.manual_seed(1)
    model = build_model(cfg)
    warmstart.load_into(model, warmstart.initial_weights(cfg))
    return cfg, model.eval()


def test_copy_upcycled_moe_equals_the_dense_model_at_step_0(runs):
    dense = load_run(runs["dense_gqa_untied"]).model
    idx = torch.randint(256, (2, 32))
    with torch.no_grad():
        want = dense(idx).logits
        _, moe = upcycled(runs["dense_gqa_untied"], "upcycle=copy", "moe.n_routed_experts=4", "moe.top_k=2",
                          "moe.norm_topk=true")
        torch.testing.assert_close(moe(idx).logits, want, atol=1e-5, rtol=1e-5)
        # without renormalised weights (they sum to < 1) the function changes
        _, moe = upcycled(runs["dense_gqa_untied"], "upcycle=copy", "moe.n_routed_experts=4", "moe.top_k=2")
        assert not torch.allclose(moe(idx).logits, want, atol=1e-3)
        # dropping re-initialises half of each expert's hidden units, different ones per expert
        cfg, moe = upcycled(runs["dense_gqa_untied"], "upcycle=drop:0.5", "moe.n_routed_experts=4", "moe.top_k=2",
                            "moe.norm_topk=true")
    gate = dense.blocks[0].ffn.gate_up.weight[:64]                 # (H, D)
    experts = moe.blocks[0].ffn.experts.w_gate_up[:, :, :64]       # (E, D, H)
    kept = (experts.transpose(1, 2) == gate).all(dim=-1)           # (E, H): units still the dense ones
    assert (kept.sum(dim=1) == 32).all() and len({tuple(k.tolist()) for k in kept}) == 4
    assert cfg.moe.expert_hidden == 64


def test_granular_upcycling_cuts_add_up_to_the_dense_ffn():
    from models.upcycle import Upcycling, upcycle_experts
    torch.manual_seed(0)
    D, H, G = 8, 12, 3
    gate_up, down, x = torch.randn(2 * H, D), torch.randn(D, H), torch.randn(5, D)
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    dense = (torch.nn.functional.silu(gate) * up) @ down.T
    w_gate_up, w_down = upcycle_experts(gate_up, down, 2, Upcycling.parse(f"granular:{G}"))
    assert w_gate_up.shape == (2 * G, D, 2 * H // G) and w_down.shape == (2 * G, H // G, D)
    cuts = []
    for e in range(G, 2 * G):  # the second copy's cuts, each weighted 1/G
        g, u = (x @ w_gate_up[e]).chunk(2, dim=-1)
        cuts.append((torch.nn.functional.silu(g) * u) @ w_down[e] / G)
    torch.testing.assert_close(sum(cuts), dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be one of copy, drop:<r>, granular:<G>"):
        Upcycling.parse("drop:1.5")
