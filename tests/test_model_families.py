"""The LLaMA-like families (Qwen2, Qwen3, Mistral, Llama-3.2) against transformers' own classes.

Each family is a tiny random fp32 model built by transformers from its own config class, saved as
a HF folder and read by `load_pretrained`: the oracle is transformers on the same folder (eager
attention, the exact reference), PEFT for adapters. Weights are perturbed away from transformers'
init (zero biases, unit norms) so that every bias and norm really takes part.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import three_packed_documents

import merge
from nanotune.checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained
from nanotune.generate import generate, generate_batch
from nanotune.lora import LoRALinear, apply_lora, load_adapter, save_adapter, trainable_parameters
from nanotune.model import make_attention_plan

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (transformers config class, its arguments beyond SHAPE, the HF class it must come back as)
FAMILIES = {
    "qwen2": ("Qwen2Config", {}, "Qwen2ForCausalLM"),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}, "Qwen2ForCausalLM"),
    # layer 0 full, layer 1 windowed (max_window_layers = 1): two attention plans in one forward
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                     "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", {"head_dim": 32}, "Qwen3ForCausalLM"),  # head_dim 32, not 64 / 4
    "qwen3_window": ("Qwen3Config", {"head_dim": 32, "use_sliding_window": True, "sliding_window": 8,
                                     "layer_types": ["sliding_attention", "full_attention"]}, "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", {"head_dim": 32, "sliding_window": 8}, "MistralForCausalLM"),
    "llama32": ("LlamaConfig", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}, "LlamaForCausalLM"),
}
WINDOWED = ["qwen2_window", "qwen3_window", "mistral"]
TOLERANCE = 1e-5
T = 48  # longer than every sliding window (8), so windows really cut


@contextlib.contextmanager
def quiet():
    """transformers and PEFT warn about tied weights and unused keys; the tests check behaviour."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def hf_family_model(name: str, seed: int = 0):
    """A random transformers model of the family, eager attention, weights perturbed by `seed`."""
    config_class, arguments, _ = FAMILIES[name]
    config = getattr(transformers, config_class)(**SHAPE, **arguments, attn_implementation="eager")
    torch.manual_seed(seed)
    with quiet():
        hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in hf.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter_name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * noise)
            else:
                parameter.copy_(0.08 * noise)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, the transformers model, its saved folder)."""
    hf = hf_family_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(folder)
    return request.param, hf, folder


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_load_pretrained_logits_and_gradients_equal_transformers(family):
    name, hf, folder = family
    model = load_pretrained(folder)
    assert type(hf).__name__ == FAMILIES[name][2]
    assert model.config.n_params == sum(p.numel() for p in hf.parameters())  # the count from the shape alone
    input_ids = random_ids(2, T)
    ours = model(input_ids)
    theirs = hf(input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)

    F.cross_entropy(ours[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
    F.cross_entropy(theirs[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
    hf_parameters = dict(hf.named_parameters())
    assert set(dict(model.named_parameters())) == set(hf_parameters)  # HF names, nothing more or less
    for parameter_name, parameter in model.named_parameters():
        expected = hf_parameters[parameter_name].grad
        relative = (parameter.grad - expected).norm() / expected.norm()
        assert relative < TOLERANCE, f"{name} {parameter_name}: relative gradient difference {relative:.2e}"
    hf.zero_grad()


@pytest.mark.parametrize("packed_attention", ["spans", "mask", "flex"])
def test_three_packed_documents_each_get_their_logits_alone(family, packed_attention):
    name, hf, folder = family
    model = load_pretrained(folder, packed_attention=packed_attention)
    documents, packed, document_ids = three_packed_documents(seed=1)  # 7, 12, 5 tokens: 12 > window 8
    with torch.no_grad():
        logits = model(packed, document_ids=document_ids)[0]  # (24, V)
        start = 0
        for document in documents:
            alone = hf(document[None]).logits[0]
            torch.testing.assert_close(logits[start : start + len(document)], alone, atol=TOLERANCE, rtol=0)
            start += len(document)


def test_save_pretrained_is_the_same_family_in_transformers(family, tmp_path):
    name, hf, folder = family
    save_pretrained(load_pretrained(folder), tmp_path / "out")
    original = json.loads((folder / "config.json").read_text())
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == original["model_type"] and saved["architectures"] == [FAMILIES[name][2]]
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "tie_word_embeddings"):
        assert saved.get(key) == original.get(key), key
    assert saved["head_dim"] == original.get("head_dim", 16)  # Qwen2 reads head_dim too, if given
    with quiet():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(reloaded) is type(hf)
    input_ids = random_ids(2, T, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, hf(input_ids).logits, atol=TOLERANCE, rtol=0)


def test_greedy_generation_with_the_kv_cache_equals_transformers(family):
    name, hf, folder = family
    model = load_pretrained(folder)
    # 3 + 20 and 11 + 20 tokens: past the window of 8, the second from its prefill on.
    for prompt in ([1, 5, 17], [1, 9, 9, 40, 41, 42, 43, 44, 45, 46, 47]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert generate(model, prompt, 20, eos_id=2) == out[0, len(prompt):].tolist(), name


@pytest.mark.parametrize("name", WINDOWED)
def test_left_padded_batch_with_a_window_equals_one_by_one(name, tmp_path):
    hf_family_model(name).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    prompts = [[1, 5, 17], [1, 9, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    alone = [generate(model, prompt, 16) for prompt in prompts]
    assert generate_batch(model, prompts, 16) == alone


def test_a_plan_with_no_window_in_reach_stays_the_fast_one():
    assert make_attention_plan(None, None, 8, "auto", window=8).kind == "causal"
    document_ids = torch.zeros(1, 8, dtype=torch.long)
    assert make_attention_plan(document_ids, None, 8, "spans", window=8).window is None
    # Past the window: query t sees keys t - 7 .. t, 8 keys itself included (transformers' band).
    banded = make_attention_plan(None, None, 12, "auto", window=8)
    t, s = torch.arange(12)[:, None], torch.arange(12)[None, :]
    assert banded.kind == "mask" and torch.equal(banded.mask, (s <= t) & (s > t - 8))


def test_lora_adapter_loads_in_peft_over_the_transformers_model(family, tmp_path):
    name, hf, folder = family
    model = apply_lora(load_pretrained(folder), r=4, alpha=8, targets="all-linear")
    lora_layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert lora_layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("norm" in n for n, _ in trainable_parameters(model))  # q_norm, k_norm: never targets
    if name.startswith("qwen2"):  # the base bias stays inside the adapted layer, frozen
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.bias is not None and not q_proj.bias.requires_grad
        assert model.model.layers[0].self_attn.o_proj.bias is None
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter_name, parameter in trainable_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)  # lora_B non-zero
    save_adapter(model.eval(), tmp_path / "adapter", base_model_name_or_path=str(folder))
    input_ids = random_ids(2, T, seed=4)
    with torch.no_grad():
        ours = model(input_ids)
        with quiet():
            peft_model = peft.PeftModel.from_pretrained(hf_family_model(name), tmp_path / "adapter").eval()
        theirs = peft_model(input_ids=input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)

    # merge.py folds it into the base and keeps the family's config.json.
    merge.main(["lora", "--base", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    with quiet(), torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
        assert type(merged) is type(hf)
        torch.testing.assert_close(merged(input_ids).logits, theirs, atol=TOLERANCE, rtol=0)


def test_another_model_type_is_refused_in_one_line_listing_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 64}))
    with pytest.raises(CheckpointError) as error:
        read_config(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "gemma2" in message and "config.json" in message
    assert all(family in message for family in ("llama", "mistral", "qwen2", "qwen3"))


# ---- End to end: train_sft.py on a tiny Qwen3 with the real Qwen3 tokenizer ------------------

SHARED_QWEN3 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qwen3"
CONVERSATIONS = [
    [{"role": "user", "content": "中医认为脾胃是后天之本，为什么？"}, {"role": "assistant", "content": "因为脾胃主运化水谷。"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi 👋"},
     {"role": "user", "content": "再说一遍"}, {"role": "assistant", "content": "你好！"}],
    [{"role": "user", "content": "def f(x): return x * 2 — what is f(3)?"}, {"role": "assistant", "content": "6"}],
]


@pytest.fixture(scope="module")
def qwen3_workspace(tmp_path_factory):
    """A tiny random Qwen3 folder (hidden 32, the tokenizer's vocabulary) with the real Qwen3
    tokenizer files beside it, and a conversation file in the messages format."""
    if not (SHARED_QWEN3 / "tokenizer.json").exists() or not (SHARED_QWEN3 / "tokenizer_config.json").exists():
        pytest.skip(f"{SHARED_QWEN3} not present (real tokenizer files)")
    root = tmp_path_factory.mktemp("qwen3_sft")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_QWEN3)
    config = transformers.Qwen3Config(
        vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=hf_tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(0)
    with quiet():
        transformers.Qwen3ForCausalLM(config).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHARED_QWEN3 / name, root / "base" / name)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS * 3),
                    encoding="utf-8")
    return root


def chat_template_ids(folder, messages) -> list[int]:
    rendered = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True)
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


@pytest.mark.parametrize("lora", [False, True])
def test_train_sft_on_qwen3_gives_a_qwen3_whose_chat_template_renders_the_training_tokens(qwen3_workspace, tmp_path, lora):
    import train_sft

    base = qwen3_workspace / "base"
    encoded = []
    original_build = train_sft.build_sft_dataset

    def capture(*args, **kwargs):  # the conversations as training encodes them
        samples = original_build(*args, **kwargs)
        encoded.extend(list(samples[i]["input_ids"]) for i in range(len(samples)))
        return samples

    args = [f"--output_dir={tmp_path / 'run'}", f"--model.path={base}", f"--data.train_files={qwen3_workspace / 'chat.jsonl'}",
            "--data.template=auto", "--data.packing=true", "--data.max_length=96", "--train.batch_size=2",
            "--train.max_steps=3", "--optim.lr=1e-3", "--log.every_steps=1", "--log.progress_bar=false"]
    if lora:
        args += ["--lora.r=4", "--lora.alpha=8", "--lora.targets=all-linear", "--lora.merge_final=true"]
    train_sft.build_sft_dataset = capture
    try:
        train_sft.main(args)
    finally:
        train_sft.build_sft_dataset = original_build
    final = tmp_path / "run" / "final"
    assert [list(map(int, ids)) for ids in encoded] == [chat_template_ids(final, m) for m in CONVERSATIONS * 3]

    input_ids = torch.tensor([encoded[0]])
    with quiet(), torch.no_grad():
        if lora:
            hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
            theirs = peft.PeftModel.from_pretrained(hf_base, final).eval()(input_ids=input_ids).logits
            merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_merged")
            assert type(merged).__name__ == "Qwen3ForCausalLM"
            ours = load_adapter(load_pretrained(base), final)(input_ids)
        else:
            hf_final = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager")
            assert type(hf_final).__name__ == "Qwen3ForCausalLM"
            assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3"
            theirs = hf_final(input_ids).logits
            ours = load_pretrained(final)(input_ids)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)


def test_fsdp_pretraining_of_a_windowed_qwen3_with_a_grown_vocabulary_equals_one_process(tmp_path):
    """Two gloo ranks (FSDP2) against one process, on a Qwen3 with q/k norms, biases on all four
    projections and a windowed layer (window 8 < seq_len 32); the 512-piece tokenizer grows the
    256-row vocabulary. The result is still a Qwen3 that transformers loads with the same logits."""
    import test_distributed
    import train_pt
    from helpers import corpus_lines, train_sentencepiece
    from test_train import assert_same_weights, final_weights, losses

    config = transformers.Qwen3Config(**SHAPE, head_dim=32, attention_bias=True, use_sliding_window=True,
                                      sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    with quiet():
        transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer = train_sentencepiece(tmp_path, vocab_size=512, lines=corpus_lines(300, seed=1))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(120, seed=2)) + "\n", encoding="utf-8")

    def args(output_dir, *extra):
        return [f"--output_dir={output_dir}", f"--model.path={tmp_path / 'base'}", f"--tokenizer.path={tokenizer}",
                f"--data.train_files={corpus}", "--data.seq_len=32", f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.num_workers=1", "--optim.lr=3e-3", "--log.every_steps=1", "--log.progress_bar=false",
                "--train.max_steps=3", *extra]

    test_distributed.torchrun("train_pt.py", args(tmp_path / "fsdp", "--train.batch_size=2", "--train.grad_accum=2"))
    train_pt.main(args(tmp_path / "single", "--train.batch_size=8"))
    assert len(losses(tmp_path / "single")) == 3
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "single"), atol=1e-5)

    final = tmp_path / "fsdp" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert (saved["model_type"], saved["vocab_size"], saved["layer_types"]) == ("qwen3", 512, config.layer_types)
    with quiet(), torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager")
        assert type(exported).__name__ == "Qwen3ForCausalLM"
        input_ids = random_ids(2, T, seed=6) * 2  # ids up to 510: new rows too
        torch.testing.assert_close(exported(input_ids).logits, load_pretrained(final)(input_ids), atol=TOLERANCE, rtol=0)
