"""Inputs are checked before the model loads: data paths, the number of samples, the tokenizer
against the model's own; and every reader refuses text that is not UTF-8 (a bad byte or a lone
surrogate escape) with file:line, skips it with `skip_invalid`, and strips a byte-order mark."""

from __future__ import annotations

import json
import os

import pytest
from helpers import corpus_lines, train_sentencepiece

from nanotune.config import ConfigError, SFTDataConfig, load_config
from nanotune.data.formats import read_conversations
from nanotune.data.preference import read_preference_pairs
from nanotune.data.prompts import read_prompt_records
from nanotune.data.records import DataError, expand_files, iter_json_records
from nanotune.data.token_cache import read_documents
from nanotune.preflight import check_data_files, check_enough_samples, check_tokenizer_fits_model
from nanotune.tokenizer import Tokenizer
from tokenizer_tools import merge_spm
from tokenizer_tools.train_spm import iter_texts

BOM = "\ufeff".encode()

# ---------------------------------------------------------------------------------------------
# Data paths
# ---------------------------------------------------------------------------------------------


def test_a_directory_is_reported_as_a_directory_not_as_missing(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match=r"corpus: is a directory, not a file"):
        expand_files([tmp_path / "corpus"])
    with pytest.raises(DataError, match=r"absent\.jsonl: file not found"):
        expand_files([tmp_path / "absent.jsonl"])
    with pytest.raises(DataError, match=r"nothing\*\.jsonl: no file matches this pattern"):
        expand_files([str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(DataError, match=r"corp\*: matches only directories"):
        expand_files([str(tmp_path / "corp*")])


def _pt_config(tmp_path, *files, **kwargs):
    argv = ["--data.train_files", json.dumps([str(f) for f in files])]
    argv += [f"--{key}={value}" for key, value in kwargs.items()]
    return load_config(argv)


def test_check_data_files_names_the_key_and_the_file(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("hello\n")
    check_data_files(_pt_config(tmp_path, good))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"data\.train_files: .*folder: is a directory"):
        check_data_files(_pt_config(tmp_path, good, tmp_path / "folder"))
    csv = tmp_path / "a.csv"
    csv.write_text("x\n")
    with pytest.raises(DataError, match=r"data\.train_files: .*a\.csv: unsupported file type '\.csv'"):
        check_data_files(_pt_config(tmp_path, csv))
    sft = load_config(["--data.train_files", str(good)], data_class=SFTDataConfig)
    with pytest.raises(DataError, match=r"a\.txt: unsupported file type '\.txt'; expected \.jsonl, \.json"):
        check_data_files(sft)
    config = _pt_config(tmp_path, good)
    config.data.valid_files = [str(tmp_path / "valid*.txt")]
    with pytest.raises(DataError, match=r"data\.valid_files: .*valid\*\.txt: no file matches"):
        check_data_files(config)
    with pytest.raises(ConfigError, match="data.train_files is empty"):
        check_data_files(load_config([]))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_file_is_reported_before_the_model_loads(tmp_path):
    locked = tmp_path / "locked.txt"
    locked.write_text("secret\n")
    locked.chmod(0)
    with pytest.raises(DataError, match=r"locked\.txt: cannot be read"):
        check_data_files(_pt_config(tmp_path, locked))


def test_fewer_samples_than_one_global_batch_names_files_count_and_keys(tmp_path):
    config = load_config(["--train.batch_size=4", "--train.grad_accum=2", "--data.seq_len=128"])
    check_enough_samples(16, config, world_size=2, files=["a.txt"])
    with pytest.raises(ConfigError) as error:
        check_enough_samples(5, config, world_size=2, files=["a.txt", "b.txt"])
    message = str(error.value)
    assert message.startswith("a.txt, b.txt: 5 blocks of data.seq_len 128 tokens, fewer than one global batch of 16")
    assert "train.batch_size 4" in message and "train.grad_accum 2" in message and "\n" not in message
    sft = load_config(["--train.batch_size=8"], data_class=SFTDataConfig)
    with pytest.raises(ConfigError, match=r"^x\.jsonl: 3 samples, fewer than one global batch of 8"):
        check_enough_samples(3, sft, world_size=1, files="x.jsonl")


# ---------------------------------------------------------------------------------------------
# The tokenizer against the model's own
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory):
    """A model folder with its own tokenizer, a merged (extended) one, and an unrelated one."""
    folder = tmp_path_factory.mktemp("vocabularies")
    lines = corpus_lines(600, seed=4)
    english, chinese = lines[1::2], lines[0::2]
    model_folder = folder / "model"
    base = train_sentencepiece(model_folder, vocab_size=400, lines=english + chinese[:10], name="tokenizer")
    extra = train_sentencepiece(folder / "zh", vocab_size=700, lines=chinese, name="zh")
    assert merge_spm.main(["--base", str(base), "--extra", str(extra), "--output", str(folder / "merged")]) == 0
    other = train_sentencepiece(folder / "other", vocab_size=400, lines=corpus_lines(600, seed=9)[::-1], name="other")
    return {"model": model_folder, "base": base, "merged": folder / "merged", "other": other, "zh": extra}


def test_the_models_own_tokenizer_and_an_extension_of_it_fit(vocabularies):
    check_tokenizer_fits_model(Tokenizer.from_file(vocabularies["model"]), vocabularies["model"])
    merged = Tokenizer.from_file(vocabularies["merged"])
    assert merged.vocab_size > Tokenizer.from_file(vocabularies["base"]).vocab_size
    check_tokenizer_fits_model(merged, vocabularies["model"])


def test_a_tokenizer_with_other_ids_is_refused_saying_which_is_which(vocabularies):
    for name in ("other", "zh"):
        tokenizer = Tokenizer.from_file(vocabularies[name])
        own = Tokenizer.from_file(vocabularies["model"])
        differing = sum(own.id_to_piece(i) != tokenizer.id_to_piece(i) for i in range(min(own.vocab_size, tokenizer.vocab_size)))
        assert differing > 0  # the oracle: these really are other vocabularies
        with pytest.raises(ConfigError) as error:
            check_tokenizer_fits_model(tokenizer, vocabularies["model"])
        message = str(error.value)
        assert message.startswith(f"tokenizer.path {tokenizer.path} does not fit model.path {vocabularies['model']}")
        assert f"{differing} of the model's {own.vocab_size} ids map to other pieces" in message
        assert "\n" not in message


def test_a_model_folder_without_a_tokenizer_is_not_checked(tmp_path, vocabularies):
    check_tokenizer_fits_model(Tokenizer.from_file(vocabularies["other"]), tmp_path)


# ---------------------------------------------------------------------------------------------
# UTF-8, surrogates and byte-order marks in every reader
# ---------------------------------------------------------------------------------------------

BAD_BYTES = b"\xff\xfe"


def _lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _conversation(text: str) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}


