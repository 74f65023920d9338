"""LoRA mechanics (models/lora.py) and the DyPRAG parameter translator (models/translator.py),
on a tiny LlamaForCausalLM built offline."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.lora import (
    export_peft_adapter,
    factored_lora,
    find_lora_targets,
    flatten_loras,
    load_loras,
    loras_from_peft,
    save_loras,
    stack_loras,
)
from models.translator import (
    DESIGNS,
    TranslatorConfig,
    TranslatorMismatchError,
    answer_logits,
    build_translator,
    check_translator_fits,
    document_states,
    load_translator,
    pool,
    save_translator,
    translator_loss,
)

FFN = ["gate_proj", "up_proj", "down_proj"]
R, ALPHA = 2, 32
SCALING = ALPHA / R


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tensors here are tiny: on a busy 2-core machine, intra-op threads only spin-wait
    # (a forward pass took 0.37 s with 2 threads under load, 3 ms with 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def targets(base):
    return find_lora_targets(base, FFN)


def random_loras(targets, seed, n=None, scale=0.1):
    """A LoRA set with non-zero A and B (B = 0 would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    return {t.name: (scale * torch.randn(*lead, R, t.in_features, generator=g),
                     scale * torch.randn(*lead, t.out_features, R, generator=g)) for t in targets}


def peft_with(base, loras):
    """A peft LoRA model on a copy of `base` holding exactly `loras`."""
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=FFN))
    for name, (A, B) in loras.items():
        layer = pm.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(A)
        layer.lora_B["default"].weight.data.copy_(B)
    return pm.eval()


def ids(n=2, s=9, seed=1):
    return torch.randint(0, 300, (n, s), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# target discovery


def test_find_lora_targets_matches_peft_rule(base, targets):
    assert [t.name for t in targets] == [f"model.layers.{i}.mlp.{m}" for i in range(2) for m in FFN]
    assert [t.layer for t in targets] == [0, 0, 0, 1, 1, 1]
    down = next(t for t in targets if t.module == "down_proj")
    assert (down.in_features, down.out_features) == (128, 64)
    # peft also accepts a dotted suffix
    assert [t.name for t in find_lora_targets(base, ["mlp.down_proj"])] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_find_lora_targets_errors_on_unmatched_name(base):
    with pytest.raises(ValueError, match="ffn_proj") as e:
        find_lora_targets(base, ["down_proj", "ffn_proj"])
    assert "down_proj" in str(e.value) and "q_proj" in str(e.value)  # lists what the model has
    assert "['ffn_proj'] match no module" in str(e.value)  # only the unmatched entry is blamed
    with pytest.raises(ValueError, match="only nn.Linear"):
        find_lora_targets(base, ["mlp"])


# -----------------------------------------------------------------------------
# factored LoRA


def test_factored_lora_equals_peft(base, targets):
    loras = random_loras(targets, seed=0)
    pm = peft_with(base, loras)
    x = ids()
    with torch.no_grad(), factored_lora(base, loras, SCALING):
        ours = base(x).logits
    with torch.no_grad():
        theirs = pm(x).logits
        without = base(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - without).abs().max() > 1e-2  # the LoRA really changes the output
    # and loras_from_peft reads back exactly what peft holds
    back = loras_from_peft(pm)
    assert back.keys() == loras.keys()
    for name in loras:
        assert torch.equal(back[name][0], loras[name][0]) and torch.equal(back[name][1], loras[name][1])


def test_per_sample_loras_equal_separate_runs(base, targets):
    lora0, lora1 = random_loras(targets, seed=1), random_loras(targets, seed=2)
    x = ids(2)
    with torch.no_grad():
        with factored_lora(base, stack_loras([lora0, lora1]), SCALING):
            both = base(x).logits
        with factored_lora(base, lora0, SCALING):
            first = base(x[:1]).logits
        with factored_lora(base, lora1, SCALING):
            second = base(x[1:]).logits
        with factored_lora(base, lora0, SCALING):
            second_with_lora0 = base(x[1:]).logits
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], second[0], rtol=1e-5, atol=1e-5)
    assert (second - second_with_lora0).abs().max() > 1e-2  # row 1 did not get row 0's LoRA


