"""Stage 1 (PRAG): one LoRA per document, trained on the document's augmentations.

Each document's training examples are its passage and rewrite (language-model
loss on every token) and its augmentation QA in the closed-book format (loss on
the answer only). As in PRAG, one optimizer step sees one example (batch size
1), `epochs` passes over the examples, and every LoRA starts from the same
initialization: peft's init under a fixed seed (A kaiming-uniform, B zero).

Two equivalent ways to run it:
  train_peft     one peft model per document, one after another (the reference)
  train_batched  `batch_docs` documents at once: their LoRAs are per-sample
                 factored LoRAs (models.lora.factored_lora) of one forward pass;
                 step k trains every document on its own k-th example. Adam is
                 elementwise and the summed loss keeps each document's gradient
                 apart, so each LoRA follows the same path as with train_peft.
Documents with fewer examples than others in their batch cycle through theirs.
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from moe_playground.models.lora import Loras, factored_lora, loras_from_peft
from moe_playground.train.dyprag.base import encode_pairs
from moe_playground.train.dyprag.config import LoraShape, PragConfig
from moe_playground.train.dyprag.data import EOS, Doc, qa_prompt, qa_target


def doc_texts(doc: Doc) -> list[tuple[str, str]]:
    """The document's own text as (prompt, target) pairs: passage and rewrite, the whole text a target."""
    return [("", doc.passage + EOS)] + ([("", doc.rewrite + EOS)] if doc.rewrite else [])


def doc_examples(doc: Doc) -> list[tuple[str, str]]:
    """(prompt, target) pairs: loss on the target only."""
    return doc_texts(doc) + [(qa_prompt(q.question), qa_target(q.answer)) for q in doc.qa]


def lora_config(shape: LoraShape) -> LoraConfig:
    return LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=list(shape.target_modules), layers_to_transform=list(shape.layers) or None,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def initial_lora(model, shape: LoraShape, seed: int) -> Loras:
    """The shared starting point: peft's initialization under `seed`."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(shape))
    init = loras_from_peft(peft_model)
    peft_model.unload()  # removes the LoRA layers, leaving `model` as it was
    return init


def train_peft(model, tokenizer, doc: Doc, shape: LoraShape, *, lr, epochs, seed, max_len) -> Loras:
    """One document's LoRA with peft (AdamW, batch size 1, no weight decay)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(shape))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    examples = doc_examples(doc)
    for _ in range(epochs):
        for ex in examples:
            loss = peft_model(**encode_pairs(tokenizer, [ex], max_len)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    loras = loras_from_peft(peft_model)
    peft_model.unload()
    return loras


def train_batched(model, tokenizer, docs: list[Doc], init: Loras, *, scaling, lr, epochs, max_len) -> list[Loras]:
    """len(docs) LoRAs trained together from `init`; returns one unbatched LoRA per document."""
    N = len(docs)
    # per-sample copies of the shared init: A [N, r, in], B [N, out, r]
    params = {n: (A.expand(N, *A.shape).clone().requires_grad_(), B.expand(N, *B.shape).clone().requires_grad_()) for n, (A, B) in init.items()}
    opt = torch.optim.AdamW([t for ab in params.values() for t in ab], lr=lr, weight_decay=0.0)
    examples = [doc_examples(d) for d in docs]
    steps = max(map(len, examples))
    for _ in range(epochs):
        for k in range(steps):
            batch = encode_pairs(tokenizer, [ex[k % len(ex)] for ex in examples], max_len)
            with factored_lora(model, params, scaling):
                logits_NSV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels_NS = batch["labels"][:, 1:]
            tok_loss_NS = torch.nn.functional.cross_entropy(logits_NSV.transpose(1, 2), labels_NS, reduction="none")
            # sum over documents of each one's mean token loss = N independent batch-size-1 losses
            loss = (tok_loss_NS.sum(1) / (labels_NS != -100).sum(1).clamp_min(1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [{n: (A[i].detach().clone(), B[i].detach().clone()) for n, (A, B) in params.items()} for i in range(N)]


def train_doc_loras(model, tokenizer, docs: list[Doc], shape: LoraShape, cfg: PragConfig, max_len: int, desc: str) -> tuple[list[Loras], float]:
    """All documents' LoRAs with the config's batching; returns them and seconds per document."""
    model.requires_grad_(False)
    init = initial_lora(model, shape, cfg.init_seed)
    out: list[Loras] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(docs), desc=desc, leave=False)
    for start in range(0, len(docs), cfg.batch_docs):
        chunk = docs[start : start + cfg.batch_docs]
        if cfg.batch_docs == 1:
            out.append(train_peft(model, tokenizer, chunk[0], shape, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.init_seed, max_len=max_len))
        else:
            out += train_batched(model, tokenizer, chunk, init, scaling=shape.scaling, lr=cfg.lr, epochs=cfg.epochs, max_len=max_len)
        bar.update(len(chunk))
    bar.close()
    return out, (time.perf_counter() - t0) / len(docs)
