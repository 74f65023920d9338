"""Typed config of the DyPRAG pipeline (loaded with train.config.load_config).

configs/dyprag/base.yaml holds the shared values; the other files there are
small deltas on it. Every section validates itself, so a bad value is a
ConfigError naming the key before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from moe_playground.models.translator import DESIGNS, TranslatorConfig
from moe_playground.train.config import check
from moe_playground.train.dyprag.data import AUGMENT_WORDINGS, OOD_AXES

SOURCES = ("synthetic", "jsonl", "prag")


@dataclass
class DataConfig:
    # "synthetic": generated fictional people | "jsonl": the two files below in
    # data.py's JSONL format | "prag": the two files below are PRAG's augmented
    # QA files (train.dyprag.prag_format; e.g. data_aug/popqa/<model>/total.json)
    source: str = "synthetic"
    train_file: str = ""
    test_file: str = ""
    prag_dataset: str = ""  # source=prag: dataset name when the path does not tell (load_prag's dataset=)
    augment_model: str = ""  # source=prag: which '<model>_qa' fields to read if there are several
    # synthetic: 0 = the translator reads fresh documents every step (thousands in a run);
    # N > 0 = a fixed pool of N documents, each with its PRAG LoRA (what distillation needs)
    n_train_docs: int = 0
    n_test_docs: int = 40  # synthetic: held-out documents (entities disjoint from training)
    n_ood_docs: int = 40  # synthetic: held-out documents per out-of-distribution split
    ood_axes: list[str] = field(default_factory=lambda: list(OOD_AXES))  # the OOD splits: what is new in each (data.ood_doc)
    n_known: int = 100  # synthetic: entities the base model learns closed-book in pretraining
    # synthetic: each augmentation question (PRAG's and the translator's training QA) takes one of
    # the first N augmentation wordings at random (data.AUGMENT_WORDINGS), and the base model's
    # pretraining asks in them too; 1 = always wording 0
    augment_wordings: int = 1

    def __post_init__(self):
        check(self.source in SOURCES, f"data.source={self.source!r} must be one of {SOURCES}")
        if self.source != "synthetic":
            check(bool(self.train_file and self.test_file), f"data.train_file and data.test_file must name files when data.source={self.source}")
        check(self.n_train_docs == 0 or self.n_train_docs >= 2, f"data.n_train_docs={self.n_train_docs} must be 0 (stream) or >= 2")
        check(self.n_test_docs >= 2, f"data.n_test_docs={self.n_test_docs} must be >= 2 (the shuffled control needs another doc)")
        check(self.n_ood_docs == 0 or self.n_ood_docs >= 2, f"data.n_ood_docs={self.n_ood_docs} must be 0 or >= 2")
        for a in self.ood_axes:
            check(a in OOD_AXES, f"data.ood_axes: {a!r} is not an axis; allowed: {OOD_AXES}")
        check(self.n_known >= 1, f"data.n_known={self.n_known} must be >= 1")
        check(1 <= self.augment_wordings <= len(AUGMENT_WORDINGS), f"data.augment_wordings={self.augment_wordings} must be in 1..{len(AUGMENT_WORDINGS)}")


@dataclass
class BaseConfig:
    # "" = build and pretrain the tiny Llama below; else a local transformers causal-LM dir,
    # where "{seed}" stands for the seed (e.g. another run's runs/<run>/seed_{seed}/base_model)
    path: str = ""

    def path_for(self, seed: int) -> str:
        return self.path.replace("{seed}", str(seed))
    vocab_size: int = 512  # BPE tokenizer fitted on the synthetic training text
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    max_len: int = 192  # longest sequence (passage + question + answer) in tokens
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3

    def __post_init__(self):
        for k in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_len", "steps", "batch_size"):
            check(getattr(self, k) >= 1, f"model.{k}={getattr(self, k)} must be >= 1")
        check(self.hidden % self.heads == 0, f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}")
        check(self.lr > 0, f"model.lr={self.lr} must be > 0")


@dataclass
class LoraShape:
    """The LoRA every method produces: PRAG fine-tunes it, the translator generates it."""

    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    layers: list[int] = field(default_factory=list)  # decoder layers adapted; [] = all (upper layers only: backward stops early)
    rank: int = 2
    alpha: float = 32.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        check(len(self.target_modules) > 0, "lora.target_modules must name at least one module")
        check(all(i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers), f"lora.layers={self.layers} must be distinct layer indices >= 0")
        check(self.rank >= 1, f"lora.rank={self.rank} must be >= 1")
        check(self.alpha > 0, f"lora.alpha={self.alpha} must be > 0")


@dataclass
class PragConfig:
    # DyPRAG's stage-1 values: lr 3e-4, 1 epoch, batch size 1
    lr: float = 3e-4
    epochs: int = 1
    init_seed: int = 0  # every document's LoRA starts from the same initialization
    batch_docs: int = 16  # documents trained together (per-sample factored LoRAs); 1 = one peft model at a time
    time_peft_docs: int = 2  # test documents also trained one at a time with peft, for the cost table

    def __post_init__(self):
        check(self.lr > 0, f"prag.lr={self.lr} must be > 0")
        check(self.epochs >= 1, f"prag.epochs={self.epochs} must be >= 1")
        check(self.batch_docs >= 1 and self.time_peft_docs >= 0, "prag.batch_docs must be >= 1 and prag.time_peft_docs >= 0")


SCHEDULES = ("cosine", "wsd")
PRECISIONS = ("fp32", "bf16")


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "cosine", decay_share: float = 1.0) -> float:
    """The learning rate at `step` (0-based) of `steps` as a share of the peak: linear warmup, then
    "cosine" (cosine decay to 0 over all steps) or "wsd" (constant, then linear to 0 over the last
    decay_share of the steps; 1.0 = all of them)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    return warm * min(1.0, (steps - step) / (decay_share * steps))