@pytest.mark.parametrize("kind", ["bytes", "surrogate"])
def test_sft_readers_refuse_bad_text_with_file_and_line_and_skip_it_when_asked(tmp_path, kind):
    bad = (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "' + BAD_BYTES + b'"}]}'
           if kind == "bytes" else b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud800"}]}')
    path = tmp_path / "chat.jsonl"
    path.write_bytes(_lines(_conversation("one"), bad, _conversation("two")))
    with pytest.raises(DataError, match=r"chat\.jsonl:2: not valid UTF-8"):
        read_conversations(path)
    stats = {}
    kept = read_conversations(path, skip_invalid=True, stats=stats)
    assert [c[-1]["content"] for c in kept] == ["one", "two"] and stats["invalid"] == 1
    array = tmp_path / "chat.json"
    array.write_bytes(b"[\n" + _lines(_conversation("one"))[:-1] + b",\n" + bad + b"\n]\n")
    with pytest.raises(DataError, match=r"chat\.json:3: not valid UTF-8"):
        read_conversations(array)


@pytest.mark.parametrize("kind", ["bytes", "surrogate"])
def test_pretraining_readers_refuse_bad_text_and_skip_it_when_asked(tmp_path, kind):
    bad = b'{"text": "' + (BAD_BYTES if kind == "bytes" else b"\\udfff tail") + b'"}'
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_lines({"text": "one"}, bad, {"text": "two"}))
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: not valid UTF-8"):
        list(read_documents(path))
    assert list(read_documents(path, skip_invalid=True)) == ["one", "two"]
    array = tmp_path / "corpus.json"
    array.write_bytes(b'[{"text": "one"},\n' + bad + b"]")
    with pytest.raises(DataError, match=r"corpus\.json:2: not valid UTF-8"):
        list(read_documents(array))
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: not valid UTF-8"):
        list(iter_texts([path]))  # the tokenizer trainer's reader


