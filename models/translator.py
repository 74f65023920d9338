"""Doc-to-LoRA generators: a frozen LM's token states of a document -> LoRA (A, B) for every adapted Linear.

Dynamic Parametric RAG (Tan et al. 2025) replaces PRAG's per-document LoRA
fine-tuning by one forward pass of a hypernetwork (a "parameter translator").
Read top to bottom: config, what the generator reads (document token states),
the designs and their registry, the training loss, checkpoints.

Every design reads the same input: the hidden states of every document token
at the chosen layers of the frozen base model (`document_states`). Designs:

  "cross_attention"    learned queries, R per adapted module, cross-attend over
                       every token state (Perceiver-style blocks); query (t, j)
                       emits row j of A_t and column j of B_t. Nothing is pooled
                       away, so each fact of the document can reach the LoRA.
                       The default: measured in docs/results/dyprag.md.
  "fast_weight"        fast weights: R write slots per adapted module; slot (t, j)
                       takes a softmax-weighted sum of the token states it selects
                       and writes the outer product of its value projection (column
                       j of B_t) and key projection (row j of A_t). One linear read
                       per token, no query blocks: the cheapest token-level design.
  "pooled_shared"      Text-to-LoRA style: one pooled vector (last or mean token),
                       one shared MLP with learned layer and module embeddings.
  "pooled_per_module"  DyPRAG style: one pooled vector, one small MLP per module.

The pooled designs are kept for comparison: a single vector of a small frozen
LM does not keep five facts of a document (a linear probe on it recovered a
20-way occupation at 10.7%), so they generate nearly the same LoRA for every
document.

Tensor names carry their shape: N documents, S document tokens, C read
features per token (layers x hidden), H generator width, Q queries,
T targets of one shape, R rank, I/O in/out features.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moe_playground.models.lora import LoraTarget, Loras, factored_lora, flatten_loras
from moe_playground.models.validate import check

# -----------------------------------------------------------------------------
# config

POOLINGS = ("last", "mean")


@dataclass
class TranslatorConfig:
    design: str = "cross_attention"  # a key of DESIGNS
    # Width of the generator (query / feature vectors). DyPRAG used 32 per module on 1-8B models.
    hidden: int = 64
    # Hidden states read per document token: 0 = token embeddings, l = output of decoder layer l,
    # negative counts from the end (-1 = last layer). [] = every layer, 0..L, concatenated.
    read_layers: list[int] = field(default_factory=list)
    pooling: str = "last"  # pooled designs: last non-pad token | mean over non-pad tokens
    blocks: int = 2  # cross_attention: query blocks (cross-attention + MLP each)
    heads: int = 4  # cross_attention: attention heads (hidden must divide by it)
    # Output heads start so that generated A looks like peft's kaiming-uniform init
    # (std 1/sqrt(3 in)) and B is small but non-zero: the base model is barely
    # changed at the start, yet every output already depends on the document.
    # (A zero B head would make the first LoRAs identical for every document.)
    init_std_b: float = 1e-3

    def __post_init__(self):
        check(self.design in DESIGNS, f"design={self.design!r} must be one of {tuple(DESIGNS)}")
        check(self.pooling in POOLINGS, f"pooling={self.pooling!r} must be one of {POOLINGS}")
        check(self.hidden >= 1 and self.blocks >= 1 and self.heads >= 1, "hidden, blocks and heads must be >= 1")
        check(self.hidden % self.heads == 0, f"hidden={self.hidden} must be divisible by heads={self.heads}")
        check(len(set(self.read_layers)) == len(self.read_layers), f"read_layers={self.read_layers} repeats a layer")
        check(self.init_std_b >= 0, f"init_std_b={self.init_std_b} must be >= 0")


def resolve_layers(read_layers: list[int], n_layers: int) -> list[int]:
    """Hidden-state indices 0..n_layers for `read_layers` ([] = all); ValueError if out of range."""
    if not read_layers:
        return list(range(n_layers + 1))
    out = []
    for layer in read_layers:
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"read_layers: {layer} is out of range for a model with {n_layers} layers (allowed -{n_layers + 1}..{n_layers})")
        out.append(layer % (n_layers + 1))
    return out


# -----------------------------------------------------------------------------
# what the generator reads: the frozen base model's states of every document token


class _Reached(Exception):
    """Raised by the hook on the deepest read layer: the rest of the forward is not needed."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (expected model.get_decoder().layers)")
    return layers


