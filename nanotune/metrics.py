"""BLEU-4 and ROUGE-L for generated text, scored on characters by default (Chinese has no spaces).

Scoring Chinese by "words" would first need a word segmenter, and every segmenter gives different
figures; characters need nothing and are what Chinese question-generation papers report. So:

* `tokenize="char"` (default): all whitespace removed, every remaining character is a token.
  "脾 主运化" -> ["脾", "主", "运", "化"].
* `tokenize="word"`: split on whitespace, for text that already has spaces (English, or Chinese
  segmented beforehand).

Both metrics return values from 0 to 100 (as sacrebleu prints BLEU and as papers report both).

BLEU (Papineni et al. 2002), as sacrebleu and NLTK's `corpus_bleu` define it, one reference per
hypothesis:
    p_n  = (clipped n-gram matches summed over the corpus) / (hypothesis n-grams summed), n = 1..4
    BP   = 1 if c > r else exp(1 - r / c)  (c, r: total hypothesis and reference lengths)
    BLEU = 100 * BP * exp((log p_1 + ... + log p_4) / 4)
"Clipped": an n-gram counts as matched at most as often as it occurs in the reference.
Corpus BLEU sums the counts first and divides once; it is NOT the mean of sentence BLEUs.
Smoothing: none by default (any p_n = 0 gives BLEU 0, the standard for corpus scores).
`smoothing="floor"` replaces a zero match count by 0.1 (NLTK's SmoothingFunction().method1 with
its default epsilon, sacrebleu's "floor" method): for sentence-level scores, where a short
sentence with no matching 4-gram would otherwise score 0 however good it is.

ROUGE-L (Lin 2004): from the longest common subsequence (LCS) of hypothesis and reference,
    P = LCS / len(hypothesis), R = LCS / len(reference), F = (1 + beta^2) P R / (R + beta^2 P)
with beta = 1 (the F1 of Google's `rouge-score`) by default; pass beta=1.2 for the coco-caption
variant, which leans towards recall. The corpus score is the mean of the sentence F values.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


def tokenize_text(text: str, tokenize: str = "char") -> list[str]:
    """The tokens the metrics compare: characters without whitespace, or whitespace-split words."""
    if tokenize == "char":
        return [ch for ch in text if not ch.isspace()]
    if tokenize == "word":
        return text.split()
    raise ValueError(f"tokenize must be 'char' or 'word', not {tokenize!r}")


# ----------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------


@dataclass
class Bleu:
    """A BLEU score (0..100) with the figures it was made from, to show or to check by hand."""

    score: float
    precisions: list[float]  # p_1 .. p_4, each 0..100 (after smoothing, if any)
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int


def ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: list[str],
    references: list[str],
    tokenize: str = "char",
    max_order: int = 4,
    smoothing: str = "none",
) -> Bleu:
    """Corpus BLEU of `hypotheses` against one reference each; see the module docstring."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if smoothing not in ("none", "floor"):
        raise ValueError(f"smoothing must be 'none' or 'floor', not {smoothing!r}")
    matches = [0] * max_order  # clipped n-gram matches, n = 1..max_order
    totals = [0] * max_order  # n-grams in the hypotheses
    hypothesis_length = reference_length = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_text(hypothesis, tokenize), tokenize_text(reference, tokenize)
        hypothesis_length += len(hyp)
        reference_length += len(ref)
        for n in range(1, max_order + 1):
            hyp_ngrams, ref_ngrams = ngram_counts(hyp, n), ngram_counts(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)

    precisions = []
    for n_matches, n_total in zip(matches, totals):
        if n_total == 0:
            precisions.append(0.0)  # the hypotheses are too short to have any n-gram of this order
        elif n_matches == 0 and smoothing == "floor":
            precisions.append(100.0 * 0.1 / n_total)
        else:
            precisions.append(100.0 * n_matches / n_total)

    if hypothesis_length == 0:
        brevity_penalty = 0.0
    elif hypothesis_length > reference_length:
        brevity_penalty = 1.0
    else:
        brevity_penalty = math.exp(1 - reference_length / hypothesis_length)

    if min(precisions) == 0 or brevity_penalty == 0:
        score = 0.0
    else:
        log_mean = sum(math.log(p / 100.0) for p in precisions) / max_order
        score = 100.0 * brevity_penalty * math.exp(log_mean)
    return Bleu(score, precisions, brevity_penalty, hypothesis_length, reference_length)


def sentence_bleu(hypothesis: str, reference: str, tokenize: str = "char", smoothing: str = "floor") -> Bleu:
    """BLEU of one sentence; smoothed by default, since one missing 4-gram would otherwise give 0."""
    return corpus_bleu([hypothesis], [reference], tokenize=tokenize, smoothing=smoothing)


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (in order, not necessarily adjacent); O(len a * len b)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)  # row i-1 of the dynamic programme; one row is enough
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str, tokenize: str = "char", beta: float = 1.0) -> float:
    """ROUGE-L F-measure (0..100) of one hypothesis against one reference; 0 if either is empty."""
    hyp, ref = tokenize_text(hypothesis, tokenize), tokenize_text(reference, tokenize)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 100.0 * (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def corpus_rouge_l(hypotheses: list[str], references: list[str], tokenize: str = "char", beta: float = 1.0) -> float:
    """The mean sentence ROUGE-L F (0..100) over the corpus."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    return sum(rouge_l(h, r, tokenize, beta) for h, r in zip(hypotheses, references)) / len(hypotheses)
