"""Configs: dataclass sections filled from a TOML file, then from `--section.key=value` overrides.

    python train_sft.py --config configs/tiny_sft.toml --optim.lr=1e-4 --train.max_steps 20

Every section is a plain `@dataclass` with typed defaults, so the set of keys is visible in one
place and checked at start-up: an unknown key fails at once, naming the file (or the command
line) and suggesting the closest known key, before any work is done. Override values are parsed
as TOML (`1e-4`, `true`, `["a", "b"]`); anything that is not TOML is taken as a bare string, and
a bare string given for a list key becomes a one-element list. The resolved config is written to
`output_dir/config.toml`, so a run can be repeated exactly.

LoRA: a `[lora]` table switches it on, and so does any `--lora.*` override, unless `enabled` is
given in so many words (`enabled = false` in the file's table, or `--lora.enabled=...`): then
that word decides, whatever the order of the arguments. Values are checked by `validate` before
any work: a learning rate of 0 or a shard size of "5XB" fails now, not after the last step.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_text_atomically

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config that cannot be used: the message names the file or flag and the key."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Where the model comes from. `path` = a HF-format folder; empty = from scratch with the shape below."""

    path: str = ""  # a HF-format model folder; empty = a model from scratch with the shape below
    dtype: str = "float32"  # dtype of the parameters (master weights): float32 | bfloat16 | float16
    # Shape of a model built from scratch (ignored when `path` is given). vocab_size = the tokenizer's.
    hidden_size: int = 64  # C, the width of every token's vector
    intermediate_size: int = 176  # the MLP's inner width
    num_hidden_layers: int = 2  # transformer blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 0  # key/value heads (grouped-query attention); 0 = num_attention_heads
    max_position_embeddings: int = 2048  # the longest sequence the model is meant for
    rope_theta: float = 10000.0  # the base of the rotary embedding's frequencies
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    # How packed rows attend: auto (flex on CUDA, per-document spans on the CPU), spans, mask, flex.
    packed_attention: str = "auto"
    loss_chunk_tokens: int = 512  # tokens per chunk of the fused lm_head + cross-entropy (README: performance)


@dataclass
class TokenizerConfig:
    """A tokenizer.model / tokenizer.json / folder. Empty = the one in model.path."""

    path: str = ""  # a tokenizer.model / tokenizer.json / folder; empty = the one in model.path


@dataclass
class DataFile:
    """A weighted entry of `data.train_files`: `{path = "a.jsonl", weight = 0.7}` in TOML.

    `path` is a file or a glob (its files are one source); weights are relative (they need not sum
    to 1): every epoch draws each source's share of the samples by its weight (data/sampler.py).
    Plain strings mean no mixing: all files are one pool, as before. A `DataFile` prints as its
    path, so every message that names the training files names the paths.
    """

    path: str
    weight: float = 1.0

    def __str__(self) -> str:
        return self.path


def weighted_sources(train_files: list) -> list[DataFile] | None:
    """The `data.train_files` entries as weighted sources, or None when none carries a weight."""
    if not any(isinstance(entry, DataFile) for entry in train_files):
        return None
    return list(train_files)


@dataclass
class PretrainDataConfig:
    """Plain-text corpora, tokenised once into a cache and packed into blocks of seq_len tokens."""

    train_files: list[str | DataFile] = field(default_factory=list)  # .txt/.jsonl/.json paths or globs; or {path, weight} sources
    valid_files: list[str] = field(default_factory=list)  # held-out files; empty = valid_fraction of train_files
    valid_fraction: float = 0.0  # hold out this fraction of documents when valid_files is empty
    seq_len: int = 512  # tokens per packed block
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # JSON fields joined into a document
    field_separator: str = "\n"  # between the text_fields of one JSON record
    txt_mode: str = "line"  # .txt files: a document per "line" or per blank-line-separated "paragraph"
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping
    cache_dir: str = ""  # empty = output_dir/cache
    num_workers: int = 0  # tokenising processes; 0 = one per CPU core


@dataclass
class SFTDataConfig:
    """Conversations (any supported format), rendered with a chat template and masked to the replies."""

    train_files: list[str | DataFile] = field(default_factory=list)  # .jsonl/.json paths or globs; or {path, weight} sources
    valid_files: list[str] = field(default_factory=list)  # held-out files; empty = valid_fraction of the samples
    valid_fraction: float = 0.0  # hold out this fraction of the conversations when valid_files is empty
    format: str = "auto"  # messages | sharegpt | alpaca | panda | tcm_qg | auto
    template: str = "llama2"  # a name in data/templates.py, or "auto": the one the model's chat_template renders
    template_check: bool = True  # stop if the template renders differently from the model's chat_template
    reasoning_turns: str = "last"  # last | every: qwen3 trains earlier replies without / with their reasoning
    max_length: int = 1024  # tokens per sample (and per packed row)
    truncation: str = "truncate"  # drop | truncate | truncate_left: what happens to a longer conversation
    train_on_prompt: bool = False  # also train the prompt tokens, not only the replies
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping
    packing: bool = False  # pack several conversations into each row of max_length tokens
    group_by_length: bool = False  # padded batches of similar lengths (less padding)


