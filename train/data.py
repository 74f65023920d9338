"""Training data: a built-in synthetic multi-domain corpus or the user's text files,
tokenized to one stream per split with a domain label on every token.

The synthetic corpus has six skill domains (arithmetic, ordering, copying, recall
in context, syntax, code-like structure) and one knowledge domain: a fixed table of
made-up facts (entity, attribute, value) stated again and again in training and
queried in validation, so that capacity to store facts, which an MoE's extra total
parameters buy, shows up in the loss. Samples are generated from a seed; a skill
sample goes to validation when a hash of its text says so, so the two splits never
share one. A fact is stated in training in every wording but one and queried in
validation in that one: facts shared, wordings disjoint.

The validation split of the synthetic corpus is a fixed set of at least
`data.val_tokens` tokens (every domain in equal numbers of samples, every fact
once), drawn from its own generator: it does not depend on how many training
samples there are, nor on anything but `data.seed`.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moe_playground.models.validate import check

# ---- config ---------------------------------------------------------------------------


TOKENIZERS = ("byte", "bpe", "pretrained")


@dataclass
class DataConfig:
    path: str | None = None        # a .txt file or a folder of them (one domain per file); None = synthetic corpus
    n_samples: int = 40000         # synthetic samples drawn (before the split)
    val_fraction: float = 0.05
    seed: int = 0
    # "byte" (256 symbols, nothing to train), "bpe" (trained here with `tokenizers`) or "pretrained"
    # (the tokenizer of the transformers folder the run starts from, init_from)
    tokenizer: str = "byte"
    bpe_vocab_size: int = 512
    val_tokens: int = 200_000      # synthetic corpus: tokens in the fixed validation set (at least)
    knowledge_entities: int = 400  # synthetic corpus: entities in the fact table, len(ATTRIBUTES) facts each; 0 = no knowledge domain

    def __post_init__(self) -> None:
        check(self.tokenizer in TOKENIZERS, f"data.tokenizer={self.tokenizer!r} must be one of {TOKENIZERS}")
        check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        check(self.n_samples >= 100, f"data.n_samples={self.n_samples} must be >= 100")
        check(self.bpe_vocab_size >= 260, f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 260")
        check(self.val_tokens >= 1, f"data.val_tokens={self.val_tokens} must be >= 1")
        check(0 <= self.knowledge_entities <= MAX_ENTITIES,
              f"data.knowledge_entities={self.knowledge_entities} must be in [0, {MAX_ENTITIES}]")
        if self.path is not None:
            p = Path(self.path)
            check(p.exists(), f"data.path={self.path}: no such file or folder")
            check(bool(text_files(p)), f"data.path={self.path}: no .txt files there")


# ---- the synthetic domains --------------------------------------------------------------
# Each generator returns one sample line; together they need arithmetic, ordering,
# copying, associative recall, syntax and code-like structure.


def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(0, 999), r.randint(0, 999)
    op = r.choice("+-")
    return f"{a}{op}{b}={a + b if op == '+' else a - b}"


def _sorting(r: random.Random) -> str:
    xs = [r.randint(0, 99) for _ in range(r.randint(3, 8))]
    return f"sort {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}"


def _reverse(r: random.Random) -> str:
    w = "".join(r.choices(string.ascii_lowercase, k=r.randint(3, 12)))
    return f"rev {w} -> {w[::-1]}"


def _recall(r: random.Random) -> str:
    keys = r.sample(string.ascii_uppercase, r.randint(3, 6))
    pairs = {k: r.randint(0, 99) for k in keys}
    q = r.choice(keys)
    return f"{' '.join(f'{k}:{v}' for k, v in pairs.items())} ? {q} -> {pairs[q]}"


_NOUNS = "cat dog bird fox child teacher farmer robot river king".split()
_VERBS = "sees likes follows helps finds watches calls feeds".split()
_ADJS = "big small red quiet happy old young clever".split()


def _grammar(r: random.Random) -> str:
    def phrase() -> str:
        adj = f"{r.choice(_ADJS)} " if r.random() < 0.5 else ""
        return f"{r.choice(['the', 'a'])} {adj}{r.choice(_NOUNS)}"

    s = f"{phrase()} {r.choice(_VERBS)} {phrase()}"
    if r.random() < 0.3:
        s += f" and {phrase()}"
    return s.capitalize() + "."


def _code(r: random.Random) -> str:
    f, x = r.choice("fghk"), r.choice("xyzn")
    c = r.randint(1, 9)
    body = r.choice([f"return {x} * {c}", f"return {x} + {c}", f"if {x} > {c}: return {x}", f"for i in range({c}): {x} += i"])
    return f"def {f}({x}): {body}"


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic, "sorting": _sorting, "reverse": _reverse,
    "recall": _recall, "grammar": _grammar, "code": _code,
}


def synthetic_samples(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (text, domain index) samples of the skill domains, in turn so every domain gets n/6."""
    r = random.Random(seed)
    gens = list(DOMAINS.values())
    return [(gens[i % len(gens)](r), i % len(gens)) for i in range(n)]


