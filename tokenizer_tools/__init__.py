"""Tools to extend a LLaMA vocabulary for a new language (the Chinese-LLaMA / BELLE recipe).

The original LLaMA vocabulary has few Chinese characters, so most Chinese text is spelled in
byte tokens (2 to 3 per character). The fix takes three steps, one module each, every one runnable
with `python -m tokenizer_tools.<name> --help`:

* `train_spm`  train a SentencePiece BPE model on text of the new language, with LLaMA's settings
               (identity normalisation, dummy "▁" prefix, byte fallback), so its pieces fit LLaMA's.
* `merge_spm`  append the pieces LLaMA lacks to LLaMA's `tokenizer.model`, leaving every original
               id, score and type where it was, and write the HF `tokenizer.json` twin.
* `compare`    measure tokenizers side by side on a text: tokens per line, characters per token,
               round trip, unknown and byte-fallback tokens, speed.

Then the embeddings grow to the new vocabulary and their new rows are trained (`train_pt.py` with
`trainable = "embeddings"`), before ordinary fine-tuning.
"""
