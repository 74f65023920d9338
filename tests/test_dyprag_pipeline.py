"""DyPRAG pipeline end to end on the smoke config, plus its pieces and its input checks.

One smoke run (module fixture) is interrupted before its evaluation stage and
resumed; the tests then read what it wrote.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from models.lora import factored_lora, load_loras, stack_loras
from models.translator import TranslatorConfig, build_translator, document_states, load_translator, save_translator
from train.config import ConfigError
from train.dyprag import pipeline as dyprag
from train.dyprag.base import load_base
from train.dyprag.config import LoraShape
from train.dyprag.data import load_docs_jsonl, make_knowledge_set
from train.dyprag.evaluate import derangement
from train.dyprag.metrics import delta_matrix, exact_match, f1_score, mean_lora, normalize_answer
from train.dyprag.prag import initial_lora, train_batched, train_peft

SMOKE = "configs/dyprag/smoke.yaml"
DESIGNS = ["cross_attention", "pooled_shared", "pooled_per_module"]
STAGES = ["data", "base", "prag"] + [f"translator_{d}" for d in DESIGNS] + ["eval"]
SEEDS = [0, 1]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke config, killed at the start of evaluation, then run it again."""
    runs = tmp_path_factory.mktemp("runs")
    args = [SMOKE, f"runs_dir={runs}"]

    def crash(run):
        raise Interrupted

    mp = pytest.MonkeyPatch()
    mp.setattr(dyprag, "stage_eval", crash)
    with pytest.raises(Interrupted):
        dyprag.main(args)
    mp.undo()
    root = runs / "dyprag_smoke"
    run = root / "seed_0"  # the first seed was interrupted; the second never started
    before = {s: (run / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES[:-1]}
    assert not (run / "stages" / "eval.json").exists() and not (root / "seed_1").exists()
    assert dyprag.main(args) == 0
    return {"runs": runs, "root": root, "run": run, "args": args, "before": before}


def _err(capsys, argv) -> str:
    assert dyprag.main(argv) == 2
    return capsys.readouterr().err


# -----------------------------------------------------------------------------
# the run and its outputs


def test_resume_skips_finished_stages(smoke, capsys):
    run = smoke["run"]
    after = {s: (run / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES[:-1]}
    assert after == smoke["before"], "stages finished before the interruption were redone"
    assert (run / "stages" / "eval.json").is_file()
    assert (smoke["root"] / "seed_1" / "stages" / "eval.json").is_file()
    # a third run has nothing left to do but still prints the tables
    eval_mtime = (run / "stages" / "eval.json").stat().st_mtime_ns
    assert dyprag.main(smoke["args"]) == 0
    out = capsys.readouterr().out
    assert all(f"[dyprag seed {k}] every stage already done, skipped" in out for k in SEEDS)
    assert "| Standard RAG |" in out
    assert (run / "stages" / "eval.json").stat().st_mtime_ns == eval_mtime


def test_tables_have_all_rows(smoke):
    text = (smoke["root"] / "results.md").read_text()
    for split in ("test", "ood_values", "ood_all"):
        for design in DESIGNS:
            section = text.split(f"## Quality on {split} documents, translator `{design}`")[1].split("## ")[0]
            rows = ["Vanilla", "Standard RAG", "PRAG", "PRAG-Combine", "DyPRAG", "DyPRAG-Combine", "Shuffled doc (control)", "Mean LoRA (control)"]
            rows += ["DyPRAG, training docs (seen)", "PRAG, training docs (seen)", "Standard RAG (augmentation questions)",
                     "DyPRAG (augmentation questions)"] if split == "test" else []
            for row in rows:
                assert f"| {row} |" in section, (split, design, row)
            assert "| method (EM) | city | year | occupation | employer | pet |" in section
    assert "Seeds: 2 (seed_0, seed_1)" in text
    for row in ["PRAG LoRAs", "DyPRAG `cross_attention`", "PRAG fine-tune, batched (s/doc)", "PRAG (batched) / DyPRAG `pooled_shared`",
                "translator parameters `pooled_per_module`", "LoRA bytes stored per doc, PRAG (fp32)", "prompt tokens per question, Standard RAG",
                "| DyPRAG EM >= Standard RAG |", "| Shuffled doc (control) within 2 s.e. of Vanilla |"]:
        assert row in text, row
    for png in ["em_test.png", "em_ood_all.png", "translator_loss.png"]:
        assert (smoke["root"] / png).stat().st_size > 1000, png
    res = json.loads((smoke["run"] / "eval" / "results.json").read_text())
    # 4 test docs x 5 facts; RAG prompts carry the passage, DyPRAG prompts do not
    assert res["splits"]["test"]["rows"]["Vanilla"]["n"] == 20 and res["splits"]["ood_all"]["rows"]["Vanilla"]["n"] == 15
    assert res["prompt_tokens"]["rag"] > res["prompt_tokens"]["dyprag"] + 20
    # the augmentation-question rows ask the held-out documents' training-wording questions, not the evaluation ones
    docs = load_docs_jsonl(smoke["run"] / "data" / "test.jsonl")
    for rows in (res["splits"]["test"]["rows"], res["designs"]["cross_attention"]["rows"]["test"]):
        name = next(n for n in rows if n.endswith("(augmentation questions)"))
        asked = {x["question"] for x in rows[name]["examples"]}
        assert asked <= {q.question for d in docs for q in d.qa} and not asked & {q.question for d in docs for q in d.eval_qa}
    assert "Asked in the training wordings instead" in text


def test_seeds_differ_and_the_tokenizer_never_saw_held_out_text(smoke):
    docs = [load_docs_jsonl(smoke["root"] / f"seed_{k}" / "data" / "test.jsonl") for k in SEEDS]
    assert docs[0][0].passage != docs[1][0].passage
    vocab = json.loads((smoke["run"] / "base_model" / "tokenizer.json").read_text())["model"]["vocab"]
    # a fitted tokenizer merges frequent words whole; the held-out entities' invented names are never frequent in what it saw
    ood = load_docs_jsonl(smoke["run"] / "data" / "ood_all.jsonl")
    assert all("Ġ" + d.qa[0].answer not in vocab for d in ood)


def test_report_subcommand_writes_the_same_page(smoke, tmp_path, capsys):
    out = tmp_path / "page.md"
    assert dyprag.main(["report", str(smoke["root"]), "--out", str(out)]) == 0
    assert out.read_text() == (smoke["root"] / "results.md").read_text()


def test_stored_loras_and_base_model_reload(smoke):
    run = smoke["run"]
    model, tok = load_base(run / "base_model")  # AutoModelForCausalLM / AutoTokenizer
    test = load_loras(run / "prag" / "test.safetensors")
    A, B = next(iter(test.values()))
    assert A.shape[0] == 4 and A.shape[1] == 2 and B.shape[2] == 2  # 4 docs, rank 2
    # every LoRA started from the same A: after a few small steps they are still close, but trained
    assert (B.abs().sum((1, 2)) > 0).all()
    assert len(test) == 2 * 3  # 2 layers x gate/up/down


@pytest.mark.parametrize("design", DESIGNS)
def test_generate_writes_a_peft_adapter_equal_to_the_pipeline_forward(smoke, tmp_path, design, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    run = smoke["run"]
    doc = load_docs_jsonl(run / "data" / "test.jsonl")[0].passage
    (tmp_path / "doc.txt").write_text(doc)
    out = tmp_path / "adapter"
    assert dyprag.main(["generate", str(smoke["root"]), "--doc", str(tmp_path / "doc.txt"), "--out", str(out), "--design", design]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    model, tok = load_base(run / "base_model")
    targets = dyprag.find_lora_targets(model, ["gate_proj", "up_proj", "down_proj"])
    translator = load_translator(run / "translator" / f"{design}.safetensors", targets, 3 * model.config.hidden_size)
    ids = tok(["Question: Where was " + doc[:20]], return_tensors="pt")["input_ids"]
    monkeypatch.chdir(tmp_path)  # the adapter loads from anywhere: its base model path is absolute
    with torch.no_grad():
        loras = translator(*document_states(model, tok, [doc], [0, 1, 2]))
        with factored_lora(model, loras, 32 / 2):
            ours = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        theirs = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-6), "the generated LoRA changes nothing"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# pieces


def test_batched_prag_follows_the_same_path_as_peft(smoke):
    model, tok = load_base(smoke["run"] / "base_model")
    docs = make_knowledge_set(2, 0, 1, seed=3).test
    kw = dict(lr=1e-2, epochs=2, max_len=192)
    shape = LoraShape()
    init = initial_lora(model, shape, seed=0)
    batched = train_batched(model, tok, docs, init, scaling=shape.scaling, **kw)
    for doc, got in zip(docs, batched):
        ref = train_peft(model, tok, doc, shape, seed=0, **kw)
        for name in ref:
            torch.testing.assert_close(got[name][0], ref[name][0], atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(got[name][1], ref[name][1], atol=2e-4, rtol=1e-3)
    deltas = delta_matrix(stack_loras(batched))
    assert not torch.allclose(deltas[0], deltas[1]), "two documents got the same LoRA"


def test_mean_lora_is_the_mean_weight_delta():
    g = torch.Generator().manual_seed(0)
    loras = {"m": (torch.randn(5, 2, 7, generator=g), torch.randn(5, 3, 2, generator=g))}
    A, B = mean_lora(loras)["m"]
    want = torch.stack([loras["m"][1][k] @ loras["m"][0][k] for k in range(5)]).mean(0)
    torch.testing.assert_close(B @ A, want)


def test_squad_normalization_and_scores():
    assert normalize_answer("The  Velmora Works!") == "velmora works"
    assert exact_match("the glassblower.", ["Glassblower"]) == 1.0
    assert exact_match("glass blower", ["glassblower"]) == 0.0
    assert f1_score("Drovik Trading House", ["Drovik Works"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1_score("", ["x"]) == 0.0


def test_synthetic_splits_have_disjoint_fictional_entities():
    from itertools import islice

    from train.dyprag.data import FACT_KINDS, IN_DISTRIBUTION, OOD

    ks = make_knowledge_set(10, 10, 20, seed=0)
    name = lambda d: d.qa[0].question.removeprefix("Where was ").removesuffix(" born?")  # noqa: E731
    train = list(islice(ks.training_docs(), 300))
    train_names, test_names = {name(d) for d in train}, {name(d) for d in ks.test}
    assert len(train_names) == 300 and len(test_names) == 10 and not train_names & test_names
    assert not ks.names & train_names and {e.name for e in ks.known} <= ks.names
    assert [d.passage for d in islice(ks.training_docs(), 5)] == [d.passage for d in train[:5]]  # seeded
    for d in ks.test:
        assert len(d.qa) == 5 and d.rewrite and d.rewrite != d.passage
        assert [q.kind for q in d.eval_qa] == list(FACT_KINDS)
        assert {q.answer for q in d.qa} == {q.answer for q in d.eval_qa}
        assert not {q.question for q in d.qa} & {q.question for q in d.eval_qa}  # other wordings
        assert all(q.answer in d.passage and q.answer in d.rewrite for q in d.qa)
    # out of distribution: templates are texts with the name and the values blanked out
    def shapes(text: str, d, n: str) -> set[str]:
        for q in d.qa:
            text = text.replace(q.answer, "V")
        return set(text.replace(n, "N").replace(".", "").split(" N ")) | {text}

    train_sentences = set().union(*(shapes(d.passage + " " + d.rewrite, d, name(d)) for d in train))
    train_questions = set().union(*(shapes(q.question, d, name(d)) for d in train for q in d.qa + d.eval_qa))
    assert set(ks.ood) == {"values", "wordings", "style", "all"}
    for axis, docs in ks.ood.items():
        for d in docs:
            n = next(x for x in ks.names if x in d.passage)
            occ = next(q.answer for q in d.eval_qa if q.kind == "occupation")
            year = int(next(q.answer for q in d.eval_qa if q.kind == "year"))
            new_values = occ in OOD.occupations and occ not in IN_DISTRIBUTION.occupations and OOD.years[0] <= year <= OOD.years[1] < IN_DISTRIBUTION.years[0]
            new_wordings = not set().union(*(shapes(q.question, d, n) for q in d.eval_qa)) & train_questions
            new_style = not shapes(d.passage, d, n) & train_sentences
            assert (new_values, new_wordings, new_style) == (axis in ("values", "all"), axis in ("wordings", "all"), axis in ("style", "all")), axis


def test_more_augmentation_wordings_change_only_the_augmentation_questions():
    from itertools import islice

    from train.config import load_config
    from train.dyprag.config import DyPragConfig
    from train.dyprag.data import AUGMENT_WORDINGS, EVAL_WORDINGS, OOD_WORDINGS, pretrain_sample

    one, three = make_knowledge_set(10, 4, 5, seed=1), make_knowledge_set(10, 4, 5, seed=1, augment_wordings=3)
    pairs = list(zip(one.test + one.ood["values"], three.test + three.ood["values"]))
    pairs += list(zip(islice(one.training_docs(), 50), islice(three.training_docs(), 50)))
    used: dict[int, set[int]] = {1: set(), 3: set()}
    for a, b in pairs:  # the same entities, passages and evaluation questions; the same facts asked
        assert (a.passage, a.rewrite, a.eval_qa) == (b.passage, b.rewrite, b.eval_qa)
        assert [(q.kind, q.answer) for q in a.qa] == [(q.kind, q.answer) for q in b.qa]
        for n, d in ((1, a), (3, b)):
            for q in d.qa:
                wording = _wordings(q.question)
                assert len(wording) == 1, q.question
                used[n] |= wording
    assert used[1] == {AUGMENT_WORDINGS[0]}
    assert used[3] == set(AUGMENT_WORDINGS) and not used[3] & set(EVAL_WORDINGS + OOD_WORDINGS)
    # pretraining asks in every wording of the training distribution, and never in the OOD ones
    for n, expected in ((1, {0, 1, 2}), (3, {0, 1, 2, 5, 6})):
        rng, asked = random.Random(0), set()
        for _ in range(3000):
            prompt, target = pretrain_sample(rng, one.known, n)
            for line in (prompt + target).split("\n"):
                if line.startswith("Question: "):
                    asked |= _wordings(line.removeprefix("Question: "))
        assert asked == expected, n
    with pytest.raises(ConfigError, match="augment_wordings"):
        load_config(DyPragConfig, None, ["data.augment_wordings=4"])


def _wordings(question: str) -> set[int]:
    """The indices of the question wordings (any fact) that `question` fits, the name blanked out."""
    from train.dyprag.data import _FACTS

    def fits(template: str) -> bool:
        pre, post = template.split("{n}")
        return question.startswith(pre) and question.endswith(post) and len(question) > len(pre) + len(post)

    return {w for _, wordings in _FACTS.values() for w, t in enumerate(wordings) if fits(t)}


def test_shuffled_control_always_uses_another_document():
    for n in (2, 3, 40):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))


# -----------------------------------------------------------------------------
# bad input: clear error, exit 2, nothing written


def test_missing_and_malformed_document_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = [SMOKE, f"runs_dir={runs}", "data.source=jsonl"]
    err = _err(capsys, base + [f"data.train_file={tmp_path}/nope.jsonl", f"data.test_file={tmp_path}/nope.jsonl"])
    assert "document file not found" in err and "nope.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"passage": "A text.", "qa": [{"question": "Q?", "answer": "A"}]}\n{"passage": "B", "qa": [\n')
    err = _err(capsys, base + [f"data.train_file={bad}", f"data.test_file={bad}"])
    assert "bad.jsonl:2" in err and "not valid JSON" in err
    bad.write_text('{"passage": "A text.", "qa": [{"question": "Q?"}]}\n')
    err = _err(capsys, base + [f"data.train_file={bad}", f"data.test_file={bad}"])
    assert "bad.jsonl:1" in err and "'answer'" in err
    assert not runs.exists()


def test_bad_base_model_dir_and_target_modules(tmp_path, capsys):
    runs = tmp_path / "runs"
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", f"model.path={broken}"])
    assert "does not load" in err and "broken_model" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", f"model.path={tmp_path}/absent"])
    assert "directory not found" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", f"model.path={tmp_path}/seed_{{seed}}"])  # every seed's folder is checked
    assert f"{tmp_path}/seed_0" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "lora.target_modules=[ffn_in]"])
    assert "ffn_in" in err and "match no module" in err and "gate_proj" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "compare_designs=[pooled_shared,huge]"])
    assert "huge" in err and "pooled_per_module" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "lora.layers=[7]"])
    assert "LoRA layers [7] do not exist" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "translator.read_layers=[9]"])
    assert "read_layers: 9 is out of range" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "train.lambda_mse=100"])
    assert "data.n_train_docs > 0" in err
    err = _err(capsys, [SMOKE, f"runs_dir={runs}", "run_name=.."])
    assert "plain name" in err
    assert not runs.exists()


