"""Synthetic knowledge set for DyPRAG: fictional people, their documents and QA.

Every entity is a generated name with five generated attributes, so no base
model can know them. A document states the facts; its augmentations (as in
PRAG) are a rewrite in other words and one QA pair per fact. Evaluation asks
about the same facts with *other* question wordings than the augmentation QA,
so PRAG cannot pass by memorising its training questions.

Disjoint entity pools come from seeded generators:
  pretrain  entities the base model reads during pretraining (reading
            comprehension on fresh entities plus closed-book QA on a fixed
            "known" set, so both prompt formats work)
  train     an endless stream of fresh documents the translator learns from
            (a hypernetwork needs thousands; `KnowledgeSet.training_docs`)
  test      held-out entities in the training templates and value ranges
  ood_*     held-out entities with one kind of novelty each (OOD_AXES): attribute
            values (occupations, employer kinds, birth years), question wordings,
            or sentence style never seen in pretraining or training, or all three

Documents can also come from a JSONL file (one object per line:
{"passage": str, "rewrite": str?, "qa": [{"question", "answer", "aliases"?, "kind"?}, ...],
"eval_qa": [...]?}), checked by `load_docs_jsonl` before any work, or from the
PRAG / DyPRAG QA files (train.dyprag.prag_format) via `docs_from_prag`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
    kind: str = ""  # fact type (synthetic: one of FACT_KINDS), for EM per fact type

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
        kind = q.get("kind", "")
        if not isinstance(kind, str):
            raise ValueError(f"{where}[{i}]: 'kind' (the fact type, for EM per type) must be a string")
        out.append(QA(q["question"], q["answer"], aliases, kind))
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
    from moe_playground.train.dyprag.prag_format import load_prag

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


@dataclass(frozen=True)
class ValuePool:
    """Where attribute values come from. Names, towns and cats are fresh generated words either way."""

    occupations: tuple[str, ...]
    org_suffixes: tuple[str, ...]
    years: tuple[int, int]


# seen in pretraining and training; the OOD pool's values never are
IN_DISTRIBUTION = ValuePool(
    occupations=(
        "glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer", "weaver", "botanist", "sculptor",
        "shipwright", "chemist", "lighthouse keeper", "tailor", "violinist", "potter", "surveyor", "baker",
        "bookbinder", "falconer", "jeweler", "architect",
    ),
    org_suffixes=("Works", "Guild", "Company", "Foundry", "Trading House", "Press", "Mills", "Institute"),
    years=(1600, 1999),
)
OOD = ValuePool(
    occupations=("ferryman", "locksmith", "cooper", "harpist", "tanner", "mason", "glazier", "printer", "saddler", "miller"),
    org_suffixes=("Brewery", "Shipyard", "Bank", "Observatory"),
    years=(1400, 1599),
)


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


def _entity(rng: random.Random, pool: ValuePool = IN_DISTRIBUTION) -> Entity:
    return Entity(
        name=f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}",
        city=_word(rng, rng.choice([2, 3])),
        year=str(rng.randint(*pool.years)),
        occupation=rng.choice(pool.occupations),
        employer=f"{_word(rng, 2)} {rng.choice(pool.org_suffixes)}",
        pet=_word(rng, 2),
    )


# Per fact: document sentences in three styles and seven question wordings.
# Styles 0 and 1 (passage, rewrite) and wordings 0-2 are the training distribution:
# wording 0 is the augmentation QA (PRAG, translator training), 1 and 2 are held-out
# evaluation wordings that pretraining also uses. Style 2 and wordings 3-4 appear
# nowhere in training: they make the out-of-distribution split. Wordings 5-6 are
# more augmentation wordings, as an LLM augmenter would vary its questions
# (data.augment_wordings: pretraining and augmentation then use them too; evaluation never asks them).
_FACTS = {
    "city": (
        ["{n} was born in the town of {v}.", "The town of {v} is where {n} was born.", "{n} first saw daylight in {v}."],
        ["Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?",
         "Which town does {n} come from originally?", "Name the town where {n} was born.",
         "{n} was born where?", "Tell me the town of {n}'s birth."],
    ),
    "year": (
        ["{n} was born in the year {v}.", "The year of {n}'s birth was {v}.", "{n} came into the world in {v}."],
        ["In what year was {n} born?", "When was {n} born?", "What was the birth year of {n}?",
         "Which year saw the birth of {n}?", "{n} was born in which year?",
         "What year was {n} born in?", "Tell me the year {n} was born."],
    ),
    "occupation": (
        ["{n} works as a {v}.", "By trade, {n} is a {v}.", "{n} earns a living as a {v}."],
        ["What is the occupation of {n}?", "What does {n} do for a living?", "What is {n}'s job?",
         "What trade does {n} practise?", "{n} works in which profession?",
         "What kind of work does {n} do?", "Tell me {n}'s occupation."],
    ),
    "employer": (
        ["{n} is employed by {v}.", "The employer of {n} is {v}.", "{n} draws a salary from {v}."],
        ["Who employs {n}?", "Which company does {n} work for?", "Who is {n}'s employer?",
         "For which organisation does {n} work?", "{n} is on the payroll of which firm?",
         "What organisation employs {n}?", "Tell me who employs {n}."],
    ),
    "pet": (
        ["{n} keeps a cat named {v}.", "A cat called {v} lives with {n}.", "{n} owns a cat; its name is {v}."],
        ["What is the name of {n}'s cat?", "What is {n}'s cat called?", "Which cat lives with {n}?",
         "What name did {n} give the cat?", "{n}'s cat goes by what name?",
         "Tell me the name of {n}'s cat.", "What cat does {n} keep?"],
    ),
}
FACT_KINDS = tuple(_FACTS)
TRAIN_STYLES, OOD_STYLE = (0, 1), 2
AUGMENT_WORDINGS, EVAL_WORDINGS, OOD_WORDINGS = (0, 5, 6), (1, 2), (3, 4)


def _text(e: Entity, style: int, rng: random.Random, n_facts: int = len(_FACTS)) -> str:
    keys = rng.sample(list(_FACTS), n_facts)  # a random order (and subset)
    return " ".join(_FACTS[k][0][style].format(n=e.name, v=getattr(e, k)) for k in keys)


def _qa(e: Entity, k: str, wording: int) -> QA:
    return QA(_FACTS[k][1][wording].format(n=e.name), getattr(e, k), kind=k)


def _augment_qa(e: Entity, augment_wordings: int) -> list[QA]:
    """The augmentation QA: one question per fact, in a random one of the first `augment_wordings`
    of AUGMENT_WORDINGS. Drawn from the entity's own generator, so the document streams (entities,
    passages, evaluation questions) are the same whatever the number."""
    rng = random.Random(f"{e.name}-augment")
    return [_qa(e, k, rng.choice(AUGMENT_WORDINGS[:augment_wordings])) for k in _FACTS]


def entity_doc(e: Entity, rng: random.Random, augment_wordings: int = 1) -> Doc:
    """In-distribution document: passage and rewrite in the training styles, held-out eval wordings."""
    eval_qa = [_qa(e, k, rng.choice(EVAL_WORDINGS)) for k in _FACTS]
    return Doc(passage=_text(e, TRAIN_STYLES[0], rng), rewrite=_text(e, TRAIN_STYLES[1], rng),
               qa=_augment_qa(e, augment_wordings), eval_qa=eval_qa)


OOD_AXES = ("values", "wordings", "style", "all")  # what is new in each out-of-distribution split


def ood_doc(e: Entity, rng: random.Random, axis: str, augment_wordings: int = 1) -> Doc:
    """Out-of-distribution document. axis "values": the entity's occupation, employer kind and
    birth year come from the OOD pool (the caller draws it so); "wordings": questions in wordings
    never used in training; "style": the passage in a sentence style never used in training;
    "all": the three at once. Its augmentation QA (for PRAG) uses the split's wordings; evaluation
    asks a different wording where there is one."""
    new_wording, new_style = axis in ("wordings", "all"), axis in ("style", "all")
    pair = OOD_WORDINGS if new_wording else EVAL_WORDINGS
    w = [rng.choice(pair) for _ in _FACTS]
    return Doc(passage=_text(e, OOD_STYLE if new_style else TRAIN_STYLES[0], rng), rewrite=_text(e, TRAIN_STYLES[1], rng),
               qa=[_qa(e, k, wi) for k, wi in zip(_FACTS, w)] if new_wording else _augment_qa(e, augment_wordings),
               eval_qa=[_qa(e, k, sum(pair) - wi) for k, wi in zip(_FACTS, w)])


@dataclass
class KnowledgeSet:
    test: list[Doc]  # held-out entities, training templates and values
    ood: dict[str, list[Doc]]  # axis -> held-out entities with that novelty (see ood_doc)
    known: list[Entity]  # closed-book facts taught in pretraining
    seed: int
    names: set[str]  # every entity name above
    augment_wordings: int = 1  # augmentation QA wordings drawn from (see entity_doc)

    def training_docs(self) -> Iterator[Doc]:
        """An endless stream of fresh training documents (seeded); no entity of test, ood or known recurs."""
        taken = set(self.names)
        rng = random.Random(f"{self.seed}-train")
        while True:
            e = _entity(rng)
            if e.name not in taken:
                taken.add(e.name)
                yield entity_doc(e, rng, self.augment_wordings)


def make_knowledge_set(n_test: int, n_ood: int, n_known: int, seed: int, ood_axes: tuple[str, ...] | list[str] = OOD_AXES,
                       augment_wordings: int = 1) -> KnowledgeSet:
    """Disjoint fictional entities (names never repeat across pools)."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh(pool: ValuePool = IN_DISTRIBUTION) -> Entity:
        while True:
            e = _entity(rng, pool)
            if e.name not in seen:
                seen.add(e.name)
                return e

    known = [fresh() for _ in range(n_known)]
    test = [entity_doc(fresh(), rng, augment_wordings) for _ in range(n_test)]
    ood = {a: [ood_doc(fresh(OOD if a in ("values", "all") else IN_DISTRIBUTION), rng, a, augment_wordings) for _ in range(n_ood)]
           for a in ood_axes} if n_ood else {}
    return KnowledgeSet(test, ood, known, seed, seen, augment_wordings)


