"""Every SFT format reader on small fixtures, bad records reported by file and line, the converter."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assistant, system, user

from nanotune.data.convert import main as convert_main
from nanotune.data.formats import (
    TCM_QG_INSTRUCTION,
    detect_format,
    read_conversations,
    record_to_conversations,
)
from nanotune.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


TCM_RECORD = {
    "id": 7,
    "text": "脾胃为后天之本，气血生化之源。",
    "annotations": [{"Q": "什么是后天之本？", "A": "脾胃"}, {"Q": "脾胃是什么之源？", "A": "气血生化之源"}],
    "source": "中医基础理论",
}

# (format, record, expected conversations)
CASES = [
    (
        "messages",
        {"messages": [system("Be brief."), user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")]},
        [[system("Be brief."), user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")]],
    ),
    (
        "sharegpt",
        {"id": "b1", "conversations": [
            {"from": "human", "value": "你好"}, {"from": "assistant", "value": "你好！"},
            {"from": "human", "value": "中医是什么？"}, {"from": "gpt", "value": "传统医学。"},
        ]},
        [[user("你好"), assistant("你好！"), user("中医是什么？"), assistant("传统医学。")]],
    ),
    (
        "sharegpt",  # a top-level system prompt, and a trailing unanswered question that is dropped
        {"system": "Be kind.", "conversations": [
            {"from": "user", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
        ]},
        [[system("Be kind."), user("Q1"), assistant("A1")]],
    ),
    (
        "alpaca",
        {"instruction": "Translate to English.", "input": "气血", "output": "Qi and blood."},
        [[user("Translate to English.\n气血"), assistant("Qi and blood.")]],
    ),
    (
        "alpaca",  # BELLE-style with history and no input
        {"instruction": "And the spleen?", "input": "", "output": "脾", "history": [["Liver in Chinese?", "肝"]]},
        [[user("Liver in Chinese?"), assistant("肝"), user("And the spleen?"), assistant("脾")]],
    ),
    (
        "panda",
        {"input": "中医的治疗方法有哪些？", "target": "针灸、推拿、汤药。"},
        [[user("中医的治疗方法有哪些？"), assistant("针灸、推拿、汤药。")]],
    ),
    (
        "tcm_qg",
        TCM_RECORD,
        [
            [user("根据下面的文章和答案，提出一个问题。\n文章：脾胃为后天之本，气血生化之源。\n答案：脾胃"), assistant("什么是后天之本？")],
            [user("根据下面的文章和答案，提出一个问题。\n文章：脾胃为后天之本，气血生化之源。\n答案：气血生化之源"), assistant("脾胃是什么之源？")],
        ],
    ),
]


@pytest.mark.parametrize("format, record, expected", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_each_format_reader_gives_the_expected_conversations(tmp_path, format, record, expected):
    assert detect_format(record) == format
    assert record_to_conversations(record, format) == expected
    path = write_jsonl(tmp_path / "data.jsonl", [record, record])
    assert read_conversations(path) == expected * 2  # auto-detected from the file
    assert read_conversations(path, format=format) == expected * 2


def test_tcm_qg_gives_one_conversation_per_annotation_document_plus_answer_to_question(tmp_path):
    path = tmp_path / "tcm.json"  # a JSON array, as the seed set is published
    path.write_text(json.dumps([TCM_RECORD, {**TCM_RECORD, "annotations": TCM_RECORD["annotations"][:1]}], ensure_ascii=False, indent=2), encoding="utf-8")
    conversations = read_conversations(path)
    assert len(conversations) == 3
    for conversation, annotation in zip(conversations, TCM_RECORD["annotations"] + TCM_RECORD["annotations"][:1]):
        prompt, question = conversation
        assert prompt == user(TCM_QG_INSTRUCTION.format(text=TCM_RECORD["text"], answer=annotation["A"]))
        assert TCM_RECORD["text"] in prompt["content"] and annotation["A"] in prompt["content"]
        assert question == assistant(annotation["Q"])


def test_format_is_detected_per_file(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "output": "O"}])
    panda = write_jsonl(tmp_path / "b.jsonl", [{"input": "I2", "target": "O2"}])
    assert read_conversations([alpaca, panda]) == [[user("I"), assistant("O")], [user("I2"), assistant("O2")]]
    assert read_conversations(str(tmp_path / "*.jsonl")) == read_conversations([alpaca, panda])


GOOD = {
    "messages": {"messages": [user("a"), assistant("b")]},
    "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "alpaca": {"instruction": "a", "output": "b"},
    "panda": {"input": "a", "target": "b"},
    "tcm_qg": TCM_RECORD,
}
BAD_RECORDS = [
    ("messages", '{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ("messages", json.dumps({"messages": [user("hi")]}), "no assistant turn"),
    ("messages", json.dumps({"messages": [user("hi"), user("again"), assistant("x")]}), "roles out of order"),
    ("messages", json.dumps({"messages": [assistant("first"), user("hi")]}), "roles out of order"),
    ("messages", json.dumps({"messages": [user("hi"), assistant("  ")]}), "empty content"),
    ("messages", json.dumps({"messages": [{"role": "tool", "content": "x"}, assistant("y")]}), "unknown role 'tool'"),
    ("messages", json.dumps({"conversations": []}), "field 'messages' is missing"),
    ("sharegpt", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}), "unknown role 'bot'"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}), r"field 'conversations'\[1\]\.'value' is missing"),
    ("alpaca", json.dumps({"instruction": "do", "input": "", "output": None}), "field 'output' is missing"),
    ("panda", json.dumps({"input": "q", "target": 3}), "field 'target' must be a string"),
    ("tcm_qg", json.dumps({"text": "doc", "annotations": [{"Q": "q", "A": ""}]}), r"field 'annotations'\[0\]\.A is empty"),
    ("tcm_qg", json.dumps({"text": "doc", "annotations": []}), "field 'annotations' must be a non-empty list"),
]


@pytest.mark.parametrize("format, line, message", BAD_RECORDS, ids=[f"{f}{i}" for i, (f, _, _) in enumerate(BAD_RECORDS)])
def test_a_bad_record_is_an_error_naming_file_line_and_problem(tmp_path, format, line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD[format], ensure_ascii=False)
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")  # the bad record is on line 3
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: .*{message}"):
        read_conversations(path)


def test_skip_invalid_counts_and_logs_bad_records(tmp_path, caplog):
    lines = [
        json.dumps({"messages": [user("a"), assistant("b")]}),
        "{broken",
        json.dumps({"messages": [user("a")]}),
        json.dumps({"messages": [user("c"), assistant("d")]}),
        json.dumps({"messages": [assistant("d"), user("c")]}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = {}
    with caplog.at_level(logging.WARNING, logger="nanotune"):
        conversations = read_conversations(path, skip_invalid=True, stats=stats)
    assert conversations == [[user("a"), assistant("b")], [user("c"), assistant("d")]]
    assert stats == {"records": 5, "invalid": 3, "conversations": 2}
    assert f"{path}:2: not valid JSON" in caplog.text
    assert f"{path}:3: the conversation has no assistant turn" in caplog.text
    assert "skipped 3 invalid records of 5" in caplog.text


def test_a_json_array_reports_the_line_where_the_bad_record_starts(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"input": "a", "target": "b"},\n  {"input": "a",\n   "target": ""}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: message 1 \(assistant\): empty content"):
        read_conversations(path)


def test_converter_round_trips_and_splits_dev_by_record(tmp_path, capsys):
    records = [{"instruction": f"Question {i}?", "input": "ctx" if i % 2 else "", "output": f"Answer {i}."} for i in range(5)]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    expected = read_conversations(source, format="alpaca")

    output = tmp_path / "out" / "train.jsonl"
    assert convert_main(["--format", "alpaca", "--input", str(source), "--output", str(output), "--dev-size", "2"]) == 0
    printed = capsys.readouterr().out
    dev = output.with_name("train.dev.jsonl")
    assert "records: 5 read, 0 invalid skipped" in printed and "train: 3 conversations" in printed and "dev: 2 conversations" in printed
    assert read_conversations(dev) + read_conversations(output) == expected  # auto-detected as "messages"
    assert [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()][0] == {"messages": expected[2]}
    assert not list(tmp_path.glob("out/*.tmp"))

    # Converting the converted file again changes nothing.
    again = tmp_path / "again.jsonl"
    assert convert_main(["--input", str(output), "--output", str(again)]) == 0
    assert again.read_bytes() == output.read_bytes()

    # The TCM set: a record's annotations stay on one side of the split.
    tcm = write_jsonl(tmp_path / "tcm.jsonl", [TCM_RECORD, {**TCM_RECORD, "id": 8}])
    tcm_out, tcm_dev = tmp_path / "tcm_train.jsonl", tmp_path / "tcm_dev.jsonl"
    assert convert_main(["--input", str(tcm), "--output", str(tcm_out), "--dev-size", "1", "--dev-output", str(tcm_dev)]) == 0
    assert len(read_conversations(tcm_dev)) == 2 and len(read_conversations(tcm_out)) == 2


def test_converter_cli_runs_as_a_module_and_reports_bad_lines(tmp_path):
    source = write_jsonl(tmp_path / "panda.jsonl", [{"input": "问", "target": "答"}, {"input": "问", "target": ""}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "nanotune.data.convert", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    failed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert failed.returncode == 2  # a user error, as in every entry point
    assert f"{source}:2: message 1 (assistant): empty content" in failed.stderr
    assert not (tmp_path / "o.jsonl").exists()
    done = subprocess.run(command + ["--skip-invalid"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "records: 2 read, 1 invalid skipped" in done.stdout
    assert read_conversations(tmp_path / "o.jsonl") == [[user("问"), assistant("答")]]
