"""Stage 3: the comparison on held-out documents of one seed, written to eval/results.json.

Rows (EM / F1 on the documents' evaluation questions, and EM per fact type):
  Vanilla          closed-book, no LoRA
  Standard RAG     passage in the prompt, no LoRA
  PRAG             closed-book, the document's own fine-tuned LoRA
  PRAG-Combine     passage in the prompt + own LoRA
  DyPRAG           closed-book, the translator's LoRA for the document       (per design)
  DyPRAG-Combine   passage in the prompt + generated LoRA                    (per design)
  Shuffled doc     closed-book, the LoRA generated from another document    (per design)
  Mean LoRA        closed-book, the exact mean of the LoRAs the translator  (per design)
                   generates for training documents: what it does for any document
  Standard RAG + mean LoRA   passage in the prompt + that mean LoRA: the answer (per design)
                   format a LoRA teaches, with no document's facts (fair to RAG on a
                   pretrained model whose own answers are long)
  ... (augmentation questions)   Standard RAG and DyPRAG asked the held-out documents'
                   augmentation questions, in the wordings PRAG and the translator train on:
                   against the rows above, what a new question wording costs
on the splits "test" (held-out entities, training templates) and "ood_<axis>" (held-out
entities whose attribute values, question wordings, sentence style, or all three never
appear in training). "seen" rows run PRAG and DyPRAG on training documents. Cosine
similarity of the LoRAs' dense deltas and the cost figures come with them.
"""

from __future__ import annotations

import json
import random
import time
from itertools import islice

import torch

from moe_playground.models.lora import Loras, find_lora_targets, load_loras
from moe_playground.models.translator import document_states, load_translator, resolve_layers
from moe_playground.train.checkpoint import atomic_write_text
from moe_playground.train.dyprag.base import load_base
from moe_playground.train.dyprag.data import qa_prompt
from moe_playground.train.dyprag.metrics import answer, cosine_matrix, delta_matrix, exact_match, expand_per_question, f1_score, mean_lora, mean_offdiag_cosine

MEAN_LORA_DOCS = 64  # training documents whose generated LoRAs are averaged for the mean-LoRA control


def _questions(docs, augmentation: bool = False):
    """(question, answers, doc index, fact kind) for every evaluation question (augmentation QA if a doc
    has none, or if `augmentation`)."""
    return [(q.question, q.answers, i, q.kind) for i, d in enumerate(docs) for q in (d.qa if augmentation else d.eval_qa or d.qa)]


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation with no fixed point: document i gets the LoRA of perm[i] != i."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    perm = [0] * n
    for k in range(n):
        perm[order[k]] = order[(k + 1) % n]
    return perm


