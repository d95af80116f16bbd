"""Talk to a model in the terminal: `python -m nanotune.chat --model DIR [--adapter LORA] [--template NAME]`.

Each line you type is one user message. The whole conversation so far (system prompt, earlier
exchanges, the new message) is laid out by the chat template with the assistant's header added
(`render(..., add_generation_prompt=True)`) and tokenised by the same rules as the training data
(`sft.encode_prompt`: BOS/EOS are the tokenizer's ids, never the text "<s>"), the model writes a
reply, and the reply joins the conversation. The model keeps no state between turns: it re-reads
the conversation every time, which is what a chat model is trained to do.

The template and the stop tokens are, by default, the ones the model was trained with (read from
its folder: see "Loading a model to talk to" below); `--template` chooses another, and
`--adapter` talks to a LoRA adapter on its base model without merging it.

Commands: `/reset` starts a new conversation (the system prompt stays), `/exit` (or end of input,
Ctrl-D) quits. With `--verbose` the text of every prompt is printed to stderr, to see exactly what
the model is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .checkpoint import CheckpointError
from .cli import at_least, check_model_folder, positive_float, probability, resolve_device, run_main
from .config import ConfigError
from .data.sft import encode_prompt
from .data.templates import TEMPLATES, Template, generation_stop_ids, get_template
from .generate import generate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ChatSession:
    """A conversation with a model: the messages so far, and a reply to each new user message."""

    def __init__(
        self,
        model,
        tokenizer,
        template: str | Template = "llama2",
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        log: TextIO | None = None,
        stop_ids: list[int] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(template)
        # Where a reply ends: the model folder's ids (`stop_ids_for`), or the template's EOS and stop pieces.
        self.stop_ids = stop_ids if stop_ids is not None else self.template.stop_token_ids(tokenizer)
        self.system = system
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty)
        device = next(model.parameters()).device
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.log = log  # where to show each prompt's text (--verbose), or None
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the exchanges; keep the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> str:
        """The model's answer to `user_text` given everything said before; it joins the history."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        messages, prompt_ids = self._fit_context(messages)
        if self.log is not None:
            rendered = self.template.render(messages, add_generation_prompt=True)
            header = f"--- prompt ({len(prompt_ids)} tokens) ---"
            print(f"{header}\n{rendered}\n--- end of prompt ---", file=self.log, flush=True)
        new_ids = generate(
            self.model, prompt_ids, eos_id=self.stop_ids, generator=self.generator,
            **self.sampling,
        )
        text = clean_reply(self.tokenizer.decode(new_ids), self.template.stop_strings)
        if text:
            self.messages = messages + [{"role": "assistant", "content": text}]
        else:
            # Templates reject empty messages, so an empty reply cannot join the history: the
            # exchange is forgotten, and the conversation stays as it was before it.
            self.messages = messages[:-1]
        return text

    def _fit_context(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """Drop the oldest exchanges (never the system prompt or the new message) until the prompt
        and the reply fit in the model's `max_position_embeddings`."""
        limit = self.model.config.max_position_embeddings - self.sampling["max_new_tokens"]
        prompt_ids = encode_prompt(messages, self.tokenizer, self.template)
        first_turn = 1 if messages[0]["role"] == "system" else 0
        while len(prompt_ids) > limit and len(messages) - first_turn > 1:
            messages = messages[:first_turn] + messages[first_turn + 2:]
            prompt_ids = encode_prompt(messages, self.tokenizer, self.template)
            if self.log is not None:
                print("(oldest exchange dropped to fit the context window)", file=self.log, flush=True)
        return messages, prompt_ids


def clean_reply(text: str, stop_strings: Iterable[str] = ()) -> str:
    """The reply text cut at the first stop string (for end markers that are not one token in this
    vocabulary, so generation could not stop on them) and stripped of surrounding whitespace."""
    for stop in stop_strings:
        position = text.find(stop)
        if position >= 0:
            text = text[:position]
    return text.strip()


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO, show_prompt: bool = False) -> None:
    """Answer each line of `lines` until `/exit` or the end of the input."""
    if show_prompt:
        print("Type a message; /reset starts over, /exit quits.", file=out, flush=True)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        reply = session.reply(text)
        print(f"assistant: {reply}" if reply else "assistant: (empty reply)", file=out, flush=True)


def _interactive_lines() -> Iterable[str]:
    while True:
        try:
            yield input("user: ")
        except EOFError:
            print()
            return


# ----------------------------------------------------------------------------------------------
# Loading a model to talk to (shared with evaluate.py)
# ----------------------------------------------------------------------------------------------
# What chat and evaluate share: a trained model (and optionally a LoRA adapter) loaded for
# inference, prompted with the template it was trained with and stopped where its replies end.
#
# A fine-tuned model answers well only in the layout it was trained on, so the template travels
# with the model: every `final/` nanotune writes holds `training_config.toml` (its `[data] template`)
# and, for a full model, `generation_config.json` (`eos_token_id`: the template's end-of-turn token
# first). The tools read them back, looking in the adapter folder first, then the model folder:
#
#     template   --template NAME: that one, checked against the folder's chat_template as training
#                checks it (--no-template-check skips the check); else training_config.toml's
#                `[data] template`; else "auto": the built-in template that renders as the folder's
#                chat_template (or the vocabulary's default without one, see data/template_check.py)
#     stop ids   generation_config.json's `eos_token_id` (one id or a list), then the template's
#                end-of-turn and stop tokens (`generation_stop_ids`)
#     adapter    --adapter DIR: the base is --model, or, without it, the folder the adapter's
#                `adapter_config.json` names (`base_model_name_or_path`); the adapter is loaded with
#                `lora.load_adapter`, unmerged, so the figures equal the merged model's up to float
#                rounding. The tokenizer is the adapter folder's when it has one (a run's final/ does),
#                else the base's.

