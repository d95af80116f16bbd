"""How fast the pretraining data pipeline is, and how much compute packing saves over padding.

Makes a corpus of Chinese + English documents with log-normal lengths (most short, a long tail
longer than a block), then prints:

* tokenising into the cache: tokens/s with the tokenizer's batch encoder in this process, and
  with worker processes; and how long a second run takes to find the cache;
* packing from the cache: tokens/s of `PackedDataset` by random index (what training does), and
  of the readable `pack_documents` reference;
* the fraction of real (non-padding) tokens: packing, versus padding each document to the longest
  in its batch (batches drawn by `GlobalBatchSampler`, shuffled, and with `group_by_length`),
  documents longer than `seq_len` being cut into `seq_len` pieces so that no token is dropped.

    python benchmarks/data_pipeline.py --n-docs 20000 --seq-len 1024
    python benchmarks/data_pipeline.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import corpus_lines, train_sentencepiece  # noqa: E402

from nanotune.data.pretrain import PackedDataset, build_token_cache, pack_documents  # noqa: E402
from nanotune.data.sampler import GlobalBatchSampler  # noqa: E402
from nanotune.tokenizer import Tokenizer  # noqa: E402

LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2_tokenizer.model"


def make_corpus(path: Path, n_docs: int, seed: int) -> None:
    """A .jsonl corpus: each document is a log-normal number of sentences (median 8, long tail)."""
    rng = random.Random(seed)
    sentences = corpus_lines(5000, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            n_sentences = min(400, max(1, int(rng.lognormvariate(math.log(8), 1.0))))
            text = " ".join(rng.choices(sentences, k=n_sentences))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def padded_real_fraction(lengths: np.ndarray, seq_len: int, batch_size: int, group_by_length: bool, seed: int) -> float:
    """Real tokens / batch positions when each batch is padded to its longest sequence.

    Documents longer than seq_len are cut into seq_len pieces (no token dropped); batches are
    drawn by the training sampler itself, for one epoch.
    """
    pieces = np.concatenate([np.minimum(seq_len, n - np.arange(0, n, seq_len)) for n in lengths])  # (n_pieces,)
    sampler = GlobalBatchSampler(
        len(pieces), global_batch_size=batch_size, micro_batch_size=batch_size, seed=seed,
        lengths=pieces, group_by_length=group_by_length,
    )
    real = padded = 0
    for _, micro_batches in zip(range(sampler.steps_per_epoch), sampler):
        batch_lengths = pieces[micro_batches[0]]
        real += batch_lengths.sum()
        padded += batch_lengths.max() * batch_size
    return float(real / padded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-docs", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch for the padding comparison")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the second tokenising run")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default: shared LLaMA-2, else a tiny trained one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer_path = args.tokenizer or (LLAMA2_TOKENIZER if LLAMA2_TOKENIZER.exists() else None)
        if tokenizer_path is None:
            tokenizer_path = train_sentencepiece(folder / "spm", vocab_size=2000, lines=corpus_lines(5000))
        tokenizer = Tokenizer.from_file(tokenizer_path)
        corpus = folder / "corpus.jsonl"
        make_corpus(corpus, args.n_docs, args.seed)

        cache, batch_seconds = timed(lambda: build_token_cache(corpus, tokenizer, folder / "cache_batch"))
        _, worker_seconds = timed(lambda: build_token_cache(corpus, tokenizer, folder / "cache_workers", num_workers=args.workers))
        _, hit_seconds = timed(lambda: build_token_cache(corpus, tokenizer, folder / "cache_batch"))

        dataset = PackedDataset(cache, args.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        order = np.random.default_rng(args.seed).permutation(len(dataset))
        _, pack_seconds = timed(lambda: [dataset[int(i)] for i in order])
        n_reference = min(len(dataset), 200)  # the token-by-token reference is slow: time a prefix
        documents = (cache.document(i) for i in range(len(cache)))
        reference = pack_documents(documents, args.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        _, reference_seconds = timed(lambda: [next(reference) for _ in range(n_reference)])

        stream_lengths = cache.document_lengths() + 2  # with BOS and EOS
        figures = {
            "device": f"{os.cpu_count()} CPU cores",
            "tokenizer": f"{Path(tokenizer_path).name} (vocab {tokenizer.vocab_size})",
            "n_documents": len(cache),
            "n_tokens": cache.n_tokens,
            "corpus_mb": round(corpus.stat().st_size / 1e6, 2),
            "document_tokens_median": int(np.median(stream_lengths)),
            "document_tokens_p99": int(np.percentile(stream_lengths, 99)),
            "document_tokens_max": int(stream_lengths.max()),
            "tokenise_batch_encoder_tokens_per_s": round(cache.n_tokens / batch_seconds),
            f"tokenise_{args.workers}_processes_tokens_per_s": round(cache.n_tokens / worker_seconds),
            "cache_hit_seconds": round(hit_seconds, 3),
            "seq_len": args.seq_len,
            "n_blocks": len(dataset),
            "pack_from_cache_tokens_per_s": round(len(dataset) * args.seq_len / pack_seconds),
            "pack_documents_reference_tokens_per_s": round(n_reference * args.seq_len / reference_seconds),
            "real_token_fraction_packed": round(dataset.real_token_fraction(), 4),
            "real_token_fraction_padded_random_order": round(
                padded_real_fraction(stream_lengths, args.seq_len, args.batch_size, group_by_length=False, seed=args.seed), 4),
            "real_token_fraction_padded_group_by_length": round(
                padded_real_fraction(stream_lengths, args.seq_len, args.batch_size, group_by_length=True, seed=args.seed), 4),
            "padding_batch_size": args.batch_size,
        }
    if args.json:
        print(json.dumps(figures))
        return
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:,}" if isinstance(value, (int, float)) else f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