def evaluate_run(run) -> dict:
    cfg = run.cfg
    model, tokenizer = load_base(run.base_dir)
    targets = find_lora_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, max_len=cfg.model.max_len)
    train_docs = run.training_docs()
    seen_docs = list(islice(train_docs, cfg.eval.seen_docs + MEAN_LORA_DOCS))
    splits = {**{s: run.docs(s) for s in run.eval_splits()}, "seen": seen_docs[: cfg.eval.seen_docs]}
    prag = {s: load_loras(run.root / "prag" / f"{s}.safetensors") for s in splits if (run.root / "prag" / f"{s}.safetensors").is_file()}

    def score(split, with_passage, doc_loras=None, shared=None, augmentation=False):
        docs = splits[split]
        qs = _questions(docs, augmentation)
        prompts = [qa_prompt(q, docs[i].passage if with_passage else None) for q, _, i, _ in qs]
        loras = expand_per_question(doc_loras, [i for _, _, i, _ in qs]) if doc_loras is not None else shared
        preds = answer(model, tokenizer, prompts, loras, cfg.lora.scaling, **gen)
        em = [exact_match(p, golds) for p, (_, golds, _, _) in zip(preds, qs)]
        f1 = [f1_score(p, golds) for p, (_, golds, _, _) in zip(preds, qs)]
        kinds: dict[str, list[float]] = {}
        for e, (_, _, _, kind) in zip(em, qs):
            kinds.setdefault(kind or "all", []).append(e)
        return {
            "em": 100 * sum(em) / len(qs), "f1": 100 * sum(f1) / len(qs), "n": len(qs),
            "em_by_kind": {k: 100 * sum(v) / len(v) for k, v in kinds.items()},
            "examples": [{"question": q, "gold": a, "pred": p} for p, (q, a, _, _) in list(zip(preds, qs))[:3]],
        }

    results: dict = {"splits": {s: {"n_docs": len(d), "rows": {}} for s, d in splits.items() if s != "seen"}, "designs": {}}
    rows = {s: v["rows"] for s, v in results["splits"].items()}
    for s in rows:
        rows[s]["Vanilla"] = score(s, False)
        rows[s]["Standard RAG"] = score(s, True)
        if s in prag:
            rows[s]["PRAG"] = score(s, False, prag[s])
            rows[s]["PRAG-Combine"] = score(s, True, prag[s])
    if "seen" in prag:
        rows["test"]["PRAG (training docs)"] = score("seen", False, prag["seen"])
    wordings_differ = all(d.eval_qa for d in splits["test"])  # else the evaluation questions are the augmentation QA
    if wordings_differ:
        rows["test"]["Standard RAG (augmentation questions)"] = score("test", True, augmentation=True)
    results["target_cosine_between_docs"] = mean_offdiag_cosine(delta_matrix(prag["test"]))[0] if "test" in prag else None

    # prompt lengths: the passage is what DyPRAG takes out of the prompt
    qs = _questions(splits["test"])
    ntok = lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"])  # noqa: E731
    results["prompt_tokens"] = {
        "rag": sum(ntok(qa_prompt(q, splits["test"][i].passage)) for q, _, i, _ in qs) / len(qs),
        "dyprag": sum(ntok(qa_prompt(q)) for q, _, _, _ in qs) / len(qs),
    }

    layers = resolve_layers(cfg.translator.read_layers, model.config.num_hidden_layers)  # every design reads the same layers
    for design in cfg.designs:
        translator = load_translator(run.root / "translator" / f"{design}.safetensors", targets, len(layers) * model.config.hidden_size)

        @torch.no_grad()
        def generate(docs) -> Loras:
            out = [translator(*document_states(model, tokenizer, [d.passage for d in docs[i : i + 16]], layers)) for i in range(0, len(docs), 16)]
            return {n: (torch.cat([o[n][0] for o in out]), torch.cat([o[n][1] for o in out])) for n in out[0]}

        gen_loras = {s: generate(d) for s, d in splits.items()}
        mean_control = mean_lora(generate(seen_docs[-MEAN_LORA_DOCS:]))
        with torch.no_grad():  # cost: one document at a time, token states + translator forward
            t0 = time.perf_counter()
            for d in splits["test"]:
                translator(*document_states(model, tokenizer, [d.passage], layers))
            s_per_doc = (time.perf_counter() - t0) / len(splits["test"])
        d_rows: dict = {}
        for s in rows:
            perm = derangement(len(splits[s]), run.seed)
            d_rows[s] = {
                "DyPRAG": score(s, False, gen_loras[s]),
                "DyPRAG-Combine": score(s, True, gen_loras[s]),
                "Shuffled doc (control)": score(s, False, {n: (A[perm], B[perm]) for n, (A, B) in gen_loras[s].items()}),
                "Mean LoRA (control)": score(s, False, shared=mean_control),
                # the answer format a LoRA teaches, without any document's facts, beside the passage
                "Standard RAG + mean LoRA (control)": score(s, True, shared=mean_control),
            }
        d_rows["test"]["DyPRAG (training docs)"] = score("seen", False, gen_loras["seen"])
        if wordings_differ:
            d_rows["test"]["DyPRAG (augmentation questions)"] = score("test", False, gen_loras["test"], augmentation=True)
        g_DP = delta_matrix(gen_loras["test"])
        info = {
            "rows": d_rows,
            "generated_cosine_between_docs": mean_offdiag_cosine(g_DP)[0],
            "translator_s_per_doc": s_per_doc,
            "translator_parameters": sum(p.numel() for p in translator.parameters()),
            "cosine_matrix_generated": cosine_matrix(g_DP[:12]),
        }
        if "test" in prag:
            t_DP = delta_matrix(prag["test"])
            info["cosine_generated_vs_other_target"], info["cosine_generated_vs_own_target"] = mean_offdiag_cosine(g_DP, t_DP)
        results["designs"][design] = info
    atomic_write_text(run.root / "eval" / "results.json", json.dumps(results))
    return {"test_rows": {k: v["em"] for k, v in rows["test"].items()}}

