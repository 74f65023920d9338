"""Stage 2: train a doc-to-LoRA translator end to end on question answering.

Each step reads `docs_per_step` documents (fresh synthetic documents from an
endless stream, or a shuffled pass over a fixed pool), runs the frozen base
model over them for their token states, generates one LoRA per document, and
scores the document's augmentation questions under that LoRA: the loss is the
cross-entropy of the answer tokens (DyPRAG's prediction loss), so the translator
learns whatever makes the base model answer, not an imitation of PRAG's LoRAs.
With `lambda_text`, the language-model loss on the document's own text under its
LoRA (PRAG's other training examples) is added.
A share `p_passage` of the questions also carry the passage in the prompt, so the
generated LoRA learns to cooperate with it (DyPRAG-Combine); `p_passage_decay` sets
another share for the last `decay_share` of the steps. Where a fixed pool
has PRAG LoRAs, DyPRAG's distillation terms (KL to the PRAG model, MSE to its
LoRA) can be added.

Thousands of documents are what a hypernetwork needs: on 200 fixed documents
the cross-attention design memorised them (99.5 EM on its training documents)
and scored 1.5 EM on held-out ones.
"""

from __future__ import annotations

import random
import time
from itertools import islice
from typing import Iterator

import torch
from tqdm import tqdm

from moe_playground.models.lora import Loras
from moe_playground.models.translator import TranslatorConfig, Translator, build_translator, document_states, resolve_layers, translator_loss
from moe_playground.train.dyprag.base import encode_pairs
from moe_playground.train.dyprag.config import DyPragConfig, lr_factor
from moe_playground.train.dyprag.data import Doc, qa_prompt, qa_target
from moe_playground.train.dyprag.metrics import expand_per_question
from moe_playground.train.dyprag.prag import doc_texts

CALIBRATION_DOCS = 64  # documents whose token statistics standardize the translator's input


def pool_batches(docs: list[Doc], batch: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled passes over a fixed pool: lists of document indices."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch:
            fresh = list(range(len(docs)))
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch]
        order = order[batch:]


def qa_rows(docs: list[Doc], p_passage: float, per_doc: int, rng: random.Random) -> list[tuple[list[tuple[str, str]], list[int], float]]:
    """The augmentation questions of `docs` (`per_doc` random ones each, 0 = all) as (prompt, target) pairs, split into a closed-book
    group and a group whose prompts carry the document's passage (each question with
    probability p_passage): [(pairs, document of each pair, share of all pairs)], empty groups left out."""
    groups: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for i, d in enumerate(docs):
        for q in rng.sample(d.qa, min(per_doc, len(d.qa))) if per_doc else d.qa:
            with_passage = rng.random() < p_passage
            groups[with_passage][0].append((qa_prompt(q.question, d.passage if with_passage else None), qa_target(q.answer)))
            groups[with_passage][1].append(i)
    total = sum(len(pairs) for pairs, _ in groups.values())
    return [(pairs, rows, len(pairs) / total) for pairs, rows in groups.values() if pairs]


def train_translator(
    model, tokenizer, cfg: DyPragConfig, design: TranslatorConfig, targets, *, stream: Iterator[Doc] | None = None,
    pool: list[Doc] | None = None, pool_loras: Loras | None = None, seed: int, log,
) -> tuple[Translator, dict]:
    """A trained translator of `design` and a summary. Documents come from `stream` (fresh every
    step) or `pool` (a fixed list, with its PRAG LoRAs `pool_loras` when distilling)."""
    t = cfg.train
    if (stream is None) == (pool is None):
        raise ValueError("train_translator needs exactly one of stream (fresh documents) or pool (a fixed list)")
    if t.distills and pool_loras is None:
        raise ValueError("train.lambda_kl / lambda_mse need the PRAG LoRAs of the pool documents")
    layers = resolve_layers(design.read_layers, model.config.num_hidden_layers)
    doc_dim = len(layers) * model.config.hidden_size
    torch.manual_seed(seed)
    translator = build_translator(design, doc_dim, targets, cfg.lora.rank)
    calibration = list(islice(stream, CALIBRATION_DOCS)) if stream is not None else pool[:CALIBRATION_DOCS]
    translator.set_input_stats(*document_states(model, tokenizer, [d.passage for d in calibration], layers))

    opt = torch.optim.AdamW(translator.parameters(), lr=t.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.steps, t.warmup, t.schedule, t.decay_share))
    batches = pool_batches(pool, t.docs_per_step, seed) if pool is not None else None
    rng = random.Random(seed)
    # re-entered every step; backward runs outside it, in the dtypes the forward recorded
    autocast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    t0, seen, window = time.perf_counter(), 0, []
    bar = tqdm(range(t.steps), desc=f"translator ({design.design})", leave=False)
    for step in bar:
        if batches is not None:
            idx = next(batches)
            docs = [pool[i] for i in idx]
        else:
            docs = list(islice(stream, t.docs_per_step))
        seen += len(docs)
        with autocast:
            h_NSC, mask_NS = document_states(model, tokenizer, [d.passage for d in docs], layers)
            generated = translator(h_NSC, mask_NS)
            loss, parts = 0.0, {}
            # closed-book and passage rows are batched apart: padded together, every row would be passage-long
            for pairs, doc_of_row, share in qa_rows(docs, t.passage_share(step), t.questions_per_doc, rng):
                targets_rows = expand_per_question(pool_loras, [idx[i] for i in doc_of_row]) if t.distills else None
                part_loss, part = translator_loss(model, expand_per_question(generated, doc_of_row), encode_pairs(tokenizer, pairs, cfg.model.max_len),
                                                  cfg.lora.scaling, targets_rows, t.lambda_kl, t.lambda_mse)
                loss = loss + share * part_loss
                parts = {k: parts.get(k, 0.0) + share * v for k, v in part.items()}
            if t.lambda_text > 0:  # the document's own text, as PRAG trains on it
                texts = [rng.choice(doc_texts(d)) for d in docs]
                text_loss, _ = translator_loss(model, generated, encode_pairs(tokenizer, texts, cfg.model.max_len), cfg.lora.scaling)
                loss = loss + t.lambda_text * text_loss
                parts["text"] = text_loss.item()
                parts["loss"] += t.lambda_text * parts["text"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(translator.parameters(), 1.0).item()
        opt.step()
        sched.step()
        window.append(parts)
        if (step + 1) % t.log_every == 0 or step == t.steps - 1:
            mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
            log({"stage": f"translator_{design.design}", "step": step, "docs_seen": seen, "train_loss": mean["loss"],
                 **mean, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{mean['loss']:.3f}")
            window = []
    translator.eval()
    return translator, {
        "design": design.design,
        "train_seconds": time.perf_counter() - t0,
        "steps": t.steps,
        "documents_seen": seen,
        "distinct_documents": len(pool) if pool is not None else seen,
        "final": parts,
        "parameters": sum(p.numel() for p in translator.parameters()),
    }