# -----------------------------------------------------------------------------
# base-model pretraining corpus: (prompt, target) pairs; loss on the target only


def pretrain_sample(rng: random.Random, known: list[Entity], augment_wordings: int = 1) -> tuple[str, str]:
    """One sample of a mixture that teaches the two prompt formats and document text.

    60% reading comprehension on a fresh entity (any wording, passage or rewrite
    style, 1 to 5 of its facts, 1 to 3 questions about them, each answered in
    turn): answering must come from the passage. It is the hardest skill for a tiny model, so it gets the
    most samples, and short passages make it easier to pick up. 20% closed-book QA on a known entity
    (any wording): answering must come from the weights. 20% plain text of a
    known entity's document, so facts can enter the weights from text, as PRAG
    later needs. "Any wording": the evaluation wordings and the first
    `augment_wordings` augmentation ones, every question wording of the training distribution.
    """
    wordings = AUGMENT_WORDINGS[:1] + EVAL_WORDINGS + AUGMENT_WORDINGS[1:augment_wordings]  # 1: wordings 0-2 as always
    u = rng.random()
    if u < 0.6:
        e = _entity(rng)
        passage = _text(e, rng.randrange(2), rng, rng.randint(1, len(_FACTS)))
        asked = [k for k in _FACTS if getattr(e, k) in passage]
        rng.shuffle(asked)
        turns = [(_FACTS[k][1][wordings[rng.randrange(len(wordings))]].format(n=e.name), getattr(e, k)) for k in asked[: rng.randint(1, 3)]]
        # follow-up questions on the same passage: more answer tokens per passage read
        follow = "".join(f"\nQuestion: {q}\nAnswer:{qa_target(a)}" for q, a in turns[1:])
        return qa_prompt(turns[0][0], passage), qa_target(turns[0][1]) + follow
    e = rng.choice(known)
    if u < 0.8:
        k = rng.choice(list(_FACTS))
        return qa_prompt(_FACTS[k][1][wordings[rng.randrange(len(wordings))]].format(n=e.name)), qa_target(getattr(e, k))
    return "", _text(e, rng.randrange(2), rng) + EOS


def tokenizer_corpus(n: int, seed: int, train_docs: list[Doc], augment_wordings: int = 1) -> list[str]:
    """Text to fit the BPE tokenizer on: pretraining samples and training documents only
    (never the test or OOD documents, whose text would otherwise leak into the vocabulary)."""
    rng = random.Random(seed + 1)
    known = [_entity(rng) for _ in range(50)]
    out = ["".join(pretrain_sample(rng, known, augment_wordings)) for _ in range(n)]
    for d in train_docs:
        out += [d.passage, d.rewrite] + [qa_prompt(q.question) + qa_target(q.answer) for q in d.qa + d.eval_qa]
    return out
