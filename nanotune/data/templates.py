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
  llama3   `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>...`, the
           layout of Llama-3 and 3.1 (3.1's Jinja also writes a default system prompt with
           "Cutting Knowledge Date" / "Today Date" lines; this template does not)
  chatml   ChatML (Qwen2, Qwen2.5): `<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n...`, no BOS
  qwen3    Qwen3: ChatML with a `<think>` block in the final reply (see `Qwen3Template`)
  qwen3_nothink  Qwen3 with thinking off: the generation prompt ends with the empty think block
  vicuna   Vicuna v1.1: `<s>{system} USER: {user} ASSISTANT: {reply}</s>USER: ...`
  alpaca   Stanford Alpaca: `<s>{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{reply}</s>`
  belle    BELLE: `<s>Human: \\n{user}\\n\\nAssistant: \\n{reply}</s>Human: \\n...`
  base     plain text for base models: `<s>{user}\\n{reply}</s>`

Adding a template is one `TableTemplate(...)` entry in `TEMPLATES` (or a small subclass when the
layout does not fit the table, as `Llama2Template`, `Qwen3Template`).

A model's reply ends with its template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`, or EOS for
the LLaMA-2 family): that token is trained with the reply, and generation stops on it
(`generation_stop_ids`). Every template also writes itself as a Jinja chat template
(`Template.chat_template()`), saved with the tokenizer so that transformers' `apply_chat_template`
gives the tokens nanotune trained on; `template_check.py` compares templates with a model's own Jinja.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .formats import check_conversation


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
    system, pairs = split_turn_messages(messages, add_generation_prompt)
    return (
        system["content"] if system is not None else None,
        [(user["content"], reply["content"] if reply is not None else None) for user, reply in pairs],
    )


