"""PRAG / DyPRAG QA-file reader on small made-up fixtures in each format, and on broken files."""
import json
import shutil
from pathlib import Path

import pytest

from train.dyprag.prag_format import RAW_FILES, PragFormatError, load_prag

FIXTURES = Path(__file__).parent / "fixtures" / "prag"
AUGMENTED = FIXTURES / "data_aug" / "popqa" / "tinyllama-test" / "total.json"


def test_2wikimultihopqa_gold_passages_and_aliases():
    records = load_prag(FIXTURES / "2wikimultihopqa")
    assert [r.qid for r in records] == ["a1f0c2", "b2e1d3", "c3a2f4"]
    first = records[0]
    assert first.answers == ["Mira Vasst", "Mira Oldane Vasst"]  # answer_id -> id_aliases.json
    assert first.type == "compositional"
    # the two supporting paragraphs, sentences joined by spaces; the distractor is left out
    assert first.passages == [
        "Lanterns Over Quellin is a 1961 drama film directed by Odrin Vasst. It was shot in the hill town of Quellin.",
        "Odrin Vasst (1920-1988) was a film director from Beluria. His mother was the painter Mira Vasst.",
    ]
    assert records[1].answers == ["Sarn Ovel"]  # answer_id null: the answer string only
    assert records[2].answers == ["Ostravel", "Republic of Ostravel"]
    assert all(r.augments == [] for r in records)


def test_2wikimultihopqa_without_alias_file(tmp_path):
    shutil.copy(FIXTURES / "2wikimultihopqa" / "dev.json", tmp_path / "dev.json")
    assert load_prag(tmp_path, "2wikimultihopqa")[0].answers == ["Mira Vasst"]


def test_hotpotqa_passages_deduplicated():
    records = load_prag(FIXTURES / "hotpotqa" / "hotpot_dev_distractor_v1.json")  # the file itself works too
    first = records[0]
    assert first.answers == ["Tessaly Brun"] and first.type == "bridge"
    # supporting facts name "Vask Viaduct" twice: one passage; HotpotQA sentences keep their own spacing
    assert first.passages == [
        "The Orlen railway links Pell and Marrow. It crosses the Vask on the Vask Viaduct.",
        "The Vask Viaduct was designed by Tessaly Brun. It opened in 1894.",
    ]
    assert records[1].answers == ["yes"] and len(records[1].passages) == 2


def test_popqa_answers_from_obj_and_aliases():
    records = load_prag(FIXTURES / "popqa")
    assert [r.qid for r in records] == ["4100001", "4100002", "4100003"]
    assert records[0].question == "What is Harl Menwick's occupation?"
    assert records[0].answers == ["cartographer", "map maker", "mapmaker"]
    assert records[1].answers == ["Velmora"]
    assert records[2].answers == ["Penna Ruel", "Penna J. Ruel"]
    assert all(r.passages == [] for r in records)


def test_complexwebquestions_all_answers_and_aliases():
    records = load_prag(FIXTURES / "complexwebquestions", dataset="complexwebquestions")
    assert records[0].answers == ["Tolvanic", "Tolvan language", "Tolvanese"]
    assert records[1].answers == ["Lisbet Penroy", "Corran Penroy", "Corran A. Penroy"]
    assert records[1].qid == "WebQTrn-9002_bb22"


def test_augmented_file_rewrites_and_qa():
    records = load_prag(AUGMENTED)
    assert len(records) == 2
    first = records[0]
    assert first.answers == ["cartographer", "map maker"]
    assert len(first.augments) == 2 and first.passages == [a.passage for a in first.augments]
    aug = first.augments[0]
    assert aug.rewrite == "The coast of Velmora was charted by the cartographer Harl Menwick."
    assert [(q.question, q.answer) for q in aug.qa][0] == ("What was Harl Menwick's job?", "cartographer")
    assert len(aug.qa) == 3 and aug.qa[1].full_answer == "He charted the coast of Velmora."
    assert records[1].answers == ["Velmora"]  # a plain string answer


