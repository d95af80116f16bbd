"""What the performance benchmarks share: model shapes, the FLOP count, a measured matmul peak,
memory readings, and a check that the machine is quiet enough to measure on.

Figures from a shared machine are only worth printing with the load they were taken under, so
every script prints `load_average()` next to its results; `wait_until_quiet` holds a run back
until the 1-minute load falls below a threshold (other processes stealing a core make a step
look slower, and the interleaved design of `train_step.py` only cancels slow drifts).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nanotune.loss import IGNORE_INDEX  # noqa: E402
from nanotune.model import Llama, LlamaConfig  # noqa: E402

# Model shapes by name. "issue" is the shape the performance issue was measured on (51M
# parameters, 34M of them in matmuls); "1b" is TinyLlama-1.1B's shape, for a GPU.
PRESETS = {
    "issue": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
# The shape as a Qwen3: the same sizes, with RMSNorm on each head's q and k (q_norm, k_norm).
PRESETS["qwen3"] = dict(PRESETS["issue"], model_type="qwen3", head_dim=64, bos_token_id=None, eos_token_id=None)

from nanotune.checkpoint import DTYPES  # noqa: E402  (both spellings: fp32 / float32, ...)


def preset_config(name: str, seq_len: int) -> LlamaConfig:
    if name not in PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    return LlamaConfig(**PRESETS[name], max_position_embeddings=max(2048, seq_len), rms_norm_eps=1e-5)


def nanotune_model(config: LlamaConfig, seed: int, dtype: torch.dtype, device: str, **options) -> Llama:
    """The nanotune model with seeded weights (HF's init), in `dtype` on `device`, in train mode.
    `options` are Llama's (`packed_attention`, `loss_chunk_tokens`)."""
    torch.manual_seed(seed)
    model = Llama(config, **options)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype).train()


