#!/usr/bin/env bash
# The whole BELLE path at toy scale, on the CPU, in a few minutes:
#
#   1. tokenizer   train a 3000-piece SentencePiece BPE model on the corpus (LLaMA's settings)
#   2. pretrain    a tiny LLaMA (4 layers, dim 256) from scratch on the packed corpus
#   3. convert     the QG records to conversations; the first records become the dev set
#   4. sft         fine-tune the pretrained model on passage + answer -> question
#   5. before      the pretrained model, prompted with the SFT template, writes the dev questions
#   6. after       the SFT model writes the same questions (greedy both times)
#   7. pairs       preference pairs from the QG data: the real question chosen, a near-miss about another passage rejected
#   8. dpo         DPO from the SFT model on the pairs (shared prompt, precomputed reference)
#   9. pref_*      held-out preference accuracy of the SFT and the DPO model; the DPO model's dev questions
#  10. report      character BLEU-4 and ROUGE-L of both, the losses and the minutes -> report.json
#
#     bash examples/tcm_qg/run.sh [OUT_DIR]        # default OUT_DIR: runs/tcm_qg in the repository
#
# Quick look (or a smoke test): PT_STEPS=5 SFT_STEPS=5 bash examples/tcm_qg/run.sh OUT_DIR shortens the two
# training stages (defaults: the max_steps of pt.toml and sft.toml), DPO_STEPS the preference stage;
# the scores are then meaningless.
#
# Works from any directory (a relative OUT_DIR is taken from where you are). Re-running into the
# same OUT_DIR starts over: the stage folders this script writes there are removed first, and
# nothing else in OUT_DIR is touched. Uses the `python` of the active environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../stages.sh
source "$ROOT/examples/stages.sh"  # example_out_dir, start_example, stage
example_out_dir tcm_qg "$@"
cd "$ROOT"

EXAMPLE=examples/tcm_qg
VOCAB_SIZE=3000     # enough for the domain's multi-character terms; small enough for a tiny model
DEV_RECORDS=25      # the first 25 records (55 questions, 13 entities) are the dev set; see README.md
TEMPLATE=belle      # the SFT layout; the "before" model is prompted with the very same text
MAX_NEW_TOKENS=40   # a question is ~7 tokens; the pretrained model rambles until this limit

# Start clean: only the folders and files this script writes.
rm -rf "$OUT/tokenizer" "$OUT/pt" "$OUT/data" "$OUT/sft" "$OUT/dpo" "$OUT/eval" "$OUT/report.json" \
    "$OUT/stage_times.tsv" "$OUT/preference_times.tsv"
mkdir -p "$OUT/eval"
start_example "TCM question generation example"

# Character coverage 1.0: every character of the corpus gets a piece of its own, none is spelled in
# bytes. (The QG passages use only characters of the corpus; the instruction line around them spells
# its two characters that are not in the corpus, 文 and 案, in UTF-8 bytes, the same in SFT and in
# generation.)
stage tokenizer python -m tokenizer_tools.train_spm \
    --input "$EXAMPLE/data/corpus.txt" \
    --output "$OUT/tokenizer/tcm" \
    --vocab-size "$VOCAB_SIZE" \
    --character-coverage 1.0 \
    --no-progress

stage pretrain python train_pt.py --config "$EXAMPLE/pt.toml" \
    --output_dir "$OUT/pt" \
    --tokenizer.path "$OUT/tokenizer/tcm.model" \
    ${PT_STEPS:+--train.max_steps "$PT_STEPS"}

stage convert python -m nanotune.data.convert --format tcm_qg \
    --input "$EXAMPLE/data/tcm_qg.json" \
    --output "$OUT/data/qg_train.jsonl" \
    --dev-output "$OUT/data/qg_dev.jsonl" \
    --dev-size "$DEV_RECORDS"

stage sft python train_sft.py --config "$EXAMPLE/sft.toml" \
    --output_dir "$OUT/sft" \
    --model.path "$OUT/pt/final" \
    --data.train_files "$OUT/data/qg_train.jsonl" \
    --data.valid_files "$OUT/data/qg_dev.jsonl" \
    --data.template "$TEMPLATE" \
    ${SFT_STEPS:+--train.max_steps "$SFT_STEPS"}

# evaluate MODEL NAME: dev loss, greedy questions and their scores -> $OUT/eval/NAME.json (+ predictions)
evaluate() {
    python -m nanotune.evaluate --model "$1" --data "$OUT/data/qg_dev.jsonl" --template "$TEMPLATE" \
        --batch-size 16 --max-new-tokens "$MAX_NEW_TOKENS" \
        --predictions "$OUT/eval/$2.predictions.jsonl" --json >"$OUT/eval/$2.json.tmp"
    mv "$OUT/eval/$2.json.tmp" "$OUT/eval/$2.json"  # never a half-written result
}
stage before evaluate "$OUT/pt/final" before
stage after evaluate "$OUT/sft/final" after

# Stage three: preference pairs and DPO. Their minutes go to a file of their own (report.json's
# "preference" section); the total counts every stage.
TIMES="$OUT/preference_times.tsv"
make_pairs() {
    python "$EXAMPLE/make_pairs.py" --input "$OUT/data/qg_train.jsonl" --output "$OUT/data/pairs_train.jsonl"
    python "$EXAMPLE/make_pairs.py" --input "$OUT/data/qg_dev.jsonl" --output "$OUT/data/pairs_dev.jsonl"
}
stage pairs make_pairs
stage dpo python train_dpo.py --config "$EXAMPLE/dpo.toml" \
    --output_dir "$OUT/dpo" \
    --model.path "$OUT/sft/final" \
    --data.train_files "$OUT/data/pairs_train.jsonl" \
    --data.valid_files "$OUT/data/pairs_dev.jsonl" \
    --data.cache_dir "$OUT/dpo/cache" \
    --data.template "$TEMPLATE" \
    ${DPO_STEPS:+--train.max_steps "$DPO_STEPS"}

# preference MODEL NAME: how often MODEL gives the chosen question the higher log-prob -> $OUT/eval/NAME.json
preference() {
    python -m nanotune.evaluate --model "$1" --pairs "$OUT/data/pairs_dev.jsonl" --template "$TEMPLATE" \
        --batch-size 16 --json >"$OUT/eval/$2.json.tmp"
    mv "$OUT/eval/$2.json.tmp" "$OUT/eval/$2.json"
}
stage pref_sft preference "$OUT/sft/final" pref_sft
stage pref_dpo preference "$OUT/dpo/final" pref_dpo
stage after_dpo evaluate "$OUT/dpo/final" after_dpo

echo
python "$EXAMPLE/report.py" --out-dir "$OUT" --records "$EXAMPLE/data/tcm_qg.json" --dev-records "$DEV_RECORDS" \
    --load-at-start "$LOAD_AT_START"
