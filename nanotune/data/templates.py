"""Chat templates: how a conversation is laid out as the text (and special tokens) a model sees.

A chat model only works if it is fed, at inference, exactly the layout it was trained on, so the
template is used in both places: `sft.encode_conversation` for training and `sft.encode_prompt` /
`render` for generation.

A template turns a conversation into a list of `Segment`s: pieces of text, each marked as part of
the prompt or of an assistant reply (the only part that carries a loss), and the special tokens
BOS and EOS, which are always ids from the tokenizer and never spelled out as text. `render` joins
the segments into one string for people and logs, showing BOS and EOS as the template's
`bos_text` / `eos_text` ("<s>", "</s>" for the LLaMA-2 family). Do not tokenise that string: a
SentencePiece tokenizer reads "<s>" as three characters, not as BOS. Use `sft.encode_prompt`.

Templates (`get_template(name)`):

  llama2   Meta's Llama-2-chat: per turn `<s>[INST] {user} [/INST] {reply} </s>`, contents
           stripped, a system prompt folded into the first user turn as `<<SYS>>\\n...\\n<</SYS>>\\n\\n`
  llama3   `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>...`
  chatml   ChatML (Qwen): `<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n...`, no BOS
  vicuna   Vicuna v1.1: `<s>{system} USER: {user} ASSISTANT: {reply}</s>USER: ...`
  alpaca   Stanford Alpaca: `<s>{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{reply}</s>`
  belle    BELLE: `<s>Human: \\n{user}\\n\\nAssistant: \\n{reply}</s>Human: \\n...`
  base     plain text for base models: `<s>{user}\\n{reply}</s>`

Adding a template is one `TableTemplate(...)` entry in `TEMPLATES` (or a small subclass when the
layout does not fit the table, as `Llama2Template`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from nanotune.data.formats import check_conversation


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation.

    text       the text, or "" for a special token
    special    None, "bos" or "eos": the tokenizer's own id, never tokenised from text
    trainable  True for an assistant reply and its end marker (the tokens that get a loss)
    turn       index of the (user, assistant) exchange it belongs to; a system prompt is in turn 0

    Consecutive text segments are tokenised in ONE tokenizer call (as the model will see them at
    inference), and the tokens are then attributed to segments; special tokens split the calls.
    """

    text: str = ""
    special: str | None = None
    trainable: bool = False
    turn: int = 0