def test_a_surrogate_pair_escape_is_a_character_not_an_error(tmp_path):
    path = tmp_path / "emoji.jsonl"
    path.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n')
    assert list(read_documents(path)) == ["smile \U0001F600"]


def test_a_byte_order_mark_is_stripped_in_every_reader(tmp_path):
    txt = tmp_path / "bom.txt"
    txt.write_bytes(BOM + "first line\nsecond\n".encode())
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(BOM + _lines({"text": "first"}, {"text": "second"}))
    array = tmp_path / "bom.json"
    array.write_bytes(BOM + b'[{"text": "first"}, {"text": "second"}]')
    for path in (txt, jsonl, array):
        documents = list(read_documents(path))
        assert documents[0].startswith("first") and "\ufeff" not in "".join(documents), path
        assert [text for _, _, text in iter_texts([path])][0].startswith("first"), path
    chat = tmp_path / "bom_chat.jsonl"
    chat.write_bytes(BOM + _lines(_conversation("one")))
    assert read_conversations(chat)[0][-1]["content"] == "one"
    assert read_conversations(chat, skip_invalid=True)[0][-1]["content"] == "one"
    assert [line for line, _ in iter_json_records(array)] == [1, 1]


# ---------------------------------------------------------------------------------------------
# skip_invalid: the same for every reader (records.reject_record)
# ---------------------------------------------------------------------------------------------

GOOD_AND_BAD = {  # reader -> (a valid record, a record that reader refuses)
    "conversations": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
    "preference pairs": ({"prompt": "q", "chosen": "yes", "rejected": "no"},
                         {"prompt": "q", "chosen": "yes", "rejected": 3}),
    "prompts": ({"prompt": "2 + 2 ="}, {"prompt": ""}),
}


def read_with(reader: str, path, skip_invalid: bool, stats: dict):
    if reader == "conversations":
        return read_conversations(path, skip_invalid=skip_invalid, stats=stats)
    if reader == "preference pairs":
        return read_preference_pairs(path, skip_invalid=skip_invalid, stats=stats)
    return read_prompt_records([path], skip_invalid=skip_invalid)


@pytest.mark.parametrize("reader", sorted(GOOD_AND_BAD))
def test_every_reader_refuses_a_bad_record_by_line_or_skips_it_with_ten_warnings_at_most(tmp_path, caplog, reader):
    good, bad = GOOD_AND_BAD[reader]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] + [bad] * 12 + [good]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        read_with(reader, path, skip_invalid=False, stats={})
    caplog.clear()
    with caplog.at_level("WARNING", logger="nanotune"):
        stats = {}
        kept = read_with(reader, path, skip_invalid=True, stats=stats)
    assert len(kept) == 2
    messages = [r.getMessage() for r in caplog.records]
    if reader == "prompts":  # read_prompt_records takes no stats: its summary line gives the count
        assert any(m.startswith("prompt data: 12 invalid records skipped") for m in messages)
    else:
        assert stats["invalid"] == 12
    skipped = [m for m in messages if m.startswith("skipping invalid")]
    assert [m.split(": ", 1)[1].split(": ", 1)[0] for m in skipped] == [f"{path}:{line}" for line in range(2, 12)]
