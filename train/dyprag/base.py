"""The base model for DyPRAG: a tiny Llama pretrained here, or any local causal LM.

The tiny model gets a BPE tokenizer trained with `tokenizers` on the synthetic
corpus and a short pretraining on `dyprag_data.pretrain_sample`, so that it can
answer from a passage in its prompt (Standard RAG) and from its weights
(closed-book, the format PRAG and DyPRAG rely on). Both are saved with
`save_pretrained` and reload with the Auto classes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moe_playground.train.dyprag.config import lr_factor
from moe_playground.train.dyprag.data import BOS, EOS, PAD, pretrain_sample


# -----------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


# -----------------------------------------------------------------------------
# batches: prompt tokens are context only, target tokens carry the loss


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int, padding_side: str = "right") -> dict:
    """Right-padded (or left-padded) batch; labels are -100 except on target tokens.

    The corpus marks ends of text with data.EOS; each tokenizer gets its own end-of-text
    token there, so a pretrained model learns to stop where it already knows how to."""
    rows = []
    eos = tokenizer.eos_token
    for prompt, target in pairs:
        p = tokenizer(prompt.replace(EOS, eos), add_special_tokens=False)["input_ids"] if prompt else []
        t = tokenizer(target.replace(EOS, eos), add_special_tokens=False)["input_ids"]
        ids = (p + t)[-max_len:]  # keep the answer if too long: cut the front of the passage
        labels = ([-100] * len(p) + t)[-max_len:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids, labels, mask = [], [], []
    for ids, lab in rows:
        n = width - len(ids)
        fill = (lambda x, v: [v] * n + x) if padding_side == "left" else (lambda x, v: x + [v] * n)
        input_ids.append(fill(ids, pad))
        labels.append(fill(lab, -100))
        mask.append(fill([1] * len(ids), 0))
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


# -----------------------------------------------------------------------------
# the tiny Llama and its pretraining


def build_tiny_llama(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_len: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, known, *, steps: int, batch_size: int, lr: float, max_len: int, seed: int, log, augment_wordings: int = 1) -> dict:
    """AdamW with linear warmup and cosine decay on an endless stream of corpus samples."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup=steps // 20))
    model.train()
    t0, ema = time.time(), None
    bar = tqdm(range(steps), desc="pretrain base model", leave=False)
    for step in bar:
        batch = encode_pairs(tokenizer, [pretrain_sample(rng, known, augment_wordings) for _ in range(batch_size)], max_len)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if step % 100 == 0 or step == steps - 1:
            log({"stage": "base", "step": step, "loss": loss.item()})
    model.eval()
    return {"pretrain_steps": steps, "pretrain_seconds": time.time() - t0, "final_loss_ema": ema}


# -----------------------------------------------------------------------------
# loading (the pretrained tiny model or a user's local model)


def load_base(path: str | Path):
    """Model (float32, eval, frozen) and tokenizer from a local dir; ValueError if it does not load."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"base_model: directory not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on what is wrong
        raise ValueError(f"base_model: {path} does not load as a transformers causal LM with tokenizer: {e}") from None
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return model, tokenizer
