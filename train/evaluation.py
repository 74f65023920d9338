"""Evaluation of a language model on the whole validation split, with the model frozen.

Every validation token is predicted once: the split is cut into non-overlapping windows of
train.seq_len tokens (the last, incomplete one left out), split across processes. An evaluation
gives the entries it adds to a metrics row:

    val_loss                  mean next-token loss over all validation tokens (nats/token)
    val_loss/<domain>         the same over the tokens of one domain (the domain of the predicted token);
                              weighted by their token counts they average to val_loss
    layer{i}/val_max_vio      (max load - mean load) / mean load of layer i's routing, the loads summed
                              over every validation token: the frozen model's global balance, beside the
                              per-batch MaxVio logged during training
    val_max_vio               its mean over the layers that report loads

Loads come through the model's auxiliary-metrics protocol (`LMOutput.aux_metrics`): every
per-expert vector a layer reports (`layer{i}/tokens_per_expert`) is a load; a model without
sparse layers gives none, and no MaxVio entry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from moe_playground.train.data import Corpus, TokenStream, sample_windows

EVAL_TOKENS_PER_FORWARD = 8192  # windows per forward: this many tokens' worth (at least one training batch)


def window_starts(stream: TokenStream, seq_len: int) -> torch.Tensor:
    """Starts of the non-overlapping windows that cover the stream: each token is a target at most once."""
    return torch.arange((len(stream.tokens) - 1) // seq_len) * seq_len


def max_vio(load_E: torch.Tensor) -> float:
    load_E = load_E.double()
    return ((load_E.max() - load_E.mean()) / load_E.mean()).item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, cfg: Any, acc: Accelerator) -> dict[str, float]:
    """The evaluation's entries of a metrics row (see the module docstring); `cfg` is the run's
    LMRunConfig (train.seq_len, train.batch_size are read)."""
    seq_len, n_dom = cfg.train.seq_len, len(corpus.domain_names)
    starts = window_starts(corpus.val, seq_len)[acc.process_index::acc.num_processes]
    per_forward = max(cfg.train.batch_size, EVAL_TOKENS_PER_FORWARD // seq_len)
    loss_D = torch.zeros(n_dom, dtype=torch.float64)
    tokens_D = torch.zeros(n_dom, dtype=torch.float64)
    loads: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    for chunk in starts.split(per_forward):
        x, y, dom = sample_windows(corpus.val, chunk, seq_len)
        with acc.autocast():
            out = model(x.to(acc.device))
        nll = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten().to(acc.device), reduction="none")
        loss_D.index_add_(0, dom.flatten(), nll.double().cpu())
        tokens_D.index_add_(0, dom.flatten(), torch.ones(dom.numel(), dtype=torch.float64))
        for k, v in out.aux_metrics.items():
            if v.numel() > 1:  # a per-expert load
                loads[k] = loads.get(k, 0) + v.double().cpu()
    model.train(was_training)
    keys = list(loads)
    # one reduction for everything: losses, token counts and loads, summed over processes
    flat = torch.cat([loss_D, tokens_D, *(loads[k] for k in keys)])
    flat = acc.reduce(flat.to(acc.device), reduction="sum").cpu().double()
    loss_D, tokens_D, rest = flat[:n_dom], flat[n_dom:2 * n_dom], flat[2 * n_dom:]
    row = {"val_loss": round((loss_D.sum() / tokens_D.sum()).item(), 5)}
    row.update({f"val_loss/{name}": round((loss_D[d] / tokens_D[d]).item(), 5)
                for d, name in enumerate(corpus.domain_names) if tokens_D[d] > 0})
    vios = {}
    for k in keys:
        n = loads[k].numel()
        vios[f"{k.split('/')[0]}/val_max_vio"] = max_vio(rest[:n])
        rest = rest[n:]
    if vios:
        row["val_max_vio"] = round(sum(vios.values()) / len(vios), 6)
        row.update({k: round(v, 6) for k, v in vios.items()})
    return row
