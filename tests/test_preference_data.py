"""Preference data: every reader on fixtures, the converter's round trip, the prompt-prefix refusal, truncation."""

from __future__ import annotations

import json

import pytest
from helpers import corpus_lines, train_sentencepiece

from nanotune.data.convert_preference import convert_pairs, main as convert_main
from nanotune.data.preference import (
    PreferencePair, encode_pair, read_preference_pairs, sequence_of,
)
from nanotune.data.records import DataError
from nanotune.data.sft import encode_conversation, encode_prompt
from nanotune.loss import IGNORE_INDEX
from nanotune.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "你是医生。"}
EARLIER = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}]
QUESTION = {"role": "user", "content": "发烧呢？"}
EXPECTED = PreferencePair([SYSTEM, *EARLIER, QUESTION], "多喝水，及时就医。", "不用管。")

FIXTURES = {
    "trl_strings.jsonl": {"prompt": "发烧呢？", "chosen": "多喝水，及时就医。", "rejected": "不用管。"},
    "trl_messages.jsonl": {"prompt": [SYSTEM, *EARLIER, QUESTION],
                           "chosen": [{"role": "assistant", "content": "多喝水，及时就医。"}],
                           "rejected": [{"role": "assistant", "content": "不用管。"}]},
    "trl_implicit.jsonl": {"chosen": [SYSTEM, *EARLIER, QUESTION, {"role": "assistant", "content": "多喝水，及时就医。"}],
                           "rejected": [SYSTEM, *EARLIER, QUESTION, {"role": "assistant", "content": "不用管。"}]},
    "alpaca.json": [{"system": "你是医生。", "history": [["头痛怎么办？", "多休息。"]], "instruction": "发烧呢？", "input": "",
                     "chosen": "多喝水，及时就医。", "rejected": "不用管。"}],
    "sharegpt.jsonl": {"system": "你是医生。", "conversations": [
        {"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}, {"from": "human", "value": "发烧呢？"}],
        "chosen": {"from": "gpt", "value": "多喝水，及时就医。"}, "rejected": {"from": "gpt", "value": "不用管。"}},
    "medicalgpt_conversations.jsonl": {"system": "你是医生。", "conversations": [
        {"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}, {"from": "human", "value": "发烧呢？"}],
        "chosen": "多喝水，及时就医。", "rejected": "不用管。"},
    "medicalgpt_legacy.jsonl": {"system": "你是医生。", "history": [["头痛怎么办？", "多休息。"]], "question": "发烧呢？",
                                "response_chosen": "多喝水，及时就医。", "response_rejected": "不用管。"},
}


def write(path, value):
    if path.suffix == ".json":
        path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text(json.dumps(value, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_reader_gives_the_same_pair(tmp_path, name):
    ((where, pair),) = read_preference_pairs(write(tmp_path / name, FIXTURES[name]))
    expected = EXPECTED if name != "trl_strings.jsonl" else PreferencePair([QUESTION], EXPECTED.chosen, EXPECTED.rejected)
    assert pair == expected
    assert where == f"{tmp_path / name}:{2 if name.endswith('.json') else 1}"


def test_question_correct_wrong_answer_lines(tmp_path):
    path = tmp_path / "qa.txt"
    path.write_text("肝主什么？ 正确答案：肝主疏泄。 错误答案：肝主呼吸。\n\n脾胃是什么之本？正确答案:后天之本 错误答案:先天之本\n",
                    encoding="utf-8")
    pairs = [pair for _, pair in read_preference_pairs(path)]
    assert pairs == [PreferencePair([{"role": "user", "content": "肝主什么？"}], "肝主疏泄。", "肝主呼吸。"),
                     PreferencePair([{"role": "user", "content": "脾胃是什么之本？"}], "后天之本", "先天之本")]
    path.write_text("肝主什么？ 正确答案：肝主疏泄。\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.txt:1: expected `question 正确答案"):
        read_preference_pairs(path)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same reply"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string"),
])
def test_bad_records_are_file_line_errors(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        read_preference_pairs(path)
    stats = {}
    assert len(read_preference_pairs(path, skip_invalid=True, stats=stats)) == 1 and stats["invalid"] == 1


def test_converter_round_trip_reads_back_the_same_pairs(tmp_path):
    inputs = [write(tmp_path / name, FIXTURES[name]) for name in sorted(FIXTURES)]
    stats = convert_pairs(inputs, tmp_path / "out" / "pairs.jsonl", dev_size=2)
    assert (stats["train_pairs"], stats["dev_pairs"]) == (len(FIXTURES) - 2, 2)
    original = [pair for _, pair in read_preference_pairs(inputs)]
    converted = [pair for _, pair in read_preference_pairs([tmp_path / "out" / "pairs.dev.jsonl",
                                                             tmp_path / "out" / "pairs.jsonl"])]
    assert converted == original
    again = convert_pairs([tmp_path / "out" / "pairs.jsonl"], tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8") == (tmp_path / "out" / "pairs.jsonl").read_text(encoding="utf-8")
    assert again["records"] == len(FIXTURES) - 2
    bad = write(tmp_path / "bad.jsonl", {"prompt": "q", "chosen": "a"})
    assert convert_main(["--input", str(bad), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("tok"), vocab_size=400,
                                                   lines=corpus_lines(300, seed=4)))


@pytest.mark.parametrize("template", ["llama2", "chatml", "belle", "qwen3"])
def test_a_pair_encodes_as_its_two_conversations_do_for_sft(tokenizer, template):
    sample, outcome = encode_pair(EXPECTED, tokenizer, template)
    assert outcome == "kept"
    assert sample["prompt"] == encode_prompt(EXPECTED.prompt, tokenizer, template)
    for name in ("chosen", "rejected"):
        conversation = EXPECTED.prompt + [{"role": "assistant", "content": getattr(EXPECTED, name)}]
        sft = encode_conversation(conversation, tokenizer, template, last_reply_only=True)
        ids, labels = sequence_of(sample["prompt"], sample[name])
        n = len(ids)  # the SFT sample may go on after the end of turn (ChatML's newline), never trained
        assert sft["input_ids"][:n] == ids
        assert sft["labels"][: n - 1] == labels[: n - 1]
        assert all(label == IGNORE_INDEX for label in sft["labels"][n - 1 :])


def test_a_prompt_that_is_not_a_prefix_is_refused_with_its_line(tmp_path, tokenizer):
    # qwen3_nothink writes the empty think block into the prompt of a reply without reasoning,
    # and not into that of a reply with it: the two replies would be trained on different prompts.
    path = write(tmp_path / "pairs.jsonl", {"prompt": "发烧呢？", "chosen": "<think>\n想一想\n</think>\n\n多喝水。",
                                            "rejected": "不用管。"})
    from nanotune.data.preference import build_preference_dataset

    with pytest.raises(DataError, match=r"pairs.jsonl:1: with the qwen3_nothink template the prompt's tokens are not"):
        build_preference_dataset([path], tokenizer, "qwen3_nothink", max_length=None)
    assert len(build_preference_dataset([path], tokenizer, "qwen3", max_length=None)) == 1


def test_truncation_cuts_the_prompt_from_the_left_first_and_keeps_bos(tokenizer):
    long_prompt = PreferencePair([{"role": "user", "content": "中医理论认为人体气血阴阳平衡" * 6}], "肝主疏泄。", "肾藏精。")
    full, _ = encode_pair(long_prompt, tokenizer, "llama2")
    limit = len(full["prompt"]) - 5 + len(full["chosen"])
    assert encode_pair(long_prompt, tokenizer, "llama2", max_length=limit, truncation="drop") == (None, "dropped")
    cut, outcome = encode_pair(long_prompt, tokenizer, "llama2", max_length=limit)
    assert outcome == "truncated"
    assert cut["chosen"] == full["chosen"] and cut["rejected"] == full["rejected"]  # replies whole
    assert cut["prompt"][0] == tokenizer.bos_id and cut["prompt"][1:] == full["prompt"][-(len(cut["prompt"]) - 1):]
    assert len(cut["prompt"]) + max(len(cut["chosen"]), len(cut["rejected"])) <= limit


def test_truncate_left_drops_the_oldest_exchanges_first(tokenizer):
    pair = PreferencePair([SYSTEM, {"role": "user", "content": "头痛" * 30}, {"role": "assistant", "content": "休息" * 30},
                           QUESTION], "多喝水。", "不用管。")
    short = PreferencePair([SYSTEM, QUESTION], "多喝水。", "不用管。")
    expected, _ = encode_pair(short, tokenizer, "chatml")
    limit = len(expected["prompt"]) + max(len(expected["chosen"]), len(expected["rejected"]))
    cut, outcome = encode_pair(pair, tokenizer, "chatml", max_length=limit, truncation="truncate_left")
    assert (cut, outcome) == (expected, "truncated")
