"""One Tokenizer over SentencePiece and tokenizers; the SentencePiece -> tokenizer.json conversion."""

import pytest
from helpers import corpus_lines, train_sentencepiece

from nanotune.tokenizer import Tokenizer, TokenizerError, write_hf_tokenizer_files

TEXTS = [
    "中医理论认为人体气血阴阳平衡。",
    "Hello world, the model learns 123 tokens.",
    "  leading spaces and   inner   runs of spaces ",
    "混合 mixed 文本 text！？ 数字 2024 年",
    "罕见字：龘靐齉 and emoji 🙂",  # characters outside the training data: byte fallback
    "line one\nline two\ttab",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    model_file = train_sentencepiece(folder, vocab_size=500)
    model_file.rename(folder / "tokenizer.model")
    write_hf_tokenizer_files(folder / "tokenizer.model", folder)
    return folder


def test_sentencepiece_and_tokenizer_json_give_the_same_ids_and_round_trip(tokenizer_folder):
    spm = Tokenizer.from_file(tokenizer_folder / "tokenizer.model")
    hf = Tokenizer.from_file(tokenizer_folder / "tokenizer.json")
    assert (spm.kind, hf.kind) == ("sentencepiece", "hf")
    assert spm.vocab_size == hf.vocab_size == 500
    assert (spm.bos_id, spm.eos_id) == (hf.bos_id, hf.eos_id) == (1, 2)
    for text in TEXTS + corpus_lines(200, seed=7):
        ids = spm.encode(text)
        assert hf.encode(text) == ids, text
        assert spm.decode(ids) == text
        assert hf.decode(ids) == text


def test_encode_adds_bos_and_eos_only_when_asked(tokenizer_folder):
    tokenizer = Tokenizer.from_file(tokenizer_folder)
    plain = tokenizer.encode("中医")
    assert tokenizer.encode("中医", bos=True, eos=True) == [1] + plain + [2]
    assert tokenizer.encode_batch(["中医", "气血"], eos=True) == [plain + [2], tokenizer.encode("气血") + [2]]
    assert tokenizer.decode([1] + plain + [2]) == "中医"


def test_transformers_reads_the_converted_tokenizer(tokenizer_folder):
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    ours = Tokenizer.from_file(tokenizer_folder)
    for text in TEXTS[:4]:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text, bos=True)


def test_piece_text_and_lookup(tokenizer_folder):
    tokenizer = Tokenizer.from_file(tokenizer_folder)
    piece_id = tokenizer.encode("the")[0]
    assert tokenizer.id_to_piece(piece_id) == "\u2581the"
    assert tokenizer.piece_text(piece_id) == " the"
    assert tokenizer.piece_to_id("\u2581the") == piece_id
    assert tokenizer.piece_to_id("not-a-piece-at-all") is None
    assert tokenizer.piece_text(tokenizer.bos_id) == ""


def test_save_writes_both_formats(tokenizer_folder, tmp_path):
    Tokenizer.from_file(tokenizer_folder / "tokenizer.model").save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").exists()
    assert Tokenizer.from_file(tmp_path / "out" / "tokenizer.json").encode(TEXTS[0]) == Tokenizer.from_file(
        tokenizer_folder
    ).encode(TEXTS[0])


def test_missing_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="broken.model: not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "broken.model")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "absent.json")


def test_real_llama2_tokenizer(llama2_tokenizer_path, tmp_path):
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path)
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.id_to_piece(1) == "<s>" and tokenizer.id_to_piece(2) == "</s>"
    assert tokenizer.encode("Hello world") == [15043, 3186]
    write_hf_tokenizer_files(llama2_tokenizer_path, tmp_path)
    hf = Tokenizer.from_file(tmp_path / "tokenizer.json")
    for text in TEXTS + corpus_lines(100, seed=3):
        assert hf.encode(text) == tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
