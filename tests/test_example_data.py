"""The bundled example data (examples/tcm_qg/data/) is well-formed and is what make_data.py writes.

The oracle for the content checks is the generator's own fact tables: every answer must be a value
of the entity its id names, and every question one of the phrasings for that attribute. Regeneration
into a temporary folder must reproduce the shipped files byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanotune.data.records import iter_json_records

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tcm_qg"
QG_PATH = EXAMPLE / "data" / "tcm_qg.json"
CORPUS_PATH = EXAMPLE / "data" / "corpus.txt"
SEED_FIELDS = {"id": str, "text": str, "annotations": list, "source": str}


def _load_generator():
    spec = importlib.util.spec_from_file_location("tcm_qg_make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


@pytest.fixture(scope="module")
def records_with_lines() -> list[tuple[int, dict]]:
    return list(iter_json_records(QG_PATH))


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    return CORPUS_PATH.read_text(encoding="utf-8").split("\n")[:-1]  # the file ends with one newline


def test_shipped_files_exist_and_parse_with_record_line_numbers(records_with_lines):
    assert QG_PATH.is_file() and CORPUS_PATH.is_file()
    with open(QG_PATH, encoding="utf-8") as f:
        plain = json.load(f)
    assert isinstance(plain, list) and 300 <= len(plain) <= 500
    assert [record for _, record in records_with_lines] == plain
    # The file is pretty-printed, so the line a record starts on is its own, and errors point there.
    file_lines = QG_PATH.read_text(encoding="utf-8").splitlines()
    starts = [line for line, _ in records_with_lines]
    assert starts == sorted(set(starts))
    for line, record in records_with_lines:
        assert file_lines[line - 1].strip() == "{", f"{QG_PATH}:{line}: record {record['id']} does not start here"
        assert f'"id": "{record["id"]}"' in file_lines[line], f"{QG_PATH}:{line + 1}: expected the id line"


def test_every_record_has_the_seed_fields_and_types(records_with_lines):
    for line, record in records_with_lines:
        where = f"{QG_PATH}:{line}"
        assert isinstance(record, dict), where
        assert set(record) == set(SEED_FIELDS), f"{where}: fields {sorted(record)}"
        for field, kind in SEED_FIELDS.items():
            assert isinstance(record[field], kind), f"{where}: field {field!r} is {type(record[field]).__name__}"
        assert record["source"] == "nanotune-synthetic", where
        assert record["text"].strip() == record["text"] and record["text"], where
        assert 1 <= len(record["annotations"]) <= 3, f"{where}: {len(record['annotations'])} annotations"
        for annotation in record["annotations"]:
            assert set(annotation) == {"Q", "A"}, f"{where}: annotation fields {sorted(annotation)}"
            assert isinstance(annotation["Q"], str) and isinstance(annotation["A"], str), where
            assert annotation["A"] and annotation["Q"].endswith("？"), f"{where}: {annotation}"


def test_every_answer_occurs_exactly_once_in_its_text(records_with_lines):
    for line, record in records_with_lines:
        for annotation in record["annotations"]:
            count = record["text"].count(annotation["A"])
            assert count == 1, f"{QG_PATH}:{line}: answer {annotation['A']!r} occurs {count} times in the text"


def test_ids_are_unique_and_passages_distinct(records_with_lines):
    ids = [record["id"] for _, record in records_with_lines]
    texts = [record["text"] for _, record in records_with_lines]
    assert len(set(ids)) == len(ids)
    assert len(set(texts)) == len(texts)


def test_questions_name_the_entity_and_ask_for_the_answers_attribute(records_with_lines, generator):
    """Oracle: the fact tables. The id names the entity; A is one of its values; Q a phrasing of that attribute."""
    tables = generator.load_tables()
    for line, record in records_with_lines:
        _, kind, entity_number, _ = record["id"].split("-")
        row = tables[kind][int(entity_number) - 1]
        assert row["name"] in record["text"], f"{QG_PATH}:{line}: passage does not name {row['name']}"
        for annotation in record["annotations"]:
            attributes = [a for a in generator.ATTRIBUTES[kind] if row.get(a) == annotation["A"]]
            assert attributes, f"{QG_PATH}:{line}: {annotation['A']!r} is no attribute of {row['name']}"
            phrasings = [t.format(n=row["name"]) for a in attributes for t in generator.QUESTION_TEMPLATES[kind][a]]
            assert annotation["Q"] in phrasings, f"{QG_PATH}:{line}: {annotation['Q']!r} does not ask for {attributes}"
            assert row["name"] in annotation["Q"]


def test_generator_rewrites_the_shipped_files_byte_for_byte(tmp_path):
    environment = dict(os.environ, PYTHONHASHSEED="7")  # a set's order must not leak into the output
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=environment, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "records" in result.stdout and "lines" in result.stdout
    assert (tmp_path / "tcm_qg.json").read_bytes() == QG_PATH.read_bytes()
    assert (tmp_path / "corpus.txt").read_bytes() == CORPUS_PATH.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tcm_qg.json"]  # no temporary left


def test_corpus_size_and_line_count_in_range(corpus_lines):
    size = CORPUS_PATH.stat().st_size
    assert 2000 <= len(corpus_lines) <= 6000, len(corpus_lines)
    assert 500_000 <= size <= 1_500_000, size
    assert all(line.strip() == line and line for line in corpus_lines), "blank or padded corpus line"


def test_corpus_covers_every_character_of_the_qg_data_but_not_its_passages(records_with_lines, corpus_lines):
    corpus = "\n".join(corpus_lines)
    corpus_chars = set(corpus)
    for line, record in records_with_lines:
        used = set(record["text"]).union(*(set(a["Q"]) | set(a["A"]) for a in record["annotations"]))
        missing = sorted(used - corpus_chars)
        assert not missing, f"{QG_PATH}:{line}: characters {missing} never occur in {CORPUS_PATH.name}"
        assert record["text"] not in corpus, f"{QG_PATH}:{line}: passage copied into the corpus"
