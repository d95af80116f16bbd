"""The model's own chat template as the oracle for ours, at run time.

A fine-tuned chat model only answers well when it is prompted in the layout it was trained on, and
a template that differs from the model's by one newline trains a model that then sees, at
inference, text it never saw. Most model folders carry their layout as a Jinja `chat_template` in
`tokenizer_config.json`, so it can be checked before any training is done: render a fixed set of
probe conversations with that Jinja (as transformers' `apply_chat_template` does) and with our
template, tokenise both, and compare the ids.

    resolve_template("auto", tokenizer)      the built-in template that renders every probe as the
                                             model's Jinja does (first in TEMPLATES order)
    resolve_template("chatml", tokenizer)    chatml, or a ConfigError showing the first differing
                                             tokens when the model's Jinja renders differently
    check=False                              (`data.template_check = false`) uses the named template
                                             unchecked

Without `jinja2` (the `chat` extra: `pip install nanotune[chat]`) or without a `chat_template` in
the tokenizer folder there is no oracle: a named template is used unchecked, and "auto" picks by
vocabulary (`DEFAULT_BY_PIECE`: chatml where the vocabulary has `<|im_start|>`, llama3 where it has
`<|start_header_id|>`, else llama2), with a line in the log saying so.

The Jinja is rendered in the sandbox transformers uses (`ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, its `raise_exception`, `tojson` and `strftime_now` helpers) with
the tokenizer's special token texts (`bos_token`, ...) as variables, and the whole text is
tokenised in one call without adding special tokens, as `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime

from ..config import ConfigError
from .sft import tokenize_segments
from .templates import TEMPLATES, Template, get_template

log = logging.getLogger("nanotune")

DEFAULT_BY_PIECE = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"))
DEFAULT_TEMPLATE = "llama2"

# Conversations every matching template must render as the model's Jinja does, each as a whole
# and, without its last reply, as a generation prompt.
PROBES: dict[str, list[dict]] = {
    "single turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system prompt": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Write x squared in Python."},
        {"role": "assistant", "content": "x ** 2"},
    ],
    "Chinese multi-turn with system": [
        {"role": "system", "content": "你是一位中医专家。"},
        {"role": "user", "content": "脾胃是什么？"},
        {"role": "assistant", "content": "脾胃是后天之本。"},
        {"role": "user", "content": "气血呢？"},
        {"role": "assistant", "content": "气为血之帅，血为气之母。"},
    ],
    "reasoning": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "<think>\n5 * 4 = 20\n</think>\n\n20"},
    ],
}


def jinja_available() -> bool:
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return False
    return True


def render_jinja(chat_template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """The text `apply_chat_template(messages, tokenize=False, **variables)` gives for `chat_template`."""
    template = _sandbox().from_string(chat_template)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=1)
def _sandbox():
    """The Jinja environment transformers renders chat templates in (built once: jinja2 is an
    optional extra, imported only when there is a template to render)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`, with which transformers marks the assistant's
        tokens: here the block is rendered as it stands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


def encode_rendered(text: str, tokenizer) -> list[int]:
    """Ids of a rendered chat text, special token texts included, as transformers tokenises it.

    A `tokenizers` vocabulary reads `<|im_start|>`, `<s>` and the like as their ids by itself. A
    SentencePiece model would read them as characters, so there the text is cut at the BOS / EOS
    texts, which become their ids, and each piece between is encoded on its own.
    """
    if tokenizer.kind != "sentencepiece":
        return tokenizer.encode(text)
    special = {
        tokenizer.special_tokens[key]: token_id
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
        if key in tokenizer.special_tokens
    }
    ids, piece = [], ""
    i = 0
    while i < len(text):
        name = next((name for name in special if text.startswith(name, i)), None)
        if name is None:
            piece += text[i]
            i += 1
            continue
        if piece:
            ids += tokenizer.encode(piece)
            piece = ""
        ids.append(special[name])
        i += len(name)
    return ids + (tokenizer.encode(piece) if piece else [])


def first_difference(ours: list[int], theirs: list[int], tokenizer, width: int = 4) -> tuple[int, str] | None:
    """(position, description) of the first difference of two id lists, showing the pieces of both
    sides from there; None if they are equal."""
    if ours == theirs:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))

    def shown(ids):
        pieces = [repr(tokenizer.id_to_piece(i)) for i in ids[at : at + width]]
        return " ".join(pieces) + (" ..." if len(ids) > at + width else "") if pieces else "(end)"

    return at, f"token {at}: ours {shown(ours)} vs the model's {shown(theirs)}"


def compare_with_jinja(template: str | Template, tokenizer, chat_template: str) -> str | None:
    """None if `template` gives the ids `chat_template` gives on every probe (whole conversations
    and generation prompts), else a line saying where the first probe differs."""
    mismatch = _first_mismatch(get_template(template), tokenizer, chat_template)
    return None if mismatch is None else mismatch[1]


def _first_mismatch(template: Template, tokenizer, chat_template: str) -> tuple[int, str] | None:
    """(token position or -1, line) of the first probe on which the two differ, or None.

    A probe the model's Jinja refuses (some templates raise on a system prompt) is left out; a
    Jinja that refuses every probe matches nothing.
    """
    import jinja2

    variables = {**tokenizer.special_tokens, **template.jinja_variables}
    n_compared = 0
    for name, messages in PROBES.items():
        for generation_prompt in (False, True):
            shown = messages[:-1] if generation_prompt else messages
            try:
                theirs = encode_rendered(render_jinja(chat_template, shown, generation_prompt, **variables), tokenizer)
            except (jinja2.exceptions.TemplateError, TypeError):  # refused, or messages it cannot read
                continue
            try:
                segments = template.segments(shown, add_generation_prompt=generation_prompt)
                ours = tokenize_segments(segments, tokenizer).ids
            except ValueError as error:  # e.g. the template needs a BOS this tokenizer lacks
                return -1, f"probe {name!r}: {error}"
            n_compared += 1
            difference = first_difference(ours, theirs, tokenizer)
            if difference is not None:
                kind = "generation prompt" if generation_prompt else "conversation"
                return difference[0], f"probe {name!r} ({kind}) differs at {difference[1]}"
    if n_compared == 0:
        return -1, "the chat_template raised an error on every probe conversation"
    return None


def resolve_template(setting: str, tokenizer, check: bool = True) -> Template:
    """The template `data.template = setting` means for this tokenizer, checked against the
    model's own chat template where there is one (see the module docstring).

    Raises ConfigError, in one line, when "auto" finds no built-in template that renders as the
    model's Jinja, or a named template renders differently (and `check` is on).
    """
    chat_template = tokenizer.chat_template
    oracle = chat_template is not None and jinja_available()
    where = tokenizer.path.parent
    if setting != "auto":
        template = get_template(setting)
        if not check:
            log.info("data.template %s: not checked against %s's chat template (data.template_check = false)", setting, where)
        elif not oracle:
            log.info("data.template %s: used unchecked (%s)", setting, _why_no_oracle(chat_template, where))
        else:
            difference = compare_with_jinja(template, tokenizer, chat_template)
            if difference is not None:
                raise ConfigError(
                    f"data.template = {setting!r} renders differently from the chat_template of {where}: {difference} "
                    f"(data.template = \"auto\" picks the matching one; data.template_check = false uses {setting!r} anyway)"
                )
            log.info("data.template %s: renders the probe conversations exactly as %s's chat template", setting, where)
        return template
    if not oracle:
        name = next((name for piece, name in DEFAULT_BY_PIECE if tokenizer.piece_to_id(piece) is not None), DEFAULT_TEMPLATE)
        log.info("data.template auto: %s by the vocabulary (%s)", name, _why_no_oracle(chat_template, where))
        return get_template(name)
    mismatches = {}
    for name, template in TEMPLATES.items():  # the first that matches: qwen3 before qwen3_nothink
        mismatches[name] = _first_mismatch(template, tokenizer, chat_template)
        if mismatches[name] is None:
            log.info("data.template auto: %s, which renders the probe conversations exactly as %s's chat template", name, where)
            return template
    closest = max(mismatches, key=lambda name: mismatches[name][0])  # the one that agrees longest
    raise ConfigError(
        f"data.template = \"auto\": no built-in template renders as the chat_template of {where} "
        f"(closest: {closest}, {mismatches[closest][1]}); name one and set data.template_check = false"
    )


def saved_chat_template(template: str | Template, tokenizer) -> str:
    """The Jinja to save with a model trained with `template` (`tokenizer.save(folder, chat_template=...)`).

    The model's own chat template when it renders the probes as `template` does with no extra
    variables (it then also keeps what our templates leave out, such as tools), else the
    template's own Jinja (`Template.chat_template()`), e.g. for `qwen3_nothink`, whose generation
    prompt must be the default one of the saved model.
    """
    template = get_template(template)
    own = tokenizer.chat_template
    if own is not None and not template.jinja_variables and jinja_available():
        if compare_with_jinja(template, tokenizer, own) is None:
            return own
    return template.chat_template()


def _why_no_oracle(chat_template: str | None, where) -> str:
    if chat_template is None:
        return f"{where} has no chat_template to check it against"
    return "jinja2 is not installed (pip install nanotune[chat]) to check it against the chat_template"