@torch.no_grad()
def document_states(model: nn.Module, tokenizer, docs: list[str], layers: list[int], batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Token states of each document at hidden-state indices `layers` (see resolve_layers),
    concatenated per token -> (h [N, S, C], mask [N, S]); right-padded, S = longest document.

    The forward stops after the deepest layer read, so reading a middle layer of a
    large model costs a fraction of a full forward.
    """
    if not docs or any(not isinstance(d, str) or not d.strip() for d in docs):
        raise ValueError("document_states needs a non-empty list of non-empty document strings")
    decoder_layers = _decoder_layers(model)
    layers = resolve_layers(layers, len(decoder_layers))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    captured: dict[int, Tensor] = {}

    def keep(index: int, stop: bool):
        def hook(module, args, out):
            captured[index] = out[0] if isinstance(out, tuple) else out
            if stop:
                raise _Reached

        return hook

    deepest = max(layers)
    modules = {0: model.get_input_embeddings(), **{i + 1: m for i, m in enumerate(decoder_layers)}}
    handles = [modules[i].register_forward_hook(keep(i, i == deepest)) for i in layers]
    chunks, masks = [], []
    try:
        for start in range(0, len(docs), batch_size):
            ids = [tokenizer(d)["input_ids"] for d in docs[start : start + batch_size]]
            S = max(map(len, ids))
            input_ids_NS = torch.tensor([x + [0] * (S - len(x)) for x in ids], device=device)
            mask_NS = torch.tensor([[1] * len(x) + [0] * (S - len(x)) for x in ids], device=device)
            captured.clear()
            try:
                model(input_ids=input_ids_NS, attention_mask=mask_NS)
            except _Reached:
                pass
            chunks.append(torch.cat([captured[i] for i in layers], -1).float())
            masks.append(mask_NS)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    S = max(c.shape[1] for c in chunks)
    h_NSC = torch.cat([F.pad(c, (0, 0, 0, S - c.shape[1])) for c in chunks])
    mask_NS = torch.cat([F.pad(m, (0, S - m.shape[1])) for m in masks])
    return h_NSC, mask_NS.bool()


def pool(h_NSC: Tensor, mask_NS: Tensor, pooling: str) -> Tensor:
    """One vector per document: the last non-pad token's state, or the mean over non-pad tokens."""
    if pooling == "last":
        return h_NSC[torch.arange(len(h_NSC), device=h_NSC.device), mask_NS.sum(1) - 1]
    m_NS1 = mask_NS.unsqueeze(-1).to(h_NSC.dtype)
    return (h_NSC * m_NS1).sum(1) / m_NS1.sum(1)


# -----------------------------------------------------------------------------
# building blocks


class LoraHead(nn.Module):
    """Feature vector(s) [..., H] -> A [..., R, I] and B [..., O, R] for one module shape."""

    def __init__(self, hidden: int, rank: int, in_features: int, out_features: int, init_std_b: float):
        super().__init__()
        self.shape_A, self.shape_B = (rank, in_features), (out_features, rank)
        self.to_A = nn.Linear(hidden, rank * in_features)
        self.to_B = nn.Linear(hidden, out_features * rank)
        # inputs are LayerNorm-ed (unit variance per feature), so weight std s / sqrt(H) gives outputs of std s
        nn.init.normal_(self.to_A.weight, std=1 / math.sqrt(3 * in_features * hidden))
        nn.init.normal_(self.to_B.weight, std=init_std_b / math.sqrt(hidden))
        nn.init.zeros_(self.to_A.bias)
        nn.init.zeros_(self.to_B.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        lead = z.shape[:-1]
        return self.to_A(z).view(*lead, *self.shape_A), self.to_B(z).view(*lead, *self.shape_B)


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden))


def _shape_key(t: LoraTarget) -> str:
    return f"{t.in_features}x{t.out_features}"


def _param_key(t: LoraTarget) -> str:
    return t.name.replace(".", "__")  # ModuleDict keys may not contain dots


# -----------------------------------------------------------------------------
# the designs


