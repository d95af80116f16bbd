"""Tiny models and tokenizers built inside the tests (nothing is downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from nanotune.model import Llama, LlamaConfig

# Chinese and English sentences to train tiny tokenizers on; the words repeat so BPE finds merges.
_ZH_WORDS = "中医 理论 认为 人体 气血 阴阳 平衡 脾胃 是 后天 之 本 肝 主 疏泄 肾 藏 精 心 主 血脉 肺 主 气 司 呼吸 治疗 方法 包括 针灸 推拿 汤药 食疗".split()
_EN_WORDS = "the model learns to predict the next token from the tokens before it and training makes the loss fall over many steps".split()


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Mixed Chinese / English lines with digits and punctuation (deterministic)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 2 == 0:
            words = rng.choices(_ZH_WORDS, k=rng.randint(5, 20))
            lines.append("".join(words) + rng.choice(["。", "，", "？", "！"]))
        else:
            words = rng.choices(_EN_WORDS, k=rng.randint(5, 20))
            lines.append(" ".join(words).capitalize() + f" {rng.randint(0, 999)}.")
    return lines


def train_sentencepiece(folder: Path, vocab_size: int = 400, lines: list[str] | None = None, name: str = "tokenizer") -> Path:
    """A LLaMA-like SentencePiece BPE model (byte fallback, dummy prefix, identity normaliser)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text_file = folder / f"{name}_corpus.txt"
    text_file.write_text("\n".join(lines or corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(text_file),
        model_prefix=str(folder / name),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder / f"{name}.model"


def tiny_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(seed: int = 0, packed_attention: str = "auto", loss_chunk_tokens: int = 1024, **overrides) -> Llama:
    """A seeded tiny Llama; `overrides` change its LlamaConfig, the two options are Llama's own."""
    torch.manual_seed(seed)
    model = Llama(tiny_config(**overrides), packed_attention=packed_attention, loss_chunk_tokens=loss_chunk_tokens)
    model.init_weights(seed)
    return model


def hf_llama_from(model: Llama):
    """The transformers LlamaForCausalLM with the same weights (the oracle)."""
    import transformers

    hf_config = transformers.LlamaConfig(**model.config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing) or not missing, missing
    return hf


def three_packed_documents(seed: int = 1, vocab_size: int = 256):
    """Documents of 7, 12 and 5 random tokens, and the same packed into one row.

    Returns (documents, packed (1, 24), document_ids (1, 24)): what packed pretraining feeds the model.
    """
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(0, vocab_size, (n,), generator=generator) for n in (7, 12, 5)]
    packed = torch.cat(documents)[None]  # (1, 24)
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(documents)])[None]  # (1, 24)
    return documents, packed, document_ids


# Messages of a conversation, as the SFT formats and templates take them.
def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}