MAX_DRAWS = 100_000  # draws per validation sample before a domain counts as unable to give one


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def in_validation(text: str, fraction: float) -> bool:
    """A pure function of the text: equal samples always land in the same split."""
    return _hash01(text) < fraction


def validation_skill_samples(n_per_domain: int, seed: int, fraction: float) -> list[tuple[str, int]]:
    """`n_per_domain` samples of each skill domain that `in_validation` keeps (so never a training
    sample), domains in turn, from a generator of their own: the same for any training corpus size."""
    r = random.Random(f"validation-{seed}")
    gens, out = list(DOMAINS.values()), []
    for i in range(n_per_domain * len(gens)):
        d = i % len(gens)
        gen = gens[d]
        for _ in range(MAX_DRAWS):
            text = gen(r)
            if in_validation(text, fraction):
                out.append((text, d))
                break
        else:
            raise ValueError(f"data: the {list(DOMAINS)[d]} domain gave no validation sample in {MAX_DRAWS} draws; "
                             f"raise data.val_fraction={fraction}")
    return out


# ---- the knowledge domain ----------------------------------------------------------------
# A fixed table of facts about made-up entities, each fact stated in several wordings. The
# value always comes last, so its loss measures recall of the fact, not of the wording.

KNOWLEDGE = "knowledge"
ATTRIBUTES: dict[str, list[str]] = {
    "color": "red blue green amber violet grey white black teal ochre".split(),
    "city": "Arvel Brisk Corra Dunmor Eskar Folby Garran Hollow Istra Jorvik Kessel Lumen".split(),
    "food": "plums rice bread figs cheese beans soup honey nuts fish".split(),
    "job": "baker smith tailor miner sailor scribe potter weaver farmer mason".split(),
    "pet": "cat dog owl goat hare crow mule toad".split(),
}
TEMPLATES = ("{e} {a}: {v}", "the {a} of {e} is {v}", "{e}'s {a} is {v}", "ask {e} about {a} -> {v}")
_ONSETS, _VOWELS, _CODAS = "b d f g k l m n p r s t v z".split(), "a e i o u".split(), ["", "n", "r", "s", "k"]
MAX_ENTITIES = 20_000  # well under the distinct names the syllables allow


def fact_table(n_entities: int, seed: int) -> list[tuple[str, str, str]]:
    """(entity, attribute, value) for every entity and attribute: a pure function of the arguments."""
    r = random.Random(f"knowledge-{seed}")
    names: list[str] = []
    seen = set()
    while len(names) < n_entities:
        name = "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) for _ in range(r.randint(2, 3))).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return [(e, a, r.choice(vs)) for e in names for a, vs in ATTRIBUTES.items()]


def held_out_wording(entity: str, attribute: str) -> int:
    """The template this fact is queried with in validation, and never stated with in training."""
    return int(_hash01(f"{entity}|{attribute}") * len(TEMPLATES))


def knowledge_samples(n_entities: int, seed: int, split: str) -> list[str]:
    """'train': every fact in every wording but its held-out one, shuffled; 'val': every fact once,
    in its held-out wording."""
    out = []
    for e, a, v in fact_table(n_entities, seed):
        held = held_out_wording(e, a)
        wordings = [held] if split == "val" else [t for t in range(len(TEMPLATES)) if t != held]
        out += [TEMPLATES[t].format(e=e, a=a, v=v) for t in wordings]
    if split == "train":
        random.Random(f"knowledge-order-{seed}").shuffle(out)
    return out


# ---- user's text files ------------------------------------------------------------------


def text_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.txt"))


