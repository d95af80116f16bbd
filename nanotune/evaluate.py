"""How good is a model on held-out conversations: loss and perplexity, and for generation tasks
BLEU-4 and ROUGE-L of what it writes.

    python -m nanotune.evaluate --model DIR [--adapter LORA] --data dev.jsonl [--template NAME] [--generate]

The template and the stop tokens default to the ones the model was trained with, read from its
folder as chat does (chat.py, "Loading a model to talk to"); `--adapter` evaluates a LoRA adapter
on its base model without merging it.

Loss: every conversation is encoded exactly as for training (`sft.encode_conversation`: the same
template, the same -100 masking), so the figure is the training loss on unseen data, per target
token of the whole set:

    loss = (sum of the cross-entropies of all reply tokens) / (number of reply tokens)
    perplexity = exp(loss)

Summing first and dividing once weighs every token equally; the mean of per-batch means would
give short conversations the weight of long ones.

Generation (`--generate`): for each conversation the prompt is everything before its last
assistant turn, laid out with the assistant's header (`add_generation_prompt=True`), and the
reference is that last assistant turn. The model answers greedily; predictions go to JSONL
(`{"prompt", "reference", "prediction"}`, the prompt as rendered text) and are scored with
character-level BLEU-4 and ROUGE-L (see `metrics.py`; both 0..100).

Preference pairs (`--pairs pairs.jsonl`, any format of data/preference.py): how often the model
prefers the chosen reply. A reward model (a `*ForSequenceClassification` folder from train_rm.py)
compares its scores; a causal LM compares the summed log-probs of the two replies. Prints the
accuracy (ties count as wrong) and the mean margin, chosen minus rejected.

`evaluate_model` is the same thing as a function, for scripts and the training loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .chat import add_model_arguments, clean_reply, load_for_inference
from .cli import at_least, check_model_folder, resolve_device, run_main
from .data.collate import PaddingCollator
from .data.records import DataError
from .data.sft import encode_conversation, encode_prompt
from .data.templates import Template, get_template
from .files import write_lines_atomically
from .generate import generate_batch
from .loss import IGNORE_INDEX
from .metrics import corpus_bleu, corpus_rouge_l


def evaluate_model(
    model,
    tokenizer,
    conversations: list[list[dict]],
    template: str | Template,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    generate: bool = False,
    max_new_tokens: int = 64,
    predictions_path: str | os.PathLike | None = None,
    metric_tokenize: str = "char",
    progress: bool = True,
    stop_ids: list[int] | None = None,
) -> dict:
    """{"loss", "perplexity", "n_conversations", "n_target_tokens", "n_skipped"}, and with
    `generate` also {"bleu4", "rougeL", "n_predictions"}; predictions are written to
    `predictions_path` when given. `stop_ids`: where a generated reply ends (default: the
    template's EOS and stop pieces). The model's training mode is restored afterwards."""
    template = get_template(template)
    result = conversation_loss(model, tokenizer, conversations, template, batch_size=batch_size,
                               max_length=max_length, progress=progress)
    if generate:
        predictions = generate_predictions(model, tokenizer, conversations, template, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, progress=progress, stop_ids=stop_ids)
        if predictions_path is not None:
            write_jsonl(predictions_path, predictions)
        result.update(score_predictions(predictions, tokenize=metric_tokenize))
        result["n_predictions"] = len(predictions)
    return result


def conversation_loss(
    model, tokenizer, conversations, template, batch_size: int = 8, max_length: int | None = None, progress: bool = True
) -> dict:
    """Summed reply-token cross-entropy over all conversations / number of reply tokens, and exp of it."""
    samples = [encode_conversation(m, tokenizer, template, max_length=max_length) for m in conversations]
    kept = [s for s in samples if s is not None]  # None: dropped by truncation or nothing to learn
    kept.sort(key=lambda s: len(s["input_ids"]))  # similar lengths together: less padding
    collate = PaddingCollator(tokenizer.pad_id)
    device = next(model.parameters()).device
    total_loss, n_target_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = range(0, len(kept), batch_size)
            for start in tqdm(batches, desc="loss", unit="batch", disable=not progress, file=sys.stderr):
                batch = collate(kept[start : start + batch_size])
                labels = batch["labels"].to(device)  # (B, T), already shifted, -100 = no loss
                total_loss += float(model(batch["input_ids"].to(device), labels=labels))
                n_target_tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if n_target_tokens == 0:
        raise DataError("no conversation has a reply token to score (all empty, or dropped by the max length)")
    loss = total_loss / n_target_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "n_conversations": len(kept),
        "n_target_tokens": n_target_tokens,
        "n_skipped": len(samples) - len(kept),
    }


def split_prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, the text of that turn)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a conversation to evaluate must end with an assistant turn (the reference)")
    return messages[:-1], messages[-1]["content"]


def generate_predictions(
    model, tokenizer, conversations, template, batch_size: int = 8, max_new_tokens: int = 64, progress: bool = True,
    stop_ids: list[int] | None = None, **sampling,
) -> list[dict]:
    """{"prompt", "reference", "prediction"} for every conversation, in the conversations' order.

    Prompts are generated in batches of similar length (left-padded), greedy unless `sampling`
    says otherwise (temperature, top_k, top_p, repetition_penalty, generator)."""
    template = get_template(template)
    prompts, references, prompt_ids = [], [], []
    for messages in conversations:
        prompt_messages, reference = split_prompt_and_reference(messages)
        prompts.append(template.render(prompt_messages, add_generation_prompt=True))
        references.append(reference)
        prompt_ids.append(encode_prompt(prompt_messages, tokenizer, template))
    stop_ids = stop_ids if stop_ids is not None else template.stop_token_ids(tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    predictions: list[str] = [""] * len(prompt_ids)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=not progress, file=sys.stderr):
        indices = order[start : start + batch_size]
        outputs = generate_batch(model, [prompt_ids[i] for i in indices], max_new_tokens, eos_id=stop_ids,
                                 pad_id=tokenizer.pad_id, **sampling)
        for i, new_ids in zip(indices, outputs):
            predictions[i] = clean_reply(tokenizer.decode(new_ids), template.stop_strings)
    return [{"prompt": p, "reference": r, "prediction": h} for p, r, h in zip(prompts, references, predictions)]


def score_predictions(predictions: list[dict], tokenize: str = "char") -> dict:
    """{"bleu4", "rougeL"} (0..100) of the predictions against their references."""
    hypotheses = [p["prediction"] for p in predictions]
    references = [p["reference"] for p in predictions]
    return {
        "bleu4": corpus_bleu(hypotheses, references, tokenize=tokenize).score,
        "rougeL": corpus_rouge_l(hypotheses, references, tokenize=tokenize),
    }


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """One JSON object per line, written to a temporary name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lines_atomically(path, (json.dumps(record, ensure_ascii=False) for record in records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanotune.evaluate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", nargs="+", help="conversation files (any format of data/formats.py)")
    parser.add_argument("--pairs", nargs="+", help="preference pairs to score instead (any format of data/preference.py)")
    parser.add_argument("--format", default="auto", help="data format (default: detected from the first record)")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--max-length", type=at_least(1), default=None,
                        help="truncate conversations for the loss, as in training")
    parser.add_argument("--limit", type=at_least(1), default=None, help="evaluate only the first N conversations")
    parser.add_argument("--generate", action="store_true", help="also generate replies and score BLEU-4 / ROUGE-L")
    parser.add_argument("--predictions", default=None, help="write predictions to this JSONL (implies --generate)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=64)
    parser.add_argument("--tokenize", default="char", choices=["char", "word"], help="metric tokens (default char)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: as stored")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)

    from .data.formats import READERS, read_conversations

    if (args.data is None) == (args.pairs is None):
        parser.error("give --data (conversations) or --pairs (preference pairs)")
    if args.pairs is not None:
        return evaluate_pairs_main(args, parser)
    if args.format != "auto" and args.format not in READERS:
        parser.error(f"--format {args.format}: expected auto or one of {', '.join(READERS)}")
    if args.model is None and args.adapter is None:
        parser.error("the following arguments are required: --model (or --adapter, whose config names the base)")
    # Every check that needs no weights comes first, so a mistake costs no model load.
    device = resolve_device(parser, args.device)
    if args.predictions and Path(args.predictions).is_dir():
        parser.error(f"--predictions {args.predictions}: is a directory; give the .jsonl file to write")
    conversations = read_conversations(args.data, format=args.format)
    if not conversations:
        raise DataError(f"{', '.join(args.data)}: no conversations to evaluate")
    if args.limit is not None:
        conversations = conversations[: args.limit]
    loaded = load_for_inference(args, device, getattr(torch, args.dtype) if args.dtype else None)
    result = evaluate_model(
        loaded.model, loaded.tokenizer, conversations, loaded.template, batch_size=args.batch_size,
        max_length=args.max_length, generate=args.generate or args.predictions is not None,
        max_new_tokens=args.max_new_tokens, predictions_path=args.predictions, metric_tokenize=args.tokenize,
        stop_ids=loaded.stop_ids,
    )
    result["template"] = loaded.template.name
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"template       {result['template']}")
    print(f"conversations  {result['n_conversations']} ({result['n_skipped']} skipped)")
    print(f"target tokens  {result['n_target_tokens']}")
    print(f"loss           {result['loss']:.4f}")
    print(f"perplexity     {result['perplexity']:.2f}")
    if "bleu4" in result:
        print(f"BLEU-4 ({args.tokenize})  {result['bleu4']:.2f}")
        print(f"ROUGE-L        {result['rougeL']:.2f}")
    if args.predictions:
        print(f"predictions    {args.predictions}")


def evaluate_pairs_main(args, parser) -> None:
    """`--pairs`: the preference accuracy of a reward model or a causal LM on the pairs."""
    from .checkpoint import load_pretrained, read_config
    from .data.preference import PreferenceCollator, build_preference_dataset
    from .preference import is_reward_model_folder, load_reward_model, score_pairs
    from .tokenizer import Tokenizer

    from .chat import choose_template

    device = resolve_device(parser, args.device)
    if args.model is None:
        parser.error("--pairs needs --model (a reward model or a causal LM folder)")
    check_model_folder(args.model)
    read_config(args.model)
    tokenizer = Tokenizer.from_file(args.model)
    template = choose_template(args.template, tokenizer, [Path(args.model)], check=not args.no_template_check)
    pairs = build_preference_dataset(args.pairs, tokenizer, template, max_length=args.max_length,
                                     format=args.format).samples
    if not pairs:
        raise DataError(f"{', '.join(args.pairs)}: no pairs to score")
    if args.limit is not None:
        pairs = pairs[: args.limit]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    reward = is_reward_model_folder(args.model)
    model = (load_reward_model if reward else load_pretrained)(args.model, dtype=dtype, device=device)
    result = {**score_pairs(model, pairs, PreferenceCollator(tokenizer.pad_id), args.batch_size),
              "scorer": "reward" if reward else "logprob"}
    if args.json:
        print(json.dumps(result))
        return
    print(f"pairs          {result['n_pairs']}")
    print(f"scored by      {'the reward model' if reward else 'summed reply log-probs'}")
    print(f"accuracy       {result['accuracy']:.4f}")
    print(f"mean margin    {result['margin']:.4f}")


if __name__ == "__main__":
    run_main(main)
