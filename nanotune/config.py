"""Configs: dataclass sections filled from a TOML file, then from `--section.key=value` overrides.

    python train_sft.py --config configs/tiny_sft.toml --optim.lr=1e-4 --train.max_steps 20

Every section is a plain `@dataclass` with typed defaults, so the set of keys is visible in one
place and checked at start-up: an unknown key fails at once, naming the file (or the command
line) and suggesting the closest known key, before any work is done. Override values are parsed
as TOML (`1e-4`, `true`, `["a", "b"]`); anything that is not TOML is taken as a bare string, and
a bare string given for a list key becomes a one-element list. The resolved config is written to
`output_dir/config.toml`, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

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

    path: str = ""
    dtype: str = "float32"  # dtype of the parameters (master weights): float32 | bfloat16 | float16
    # Shape of a model built from scratch (ignored when `path` is given). vocab_size = the tokenizer's.
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 0  # 0 = num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # How packed rows attend: auto (flex on CUDA, per-document spans on the CPU), spans, mask, flex.
    packed_attention: str = "auto"
    loss_chunk_tokens: int = 1024  # tokens per chunk of the fused lm_head + cross-entropy


@dataclass
class TokenizerConfig:
    """A tokenizer.model / tokenizer.json / folder. Empty = the one in model.path."""

    path: str = ""


@dataclass
class PretrainDataConfig:
    """Plain-text corpora, tokenised once into a cache and packed into blocks of seq_len tokens."""

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.0  # hold out this fraction of documents when valid_files is empty
    seq_len: int = 512
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # JSON fields joined into a document
    field_separator: str = "\n"
    txt_mode: str = "line"  # .txt files: a document per "line" or per blank-line-separated "paragraph"
    skip_invalid: bool = False
    cache_dir: str = ""  # empty = output_dir/cache
    num_workers: int = 0  # tokenising processes; 0 = one per CPU core


@dataclass
class SFTDataConfig:
    """Conversations (any supported format), rendered with a chat template and masked to the replies."""

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.0
    format: str = "auto"  # messages | sharegpt | alpaca | panda | tcm_qg | auto
    template: str = "llama2"  # a name in data/templates.py, or "auto": the one the model's chat_template renders
    template_check: bool = True  # stop if the template renders differently from the model's chat_template
    reasoning_turns: str = "last"  # last | every: qwen3 trains earlier replies without / with their reasoning
    max_length: int = 1024
    truncation: str = "truncate"  # drop | truncate | truncate_left
    train_on_prompt: bool = False
    skip_invalid: bool = False
    packing: bool = False  # pack several conversations into each row of max_length tokens
    group_by_length: bool = False  # padded batches of similar lengths (less padding)


@dataclass
class TrainConfig:
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # 0 = run `epochs` epochs
    epochs: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on the CPU) | none | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block
    # What trains: "all", "embeddings" (embed_tokens + lm_head), or a list of name patterns (fnmatch).
    trainable: list[str] = field(default_factory=lambda: ["all"])
    freeze_bottom_fraction: float = 0.0  # freeze this fraction of the layers, counted from the bottom
    neftune_alpha: float = 0.0  # NEFTune embedding noise for SFT (5 is the paper's usual value)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: warmup = ratio * total steps
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping
    fused: str = "auto"  # auto | fused | foreach | none: the AdamW implementation


@dataclass
class LogConfig:
    every_steps: int = 10
    progress_bar: bool = True


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = only at the end
    max_batches: int = 0  # 0 = the whole validation set
    batch_size: int = 0  # 0 = train.batch_size


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only the final model
    keep_last: int = 2
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # start over in an output_dir that holds an earlier run's checkpoints
    save_final: bool = True
    final_dtype: str = ""  # dtype of the exported model; empty = as trained
    max_shard_size: str = "5GB"


@dataclass
class LoraConfig:
    """LoRA: train low-rank adapters instead of the weights. A [lora] table in the TOML enables it."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    modules_to_save: list[str] = field(default_factory=list)
    merge_final: bool = False  # also write the merged model to output_dir/final_merged


@dataclass
class DistributedConfig:
    """FSDP2 options, used when launched with torchrun (world size > 1)."""

    reshard_after_forward: bool = True  # True: ZeRO-3-like (params re-gathered in backward); False: ZeRO-2-like
    mixed_precision: bool = True  # on CUDA: bf16 params in compute, fp32 gradient reduction
    cpu_offload: bool = False  # keep sharded params, grads and optimizer state in CPU memory
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    timeout_minutes: int = 30


