"""Synthetic knowledge set for DyPRAG: fictional people, their documents and QA.

Every entity is a generated name with five generated attributes, so no base
model can know them. A document states the facts; its augmentations (as in
PRAG) are a rewrite in other words and one QA pair per fact. Evaluation asks
about the same facts with *other* question wordings than the augmentation QA,
so PRAG cannot pass by memorising its training questions.

Three disjoint entity pools come from one seeded generator:
  pretrain  entities the base model reads during pretraining (reading
            comprehension on fresh entities plus closed-book QA on a fixed
            "known" set, so both prompt formats work)
  train     documents whose LoRAs the translator learns to predict
  test      held-out documents for the evaluation table

Documents can also come from a JSONL file (one object per line:
{"passage": str, "rewrite": str?, "qa": [{"question", "answer", "aliases"?}, ...],
"eval_qa": [...]?}), checked by `load_docs_jsonl` before any work, or from the
PRAG / DyPRAG QA files (train.dyprag.prag_format) via `docs_from_prag`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# -----------------------------------------------------------------------------
# prompt format shared by pretraining, PRAG, the translator and evaluation

EOS = "</s>"
PAD = "<pad>"
BOS = "<s>"


def qa_prompt(question: str, passage: str | None = None) -> str:
    """Closed-book when passage is None, else reading comprehension (Standard RAG)."""
    head = f"Passage: {passage}\n" if passage else ""
    return f"{head}Question: {question}\nAnswer:"


def qa_target(answer: str) -> str:
    return f" {answer}{EOS}"


# -----------------------------------------------------------------------------
# documents


@dataclass
class QA:
    question: str
    answer: str
    aliases: list[str] = field(default_factory=list)  # other accepted answers (EM/F1 take the best)

    @property
    def answers(self) -> list[str]:
        return [self.answer, *self.aliases]


@dataclass
class Doc:
    passage: str
    rewrite: str = ""
    qa: list[QA] = field(default_factory=list)  # augmentation QA (PRAG / translator training)
    eval_qa: list[QA] = field(default_factory=list)  # held-out wordings (evaluation)

    def to_json(self) -> dict:
        return {
            "passage": self.passage,
            "rewrite": self.rewrite,
            "qa": [vars(q) for q in self.qa],
            "eval_qa": [vars(q) for q in self.eval_qa],
        }


def _qa_list(obj, where: str) -> list[QA]:
    if not isinstance(obj, list):
        raise ValueError(f"{where} must be a list of {{question, answer}} objects, got {type(obj).__name__}")
    out = []
    for i, q in enumerate(obj):
        if not (isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)):
            raise ValueError(f"{where}[{i}] must be an object with string fields 'question' and 'answer', got {q!r:.80}")
        if not q["question"].strip() or not q["answer"].strip():
            raise ValueError(f"{where}[{i}] has an empty question or answer")
        aliases = q.get("aliases", [])
        if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
            raise ValueError(f"{where}[{i}]: 'aliases' must be a list of strings")
        out.append(QA(q["question"], q["answer"], aliases))
    return out


def doc_from_json(obj, where: str) -> Doc:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    passage = obj.get("passage")
    if not isinstance(passage, str) or not passage.strip():
        raise ValueError(f"{where}: 'passage' must be a non-empty string")
    rewrite = obj.get("rewrite", "")
    if not isinstance(rewrite, str):
        raise ValueError(f"{where}: 'rewrite' must be a string")
    qa = _qa_list(obj.get("qa"), f"{where}: 'qa'")
    if not qa:
        raise ValueError(f"{where}: 'qa' needs at least one question-answer pair")
    eval_qa = _qa_list(obj.get("eval_qa", []), f"{where}: 'eval_qa'")
    return Doc(passage, rewrite, qa, eval_qa)


def load_docs_jsonl(path: str | Path) -> list[Doc]:
    """Documents from a JSONL file; ValueError naming file, line and field on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"document file not found: {path}")
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        docs.append(doc_from_json(obj, f"{path}:{n}"))
    if not docs:
        raise ValueError(f"{path}: holds no documents")
    return docs


def docs_from_prag(path: str | Path, dataset: str | None, augment_model: str | None) -> list[Doc]:
    """One document per PRAG record: its passages, their rewrites and generated QA
    (the augmentations PRAG trains on), and the dataset question with its aliases
    as the evaluation question. PRAG's augmented files are required: without
    augmentations there is nothing to train a document's LoRA on."""
    from train.dyprag.prag_format import load_prag

    docs = []
    for i, r in enumerate(load_prag(path, dataset, augment_model)):
        if not r.augments or not any(a.qa for a in r.augments):
            raise ValueError(f"{path}, record {i}: has no augmentation QA; give PRAG's augmented file (data_aug/...json with 'augment')")
        docs.append(Doc(
            passage=" ".join(r.passages),
            rewrite=" ".join(a.rewrite for a in r.augments if a.rewrite),
            qa=[QA(q.question, q.answer) for a in r.augments for q in a.qa],
            eval_qa=[QA(r.question, r.answers[0], r.answers[1:])],
        ))
    return docs


def docs_jsonl(docs: list[Doc]) -> str:
    """The JSONL text `load_docs_jsonl` reads back."""
    return "".join(json.dumps(d.to_json()) + "\n" for d in docs)


