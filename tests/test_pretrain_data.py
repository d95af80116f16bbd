"""nanotune.data.pretrain and token_cache: readers, the token cache, packing and its equivalence."""

import json
import logging
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import corpus_lines, hf_llama_from, tiny_model, train_sentencepiece

from nanotune.data.collate import collate_blocks
from nanotune.data.pretrain import (
    IGNORE_INDEX,
    PackedDataset,
    build_pretrain_datasets,
    build_token_cache,
    pack_documents,
    read_documents,
    split_documents,
)
from nanotune.data.records import DataError
from nanotune.data.token_cache import token_dtype
from nanotune.model import positions_from_document_ids
from nanotune.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=400))


def _documents(n, seed=0):
    """Mixed Chinese/English documents of 1 to 12 lines (so some are longer than a block)."""
    rng = random.Random(seed)
    lines = corpus_lines(n * 6, seed=seed)
    return [" ".join(rng.sample(lines, rng.randint(1, 12))) for _ in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _random_token_documents(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]


def _stream(docs, bos, eos):
    return [t for d in docs for t in [bos] * (bos is not None) + list(d) + [eos] * (eos is not None)]


class CountingTokenizer:
    """Wraps a Tokenizer and counts encode calls: a cache hit must make none."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.path, self.vocab_size = inner.path, inner.vocab_size

    def encode_batch(self, texts):
        self.calls += 1
        return self.inner.encode_batch(texts)


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def test_txt_reads_a_document_per_line_or_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\r\n\n  \nthird\nstill third\n\n\nfourth", encoding="utf-8")
    assert list(read_documents(path)) == ["first line", "second line", "third", "still third", "fourth"]
    assert list(read_documents(path, txt_mode="paragraph")) == [
        "first line\nsecond line", "third\nstill third", "fourth",
    ]


def test_jsonl_and_json_join_several_fields_leaving_out_empty_ones(tmp_path):
    records = [{"title": "标题", "content": "正文内容"}, {"title": "", "content": "only content"}, {"title": "t", "content": "c", "x": 1}]
    _write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    expected = ["标题\n正文内容", "only content", "t\nc"]
    assert list(read_documents(tmp_path / "a.jsonl", text_fields=("title", "content"))) == expected
    assert list(read_documents(tmp_path / "b.json", text_fields=("title", "content"))) == expected
    assert list(read_documents(tmp_path / "a.jsonl", text_fields="content")) == ["正文内容", "only content", "c"]
    assert list(read_documents(tmp_path / "a.jsonl", text_fields=("title", "content"), field_separator=": "))[0] == "标题: 正文内容"


def test_globs_and_lists_read_every_file_in_sorted_order(tmp_path):
    (tmp_path / "part").mkdir()
    for name, text in [("b.txt", "from b"), ("a.txt", "from a")]:
        (tmp_path / "part" / name).write_text(text, encoding="utf-8")
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "from c"}])
    documents = list(read_documents([str(tmp_path / "part" / "*.txt"), tmp_path / "c.jsonl"]))
    assert documents == ["from a", "from b", "from c"]
    with pytest.raises(DataError, match="no file matches"):
        list(read_documents(str(tmp_path / "*.parquet")))
    (tmp_path / "d.csv").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type"):
        list(read_documents(tmp_path / "d.csv"))


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"title": "t"}', r"bad\.jsonl:3: field 'content': missing"),
        ('{"title": "t", "content": null}', r"bad\.jsonl:3: field 'content': expected a string, got NoneType"),
        ('["a list"]', r"bad\.jsonl:3: expected a JSON object with field 'title', 'content', got list"),
        ('{"title": "t", "content": "unclosed', r"bad\.jsonl:3: not valid JSON"),
    ],
)
def test_bad_record_is_an_error_naming_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"title": "t", "content": "c"})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")  # line 2 is blank
    with pytest.raises(DataError, match=message):
        list(read_documents(path, text_fields=("title", "content")))


def test_bad_utf8_line_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\nalso fine\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n{"text": "also fine"}\n')
    for name in ("bad.txt", "bad.jsonl"):
        with pytest.raises(DataError, match=rf"{name}:2: not valid UTF-8"):
            list(read_documents(tmp_path / name))
        assert list(read_documents(tmp_path / name, skip_invalid=True)) == ["fine", "also fine"]


def test_skip_invalid_skips_bad_records_and_logs_their_count(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = ['{"text": "one"}', '{"text": 5}', "not json", '{"other": "x"}', '{"text": "two"}', "[1]"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="nanotune"):
        assert list(read_documents(path, skip_invalid=True)) == ["one", "two"]
    assert "mixed.jsonl: skipped 4 invalid records" in caplog.text
    assert "mixed.jsonl:2: field 'text'" in caplog.text  # the first problem, for the user to look at


# ----------------------------------------------------------------------------------------------
# The token cache
# ----------------------------------------------------------------------------------------------


def test_cache_holds_each_document_tokenised_without_bos_or_eos(tmp_path, tokenizer):
    texts = _documents(40)
    _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    cache = build_token_cache(tmp_path / "corpus.jsonl", tokenizer, tmp_path / "cache", num_workers=1)
    assert len(cache) == 40 and cache.tokens.dtype == np.uint16
    assert cache.offsets[0] == 0 and cache.n_tokens == len(cache.tokens)
    for i, text in enumerate(texts):
        assert cache.document(i).tolist() == tokenizer.encode(text)  # oracle: one text at a time
    assert cache.meta["n_documents"] == 40


def test_second_build_opens_the_cache_without_tokenising(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in _documents(30)])
    first = CountingTokenizer(tokenizer)
    cache = build_token_cache(tmp_path / "corpus.jsonl", first, tmp_path / "cache", num_workers=1)
    assert first.calls > 0
    second = CountingTokenizer(tokenizer)
    again = build_token_cache(tmp_path / "corpus.jsonl", second, tmp_path / "cache", num_workers=1)
    assert second.calls == 0
    assert again.folder == cache.folder and np.array_equal(again.tokens, cache.tokens)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache.folder.name]  # no temporary left


def test_changed_file_or_reader_option_is_tokenised_again(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("the model learns\n\nthe loss falls\n", encoding="utf-8")
    before = build_token_cache(path, tokenizer, tmp_path / "cache", num_workers=1)
    path.write_text("the model learnt\n\nthe loss falls\n", encoding="utf-8")  # same size, one letter changed
    counting = CountingTokenizer(tokenizer)
    after = build_token_cache(path, counting, tmp_path / "cache", num_workers=1)
    assert counting.calls > 0 and after.folder != before.folder
    assert after.document(0).tolist() == tokenizer.encode("the model learnt")
    paragraphs = build_token_cache(path, tokenizer, tmp_path / "cache", txt_mode="paragraph", num_workers=1)
    assert paragraphs.folder not in (before.folder, after.folder) and len(paragraphs) == len(after) == 2


def test_worker_processes_write_the_same_cache_as_the_batch_encoder(tmp_path, tokenizer):
    (tmp_path / "corpus.txt").write_text("\n".join(_documents(60, seed=1)), encoding="utf-8")
    in_process = build_token_cache(tmp_path / "corpus.txt", tokenizer, tmp_path / "a", num_workers=1)
    in_workers = build_token_cache(tmp_path / "corpus.txt", tokenizer, tmp_path / "b", num_workers=2)
    assert np.array_equal(in_process.offsets, in_workers.offsets)
    assert np.array_equal(in_process.tokens, in_workers.tokens)


def test_vocabulary_over_65535_is_cached_as_uint32(tmp_path, tokenizer):
    class BigVocabulary:
        path, vocab_size = tokenizer.path, 100_000

        def encode_batch(self, texts):
            return [[70_000 + len(text), 65_535] for text in texts]

    (tmp_path / "c.txt").write_text("ab\nabcd\n", encoding="utf-8")
    cache = build_token_cache(tmp_path / "c.txt", BigVocabulary(), tmp_path / "cache", num_workers=1)
    assert cache.tokens.dtype == np.uint32
    assert [cache.document(i).tolist() for i in range(2)] == [[70_002, 65_535], [70_004, 65_535]]
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32


def test_real_llama2_tokenizer_cache_decodes_back_to_the_text(llama2_tokenizer_path, tmp_path):
    llama2 = Tokenizer.from_file(llama2_tokenizer_path)
    texts = _documents(20)
    _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    cache = build_token_cache(tmp_path / "c.jsonl", llama2, tmp_path / "cache")
    assert cache.tokens.dtype == np.uint16
    assert [llama2.decode(cache.document(i).tolist()) for i in range(len(cache))] == texts


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def test_packing_a_hand_worked_example():
    blocks = list(pack_documents([[5, 6], [7, 8, 9, 10], [11]], seq_len=4, bos_id=1, eos_id=2))
    # stream: 1 5 6 2 | 1 7 8 9 | 10 2 1 11 | 2 pad pad pad
    expected = {
        "input_ids": [[1, 5, 6, 2], [1, 7, 8, 9], [10, 2, 1, 11], [2, 0, 0, 0]],
        "labels": [[5, 6, 2, -100], [7, 8, 9, -100], [2, -100, 11, -100], [-100, -100, -100, -100]],
        "position_ids": [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 2]],
        "document_ids": [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 2, 2], [2, -1, -1, -1]],
    }
    assert {key: collate_blocks(blocks)[key].tolist() for key in expected} == expected


@pytest.mark.parametrize("bos, eos", [(1, 2), (None, 2), (1, None), (None, None)])
def test_packing_conserves_every_document_in_order(bos, eos):
    docs = _random_token_documents([5, 40, 1, 0, 17, 16, 3, 64, 9], seed=3)
    blocks = list(pack_documents(docs, seq_len=16, bos_id=bos, eos_id=eos))
    real = [b["input_ids"][b["document_ids"] != -1] for b in blocks]
    assert torch.cat(real).tolist() == _stream(docs, bos, eos)
    assert all(len(r) == 16 for r in real[:-1])  # padding only in the last block
    assert all(len(b["input_ids"]) == 16 and b["input_ids"].dtype == torch.long for b in blocks)


def test_labels_never_cross_a_document_and_positions_restart_at_each_document():
    docs = _random_token_documents([5, 40, 1, 17, 16, 3, 64, 9], seed=4)
    batch = collate_blocks(list(pack_documents(docs, seq_len=16, bos_id=1, eos_id=2)))
    ids, labels, documents = batch["input_ids"], batch["labels"], batch["document_ids"]
    has_target = labels != IGNORE_INDEX
    # a target is always the next token, of the same document, in the same block
    assert torch.equal(labels[:, :-1][has_target[:, :-1]], ids[:, 1:][has_target[:, :-1]])
    assert torch.all(documents[:, 1:][has_target[:, :-1]] == documents[:, :-1][has_target[:, :-1]])
    assert not has_target[:, -1].any()
    # exactly one token without a target per document piece: its last one
    pieces = (documents[:, 1:] != documents[:, :-1]).sum() + len(documents)
    n_padding_pieces = int((documents[:, -1] == -1).sum())
    assert int((~has_target & (documents != -1)).sum()) == pieces - n_padding_pieces
    # positions: 0 at every document start (also continued ones), and what the model would derive
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    assert torch.all(batch["position_ids"][starts] == 0)
    assert torch.equal(batch["position_ids"], positions_from_document_ids(documents))


@pytest.mark.parametrize("packed_attention", ["spans", "mask"])
def test_packed_loss_equals_the_sum_of_per_document_losses_in_transformers(packed_attention):
    model = tiny_model(seed=5, packed_attention=packed_attention).eval()
    hf = hf_llama_from(model)
    docs = _random_token_documents([7, 30, 1, 12, 50, 4, 19], seed=5)  # 30 and 50 cross block boundaries
    batch = collate_blocks(list(pack_documents(docs, seq_len=32, bos_id=1, eos_id=2)))  # (B, T)

    with torch.no_grad():
        packed_loss = model(batch["input_ids"], batch["position_ids"], batch["document_ids"], labels=batch["labels"])
        logits = model(batch["input_ids"], document_ids=batch["document_ids"])  # (B, T, V)
        oracle_rows = []
        for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
            row_loss = torch.zeros((), dtype=torch.float64)
            for document in documents.unique():
                if document == -1:
                    continue
                piece = ids[documents == document]  # one document's tokens in this block, run alone
                piece_logits = hf(piece[None]).logits[0]  # (n, V)
                row_loss += F.cross_entropy(piece_logits[:-1], piece[1:], reduction="sum").double()
            oracle_rows.append(row_loss)
    oracle = torch.stack(oracle_rows)
    from_logits = torch.stack([
        F.cross_entropy(row_logits, row_labels, ignore_index=IGNORE_INDEX, reduction="sum").double()
        for row_logits, row_labels in zip(logits, batch["labels"])
    ])
    assert ((packed_loss.double() - oracle.sum()).abs() / oracle.sum()) <= 1e-5
    assert torch.all((from_logits - oracle).abs() / oracle <= 1e-5), (from_logits, oracle)


@pytest.mark.parametrize("bos, eos", [(1, 2), (None, None)])
def test_packed_dataset_serves_the_blocks_pack_documents_yields(tmp_path, tokenizer, bos, eos):
    texts = _documents(50, seed=2) + [""]  # the empty line is no document
    (tmp_path / "c.txt").write_text("\n".join(texts), encoding="utf-8")
    cache = build_token_cache(tmp_path / "c.txt", tokenizer, tmp_path / "cache", num_workers=1)
    for documents in (None, np.array([7, 3, 3, 40, 0, 12])):  # a repeated document stays two documents
        indices = range(len(cache)) if documents is None else documents
        expected = list(pack_documents((cache.document(i) for i in indices), 24, bos, eos))
        dataset = PackedDataset(cache, 24, bos, eos, documents)
        assert len(dataset) == len(expected) > 5
        for i in range(len(dataset)):
            for key, value in dataset[i].items():
                assert torch.equal(value, expected[i][key]), (i, key)
        assert torch.equal(dataset[-1]["input_ids"], expected[-1]["input_ids"])
        with pytest.raises(IndexError):
            dataset[len(dataset)]
    restored = pickle.loads(pickle.dumps(dataset))  # as spawned DataLoader workers receive it
    assert len(pickle.dumps(dataset.cache)) < 1000  # the folder, not the memmap's contents
    assert torch.equal(restored[3]["input_ids"], dataset[3]["input_ids"])


def test_split_documents_holds_out_a_seeded_fraction():
    train, valid = split_documents(1000, 0.05, seed=1)
    assert len(valid) == 50 and len(train) == 950
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(1000))
    assert np.array_equal(split_documents(1000, 0.05, seed=1)[1], valid)
    assert not np.array_equal(split_documents(1000, 0.05, seed=2)[1], valid)
    assert len(split_documents(10, 0.01, seed=0)[1]) == 1  # a fraction > 0 holds out at least one
    with pytest.raises(ValueError, match="leaves no document for training"):
        split_documents(1, 0.5, seed=0)


def test_build_pretrain_datasets_with_valid_files_or_a_held_out_fraction(tmp_path, tokenizer):
    texts = _documents(60, seed=3)
    _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts[:50]])
    _write_jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in texts[50:]])
    common = dict(seq_len=32, cache_dir=tmp_path / "cache", num_workers=1)
    train, valid = build_pretrain_datasets(tokenizer, train_files=tmp_path / "train.jsonl", valid_files=[tmp_path / "valid.jsonl"], **common)
    assert len(train.cache) == 50 and len(valid.cache) == 10
    assert train[0]["input_ids"][0] == tokenizer.bos_id  # BOS and EOS come from the tokenizer
    assert valid.n_tokens == sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in texts[50:])

    train, valid = build_pretrain_datasets(tokenizer, train_files=tmp_path / "train.jsonl", valid_fraction=0.2, **common)
    assert train.cache.folder == valid.cache.folder
    assert len(valid.documents) == 10 and not set(valid.documents) & set(train.documents)
    assert build_pretrain_datasets(tokenizer, train_files=tmp_path / "train.jsonl", **common)[1] is None
    with pytest.raises(ValueError, match="not both"):
        build_pretrain_datasets(tokenizer, train_files=tmp_path / "train.jsonl", valid_files=tmp_path / "valid.jsonl", valid_fraction=0.1, **common)


def test_weighted_train_files_pack_each_source_on_its_own_for_the_sampler_to_mix(tmp_path, tokenizer):
    from nanotune.config import DataFile
    from nanotune.data.sampler import MixedDataset

    texts = _documents(40, seed=5)
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:30]])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[30:]])
    common = dict(seq_len=32, cache_dir=tmp_path / "cache", num_workers=1)
    files = [DataFile(str(tmp_path / "a.jsonl"), 0.25), DataFile(str(tmp_path / "b.jsonl"), 0.75)]
    train, valid = build_pretrain_datasets(tokenizer, train_files=files, valid_fraction=0.1, **common)
    assert isinstance(train, MixedDataset) and train.weights == [0.25, 0.75]
    alone = [build_pretrain_datasets(tokenizer, train_files=f.path, valid_fraction=0.1, **common) for f in files]
    assert train.sources.tolist() == [0] * len(alone[0][0]) + [1] * len(alone[1][0])
    for i in range(len(train)):  # a block holds one source's documents: the block of that source alone
        source, offset = int(train.sources[i]), i - int(train.starts[train.sources[i]])
        expected = alone[source][0][offset]
        assert all(torch.equal(train[i][key], expected[key]) for key in expected)
    assert len(valid) == len(alone[0][1]) + len(alone[1][1])  # the held-out fraction of each source
