"""The real Qwen3 and Llama-3 tokenizers: ids, special tokens, and the qwen3 / qwen3_nothink / llama3
templates token for token.

Oracles: the `tokenizers` library reading the same tokenizer.json, the folders' tokenizer_config.json,
and transformers' `apply_chat_template` on each folder's own Jinja chat_template. The files live in
../shared/data beside the checkout; every test here skips cleanly where they are absent.
"""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from helpers import assistant, system, user

from nanotune.data.pretrain import pack_documents
from nanotune.data.sft import IGNORE_INDEX, build_sft_dataset, encode_conversation, encode_prompt
from nanotune.data.templates import generation_stop_ids, get_template
from nanotune.tokenizer import Tokenizer, TokenizerError

LINES = [
    "中医理论认为人体气血阴阳平衡，脾胃为后天之本。",  # Chinese
    "The quick brown fox jumps over the lazy dog, 42 times in 2024.",  # English
    "def square(x: int) -> int:\n    return x ** 2  # {'a': [1, 2]}\n\tprint(f\"{x=}\")",  # code
    "Emoji 🙂👍🏽 and 👨‍👩‍👧 family, 中文🚀混排",  # emoji, with joiners and modifiers
    "  leading spaces, trailing\n\n\nnewlines   ",
]

SINGLE_TURN = [user("What is qi?"), assistant("Qi is the vital energy that flows through the body.")]
WITH_SYSTEM = [system("You are a careful doctor of Chinese medicine.")] + SINGLE_TURN
MULTI_TURN_CHINESE = [
    system("你是一位中医专家，请用中文回答。"),
    user("脾胃是什么？"),
    assistant("脾胃是后天之本，气血生化之源。"),
    user("那么肾呢？"),
    assistant("肾为先天之本，藏精。"),
]
REASONING = [  # reasoning inline in the content, in both replies
    user("What is 17 * 3?"),
    assistant("<think>\n17 * 3 = 51.\n</think>\n\n17 * 3 = 51."),
    user("再加上9呢？"),
    assistant("<think>\n51 + 9 = 60，检查一下：对。\n</think>\n\n结果是60。"),
]
REASONING_FIELD = [  # the same, reasoning given as reasoning_content
    user("What is 17 * 3?"),
    {"role": "assistant", "content": "17 * 3 = 51.", "reasoning_content": "17 * 3 = 51."},
    user("再加上9呢？"),
    {"role": "assistant", "content": "结果是60。", "reasoning_content": "51 + 9 = 60，检查一下：对。"},
]
CONVERSATIONS = {
    "single turn": SINGLE_TURN,
    "system prompt": WITH_SYSTEM,
    "multi-turn Chinese": MULTI_TURN_CHINESE,
    "reasoning": REASONING,
    "reasoning_content": REASONING_FIELD,
}


def shared_folder(name: str):
    folder = SHARED_DATA / name
    if not (folder / "tokenizer.json").exists() or not (folder / "tokenizer_config.json").exists():
        pytest.skip(f"{folder} not present (real tokenizer files)")
    return folder


@pytest.fixture(scope="module")
def qwen3_folder():
    return shared_folder("qwen3")


@pytest.fixture(scope="module")
def llama3_folder():
    return shared_folder("llama3")


