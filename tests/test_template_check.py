"""The model's chat template as the oracle: `data.template = "auto"`, the check of a named template,
and the Jinja saved with the tokenizer.

Oracles: the real Qwen3 and Llama-3 folders' own Jinja (../shared, skipped where absent), Meta's
Llama-2-chat Jinja on a tiny SentencePiece tokenizer, and transformers' `apply_chat_template` on
the folders nanotune saves.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import SHARED_DATA
from helpers import assistant, system, train_sentencepiece, user
from test_templates import LLAMA2_JINJA

from nanotune.config import ConfigError
from nanotune.data import template_check
from nanotune.data.sft import encode_conversation, encode_prompt
from nanotune.data.template_check import resolve_template, saved_chat_template
from nanotune.data.templates import get_template
from nanotune.tokenizer import Tokenizer

pytest.importorskip("jinja2")

CONVERSATION = [
    system("You are a careful assistant."),
    user("What is qi?"),
    assistant("Vital energy."),
    user("脾胃是什么？"),
    assistant("<think>\n脾胃……\n</think>\n\n后天之本。"),
]


def shared_folder(name: str):
    folder = SHARED_DATA / name
    if not (folder / "tokenizer.json").exists() or not (folder / "tokenizer_config.json").exists():
        pytest.skip(f"{folder} not present (real tokenizer files)")
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A tiny LLaMA-like SentencePiece tokenizer folder, with no chat_template."""
    folder = tmp_path_factory.mktemp("spm")
    train_sentencepiece(folder, vocab_size=400).rename(folder / "tokenizer.model")
    return folder


def with_chat_template(source, folder, chat_template):
    """A copy of a tokenizer folder whose tokenizer_config.json holds `chat_template` (or none)."""
    folder.mkdir()
    for file in source.iterdir():
        if file.name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(file, folder / file.name)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.mark.parametrize("name, expected", [("qwen3", "qwen3"), ("llama3", "llama3")])
def test_auto_picks_the_template_that_renders_as_the_models_own(name, expected):
    tokenizer = Tokenizer.from_file(shared_folder(name))
    assert resolve_template("auto", tokenizer).name == expected
    assert resolve_template(expected, tokenizer) is get_template(expected)  # and the check passes


def test_qwen3_nothink_passes_the_check_with_thinking_off():
    tokenizer = Tokenizer.from_file(shared_folder("qwen3"))
    assert resolve_template("qwen3_nothink", tokenizer).name == "qwen3_nothink"


def test_a_named_template_that_renders_differently_stops_with_the_first_differing_tokens():
    tokenizer = Tokenizer.from_file(shared_folder("qwen3"))
    with pytest.raises(ConfigError) as error:
        resolve_template("chatml", tokenizer)
    message = str(error.value)
    assert "\n" not in message
    # Single turn: after "<|im_start|>assistant\n" ours goes on with the reply, Qwen3's with the think block.
    assert "data.template = 'chatml'" in message and "probe 'single turn' (conversation) differs at token" in message
    assert "ours 'Paris'" in message and "the model's '<think>'" in message
    assert "data.template_check = false" in message
    with pytest.raises(ConfigError, match="differs at token 0: ours '<' '|' 'im' '_start'"):
        resolve_template("chatml", Tokenizer.from_file(shared_folder("llama3")))


def test_template_check_false_uses_the_named_template_unchecked(caplog):
    tokenizer = Tokenizer.from_file(shared_folder("qwen3"))
    with caplog.at_level(logging.INFO, logger="nanotune"):
        assert resolve_template("chatml", tokenizer, check=False).name == "chatml"
    assert "not checked" in caplog.text


def test_auto_matches_a_sentencepiece_folder_with_the_llama2_chat_jinja(spm_folder, tmp_path):
    folder = with_chat_template(spm_folder, tmp_path / "llama2chat", LLAMA2_JINJA)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": LLAMA2_JINJA, "bos_token": "<s>", "eos_token": "</s>"}), encoding="utf-8"
    )
    tokenizer = Tokenizer.from_file(folder)
    assert tokenizer.kind == "sentencepiece" and tokenizer.chat_template == LLAMA2_JINJA
    assert resolve_template("auto", tokenizer).name == "llama2"
    with pytest.raises(ConfigError, match="data.template = 'belle' renders differently"):
        resolve_template("belle", tokenizer)


