"""Talk to a model in the terminal: `python -m nanotune.chat --model DIR [--template llama2]`.

Each line you type is one user message. The whole conversation so far (system prompt, earlier
exchanges, the new message) is laid out by the chat template with the assistant's header added
(`render(..., add_generation_prompt=True)`) and tokenised by the same rules as the training data
(`sft.encode_prompt`: BOS/EOS are the tokenizer's ids, never the text "<s>"), the model writes a
reply, and the reply joins the conversation. The model keeps no state between turns: it re-reads
the conversation every time, which is what a chat model is trained to do.

Commands: `/reset` starts a new conversation (the system prompt stays), `/exit` (or end of input,
Ctrl-D) quits. With `--verbose` the text of every prompt is printed to stderr, to see exactly what
the model is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

import torch

from .cli import at_least, check_model_folder, positive_float, probability, resolve_device, run_main
from .data.sft import encode_prompt
from .data.templates import TEMPLATES, Template, get_template
from .generate import generate


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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(template)
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
            self.model, prompt_ids, eos_id=self.template.stop_token_ids(self.tokenizer), generator=self.generator,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanotune.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF-format model folder (config.json, weights, tokenizer)")
    parser.add_argument("--template", default="llama2", choices=sorted(TEMPLATES),
                        help="chat template (default llama2)")
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

    from .checkpoint import load_pretrained, read_config
    from .tokenizer import Tokenizer

    # Every check that needs no weights comes first, so a mistake costs no model load.
    device = resolve_device(parser, args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    check_model_folder(args.model)
    read_config(args.model)
    tokenizer = Tokenizer.from_file(args.model)
    model = load_pretrained(args.model, dtype=dtype, device=device)
    session = ChatSession(
        model, tokenizer, args.template, system=args.system, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, log=sys.stderr if args.verbose else None,
    )
    interactive = sys.stdin.isatty()
    run_chat(session, _interactive_lines() if interactive else sys.stdin, sys.stdout, show_prompt=interactive)


if __name__ == "__main__":
    run_main(main)