class Translator(nn.Module):
    """Base of every design: (h [N,S,C], mask [N,S]) -> per-sample LoRAs {target: (A [N,R,I], B [N,O,R])}.

    Token states of a frozen LM share large common directions and their layers
    differ in scale; standardizing each feature with statistics over training
    documents (set_input_stats) keeps what differs between documents. Identity
    until set; saved with the weights.
    """

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int):
        super().__init__()
        if not targets:
            raise ValueError("a translator needs at least one LoRA target")
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.cfg, self.doc_dim, self.targets, self.rank = cfg, doc_dim, list(targets), rank
        self.register_buffer("feat_mean", torch.zeros(doc_dim))
        self.register_buffer("feat_std", torch.ones(doc_dim))
        # targets with the same (in, out) shape are produced together
        self.groups: dict[str, list[LoraTarget]] = {}
        for t in self.targets:
            self.groups.setdefault(_shape_key(t), []).append(t)

    @torch.no_grad()
    def set_input_stats(self, h_NSC: Tensor, mask_NS: Tensor) -> None:
        """Standardize inputs with the per-feature mean/std over these (training) documents' tokens."""
        tokens_XC = h_NSC[mask_NS]
        self.feat_mean.copy_(tokens_XC.mean(0))
        self.feat_std.copy_(tokens_XC.std(0).clamp_min(1e-6) if len(tokens_XC) > 1 else torch.ones_like(self.feat_std))

    def forward(self, h_NSC: Tensor, mask_NS: Tensor) -> Loras:
        if h_NSC.dim() != 3 or h_NSC.shape[2] != self.doc_dim or mask_NS.shape != h_NSC.shape[:2]:
            raise ValueError(
                f"translator expects token states [N, S, {self.doc_dim}] and a mask [N, S], got {tuple(h_NSC.shape)} and {tuple(mask_NS.shape)}"
            )
        if not mask_NS.any(1).all():
            raise ValueError("translator: every document needs at least one token (a mask row is all False)")
        return self.generate((h_NSC - self.feat_mean) / self.feat_std, mask_NS.bool())

    def generate(self, x_NSC: Tensor, mask_NS: Tensor) -> Loras:
        raise NotImplementedError


class CrossAttentionTranslator(Translator):
    """R learned queries per adapted module attend over every document token (Perceiver-style).

    Each block: queries += attention(queries, token states); queries += MLP(queries).
    Query j of target t then emits row j of A_t [R, I] and column j of B_t [O, R]
    through a head shared by targets of one shape, so a rank-R LoRA is R
    independent reads of the document.
    """

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int):
        super().__init__(cfg, doc_dim, targets, rank)
        H = cfg.hidden
        self.token_in = nn.Sequential(nn.LayerNorm(doc_dim), nn.Linear(doc_dim, H))
        self.queries = nn.ParameterDict({key: nn.Parameter(torch.randn(len(ts), rank, H) / math.sqrt(H)) for key, ts in self.groups.items()})
        self.blocks = nn.ModuleList(_QueryBlock(H, cfg.heads) for _ in range(cfg.blocks))
        self.out_norm = nn.LayerNorm(H)
        self.heads = nn.ModuleDict({key: LoraHead(H, 1, ts[0].in_features, ts[0].out_features, cfg.init_std_b) for key, ts in self.groups.items()})

    def generate(self, x_NSC: Tensor, mask_NS: Tensor) -> Loras:
        N, R = x_NSC.shape[0], self.rank
        kv_NSH = self.token_in(x_NSC)
        keys = list(self.groups)
        q_QH = torch.cat([self.queries[k].flatten(0, 1) for k in keys])  # every group's queries attend together
        q_NQH = q_QH.expand(N, *q_QH.shape)
        for block in self.blocks:
            q_NQH = block(q_NQH, kv_NSH, mask_NS)
        q_NQH = self.out_norm(q_NQH)
        loras: Loras = {}
        start = 0
        for k in keys:
            ts = self.groups[k]
            z_NTRH = q_NQH[:, start : start + len(ts) * R].reshape(N, len(ts), R, -1)
            start += len(ts) * R
            a_NTR1I, b_NTRO1 = self.heads[k](z_NTRH)  # each query: one row of A, one column of B
            A_NTRI, B_NTOR = a_NTR1I.squeeze(3), b_NTRO1.squeeze(4).transpose(2, 3)
            for i, t in enumerate(ts):
                loras[t.name] = (A_NTRI[:, i], B_NTOR[:, i])
        return loras


