"""Stage 3 metrics: greedy answers with per-question LoRAs, SQuAD EM/F1, LoRA similarity.

Every evaluation row is the same closed-book or reading-comprehension prompt
with some LoRA per question (or none); `answer` runs them all through one
greedy decoder so rows differ only in what they are meant to differ in.
"""

from __future__ import annotations

import collections
import re
import string

import torch
from tqdm import tqdm

from moe_playground.models.lora import Loras, factored_lora
from moe_playground.train.dyprag.base import encode_pairs

# -----------------------------------------------------------------------------
# SQuAD answer normalization and scores


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: list[str]) -> float:
    return float(max(normalize_answer(pred) == normalize_answer(g) for g in golds))


def f1_score(pred: str, golds: list[str]) -> float:
    def f1(p: str, g: str) -> float:
        p_toks, g_toks = normalize_answer(p).split(), normalize_answer(g).split()
        if not p_toks or not g_toks:
            return float(p_toks == g_toks)
        same = sum((collections.Counter(p_toks) & collections.Counter(g_toks)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p_toks), same / len(g_toks)
        return 2 * precision * recall / (precision + recall)

    return max(f1(pred, g) for g in golds)


# -----------------------------------------------------------------------------
# greedy decoding with a LoRA per prompt


def _rows(loras: Loras, idx: torch.Tensor) -> Loras:
    """Per-sample LoRAs for the prompts `idx` (shared 2-D LoRAs are kept as they are)."""
    return {n: (A[idx], B[idx]) if A.dim() == 3 else (A, B) for n, (A, B) in loras.items()}


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], loras: Loras | None, scaling: float, *, max_new_tokens: int, batch_size: int, max_len: int, desc: str = "") -> list[str]:
    """Greedy answers (stop at EOS or a newline). `loras`: per-prompt [P, ...], shared, or None.

    Left-padded batches through `generate` with its KV cache: the LoRA hooks add each
    row's own delta at every decoding step, whatever the number of positions.
    """
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = prompts[start : start + batch_size]
        batch = encode_pairs(tokenizer, [(p, "") for p in chunk], max_len, padding_side="left")
        rows = _rows(loras, torch.arange(start, start + len(chunk))) if loras else {}
        with factored_lora(model, rows, scaling):
            ids_NT = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :]
        for row in ids_NT.tolist():
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return out


# -----------------------------------------------------------------------------
# LoRA sets


def expand_per_question(doc_loras: Loras, doc_of_question: list[int]) -> Loras:
    """Per-document LoRAs [D, ...] -> per-question LoRAs [Q, ...]."""
    idx = torch.tensor(doc_of_question)
    return {n: (A[idx], B[idx]) for n, (A, B) in doc_loras.items()}


def mean_lora(doc_loras: Loras) -> Loras:
    """The exact mean of the documents' weight deltas, in factored form.

    mean_k B_k A_k = [B_1 .. B_K] / K  @  [A_1; ..; A_K], a rank K*r LoRA with the
    same alpha/r scaling (averaging A and B separately would not be the mean delta).
    """
    out = {}
    for n, (A_KRI, B_KOR) in doc_loras.items():
        K, R, I = A_KRI.shape
        A_cat = A_KRI.reshape(K * R, I)  # rows of A_1, then A_2, ...
        B_cat = B_KOR.permute(1, 0, 2).reshape(B_KOR.shape[1], K * R) / K  # matching columns
        out[n] = (A_cat, B_cat)
    return out


def delta_matrix(doc_loras: Loras) -> torch.Tensor:
    """[D, P]: each document's dense weight deltas B A over all targets, flattened."""
    return torch.cat([(B @ A).flatten(1) for _, (A, B) in sorted(doc_loras.items())], 1)


def cosine_matrix(x_DP: torch.Tensor, y_DP: torch.Tensor | None = None) -> list[list[float]]:
    """[D, D] cosine similarities between rows of x and rows of y (default x), as lists."""
    y_DP = x_DP if y_DP is None else y_DP
    return (torch.nn.functional.normalize(x_DP, dim=1) @ torch.nn.functional.normalize(y_DP, dim=1).T).tolist()


def mean_offdiag_cosine(x_DP: torch.Tensor, y_DP: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean cosine over pairs i != j, mean cosine of pairs i == i) between rows of x and y."""
    cos_DD = torch.tensor(cosine_matrix(x_DP, y_DP))
    D = cos_DD.shape[0]
    off = cos_DD[~torch.eye(D, dtype=torch.bool)]
    return off.mean().item(), cos_DD.diagonal().mean().item()
