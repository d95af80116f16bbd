"""Growing a model's vocabulary after the tokenizer gained pieces (Chinese vocabulary extension).

A merged tokenizer keeps every original id, so the old rows of `embed_tokens` and `lm_head` stay
where they are and only rows for the new ids are appended. How those rows start matters: random
rows make the first steps of continued pretraining undo noise. A new piece such as "中医" is text
the old tokenizer could already spell (as "中" + "医", or as bytes), so its row starts as the
mean of the old rows of that spelling: the model's first guess at the new token is close to what
it already understood by the spelling. Where there is no spelling to use (no old tokenizer, or
a piece that is only bytes or special), the row starts as the mean of all old rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import Llama
from .tokenizer import Tokenizer


def old_spelling(piece_text: str, old_tokenizer: Tokenizer) -> list[int]:
    """Ids the old tokenizer gives for the text of a new piece, as it would be read mid-sentence.

    SentencePiece adds a "▁" to the start of every text it encodes. A piece that begins with "▁"
    (a word start) keeps it; for a piece that does not, the stray "▁" the encoder adds is dropped.
    """
    if not piece_text:
        return []
    starts_word = piece_text.startswith(" ")
    ids = old_tokenizer.encode(piece_text[1:] if starts_word else piece_text)
    if not starts_word and ids and old_tokenizer.id_to_piece(ids[0]) == "\u2581":
        ids = ids[1:]
    return ids


@torch.no_grad()
def resize_token_embeddings(model: Llama, tokenizer: Tokenizer, old_tokenizer: Tokenizer | None = None) -> int:
    """Grow `embed_tokens` and `lm_head` to `tokenizer.vocab_size` rows; return how many rows were added.

    Never shrinks: a tokenizer smaller than the embedding is fine (LLaMA checkpoints often pad the
    vocabulary). Old rows are copied bit for bit, so logits on text made of old tokens do not change.
    """
    old_size, new_size = model.config.vocab_size, tokenizer.vocab_size
    if new_size <= old_size:
        return 0
    old_embedding = model.model.embed_tokens.weight  # (V_old, C)
    old_head = model.lm_head.weight  # (V_old, C), the same tensor when tied
    spellings = []
    for token_id in range(old_size, new_size):
        ids = old_spelling(tokenizer.piece_text(token_id), old_tokenizer) if old_tokenizer else []
        spellings.append([i for i in ids if i < old_size])

    def grown(old_rows: torch.Tensor) -> torch.Tensor:
        rows = torch.empty(new_size, old_rows.shape[1], dtype=old_rows.dtype, device=old_rows.device)
        rows[:old_size] = old_rows
        mean_of_all = old_rows.float().mean(dim=0)
        for offset, ids in enumerate(spellings):
            source = old_rows[ids].float().mean(dim=0) if ids else mean_of_all
            rows[old_size + offset] = source.to(old_rows.dtype)
        return rows

    hidden = model.config.hidden_size
    embedding = nn.Embedding(new_size, hidden, device=old_embedding.device, dtype=old_embedding.dtype)
    embedding.weight.copy_(grown(old_embedding))
    embedding.weight.requires_grad_(old_embedding.requires_grad)
    model.model.embed_tokens = embedding
    if model.config.tie_word_embeddings:
        model.lm_head.weight = embedding.weight
    else:
        head = nn.Linear(hidden, new_size, bias=False, device=old_head.device, dtype=old_head.dtype)
        head.weight.copy_(grown(old_head))
        head.weight.requires_grad_(old_head.requires_grad)
        model.lm_head = head
    model.config.vocab_size = new_size
    return new_size - old_size