@dataclass
class PreferenceDataConfig:
    """Preference pairs (data/preference.py: TRL, LLaMA-Factory, MedicalGPT or qa_lines), for
    train_dpo.py and train_rm.py; each reply laid out after its prompt with a chat template."""

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.0
    format: str = "auto"  # trl | alpaca | sharegpt | medicalgpt | qa_lines | auto
    template: str = "llama2"  # a name in data/templates.py, or "auto" (as for SFT)
    template_check: bool = True
    max_length: int = 1024  # tokens of prompt + the longer reply
    truncation: str = "truncate"  # drop | truncate (the prompt's left first) | truncate_left (oldest turns first)
    packing: bool = False  # pack whole pairs into rows of 2 * max_length tokens (block-diagonal attention)
    skip_invalid: bool = False
    cache_dir: str = ""  # where precomputed reference log-probs are kept; empty = output_dir/cache


@dataclass
class DPOConfig:
    """train_dpo.py: the preference loss, its reference model and the batch layout."""

    loss: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing) | ipo | hinge (RSO) | simpo | orpo
    beta: float = 0.1  # the strength of the preference (ORPO: the weight of the odds-ratio term)
    label_smoothing: float = 0.0  # cDPO / SimPO: the probability that a pair's labels are flipped, in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    sft_weight: float = 0.0  # + this times chosen's per-token NLL (RPO, LLaMA-Factory's pref_ftx)
    # auto (lora with LoRA, else copy) | copy (a frozen copy) | lora (adapters off) | precomputed (one pass first)
    reference: str = "auto"
    share_prompt: bool = False  # the prompt computed once per pair, both replies attending to it (packed rows)


@dataclass
class RewardConfig:
    """train_rm.py: a scalar `score` head trained on pairs."""

    margin: float = 0.0  # added to every pair's margin (a record's own "margin" field, else 0)
    share_prompt: bool = False  # as dpo.share_prompt


@dataclass
class PromptDataConfig:
    """Prompts for online RL (train_grpo.py): JSON/JSONL records holding `messages` (a conversation
    that ends with a user turn) or a `prompt` string (one user turn), rendered with a chat template
    up to the assistant's header. Every other field of a record (`answer`, ...) is handed to the
    reward functions."""

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)  # held-out prompts: greedy completions, scored
    valid_fraction: float = 0.0  # hold out this fraction of the prompts when valid_files is empty
    template: str = "llama2"  # a name in data/templates.py, or "auto" (as for SFT)
    template_check: bool = True
    max_prompt_length: int = 512  # tokens; a longer prompt is dropped, and the drops counted
    skip_invalid: bool = False  # skip (and count) records that are not prompts, instead of stopping


@dataclass
class GRPOConfig:
    """train_grpo.py: sampling, rewards, advantages and the clipped policy-gradient loss (grpo.py).

    A step takes `train.batch_size` prompts per rank per micro-batch, `train.grad_accum`
    micro-batches, and samples `group_size` completions of each: the global batch is
    batch_size x grad_accum x ranks prompts, times group_size completions.
    """

    group_size: int = 8  # completions sampled per prompt; its advantages are relative to the group
    max_new_tokens: int = 256  # completion length limit (tokens)
    temperature: float = 1.0  # > 0: a group of greedy completions would all be the same
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # Reward functions: built-in names (rewards.py: exact_number, format, char_overlap) or user
    # callables "module:function" / "path/to/file.py:function"; summed with reward_weights.
    rewards: list[str] = field(default_factory=lambda: ["exact_number"])
    reward_weights: list[float] = field(default_factory=list)  # empty = 1.0 each
    format_pattern: str = ""  # the `format` reward's regular expression (empty: rewards.DEFAULT_FORMAT)
    scale_rewards: bool = True  # divide advantages by the group's std; false = Dr. GRPO
    std_eps: float = 1e-4  # added to the std before dividing (a group of equal rewards has std 0)
    epsilon_low: float = 0.2  # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2  # DAPO's "clip higher" raises it (0.28)
    num_iterations: int = 1  # optimisation passes (optimizer steps) over each batch of samples
    beta: float = 0.0  # weight of the k3 KL estimate to the reference; 0 = no reference is held
    reference: str = "auto"  # auto (LoRA off with LoRA, else a frozen copy) | lora | copy
    # dapo: every completion token of the global batch weighs the same (TRL's "dapo");
    # sequence: each completion's token mean, then the mean over completions (TRL's "grpo")
    loss_normalization: str = "dapo"


@dataclass
class TrainConfig:
    """How the model trains: batches, steps, device, precision, what trains."""

    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # 0 = run `epochs` epochs
    epochs: float = 1.0  # passes over the data, when max_steps is 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on the CPU) | none | bf16 | fp16
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    compile: bool = False  # torch.compile each transformer block
    # What trains: "all", "embeddings" (embed_tokens + lm_head), or a list of name patterns (fnmatch).
    trainable: list[str] = field(default_factory=lambda: ["all"])
    freeze_bottom_fraction: float = 0.0  # freeze this fraction of the layers, counted from the bottom
    neftune_alpha: float = 0.0  # NEFTune embedding noise for SFT (5 is the paper's usual value)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4  # the peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator guard
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: warmup = ratio * total steps
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping
    fused: str = "auto"  # auto | fused | foreach | none: the AdamW implementation


