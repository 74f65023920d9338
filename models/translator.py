"""DyPRAG parameter translator: document embedding -> LoRA (A, B) for every adapted Linear.

Dynamic Parametric RAG (Tan et al. 2025) replaces PRAG's per-document LoRA
fine-tuning by one forward pass of a hypernetwork. Read top to bottom: config,
document embedding, the two translator designs, the training loss, checkpoints.

Two designs, chosen by `TranslatorConfig.design`:
  "shared"     one network for all targets (as in Text-to-LoRA): the document
               code is concatenated with a learned layer embedding and a learned
               module embedding, a shared MLP makes one feature vector per
               (layer, module), and one output head per module shape turns it into A, B.
  "per_module" one small MLP per (layer, module) straight from the document
               embedding (as in DyPRAG).

Tensor names carry their shape: N documents, D document-embedding width,
H translator width, T targets of one shape, R rank, I/O in/out features.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.lora import LoraTarget, Loras, factored_lora, flatten_loras

# -----------------------------------------------------------------------------
# config

DESIGNS = ("shared", "per_module")
POOLINGS = ("last", "mean")


@dataclass
class TranslatorConfig:
    design: str = "shared"  # "shared" (Text-to-LoRA style) | "per_module" (DyPRAG style)
    # Width of the document code and of every (layer, module) feature vector.
    # 64 is plenty for the tiny base model; DyPRAG used 32 per module on 1-8B models.
    hidden: int = 64
    rank: int = 2  # LoRA rank; must equal the r of the target (PRAG) LoRAs
    pooling: str = "last"  # document embedding: last non-pad token | mean over non-pad tokens
    # Output heads start so that generated A looks like peft's kaiming-uniform init
    # (std 1/sqrt(3 in)) and B is small but non-zero: the base model is barely
    # changed at the start, yet every output already depends on the document.
    # (A zero B head would make the first LoRAs identical for every document.)
    init_std_b: float = 1e-3

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        check(self.design in DESIGNS, f"design={self.design!r} must be one of {DESIGNS}")
        check(self.pooling in POOLINGS, f"pooling={self.pooling!r} must be one of {POOLINGS}")
        check(self.hidden >= 1, f"hidden={self.hidden} must be >= 1")
        check(self.rank >= 1, f"rank={self.rank} must be >= 1")
        check(self.init_std_b >= 0, f"init_std_b={self.init_std_b} must be >= 0")


# -----------------------------------------------------------------------------
# document embedding (frozen base model)


@torch.no_grad()
def embed_documents(model: nn.Module, tokenizer, docs: list[str], pooling: str = "last", batch_size: int = 16) -> Tensor:
    """Last-layer hidden states of the frozen base model over each document, pooled -> [N, D].

    "last": the state at the last document token (it has read the whole document
    under causal attention); "mean": the mean over the document's tokens.
    Documents are right-padded by hand, so tokenizers without a pad token work.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    if not docs or any(not isinstance(d, str) or not d.strip() for d in docs):
        raise ValueError("embed_documents needs a non-empty list of non-empty document strings")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(docs), batch_size):
        ids = [tokenizer(d)["input_ids"] for d in docs[start : start + batch_size]]
        S = max(map(len, ids))
        input_ids_NS = torch.tensor([x + [0] * (S - len(x)) for x in ids], device=device)
        mask_NS = torch.tensor([[1] * len(x) + [0] * (S - len(x)) for x in ids], device=device)
        h_NSD = model(input_ids=input_ids_NS, attention_mask=mask_NS, output_hidden_states=True).hidden_states[-1]
        if pooling == "last":
            out.append(h_NSD[torch.arange(len(ids), device=device), mask_NS.sum(1) - 1])
        else:
            m_NS1 = mask_NS.unsqueeze(-1).to(h_NSD.dtype)
            out.append((h_NSD * m_NS1).sum(1) / m_NS1.sum(1))
    model.train(was_training)
    return torch.cat(out).float()


# -----------------------------------------------------------------------------
# the translator


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