@dataclass
class TrainConfig:
    """How every translator design is trained (stage 2)."""

    steps: int = 600
    docs_per_step: int = 32
    questions_per_doc: int = 0  # augmentation questions scored per document and step (a random few); 0 = all
    lr: float = 1e-3
    warmup: int = 30  # linear warmup steps, then the decay of `schedule`
    # "cosine": cosine decay to 0 over all steps; "wsd": warmup, then constant, then linear to 0
    # over the last `decay_share` of the steps (more steps at full learning rate)
    schedule: str = "cosine"
    decay_share: float = 0.2
    # Share of QA rows that also see the passage in the prompt: a LoRA trained only
    # closed-book was never asked to cooperate with the passage (DyPRAG-Combine).
    p_passage: float = 0.25
    # the share in the last `decay_share` of the steps (wsd's decay phase) instead; None = p_passage throughout.
    # The LoRA learns the facts at the peak lr, then to cooperate with the passage while the lr decays
    p_passage_decay: Optional[float] = None
    # PRAG distillation (DyPRAG's KL 0.01 and MSE 100): need PRAG LoRAs of the training
    # documents, so a fixed pool (data.n_train_docs > 0 or a file source)
    lambda_kl: float = 0.0
    lambda_mse: float = 0.0
    # PRAG's other examples: weight of the language-model loss on the document's own text (passage or
    # rewrite, one at random per document and step) read closed-book under its generated LoRA
    lambda_text: float = 0.0
    # "bf16": the translator's steps (the frozen base's forwards, the generator, the loss) run under bf16
    # autocast, parameters and optimizer stay fp32; on a CPU with avx512_bf16 a SmolLM2 step took 3.0 s instead
    # of 5.1 (gradient cosine to fp32 0.99997). PRAG, generation and evaluation stay fp32
    precision: str = "fp32"
    log_every: int = 10

    def __post_init__(self):
        check(self.steps >= 1 and self.docs_per_step >= 1, "train.steps and train.docs_per_step must be >= 1")
        check(self.questions_per_doc >= 0, f"train.questions_per_doc={self.questions_per_doc} must be >= 0 (0 = all)")
        check(self.lr > 0 and self.warmup >= 0, "train.lr must be > 0 and train.warmup >= 0")
        check(0 <= self.p_passage <= 1, f"train.p_passage={self.p_passage} must be in [0, 1]")
        check(self.p_passage_decay is None or 0 <= self.p_passage_decay <= 1,
              f"train.p_passage_decay={self.p_passage_decay} must be in [0, 1], or null for p_passage throughout")
        check(self.schedule in SCHEDULES, f"train.schedule={self.schedule!r} must be one of {SCHEDULES}")
        check(0 < self.decay_share <= 1, f"train.decay_share={self.decay_share} must be in (0, 1]")
        check(self.lambda_kl >= 0 and self.lambda_mse >= 0 and self.lambda_text >= 0, "train.lambda_kl, lambda_mse and lambda_text must be >= 0")
        check(self.precision in PRECISIONS, f"train.precision={self.precision!r} must be one of {PRECISIONS}")
        check(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")

    def passage_share(self, step: int) -> float:
        """The share of questions that carry the passage at `step` (0-based)."""
        decaying = step >= self.steps - self.decay_share * self.steps
        return self.p_passage_decay if self.p_passage_decay is not None and decaying else self.p_passage

    @property
    def distills(self) -> bool:
        return self.lambda_kl > 0 or self.lambda_mse > 0


@dataclass
class EvalConfig:
    max_new_tokens: int = 8  # answers are short
    batch_size: int = 64
    seen_docs: int = 40  # training documents scored in the "seen" rows (PRAG and DyPRAG on documents they trained on)

    def __post_init__(self):
        check(self.max_new_tokens >= 1 and self.batch_size >= 1, "eval.max_new_tokens and eval.batch_size must be >= 1")
        check(self.seen_docs >= 2, f"eval.seen_docs={self.seen_docs} must be >= 2")


@dataclass
class DyPragConfig:
    run_name: str = "dyprag"
    runs_dir: str = "runs"
    overwrite: bool = False  # delete an existing run of another config and start again
    results_out: str = ""  # also copy results.md here (docs/results/dyprag.md for the default run)
    notes: str = ""  # printed on the results page: what was tried, what to read into it (does not change results)
    threads: int = 1  # torch threads per seed; on a shared 2-core machine 1 was several times faster than 2
    seeds: list[int] = field(default_factory=lambda: [0])  # each seed: its own data, base model, LoRAs and translators
    jobs: int = 1  # seeds run at once (separate processes)
    data: DataConfig = field(default_factory=DataConfig)
    model: BaseConfig = field(default_factory=BaseConfig)  # the base LM
    lora: LoraShape = field(default_factory=LoraShape)
    prag: PragConfig = field(default_factory=PragConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)  # the design evaluated first
    compare_designs: list[str] = field(default_factory=list)  # more designs, same settings but `design`
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
              f"run_name={self.run_name!r} must be a plain name (no '/', not '.' or '..')")
        check(self.threads >= 1 and self.jobs >= 1, "threads and jobs must be >= 1")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"seeds={self.seeds} must be distinct and at least one")
        for d in self.compare_designs:
            check(d in DESIGNS, f"compare_designs: {d!r} is not a design; allowed: {tuple(DESIGNS)}")
        check(len(set(self.designs)) == len(self.designs), f"compare_designs={self.compare_designs} repeats a design (translator.design={self.translator.design!r} is trained anyway)")
        if self.train.distills:
            check(self.data.source != "synthetic" or self.data.n_train_docs > 0,
                  "train.lambda_kl / train.lambda_mse need PRAG LoRAs of the training documents: set data.n_train_docs > 0 (a fixed pool)")

    @property
    def designs(self) -> list[str]:
        return [self.translator.design, *self.compare_designs]