@dataclass
class LogConfig:
    """What the run reports as it goes: metrics.jsonl always; TensorBoard and W&B on request."""

    every_steps: int = 10  # a metrics line every N steps
    progress_bar: bool = True  # a tqdm bar on a terminal (plain log lines when stderr is not one)
    tensorboard: bool = False  # also write TensorBoard events to output_dir/tensorboard (needs tensorboard)
    wandb: bool = False  # also log to Weights & Biases (needs wandb; WANDB_MODE=offline works offline)
    wandb_project: str = "nanotune"  # the W&B project name


@dataclass
class EvalConfig:
    """The validation loss: when, on how much, and whether to stop early."""

    every_steps: int = 0  # evaluate every N steps; 0 = only at the end
    max_batches: int = 0  # 0 = the whole validation set
    batch_size: int = 0  # 0 = train.batch_size
    early_stopping_patience: int = 0  # stop after N evaluations without a lower eval loss; 0 = never


@dataclass
class CheckpointConfig:
    """Training checkpoints (exact resume) and the final model."""

    every_steps: int = 0  # a checkpoint every N steps; 0 = only the final model
    keep_last: int = 2  # checkpoints kept (the oldest are removed)
    resume: bool | str = False  # true: continue from the newest intact checkpoint; or a path to checkpoints/step_N
    overwrite: bool = False  # start over in an output_dir that holds an earlier run's checkpoints or final/
    save_final: bool = True  # write output_dir/final at the end
    save_best: bool = False  # keep the model of the lowest eval loss as output_dir/best
    final_dtype: str = ""  # dtype of the exported model (float32, bfloat16, float16); empty = as trained
    max_shard_size: str = "5GB"  # largest safetensors file of the exported model


@dataclass
class LoraConfig:
    """LoRA: train low-rank adapters instead of the weights. A [lora] table in the TOML enables it."""

    enabled: bool = False  # train adapters (a [lora] table or any --lora.* key switches it on)
    r: int = 8  # the rank of each update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full beside the adapters
    merge_final: bool = False  # also write the merged model to output_dir/final_merged
    # QLoRA: "nf4" keeps the frozen base's linear layers in 4-bit NormalFloat (quant.py), quantised
    # while the checkpoint is read; "" = the base in model.dtype. Embeddings, norms and lm_head
    # always stay in model.dtype, which is also the dtype the NF4 weights dequantise to.
    quantize_base: str = ""
    quantize_targets: list[str] = field(default_factory=lambda: ["all-linear"])  # which block linears go to NF4


@dataclass
class DistributedConfig:
    """FSDP2 options, used when launched with torchrun (world size > 1)."""

    reshard_after_forward: bool = True  # True: ZeRO-3-like (params re-gathered in backward); False: ZeRO-2-like
    mixed_precision: bool = True  # on CUDA: bf16 params in compute, fp32 gradient reduction
    cpu_offload: bool = False  # keep sharded params, grads and optimizer state in CPU memory
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    timeout_minutes: int = 30  # how long a collective may wait for the slowest rank


