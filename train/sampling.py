"""Sampling from a trained toy LM with a KV cache: every step runs only the new token.

`generate` yields token ids as they come (greedy at temperature 0, else softmax(logits / temperature),
optionally over the top k); `domain_samples` continues one validation prompt per corpus domain, for the
trainer's summary.
"""

from __future__ import annotations

from typing import Iterator

import torch

from moe_playground.train.data import Corpus


def check_lengths(n_prompt: int, max_new_tokens: int, max_seq_len: int) -> None:
    """ValueError unless a prompt of `n_prompt` tokens plus `max_new_tokens` fits the model's context."""
    if n_prompt < 1:
        raise ValueError("the prompt must encode to at least one token")
    if max_new_tokens < 0 or n_prompt + max_new_tokens > max_seq_len:
        raise ValueError(f"a prompt of {n_prompt} tokens plus max_new_tokens={max_new_tokens} must fit model.max_seq_len="
                         f"{max_seq_len} (at most {max(0, max_seq_len - n_prompt)} new tokens)")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
    """Token ids following `prompt`, one at a time. temperature 0 = greedy; top_k keeps the k likeliest."""
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"temperature={temperature} must be >= 0 and top_k={top_k} >= 1")
    check_lengths(len(prompt), max_new_tokens, model.cfg.max_seq_len)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        device = next(model.parameters()).device
        logits = model(torch.tensor([prompt], device=device), cache=cache).logits[0, -1]
        for i in range(max_new_tokens):
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits.float() / temperature
                if top_k is not None and top_k < logits.numel():
                    logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
                token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
            yield token
            if i + 1 < max_new_tokens:
                logits = model(torch.tensor([[token]], device=device), cache=cache).logits[0, -1]
    finally:
        model.train(was_training)


def domain_samples(model: torch.nn.Module, corpus: Corpus, max_new_tokens: int = 48) -> dict[str, dict[str, str]]:
    """Per domain, the first half of its first validation line and the model's greedy continuation up to the
    end of the line: a glance at what the model learned."""
    out, tok = {}, corpus.tokenizer
    for d, name in enumerate(corpus.domain_names):
        where = (corpus.val.domains == d).nonzero()
        if len(where) == 0:
            continue
        start = int(where[0])
        line = tok.decode(corpus.val.tokens[start:start + 4 * model.cfg.max_seq_len].tolist()).split("\n")[0]
        prompt = tok.encode(line[:max(1, len(line) // 2)])[:model.cfg.max_seq_len - 1]
        new = []
        for t in generate(model, prompt, min(max_new_tokens, model.cfg.max_seq_len - len(prompt)), temperature=0):
            new.append(t)
            if "\n" in tok.decode([t]):
                break
        out[name] = {"prompt": tok.decode(prompt), "continuation": tok.decode(new).split("\n")[0]}
    return out