def test_translator_checkpoint_that_does_not_fit(smoke, tmp_path, capsys):
    run = smoke["run"]
    model, _ = load_base(run / "base_model")
    targets = dyprag.find_lora_targets(model, ["up_proj"])  # a translator for other modules
    save_translator(tmp_path / "t.safetensors", build_translator(TranslatorConfig(hidden=8), 3 * model.config.hidden_size, targets, 2))
    (tmp_path / "doc.txt").write_text("Some document.")
    root = str(smoke["root"])
    err = _err(capsys, ["generate", root, "--doc", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "a"), "--translator", str(tmp_path / "t.safetensors")])
    assert "does not fit the base model" in err and "gate_proj" in err
    err = _err(capsys, ["generate", root, "--doc", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")])
    assert "document file not found" in err
    err = _err(capsys, ["generate", root, "--doc", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "a"), "--seed", "7"])
    assert "--seed 7: this run has seeds [0, 1]" in err
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = _err(capsys, ["generate", root, "--doc", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "mine")])
    assert "not empty" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(SystemExit) as e:  # no abbreviations: --o is not --out
        dyprag.main(["generate", root, "--doc", str(tmp_path / "doc.txt"), "--o", str(tmp_path / "b")])
    assert e.value.code == 2 and "required: --out" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_existing_run_of_another_config_is_refused(smoke, capsys):
    err = _err(capsys, smoke["args"] + ["translator.hidden=8"])
    assert "different config" in err and "overwrite=true" in err
    assert (smoke["root"] / "results.md").is_file()