class _QueryBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.kv, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, q_NQH: Tensor, kv_NSH: Tensor, mask_NS: Tensor) -> Tensor:
        N, Q, H = q_NQH.shape
        split = lambda x: x.view(N, -1, self.heads, H // self.heads).transpose(1, 2)  # noqa: E731  [N, heads, len, H/heads]
        k_NSH, v_NSH = self.kv(self.norm_kv(kv_NSH)).chunk(2, -1)
        att = F.scaled_dot_product_attention(split(self.q(self.norm_q(q_NQH))), split(k_NSH), split(v_NSH), attn_mask=mask_NS[:, None, None, :])
        q_NQH = q_NQH + self.out(att.transpose(1, 2).reshape(N, Q, H))
        return q_NQH + self.mlp(self.norm_mlp(q_NQH))


class FastWeightTranslator(Translator):
    """A fast-weight write: dW_t = sum_j v_tj k_tj^T, one rank-1 term per write slot j.

    Slot (t, j) scores every document token with one linear read, takes the
    softmax-weighted sum z_tj of the token states it selects, and writes the outer
    product of z_tj's value projection (column j of B_t) and key projection (row j
    of A_t). By linearity that is the sum, over the tokens the slot selects, of the
    outer products of their own key/value projections: a fast-weight memory of the
    document compressed to rank R. Heads are per target (layers may need different writes).
    """

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int):
        super().__init__(cfg, doc_dim, targets, rank)
        H = cfg.hidden
        self.token_in = nn.Sequential(nn.LayerNorm(doc_dim), nn.Linear(doc_dim, H))
        self.write = nn.Linear(H, len(self.targets) * rank)  # slot scores per token, targets in self.targets order
        self.slot_norm = nn.LayerNorm(H)
        self.heads = nn.ModuleDict({_param_key(t): LoraHead(H, 1, t.in_features, t.out_features, cfg.init_std_b) for t in self.targets})

    def generate(self, x_NSC: Tensor, mask_NS: Tensor) -> Loras:
        R = self.rank
        u_NSH = self.token_in(x_NSC)
        scores_NSQ = self.write(u_NSH).masked_fill(~mask_NS[..., None], float("-inf"))
        z_NQH = self.slot_norm(torch.einsum("nsq,nsh->nqh", scores_NSQ.softmax(1), u_NSH))
        loras: Loras = {}
        for i, t in enumerate(self.targets):
            a_NR1I, b_NRO1 = self.heads[_param_key(t)](z_NQH[:, i * R : (i + 1) * R])
            loras[t.name] = (a_NR1I.squeeze(2), b_NRO1.squeeze(3).transpose(1, 2))
        return loras


class PooledSharedTranslator(Translator):
    """One pooled document vector; one shared MLP over (document, layer, module) codes (Text-to-LoRA style)."""

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int):
        super().__init__(cfg, doc_dim, targets, rank)
        H = cfg.hidden
        self.doc_norm = nn.LayerNorm(doc_dim)
        self.doc_encoder = _mlp(doc_dim, H)
        layers = sorted({t.layer for t in self.targets})
        modules = sorted({t.module for t in self.targets})
        self.layer_emb = nn.Embedding(len(layers), H)
        self.module_emb = nn.Embedding(len(modules), H)
        for key, ts in self.groups.items():  # which embedding rows each group uses
            self.register_buffer(f"layer_ids_{key}", torch.tensor([layers.index(t.layer) for t in ts]), persistent=False)
            self.register_buffer(f"module_ids_{key}", torch.tensor([modules.index(t.module) for t in ts]), persistent=False)
        self.trunk = _mlp(3 * H, H)
        self.heads = nn.ModuleDict({key: LoraHead(H, rank, ts[0].in_features, ts[0].out_features, cfg.init_std_b) for key, ts in self.groups.items()})

    def generate(self, x_NSC: Tensor, mask_NS: Tensor) -> Loras:
        h_NH = self.doc_encoder(self.doc_norm(pool(x_NSC, mask_NS, self.cfg.pooling)))
        N, H = h_NH.shape
        loras: Loras = {}
        for key, ts in self.groups.items():
            e_layer_TH = self.layer_emb(getattr(self, f"layer_ids_{key}"))
            e_module_TH = self.module_emb(getattr(self, f"module_ids_{key}"))
            T = len(ts)
            z_NT3H = torch.cat([h_NH[:, None].expand(N, T, H), e_layer_TH.expand(N, T, H), e_module_TH.expand(N, T, H)], -1)
            A_NTRI, B_NTOR = self.heads[key](self.trunk(z_NT3H))
            for i, t in enumerate(ts):
                loras[t.name] = (A_NTRI[:, i], B_NTOR[:, i])
        return loras