class ParameterTranslator(nn.Module):
    """Document embeddings [N, D] -> per-sample LoRAs {target name: (A [N,R,I], B [N,O,R])}.

    Call set_input_stats(training document embeddings) before training: on a toy
    fit of 16 near-identical embeddings to 16 distinct LoRAs it took the shared
    design from 69% to 100% of documents whose generated LoRA is nearest to its own target.
    """

    def __init__(self, cfg: TranslatorConfig, doc_dim: int, targets: list[LoraTarget]):
        super().__init__()
        if not targets:
            raise ValueError("ParameterTranslator needs at least one LoRA target")
        self.cfg, self.doc_dim, self.targets = cfg, doc_dim, list(targets)
        # Embeddings of a frozen LM share large common directions; standardizing each
        # feature with statistics over the training documents (set_input_stats) keeps
        # what differs between documents. Identity until set; saved with the weights.
        self.register_buffer("doc_mean", torch.zeros(doc_dim))
        self.register_buffer("doc_std", torch.ones(doc_dim))
        self.doc_norm = nn.LayerNorm(doc_dim)
        # targets with the same (in, out) shape are produced together
        self.groups: dict[str, list[LoraTarget]] = {}
        for t in self.targets:
            self.groups.setdefault(_shape_key(t), []).append(t)
        H, R = cfg.hidden, cfg.rank

        if cfg.design == "shared":
            self.doc_encoder = _mlp(doc_dim, H)
            layers = sorted({t.layer for t in self.targets})
            modules = sorted({t.module for t in self.targets})
            self.layer_emb = nn.Embedding(len(layers), H)
            self.module_emb = nn.Embedding(len(modules), H)
            for key, ts in self.groups.items():  # which embedding rows each group uses
                self.register_buffer(f"layer_ids_{key}", torch.tensor([layers.index(t.layer) for t in ts]), persistent=False)
                self.register_buffer(f"module_ids_{key}", torch.tensor([modules.index(t.module) for t in ts]), persistent=False)
            self.trunk = _mlp(3 * H, H)
            self.heads = nn.ModuleDict(
                {key: LoraHead(H, R, ts[0].in_features, ts[0].out_features, cfg.init_std_b) for key, ts in self.groups.items()}
            )
        else:  # per_module: everything after the input normalization is separate per target
            self.projectors = nn.ModuleDict({_param_key(t): _mlp(doc_dim, H) for t in self.targets})
            self.heads = nn.ModuleDict(
                {_param_key(t): LoraHead(H, R, t.in_features, t.out_features, cfg.init_std_b) for t in self.targets}
            )

    @torch.no_grad()
    def set_input_stats(self, doc_emb_ND: Tensor) -> None:
        """Standardize inputs with the mean/std of these (training) document embeddings."""
        self.doc_mean.copy_(doc_emb_ND.mean(0))
        self.doc_std.copy_(doc_emb_ND.std(0).clamp_min(1e-6) if len(doc_emb_ND) > 1 else torch.ones_like(self.doc_std))

    def forward(self, doc_emb_ND: Tensor) -> Loras:
        if doc_emb_ND.dim() != 2 or doc_emb_ND.shape[1] != self.doc_dim:
            raise ValueError(f"translator expects document embeddings [N, {self.doc_dim}], got {tuple(doc_emb_ND.shape)}")
        x_ND = self.doc_norm((doc_emb_ND - self.doc_mean) / self.doc_std)
        loras: Loras = {}
        if self.cfg.design == "shared":
            h_NH = self.doc_encoder(x_ND)
            N, H = h_NH.shape
            for key, ts in self.groups.items():
                e_layer_TH = self.layer_emb(getattr(self, f"layer_ids_{key}"))
                e_module_TH = self.module_emb(getattr(self, f"module_ids_{key}"))
                T = len(ts)
                z_NT3H = torch.cat([h_NH[:, None].expand(N, T, H), e_layer_TH.expand(N, T, H), e_module_TH.expand(N, T, H)], -1)
                A_NTRI, B_NTOR = self.heads[key](self.trunk(z_NT3H))
                for i, t in enumerate(ts):
                    loras[t.name] = (A_NTRI[:, i], B_NTOR[:, i])
        else:
            for t in self.targets:
                k = _param_key(t)
                loras[t.name] = self.heads[k](self.projectors[k](x_ND))
        return loras