def test_a_run_in_use_is_refused_and_a_foreign_folder_never_deleted(smoke, tmp_path, capsys):
    from train.checkpoint import run_dir_lock

    # another process holds the run: a child process tries it
    import subprocess
    import sys

    with run_dir_lock(smoke["root"]):
        proc = subprocess.run([sys.executable, "-m", "train.dyprag", *smoke["args"]], capture_output=True, text=True)
    assert proc.returncode == 2 and "in use by another process" in proc.stderr
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("precious")
    err = _err(capsys, [SMOKE, f"runs_dir={tmp_path / 'runs'}", "run_name=mine", "overwrite=true"])
    assert "will not delete" in err and (mine / "thesis.tex").read_text() == "precious"


def test_prag_augmented_files_become_documents(tmp_path, capsys):
    from train.dyprag.data import docs_from_prag

    docs = docs_from_prag("tests/fixtures/prag/data_aug/popqa/tinyllama-test/total.json", None, None)
    d = docs[0]
    assert "Harl Menwick was a cartographer" in d.passage and "Tobrin" in d.passage
    assert len(d.qa) >= 3 and d.rewrite
    assert d.eval_qa[0].question == "What is Harl Menwick's occupation?"
    assert d.eval_qa[0].answers == ["cartographer", "map maker"]
    # raw dataset files carry no augmentations to train a LoRA on: refused before any work
    err = _err(capsys, [SMOKE, f"runs_dir={tmp_path}/runs", "data.source=prag",
                        "data.train_file=tests/fixtures/prag/hotpotqa", "data.test_file=tests/fixtures/prag/hotpotqa"])
    assert "no augmentation QA" in err
    assert not (tmp_path / "runs").exists()


