#!/usr/bin/env bash
# GRPO on a laptop CPU in minutes: a tiny LLaMA learns from a sloppy teacher, then from a checker.
#
#   1. data        900 sums "47 + 8": 400 demonstrated by a teacher who forgets the carry 60% of
#                  the time, 300 GRPO prompts with their true sums, 200 held out (make_data.py)
#   2. tokenizer   a SentencePiece model of the sums (digits split one by one)
#   3. sft         a tiny LLaMA (3 layers, dim 64) from scratch on the demonstrations
#   4. before      held-out accuracy of the SFT model, greedy (evaluate.py)
#   5. grpo        train_grpo.py on the SFT model, reward: exact_number (the true sum or not)
#   6. after       held-out accuracy of the GRPO model, greedy
#   7. report      accuracy before and after (all, with / without a carry), the reward curve, the
#                  minutes -> OUT_DIR/report.json (+ reward_curve.png if matplotlib is installed)
#
#     bash examples/arith_grpo/run.sh [OUT_DIR]        # default OUT_DIR: runs/arith_grpo in the repository
#
# Quick look (or a smoke test): SFT_STEPS=20 GRPO_STEPS=3 bash examples/arith_grpo/run.sh OUT_DIR
# shortens the two training stages; the accuracies are then meaningless.
#
# Works from any directory (a relative OUT_DIR is taken from where you are). Re-running into the
# same OUT_DIR starts over: the stage folders this script writes there are removed first, and
# nothing else in OUT_DIR is touched. Uses the `python` of the active environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../stages.sh
source "$ROOT/examples/stages.sh"  # example_out_dir, start_example, stage
example_out_dir arith_grpo "$@"
cd "$ROOT"

EXAMPLE=examples/arith_grpo
VOCAB_SIZE=272   # SentencePiece's most for this corpus: the 256 byte pieces, the digits, " +", "\n"

rm -rf "$OUT/data" "$OUT/tokenizer" "$OUT/sft" "$OUT/grpo" "$OUT/eval" "$OUT/report.json" \
    "$OUT/reward_curve.png" "$OUT/stage_times.tsv"
mkdir -p "$OUT/eval"
start_example "GRPO arithmetic example"

stage data python "$EXAMPLE/make_data.py" --out "$OUT/data"

stage tokenizer python -m tokenizer_tools.train_spm \
    --input "$OUT/data/corpus.txt" \
    --output "$OUT/tokenizer/arith" \
    --vocab-size "$VOCAB_SIZE" \
    --character-coverage 1.0 \
    --no-progress

stage sft python train_sft.py --config "$EXAMPLE/sft.toml" \
    --output_dir "$OUT/sft" \
    --tokenizer.path "$OUT/tokenizer/arith.model" \
    --data.train_files "$OUT/data/sft.jsonl" \
    ${SFT_STEPS:+--train.max_steps "$SFT_STEPS"}

stage before python "$EXAMPLE/evaluate.py" --model "$OUT/sft/final" \
    --prompts "$OUT/data/heldout.jsonl" --json "$OUT/eval/before.json"

stage grpo python train_grpo.py --config "$EXAMPLE/grpo.toml" \
    --output_dir "$OUT/grpo" \
    --model.path "$OUT/sft/final" \
    --data.train_files "$OUT/data/grpo.jsonl" \
    --data.valid_files "$OUT/data/heldout.jsonl" \
    ${GRPO_STEPS:+--train.max_steps "$GRPO_STEPS"}

stage after python "$EXAMPLE/evaluate.py" --model "$OUT/grpo/final" \
    --prompts "$OUT/data/heldout.jsonl" --json "$OUT/eval/after.json"

echo
python "$EXAMPLE/report.py" --out-dir "$OUT" --load-at-start "$LOAD_AT_START"
