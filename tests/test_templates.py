"""Chat templates render the text each model family was trained on.

Oracles: the published chat templates (HF Jinja strings for Llama-2-chat, Llama-3-Instruct and
ChatML, rendered with jinja2 as transformers does), FastChat's Vicuna layout, Stanford Alpaca's
prompt and BELLE's training code, transcribed here as literals.
"""

from __future__ import annotations

import jinja2
import pytest

from nanotune.data.records import DataError
from nanotune.data.templates import TEMPLATES, Segment, TableTemplate, get_template

SYSTEM = "You are a careful assistant."
CONVERSATION = [
    {"role": "user", "content": "What is qi?"},
    {"role": "assistant", "content": "Vital energy."},
    {"role": "user", "content": "脾胃是什么？"},
    {"role": "assistant", "content": "后天之本。"},
]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}] + CONVERSATION

# The ChatML template of Qwen's tokenizer_config.json (no default system prompt).
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf's chat_template.
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct's chat_template.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def jinja_render(source: str, messages, add_generation_prompt=False, **tokens) -> str:
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers compiles them
    return environment.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


def test_chatml_renders_the_standard_chatml_text():
    expected = (
        "<|im_start|>user\nWhat is qi?<|im_end|>\n<|im_start|>assistant\nVital energy.<|im_end|>\n"
        "<|im_start|>user\n脾胃是什么？<|im_end|>\n<|im_start|>assistant\n后天之本。<|im_end|>\n"
    )
    chatml = get_template("chatml")
    assert chatml.render(CONVERSATION) == expected
    for messages in (CONVERSATION, WITH_SYSTEM):
        assert chatml.render(messages) == jinja_render(CHATML_JINJA, messages)
        prompt = messages[:-1]
        assert chatml.render(prompt, add_generation_prompt=True) == jinja_render(CHATML_JINJA, prompt, True)
        assert chatml.render(prompt, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_belle_renders_belles_human_assistant_form():
    # BELLE train/src/sample_generator.py: "Human: \n" + question + "\n\nAssistant: \n", then the
    # answer followed by eos; the packed path puts BOS in front of each conversation.
    expected = "<s>Human: \nWhat is qi?\n\nAssistant: \nVital energy.</s>Human: \n脾胃是什么？\n\nAssistant: \n后天之本。</s>"
    belle = get_template("belle")
    assert belle.render(CONVERSATION) == expected
    assert belle.render(CONVERSATION[:3], add_generation_prompt=True) == (
        "<s>Human: \nWhat is qi?\n\nAssistant: \nVital energy.</s>Human: \n脾胃是什么？\n\nAssistant: \n"
    )


def test_llama2_render_matches_the_hf_llama2_chat_template_with_stray_spaces():
    messages = [
        {"role": "system", "content": " Answer briefly. "},
        {"role": "user", "content": "  What is qi?  "},
        {"role": "assistant", "content": "\nVital energy.  "},
        {"role": "user", "content": " 脾胃是什么？"},
    ]
    expected = jinja_render(LLAMA2_JINJA, messages, bos_token="<s>", eos_token="</s>")
    assert get_template("llama2").render(messages, add_generation_prompt=True) == expected
    assert expected == (
        "<s>[INST] <<SYS>>\n Answer briefly. \n<</SYS>>\n\n  What is qi? [/INST] Vital energy. </s>"
        "<s>[INST] 脾胃是什么？ [/INST]"
    )


def test_llama3_render_matches_the_llama3_instruct_template():
    for messages in (CONVERSATION, WITH_SYSTEM):
        expected = jinja_render(LLAMA3_JINJA, messages, bos_token="<|begin_of_text|>")
        assert get_template("llama3").render(messages) == expected
        prompt = messages[:-1]
        assert get_template("llama3").render(prompt, add_generation_prompt=True) == jinja_render(
            LLAMA3_JINJA, prompt, True, bos_token="<|begin_of_text|>"
        )


def test_vicuna_renders_fastchats_v1_1_layout():
    # FastChat vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>"), BOS added by the tokenizer.
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    expected = f"<s>{system} USER: What is qi? ASSISTANT: Vital energy.</s>USER: 脾胃是什么？ ASSISTANT: 后天之本。</s>"
    assert get_template("vicuna").render(CONVERSATION) == expected
    assert get_template("vicuna").render(CONVERSATION[:3], add_generation_prompt=True).endswith("USER: 脾胃是什么？ ASSISTANT:")


def test_alpaca_renders_the_stanford_prompt():
    messages = [{"role": "user", "content": "Name a herb."}, {"role": "assistant", "content": "Ginseng."}]
    expected = (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a herb.\n\n### Response:\nGinseng.</s>"
    )
    assert get_template("alpaca").render(messages) == expected


def test_base_template_is_plain_text():
    messages = [{"role": "user", "content": "中医理论"}, {"role": "assistant", "content": "认为人体气血阴阳平衡。"}]
    assert get_template("base").render(messages) == "<s>中医理论\n认为人体气血阴阳平衡。</s>"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_start_of_the_trained_text(name):
    template = get_template(name)
    for messages in (CONVERSATION, WITH_SYSTEM):
        full = template.render(messages)
        prompt = template.render(messages[:-1], add_generation_prompt=True)
        assert full.startswith(prompt), (prompt, full)
        # What follows the prompt is the reply (and its end marker), all of it trainable.
        trained = "".join(
            (s.text if s.special is None else template.eos_text) for s in template.segments(messages) if s.trainable
        )
        assert messages[-1]["content"].strip() in full[len(prompt):]
        assert trained.count(messages[-1]["content"].strip()) == 1


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_replies_and_their_end_markers_are_trainable(name):
    template = get_template(name)
    segments = template.segments(WITH_SYSTEM)
    trainable_text = [s.text or s.special for s in segments if s.trainable]
    replies = [m["content"] for m in WITH_SYSTEM if m["role"] == "assistant"]
    joined = "".join(t for t in trainable_text if t not in ("eos",))
    for reply in replies:
        assert reply in joined
    prompt_text = "".join(s.text for s in segments if not s.trainable)
    for reply in replies:
        assert reply not in prompt_text
    assert [s.turn for s in segments if s.trainable and s.special is None] == [0, 1]


def test_roles_out_of_order_are_refused():
    with pytest.raises(DataError, match="roles out of order"):
        get_template("chatml").render([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])
    with pytest.raises(DataError, match="empty content"):
        get_template("llama2").render([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="ends with a user turn"):
        get_template("llama2").render(CONVERSATION, add_generation_prompt=True)


def test_unknown_template_names_the_choices():
    with pytest.raises(ValueError, match="unknown chat template 'gpt9'.*llama2.*chatml"):
        get_template("gpt9")


def test_a_new_template_is_one_table_entry():
    zephyr = TableTemplate(
        name="zephyr",
        system_format="<|system|>\n{content}</s>\n",
        user_format="<|user|>\n{content}</s>\n",
        assistant_prefix="<|assistant|>\n",
        reply_suffix="\n",
    )
    assert zephyr.render(CONVERSATION[:2]) == "<s><|user|>\nWhat is qi?</s>\n<|assistant|>\nVital energy.</s>\n"
    assert zephyr.segments(CONVERSATION[:2])[-2] == Segment(special="eos", trainable=True, turn=0)


class _StubTokenizer:
    """Only what stop_token_ids reads: an EOS id and a piece lookup."""

    eos_id = 2
    pieces = {"<|im_end|>": 151645}

    def piece_to_id(self, piece):
        return self.pieces.get(piece)


def test_stop_token_ids_add_end_markers_that_are_single_pieces():
    assert get_template("chatml").stop_token_ids(_StubTokenizer()) == [2, 151645]
    assert get_template("llama3").stop_token_ids(_StubTokenizer()) == [2]  # no "<|eot_id|>" piece here
    assert get_template("llama2").stop_token_ids(_StubTokenizer()) == [2]


def test_qwen3_writes_only_the_final_replys_reasoning():
    """Qwen3's layout (its tokenizer_config.json chat_template), written out by hand: the final reply
    always has a think block (empty without reasoning), earlier replies lose theirs."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
        {"role": "user", "content": "乘以4？"},
        {"role": "assistant", "content": "20", "reasoning_content": "\n5 * 4\n"},
    ]
    head = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\n乘以4？<|im_end|>\n<|im_start|>assistant\n"
    )
    for name in ("qwen3", "qwen3_nothink"):
        assert get_template(name).render(messages) == head + "<think>\n5 * 4\n</think>\n\n20<|im_end|>\n"
        assert get_template(name).render(messages[:3]).endswith("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n5<|im_end|>\n")
        assert get_template(name).render(CONVERSATION[:2]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nVital energy.<|im_end|>\n")
    assert get_template("qwen3").render(messages[:-1], add_generation_prompt=True) == head
    assert get_template("qwen3_nothink").render(messages[:-1], add_generation_prompt=True) == head + "<think>\n\n</think>\n\n"


def test_qwen3_nothink_trains_the_answer_and_not_the_empty_think_block():
    trained = [s.text for s in get_template("qwen3_nothink").segments(CONVERSATION[:2]) if s.trainable]
    assert trained == ["Vital energy.<|im_end|>"]
    trained = [s.text for s in get_template("qwen3").segments(CONVERSATION[:2]) if s.trainable]
    assert trained == ["<think>\n\n</think>\n\nVital energy.<|im_end|>"]


def test_built_in_jinja_renders_the_text_of_its_template():
    """Each template's `chat_template()` Jinja, rendered as transformers does, gives `render`'s text."""
    from nanotune.data.template_check import render_jinja

    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    reasoning = CONVERSATION[:3] + [{"role": "assistant", "content": "<think>\n想一想\n</think>\n\n后天之本。"}]
    for name, template in TEMPLATES.items():
        variables = {**tokens, **template.jinja_variables}
        shown = {None: None, "bos": "<s>", "eos": "</s>"}
        for messages in (CONVERSATION, WITH_SYSTEM, reasoning):
            for prompt in (False, True):
                conversation = messages[:-1] if prompt else messages
                expected = "".join(s.text if s.special is None else shown[s.special] for s in template.segments(conversation, prompt))
                assert render_jinja(template.chat_template(), conversation, prompt, **variables) == expected, (name, prompt)


def test_a_new_table_entry_gets_its_jinja_too():
    from nanotune.data.template_check import render_jinja

    chinese = TableTemplate(name="问答", user_format="问：{content}\n", assistant_prefix="答🙂：", reply_suffix="\n\n",
                            default_system="你是\"助手\"\\。", system_format="{content}\n")
    for prompt in (False, True):
        messages = CONVERSATION[:-1] if prompt else CONVERSATION
        expected = chinese.render(messages, prompt).replace("<s>", "[B]").replace("</s>", "[E]")
        assert render_jinja(chinese.chat_template(), messages, prompt, bos_token="[B]", eos_token="[E]") == expected
