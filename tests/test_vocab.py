"""Growing a model for a merged (Chinese-extended) vocabulary, and the embeddings-only stage after it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import corpus_lines, tiny_model, train_sentencepiece

import train_pt
from nanotune.checkpoint import load_pretrained, save_pretrained
from nanotune.tokenizer import Tokenizer
from nanotune.vocab import old_spelling, resize_token_embeddings
from tokenizer_tools import merge_spm


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A small mostly-English base vocabulary and a Chinese one merged into it."""
    folder = tmp_path_factory.mktemp("vocab")
    lines = corpus_lines(600, seed=4)
    english, chinese = lines[1::2], lines[0::2]
    base = train_sentencepiece(folder / "base", vocab_size=400, lines=english + chinese[:10], name="tokenizer")
    extra = train_sentencepiece(folder / "zh", vocab_size=700, lines=chinese, name="zh")
    assert merge_spm.main(["--base", str(base), "--extra", str(extra), "--output", str(folder / "merged")]) == 0
    chinese_file = folder / "zh.txt"
    chinese_file.write_text("\n".join(chinese) + "\n", encoding="utf-8")
    return {"base": Tokenizer.from_file(base), "merged": Tokenizer.from_file(folder / "merged"),
            "chinese": chinese_file, "folder": folder}


def test_resized_model_keeps_the_logits_of_text_made_of_old_tokens(tokenizers):
    base, merged = tokenizers["base"], tokenizers["merged"]
    assert merged.vocab_size > base.vocab_size
    model = tiny_model(seed=5, vocab_size=base.vocab_size).eval()
    old_ids = torch.tensor([base.encode("the model learns to predict the next token 42.")])
    before = model(old_ids)
    added = resize_token_embeddings(model, merged, old_tokenizer=base)
    assert added == merged.vocab_size - base.vocab_size and model.config.vocab_size == merged.vocab_size
    after = model(old_ids)
    assert after.shape[-1] == merged.vocab_size
    assert torch.equal(after[..., : base.vocab_size], before)


def test_new_rows_start_as_the_mean_of_their_old_spelling(tokenizers):
    base, merged = tokenizers["base"], tokenizers["merged"]
    model = tiny_model(seed=6, vocab_size=base.vocab_size)
    old_embedding = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    resize_token_embeddings(model, merged, old_tokenizer=base)
    checked = 0
    for token_id in range(base.vocab_size, merged.vocab_size):
        spelling = old_spelling(merged.piece_text(token_id), base)
        assert spelling, merged.id_to_piece(token_id)
        assert base.decode(spelling) == merged.piece_text(token_id).lstrip(" ")  # the old spelling of that text
        torch.testing.assert_close(model.model.embed_tokens.weight[token_id], old_embedding[spelling].mean(0))
        torch.testing.assert_close(model.lm_head.weight[token_id], old_head[spelling].mean(0))
        checked += 1
    assert checked == merged.vocab_size - base.vocab_size


def test_without_an_old_tokenizer_new_rows_are_the_mean_of_all_rows(tokenizers):
    base, merged = tokenizers["base"], tokenizers["merged"]
    model = tiny_model(seed=7, vocab_size=base.vocab_size, tie_word_embeddings=True)
    mean = model.model.embed_tokens.weight.detach().mean(0)
    resize_token_embeddings(model, merged)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(model.model.embed_tokens.weight[-1], mean)


def test_embeddings_stage_trains_only_embeddings_and_head_of_the_grown_model_and_loss_falls(tokenizers, tmp_path):
    base_tokenizer, merged = tokenizers["base"], tokenizers["merged"]
    base_dir = tmp_path / "base_model"
    save_pretrained(tiny_model(seed=8, vocab_size=base_tokenizer.vocab_size), base_dir)
    base_tokenizer.save(base_dir)  # the model's own (old) tokenizer spells the new pieces
    output = tmp_path / "embeddings_stage"
    train_pt.main([
        f"--output_dir={output}", f"--model.path={base_dir}", f"--tokenizer.path={tokenizers['folder'] / 'merged'}",
        f"--data.train_files={tokenizers['chinese']}", "--data.seq_len=64", "--data.num_workers=1",
        f"--data.cache_dir={tmp_path / 'cache'}", "--train.trainable=embeddings", "--train.batch_size=4",
        "--train.max_steps=30", "--optim.lr=5e-2", "--optim.schedule=constant", "--log.every_steps=1",
        "--log.progress_bar=false",
    ])
    before, after = load_pretrained(base_dir).state_dict(), load_pretrained(output / "final").state_dict()
    assert after["model.embed_tokens.weight"].shape[0] == merged.vocab_size
    for name in before:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert not torch.equal(after[name][: base_tokenizer.vocab_size], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), f"{name} changed"
    losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
