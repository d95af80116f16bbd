"""nanotune/chat.py: the CLI answers a scripted conversation on stdin, and every prompt holds the
whole conversation so far, tokenised as Meta's Llama-2 chat code builds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanotune.chat as chat
from helpers import tiny_model, train_sentencepiece
from nanotune.checkpoint import save_pretrained
from nanotune.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny saved model with its tokenizer beside it, as `--model DIR` expects."""
    folder = tmp_path_factory.mktemp("chat")
    tokenizer = Tokenizer.from_file(train_sentencepiece(folder / "spm", vocab_size=400))
    model = tiny_model(seed=0, vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    save_pretrained(model, folder / "model")
    tokenizer.save(folder / "model")
    return folder / "model"


def meta_llama2_prompt(tokenizer, exchanges: list[tuple[str, str]], question: str) -> list[int]:
    """Meta's `chat_completion` construction (llama/generation.py), transcribed literally."""
    ids = []
    for user, answer in exchanges:
        ids += tokenizer.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)
    return ids + tokenizer.encode(f"[INST] {question.strip()} [/INST]", bos=True, eos=False)


def test_chat_cli_answers_a_scripted_two_turn_conversation(model_dir):
    first, second = "中医理论认为什么？", "脾胃是后天之本吗？"
    completed = subprocess.run(
        [sys.executable, "-m", "nanotune.chat", "--model", str(model_dir), "--template", "llama2",
         "--max-new-tokens", "6", "--verbose"],
        input=f"{first}\n{second}\n", capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    replies = [line.removeprefix("assistant: ") for line in lines if line.startswith("assistant: ")]
    assert len(replies) == 2 and all(replies), completed.stdout
    prompts = completed.stderr.split("--- prompt")[1:]
    assert len(prompts) == 2, completed.stderr
    assert first in prompts[0] and second not in prompts[0]
    # The second prompt carries the first exchange (question and the model's answer) before the new question.
    assert f"[INST] {first} [/INST] {replies[0]} </s><s>[INST] {second} [/INST]" in prompts[1]


def test_each_prompt_is_the_whole_conversation_tokenised_as_meta_does(model_dir, monkeypatch):
    model, tokenizer = tiny_model(seed=0, vocab_size=400, max_position_embeddings=256), Tokenizer.from_file(model_dir)
    prompts_seen = []
    real_generate = chat.generate

    def recording_generate(model, prompt_ids, *args, **kwargs):
        prompts_seen.append(list(prompt_ids))
        return real_generate(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(chat, "generate", recording_generate)
    session = chat.ChatSession(model, tokenizer, "llama2", system="你是中医助手。", max_new_tokens=5)
    first = session.reply("什么是气血？")
    second = session.reply("肝主什么？")
    assert first and second
    with_system = "<<SYS>>\n你是中医助手。\n<</SYS>>\n\n什么是气血？"
    assert prompts_seen[0] == meta_llama2_prompt(tokenizer, [], with_system)
    assert prompts_seen[1] == meta_llama2_prompt(tokenizer, [(with_system, first)], "肝主什么？")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]

    # /reset forgets the exchanges but keeps the system prompt.
    out = _run_lines(session, ["/reset", "肾藏什么？", "/exit", "never read"])
    assert out.count("assistant: ") == 1 and "(conversation reset)" in out
    with_system = "<<SYS>>\n你是中医助手。\n<</SYS>>\n\n肾藏什么？"
    assert prompts_seen[2] == meta_llama2_prompt(tokenizer, [], with_system)
    assert len(prompts_seen) == 3  # nothing after /exit


def test_oldest_exchanges_are_dropped_to_fit_the_context_window(model_dir):
    tokenizer = Tokenizer.from_file(model_dir)
    model = tiny_model(seed=0, vocab_size=400, max_position_embeddings=64)
    session = chat.ChatSession(model, tokenizer, "llama2", max_new_tokens=8)
    session.messages = [
        {"role": "user", "content": "中医理论认为人体气血阴阳平衡" * 2},
        {"role": "assistant", "content": "脾胃是后天之本"},
    ]
    session.reply("肝主疏泄吗？")
    assert session.messages[0]["content"] == "肝主疏泄吗？"  # the long first exchange is gone


def test_clean_reply_cuts_at_stop_strings_and_strips():
    assert chat.clean_reply("  问题是什么？<|im_end|>\n多余", ["<|im_end|>"]) == "问题是什么？"
    assert chat.clean_reply(" 没有结束标记 ") == "没有结束标记"


def _run_lines(session, lines) -> str:
    import io

    out = io.StringIO()
    chat.run_chat(session, lines, out)
    return out.getvalue()