@dataclass
class RunConfig:
    """Everything a training run needs. `data` is the entry point's: pretraining, SFT, preference pairs or prompts."""

    output_dir: str = "runs/default"  # where config, metrics, checkpoints and final/ go
    seed: int = 0  # initial weights, data order, dropout
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: PretrainDataConfig | SFTDataConfig | PreferenceDataConfig | PromptDataConfig = field(
        default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_config(argv: list[str] | None, data_class: type = PretrainDataConfig) -> RunConfig:
    """`--config file.toml` (optional) and `--section.key value` overrides -> a checked RunConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # every key, its type, default and meaning; then stop
        from .config_help import config_help

        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "train.py"
        print(config_help(script, RunConfig, data_class, getattr(sys.modules.get("__main__"), "__doc__", None) or ""))
        raise SystemExit(0)
    config_file, overrides = _split_argv(argv)
    config = RunConfig(data=data_class())
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML ({error})") from None
        _apply_table(config, table, source=str(path))
        lora_enabled_given = isinstance(table.get("lora"), dict) and "enabled" in table["lora"]
    else:
        lora_enabled_given = False
    for key, raw in overrides:
        _apply_override(config, key, raw)
    # A --lora.* override switches LoRA on, like a [lora] table, unless `enabled` was said in so
    # many words (in the file's [lora] table or as --lora.enabled): then that word stands, whatever
    # the order of the arguments.
    lora_enabled_given = lora_enabled_given or any(key == "lora.enabled" for key, _ in overrides)
    if not lora_enabled_given and any(key.startswith("lora.") for key, _ in overrides):
        config.lora.enabled = True
    validate(config)
    return config


def _split_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r} (expected --config FILE or --section.key=value)")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _looks_numeric(argv[i + 1])):
                raise ConfigError(f"command line: {arg} needs a value")
            value, i = argv[i + 1], i + 1
        if name == "config":
            config_file = value
        else:
            overrides.append((name, value))
        i += 1
    return config_file, overrides


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _apply_table(config: RunConfig, table: dict, source: str) -> None:
    for key, value in table.items():
        target = getattr(config, key, None) if key in _field_names(config) else None
        if target is None and isinstance(value, dict):  # a [table] that is not one of our sections
            section = _closest_section(key, config)
            hint = f"; did you mean [{section}]?" if section else f"; the sections are {', '.join(_sections(config))}"
            raise ConfigError(f"{source}: unknown section [{key}]{hint}")
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            if key == "lora" and "enabled" not in value:
                value = {**value, "enabled": True}  # a [lora] table switches LoRA on
            for sub_key, sub_value in value.items():
                _set_field(target, sub_key, sub_value, source, prefix=f"{key}.", config=config)
        else:
            _set_field(config, key, value, source, prefix="", config=config)


def _apply_override(config: RunConfig, dotted_key: str, raw: str) -> None:
    source = f"command line (--{dotted_key})"
    section_name, _, key = dotted_key.rpartition(".")
    target = config
    if section_name:
        if section_name not in _field_names(config) or not dataclasses.is_dataclass(getattr(config, section_name)):
            section = _closest_section(section_name, config)
            if section and f"{section}.{key}" in _known_keys(config):
                better = section  # --optimizer.lr -> optim
            else:
                better = _key_elsewhere(dotted_key, config) or section  # --trainer.learning_rate -> optim.lr
            hint = f"; did you mean {better!r}?" if better else f"; the sections are {', '.join(_sections(config))}"
            raise ConfigError(f"{source}: unknown section {section_name!r}{hint}")
        target = getattr(config, section_name)
    _set_field(target, key, _parse_value(raw), source, prefix=f"{section_name}." if section_name else "", raw=raw,
               config=config)


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _sections(config: RunConfig) -> list[str]:
    return [name for name in _field_names(config) if dataclasses.is_dataclass(getattr(config, name))]


# The names people bring from transformers' TrainingArguments / peft / TRL, mapped to ours (the
# first that exists: `data.max_length` for SFT, `data.seq_len` for pretraining).
HF_NAMES = {
    "learning_rate": ["optim.lr"], "lr": ["optim.lr"], "weight_decay": ["optim.weight_decay"],
    "adam_beta1": ["optim.betas"], "adam_beta2": ["optim.betas"], "adam_epsilon": ["optim.eps"],
    "warmup": ["optim.warmup_steps"], "warmup_steps": ["optim.warmup_steps"], "warmup_ratio": ["optim.warmup_ratio"],
    "lr_scheduler_type": ["optim.schedule"], "max_grad_norm": ["optim.max_grad_norm"],
    "per_device_train_batch_size": ["train.batch_size"], "batch_size": ["train.batch_size"],
    "gradient_accumulation_steps": ["train.grad_accum"], "num_train_epochs": ["train.epochs"],
    "max_steps": ["train.max_steps"], "gradient_checkpointing": ["train.activation_checkpointing"],
    "bf16": ["train.mixed_precision"], "fp16": ["train.mixed_precision"],
    "neftune_noise_alpha": ["train.neftune_alpha"], "torch_compile": ["train.compile"],
    "logging_steps": ["log.every_steps"], "save_steps": ["checkpoint.every_steps"],
    "save_total_limit": ["checkpoint.keep_last"], "resume_from_checkpoint": ["checkpoint.resume"],
    "overwrite_output_dir": ["checkpoint.overwrite"], "eval_steps": ["eval.every_steps"],
    "per_device_eval_batch_size": ["eval.batch_size"], "model_name_or_path": ["model.path"],
    "torch_dtype": ["model.dtype"], "tokenizer_name": ["tokenizer.path"], "tokenizer_name_or_path": ["tokenizer.path"],
    "model_max_length": ["data.max_length", "data.seq_len"], "max_seq_length": ["data.max_length", "data.seq_len"],
    "max_length": ["data.max_length", "data.seq_len"], "block_size": ["data.seq_len", "data.max_length"],
    "train_file": ["data.train_files"], "validation_file": ["data.valid_files"],
    "lora_r": ["lora.r"], "lora_alpha": ["lora.alpha"], "lora_dropout": ["lora.dropout"],
    "target_modules": ["lora.targets"], "use_lora": ["lora.enabled"],
    "num_generations": ["grpo.group_size"], "max_completion_length": ["grpo.max_new_tokens"],
    "max_prompt_length": ["data.max_prompt_length"], "reward_funcs": ["grpo.rewards"],
    "loss_type": ["grpo.loss_normalization"], "epsilon": ["grpo.epsilon_low"],
}


def _known_keys(config: RunConfig) -> list[str]:
    """Every dotted key the config has: "output_dir", ..., "optim.lr", ..."""
    keys = [name for name in _field_names(config) if name not in _sections(config)]
    for section in _sections(config):
        keys += [f"{section}.{name}" for name in _field_names(getattr(config, section))]
    return keys


def _suggest(name: str, config: RunConfig) -> str:
    """"; did you mean 'optim.lr'?" for a mistyped or misplaced key, in any section."""
    known = _known_keys(config)
    close = _key_elsewhere(name, config) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.5)), None)
    if close is None:  # compare the key alone: `[data] seq_lenght` is far from every dotted name
        key = name.rpartition(".")[2]
        by_key = difflib.get_close_matches(key, [k.rpartition(".")[2] for k in known], n=1, cutoff=0.6)
        close = next((k for k in known if by_key and k.rpartition(".")[2] == by_key[0]), None)
    return f"; did you mean {close!r}?" if close else ""


def _key_elsewhere(name: str, config: RunConfig) -> str | None:
    """Our dotted key for a HF name (or a near miss of one: `learnig_rate`) or for a key put in the
    wrong section (`[train] lr`), whatever section `name` was given in; None if neither."""
    known = _known_keys(config)
    key = name.rpartition(".")[2]
    hf_name = key if key in HF_NAMES else next(iter(difflib.get_close_matches(key, HF_NAMES, n=1, cutoff=0.85)), None)
    for candidate in HF_NAMES.get(hf_name, []):
        if candidate in known and candidate != name:
            return candidate
    return next((k for k in known if k.rpartition(".")[2] == key and k != name), None)


def _closest_section(name: str, config: RunConfig) -> str | None:
    sections = _sections(config)
    close = difflib.get_close_matches(name, sections, n=1, cutoff=0.5)
    if not close:  # [training] -> train
        close = [s for s in sections if name.lower().startswith(s)]
    return close[0] if close else None


def _set_field(obj, key: str, value, source: str, prefix: str, raw: str | None = None, *, config: RunConfig) -> None:
    names = [n for n in _field_names(obj) if not dataclasses.is_dataclass(getattr(obj, n))]
    if key not in names:
        raise ConfigError(f"{source}: unknown key {prefix + key!r}{_suggest(prefix + key, config)}")
    expected = typing.get_type_hints(type(obj))[key]
    setattr(obj, key, _coerce(value, expected, f"{source}: {prefix + key}", raw))


def _coerce(value, expected, where: str, raw: str | None):
    """Check `value` against the annotation; accept int for float and a bare string for a list."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        tables = [option for option in typing.get_args(expected) if dataclasses.is_dataclass(option)]
        if isinstance(value, dict) and tables:  # a table: its own errors name what is wrong in it
            return _coerce_table(value, tables[0], where)
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, where, raw)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {expected}")
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table such as {{path = \"a.jsonl\", weight = 0.7}}, got {value!r}")
        return _coerce_table(value, expected, where)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, str):
            value = [raw if raw is not None else value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, item_type, where, None) for item in value]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and raw is not None:
        return raw if not isinstance(value, str) else value  # --output_dir 123 stays the string "123"
    if expected in (bool, int, float, str) and not (type(value) is expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _coerce_table(value: dict, expected: type, where: str):
    """A TOML table as the dataclass `expected` (a `DataFile`): known keys, required ones, types."""
    known = {f.name: f for f in dataclasses.fields(expected)}
    hints = typing.get_type_hints(expected)
    shown = "{" + ", ".join(f"{k} = {v!r}" for k, v in value.items()) + "}"
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}: entry {shown}: unknown key {key!r} (expected {', '.join(known)})")
    required = [name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in value:
            raise ConfigError(f"{where}: entry {shown}: missing key {key!r}")
    return expected(**{key: _coerce(item, hints[key], f"{where}: entry {shown}: {key}", None)
                       for key, item in value.items()})


def validate(config: RunConfig) -> None:
    """Cross-field checks that a TOML type check cannot express."""

    def check(condition, message):
        if not condition:
            raise ConfigError(message)

    check(config.train.batch_size >= 1, "train.batch_size must be >= 1")
    check(config.train.grad_accum >= 1, "train.grad_accum must be >= 1")
    check(config.train.max_steps > 0 or config.train.epochs > 0, "set train.max_steps or train.epochs")
    check(config.optim.schedule in ("cosine", "linear", "constant"),
          f"optim.schedule must be cosine, linear or constant, not {config.optim.schedule!r}")
    check(0.0 <= config.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    check(0.0 <= config.optim.warmup_ratio < 1.0, "optim.warmup_ratio must be in [0, 1)")
    check(config.train.mixed_precision in ("auto", "none", "bf16", "fp16"),
          f"train.mixed_precision must be auto, none, bf16 or fp16, not {config.train.mixed_precision!r}")
    check(config.model.dtype.lower() in FINAL_DTYPES,
          f"model.dtype must be float32, bfloat16 or float16 (or fp32, bf16, fp16), not {config.model.dtype!r}")
    config.model.dtype = FINAL_DTYPES[config.model.dtype.lower()]
    check(config.model.packed_attention in ("auto", "spans", "mask", "flex"),
          f"model.packed_attention must be auto, spans, mask or flex, not {config.model.packed_attention!r}")
    check(0.0 <= config.train.freeze_bottom_fraction <= 1.0, "train.freeze_bottom_fraction must be in [0, 1]")
    check(config.optim.fused in ("auto", "fused", "foreach", "none"),
          f"optim.fused must be auto, fused, foreach or none, not {config.optim.fused!r}")
    _validate_numbers(config, check)
    _validate_logging_and_eval(config, check)
    _validate_model_and_device(config, check)
    _validate_checkpoint_and_lora(config, check)
    data = config.data
    check(0.0 <= data.valid_fraction < 1.0, "data.valid_fraction must be in [0, 1)")
    if weighted_sources(data.train_files) is not None:
        plain = [entry for entry in data.train_files if not isinstance(entry, DataFile)]
        check(not plain, f"data.train_files: {', '.join(plain)} has no weight while other entries have one; give "
                         "every entry a weight ({path = \"a.jsonl\", weight = 0.7}) or none (plain paths are one pool)")
        for entry in data.train_files:
            check(math.isfinite(entry.weight) and entry.weight > 0,
                  f"data.train_files: {entry.path}: weight must be a number > 0, not {entry.weight}")
    if isinstance(data, SFTDataConfig):
        from .data.formats import READERS
        from .data.templates import TEMPLATES

        check(data.truncation in ("drop", "truncate", "truncate_left"),
              f"data.truncation must be drop, truncate or truncate_left, not {data.truncation!r}")
        check(data.template == "auto" or data.template in TEMPLATES,
              f"data.template {data.template!r} is not one of {', '.join(TEMPLATES)} or auto")
        check(data.reasoning_turns in ("last", "every"), f"data.reasoning_turns must be last or every, not {data.reasoning_turns!r}")
        check(data.format == "auto" or data.format in READERS,
              f"data.format {data.format!r} is not auto or one of {', '.join(READERS)}")
        check(data.max_length >= 1, f"data.max_length must be >= 1 (tokens per sample), not {data.max_length}")
    elif isinstance(data, PreferenceDataConfig):
        from .data.preference import READERS as PREFERENCE_READERS
        from .data.templates import TEMPLATES

        check(data.truncation in ("drop", "truncate", "truncate_left"),
              f"data.truncation must be drop, truncate or truncate_left, not {data.truncation!r}")
        check(data.template == "auto" or data.template in TEMPLATES,
              f"data.template {data.template!r} is not one of {', '.join(TEMPLATES)} or auto")
        check(data.format == "auto" or data.format in PREFERENCE_READERS,
              f"data.format {data.format!r} is not auto or one of {', '.join(PREFERENCE_READERS)}")
        check(data.max_length >= 2, f"data.max_length must be >= 2 (tokens of prompt + reply), not {data.max_length}")
        _validate_preference(config, check)
    elif isinstance(data, PromptDataConfig):
        from .data.templates import TEMPLATES

        check(data.template == "auto" or data.template in TEMPLATES,
              f"data.template {data.template!r} is not one of {', '.join(TEMPLATES)} or auto")
        check(data.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1, not {data.max_prompt_length}")
        _validate_grpo(config, check)
    else:
        check(data.txt_mode in ("line", "paragraph"), f"data.txt_mode must be line or paragraph, not {data.txt_mode!r}")
        check(data.seq_len >= 1, f"data.seq_len must be >= 1 (tokens per block), not {data.seq_len}")


def _validate_logging_and_eval(config: RunConfig, check) -> None:
    import importlib.util

    for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        check(not getattr(config.log, key) or importlib.util.find_spec(package) is not None,
              f"log.{key} = true needs the {package} package: pip install {package}")
    check(config.eval.early_stopping_patience >= 0, "eval.early_stopping_patience must be >= 0 (0 = never stop early)")
    check(config.eval.early_stopping_patience == 0 or config.eval.every_steps > 0,
          "eval.early_stopping_patience needs eval.every_steps > 0 (evaluations to compare)")
    resume = config.checkpoint.resume
    check(not isinstance(resume, str) or Path(resume).is_dir(),
          f"checkpoint.resume: {resume!r} is not a folder (give true, or a path to checkpoints/step_N)")


def _validate_preference(config: RunConfig, check) -> None:
    dpo = config.dpo
    losses = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
    check(dpo.loss in losses, f"dpo.loss must be one of {', '.join(losses)}, not {dpo.loss!r}")
    check(math.isfinite(dpo.beta) and dpo.beta > 0, f"dpo.beta must be > 0, not {dpo.beta}")
    check(0.0 <= dpo.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), not {dpo.label_smoothing}")
    check(dpo.label_smoothing == 0.0 or dpo.loss in ("sigmoid", "simpo"),
          f"dpo.label_smoothing applies to the sigmoid and simpo losses, not {dpo.loss}")
    check(math.isfinite(dpo.sft_weight) and dpo.sft_weight >= 0, f"dpo.sft_weight must be >= 0, not {dpo.sft_weight}")
    check(dpo.reference in ("auto", "copy", "lora", "precomputed"),
          f"dpo.reference must be auto, copy, lora or precomputed, not {dpo.reference!r}")
    if dpo.reference == "lora":
        check(config.lora.enabled, "dpo.reference = lora switches LoRA adapters off, but LoRA is not enabled; "
              "use copy or precomputed, or enable [lora]")
    if dpo.reference in ("lora", "auto") and config.lora.enabled:
        check(not config.lora.modules_to_save,
              f"lora.modules_to_save = {config.lora.modules_to_save} train in full, so switching the adapters off "
              "does not give the starting model: set dpo.reference = copy or precomputed")
    check(math.isfinite(config.reward.margin), f"reward.margin must be a finite number, not {config.reward.margin}")


def _validate_grpo(config: RunConfig, check) -> None:
    grpo = config.grpo
    check(config.train.mixed_precision != "fp16",
          "train.mixed_precision = fp16 is not supported by GRPO (its loss scaler); use bf16 or auto")
    check(grpo.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare completions of one prompt), "
          f"not {grpo.group_size}")
    check(grpo.max_new_tokens >= 1, f"grpo.max_new_tokens must be >= 1, not {grpo.max_new_tokens}")
    check(math.isfinite(grpo.temperature) and grpo.temperature > 0,
          f"grpo.temperature must be > 0 (greedy completions of one prompt would all be the same), not {grpo.temperature}")
    check(0 < grpo.top_p <= 1, f"grpo.top_p must be in (0, 1], not {grpo.top_p}")
    check(grpo.top_k >= 0, f"grpo.top_k must be >= 0 (0 = off), not {grpo.top_k}")
    check(len(grpo.rewards) >= 1, "grpo.rewards is empty: name at least one reward function")
    check(not grpo.reward_weights or len(grpo.reward_weights) == len(grpo.rewards),
          f"grpo.reward_weights has {len(grpo.reward_weights)} weights for {len(grpo.rewards)} reward functions")
    check(all(math.isfinite(w) for w in grpo.reward_weights), f"grpo.reward_weights must be finite, not {grpo.reward_weights}")
    check(math.isfinite(grpo.std_eps) and grpo.std_eps >= 0, f"grpo.std_eps must be >= 0, not {grpo.std_eps}")
    check(0 <= grpo.epsilon_low < 1, f"grpo.epsilon_low must be in [0, 1), not {grpo.epsilon_low}")
    check(math.isfinite(grpo.epsilon_high) and grpo.epsilon_high >= 0, f"grpo.epsilon_high must be >= 0, not {grpo.epsilon_high}")
    check(grpo.num_iterations >= 1, f"grpo.num_iterations must be >= 1, not {grpo.num_iterations}")
    check(math.isfinite(grpo.beta) and grpo.beta >= 0, f"grpo.beta must be >= 0 (0 = no KL term), not {grpo.beta}")
    check(grpo.reference in ("auto", "lora", "copy"), f"grpo.reference must be auto, lora or copy, not {grpo.reference!r}")
    check(grpo.loss_normalization in ("dapo", "sequence"),
          f"grpo.loss_normalization must be dapo or sequence, not {grpo.loss_normalization!r}")
    if grpo.beta > 0 and grpo.reference == "lora":
        check(config.lora.enabled, "grpo.reference = lora switches LoRA adapters off, but LoRA is not enabled; "
              "use copy, or enable [lora]")
    if grpo.beta > 0 and grpo.reference in ("lora", "auto") and config.lora.enabled:
        check(not config.lora.modules_to_save,
              f"lora.modules_to_save = {config.lora.modules_to_save} train in full, so switching the adapters off "
              "does not give the starting model: set grpo.reference = copy")


# What the optimizer, the schedule and the loop would reject later, with a traceback, or after
# hours: checked here so that a mistake costs seconds.
def _validate_numbers(config: RunConfig, check) -> None:
    optim, train = config.optim, config.train
    check(math.isfinite(optim.lr) and optim.lr > 0, f"optim.lr must be a finite number > 0, not {optim.lr}")
    check(math.isfinite(optim.eps) and optim.eps >= 0, f"optim.eps must be >= 0, not {optim.eps}")
    check(len(optim.betas) == 2 and all(0.0 <= b < 1.0 for b in optim.betas),
          f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], not {optim.betas}")
    check(math.isfinite(optim.weight_decay) and optim.weight_decay >= 0,
          f"optim.weight_decay must be >= 0, not {optim.weight_decay}")
    check(optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, not {optim.warmup_steps}")
    check(math.isfinite(optim.max_grad_norm) and optim.max_grad_norm >= 0,
          f"optim.max_grad_norm must be >= 0 (0 = no clipping), not {optim.max_grad_norm}")
    check(train.max_steps >= 0, f"train.max_steps must be >= 0 (0 = run train.epochs), not {train.max_steps}")
    check(math.isfinite(train.epochs) and train.epochs >= 0, f"train.epochs must be >= 0, not {train.epochs}")
    check(math.isfinite(train.neftune_alpha) and train.neftune_alpha >= 0,
          f"train.neftune_alpha must be >= 0 (0 = off), not {train.neftune_alpha}")
    check(config.log.every_steps >= 1, f"log.every_steps must be >= 1, not {config.log.every_steps}")
    check(config.eval.every_steps >= 0,
          f"eval.every_steps must be >= 0 (0 = only at the end), not {config.eval.every_steps}")
    check(config.eval.max_batches >= 0, f"eval.max_batches must be >= 0 (0 = all), not {config.eval.max_batches}")
    check(config.eval.batch_size >= 0,
          f"eval.batch_size must be >= 0 (0 = train.batch_size), not {config.eval.batch_size}")
    check(config.checkpoint.every_steps >= 0,
          f"checkpoint.every_steps must be >= 0 (0 = only the final model), not {config.checkpoint.every_steps}")
    check(config.checkpoint.keep_last >= 0, f"checkpoint.keep_last must be >= 0, not {config.checkpoint.keep_last}")
    check(config.model.loss_chunk_tokens >= 1,
          f"model.loss_chunk_tokens must be >= 1, not {config.model.loss_chunk_tokens}")


def _validate_model_and_device(config: RunConfig, check) -> None:
    model = config.model
    if not model.path:  # a model built from scratch: its shape must divide (a loaded one brings its own)
        n_kv_heads = model.num_key_value_heads or model.num_attention_heads
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
        for key in sizes:
            check(getattr(model, key) >= 1, f"model.{key} must be >= 1, not {getattr(model, key)}")
        check(model.num_key_value_heads >= 0, "model.num_key_value_heads must be >= 0 (0 = num_attention_heads)")
        check(model.hidden_size % model.num_attention_heads == 0,
              f"model.hidden_size {model.hidden_size} is not divisible by model.num_attention_heads "
              f"{model.num_attention_heads}")
        check((model.hidden_size // model.num_attention_heads) % 2 == 0,
              f"model.hidden_size / model.num_attention_heads = {model.hidden_size // model.num_attention_heads} "
              "must be even (rotary embeddings rotate pairs of channels)")
        check(model.num_attention_heads % n_kv_heads == 0,
              f"model.num_attention_heads {model.num_attention_heads} is not divisible by "
              f"model.num_key_value_heads {n_kv_heads}")
    device = config.train.device
    check(device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda":
        import torch  # here, not at the top: reading a config stays light

        check(torch.cuda.is_available(), "train.device = cuda, but no CUDA device is available (use auto or cpu)")


# Aliases of the final model's dtype; validate() rewrites them to the first name, the one
# torch spells, so later code needs one spelling.
FINAL_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}
# The size grammar of checkpoint.parse_size, repeated here so that config.py does not import
# checkpoint.py (and through it torch and the model) just to read a config.
SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", flags=re.IGNORECASE)


def _validate_checkpoint_and_lora(config: RunConfig, check) -> None:
    checkpoint, lora = config.checkpoint, config.lora
    final_dtype = checkpoint.final_dtype.lower()
    check(final_dtype == "" or final_dtype in FINAL_DTYPES,
          f"checkpoint.final_dtype must be empty (as trained), float32, bfloat16 or float16 (or fp32, bf16, fp16), "
          f"not {checkpoint.final_dtype!r}")
    checkpoint.final_dtype = FINAL_DTYPES.get(final_dtype, "")
    size = SIZE_PATTERN.fullmatch(checkpoint.max_shard_size)
    check(size is not None and float(size.group(1)) > 0,
          f"checkpoint.max_shard_size {checkpoint.max_shard_size!r} is not a size, e.g. '5GB', '500MB' or '2GiB'")
    check(lora.r >= 1, f"lora.r must be >= 1, not {lora.r}")
    check(math.isfinite(lora.alpha) and lora.alpha > 0, f"lora.alpha must be > 0, not {lora.alpha}")
    check(0.0 <= lora.dropout < 1.0, f"lora.dropout must be in [0, 1), not {lora.dropout}")
    check(lora.quantize_base in ("", "nf4"), f"lora.quantize_base must be \"\" or nf4, not {lora.quantize_base!r}")
    check(not lora.quantize_base or lora.enabled,
          "lora.quantize_base = nf4 quantises a frozen base for LoRA (QLoRA), but lora.enabled = false")
    if lora.enabled:
        check(config.train.trainable == ["all"],
              f"train.trainable = {config.train.trainable} has no effect with LoRA (the adapters are what trains); "
              "remove it, or set lora.enabled = false")
        check(config.train.freeze_bottom_fraction == 0.0,
              "train.freeze_bottom_fraction has no effect with LoRA (the adapters are what trains); remove it, "
              "or set lora.enabled = false")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def to_toml(config: RunConfig) -> str:
    """The config as TOML text that `load_config` reads back to an equal config."""
    lines = []
    for name in _field_names(config):
        value = getattr(config, name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"{name} = {_toml_value(value)}")
    for name in _sections(config):
        section = getattr(config, name)
        lines.append(f"\n[{name}]")
        for key in _field_names(section):
            lines.append(f"{key} = {_toml_value(getattr(section, key))}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):  # an inline table: {path = "a.jsonl", weight = 0.7}
        items = (f"{f.name} = {_toml_value(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def save_config(config: RunConfig, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, to_toml(config))
    return path