def file_samples(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Paragraphs (blank-line separated; lines if a file has few) of each file, labelled by file."""
    files = text_files(path)
    samples = []
    for d, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"data.path: {f} is not UTF-8 text ({e})") from None
        parts = text.split("\n\n")
        if len(parts) < 20:  # not written in paragraphs: take lines as samples
            parts = text.splitlines()
        samples += [(p.strip(), d) for p in parts if p.strip()]
    return samples, [f.stem for f in files]


# ---- tokenizers -------------------------------------------------------------------------


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE trained on the training split with the `tokenizers` library."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class PretrainedTokenizer:
    """A transformers tokenizer saved in a model folder (data.tokenizer=pretrained); no special tokens added."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


Tokenizer = ByteTokenizer | BPETokenizer | PretrainedTokenizer


# ---- token streams and batches ----------------------------------------------------------


@dataclass
class TokenStream:
    tokens: torch.Tensor      # (N,) int64, samples joined by newlines
    domains: torch.Tensor     # (N,) int64, the domain of every token


@dataclass
class Corpus:
    train: TokenStream
    val: TokenStream
    domain_names: list[str]
    tokenizer: Tokenizer


def _stream(samples: list[tuple[str, int]], tok) -> TokenStream:
    ids, doms = [], []
    for text, d in samples:
        t = tok.encode(text + "\n")
        ids += t
        doms += [d] * len(t)
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(doms, dtype=torch.long))


def build_tokenizer(cfg: DataConfig, tokenizer_file: Path | None, train_texts: list[str] | None = None) -> Tokenizer:
    """The tokenizer `cfg` names: loaded from `tokenizer_file` (BPE's tokenizer.json, or a pretrained model's
    folder) when given, else made (bytes; BPE trained on `train_texts`)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "pretrained":
        return PretrainedTokenizer(tokenizer_file)
    if tokenizer_file is not None:
        return BPETokenizer.load(tokenizer_file)
    return BPETokenizer.train(train_texts, cfg.bpe_vocab_size)


def synthetic_validation(cfg: DataConfig, tok) -> TokenStream:
    """The fixed validation set: every fact once (held-out wording), then the skill domains in
    equal numbers of samples until there are at least `cfg.val_tokens` tokens."""
    k = len(DOMAINS)  # the knowledge domain's index
    facts = [(t, k) for t in knowledge_samples(cfg.knowledge_entities, cfg.seed, "val")]
    have = sum(len(tok.encode(t + "\n")) for t, _ in facts)
    probe = validation_skill_samples(8, cfg.seed, cfg.val_fraction)  # tokens per skill sample, roughly
    per_sample = sum(len(tok.encode(t + "\n")) for t, _ in probe) / len(probe)
    n = max(1, math.ceil(max(0, cfg.val_tokens - have) / per_sample / len(DOMAINS)))
    while True:
        skills = validation_skill_samples(n, cfg.seed, cfg.val_fraction)
        stream = _stream(facts + skills, tok)
        if len(stream.tokens) >= cfg.val_tokens:
            return stream
        n = math.ceil(n * 1.1) + 1


def build_corpus(cfg: DataConfig, tokenizer_file: Path | None = None) -> Corpus:
    """Both splits, tokenized. With BPE, `tokenizer_file` is loaded if given (a resumed run
    keeps its tokenizer), else a tokenizer is trained on the training split; a pretrained
    tokenizer is loaded from the folder `tokenizer_file`."""
    if cfg.path is None:
        samples, names = synthetic_samples(cfg.n_samples, cfg.seed), list(DOMAINS)
        train = [s for s in samples if not in_validation(s[0], cfg.val_fraction)]
        if cfg.knowledge_entities:
            names.append(KNOWLEDGE)
            train += [(t, len(DOMAINS)) for t in knowledge_samples(cfg.knowledge_entities, cfg.seed, "train")]
            random.Random(f"train-order-{cfg.seed}").shuffle(train)
        val = None
    else:
        samples, names = file_samples(Path(cfg.path))
        train = [s for s in samples if not in_validation(s[0], cfg.val_fraction)]
        val = [s for s in samples if in_validation(s[0], cfg.val_fraction)]
        if not train or not val:
            raise ValueError(f"data: {len(samples)} samples give an empty split; add text or change data.val_fraction")
    if not train:
        raise ValueError(f"data: {len(samples)} samples give an empty training split; change data.val_fraction")
    tok = build_tokenizer(cfg, tokenizer_file, [t for t, _ in train])
    return Corpus(_stream(train, tok), synthetic_validation(cfg, tok) if val is None else _stream(val, tok), names, tok)


def sample_windows(stream: TokenStream, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, next-token targets and target domains for windows starting at `starts` (any shape)."""
    idx = starts.unsqueeze(-1) + torch.arange(seq_len + 1)   # (..., seq_len + 1)
    tokens = stream.tokens[idx]
    return tokens[..., :-1], tokens[..., 1:], stream.domains[idx[..., 1:]]