class PooledPerModuleTranslator(Translator):
    """One pooled document vector; one small MLP and head per adapted module (DyPRAG style)."""

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int):
        super().__init__(cfg, doc_dim, targets, rank)
        self.doc_norm = nn.LayerNorm(doc_dim)
        self.projectors = nn.ModuleDict({_param_key(t): _mlp(doc_dim, cfg.hidden) for t in self.targets})
        self.heads = nn.ModuleDict({_param_key(t): LoraHead(cfg.hidden, rank, t.in_features, t.out_features, cfg.init_std_b) for t in self.targets})

    def generate(self, x_NSC: Tensor, mask_NS: Tensor) -> Loras:
        x_NC = self.doc_norm(pool(x_NSC, mask_NS, self.cfg.pooling))
        return {t.name: self.heads[_param_key(t)](self.projectors[_param_key(t)](x_NC)) for t in self.targets}


DESIGNS: dict[str, type[Translator]] = {
    "cross_attention": CrossAttentionTranslator,
    "fast_weight": FastWeightTranslator,
    "pooled_shared": PooledSharedTranslator,
    "pooled_per_module": PooledPerModuleTranslator,
}


def build_translator(cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget], rank: int) -> Translator:
    """The design `cfg.design` for these LoRA targets; doc_dim = features per token read (layers x hidden)."""
    return DESIGNS[cfg.design](cfg, doc_dim, targets, rank)


# -----------------------------------------------------------------------------
# training loss


