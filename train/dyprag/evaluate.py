"""Stage 3: the comparison on held-out documents, written to eval/results.json.

Rows (EM / F1 on the test documents' evaluation questions):
  Vanilla          closed-book, no LoRA
  Standard RAG     passage in the prompt, no LoRA
  PRAG             closed-book, the document's own fine-tuned LoRA
  PRAG-Combine     passage in the prompt + own LoRA
  Mean LoRA        closed-book, the exact mean delta of all training documents' LoRAs
  DyPRAG           closed-book, the translator's LoRA for the document   (per design)
  DyPRAG-Combine   passage in the prompt + generated LoRA                (per design)
  Shuffled doc     closed-book, the LoRA generated from another test document (per design)
The same rows for PRAG / DyPRAG on training documents show what the translator
does on documents it has seen. Cosine similarity of the LoRAs' dense deltas and
the cost figures come with them.
"""

from __future__ import annotations

import json
import random
import time

import torch

from models.lora import find_lora_targets, load_loras
from models.translator import embed_documents, load_translator
from train.checkpoint import atomic_write_text
from train.dyprag.base import load_base
from train.dyprag.metrics import (
    answer,
    delta_matrix,
    exact_match,
    expand_per_question,
    f1_score,
    mean_lora,
    cosine_matrix,
    mean_offdiag_cosine,
)
from train.dyprag.data import qa_prompt


def _questions(docs):
    """(question, answer, doc index) for every evaluation question (augmentation QA if a doc has none)."""
    return [(q.question, q.answers, i) for i, d in enumerate(docs) for q in (d.eval_qa or d.qa)]


def _derangement(n: int, seed: int) -> list[int]:
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
    targets = find_lora_targets(model, cfg.prag.target_modules)
    scaling = cfg.prag.alpha / cfg.prag.rank
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, max_len=cfg.model.max_len)
    splits = {"test": run.docs("test"), "train": run.docs("train")[: len(run.docs("test"))]}
    prag = {"test": load_loras(run.root / "prag" / "test.safetensors")}
    train_all = load_loras(run.root / "prag" / "train.safetensors")
    prag["train"] = {n: (A[: len(splits["train"])], B[: len(splits["train"])]) for n, (A, B) in train_all.items()}

    def score(rows_name, split, with_passage, doc_loras=None, shared=None):
        docs = splits[split]
        qs = _questions(docs)
        prompts = [qa_prompt(q, docs[i].passage if with_passage else None) for q, _, i in qs]
        loras = expand_per_question(doc_loras, [i for _, _, i in qs]) if doc_loras is not None else shared
        preds = answer(model, tokenizer, prompts, loras, scaling, desc=f"{rows_name} ({split})", **gen)
        em = sum(exact_match(p, golds) for p, (_, golds, _) in zip(preds, qs)) / len(qs)
        f1 = sum(f1_score(p, golds) for p, (_, golds, _) in zip(preds, qs)) / len(qs)
        examples = [{"question": q, "gold": a, "pred": p} for p, (q, a, _) in list(zip(preds, qs))[:3]]
        return {"em": 100 * em, "f1": 100 * f1, "n": len(qs), "examples": examples}

    results: dict = {"rows": {}, "designs": {}, "n_test_docs": len(splits["test"])}
    r = results["rows"]
    r["Vanilla"] = score("Vanilla", "test", False)
    r["Standard RAG"] = score("Standard RAG", "test", True)
    r["PRAG"] = score("PRAG", "test", False, prag["test"])
    r["PRAG-Combine"] = score("PRAG-Combine", "test", True, prag["test"])
    r["Mean LoRA (control)"] = score("Mean LoRA", "test", False, shared=mean_lora(train_all))
    r["PRAG (training docs)"] = score("PRAG", "train", False, prag["train"])
    target_cos, _ = mean_offdiag_cosine(delta_matrix(prag["test"]))
    results["target_cosine_between_docs"] = target_cos

    # prompt lengths: the passage is what DyPRAG takes out of the prompt
    qs = _questions(splits["test"])
    ntok = lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"])  # noqa: E731
    results["prompt_tokens"] = {
        "rag": sum(ntok(qa_prompt(q, splits["test"][i].passage)) for q, _, i in qs) / len(qs),
        "dyprag": sum(ntok(qa_prompt(q)) for q, _, _ in qs) / len(qs),
    }

    perm = _derangement(len(splits["test"]), cfg.data.seed)
    for design in cfg.translator.designs:
        translator = load_translator(run.root / "translator" / f"{design}.safetensors", targets, model.config.hidden_size)
        translator.eval()
        with torch.no_grad():
            gen_loras = {
                split: translator(embed_documents(model, tokenizer, [d.passage for d in docs], pooling=cfg.translator.pooling))
                for split, docs in splits.items()
            }
            # cost: one document at a time, embedding + translator forward
            t0 = time.perf_counter()
            for d in splits["test"]:
                translator(embed_documents(model, tokenizer, [d.passage], pooling=cfg.translator.pooling))
            s_per_doc = (time.perf_counter() - t0) / len(splits["test"])
        shuffled = {n: (A[perm], B[perm]) for n, (A, B) in gen_loras["test"].items()}
        g_DP, t_DP = delta_matrix(gen_loras["test"]), delta_matrix(prag["test"])
        gen_cos, _ = mean_offdiag_cosine(g_DP)
        other_cos, own_cos = mean_offdiag_cosine(g_DP, t_DP)
        results["designs"][design] = {
            "rows": {
                "DyPRAG": score(f"DyPRAG {design}", "test", False, gen_loras["test"]),
                "DyPRAG-Combine": score(f"DyPRAG-Combine {design}", "test", True, gen_loras["test"]),
                "Shuffled doc (control)": score(f"Shuffled {design}", "test", False, shuffled),
                "DyPRAG (training docs)": score(f"DyPRAG {design}", "train", False, gen_loras["train"]),
            },
            "generated_cosine_between_docs": gen_cos,
            "cosine_generated_vs_own_target": own_cos,
            "cosine_generated_vs_other_target": other_cos,
            "translator_s_per_doc": s_per_doc,
            "translator_parameters": sum(p.numel() for p in translator.parameters()),
            "cosine_matrix_generated": cosine_matrix(g_DP[:12]),
            "cosine_matrix_generated_vs_target": cosine_matrix(g_DP[:12], t_DP[:12]),
        }
    results["cosine_matrix_target"] = cosine_matrix(delta_matrix(prag["test"])[:12])
    atomic_write_text(run.root / "eval" / "results.json", json.dumps(results))
    return {k: v for k, v in results.items() if k not in ("designs", "cosine_matrix_target")}
