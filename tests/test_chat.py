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


# ------------------------------------------------------------------------------------------------
# Templates and adapters travel: what chat and evaluate read from a run's final/
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny base (pretrained from scratch), a full SFT of it and a LoRA SFT of it, both with
    the belle template, as `train_pt.py` / `train_sft.py` write them."""
    import json
    import random

    import train_pt
    import train_sft
    from helpers import corpus_lines

    folder = tmp_path_factory.mktemp("trained")
    tokenizer = train_sentencepiece(folder, vocab_size=400, lines=corpus_lines(300, seed=1))
    (folder / "corpus.txt").write_text("\n".join(corpus_lines(120, seed=2)) + "\n", encoding="utf-8")
    rng, lines = random.Random(0), corpus_lines(60, seed=3)
    conversations = [[{"role": "user", "content": lines[i][: rng.randint(5, 40)]},
                      {"role": "assistant", "content": lines[i + 30][: rng.randint(3, 30)]}] for i in range(24)]
    (folder / "chat.jsonl").write_text(
        "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations), encoding="utf-8")
    shape = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
             "--model.num_attention_heads=4", "--model.num_key_value_heads=2", "--model.max_position_embeddings=256"]
    common = ["--log.progress_bar=false", "--train.batch_size=4", "--optim.lr=3e-2"]
    train_pt.main([f"--output_dir={folder / 'base'}", f"--tokenizer.path={tokenizer}",
                   f"--data.train_files={folder / 'corpus.txt'}", "--data.seq_len=32", "--data.num_workers=1",
                   "--train.max_steps=3", *shape, *common])
    base = folder / "base" / "final"
    sft = [f"--data.train_files={folder / 'chat.jsonl'}", "--data.template=belle", "--data.max_length=64",
           f"--model.path={base}", "--train.max_steps=6", *common]
    train_sft.main([f"--output_dir={folder / 'sft'}", *sft])
    train_sft.main([f"--output_dir={folder / 'lora'}", *sft, "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.1",
                    "--lora.targets=all-linear"])
    return {"base": base, "sft": folder / "sft" / "final", "lora": folder / "lora" / "final",
            "data": folder / "chat.jsonl", "root": folder, "question": lines[0][:20]}


def _chat(monkeypatch, capsys, *args, text: str) -> tuple[list[str], str]:
    """(the replies, stderr) of `python -m nanotune.chat ARGS` answering the lines of `text`."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    chat.main([*args, "--max-new-tokens", "8", "--device", "cpu", "--verbose"])
    out, err = capsys.readouterr()
    return [line.removeprefix("assistant: ") for line in out.splitlines() if line.startswith("assistant: ")], err


def test_chat_defaults_to_the_template_and_stop_ids_the_model_was_trained_with(trained, monkeypatch, capsys):
    from nanotune.data.templates import generation_stop_ids

    assert 'template = "belle"' in (trained["sft"] / "training_config.toml").read_text()
    replies, err = _chat(monkeypatch, capsys, "--model", str(trained["sft"]), text=f"{trained['question']}\n")
    tokenizer = Tokenizer.from_file(trained["sft"])
    assert f"(template belle, stop ids {generation_stop_ids('belle', tokenizer)})" in err
    assert f"Human: \n{trained['question']}\n\nAssistant: \n" in err  # the prompt is laid out as belle
    assert len(replies) == 1

    # An explicit --template wins, checked against the folder's chat_template (saved as belle's).
    with pytest.raises(chat.ConfigError, match="renders differently .* --no-template-check"):
        _chat(monkeypatch, capsys, "--model", str(trained["sft"]), "--template", "vicuna", text="hi\n")
    _, err = _chat(monkeypatch, capsys, "--model", str(trained["sft"]), "--template", "vicuna",
                   "--no-template-check", text="hi\n")
    assert "(template vicuna," in err and "USER: hi ASSISTANT:" in err


def test_without_a_training_config_the_folder_chat_template_picks_the_template(trained, monkeypatch, capsys):
    import shutil

    copy = trained["root"] / "sft_copy"
    shutil.copytree(trained["sft"], copy)
    (copy / "training_config.toml").unlink()
    (copy / "generation_config.json").unlink()
    _, err = _chat(monkeypatch, capsys, "--model", str(copy), text="hi\n")
    assert "(template belle," in err


def test_chat_with_an_adapter_answers_as_the_merged_model(trained, monkeypatch, capsys):
    import merge

    merged = trained["root"] / "merged"
    if not merged.exists():
        merge.merge_lora_checkpoint(trained["base"], trained["lora"], merged)
    text = f"{trained['question']}\n脾胃是后天之本吗？\n"
    with_adapter, err = _chat(monkeypatch, capsys, "--model", str(trained["base"]), "--adapter", str(trained["lora"]),
                              text=text)
    assert "(template belle," in err  # from the adapter folder's training_config.toml
    # Without --model the base is the one adapter_config.json names.
    base_from_config, _ = _chat(monkeypatch, capsys, "--adapter", str(trained["lora"]), text=text)
    merged_replies, _ = _chat(monkeypatch, capsys, "--model", str(merged), "--template", "belle", text=text)
    base_replies, _ = _chat(monkeypatch, capsys, "--model", str(trained["base"]), "--template", "belle", text=text)
    assert len(with_adapter) == 2
    assert with_adapter == base_from_config == merged_replies
    assert with_adapter != base_replies  # the adapter changes the answers


def test_evaluate_with_an_adapter_equals_the_merged_model(trained, capsys):
    import json

    import merge
    from nanotune.evaluate import main as evaluate_main

    merged = trained["root"] / "merged"
    if not merged.exists():
        merge.merge_lora_checkpoint(trained["base"], trained["lora"], merged)

    def evaluate(*args):
        evaluate_main([*args, "--data", str(trained["data"]), "--generate", "--max-new-tokens", "6", "--json",
                       "--device", "cpu", "--batch-size", "4"])
        return json.loads(capsys.readouterr().out)

    with_adapter = evaluate("--model", str(trained["base"]), "--adapter", str(trained["lora"]))
    merged_result = evaluate("--model", str(merged), "--template", "belle")
    base_result = evaluate("--model", str(trained["base"]), "--template", "belle")
    assert with_adapter["template"] == "belle"
    assert with_adapter["loss"] == pytest.approx(merged_result["loss"], rel=1e-5)
    assert with_adapter["bleu4"] == merged_result["bleu4"] and with_adapter["rougeL"] == merged_result["rougeL"]
    assert abs(with_adapter["loss"] - base_result["loss"]) > 1e-3  # the adapter is applied


def test_lora_final_folder_loads_in_peft_offline_with_the_same_logits(trained):
    import json

    import torch

    from nanotune.checkpoint import load_pretrained
    from nanotune.lora import load_adapter

    pytest.importorskip("peft")
    config = json.loads((trained["lora"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained["base"].resolve())
    assert (trained["lora"] / "training_config.toml").exists()
    ids = [[1, 5, 9, 33, 70, 2, 11, 4]]
    script = (
        "import json, sys, torch, peft\n"
        f"model = peft.AutoPeftModelForCausalLM.from_pretrained({str(trained['lora'])!r}).eval()\n"
        f"print(json.dumps(model(input_ids=torch.tensor({ids})).logits.tolist()))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=trained["root"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    theirs = torch.tensor(json.loads(completed.stdout.strip().splitlines()[-1]))
    model = load_adapter(load_pretrained(trained["base"]), trained["lora"])
    with torch.no_grad():
        ours = model(torch.tensor(ids))
    assert (ours - theirs).abs().max() <= 1e-5