@dataclass
class RunConfig:
    """Everything a training run needs. `data` is PretrainDataConfig or SFTDataConfig."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: PretrainDataConfig | SFTDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_config(argv: list[str] | None, data_class: type = PretrainDataConfig) -> RunConfig:
    """`--config file.toml` (optional) and `--section.key value` overrides -> a checked RunConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    for key, raw in overrides:
        _apply_override(config, key, raw)
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
        if dataclasses.is_dataclass(target):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            if key == "lora" and "enabled" not in value:
                value = {**value, "enabled": True}  # a [lora] table switches LoRA on
            for sub_key, sub_value in value.items():
                _set_field(target, sub_key, sub_value, source, prefix=f"{key}.")
        else:
            _set_field(config, key, value, source, prefix="")


def _apply_override(config: RunConfig, dotted_key: str, raw: str) -> None:
    source = f"command line (--{dotted_key})"
    section_name, _, key = dotted_key.rpartition(".")
    target = config
    if section_name:
        if section_name not in _field_names(config) or not dataclasses.is_dataclass(getattr(config, section_name)):
            raise ConfigError(f"{source}: unknown section {section_name!r}{_suggest(section_name, _sections(config))}")
        target = getattr(config, section_name)
        if section_name == "lora" and key != "enabled":
            config.lora.enabled = True
    _set_field(target, key, _parse_value(raw), source, prefix=f"{section_name}." if section_name else "", raw=raw)


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _sections(config: RunConfig) -> list[str]:
    return [name for name in _field_names(config) if dataclasses.is_dataclass(getattr(config, name))]


# The names people bring from transformers' TrainingArguments, mapped to ours.
HF_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs", "warmup": "warmup_steps", "lr_scheduler_type": "schedule",
    "max_grad_norm": "max_grad_norm", "logging_steps": "every_steps", "save_steps": "every_steps",
    "save_total_limit": "keep_last", "eval_steps": "every_steps", "model_max_length": "max_length",
}


def _suggest(name: str, candidates: list[str]) -> str:
    section, _, key = name.rpartition(".")
    if key in HF_NAMES:
        renamed = f"{section}.{HF_NAMES[key]}" if section else HF_NAMES[key]
        if renamed in candidates:
            return f"; did you mean {renamed!r}?"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(candidates)}"


def _set_field(obj, key: str, value, source: str, prefix: str, raw: str | None = None) -> None:
    names = [n for n in _field_names(obj) if not dataclasses.is_dataclass(getattr(obj, n))]
    if key not in names:
        known = [prefix + n for n in names]
        raise ConfigError(f"{source}: unknown key {prefix + key!r}{_suggest(prefix + key, known)}")
    expected = typing.get_type_hints(type(obj))[key]
    setattr(obj, key, _coerce(value, expected, f"{source}: {prefix + key}", raw))


def _coerce(value, expected, where: str, raw: str | None):
    """Check `value` against the annotation; accept int for float and a bare string for a list."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option, where, raw)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {expected}")
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
    check(config.model.dtype in ("float32", "bfloat16", "float16"),
          f"model.dtype must be float32, bfloat16 or float16, not {config.model.dtype!r}")
    check(config.model.packed_attention in ("auto", "spans", "mask", "flex"),
          f"model.packed_attention must be auto, spans, mask or flex, not {config.model.packed_attention!r}")
    check(0.0 <= config.train.freeze_bottom_fraction <= 1.0, "train.freeze_bottom_fraction must be in [0, 1]")
    check(config.optim.fused in ("auto", "fused", "foreach", "none"),
          f"optim.fused must be auto, fused, foreach or none, not {config.optim.fused!r}")
    data = config.data
    check(0.0 <= data.valid_fraction < 1.0, "data.valid_fraction must be in [0, 1)")
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
    else:
        check(data.txt_mode in ("line", "paragraph"), f"data.txt_mode must be line or paragraph, not {data.txt_mode!r}")


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
    raise TypeError(f"cannot write {value!r} as TOML")


def save_config(config: RunConfig, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name("config.toml.tmp")
    temporary.write_text(to_toml(config), encoding="utf-8")
    os.replace(temporary, path)
    return path