# -----------------------------------------------------------------------------
# learning: the generated LoRA must carry the document


CATS = ["Zub", "Mira", "Tosk", "Bela", "Quon", "Rill", "Dax", "Omo"]


def cat_docs(seed):
    """Micro-config documents: "P<id> keeps a cat named <one of 8 names> ." and the question about the cat."""
    from train.dyprag.data import QA, Doc

    rng = random.Random(seed)
    while True:
        name, cat = f"P{rng.randrange(10**6)}", rng.choice(CATS)
        yield Doc(passage=f"{name} keeps a cat named {cat} .", qa=[QA(f"What is the name of {name} cat ?", cat, kind="pet")])


@pytest.fixture(scope="module")
def micro():
    """A random tiny Llama with word-level tokens for the cat documents: (tokenizer, model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from train.dyprag.base import build_tiny_llama
    from train.dyprag.data import BOS, EOS, PAD

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.train_from_iterator(["keeps a cat named . What is the name of cat ? Question: Answer: " + " ".join(CATS)],
                              trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token="<unk>")
    torch.manual_seed(0)
    return tok, build_tiny_llama(tok, 32, 2, 2, 64, 64).eval().requires_grad_(False)


def test_text_loss_is_added_and_changes_training(micro):
    """train.lambda_text adds the LM loss on the document's own text under its generated LoRA."""
    from models.lora import find_lora_targets
    from train.config import load_config
    from train.dyprag.config import DyPragConfig
    from train.dyprag.train_translator import train_translator

    tok, model = micro
    weights, logs = {}, {}
    for lam in (0.0, 0.5):
        cfg = load_config(DyPragConfig, None, ["train.steps=3", "train.docs_per_step=4", "train.p_passage=0", "train.log_every=1",
                                               "translator.hidden=16", f"train.lambda_text={lam}"])
        logs[lam] = []
        translator, _ = train_translator(model, tok, cfg, cfg.translator, find_lora_targets(model, cfg.lora.target_modules), stream=cat_docs(1),
                                         seed=0, log=logs[lam].append)
        weights[lam] = torch.cat([p.detach().flatten() for p in translator.parameters()])
    assert all("text" not in r for r in logs[0.0])
    for r in logs[0.5]:
        assert r["text"] > 0 and r["train_loss"] == pytest.approx(r["lm"] + 0.5 * r["text"])
    assert logs[0.5][0]["lm"] == pytest.approx(logs[0.0][0]["lm"])  # the same first step, before the text term acts
    assert not torch.allclose(weights[0.0], weights[0.5])
    with pytest.raises(ConfigError, match="lambda_text"):
        load_config(DyPragConfig, None, ["train.lambda_text=-1"])


