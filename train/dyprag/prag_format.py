"""Reader for the QA files of the PRAG / DyPRAG setup, for users who bring those files.

PRAG (Su et al. 2025) and DyPRAG evaluate on 2WikiMultihopQA, HotpotQA, PopQA
and ComplexWebQuestions. Two kinds of file occur there, and both are read into
one list of `PragRecord` (question, answers, passages, augmentations):

  raw dataset files, in a folder, under the names those projects expect:
    2wikimultihopqa       dev.json (+ id_aliases.json, one JSON object per line:
                          {"Q_id", "aliases"}; answers with an answer_id get its aliases)
    hotpotqa              hotpot_dev_distractor_v1.json
    popqa                 popQA.tsv (columns question, obj, o_aliases as a Python list literal)
    complexwebquestions   ComplexWebQuestions_dev.json (answers: [{"answer", "aliases"}])
  For 2Wiki and HotpotQA the passages are the gold paragraphs named by
  supporting_facts (each once, in order); PopQA and CWQ come without passages
  (PRAG retrieves them with BM25 from Wikipedia).

  augmented files, PRAG's self-augmentation output (data_aug/<dataset>/<model>/<type>.json):
    a JSON list of {"question", "answer" (str or list), "passages": [...],
    "augment": [{"passage", "<model>_rewrite", "<model>_qa": [{"question", "answer", "full_answer"}]}]}
    or the same without "augment" (PRAG's default format for a new dataset).

Every problem (missing file, bad JSON/TSV, a record without a needed field)
raises PragFormatError naming the file, the record and what was expected.
"""
from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAW_FILES = {
    "2wikimultihopqa": "dev.json",
    "hotpotqa": "hotpot_dev_distractor_v1.json",
    "popqa": "popQA.tsv",
    "complexwebquestions": "ComplexWebQuestions_dev.json",
}
ALIASES_2WIKI = "id_aliases.json"


class PragFormatError(ValueError):
    """A PRAG / DyPRAG data file is missing or not in the expected format."""


@dataclass
class QAPair:
    question: str
    answer: str
    full_answer: str | None = None


@dataclass
class PassageAugment:
    """PRAG's augmentation of one passage: its rewrite and generated QA pairs."""

    passage: str
    rewrite: str | None
    qa: list[QAPair]


@dataclass
class PragRecord:
    qid: str
    question: str
    answers: list[str]  # the gold answer first, then its aliases; no duplicates
    passages: list[str] = field(default_factory=list)  # gold or retrieved passages; empty if none
    augments: list[PassageAugment] = field(default_factory=list)  # empty for raw files
    type: str | None = None  # question type (2Wiki, HotpotQA)


# -----------------------------------------------------------------------------
# small checked readers


def _where(path: Path, i: int | None) -> str:
    return f"{path}" if i is None else f"{path}, record {i}"