# -----------------------------------------------------------------------------
# fictional entities

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "st", "br", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "k"]
OCCUPATIONS = [
    "glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer", "weaver", "botanist", "sculptor",
    "shipwright", "chemist", "lighthouse keeper", "tailor", "violinist", "potter", "surveyor", "baker",
    "bookbinder", "falconer", "jeweler", "architect",
]
_ORG_SUFFIX = ["Works", "Guild", "Company", "Foundry", "Trading House", "Press", "Mills", "Institute"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


@dataclass
class Entity:
    name: str
    city: str
    year: str
    occupation: str
    employer: str
    pet: str


def _entity(rng: random.Random) -> Entity:
    return Entity(
        name=f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}",
        city=_word(rng, rng.choice([2, 3])),
        year=str(rng.randint(1600, 1999)),
        occupation=rng.choice(OCCUPATIONS),
        employer=f"{_word(rng, 2)} {rng.choice(_ORG_SUFFIX)}",
        pet=_word(rng, 2),
    )


# Per fact: two document sentences (passage style, rewrite style) and three
# question wordings: [0] augmentation QA, [1] and [2] held-out eval wordings.
_FACTS = {
    "city": (
        ["{n} was born in the town of {v}.", "The town of {v} is where {n} was born."],
        ["Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?"],
    ),
    "year": (
        ["{n} was born in the year {v}.", "The year of {n}'s birth was {v}."],
        ["In what year was {n} born?", "When was {n} born?", "What was the birth year of {n}?"],
    ),
    "occupation": (
        ["{n} works as a {v}.", "By trade, {n} is a {v}."],
        ["What is the occupation of {n}?", "What does {n} do for a living?", "What is {n}'s job?"],
    ),
    "employer": (
        ["{n} is employed by {v}.", "The employer of {n} is {v}."],
        ["Who employs {n}?", "Which company does {n} work for?", "Who is {n}'s employer?"],
    ),
    "pet": (
        ["{n} keeps a cat named {v}.", "A cat called {v} lives with {n}."],
        ["What is the name of {n}'s cat?", "What is {n}'s cat called?", "Which cat lives with {n}?"],
    ),
}


def _text(e: Entity, style: int, rng: random.Random, n_facts: int = len(_FACTS)) -> str:
    keys = rng.sample(list(_FACTS), n_facts)  # a random order (and subset)
    return " ".join(_FACTS[k][0][style].format(n=e.name, v=getattr(e, k)) for k in keys)


def _questions(e: Entity, wording: int) -> list[QA]:
    return [QA(_FACTS[k][1][wording].format(n=e.name), getattr(e, k)) for k in _FACTS]


def entity_doc(e: Entity, rng: random.Random) -> Doc:
    eval_qa = [QA(_FACTS[k][1][rng.choice([1, 2])].format(n=e.name), getattr(e, k)) for k in _FACTS]
    return Doc(passage=_text(e, 0, rng), rewrite=_text(e, 1, rng), qa=_questions(e, 0), eval_qa=eval_qa)


@dataclass
class KnowledgeSet:
    train: list[Doc]
    test: list[Doc]
    known: list[Entity]  # closed-book facts taught in pretraining
    seed: int


def make_knowledge_set(n_train: int, n_test: int, n_known: int, seed: int) -> KnowledgeSet:
    """Disjoint fictional entities (names never repeat across pools)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh() -> Entity:
        while True:
            e = _entity(rng)
            if e.name not in seen:
                seen.add(e.name)
                return e

    known = [fresh() for _ in range(n_known)]
    train = [entity_doc(fresh(), rng) for _ in range(n_train)]
    test = [entity_doc(fresh(), rng) for _ in range(n_test)]
    return KnowledgeSet(train, test, known, seed)


# -----------------------------------------------------------------------------
# base-model pretraining corpus: (prompt, target) pairs; loss on the target only


def pretrain_sample(rng: random.Random, known: list[Entity]) -> tuple[str, str]:
    """One sample of a mixture that teaches the two prompt formats and document text.

    60% reading comprehension on a fresh entity (any wording, passage or rewrite
    style, 1 to 5 of its facts, 1 to 3 questions about them, each answered in
    turn): answering must come from the passage. It is the hardest skill for a tiny model, so it gets the
    most samples, and short passages make it easier to pick up. 20% closed-book QA on a known entity
    (any wording): answering must come from the weights. 20% plain text of a
    known entity's document, so facts can enter the weights from text, as PRAG
    later needs.
    """
    u = rng.random()
    if u < 0.6:
        e = _entity(rng)
        passage = _text(e, rng.randrange(2), rng, rng.randint(1, len(_FACTS)))
        asked = [k for k in _FACTS if getattr(e, k) in passage]
        rng.shuffle(asked)
        turns = [(_FACTS[k][1][rng.randrange(3)].format(n=e.name), getattr(e, k)) for k in asked[: rng.randint(1, 3)]]
        # follow-up questions on the same passage: more answer tokens per passage read
        follow = "".join(f"\nQuestion: {q}\nAnswer:{qa_target(a)}" for q, a in turns[1:])
        return qa_prompt(turns[0][0], passage), qa_target(turns[0][1]) + follow
    e = rng.choice(known)
    if u < 0.8:
        k = rng.choice(list(_FACTS))
        return qa_prompt(_FACTS[k][1][rng.randrange(3)].format(n=e.name)), qa_target(getattr(e, k))
    return "", _text(e, rng.randrange(2), rng) + EOS


def tokenizer_corpus(n: int, seed: int, docs: list[Doc]) -> list[str]:
    """Text to train the BPE tokenizer on: pretraining samples plus every document."""
    rng = random.Random(seed + 1)
    known = [_entity(rng) for _ in range(50)]
    out = ["".join(pretrain_sample(rng, known)) for _ in range(n)]
    for d in docs:
        out += [d.passage, d.rewrite] + [qa_prompt(q.question) + qa_target(q.answer) for q in d.qa + d.eval_qa]
    return out