def transformers_model(config: LlamaConfig, state_dict: dict | None, dtype: torch.dtype, device: str):
    """transformers' model of the same family and shape (LlamaForCausalLM, Qwen3ForCausalLM; SDPA
    attention), with `state_dict` copied in.

    nanotune uses HF's parameter names, so the state dict loads as it is; only the rotary buffers
    (which transformers computes itself) are missing from it.
    """
    import transformers

    hf_dict = config.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    model = getattr(transformers, config.family.architecture)._from_config(hf_config, attn_implementation="sdpa",
                                                                            dtype=dtype)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or any("rotary" not in name for name in missing):
            raise RuntimeError(f"weights do not fit transformers' model: missing {missing}, unexpected {unexpected}")
    return model.to(device=device).train()


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def document_lengths(seq_len: int, n_documents: int, generator: torch.Generator) -> list[int]:
    """`n_documents` lengths summing to seq_len, cut at random points (each at least 2 tokens)."""
    if n_documents <= 1:
        return [seq_len]
    if 2 * n_documents > seq_len:
        raise SystemExit(f"--packed-docs {n_documents} does not fit in --seq-len {seq_len}")
    cuts = torch.randperm(seq_len // 2 - 1, generator=generator)[: n_documents - 1].add(1).mul(2).sort().values
    bounds = [0, *cuts.tolist(), seq_len]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def make_batch(batch_size: int, seq_len: int, vocab_size: int, packed_docs: int, seed: int) -> dict:
    """Random tokens (B, T) with nanotune's shifted labels; with packed_docs, document_ids too.

    labels[t] = input_ids[t + 1] within a document and -100 at each document's last token (and
    at the end of the row), exactly what the data pipeline produces for packed rows.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    labels[:, :-1] = input_ids[:, 1:]
    batch = {"input_ids": input_ids, "labels": labels}
    if packed_docs > 1:
        rows = []
        for _ in range(batch_size):
            lengths = document_lengths(seq_len, packed_docs, generator)
            rows.append(torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]))
        document_ids = torch.stack(rows)  # (B, T)
        last_of_document = torch.ones_like(document_ids, dtype=torch.bool)
        last_of_document[:, :-1] = document_ids[:, 1:] != document_ids[:, :-1]
        labels[last_of_document] = IGNORE_INDEX
        batch["document_ids"] = document_ids
    return batch


def transformers_labels(labels: torch.Tensor) -> torch.Tensor:
    """nanotune's shifted labels (B, T) as transformers' `labels=` wants them (B, T), unshifted.

    transformers shifts labels itself: position t is trained on labels_hf[t + 1]. Ours are already
    shifted (labels[t] is the target of position t), so labels_hf[t + 1] = labels[t]; the first
    one is never read.
    """
    labels_hf = torch.full_like(labels, IGNORE_INDEX)
    labels_hf[:, 1:] = labels[:, :-1]
    return labels_hf


def load_optimizer_modules() -> None:
    """The first AdamW a process builds imports modules worth ~70 MB of RSS (torch._dynamo and
    friends), whichever library builds it: code, not training memory, so memory probes build a
    throwaway one before their baseline."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)


def squared_document_lengths(batch: dict) -> int:
    """sum over rows and documents of T_d^2: the attention work of the batch (T^2 per plain row)."""
    if "document_ids" not in batch:
        B, T = batch["input_ids"].shape
        return B * T * T
    total = 0
    for row in batch["document_ids"]:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        total += int((counts.long() ** 2).sum())
    return total


# ----------------------------------------------------------------------------------------------
# FLOPs and the matmul peak
# ----------------------------------------------------------------------------------------------


def matmul_parameters(config: LlamaConfig) -> int:
    """Parameters that take part in a matmul: all but the input embedding (a table lookup)."""
    embedding = config.vocab_size * config.hidden_size
    return config.n_params - embedding if not config.tie_word_embeddings else config.n_params


def train_step_flops(config: LlamaConfig, n_tokens: int, sum_squared_lengths: int,
                     n_target_tokens: int | None = None) -> float:
    """FLOPs of forward + backward of one step (the optimizer's few per parameter are left out).

        6 * N * tokens                      every matmul parameter: 2 FLOPs forward, 4 backward
      + 12 * L * C * sum(T_d^2) / 2         attention scores and weighted values (2 matmuls of
                                            2 * T^2 * C FLOPs each forward, twice that backward),
                                            halved because causal attention needs only half

    N leaves out the input embedding (a lookup, no FLOPs). For plain rows sum(T_d^2) = B * T^2;
    for packed rows it is the per-document sum: the work that has to be done, so that packed
    runs are credited only with useful FLOPs. In the same spirit the lm_head counts only for the
    `n_target_tokens` positions that have a label (all tokens when not given): a prompt position's
    logits are work no loss needs.
    """
    L, C = config.num_hidden_layers, config.num_attention_heads * config.head_dim
    lm_head = config.vocab_size * config.hidden_size
    n_target_tokens = n_tokens if n_target_tokens is None else n_target_tokens
    return (6.0 * (matmul_parameters(config) - lm_head) * n_tokens + 6.0 * lm_head * n_target_tokens
            + 12.0 * L * C * sum_squared_lengths / 2)


def device_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_flops(device: str, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """The achievable FLOP/s of one large square matmul here: the best of `repeats` timings.

    This is the ceiling MFU is measured against. A datasheet peak would be higher than anything
    reachable on a shared 2-core machine; the measured one says how close a training step gets
    to what the same BLAS does on an ideal shape.
    """
    size = size or (8192 if device.startswith("cuda") else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up: thread pool, BLAS kernel selection, first touch of the output pages
    a @ b
    best = float("inf")
    for _ in range(repeats):
        device_sync(device)
        started = time.perf_counter()
        a @ b
        device_sync(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


# ----------------------------------------------------------------------------------------------
# Memory and load
# ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Start the peak-RSS counter (VmHWM) afresh from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Highest resident memory since `reset_peak_rss` (or since the process started)."""
    return _status_kib("VmHWM") * 1024


def keep_freed_memory() -> None:
    """Tell glibc to serve every allocation from its heap and never hand freed memory back
    (mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD at its maximum), for this whole process.

    An experiment, not a setting a user runs with: a step then reuses the pages of the tensors the
    last step freed instead of faulting in and zeroing fresh ones, so the difference it makes
    is what those page faults cost (`train_step.py --keep-freed-memory`). Linux with glibc only.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        raise SystemExit(f"--keep-freed-memory needs glibc (libc.so.6): {error}") from None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("--keep-freed-memory: glibc refused mallopt")


def load_average() -> float:
    """The 1-minute load average (runnable processes, averaged): about 0 on an idle machine."""
    return os.getloadavg()[0]


def wait_until_quiet(max_load: float, max_wait_s: float, log=print) -> float:
    """Sleep until the 1-minute load is below max_load (or max_wait_s passed); return the load."""
    waited = 0.0
    while load_average() >= max_load and waited < max_wait_s:
        if waited == 0:
            log(f"waiting for the 1-minute load ({load_average():.2f}) to fall below {max_load}")
        time.sleep(10)
        waited += 10
    return load_average()


def cpu_description() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()
