"""Every command-line tool turns a user's mistake into one line on stderr and exit status 2: no
traceback, the last line names the file, key or flag, and nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model, train_sentencepiece

from nanotune.checkpoint import save_pretrained
from nanotune.lora import apply_lora, save_adapter
from nanotune.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *names: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last, last
    for name in names:
        assert name in last, (name, last)


def assert_nothing_half_written(folder) -> None:
    leftovers = [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model folder (weights + tokenizer), a LoRA adapter folder, and a broken data file."""
    folder = tmp_path_factory.mktemp("cli")
    tokenizer_path = train_sentencepiece(folder / "tok", vocab_size=400)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    model = tiny_model(seed=0, vocab_size=tokenizer.vocab_size)
    save_pretrained(model, folder / "model")
    tokenizer.save(folder / "model")
    apply_lora(model, r=2, alpha=4.0, dropout=0.0, targets=["q_proj"])
    save_adapter(model, folder / "adapter")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (folder / "broken.jsonl").write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user"\n', encoding="utf-8")
    (folder / "good.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")
    (folder / "bad_utf8.jsonl").write_bytes(json.dumps(good).encode() + b'\n{"messages": "\xff"}\n')
    (folder / "junk.model").write_text("not a sentencepiece model\n")
    (folder / "a_folder").mkdir()
    return folder


def test_chat_missing_model_folder(workdir):
    assert_user_error(run_tool("nanotune.chat", "--model", "no_such_model", cwd=workdir), "no_such_model")


def test_chat_lora_adapter_folder_given_as_the_model(workdir):
    result = run_tool("nanotune.chat", "--model", "adapter", cwd=workdir)
    assert_user_error(result, "adapter", "LoRA adapter", "merge.py lora")


def test_chat_negative_temperature(workdir):
    assert_user_error(run_tool("nanotune.chat", "--model", "model", "--temperature", "-1", cwd=workdir), "--temperature")
    assert_user_error(run_tool("nanotune.chat", "--model", "model", "--top-p", "1.5", cwd=workdir), "--top-p")


def test_chat_cuda_without_cuda(workdir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid")
    assert_user_error(run_tool("nanotune.chat", "--model", "model", "--device", "cuda", cwd=workdir), "--device cuda")


def test_evaluate_broken_data_line_names_file_and_line(workdir):
    result = run_tool("nanotune.evaluate", "--model", "model", "--data", "broken.jsonl", "--template", "llama2",
                      "--device", "cpu", cwd=workdir)
    assert_user_error(result, "broken.jsonl:2")


def test_evaluate_zero_batch_size_and_adapter_folder(workdir):
    result = run_tool("nanotune.evaluate", "--model", "model", "--data", "good.jsonl", "--template", "llama2",
                      "--batch-size", "0", cwd=workdir)
    assert_user_error(result, "--batch-size")
    result = run_tool("nanotune.evaluate", "--model", "adapter", "--data", "good.jsonl", "--template", "llama2",
                      cwd=workdir)
    assert_user_error(result, "adapter", "LoRA adapter")
    result = run_tool("nanotune.evaluate", "--model", "model", "--data", "good.jsonl", "--template", "llama2",
                      "--predictions", "a_folder", "--device", "cpu", cwd=workdir)
    assert_user_error(result, "a_folder")
    assert_nothing_half_written(workdir)


def test_convert_bad_utf8_and_an_output_folder(workdir):
    result = run_tool("nanotune.data.convert", "--input", "bad_utf8.jsonl", "--output", "out/converted.jsonl", cwd=workdir)
    assert_user_error(result, "bad_utf8.jsonl:2", "not valid UTF-8")
    assert not (workdir / "out" / "converted.jsonl").exists()
    result = run_tool("nanotune.data.convert", "--input", "good.jsonl", "--output", "a_folder", cwd=workdir)
    assert_user_error(result, "a_folder", "is a directory")
    assert_nothing_half_written(workdir)


def test_tokenizer_tools(workdir):
    result = run_tool("tokenizer_tools.train_spm", "--input", "a_folder", "--output", "spm/zh", cwd=workdir)
    assert_user_error(result, "a_folder", "is a directory")
    result = run_tool("tokenizer_tools.merge_spm", "--base", "junk.model", "--extra", "junk.model", "--output", "merged",
                      cwd=workdir)
    assert_user_error(result, "junk.model")
    result = run_tool("tokenizer_tools.compare", "--tokenizer", "missing.model", "--input", "good.jsonl", cwd=workdir)
    assert_user_error(result, "missing.model")
    assert not (workdir / "merged").exists()
