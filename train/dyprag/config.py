"""Typed config of the DyPRAG pipeline (loaded with train.config.load_config).

configs/dyprag/base.yaml holds the paper's values; default.yaml and smoke.yaml
are small deltas on it. Every section validates itself, so a bad value is a
ConfigError naming the key before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config import check

DESIGNS = ("shared", "per_module")
POOLINGS = ("last", "mean")
SOURCES = ("synthetic", "jsonl", "prag")


@dataclass
class DataConfig:
    # "synthetic": generated fictional people | "jsonl": the two files below in
    # dyprag_data's JSONL format | "prag": the two files below are PRAG's augmented
    # QA files (train.dyprag.prag_format; e.g. data_aug/popqa/<model>/total.json)
    source: str = "synthetic"
    train_file: str = ""
    test_file: str = ""
    prag_dataset: str = ""  # source=prag: dataset name when the path does not tell (load_prag's dataset=)
    augment_model: str = ""  # source=prag: which '<model>_qa' fields to read if there are several
    n_train_docs: int = 200  # synthetic: documents the translator learns from
    n_test_docs: int = 40  # synthetic: held-out documents (disjoint entities)
    n_known: int = 100  # synthetic: entities the base model learns closed-book in pretraining
    seed: int = 0

    def __post_init__(self):
        check(self.source in SOURCES, f"data.source={self.source!r} must be one of {SOURCES}")
        if self.source != "synthetic":
            check(bool(self.train_file and self.test_file), f"data.train_file and data.test_file must name files when data.source={self.source}")
        check(self.n_train_docs >= 2, f"data.n_train_docs={self.n_train_docs} must be >= 2")
        check(self.n_test_docs >= 2, f"data.n_test_docs={self.n_test_docs} must be >= 2 (the shuffled control needs another doc)")
        check(self.n_known >= 1, f"data.n_known={self.n_known} must be >= 1")


@dataclass
class BaseConfig:
    path: str = ""  # "" = build and pretrain the tiny Llama below; else a local transformers causal-LM dir
    vocab_size: int = 512  # BPE tokenizer trained on the synthetic corpus
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
class PragConfig:
    # DyPRAG's stage-1 values: LoRA rank 2, alpha 32 on the FFN projections, lr 3e-4, 1 epoch
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    rank: int = 2
    alpha: float = 32.0
    lr: float = 3e-4
    epochs: int = 1
    init_seed: int = 0  # every document's LoRA starts from the same initialization
    batch_docs: int = 16  # documents trained together (per-sample factored LoRAs); 1 = one peft model at a time
    time_peft_docs: int = 2  # test documents also trained one at a time with peft, for the cost table

    def __post_init__(self):
        check(len(self.target_modules) > 0, "prag.target_modules must name at least one module")
        check(self.rank >= 1, f"prag.rank={self.rank} must be >= 1")
        check(self.alpha > 0 and self.lr > 0, "prag.alpha and prag.lr must be > 0")
        check(self.epochs >= 1, f"prag.epochs={self.epochs} must be >= 1")
        check(self.batch_docs >= 1 and self.time_peft_docs >= 0, "prag.batch_docs must be >= 1 and prag.time_peft_docs >= 0")


@dataclass
class TranslatorTrainConfig:
    designs: list[str] = field(default_factory=lambda: list(DESIGNS))  # each is trained and evaluated
    hidden: int = 64  # translator width
    pooling: str = "last"  # document embedding: last token or mean of the base model's last hidden states
    epochs: int = 20
    lr: float = 1e-3
    batch_docs: int = 16
    # DyPRAG's loss weights: LM 1, KL 0.01, MSE 100
    lambda_kl: float = 0.01
    lambda_mse: float = 100.0
    seed: int = 0

    def __post_init__(self):
        check(len(self.designs) > 0, "translator.designs must name at least one design")
        for d in self.designs:
            check(d in DESIGNS, f"translator.designs: {d!r} is not a design; allowed: {DESIGNS}")
        check(len(set(self.designs)) == len(self.designs), f"translator.designs={self.designs} repeats a design")
        check(self.pooling in POOLINGS, f"translator.pooling={self.pooling!r} must be one of {POOLINGS}")
        check(self.hidden >= 1 and self.epochs >= 1 and self.batch_docs >= 1, "translator.hidden, epochs, batch_docs must be >= 1")
        check(self.lr > 0, f"translator.lr={self.lr} must be > 0")
        check(self.lambda_kl >= 0 and self.lambda_mse >= 0, "translator.lambda_kl and lambda_mse must be >= 0")


@dataclass
class EvalConfig:
    max_new_tokens: int = 8  # answers are short
    batch_size: int = 64

    def __post_init__(self):
        check(self.max_new_tokens >= 1 and self.batch_size >= 1, "eval.max_new_tokens and eval.batch_size must be >= 1")


@dataclass
class DyPragConfig:
    run_name: str = "dyprag"
    runs_dir: str = "runs"
    overwrite: bool = False  # delete an existing run of another config and start again
    results_out: str = ""  # also copy results.md here (docs/results/dyprag.md for the default run)
    threads: int = 1  # torch threads; on a shared 2-core machine 1 was several times faster than 2
    data: DataConfig = field(default_factory=DataConfig)
    model: BaseConfig = field(default_factory=BaseConfig)  # the base LM
    prag: PragConfig = field(default_factory=PragConfig)
    translator: TranslatorTrainConfig = field(default_factory=TranslatorTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check(bool(self.run_name) and "/" not in self.run_name, f"run_name={self.run_name!r} must be a non-empty name without '/'")
        check(self.threads >= 1, f"threads={self.threads} must be >= 1")