def test_augmented_file_with_two_models_needs_a_choice(tmp_path):
    data = json.loads(AUGMENTED.read_text())
    for rec in data:
        for aug in rec["augment"]:
            aug["othermodel_qa"] = [{"question": "q?", "answer": "a", "full_answer": "a."}]
            aug["othermodel_rewrite"] = "other rewrite"
    (tmp_path / "total.json").write_text(json.dumps(data))
    with pytest.raises(PragFormatError, match=r"record 0: augment needs exactly one '<model>_qa'.*othermodel.*tinyllama-test"):
        load_prag(tmp_path / "total.json")
    records = load_prag(tmp_path / "total.json", augment_model="othermodel")
    assert records[0].augments[0].rewrite == "other rewrite"
    assert [q.answer for q in records[0].augments[0].qa] == ["a"]


# -----------------------------------------------------------------------------
# bad input


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_paths_and_unknown_dataset(tmp_path):
    with pytest.raises(PragFormatError, match="file not found"):
        load_prag(tmp_path / "nope.json")
    with pytest.raises(PragFormatError, match="cannot tell the dataset.*popQA.tsv"):
        load_prag(tmp_path)  # an empty folder
    with pytest.raises(PragFormatError, match="file not found: .*hotpot_dev_distractor_v1.json"):
        load_prag(tmp_path, "hotpotqa")
    with pytest.raises(PragFormatError, match="dataset='nq' must be one of"):
        load_prag(FIXTURES / "popqa", "nq")


def test_malformed_json_and_records(tmp_path):
    write(tmp_path / "a" / RAW_FILES["hotpotqa"], "[{\"_id\": 1, ")
    with pytest.raises(PragFormatError, match="not valid JSON"):
        load_prag(tmp_path / "a")
    write(tmp_path / "b" / RAW_FILES["hotpotqa"], json.dumps({"question": "not a list"}))
    with pytest.raises(PragFormatError, match="expected a non-empty JSON list"):
        load_prag(tmp_path / "b")
    good = json.loads((FIXTURES / "2wikimultihopqa" / "dev.json").read_text())
    del good[1]["question"]
    write(tmp_path / "c" / "dev.json", json.dumps(good))
    with pytest.raises(PragFormatError, match=r"dev.json, record 1: missing field 'question'"):
        load_prag(tmp_path / "c")
    good = json.loads((FIXTURES / "2wikimultihopqa" / "dev.json").read_text())
    good[2]["supporting_facts"] = [["No Such Title", 0]]
    write(tmp_path / "d" / "dev.json", json.dumps(good))
    with pytest.raises(PragFormatError, match="record 2: supporting fact .*No Such Title.* names no paragraph"):
        load_prag(tmp_path / "d")
    write(tmp_path / "e" / RAW_FILES["complexwebquestions"], json.dumps([{"question": "q?", "answers": "Paris"}]))
    with pytest.raises(PragFormatError, match="record 0: field 'answers' must be list, got str"):
        load_prag(tmp_path / "e")
    write(tmp_path / "f" / "total.json", json.dumps([{"question": "q?", "answer": 7}]))
    with pytest.raises(PragFormatError, match="field 'answer' must be str or list, got int"):
        load_prag(tmp_path / "f" / "total.json")


def test_malformed_popqa(tmp_path):
    header = "id\tquestion\tobj\to_aliases\n"
    write(tmp_path / "a" / "popQA.tsv", header + "1\tWho?\tAnna\t[]\n2\tWhere?\tOslo\tnot a list\n")
    with pytest.raises(PragFormatError, match=r"row 3: o_aliases must be a Python list literal"):
        load_prag(tmp_path / "a")
    write(tmp_path / "b" / "popQA.tsv", "id\tquestion\tobj\n1\tWho?\tAnna\n")
    with pytest.raises(PragFormatError, match=r"missing: \['o_aliases'\]"):
        load_prag(tmp_path / "b")
    write(tmp_path / "c" / "popQA.tsv", header + "1\tWho?\t\t[]\n")
    with pytest.raises(PragFormatError, match="row 2: empty question or obj"):
        load_prag(tmp_path / "c")
