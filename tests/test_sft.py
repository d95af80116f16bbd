"""SFT encoding: -100 masking of multi-turn conversations, Meta's Llama-2 tokens, truncation,
padding and packing.

Oracles: label tables built by hand from separately tokenised pieces, a literal transcription of
Meta's `chat_completion` token construction run on SentencePiece directly, re-encoding of the
shortened conversation, hand-computed bin packing, and the padded batch's loss for the packed one.
"""

from __future__ import annotations

import json
import logging

import pytest
import sentencepiece as spm
import torch
from helpers import assistant, system, tiny_model, train_sentencepiece, user

from nanotune.data.collate import PaddingCollator, collate_blocks
from nanotune.data.sft import (
    IGNORE_INDEX,
    PackedSFTDataset,
    build_sft_dataset,
    encode_conversation,
    encode_conversation_with_outcome,
    encode_prompt,
    make_packed_block,
    pack_conversations,
    plan_packing,
)
from nanotune.data.templates import TEMPLATES, TableTemplate, get_template
from nanotune.tokenizer import Tokenizer, write_hf_tokenizer_files


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny LLaMA-like SentencePiece BPE (byte fallback, dummy prefix), vocab 400."""
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=400))


TWO_TURNS = [
    user("中医理论认为什么？"), assistant("人体气血阴阳平衡。"),
    user("What does training do?"), assistant("The loss falls over many steps."),
]


def long_conversation(n_turns=4):
    conversation = [system("中医 理论")]
    for i in range(n_turns):
        conversation += [user(f"question {i}: the model learns to predict the next token"), assistant(f"answer {i}: 脾胃是后天之本 and the loss falls")]
    return conversation


# --------------------------------------------------------------------------------------------------
# Item 1: the label table
# --------------------------------------------------------------------------------------------------


def test_labels_mask_every_prompt_token_and_train_every_reply_and_its_eos(tokenizer):
    """[BOS][INST]U1[/INST]A1[EOS][BOS][INST]U2[/INST]A2[EOS], pieces tokenised by hand."""
    B, E = tokenizer.bos_id, tokenizer.eos_id
    expected_ids, expected_labels = [], []
    for question, answer in (("中医理论认为什么？", "人体气血阴阳平衡。"), ("What does training do?", "The loss falls over many steps.")):
        prompt = tokenizer.encode(f"[INST] {question} [/INST]")
        pair = tokenizer.encode(f"[INST] {question} [/INST] {answer} ")
        assert pair[: len(prompt)] == prompt
        reply = pair[len(prompt):]
        expected_ids += [B] + prompt + reply + [E]
        # position:  BOS and prompt tokens but the last | last prompt token .. reply | EOS
        # label:     -100 (next is prompt)              | the reply tokens, then EOS | -100 (next is BOS)
        expected_labels += [IGNORE_INDEX] * len(prompt) + reply + [E] + [IGNORE_INDEX]
    sample = encode_conversation(TWO_TURNS, tokenizer, "llama2")
    assert sample["input_ids"] == expected_ids
    assert sample["labels"] == expected_labels
    # The convention, stated directly: labels[t] is input_ids[t+1] or -100, the last always -100.
    ids, labels = sample["input_ids"], sample["labels"]
    assert all(labels[t] in (ids[t + 1], IGNORE_INDEX) for t in range(len(ids) - 1)) and labels[-1] == IGNORE_INDEX
    assert labels.count(E) == 2  # both replies end with a trained EOS


def test_label_table_with_the_real_llama2_tokenizer(llama2_tokenizer_path):
    """The seed's table with ids written out: BOS=1, EOS=2, "[INST]"=518 25580 29962."""
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path)
    sample = encode_conversation([user("Hi"), assistant("Hello"), user("Bye"), assistant("Ciao")], tokenizer, "llama2")
    INST, END_INST, X = [518, 25580, 29962], [518, 29914, 25580, 29962], IGNORE_INDEX
    Hi, Hello, space = 6324, 15043, 29871  # "▁Hi", "▁Hello", "▁"
    Bye, Ciao = [2648, 29872], [315, 29653]  # "▁By" "e", "▁C" "iao"
    assert sample["input_ids"] == [1, *INST, Hi, *END_INST, Hello, space, 2] + [1, *INST, *Bye, *END_INST, *Ciao, space, 2]
    assert sample["labels"] == [X, X, X, X, X, X, X, X, Hello, space, 2, X] + [X, X, X, X, X, X, X, X, X, *Ciao, space, 2, X]


