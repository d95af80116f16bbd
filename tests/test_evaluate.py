"""nanotune/evaluate.py: loss and perplexity against a hand computation from the model's logits;
predictions against one-by-one generation; scores against metrics.py; the CLI end to end."""

from __future__ import annotations

import json
import math
import pytest
import torch

from helpers import tiny_model, train_sentencepiece
from nanotune.checkpoint import save_pretrained
from nanotune.data.sft import encode_conversation, encode_prompt
from nanotune.data.templates import get_template
from nanotune.evaluate import evaluate_model, main
from nanotune.generate import generate
from nanotune.metrics import corpus_bleu, corpus_rouge_l
from nanotune.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "什么是气血？"}, {"role": "assistant", "content": "气血是人体的基本物质。"}],
    [
        {"role": "system", "content": "你是中医助手。"},
        {"role": "user", "content": "肝主什么？"},
        {"role": "assistant", "content": "肝主疏泄。"},
        {"role": "user", "content": "肾呢？"},
        {"role": "assistant", "content": "肾藏精。"},
    ],
    [
        {"role": "user", "content": "The model learns to predict the next token."},
        {"role": "assistant", "content": "Yes, from the tokens before it."},
    ],
    [{"role": "user", "content": "脾胃"}, {"role": "assistant", "content": "后天之本"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("spm"), vocab_size=400))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(seed=0, vocab_size=tokenizer.vocab_size, max_position_embeddings=256).eval()


def loss_by_hand(model, tokenizer, conversations, template) -> tuple[float, int]:
    """Each conversation alone through the model, log-softmax of the logits, summed over the reply tokens."""
    total, count = 0.0, 0
    for messages in conversations:
        sample = encode_conversation(messages, tokenizer, template)
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
        with torch.no_grad():
            log_probs = model(ids)[0].double().log_softmax(-1)  # (T, V)
        for t, label in enumerate(labels.tolist()):
            if label != -100:
                total -= float(log_probs[t, label])
                count += 1
    return total / count, count


@pytest.mark.parametrize("template", ["llama2", "chatml", "belle"])
def test_loss_and_perplexity_equal_the_hand_computation_from_logits(model, tokenizer, template):
    expected_loss, expected_count = loss_by_hand(model, tokenizer, CONVERSATIONS, template)
    # batch_size 3: one padded batch of 3 and one of 1, so padding and the sum over batches are exercised.
    result = evaluate_model(model, tokenizer, CONVERSATIONS, template, batch_size=3, progress=False)
    assert result["n_target_tokens"] == expected_count
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-5)
    assert result["n_conversations"] == len(CONVERSATIONS) and result["n_skipped"] == 0
    assert "bleu4" not in result


def test_predictions_equal_one_by_one_generation_and_are_scored(model, tokenizer, tmp_path):
    template = get_template("llama2")
    path = tmp_path / "out" / "predictions.jsonl"
    model.train()
    result = evaluate_model(model, tokenizer, CONVERSATIONS, template, batch_size=3, generate=True,
                            max_new_tokens=8, predictions_path=path, progress=False)
    assert model.training  # restored for the training loop that called it
    model.eval()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(CONVERSATIONS) == result["n_predictions"]
    for record, messages in zip(records, CONVERSATIONS):
        assert record["prompt"] == template.render(messages[:-1], add_generation_prompt=True)
        assert record["reference"] == messages[-1]["content"]
        alone = generate(model, encode_prompt(messages[:-1], tokenizer, template), 8, eos_id=tokenizer.eos_id)
        assert record["prediction"] == tokenizer.decode(alone).strip()
    hypotheses, references = [r["prediction"] for r in records], [r["reference"] for r in records]
    assert result["bleu4"] == corpus_bleu(hypotheses, references).score
    assert result["rougeL"] == corpus_rouge_l(hypotheses, references)
    assert not list(path.parent.glob("*.tmp"))


def test_perfect_predictions_score_100(model, tokenizer, monkeypatch):
    # The scores come from the references: a model that answers with the reference scores 100.
    import nanotune.evaluate as evaluate

    def answer_with_reference(model, prompts, max_new_tokens, **kwargs):
        by_prompt = {tuple(encode_prompt(m[:-1], tokenizer, "belle")): m[-1]["content"] for m in CONVERSATIONS}
        return [tokenizer.encode(by_prompt[tuple(p)], eos=True) for p in prompts]

    monkeypatch.setattr(evaluate, "generate_batch", answer_with_reference)
    result = evaluate_model(model, tokenizer, CONVERSATIONS, "belle", generate=True, progress=False)
    assert result["bleu4"] == pytest.approx(100.0) and result["rougeL"] == pytest.approx(100.0)


def test_evaluate_cli_prints_json_and_writes_predictions(model, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_pretrained(model, model_dir)
    tokenizer.save(model_dir)
    data = tmp_path / "dev.jsonl"
    lines = [json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS]
    data.write_text("".join(lines), encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    main(["--model", str(model_dir), "--data", str(data), "--template", "llama2", "--batch-size", "2",
          "--predictions", str(predictions), "--max-new-tokens", "4", "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    expected_loss, _ = loss_by_hand(model, tokenizer, CONVERSATIONS, "llama2")
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert {"perplexity", "bleu4", "rougeL", "n_target_tokens"} <= set(result)
    assert len(predictions.read_text(encoding="utf-8").splitlines()) == len(CONVERSATIONS)


def test_evaluate_cli_reports_a_bad_record_with_file_and_line(model, tokenizer, tmp_path):
    from nanotune.data.records import DataError

    model_dir = tmp_path / "model"
    save_pretrained(model, model_dir)
    tokenizer.save(model_dir)
    data = tmp_path / "dev.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[0]})
    data.write_text(good + "\n" + '{"messages": [{"role": "user"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.jsonl:2: .*content"):
        main(["--model", str(model_dir), "--data", str(data), "--template", "llama2", "--device", "cpu"])