TRAINING_CONFIG = "training_config.toml"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass
class LoadedModel:
    """A model ready to answer: the model in eval mode, its tokenizer, template and stop ids."""

    model: torch.nn.Module
    tokenizer: object
    template: Template
    stop_ids: list[int]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --template and --no-template-check, as chat and evaluate spell them."""
    parser.add_argument("--model", default=None,
                        help="HF-format model folder (config.json, weights, tokenizer); with --adapter: the base "
                             "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to load onto the model")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                        help="chat template (default: the one the model was trained with, from its "
                             "training_config.toml, else the one its chat_template matches)")
    parser.add_argument("--no-template-check", action="store_true",
                        help="use --template even where it renders differently from the model's chat_template")


def base_model_folder(model: str | None, adapter: str | None) -> Path:
    """--model, or the base an adapter's config names; one line saying what to give otherwise."""
    if model is not None:
        return Path(model)
    if adapter is None:
        raise ConfigError("give --model DIR (a model folder), or --adapter DIR whose adapter_config.json "
                          "names its base")
    from .lora import read_adapter_config

    base = read_adapter_config(adapter).base_model_name_or_path
    if not base:
        raise ConfigError(f"--adapter {adapter}: its adapter_config.json names no base model "
                          "(base_model_name_or_path is null, e.g. a base trained from scratch); give --model BASE")
    return Path(base)


def trained_template(folders: list[Path]) -> str | None:
    """`[data] template` of the first training_config.toml among `folders`, or None without one
    (a pretraining run's final/ has no template, a model from elsewhere no training_config.toml)."""
    for folder in folders:
        path = folder / TRAINING_CONFIG
        if not path.exists():
            continue
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise CheckpointError(f"{path}: invalid TOML ({error})") from None
        template = table.get("data", {}).get("template")
        return template if isinstance(template, str) else None
    return None


def choose_template(setting: str | None, tokenizer, folders: list[Path], check: bool = True) -> Template:
    """The template to prompt with (see the module docstring), checked as training checks it."""
    from .data.template_check import resolve_template

    setting = setting or trained_template(folders) or "auto"
    try:
        return resolve_template(setting, tokenizer, check=check)
    except ConfigError as error:
        raise ConfigError(f"{error} (on this command line: --template NAME, --no-template-check)") from None


def stop_ids_for(template: Template, tokenizer, folders: list[Path]) -> list[int]:
    """generation_config.json's eos_token_id (the first folder that has one), then the template's."""
    ids: list[int] = []
    for folder in folders:
        path = folder / GENERATION_CONFIG
        if not path.exists():
            continue
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{path}: not a JSON object with eos_token_id") from None
        ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
        break
    return ids + [i for i in generation_stop_ids(template, tokenizer) if i not in ids]


def load_for_inference(args: argparse.Namespace, device: str, dtype: torch.dtype | None) -> LoadedModel:
    """The model (with its adapter), tokenizer, template and stop ids the arguments name.

    Every check that needs no weights comes first, so a mistake costs no model load.
    """
    from .checkpoint import load_pretrained, read_config
    from .tokenizer import Tokenizer

    base = base_model_folder(args.model, args.adapter)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None:
        from .lora import read_adapter_config

        read_adapter_config(adapter)  # one line for a folder that is not an adapter, before any load
    check_model_folder(base)
    read_config(base)
    folders = [adapter, base] if adapter is not None else [base]
    tokenizer_folder = next((f for f in folders if any((f / name).exists() for name in TOKENIZER_FILES)), base)
    tokenizer = Tokenizer.from_file(tokenizer_folder)
    template = choose_template(args.template, tokenizer, folders, check=not args.no_template_check)
    stop_ids = stop_ids_for(template, tokenizer, folders)
    model = load_pretrained(base, dtype=dtype, device=device)
    if adapter is not None:
        from .lora import load_adapter

        try:
            load_adapter(model, adapter)
        except ValueError as error:  # targets this model does not have, or another rank
            raise CheckpointError(f"--adapter {adapter} does not fit {base}: {error}") from None
    return LoadedModel(model.eval(), tokenizer, template, stop_ids)

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanotune.chat", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=256)
    parser.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=at_least(1), default=None)
    parser.add_argument("--top-p", type=probability, default=None, help="in (0, 1]")
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="> 0; 1 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: as stored")
    parser.add_argument("--verbose", action="store_true", help="print each prompt's text to stderr")
    args = parser.parse_args(argv)

    device = resolve_device(parser, args.device)
    if args.model is None and args.adapter is None:
        parser.error("the following arguments are required: --model (or --adapter, whose config names the base)")
    loaded = load_for_inference(args, device, getattr(torch, args.dtype) if args.dtype else None)
    session = ChatSession(
        loaded.model, loaded.tokenizer, loaded.template, system=args.system, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, log=sys.stderr if args.verbose else None,
        stop_ids=loaded.stop_ids,
    )
    print(f"(template {loaded.template.name}, stop ids {loaded.stop_ids})", file=sys.stderr, flush=True)
    interactive = sys.stdin.isatty()
    run_chat(session, _interactive_lines() if interactive else sys.stdin, sys.stdout, show_prompt=interactive)


if __name__ == "__main__":
    run_main(main)