def hf_chat_ids(folder, messages, add_generation_prompt=False, **variables) -> list[int]:
    """transformers' apply_chat_template on the folder's own chat_template: the oracle."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    tokenizer = _hf_tokenizers.get(folder) or _hf_tokenizers.setdefault(folder, transformers.AutoTokenizer.from_pretrained(folder))
    return list(tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **variables
    ))


_hf_tokenizers: dict = {}


def config_of(folder) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_ids_equal_the_tokenizers_library_on_chinese_english_code_and_emoji(name):
    from tokenizers import Tokenizer as HFTokenizer

    folder = shared_folder(name)
    reference = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_file(folder)
    assert ours.kind == "hf"
    for line in LINES:
        expected = reference.encode(line, add_special_tokens=False).ids
        assert ours.encode(line) == expected, line
        assert ours.decode(expected) == line
    assert ours.encode_batch(LINES) == [e.ids for e in reference.encode_batch(LINES, add_special_tokens=False)]


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_bos_eos_and_pad_are_what_tokenizer_config_json_says(name):
    from tokenizers import Tokenizer as HFTokenizer

    folder = shared_folder(name)
    reference = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    config = config_of(folder)
    ours = Tokenizer.from_file(folder)

    def declared(key):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return None if value is None else reference.token_to_id(value)

    assert ours.bos_id == declared("bos_token")
    assert ours.eos_id == declared("eos_token") is not None
    assert ours.pad_id == (declared("pad_token") if declared("pad_token") is not None else ours.eos_id)


def test_qwen3_has_no_bos_and_none_is_ever_added(qwen3_folder):
    tokenizer = Tokenizer.from_file(qwen3_folder)
    assert config_of(qwen3_folder)["bos_token"] is None
    assert tokenizer.bos_id is None  # not the ordinary piece spelled "<s>"
    assert tokenizer.piece_to_id("<s>") is not None  # which does exist in the vocabulary
    assert (tokenizer.id_to_piece(tokenizer.eos_id), tokenizer.id_to_piece(tokenizer.pad_id)) == ("<|im_end|>", "<|endoftext|>")
    with pytest.raises(TokenizerError, match="no BOS"):
        tokenizer.encode("x", bos=True)
    # Pretraining documents: [doc] + [eos], nothing in front.
    docs = [tokenizer.encode(line) for line in LINES[:2]]
    block = next(pack_documents(docs, seq_len=len(docs[0]) + len(docs[1]) + 2, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))
    assert block["input_ids"].tolist() == docs[0] + [tokenizer.eos_id] + docs[1] + [tokenizer.eos_id]
    # SFT: the qwen3 sample starts with <|im_start|>, as Qwen3's template does.
    sample = encode_conversation(SINGLE_TURN, tokenizer, "qwen3")
    assert sample["input_ids"][0] == tokenizer.piece_to_id("<|im_start|>")
    assert tokenizer.piece_to_id("<s>") not in sample["input_ids"]


def test_llama3_bos_is_begin_of_text(llama3_folder):
    tokenizer = Tokenizer.from_file(llama3_folder)
    assert tokenizer.bos_id == 128000 and tokenizer.id_to_piece(128000) == "<|begin_of_text|>"
    assert tokenizer.id_to_piece(tokenizer.eos_id) == config_of(llama3_folder)["eos_token"]
    assert encode_conversation(SINGLE_TURN, tokenizer, "llama3")["input_ids"].count(128000) == 1


CASES = [
    ("qwen3", "qwen3", {}),
    ("qwen3", "qwen3_nothink", {"enable_thinking": False}),
    ("llama3", "llama3", {}),
]


@pytest.mark.parametrize("folder_name, template, variables", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_template_equals_apply_chat_template_token_for_token(folder_name, template, variables, conversation):
    folder = shared_folder(folder_name)
    tokenizer = Tokenizer.from_file(folder)
    messages = CONVERSATIONS[conversation]
    assert encode_conversation(messages, tokenizer, template)["input_ids"] == hf_chat_ids(folder, messages, **variables)
    for end in range(len(messages) - 1, 0, -1):  # every generation prompt: the conversation up to a user turn
        if messages[end - 1]["role"] == "user":
            prompt = messages[:end]
            assert encode_prompt(prompt, tokenizer, template) == hf_chat_ids(folder, prompt, True, **variables), end


def trained_runs(sample) -> list[list[int]]:
    """The trained tokens as contiguous runs (labels[t] is the target for token t + 1)."""
    runs, previous = [], False
    for t, label in enumerate(sample["labels"]):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(label)
            assert label == sample["input_ids"][t + 1]
        previous = label != IGNORE_INDEX
    return runs


@pytest.mark.parametrize("template", ["qwen3", "qwen3_nothink"])
def test_qwen3_labels_train_exactly_each_reply_and_its_end_of_turn(qwen3_folder, template):
    tokenizer = Tokenizer.from_file(qwen3_folder)
    im_end = tokenizer.piece_to_id("<|im_end|>")
    sample = encode_conversation(REASONING, tokenizer, template)
    # The earlier reply without its reasoning, the final one with its think block (both templates).
    assert trained_runs(sample) == [
        tokenizer.encode("17 * 3 = 51.<|im_end|>"),
        tokenizer.encode("<think>\n51 + 9 = 60，检查一下：对。\n</think>\n\n结果是60。<|im_end|>"),
    ]
    plain = encode_conversation(MULTI_TURN_CHINESE, tokenizer, template)
    final = "肾为先天之本，藏精。<|im_end|>"
    expected_final = final if template == "qwen3_nothink" else "<think>\n\n</think>\n\n" + final  # nothink: empty block is prompt
    assert trained_runs(plain) == [tokenizer.encode("脾胃是后天之本，气血生化之源。<|im_end|>"), tokenizer.encode(expected_final)]
    for run in trained_runs(sample) + trained_runs(plain):
        assert run[-1] == im_end == generation_stop_ids(template, tokenizer)[0]


def test_llama3_labels_train_exactly_each_reply_and_its_end_of_turn(llama3_folder):
    tokenizer = Tokenizer.from_file(llama3_folder)
    sample = encode_conversation(MULTI_TURN_CHINESE, tokenizer, "llama3")
    assert trained_runs(sample) == [
        tokenizer.encode("脾胃是后天之本，气血生化之源。<|eot_id|>"),
        tokenizer.encode("肾为先天之本，藏精。<|eot_id|>"),
    ]
    assert trained_runs(sample)[0][-1] == tokenizer.piece_to_id("<|eot_id|>") == generation_stop_ids("llama3", tokenizer)[0]


def test_generation_stops_on_the_end_of_turn_and_end_of_text(qwen3_folder, llama3_folder):
    qwen3, llama3 = Tokenizer.from_file(qwen3_folder), Tokenizer.from_file(llama3_folder)
    for name in ("qwen3", "qwen3_nothink", "chatml"):
        assert generation_stop_ids(name, qwen3) == [qwen3.piece_to_id("<|im_end|>"), qwen3.piece_to_id("<|endoftext|>")]
    assert generation_stop_ids("llama3", llama3) == [llama3.piece_to_id("<|eot_id|>"), llama3.piece_to_id("<|end_of_text|>")]
    assert llama3.eos_id in generation_stop_ids("llama3", llama3) and qwen3.eos_id in generation_stop_ids("qwen3", qwen3)


def test_reasoning_turns_every_trains_each_reply_with_its_reasoning(qwen3_folder, tmp_path):
    tokenizer = Tokenizer.from_file(qwen3_folder)
    path = tmp_path / "reasoning.jsonl"
    path.write_text(json.dumps({"messages": REASONING}, ensure_ascii=False) + "\n", encoding="utf-8")
    last = build_sft_dataset([path], tokenizer, "qwen3", max_length=512)
    every = build_sft_dataset([path], tokenizer, "qwen3", max_length=512, reasoning_turns="every")
    assert len(last) == 1 and len(every) == 2
    first, second = (every[i] for i in range(2))
    # Each sample is Qwen3's own rendering of the conversation up to that reply...
    assert first["input_ids"].tolist() == hf_chat_ids(qwen3_folder, REASONING[:2])
    assert second["input_ids"].tolist() == hf_chat_ids(qwen3_folder, REASONING)
    # ... and trains only that reply, with its think block.
    as_sample = lambda item: {k: v.tolist() for k, v in item.items()}  # noqa: E731
    assert trained_runs(as_sample(first)) == [tokenizer.encode("<think>\n17 * 3 = 51.\n</think>\n\n17 * 3 = 51.<|im_end|>")]
    assert trained_runs(as_sample(second)) == [tokenizer.encode("<think>\n51 + 9 = 60，检查一下：对。\n</think>\n\n结果是60。<|im_end|>")]
    # For templates that keep every reply as written, "every" changes nothing.
    assert len(build_sft_dataset([path], tokenizer, "chatml", max_length=512, reasoning_turns="every")) == 1


def test_qwen3_nothink_prompt_ends_with_the_empty_think_block(qwen3_folder):
    tokenizer = Tokenizer.from_file(qwen3_folder)
    prompt = encode_prompt(SINGLE_TURN[:1], tokenizer, "qwen3_nothink")
    assert prompt[-len(tokenizer.encode("<think>\n\n</think>\n\n")):] == tokenizer.encode("<think>\n\n</think>\n\n")
    assert get_template("qwen3").render(SINGLE_TURN[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