def answer_logits(model: nn.Module, inputs: dict[str, Tensor], answer_NS: Tensor) -> Tensor:
    """Float logits [A, V] predicting the answer tokens (answer_NS marks positions 1.. of the inputs).

    The LM head runs on the A answer positions only, not on all N x S: on the tiny
    base it is a quarter of the FLOPs per token, and answers are ~1/8 of the tokens.
    Models that transform their logits after the head (soft-capping, a logit scale)
    take the full forward instead.
    """
    if any(getattr(model.config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return model(**inputs).logits[:, :-1][answer_NS].float()
    hidden_NSH = model.get_decoder()(**inputs).last_hidden_state
    return model.get_output_embeddings()(hidden_NSH[:, :-1][answer_NS]).float()


def translator_loss(
    model: nn.Module,
    translator_loras: Loras,
    batch: dict[str, Tensor],
    scaling: float,
    target_loras: Loras | None = None,
    lambda_kl: float = 0.0,
    lambda_mse: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DyPRAG's objective for one batch of (document QA, generated LoRA) rows.

    batch: input_ids, attention_mask, labels [N, S]; labels are -100 except on the
    answer tokens (HF convention: label at position s is the token at s, shifted here).
    translator_loras (and target_loras, the PRAG LoRAs, if given) are per-sample sets for the same N rows.

      lm  = cross-entropy of the answers with the generated LoRA (the main, end-to-end term)
      kl  = KL(model with target LoRA || model with generated LoRA) per answer token
      mse = mean squared difference of all A and B entries
    loss = lm + lambda_kl * kl + lambda_mse * mse; the distillation terms need target_loras.
    The base model should be frozen (requires_grad False); only the generated LoRA carries gradients.
    """
    if (lambda_kl > 0 or lambda_mse > 0) and target_loras is None:
        raise ValueError("translator_loss: lambda_kl / lambda_mse > 0 need target_loras (PRAG LoRAs of the same documents)")
    labels_NS = batch["labels"][:, 1:]
    answer_NS = labels_NS != -100
    if not answer_NS.any():
        raise ValueError("translator_loss: the batch has no answer tokens (all labels are -100)")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    with factored_lora(model, translator_loras, scaling):
        logp_AV = F.log_softmax(answer_logits(model, inputs, answer_NS), -1)  # A = answer tokens of all rows
    lm = F.nll_loss(logp_AV, labels_NS[answer_NS])
    parts = {"lm": lm}
    if lambda_kl > 0:
        with torch.no_grad(), factored_lora(model, target_loras, scaling):
            target_logp_AV = F.log_softmax(answer_logits(model, inputs, answer_NS), -1)
        parts["kl"] = F.kl_div(logp_AV, target_logp_AV, log_target=True, reduction="none").sum(-1).mean()
    if lambda_mse > 0:
        parts["mse"] = F.mse_loss(flatten_loras(translator_loras), flatten_loras(target_loras).to(logp_AV.dtype))
    loss = lm + lambda_kl * parts.get("kl", 0.0) + lambda_mse * parts.get("mse", 0.0)
    return loss, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


# -----------------------------------------------------------------------------
# checkpoints: weights + what they were built for


class TranslatorMismatchError(ValueError):
    """A translator checkpoint does not fit the base model it is used with."""


def save_translator(path: str | Path, translator: Translator) -> None:
    """safetensors weights with the config, rank, token width and targets in the metadata."""
    meta = {
        "config": json.dumps(asdict(translator.cfg)),
        "rank": str(translator.rank),
        "doc_dim": str(translator.doc_dim),
        "targets": json.dumps([asdict(t) for t in translator.targets]),
    }
    save_file({k: v.contiguous() for k, v in translator.state_dict().items()}, str(path), metadata=meta)


def read_translator_config(path: str | Path) -> tuple[TranslatorConfig, int, int, list[LoraTarget]]:
    """(config, rank, doc_dim, targets) stored in a checkpoint; TranslatorMismatchError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"translator checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise TranslatorMismatchError(f"{path}: not a safetensors file: {e}") from None
    if not {"config", "rank", "doc_dim", "targets"} <= meta.keys():
        raise TranslatorMismatchError(f"{path}: not a translator checkpoint (no config/rank/doc_dim/targets metadata)")
    targets = [LoraTarget(**t) for t in json.loads(meta["targets"])]
    return TranslatorConfig(**json.loads(meta["config"])), int(meta["rank"]), int(meta["doc_dim"]), targets


def check_translator_fits(path: str | Path, targets: list[LoraTarget], doc_dim: int) -> tuple[TranslatorConfig, int]:
    """Raise TranslatorMismatchError unless the checkpoint at `path` was built for exactly
    these LoRA targets (names and shapes) and this token width; return its config and rank."""
    cfg, rank, saved_dim, saved_targets = read_translator_config(path)
    saved = {t.name: t for t in saved_targets}
    wanted = {t.name: t for t in targets}
    problems = []
    if saved_dim != doc_dim:
        problems.append(f"token-state width {saved_dim} in the checkpoint, {doc_dim} for this base model and read_layers")
    if missing := sorted(wanted.keys() - saved.keys()):
        problems.append(f"base-model modules the checkpoint has no LoRA for: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(saved.keys() - wanted.keys()):
        problems.append(f"checkpoint modules absent from this base model/target_modules: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(wanted.keys() & saved.keys()):
        s, w = saved[name], wanted[name]
        if (s.in_features, s.out_features) != (w.in_features, w.out_features):
            problems.append(f"{name}: checkpoint shape in={s.in_features} out={s.out_features}, model in={w.in_features} out={w.out_features}")
    if problems:
        raise TranslatorMismatchError(f"translator checkpoint {path} does not fit the base model: " + "; ".join(problems))
    return cfg, rank


def load_translator(path: str | Path, targets: list[LoraTarget], doc_dim: int) -> Translator:
    """A translator from `save_translator`, after check_translator_fits."""
    cfg, rank = check_translator_fits(path, targets, doc_dim)
    translator = build_translator(cfg, doc_dim, targets, rank)
    translator.load_state_dict(load_file(str(path)))
    return translator