def _param_key(t: LoraTarget) -> str:
    return t.name.replace(".", "__")  # ModuleDict keys may not contain dots


# -----------------------------------------------------------------------------
# training loss


def translator_loss(
    model: nn.Module,
    translator_loras: Loras,
    target_loras: Loras,
    batch: dict[str, Tensor],
    scaling: float,
    lambda_kl: float = 0.01,
    lambda_mse: float = 100.0,
) -> tuple[Tensor, dict[str, float]]:
    """DyPRAG's objective for one batch of (document QA, target LoRA) pairs.

    batch: input_ids, attention_mask, labels [N, S]; labels are -100 except on the
    answer tokens (HF convention: label at position s is the token at s, shifted here).
    translator_loras and target_loras are per-sample sets for the same N rows.

      lm  = cross-entropy of the answers with the generated LoRA
      kl  = KL(model with target LoRA || model with generated LoRA) per answer token
      mse = mean squared difference of all A and B entries
    loss = lm + lambda_kl * kl + lambda_mse * mse.  The base model should be frozen
    (requires_grad False); only the generated LoRA carries gradients.
    """
    labels_NS = batch["labels"][:, 1:]
    answer_NS = labels_NS != -100
    if not answer_NS.any():
        raise ValueError("translator_loss: the batch has no answer tokens (all labels are -100)")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    with factored_lora(model, translator_loras, scaling):
        logits_NSV = model(**inputs).logits[:, :-1].float()
    with torch.no_grad(), factored_lora(model, target_loras, scaling):
        target_logits_NSV = model(**inputs).logits[:, :-1].float()

    logp_AV = F.log_softmax(logits_NSV[answer_NS], -1)  # A = answer tokens of all rows
    lm = F.nll_loss(logp_AV, labels_NS[answer_NS])
    target_logp_AV = F.log_softmax(target_logits_NSV[answer_NS], -1)
    kl = F.kl_div(logp_AV, target_logp_AV, log_target=True, reduction="none").sum(-1).mean()
    mse = F.mse_loss(flatten_loras(translator_loras), flatten_loras(target_loras).to(logits_NSV.dtype))

    loss = lm + lambda_kl * kl + lambda_mse * mse
    return loss, {"loss": loss.item(), "lm": lm.item(), "kl": kl.item(), "mse": mse.item()}


# -----------------------------------------------------------------------------
# checkpoints: weights + what they were built for


class TranslatorMismatchError(ValueError):
    """A translator checkpoint does not fit the base model it is used with."""


def save_translator(path: str | Path, translator: ParameterTranslator) -> None:
    """safetensors weights with the config, document width and targets in the metadata."""
    meta = {
        "config": json.dumps(asdict(translator.cfg)),
        "doc_dim": str(translator.doc_dim),
        "targets": json.dumps([asdict(t) for t in translator.targets]),
    }
    save_file({k: v.contiguous() for k, v in translator.state_dict().items()}, str(path), metadata=meta)


def check_translator_fits(path: str | Path, targets: list[LoraTarget], doc_dim: int) -> TranslatorConfig:
    """Raise TranslatorMismatchError unless the checkpoint at `path` was built for exactly
    these LoRA targets (names and shapes) and this document width; return its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"translator checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise TranslatorMismatchError(f"{path}: not a safetensors file: {e}") from None
    if not {"config", "doc_dim", "targets"} <= meta.keys():
        raise TranslatorMismatchError(f"{path}: not a translator checkpoint (no config/doc_dim/targets metadata)")
    saved = {t["name"]: LoraTarget(**t) for t in json.loads(meta["targets"])}
    wanted = {t.name: t for t in targets}
    problems = []
    if int(meta["doc_dim"]) != doc_dim:
        problems.append(f"document embedding width {meta['doc_dim']} in the checkpoint, {doc_dim} for this base model")
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
    return TranslatorConfig(**json.loads(meta["config"]))


def load_translator(path: str | Path, targets: list[LoraTarget], doc_dim: int) -> ParameterTranslator:
    """A translator from `save_translator`, after check_translator_fits."""
    cfg = check_translator_fits(path, targets, doc_dim)
    translator = ParameterTranslator(cfg, doc_dim, targets)
    translator.load_state_dict(load_file(str(path)))
    return translator