def _get(rec: Any, key: str, kind: type | tuple[type, ...], path: Path, i: int) -> Any:
    if not isinstance(rec, dict):
        raise PragFormatError(f"{_where(path, i)}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise PragFormatError(f"{_where(path, i)}: missing field '{key}' (has: {', '.join(rec) or 'nothing'})")
    if not isinstance(rec[key], kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise PragFormatError(f"{_where(path, i)}: field '{key}' must be {names}, got {type(rec[key]).__name__}")
    return rec[key]


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise PragFormatError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PragFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise PragFormatError(f"{path}: expected a non-empty JSON list of records, got {type(data).__name__}")
    return data


def _answers(*groups: Any) -> list[str]:
    """Answer strings in order, each once; None and blanks dropped."""
    out: list[str] = []
    for g in groups:
        for a in [g] if isinstance(g, str) else g:
            if isinstance(a, str) and a.strip() and a not in out:
                out.append(a)
    return out


def _strings(value: Any, what: str, path: Path, i: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PragFormatError(f"{_where(path, i)}: {what} must be a string or a list of strings, got {value!r:.80}")


# -----------------------------------------------------------------------------
# raw datasets


def _gold_passages(rec: dict, path: Path, i: int, joiner: str) -> list[str]:
    """Paragraphs (sentences joined) of the titles in supporting_facts, each once, in order."""
    context = _get(rec, "context", list, path, i)
    try:
        paragraphs = {title: joiner.join(sents) for title, sents in context}
    except (TypeError, ValueError):
        raise PragFormatError(f"{_where(path, i)}: 'context' must be a list of [title, [sentences]]") from None
    passages: list[str] = []
    for fact in _get(rec, "supporting_facts", list, path, i):
        title = fact[0] if isinstance(fact, list) and fact else None
        if title not in paragraphs:
            raise PragFormatError(f"{_where(path, i)}: supporting fact {fact!r} names no paragraph of 'context'")
        if paragraphs[title] not in passages:
            passages.append(paragraphs[title])
    return passages


def _load_2wiki(folder: Path) -> list[PragRecord]:
    path = folder / RAW_FILES["2wikimultihopqa"]
    data = _read_json_list(path)
    aliases: dict[str, list[str]] = {}
    alias_path = folder / ALIASES_2WIKI
    if alias_path.is_file():  # optional: without it, answers are the answer string only
        for n, line in enumerate(alias_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    aliases[entry["Q_id"]] = entry["aliases"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PragFormatError(f"{alias_path}, line {n}: expected a JSON object with 'Q_id' and 'aliases'") from None
    records = []
    for i, rec in enumerate(data):
        answer = _get(rec, "answer", str, path, i)
        records.append(PragRecord(
            qid=str(_get(rec, "_id", (str, int), path, i)),
            question=_get(rec, "question", str, path, i),
            answers=_answers(answer, aliases.get(rec.get("answer_id") or "", [])),
            passages=_gold_passages(rec, path, i, " "),
            type=rec.get("type"),
        ))
    return records


def _load_hotpotqa(folder: Path) -> list[PragRecord]:
    path = folder / RAW_FILES["hotpotqa"]
    return [
        PragRecord(
            qid=str(_get(rec, "_id", (str, int), path, i)),
            question=_get(rec, "question", str, path, i),
            answers=_answers(_get(rec, "answer", str, path, i)),
            passages=_gold_passages(rec, path, i, ""),  # HotpotQA sentences carry their own spaces
            type=rec.get("type"),
        )
        for i, rec in enumerate(_read_json_list(path))
    ]


def _load_popqa(folder: Path) -> list[PragRecord]:
    path = folder / RAW_FILES["popqa"]
    if not path.is_file():
        raise PragFormatError(f"file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = {"question", "obj", "o_aliases"} - set(rows[0] if rows else {})
    if not rows or missing:
        problem = f"missing: {sorted(missing)}" if rows else "no data rows"
        raise PragFormatError(f"{path}: expected a tab-separated file with a header and columns question, obj, o_aliases; {problem}")
    records = []
    for i, row in enumerate(rows):
        try:
            aliases = ast.literal_eval(row["o_aliases"] or "[]")  # a Python list literal, e.g. "['a', 'b']"
        except (ValueError, SyntaxError):
            aliases = None
        if not isinstance(aliases, list):
            raise PragFormatError(f"{path}, row {i + 2}: o_aliases must be a Python list literal like ['a', 'b'], got {row['o_aliases']!r:.80}")
        if not (row["question"] or "").strip() or not (row["obj"] or "").strip():
            raise PragFormatError(f"{path}, row {i + 2}: empty question or obj")
        records.append(PragRecord(qid=row.get("id") or str(i), question=row["question"], answers=_answers(row["obj"], aliases)))
    return records


def _load_cwq(folder: Path) -> list[PragRecord]:
    path = folder / RAW_FILES["complexwebquestions"]
    records = []
    for i, rec in enumerate(_read_json_list(path)):
        answers = []
        for ans in _get(rec, "answers", list, path, i):
            answers += [_get(ans, "answer", str, path, i), *_get(ans, "aliases", list, path, i)]
        records.append(PragRecord(qid=str(rec.get("ID", i)), question=_get(rec, "question", str, path, i), answers=_answers(answers)))
    return records


_RAW_LOADERS = {"2wikimultihopqa": _load_2wiki, "hotpotqa": _load_hotpotqa, "popqa": _load_popqa, "complexwebquestions": _load_cwq}


# -----------------------------------------------------------------------------
# PRAG's augmented / default-format files


def _augment(aug: Any, path: Path, i: int, model: str | None) -> PassageAugment:
    passage = _get(aug, "passage", str, path, i)
    models = sorted(k.removesuffix("_qa") for k in aug if k.endswith("_qa"))
    if model is None:
        if len(models) != 1:
            raise PragFormatError(f"{_where(path, i)}: augment needs exactly one '<model>_qa' field, found {models or 'none'}; pass augment_model=")
        model = models[0]
    qa = []
    for pair in _get(aug, f"{model}_qa", list, path, i):
        qa.append(QAPair(_get(pair, "question", str, path, i), str(_get(pair, "answer", (str, int, float), path, i)), pair.get("full_answer")))
    rewrite = aug.get(f"{model}_rewrite")
    if rewrite is not None and not isinstance(rewrite, str):
        raise PragFormatError(f"{_where(path, i)}: '{model}_rewrite' must be a string")
    return PassageAugment(passage, rewrite, qa)


def _load_augmented(path: Path, augment_model: str | None) -> list[PragRecord]:
    records = []
    for i, rec in enumerate(_read_json_list(path)):
        question = _get(rec, "question", str, path, i)
        answers = _answers(_strings(_get(rec, "answer", (str, list), path, i), "'answer'", path, i))
        augments = [_augment(a, path, i, augment_model) for a in rec.get("augment", [])]
        passages = _strings(rec.get("passages", rec.get("golden_passages", [])), "'passages'", path, i)
        records.append(PragRecord(
            qid=str(rec.get("qid", rec.get("test_id", i))), question=question, answers=answers,
            passages=passages or [a.passage for a in augments], augments=augments, type=rec.get("type"),
        ))
    return records


# -----------------------------------------------------------------------------
# entry point


def load_prag(path: str | Path, dataset: str | None = None, augment_model: str | None = None) -> list[PragRecord]:
    """Read PRAG / DyPRAG QA data into PragRecords.

    path: a folder holding a raw dataset (named by `dataset`, or recognized by its
    file name from RAW_FILES), or a JSON file in PRAG's augmented/default format.
    augment_model: which '<model>_rewrite' / '<model>_qa' fields to read when an
    augmented file holds more than one model's augmentations.
    """
    path = Path(path)
    if dataset is not None and dataset not in RAW_FILES:
        raise PragFormatError(f"dataset={dataset!r} must be one of {sorted(RAW_FILES)}")
    if path.is_dir():
        if dataset is None:
            found = [d for d, name in RAW_FILES.items() if (path / name).is_file()]
            if len(found) != 1:
                expected = ", ".join(f"{name} ({d})" for d, name in RAW_FILES.items())
                raise PragFormatError(f"{path}: cannot tell the dataset ({'several' if found else 'none'} of {expected} found); pass dataset=")
            dataset = found[0]
        return _RAW_LOADERS[dataset](path)
    if not path.exists():
        raise PragFormatError(f"file not found: {path}")
    by_name = [d for d, name in RAW_FILES.items() if name == path.name]
    if dataset is not None or by_name:  # a raw file given directly
        dataset = dataset or by_name[0]
        if path.name != RAW_FILES[dataset]:
            raise PragFormatError(f"{path}: a {dataset} file must be named {RAW_FILES[dataset]} (pass its folder)")
        return _RAW_LOADERS[dataset](path.parent)
    if path.suffix != ".json":
        raise PragFormatError(f"{path}: expected a folder with a raw dataset or an augmented PRAG .json file")
    return _load_augmented(path, augment_model)