def split_turns(messages: list[dict], add_generation_prompt: bool) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system or None, [(user, reply or None), ...]) after checking the roles.

    The last pair has reply None when the conversation ends with a user turn (a prompt to answer).
    """
    check_conversation(messages, allow_final_user=True)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = []
    for i in range(0, len(turns), 2):
        reply = turns[i + 1]["content"] if i + 1 < len(turns) else None
        pairs.append((turns[i]["content"], reply))
    if add_generation_prompt and pairs[-1][1] is not None:
        raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
    return system, pairs


class Template(ABC):
    """What every chat template offers: `segments` lays out a conversation; `render` shows it as text.

    A template only has to say how a conversation is laid out (`segments`); rendering, stop tokens
    and the encoding with labels (nanotune.data.sft) are built on that one method. `TableTemplate`
    lays out the common single-string formats from a table entry; `Llama2Template` is Meta's layout,
    which puts the system prompt inside the first user turn.
    """

    name = "template"
    bos_text = "<s>"  # how BOS is shown by render()
    eos_text = "</s>"
    stop_strings: tuple[str, ...] = ()  # text that ends a reply besides EOS (e.g. "<|im_end|>")

    @abstractmethod
    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as an ordered list of text pieces and BOS/EOS markers, each marked
        trainable or not (only replies and their end markers are)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text the model sees, with BOS/EOS shown as `bos_text`/`eos_text`."""
        shown = {None: None, "bos": self.bos_text, "eos": self.eos_text}
        return "".join(s.text if s.special is None else shown[s.special] for s in self.segments(messages, add_generation_prompt))

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end a reply in generation: EOS, plus each stop string that is one token."""
        ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        for text in self.stop_strings:
            token_id = tokenizer.piece_to_id(text)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Llama2Template(Template):
    """Meta's Llama-2-chat layout, built exactly as `llama/generation.py` `chat_completion` does.

    Each (user, reply) exchange is its own BOS ... EOS unit, one tokenizer call over
    `f"[INST] {user.strip()} [/INST] {reply.strip()} "` (note the space after the reply, before
    EOS); an unanswered last user turn is `f"[INST] {user.strip()} [/INST]"` with BOS and no EOS.
    A system prompt is not a turn of its own: it is put in front of the first user message as
    `"<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + user` before that message is stripped.
    """

    name = "llama2"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def segments(self, messages, add_generation_prompt=False):
        system, pairs = split_turns(messages, add_generation_prompt)
        out = []
        for turn, (user, reply) in enumerate(pairs):
            if turn == 0 and system is not None:
                user = self.B_SYS + system + self.E_SYS + user
            out.append(Segment(special="bos", turn=turn))
            out.append(Segment(f"{self.B_INST} {user.strip()} {self.E_INST}", turn=turn))
            if reply is not None:
                out.append(Segment(f" {reply.strip()} ", trainable=True, turn=turn))
                out.append(Segment(special="eos", trainable=True, turn=turn))
        return out


@dataclass(frozen=True, repr=False, kw_only=True)
class TableTemplate(Template):
    """A template described by format strings; `{content}` is replaced by the message text.

    Laid out as: [BOS] [system_format] then per exchange
      [turn_separator, from the second exchange on] user_format assistant_prefix
      reply_format [EOS] reply_suffix
    where only reply_format and the EOS are trainable, and `assistant_prefix` is what
    `add_generation_prompt=True` appends after the last user turn.
    """

    name: str
    user_format: str
    assistant_prefix: str
    reply_format: str = "{content}"
    system_format: str = "{content}"
    reply_suffix: str = ""
    turn_separator: str = ""
    add_bos: bool = True
    eos_after_reply: bool = True  # EOS token after every reply; else the reply_format ends it
    default_system: str | None = None
    strip_content: bool = False
    bos_text: str = "<s>"
    eos_text: str = "</s>"
    stop_strings: tuple[str, ...] = ()

    def segments(self, messages, add_generation_prompt=False):
        system, pairs = split_turns(messages, add_generation_prompt)
        system = system if system is not None else self.default_system
        clean = (lambda text: text.strip()) if self.strip_content else (lambda text: text)
        out = []
        if self.add_bos:
            out.append(Segment(special="bos"))
        if system is not None:
            out.append(Segment(self.system_format.format(content=clean(system))))
        for turn, (user, reply) in enumerate(pairs):
            if turn > 0 and self.turn_separator:
                out.append(Segment(self.turn_separator, turn=turn))
            out.append(Segment(self.user_format.format(content=clean(user)), turn=turn))
            if reply is None and not add_generation_prompt:
                break
            out.append(Segment(self.assistant_prefix, turn=turn))
            if reply is None:
                break
            out.append(Segment(self.reply_format.format(content=clean(reply)), trainable=True, turn=turn))
            if self.eos_after_reply:
                out.append(Segment(special="eos", trainable=True, turn=turn))
            if self.reply_suffix:
                out.append(Segment(self.reply_suffix, turn=turn))
        return [s for s in out if s.special is not None or s.text]


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

TEMPLATES: dict[str, Template] = {
    "llama2": Llama2Template(),
    "llama3": TableTemplate(
        name="llama3",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        reply_format="{content}<|eot_id|>",
        eos_after_reply=False,
        strip_content=True,
        bos_text="<|begin_of_text|>",
        eos_text="<|end_of_text|>",
        stop_strings=("<|eot_id|>",),
    ),
    "chatml": TableTemplate(
        name="chatml",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        reply_format="{content}<|im_end|>",
        reply_suffix="\n",
        add_bos=False,
        eos_after_reply=False,
        stop_strings=("<|im_end|>",),
    ),
    "vicuna": TableTemplate(
        name="vicuna",
        system_format="{content} ",
        user_format="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        reply_format=" {content}",
        default_system=VICUNA_SYSTEM,
    ),
    "alpaca": TableTemplate(
        name="alpaca",
        system_format="{content}\n\n",
        user_format="### Instruction:\n{content}\n\n",
        assistant_prefix="### Response:\n",
        turn_separator="\n\n",
        default_system=ALPACA_SYSTEM,
    ),
    "belle": TableTemplate(
        name="belle",
        system_format="{content}\n\n",
        user_format="Human: \n{content}\n\n",
        assistant_prefix="Assistant: \n",
    ),
    "base": TableTemplate(
        name="base",
        system_format="{content}\n\n",
        user_format="{content}\n",
        assistant_prefix="",
    ),
}


def get_template(name: str | Template) -> Template:
    """The template called `name` (a `Template` is returned as it is)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