def test_bf16_precision_trains_close_to_fp32(micro):
    """train.precision=bf16 runs the translator's steps under bf16 autocast: not the fp32 numbers, but close to them,
    with fp32 parameters; an unknown precision is a config error."""
    from models.lora import find_lora_targets
    from train.config import load_config
    from train.dyprag.config import DyPragConfig
    from train.dyprag.train_translator import train_translator

    tok, model = micro
    weights, logs = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(DyPragConfig, None, ["train.steps=3", "train.docs_per_step=4", "train.log_every=1", "translator.hidden=16",
                                               f"train.precision={precision}"])
        logs[precision] = []
        translator, _ = train_translator(model, tok, cfg, cfg.translator, find_lora_targets(model, cfg.lora.target_modules), stream=cat_docs(1),
                                         seed=0, log=logs[precision].append)
        assert {p.dtype for p in translator.parameters()} == {torch.float32}
        weights[precision] = torch.cat([p.detach().flatten() for p in translator.parameters()])
    assert not torch.equal(weights["fp32"], weights["bf16"])
    assert torch.nn.functional.cosine_similarity(weights["fp32"], weights["bf16"], 0) > 0.999
    for a, b in zip(logs["fp32"], logs["bf16"]):
        assert a["lm"] != b["lm"] and b["lm"] == pytest.approx(a["lm"], rel=0.02)
    with pytest.raises(ConfigError, match="precision='fp16' must be one of"):
        load_config(DyPragConfig, None, ["train.precision=fp16"])


