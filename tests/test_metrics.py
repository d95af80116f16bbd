"""nanotune/metrics.py against BLEU and ROUGE-L worked out by hand (the arithmetic is in each test),
and against sacrebleu / NLTK / rouge-score where they happen to be installed."""

from __future__ import annotations

import math

import pytest

from nanotune.metrics import corpus_bleu, corpus_rouge_l, lcs_length, rouge_l, sentence_bleu, tokenize_text

TOLERANCE = 1e-9


def test_char_tokenizer_drops_whitespace_and_word_tokenizer_splits_on_it():
    assert tokenize_text("脾 主\t运化\n") == ["脾", "主", "运", "化"]
    assert tokenize_text(" the  cat ", tokenize="word") == ["the", "cat"]


def test_character_bleu4_equals_the_hand_computation():
    # hyp 中医理论认为 (6 chars), ref 中医的理论认为 (7 chars)
    #  1-grams: all 6 in the reference                                   p1 = 6/6
    #  2-grams: 中医 医理 理论 论认 认为 -> 中医 理论 论认 认为 match       p2 = 4/5
    #  3-grams: 中医理 医理论 理论认 论认为 -> 理论认 论认为 match         p3 = 2/4
    #  4-grams: 中医理论 医理论认 理论认为 -> 理论认为 matches             p4 = 1/3
    #  c = 6 < r = 7: BP = exp(1 - 7/6)
    bleu = corpus_bleu(["中医理论认为"], ["中医的理论认为"])
    expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)  # = 51.15...
    assert bleu.score == pytest.approx(expected, abs=TOLERANCE)
    assert bleu.precisions == pytest.approx([100, 80, 50, 100 / 3], abs=TOLERANCE)
    assert bleu.brevity_penalty == pytest.approx(math.exp(-1 / 6), abs=TOLERANCE)
    assert (bleu.hypothesis_length, bleu.reference_length) == (6, 7)
    assert round(bleu.score, 2) == 51.15


def test_corpus_bleu_sums_counts_over_sentences_before_dividing():
    # Add the pair 脾胃 / 脾胃: 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams.
    #   p1 = (6+2)/(6+2), p2 = (4+1)/(5+1), p3 = 2/4, p4 = 1/3; c = 8, r = 9: BP = exp(1 - 9/8)
    bleu = corpus_bleu(["中医理论认为", "脾胃"], ["中医的理论认为", "脾胃"])
    expected = 100 * math.exp(1 - 9 / 8) * (1 * 5 / 6 * 2 / 4 * 1 / 3) ** (1 / 4)  # = 53.88...
    assert bleu.score == pytest.approx(expected, abs=TOLERANCE)
    # ... which is not the mean of the sentence scores (脾胃 alone has no 3-gram: BLEU 0).
    assert sentence_bleu("脾胃", "脾胃", smoothing="none").score == 0.0
    assert bleu.score != pytest.approx((51.15 + 0.0) / 2, abs=1)


def test_bleu_clips_repeated_ngrams_and_floor_smoothing_rescues_zero_counts():
    # hyp 的的的的, ref 的确: 的 occurs 4 times but only once in the reference -> p1 = 1/4;
    # no 2-gram matches -> unsmoothed BLEU is 0. Floor smoothing: a zero count becomes 0.1:
    #   p2 = 0.1/3, p3 = 0.1/2, p4 = 0.1/1; c = 4 > r = 2: BP = 1
    assert corpus_bleu(["的的的的"], ["的确"]).score == 0.0
    smoothed = sentence_bleu("的的的的", "的确")
    expected = 100 * (1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** (1 / 4)  # = 8.03...
    assert smoothed.score == pytest.approx(expected, abs=TOLERANCE)
    assert smoothed.brevity_penalty == 1.0


def test_word_bleu_on_space_separated_text():
    # the cat sat on the mat / the cat is on the mat
    #  p1 = 5/6 (sat unmatched), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat),
    #  p4 = 0/3 -> floor 0.1/3; c = r = 6: BP = exp(1 - 6/6) = 1
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    assert corpus_bleu([hyp], [ref], tokenize="word").score == 0.0
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** (1 / 4)  # = 25.41...
    assert sentence_bleu(hyp, ref, tokenize="word").score == pytest.approx(expected, abs=TOLERANCE)


def test_bleu_of_identical_text_is_100_and_of_empty_text_is_0():
    assert corpus_bleu(["肝主疏泄肾藏精"], ["肝主疏泄肾藏精"]).score == pytest.approx(100.0, abs=TOLERANCE)
    assert corpus_bleu([""], ["肝主疏泄"]).score == 0.0


def test_lcs_length_on_known_cases():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS 15.4)
    assert lcs_length(list("气血阴阳平衡"), list("阴阳气血平衡")) == 4  # 气血平衡 or 阴阳平衡
    assert lcs_length([], list("abc")) == 0


def test_rouge_l_equals_the_hand_computation():
    # 中医理论认为 / 中医的理论认为: LCS = 6, P = 6/6, R = 6/7
    #   beta = 1:   F = 2 P R / (R + P)             = 12/13
    #   beta = 1.2: F = 2.44 P R / (R + 1.44 P)
    P, R = 1.0, 6 / 7
    assert rouge_l("中医理论认为", "中医的理论认为") == pytest.approx(100 * 12 / 13, abs=TOLERANCE)
    assert rouge_l("中医理论认为", "中医的理论认为", beta=1.2) == pytest.approx(
        100 * 2.44 * P * R / (R + 1.44 * P), abs=TOLERANCE
    )
    # 气血阴阳平衡 / 阴阳气血平衡: LCS = 4, P = R = 4/6, F = 4/6
    assert rouge_l("气血 阴阳 平衡", "阴阳气血平衡") == pytest.approx(100 * 4 / 6, abs=TOLERANCE)
    # word level: the cat sat on the mat / the cat is on the mat: LCS = the cat on the mat = 5
    assert rouge_l("the cat sat on the mat", "the cat is on the mat", tokenize="word") == pytest.approx(
        100 * 5 / 6, abs=TOLERANCE
    )
    assert rouge_l("", "中医") == 0.0


def test_corpus_rouge_l_is_the_mean_of_sentence_scores():
    score = corpus_rouge_l(["中医理论认为", "气血阴阳平衡"], ["中医的理论认为", "阴阳气血平衡"])
    assert score == pytest.approx(100 * (12 / 13 + 4 / 6) / 2, abs=TOLERANCE)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="tokenize"):
        tokenize_text("a", tokenize="jieba")


# --- independent implementations, only where already installed (never installed for the tests) ----

CASES = [("中医理论认为", "中医的理论认为"), ("脾胃是后天之本", "脾胃为后天之本也"), ("肝主疏泄", "肾藏精")]


def test_corpus_bleu_equals_sacrebleu_char_tokenisation():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = [h for h, _ in CASES], [r for _, r in CASES]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score
    assert corpus_bleu(hyps, refs).score == pytest.approx(expected, abs=1e-6)


def test_corpus_bleu_equals_nltk_corpus_bleu():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hyps = [list(h) for h, _ in CASES]
    refs = [[list(r)] for _, r in CASES]
    expected = 100 * bleu_score.corpus_bleu(refs, hyps)
    assert corpus_bleu([h for h, _ in CASES], [r for _, r in CASES]).score == pytest.approx(expected, abs=1e-6)


def test_rouge_l_equals_rouge_score_on_word_tokens():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    expected = 100 * scorer.score(ref, hyp)["rougeL"].fmeasure
    assert rouge_l(hyp, ref, tokenize="word") == pytest.approx(expected, abs=1e-6)