def test_without_a_chat_template_auto_picks_by_vocabulary_and_names_are_unchecked(spm_folder, tmp_path, caplog):
    tokenizer = Tokenizer.from_file(spm_folder)
    assert tokenizer.chat_template is None
    with caplog.at_level(logging.INFO, logger="nanotune"):
        assert resolve_template("auto", tokenizer).name == template_check.DEFAULT_TEMPLATE == "llama2"
        assert resolve_template("belle", tokenizer).name == "belle"
    assert "has no chat_template" in caplog.text and "used unchecked" in caplog.text


def test_without_a_chat_template_auto_picks_chatml_for_a_qwen_vocabulary(tmp_path):
    bare = Tokenizer.from_file(with_chat_template(shared_folder("qwen3"), tmp_path / "bare_qwen3", None))
    assert resolve_template("auto", bare).name == "chatml"  # <|im_start|> in the vocabulary


def test_without_jinja2_auto_falls_back_and_names_are_unchecked(monkeypatch, caplog):
    tokenizer = Tokenizer.from_file(shared_folder("llama3"))
    monkeypatch.setattr(template_check, "jinja_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="nanotune"):
        assert resolve_template("auto", tokenizer).name == "llama3"  # by <|start_header_id|>
        assert resolve_template("chatml", tokenizer).name == "chatml"
    assert "jinja2 is not installed" in caplog.text


def test_auto_with_no_matching_template_says_which_came_closest(tmp_path):
    qwen3 = shared_folder("qwen3")
    odd = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
    tokenizer = Tokenizer.from_file(with_chat_template(qwen3, tmp_path / "odd", odd))
    with pytest.raises(ConfigError, match='data.template = "auto": no built-in template renders as .*closest'):
        resolve_template("auto", tokenizer)


# --------------------------------------------------------------------------------------------------
# The saved chat_template: transformers' apply_chat_template gives the training tokens
# --------------------------------------------------------------------------------------------------


def assert_transformers_renders_as_nanotune(folder, tokenizer, template):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)

    def hf_ids(messages, add_generation_prompt=False):
        return list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False))

    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        assert hf_ids(messages) == encode_conversation(messages, tokenizer, template)["input_ids"], (template, messages)
        prompt = messages[:-1]
        assert hf_ids(prompt, True) == encode_prompt(prompt, tokenizer, template), (template, prompt)


@pytest.mark.parametrize("template", ["llama2", "vicuna", "alpaca", "belle", "base"])
def test_saved_sentencepiece_tokenizer_carries_the_template(spm_folder, tmp_path, template):
    tokenizer = Tokenizer.from_file(spm_folder)
    chat_template = saved_chat_template(template, tokenizer)
    assert chat_template == get_template(template).chat_template()  # the folder has no Jinja of its own
    tokenizer.save(tmp_path / "final", chat_template=chat_template)
    saved = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved["chat_template"] == chat_template
    assert_transformers_renders_as_nanotune(tmp_path / "final", tokenizer, template)


@pytest.mark.parametrize("name, template", [("qwen3", "chatml"), ("qwen3", "qwen3"), ("qwen3", "qwen3_nothink"), ("llama3", "llama3")])
@pytest.mark.parametrize("own_jinja", [True, False], ids=["saved_chat_template", "built_in_jinja"])
def test_saved_byte_level_tokenizer_carries_the_template(name, template, own_jinja, tmp_path):
    tokenizer = Tokenizer.from_file(shared_folder(name))
    chat_template = saved_chat_template(template, tokenizer) if own_jinja else get_template(template).chat_template()
    if own_jinja:  # the model's own Jinja is kept where it renders as the template with no extra variables
        assert (chat_template == tokenizer.chat_template) == (template in ("qwen3", "llama3"))
    tokenizer.save(tmp_path / "final", chat_template=chat_template)
    assert Tokenizer.from_file(tmp_path / "final").chat_template == chat_template
    assert_transformers_renders_as_nanotune(tmp_path / "final", tokenizer, template)


def test_every_built_in_jinja_renders_as_its_template_on_the_probes(spm_folder):
    """Our own Jinja, run through the same check as a model's: the two descriptions agree."""
    tokenizer = Tokenizer.from_file(spm_folder)
    for name in ("llama2", "vicuna", "alpaca", "belle", "base"):
        assert template_check.compare_with_jinja(name, tokenizer, get_template(name).chat_template()) is None, name


def test_every_built_in_chatml_jinja_renders_as_its_template_on_the_probes():
    qwen3 = Tokenizer.from_file(shared_folder("qwen3"))
    for name in ("chatml", "qwen3", "qwen3_nothink"):
        assert template_check.compare_with_jinja(name, qwen3, get_template(name).chat_template()) is None, name