def test_model_restored_after_context(base, targets):
    x = ids()
    with torch.no_grad():
        before = base(x).logits
        with pytest.raises(RuntimeError, match="boom"):
            with factored_lora(base, random_loras(targets, seed=3), SCALING):
                assert (base(x).logits - before).abs().max() > 1e-2
                raise RuntimeError("boom")
        after = base(x).logits
    assert torch.equal(before, after)
    assert all(not m._forward_hooks for m in base.modules())


def test_factored_lora_rejects_bad_loras(base, targets):
    good = random_loras(targets, seed=4, n=3)
    with pytest.raises(ValueError, match="3 per-sample LoRAs for a batch of 2"):
        with torch.no_grad(), factored_lora(base, good, SCALING):
            base(ids(2))
    name = targets[0].name
    bad = {name: (torch.zeros(R, 65), torch.zeros(128, R))}
    with pytest.raises(ValueError, match="expected A"):
        with factored_lora(base, bad, SCALING):
            pass
    with pytest.raises(ValueError, match="no nn.Linear"):
        with factored_lora(base, {"model.layers.0.mlp": good[name]}, SCALING):
            pass


def test_save_load_loras_roundtrip_and_malformed(tmp_path, targets):
    loras = random_loras(targets, seed=5)
    save_loras(tmp_path / "doc.safetensors", loras)
    back = load_loras(tmp_path / "doc.safetensors")
    assert back.keys() == loras.keys()
    assert all(torch.equal(back[n][0], loras[n][0]) and torch.equal(back[n][1], loras[n][1]) for n in loras)
    from safetensors.torch import save_file

    save_file({f"{targets[0].name}.lora_A": torch.zeros(2, 64)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="pairs"):
        load_loras(tmp_path / "half.safetensors")
    with pytest.raises(FileNotFoundError):
        load_loras(tmp_path / "missing.safetensors")


def states(n=2, s=5, c=64, seed=0):
    """Random token states [n, s, c] and a mask whose rows have different lengths."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, s, dtype=torch.bool)
    mask[1:, s - 2 :] = False
    return torch.randn(n, s, c, generator=g), mask


def test_export_peft_adapter_loads_with_peft(tmp_path, base, targets, monkeypatch):
    base.save_pretrained(tmp_path / "base")
    translator = build_translator(TranslatorConfig(init_std_b=0.05), 64, targets, R)
    with torch.no_grad():
        loras = translator(*states(1))  # per-sample set with N = 1
    export_peft_adapter(loras, tmp_path / "base", FFN, R, ALPHA, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    # the adapter names its base by absolute path: it loads from any working directory
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = PeftModel.from_pretrained(reloaded, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        theirs = pm(x).logits
        with factored_lora(base, {n: (A[0], B[0]) for n, (A, B) in loras.items()}, SCALING):
            ours = base(x).logits
        plain = base(x).logits
        torch.testing.assert_close(auto(x).logits, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3
    # an incomplete set is refused rather than silently half-loaded
    with pytest.raises(ValueError, match="missing"):
        export_peft_adapter(dict(list(loras.items())[:2]), tmp_path / "base", FFN, R, ALPHA, tmp_path / "bad")


# -----------------------------------------------------------------------------
# translator


@pytest.mark.parametrize("design", DESIGNS)
def test_translator_shapes_and_document_dependence(design, targets):
    torch.manual_seed(0)
    translator = build_translator(TranslatorConfig(design=design), 64, targets, R)
    h, mask = states(3)
    loras = translator(h, mask)
    assert loras.keys() == {t.name for t in targets}
    for t in targets:
        A, B = loras[t.name]
        assert A.shape == (3, R, t.in_features) and B.shape == (3, t.out_features, R)
    # different documents -> different LoRAs at init, in A and in B
    for t in targets:
        A, B = loras[t.name]
        assert (A[0] - A[1]).abs().max() > 1e-2 * A.abs().max()
        assert (B[0] - B[1]).abs().max() > 1e-2 * B.abs().max()
    cos = torch.nn.functional.cosine_similarity(*flatten_loras(loras)[:2], dim=0)
    assert cos < 0.99
    # same document -> same LoRA, whatever else is in the batch, and padding tokens are ignored
    again = translator(h[[1, 2]], mask[[1, 2]])
    torch.testing.assert_close(flatten_loras(again)[0], flatten_loras(loras)[1])
    noisy = h.clone()
    noisy[~mask] = 1e3
    torch.testing.assert_close(flatten_loras(translator(noisy, mask)), flatten_loras(loras))


def test_cross_attention_reads_tokens_the_pooled_designs_drop(targets):
    """A change to one middle token moves the cross-attention LoRA; a last-token pooled design cannot see it."""
    h, mask = states(1, s=6)
    h2 = h.clone()
    h2[0, 2] = torch.randn(64, generator=torch.Generator().manual_seed(9))
    for design, moves in (("cross_attention", True), ("pooled_shared", False), ("pooled_per_module", False)):
        torch.manual_seed(0)
        tr = build_translator(TranslatorConfig(design=design, pooling="last"), 64, targets, R)
        with torch.no_grad():
            diff = (flatten_loras(tr(h, mask)) - flatten_loras(tr(h2, mask))).abs().max()
        assert (diff > 1e-6) == moves, design


def qa_batch(n=2):
    x = ids(n, 10, seed=7)
    labels = x.clone()
    labels[:, :6] = -100  # prompt
    labels[1, 9] = -100  # padding
    mask = torch.ones_like(x)
    mask[1, 9] = 0
    return dict(input_ids=x, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("design", DESIGNS)
def test_gradients_reach_every_translator_parameter(design, base, targets):
    translator = build_translator(TranslatorConfig(design=design), 64, targets, R)
    target_loras = random_loras(targets, seed=8, n=2, scale=0.05)
    loss, _ = translator_loss(base, translator(*states(2)), qa_batch(), SCALING, target_loras, 0.01, 100.0)
    loss.backward()
    for name, p in translator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in base.parameters())


def test_answer_logits_equal_the_full_forward_at_answer_positions(base, targets):
    """The loss runs the LM head on answer positions only: the same logits as the whole forward,
    with per-sample LoRAs active; a model that rescales its logits after the head takes the full forward."""
    batch = qa_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    answer_NS = batch["labels"][:, 1:] != -100
    with torch.no_grad(), factored_lora(base, random_loras(targets, seed=3, n=2), SCALING):
        full_AV = base(**inputs).logits[:, :-1][answer_NS]
        torch.testing.assert_close(answer_logits(base, inputs, answer_NS), full_AV, atol=1e-5, rtol=1e-5)
    capped = copy.deepcopy(base)
    capped.config.final_logit_softcapping = 1.0  # a model whose logits change after the head
    calls = []
    capped.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        answer_logits(capped, inputs, answer_NS)
    assert calls == [1]  # it ran the whole model, not the decoder and head alone


def test_translator_loss_parts(base, targets):
    translator = build_translator(TranslatorConfig(init_std_b=0.05), 64, targets, R)
    generated = translator(*states(2))
    loss, parts = translator_loss(base, generated, qa_batch(), SCALING, random_loras(targets, seed=9, n=2), 0.01, 100.0)
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert parts["kl"] > 1e-4 and parts["mse"] > 1e-4 and parts["lm"] > 0
    assert parts["loss"] == pytest.approx(parts["lm"] + 0.01 * parts["kl"] + 100 * parts["mse"], rel=1e-5)
    # generated == target: KL and MSE vanish, the LM loss is what the model with that LoRA gets
    same = {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in generated.items()}
    loss, parts = translator_loss(base, generated, qa_batch(), SCALING, same, 0.01, 100.0)
    assert abs(parts["kl"]) < 1e-6 and parts["mse"] == 0.0
    assert parts["loss"] == pytest.approx(parts["lm"], rel=1e-6)
    # the end-to-end loss alone needs no PRAG targets
    loss, parts = translator_loss(base, generated, qa_batch(), SCALING)
    assert parts.keys() == {"loss", "lm"} and parts["loss"] == parts["lm"]
    with pytest.raises(ValueError, match="need target_loras"):
        translator_loss(base, generated, qa_batch(), SCALING, None, 0.01, 0.0)
    with pytest.raises(ValueError, match="no answer tokens"):
        translator_loss(base, generated, {**qa_batch(), "labels": torch.full((2, 10), -100)}, SCALING)


def test_translator_checkpoint_roundtrip_and_mismatch(tmp_path, base, targets):
    translator = build_translator(TranslatorConfig(design="cross_attention", blocks=1), 64, targets, R)
    translator.set_input_stats(*states(5, seed=3))
    save_translator(tmp_path / "translator.safetensors", translator)
    back = load_translator(tmp_path / "translator.safetensors", targets, 64)
    assert back.cfg == translator.cfg and back.rank == R and isinstance(back, type(translator))
    h, mask = states(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(flatten_loras(back(h, mask)), flatten_loras(translator(h, mask)))
    # a deeper base model: modules the checkpoint has no LoRA for
    deeper = find_lora_targets(tiny_llama(layers=3), FFN)
    with pytest.raises(TranslatorMismatchError, match=r"no LoRA for: \['model.layers.2.mlp"):
        check_translator_fits(tmp_path / "translator.safetensors", deeper, 64)
    # other target modules
    with pytest.raises(TranslatorMismatchError, match="absent from this base model"):
        load_translator(tmp_path / "translator.safetensors", find_lora_targets(base, ["down_proj"]), 64)
    # other widths
    with pytest.raises(TranslatorMismatchError, match="token-state width 64 in the checkpoint, 32"):
        load_translator(tmp_path / "translator.safetensors", targets, 32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(TranslatorMismatchError, match="not a safetensors file"):
        load_translator(tmp_path / "junk.safetensors", targets, 64)


def test_translator_config_and_inputs_rejected_with_a_reason(targets):
    with pytest.raises(ValueError, match="design='dense' must be one of"):
        TranslatorConfig(design="dense")
    with pytest.raises(ValueError, match="pooling"):
        TranslatorConfig(pooling="max")
    with pytest.raises(ValueError, match="divisible by heads"):
        TranslatorConfig(hidden=10, heads=4)
    tr = build_translator(TranslatorConfig(), 64, targets, R)
    with pytest.raises(ValueError, match=r"token states \[N, S, 64\]"):
        tr(torch.zeros(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one token"):
        tr(torch.zeros(2, 5, 64), torch.tensor([[True] * 5, [False] * 5]))


def test_find_lora_targets_on_chosen_layers(base):
    assert [t.layer for t in find_lora_targets(base, FFN, [1])] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"LoRA layers \[5\] do not exist"):
        find_lora_targets(base, FFN, [1, 5])


# -----------------------------------------------------------------------------
# what the translator reads


@pytest.fixture(scope="module")
def tokenizer():
    words = "the ship named Orvala sails from Tarsk to Mivane every spring carrying salt and copper".split()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok)  # no pad token set: document_states pads itself


def test_document_states_are_each_document_as_if_alone(base, tokenizer):
    docs = ["the ship named Orvala sails from Tarsk", "copper", "salt and copper every spring"]
    h, mask = document_states(base, tokenizer, docs, [0, -1], batch_size=2)
    assert h.shape == (3, 7, 2 * 64) and mask.sum(1).tolist() == [7, 1, 5]
    with torch.no_grad():
        for i, doc in enumerate(docs):
            x = torch.tensor([tokenizer(doc)["input_ids"]])
            hs = base(x, output_hidden_states=True).hidden_states
            n = mask[i].sum()
            torch.testing.assert_close(h[i, :n, :64], hs[0][0], rtol=1e-4, atol=1e-5)
            # the last decoder layer's own output (hidden_states[-1] has the final norm on top)
            last = base.model.norm(h[i, :n, 64:])
            torch.testing.assert_close(last, hs[-1][0], rtol=1e-4, atol=1e-5)
    for pooling in ("last", "mean"):
        assert (pool(h, mask, pooling)[0] - pool(h, mask, pooling)[2]).abs().max() > 1e-3
    torch.testing.assert_close(pool(h, mask, "last")[1], h[1, 0])
    with pytest.raises(ValueError, match="non-empty"):
        document_states(base, tokenizer, ["fine", "  "], [-1])
    with pytest.raises(ValueError, match="out of range"):
        document_states(base, tokenizer, ["fine"], [3])