def split_turn_messages(messages: list[dict], add_generation_prompt: bool) -> tuple[dict | None, list[tuple[dict, dict | None]]]:
    """As `split_turns`, but the messages themselves (for templates that read more than "content")."""
    check_conversation(messages, allow_final_user=True)
    system = messages[0] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
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
    end_of_turn: str | None = None  # the piece that ends every reply, when it is not EOS ("<|im_end|>")
    drops_earlier_reasoning = False  # True where only the final reply keeps its <think> block (qwen3)
    jinja_variables: dict = {}  # what apply_chat_template must be given to render as this template does

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

    @abstractmethod
    def chat_template(self) -> str:
        """This template as a Jinja chat template (for `tokenizer_config.json`): rendered by
        transformers' `apply_chat_template` and tokenised in one call, it gives nanotune's tokens.

        Special tokens are spelled through the `bos_token` / `eos_token` variables transformers
        passes, so the string is right for whichever tokenizer it is saved with.
        """

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

    def chat_template(self):
        return "".join((
            "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}",
            "{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}",
            "{%- for message in loop_messages %}",
            "{%- if message['role'] == 'user' %}",
            "{%- set user = message['content'] %}",
            "{%- if loop.first and system is not none %}{%- set user = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + user %}{%- endif %}",
            "{{- bos_token + '[INST] ' + (user | trim) + ' [/INST]' }}",
            "{%- else %}{{- ' ' + (message['content'] | trim) + ' ' + eos_token }}{%- endif %}",
            "{%- endfor %}",
        ))


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
    end_of_turn: str | None = None

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

    def chat_template(self):
        """The table written out as Jinja, one statement per line of the table."""
        content = "(message['content'] | trim)" if self.strip_content else "message['content']"
        default = "none" if self.default_system is None else _jinja_string(self.default_system)
        system = "(system | trim)" if self.strip_content else "system"
        lines = [
            "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}",
            f"{{%- else %}}{{%- set system = {default} %}}{{%- set loop_messages = messages %}}{{%- endif %}}",
            "{{- bos_token }}" if self.add_bos else "",
            f"{{%- if system is not none %}}{{{{- {_jinja_format(self.system_format, system)} }}}}{{%- endif %}}",
            "{%- for message in loop_messages %}",
            "{%- if message['role'] == 'user' %}",
            f"{{%- if loop.index0 > 0 %}}{{{{- {_jinja_string(self.turn_separator)} }}}}{{%- endif %}}" if self.turn_separator else "",
            f"{{{{- {_jinja_format(self.user_format, content)} }}}}",
            "{%- else %}",
            f"{{{{- {_jinja_string(self.assistant_prefix)} + {_jinja_format(self.reply_format, content)} }}}}",
            "{{- eos_token }}" if self.eos_after_reply else "",
            f"{{{{- {_jinja_string(self.reply_suffix)} }}}}" if self.reply_suffix else "",
            "{%- endif %}",
            "{%- endfor %}",
            f"{{%- if add_generation_prompt %}}{{{{- {_jinja_string(self.assistant_prefix)} }}}}{{%- endif %}}",
        ]
        return "\n".join(line for line in lines if line)


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal: JSON's escapes are ones Jinja reads back, and characters
    outside ASCII are left as they are (Jinja would read JSON's surrogate pairs as two characters)."""
    return json.dumps(text, ensure_ascii=False)


def _jinja_format(format_string: str, expression: str) -> str:
    """A Jinja expression for `format_string.format(content=<expression>)`."""
    before, after = format_string.format(content="\0").split("\0") if "{content}" in format_string else (format_string, None)
    if after is None:
        return _jinja_string(before)
    return " + ".join(part for part in (_jinja_string(before) if before else "", expression, _jinja_string(after) if after else "") if part)


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, read as Qwen3's chat template reads them.

    The reasoning is `message["reasoning_content"]` when given (the content is then the answer as
    it is), else the text between `<think>` and `</think>` in the content, with the answer after
    `</think>`; a reply without either has no reasoning.
    """
    content = message["content"]
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


class Qwen3Template(Template):
    """Qwen3's own chat template (its tokenizer_config.json), without tools: ChatML plus reasoning.

    * The final reply is written with its think block: `<|im_start|>assistant\\n<think>\\n{reasoning}
      \\n</think>\\n\\n{answer}<|im_end|>\\n`, and with an empty one (`<think>\\n\\n</think>\\n\\n`) when
      it has no reasoning. The reasoning comes from "reasoning_content" or from `<think>...</think>`
      in the content (`split_reasoning`; the data readers hand reasoning over inline in the
      content). The think block is trained with the answer: the model learns to write it.
    * Earlier replies lose their reasoning: `<|im_start|>assistant\\n{answer}<|im_end|>\\n`, as Qwen3
      sees its past turns at inference. So by default a multi-turn conversation trains the final
      reply with its reasoning and the earlier ones without. To train every reply with its
      reasoning, set `data.reasoning_turns = "every"`: each reply becomes its own sample, the
      conversation up to it, in which it is the final reply (`sft.one_conversation_per_reply`).
    * The generation prompt is `<|im_start|>assistant\\n`: the model starts its own think block.

    `qwen3_nothink` (`Qwen3NoThinkTemplate`) is the same layout with `enable_thinking=False`: its
    generation prompt ends with the empty think block, which in training is then prompt, not target.
    """

    name = "qwen3"
    bos_text = ""
    eos_text = "<|im_end|>"
    stop_strings = ("<|im_end|>", "<|endoftext|>")
    end_of_turn = "<|im_end|>"
    drops_earlier_reasoning = True
    think_in_prompt = False  # the empty think block ends the generation prompt (thinking off)
    EMPTY_THINK = "<think>\n\n</think>\n\n"

    def segments(self, messages, add_generation_prompt=False):
        system, pairs = split_turn_messages(messages, add_generation_prompt)
        out = []
        if system is not None:
            out.append(Segment(f"<|im_start|>system\n{system['content']}<|im_end|>\n"))
        for turn, (user, reply) in enumerate(pairs):
            out.append(Segment(f"<|im_start|>user\n{user['content']}<|im_end|>\n", turn=turn))
            if reply is None:
                if add_generation_prompt:
                    out.append(Segment("<|im_start|>assistant\n", turn=turn))
                    if self.think_in_prompt:
                        out.append(Segment(self.EMPTY_THINK, turn=turn))
                break
            out.append(Segment("<|im_start|>assistant\n", turn=turn))
            reasoning, answer = split_reasoning(reply)
            if turn < len(pairs) - 1:  # an earlier reply: its reasoning is dropped
                out.append(Segment(answer + "<|im_end|>", trainable=True, turn=turn))
            else:
                reasoning = reasoning.strip("\n")
                think = f"<think>\n{reasoning}\n</think>\n\n"
                answer = answer.lstrip("\n") + "<|im_end|>"
                if self.think_in_prompt and think == self.EMPTY_THINK:
                    out += [Segment(think, turn=turn), Segment(answer, trainable=True, turn=turn)]
                else:
                    out.append(Segment(think + answer, trainable=True, turn=turn))
            out.append(Segment("\n", turn=turn))
        return out

    def chat_template(self):
        thinking_off = (
            "not (enable_thinking is defined and enable_thinking)" if self.think_in_prompt
            else "enable_thinking is defined and enable_thinking is false"
        )
        return "\n".join((
            "{%- for message in messages %}",
            "{%- if message['role'] == 'assistant' %}",
            "{%- set answer = message['content'] %}{%- set reasoning = '' %}",
            "{%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none %}",
            "{%- set reasoning = message['reasoning_content'] %}",
            "{%- elif '</think>' in answer %}",
            "{%- set reasoning = answer.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}",
            "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') %}",
            "{%- endif %}",
            "{%- if loop.last %}",
            "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + answer.lstrip('\\n') + '<|im_end|>\\n' }}",
            "{%- else %}{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' }}{%- endif %}",
            "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
            "{%- endif %}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}",
            f"{{%- if {thinking_off} %}}{{{{- '<think>\\n\\n</think>\\n\\n' }}}}{{%- endif %}}",
            "{%- endif %}",
        ))


class Qwen3NoThinkTemplate(Qwen3Template):
    """`qwen3` with thinking off (`enable_thinking=False`): the generation prompt ends with
    `<think>\\n\\n</think>\\n\\n`, so the model answers at once. In training an empty think block is
    prompt, not target; a reply that carries reasoning is still written (and trained) with it, as
    Qwen3's template writes it, though this template never prompts for it."""

    name = "qwen3_nothink"
    think_in_prompt = True
    jinja_variables = {"enable_thinking": False}


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
        stop_strings=("<|eot_id|>", "<|end_of_text|>"),
        end_of_turn="<|eot_id|>",
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
        stop_strings=("<|im_end|>", "<|endoftext|>"),
        end_of_turn="<|im_end|>",
    ),
    "qwen3": Qwen3Template(),
    "qwen3_nothink": Qwen3NoThinkTemplate(),
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


def generation_stop_ids(template: str | Template, tokenizer) -> list[int]:
    """Every id that ends a reply, for generation and `generation_config.json`'s `eos_token_id`:
    the template's end-of-turn token first (the one replies are trained to end with), then EOS and
    the template's other stop pieces that are single tokens of this vocabulary (Qwen3: `<|im_end|>`,
    `<|endoftext|>`; Llama-3: `<|eot_id|>`, `<|end_of_text|>`)."""
    template = get_template(template)
    ids = []
    end_of_turn = tokenizer.piece_to_id(template.end_of_turn) if template.end_of_turn else None
    for token_id in [end_of_turn] + template.stop_token_ids(tokenizer):
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def get_template(name: str | Template) -> Template:
    """The template called `name` (a `Template` is returned as it is)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