def test_train_on_prompt_trains_everything_but_bos(tokenizer):
    sample = encode_conversation(TWO_TURNS, tokenizer, "llama2", train_on_prompt=True)
    ids, labels = sample["input_ids"], sample["labels"]
    expected = [ids[t + 1] if ids[t + 1] != tokenizer.bos_id else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    assert labels == expected


# --------------------------------------------------------------------------------------------------
# Item 2: Meta's Llama-2 reference construction, token for token
# --------------------------------------------------------------------------------------------------


def meta_llama2_dialog_tokens(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Transcribed from facebookresearch/llama llama/generation.py `chat_completion`."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s, bos, eos):
        t = sp.encode(s)
        if bos:
            t = [sp.bos_id()] + t
        if eos:
            t = t + [sp.eos_id()]
        return t

    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    dialog_tokens = sum(
        [
            encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ", bos=True, eos=True)
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    if len(dialog) % 2 == 1:
        dialog_tokens += encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


META_DIALOGS = {
    "single_turn_en": [user("What is the recipe of mayonnaise?"), assistant("Eggs, oil and lemon juice.")],
    "single_turn_zh": [user("中医理论认为人体的根本是什么？"), assistant("脾胃为后天之本，肾为先天之本。")],
    "multi_turn_mixed": [
        user("I am going to Paris, what should I see?"), assistant("The Eiffel Tower and the Louvre."),
        user("那里的菜怎么样？"), assistant("法国菜以酱汁著称。"),
        user("What is so great about #1?"), assistant("Its views of the city."),
    ],
    "system_prompt": [
        system("Always answer with Haiku"), user("I am going to Paris, what should I see?"), assistant("Tower of iron\nrising"),
        user("还有呢？"), assistant("卢浮宫。"),
    ],
    "system_prompt_zh": [system("你是一位中医专家。"), user("肝的功能是什么？"), assistant("肝主疏泄。")],
    "stray_spaces": [
        system("  Be brief.  "), user("   Hi there   "), assistant("\n  Hello!  \n"),
        user(" 你好 "), assistant("  我很好  "), user("\tlast\t"), assistant(" ok "),
    ],
}


@pytest.mark.parametrize("name", sorted(META_DIALOGS))
def test_llama2_tokens_equal_metas_reference_construction(llama2_tokenizer_path, name):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path)
    dialog = META_DIALOGS[name]
    sample = encode_conversation(dialog, tokenizer, "llama2")
    assert sample["input_ids"] == meta_llama2_dialog_tokens(sp, dialog)
    # The trained tokens of each exchange decode to exactly its (stripped) reply.
    ids, labels = sample["input_ids"], sample["labels"]
    targets = [labels[t] for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
    replies = [m["content"].strip() for m in dialog if m["role"] == "assistant"]
    runs = _split_after(targets, sp.eos_id())
    assert [sp.decode(run[:-1]) for run in runs] == [reply + " " for reply in replies]  # Meta's space before EOS
    # The generation prompt (conversation without its last reply) is Meta's too.
    prompt = dialog[:-1]
    assert encode_prompt(prompt, tokenizer, "llama2") == meta_llama2_dialog_tokens(sp, prompt)
    assert sample["input_ids"][: len(encode_prompt(prompt, tokenizer, "llama2"))] == encode_prompt(prompt, tokenizer, "llama2")


def test_llama2_tokens_are_the_same_through_the_tokenizer_json_twin(llama2_tokenizer_path, tmp_path):
    """A model folder may hold tokenizer.json only; the HF backend must give Meta's tokens too."""
    write_hf_tokenizer_files(llama2_tokenizer_path, tmp_path)
    hf_tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    for dialog in META_DIALOGS.values():
        assert encode_conversation(dialog, hf_tokenizer, "llama2")["input_ids"] == meta_llama2_dialog_tokens(sp, dialog)


def _split_after(values, separator):
    runs, current = [], []
    for value in values:
        current.append(value)
        if value == separator:
            runs.append(current)
            current = []
    return runs


def test_a_merge_across_the_prompt_reply_boundary_goes_to_the_reply(tokenizer):
    """Prompt "...the trai" + reply "ning ...": the piece "raining" straddles the boundary."""
    split_word = TableTemplate(name="split_word", user_format="{content}\n", assistant_prefix="the trai", reply_format="{content}")
    conversation = [user("中医"), assistant("ning makes the loss fall")]
    sample = encode_conversation(conversation, tokenizer, split_word)
    one_call = tokenizer.encode("中医\nthe training makes the loss fall")
    assert sample["input_ids"] == [tokenizer.bos_id] + one_call + [tokenizer.eos_id]  # tokens of one call
    prompt = [tokenizer.bos_id] + tokenizer.encode("中医\nthe trai")
    boundary = next(i for i, (a, b) in enumerate(zip(prompt, sample["input_ids"])) if a != b)
    assert boundary < len(prompt) - 1  # the tokenizer really merged across the boundary
    first_target = next(t for t, label in enumerate(sample["labels"]) if label != IGNORE_INDEX) + 1
    assert first_target == boundary  # the straddling piece is the first trained token
    assert tokenizer.id_to_piece(sample["input_ids"][first_target]) == "raining"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_tokenises_the_prompt_as_the_start_of_the_training_sample(tokenizer, name):
    conversation = [system("中医 理论")] + TWO_TURNS
    sample = encode_conversation(conversation, tokenizer, name)
    prompt = encode_prompt(conversation[:-1], tokenizer, name)
    assert sample["input_ids"][: len(prompt)] == prompt
    assert sample["labels"][len(prompt) - 1] != IGNORE_INDEX  # the first reply token is a target
    assert all(label == IGNORE_INDEX for label in sample["labels"][: len(prompt) - 1][-3:])
    if name not in ("chatml", "llama3", "qwen3", "qwen3_nothink"):  # those end a reply with "<|im_end|>" / "<|eot_id|>" text
        assert sample["labels"][-2] == tokenizer.eos_id


# --------------------------------------------------------------------------------------------------
# Item 5: truncation strategies
# --------------------------------------------------------------------------------------------------


def exchange_starts(sample, tokenizer):
    """Index of each BOS (llama2 starts every exchange with one)."""
    return [i for i, token in enumerate(sample["input_ids"]) if token == tokenizer.bos_id]


def test_drop_leaves_out_an_over_long_conversation(tokenizer):
    conversation = long_conversation()
    full = encode_conversation(conversation, tokenizer, "llama2")
    n = len(full["input_ids"])
    assert encode_conversation(conversation, tokenizer, "llama2", max_length=n, truncation="drop") == full
    assert encode_conversation_with_outcome(conversation, tokenizer, "llama2", n - 1, truncation="drop") == (None, "dropped")


def test_truncate_keeps_the_exchanges_that_fit_and_cuts_the_last_reply(tokenizer):
    conversation = long_conversation()
    full = encode_conversation(conversation, tokenizer, "llama2")
    starts = exchange_starts(full, tokenizer)
    third_start = starts[2]
    first_reply_label = next(t for t in range(third_start, len(full["labels"])) if full["labels"][t] != IGNORE_INDEX)
    # Cut inside the third reply: the first max_length tokens, the last label -100.
    max_length = first_reply_label + 4
    sample, outcome = encode_conversation_with_outcome(conversation, tokenizer, "llama2", max_length, truncation="truncate")
    assert outcome == "truncated"
    assert sample["input_ids"] == full["input_ids"][:max_length]
    assert sample["labels"] == full["labels"][: max_length - 1] + [IGNORE_INDEX]
    assert sum(label != IGNORE_INDEX for label in sample["labels"][third_start:]) == 3
    # Cut inside the third prompt: that exchange is left out entirely.
    sample = encode_conversation(conversation, tokenizer, "llama2", max_length=first_reply_label - 2)
    assert sample == {"input_ids": full["input_ids"][:third_start], "labels": full["labels"][:third_start]}
    # Cut inside the first prompt: nothing to train on.
    assert encode_conversation_with_outcome(conversation, tokenizer, "llama2", 5) == (None, "no_target")


def test_truncate_left_drops_the_oldest_exchanges_and_keeps_the_system_prompt(tokenizer):
    conversation = long_conversation(4)
    last_two = [conversation[0]] + conversation[5:]
    last_one = [conversation[0]] + conversation[7:]
    expected = encode_conversation(last_two, tokenizer, "llama2")
    max_length = len(expected["input_ids"]) + 3  # room for two exchanges, not three
    assert len(encode_conversation([conversation[0]] + conversation[3:], tokenizer, "llama2")["input_ids"]) > max_length
    sample, outcome = encode_conversation_with_outcome(conversation, tokenizer, "llama2", max_length, truncation="truncate_left")
    assert outcome == "truncated"
    assert sample == expected
    assert "<<SYS>>\n中医 理论\n<</SYS>>" in tokenizer.decode(sample["input_ids"])  # folded into the new first turn
    # Even the last exchange alone is too long: its reply is cut.
    alone = encode_conversation(last_one, tokenizer, "llama2")
    short = len(alone["input_ids"]) - 3
    sample = encode_conversation(conversation, tokenizer, "llama2", max_length=short, truncation="truncate_left")
    assert sample["input_ids"] == alone["input_ids"][:short]


def test_build_sft_dataset_counts_dropped_truncated_and_skipped(tokenizer, tmp_path, caplog):
    short = {"messages": TWO_TURNS}
    long = {"messages": long_conversation()}
    lines = [json.dumps(short, ensure_ascii=False), json.dumps(long, ensure_ascii=False), "not json", json.dumps({"messages": [user("x")]})]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    short_length = len(encode_conversation(TWO_TURNS, tokenizer, "llama2")["input_ids"])
    with caplog.at_level(logging.INFO, logger="nanotune"):
        dataset = build_sft_dataset([path], tokenizer, "llama2", max_length=short_length, skip_invalid=True)
    assert len(dataset) == 2 and dataset.lengths == [short_length, short_length]
    assert dataset.stats["invalid"] == 2 and dataset.stats["truncated"] == 1 and dataset.stats["kept"] == 1
    assert dataset[0]["input_ids"].tolist() == encode_conversation(TWO_TURNS, tokenizer, "llama2")["input_ids"]
    assert dataset[0]["input_ids"].dtype == torch.long
    assert "1 truncated, 0 dropped" in caplog.text and "2 invalid skipped" in caplog.text
    dropped = build_sft_dataset([path], tokenizer, "llama2", max_length=short_length, truncation="drop", skip_invalid=True)
    assert len(dropped) == 1 and dropped.stats["dropped"] == 1
    packed = PackedSFTDataset(dataset, seq_len=2 * short_length, pad_id=tokenizer.pad_id)
    assert len(packed) == 1 and packed.stats["fill"] == 1.0
    assert packed[0]["document_ids"].tolist() == [0] * short_length + [1] * short_length


# --------------------------------------------------------------------------------------------------
# Item 5: padding and packing give the same loss
# --------------------------------------------------------------------------------------------------


def some_samples(tokenizer, template="llama2"):
    conversations = [TWO_TURNS, long_conversation(1), long_conversation(2), TWO_TURNS[:2], long_conversation(3), TWO_TURNS[2:]]
    return [encode_conversation(c, tokenizer, template) for c in conversations]


def test_padding_collator_pads_right_to_a_multiple_of_8_with_ignored_labels(tokenizer):
    samples = some_samples(tokenizer)[:3]
    batch = PaddingCollator(pad_id=tokenizer.pad_id)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    B, T = batch["input_ids"].shape
    assert (B, T) == (3, -(-longest // 8) * 8) and T % 8 == 0
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == sample["input_ids"]
        assert batch["labels"][row, :n].tolist() == sample["labels"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_best_fit_decreasing_packing_by_hand():
    # 5 -> new bin (room 3); 4 -> new bin (room 4); 3 -> the bin with room 3; 3 -> room 4 (left 1);
    # 2 -> nothing fits, new bin; 1 -> the bin with room 1 (best fit, not the one with room 6).
    assert plan_packing([5, 4, 3, 3, 2, 1], seq_len=8) == [[0, 2], [1, 3, 5], [4]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than seq_len 8"):
        plan_packing([3, 9], seq_len=8)


def test_packed_blocks_restart_positions_and_never_split_a_conversation(tokenizer):
    samples = some_samples(tokenizer)
    seq_len = 256
    blocks = pack_conversations(samples, seq_len, pad_id=tokenizer.pad_id)
    seen = []
    for block in blocks:
        assert all(block[key].shape == (seq_len,) for key in ("input_ids", "labels", "position_ids", "document_ids"))
        documents = block["document_ids"].tolist()
        for document in sorted(set(documents) - {-1}):
            where = [i for i, d in enumerate(documents) if d == document]
            assert where == list(range(where[0], where[0] + len(where)))  # contiguous
            assert block["position_ids"][where].tolist() == list(range(len(where)))
            seen.append(block["input_ids"][where].tolist())
            assert block["labels"][where[-1]] == IGNORE_INDEX  # no label crosses into the next one
        padding = [i for i, d in enumerate(documents) if d == -1]
        assert (block["labels"][padding] == IGNORE_INDEX).all()
    assert sorted(seen) == sorted(s["input_ids"] for s in samples)  # each conversation exactly once, whole
    dataset = PackedSFTDataset(samples, seq_len, pad_id=tokenizer.pad_id)
    assert len(dataset) == len(blocks) and all(torch.equal(dataset[i]["labels"], blocks[i]["labels"]) for i in range(len(blocks)))
    assert dataset.stats["fill"] == pytest.approx(sum(len(s["input_ids"]) for s in samples) / (len(blocks) * seq_len))


def test_packed_loss_equals_padded_loss_through_llama(tokenizer):
    samples = some_samples(tokenizer)
    model = tiny_model(seed=0, vocab_size=tokenizer.vocab_size).eval()
    padded = PaddingCollator(pad_id=tokenizer.pad_id)(samples)
    packed = collate_blocks(PackedSFTDataset(samples, seq_len=256, pad_id=tokenizer.pad_id))
    assert packed["input_ids"].shape[0] < len(samples)  # several conversations really share a row
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        padded_loss = model(padded["input_ids"], labels=padded["labels"])
        packed_loss = model(
            packed["input_ids"], position_ids=packed["position_ids"], document_ids=packed["document_ids"], labels=packed["labels"]
        )
    assert padded_loss.item() > 0
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=0)


def test_make_packed_block_refuses_samples_that_do_not_fit():
    sample = {"input_ids": [1, 2, 3], "labels": [2, 3, IGNORE_INDEX]}
    with pytest.raises(ValueError, match="do not fit in seq_len 5"):
        make_packed_block([sample, sample], seq_len=5)


def test_bad_truncation_strategy_is_named(tokenizer):
    with pytest.raises(ValueError, match="truncation must be one of drop, truncate, truncate_left, not 'middle'"):
        encode_conversation(TWO_TURNS, tokenizer, get_template("llama2"), max_length=8, truncation="middle")