def test_every_dyprag_config_loads_and_writes_its_own_run_and_page():
    """Each configs/dyprag file resolves (its base chain, every check) and none shares a run directory or a page
    with another: a copied config that kept its parent's run_name would resume the parent's run."""
    from pathlib import Path

    from train.config import load_config
    from train.dyprag.config import DyPragConfig

    configs = {p.name: load_config(DyPragConfig, p, []) for p in sorted(Path("configs/dyprag").glob("*.yaml"))}
    assert {"default.yaml", "smollm2.yaml", "smollm2_long.yaml"} <= set(configs)
    pages = [c.results_out for c in configs.values() if c.results_out]
    assert len(pages) == len(set(pages))
    names = [c.run_name for n, c in configs.items() if n != "base.yaml"]
    assert len(names) == len(set(names)), names
    assert configs["smollm2_long.yaml"].train.precision == "bf16" and configs["smollm2_long.yaml"].lora == configs["smollm2.yaml"].lora


def test_learning_rate_schedules():
    """cosine decays from the end of warmup on; wsd holds the peak until the last decay_share of the steps, then falls linearly to 0."""
    from train.config import load_config
    from train.dyprag.config import DyPragConfig, lr_factor

    cosine = [lr_factor(s, 100, 10) for s in range(100)]
    wsd = [lr_factor(s, 100, 10, "wsd", 0.25) for s in range(100)]
    assert wsd[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and cosine[:10] == pytest.approx(wsd[:10], abs=0.03)
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:]))
    assert wsd[9:76] == [1.0] * 67 and all(a > b for a, b in zip(wsd[75:], wsd[76:])) and wsd[-1] == pytest.approx(1 / 25)
    assert sum(wsd) > 1.4 * sum(cosine)  # more steps near the peak
    with pytest.raises(ConfigError, match="schedule='linear' must be one of"):
        load_config(DyPragConfig, None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match="decay_share"):
        load_config(DyPragConfig, None, ["train.decay_share=0"])


def test_passage_share_changes_for_the_decay_phase(micro, monkeypatch):
    """train.p_passage_decay replaces p_passage over the last decay_share of the steps, in the config and in training."""
    from models.lora import find_lora_targets
    from train.config import load_config
    from train.dyprag import train_translator as tt
    from train.dyprag.config import DyPragConfig

    cfg = load_config(DyPragConfig, None, ["train.steps=10", "train.decay_share=0.2", "train.p_passage=0.1", "train.p_passage_decay=0.5"])
    assert [cfg.train.passage_share(s) for s in range(10)] == [0.1] * 8 + [0.5] * 2
    assert {load_config(DyPragConfig, None, ["train.p_passage=0.1"]).train.passage_share(s) for s in range(600)} == {0.1}
    with pytest.raises(ConfigError, match="p_passage_decay"):
        load_config(DyPragConfig, None, ["train.p_passage_decay=1.5"])

    tok, model = micro
    cfg = load_config(DyPragConfig, None, ["train.steps=4", "train.docs_per_step=2", "train.decay_share=0.5", "train.p_passage=0",
                                           "train.p_passage_decay=1", "translator.hidden=16"])
    with_passage = []  # per step: how many questions carry the passage
    real = tt.qa_rows

    def spy(docs, p_passage, per_doc, rng):
        groups = real(docs, p_passage, per_doc, rng)
        with_passage.append(sum(len(pairs) for pairs, _, _ in groups if "Passage:" in pairs[0][0]))
        return groups

    monkeypatch.setattr(tt, "qa_rows", spy)
    tt.train_translator(model, tok, cfg, cfg.translator, find_lora_targets(model, cfg.lora.target_modules), stream=cat_docs(1), seed=0,
                        log=lambda r: None)
    assert with_passage[:2] == [0, 0] and all(n > 0 for n in with_passage[2:]) and len(with_passage) == 4


@pytest.mark.parametrize("design", ["cross_attention", "fast_weight"])  # the designs that read every token
def test_token_level_translator_learns_a_fact_from_the_document(design, micro):
    """Micro-config: the cat documents, a random tiny Llama (word-level tokens) and 100 steps on fresh
    documents. The answer comes out under each held-out document's own LoRA, at chance (1/8) under another document's."""
    from models.lora import find_lora_targets
    from train.config import load_config
    from train.dyprag.base import encode_pairs
    from train.dyprag.config import DyPragConfig
    from train.dyprag.data import qa_prompt, qa_target
    from train.dyprag.metrics import expand_per_question
    from train.dyprag.train_translator import train_translator

    tok, model = micro
    cfg = load_config(DyPragConfig, None, ["train.steps=100", "train.docs_per_step=16", "train.p_passage=0", "train.warmup=5",
                                           "translator.hidden=32", "lora.rank=4", f"translator.design={design}"])
    targets = find_lora_targets(model, cfg.lora.target_modules)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        translator, info = train_translator(model, tok, cfg, cfg.translator, targets, stream=cat_docs(1), seed=0, log=lambda r: None)
    finally:
        torch.set_num_threads(before)
    assert info["documents_seen"] == 100 * 16 and info["distinct_documents"] == 1600
    test = [d for d, _ in zip(cat_docs(2), range(64))]
    with torch.no_grad():
        loras = translator(*document_states(model, tok, [d.passage for d in test], [0, 1, 2]))
        batch = encode_pairs(tok, [(qa_prompt(d.qa[0].question), qa_target(d.qa[0].answer)) for d in test], 64)
        labels = batch["labels"][:, 1:]
        first = (labels != -100).float().argmax(1)  # the cat's name: the first answer token
        rows = torch.arange(64)

        def accuracy(perm):
            with factored_lora(model, expand_per_question(loras, perm), cfg.lora.scaling):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return (logits.argmax(-1)[rows, first] == labels[rows, first]).float().mean().item()

        own, shuffled = accuracy(list(range(64))), accuracy(derangement(64, 0))
    assert own >= 0.8 and shuffled <= 0.4, (own, shuffled)
