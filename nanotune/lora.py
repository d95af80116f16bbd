"""LoRA: train a small low-rank update beside each frozen linear weight, saved in PEFT's format.

A linear layer y = x W^T gets a trainable update: y = x W^T + scale * x A^T B^T, with A (r, in)
and B (out, r) for a small rank r. W never changes, so the optimizer state covers only A and B
(a 7B model trains in about a tenth of the memory of a full fine-tune).

Three things a first implementation usually gets wrong, and what this file does instead:

* Names. `LoRALinear` keeps the base parameters as its own `weight` and `bias`, so the frozen
  weight is still called `model.layers.0.self_attn.q_proj.weight` (a HF checkpoint loads with no
  renaming) and the adapter is `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`, which are
  PEFT's saved names after its `base_model.model.` prefix. Adapters therefore move between
  nanotune and PEFT in both directions with no table.
* Initialisation. B starts at zero, so the model starts exactly as the base model; A starts
  Kaiming-uniform (as PEFT), so the gradient of B is not zero on the first step.
* Tied embeddings. When `embed_tokens` and `lm_head` share one tensor, training it in full
  (`modules_to_save`) trains both. PEFT saves the pair under both names and ties them on load
  only with `ensure_weight_tying`; `save_adapter` writes both names and sets that flag.

FSDP2: apply LoRA (and load an adapter) before `fully_shard`. Nothing here caches a weight
tensor, so the forward works when parameters become DTensors. `merge_lora` needs whole tensors
and refuses sharded ones: save the adapter and merge offline with `merge.py lora`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, iter_file_tensors, raise_on_mismatch
from .data.records import DataError
from .files import write_atomically, write_text_atomically

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions
PEFT_PREFIX = "base_model.model."  # PEFT's saved names: this prefix + the transformers module path
ALL_LINEAR = "all-linear"
TIED_PAIR = ("model.embed_tokens.weight", "lm_head.weight")


# ----------------------------------------------------------------------------------------------
# The adapter's settings, as PEFT's adapter_config.json spells them
# ----------------------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """What `apply_lora` did, kept on the model as `model.lora_config` and saved beside the weights.

    `targets`: module names matched as PEFT matches a list (a name equals the module path or ends
    the path after a dot: "q_proj" matches "model.layers.3.self_attn.q_proj"), or one string,
    which PEFT reads as a regular expression over the whole module path.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_dict(self, tied_embeddings_trained: bool) -> dict:
        """The adapter_config.json that `peft.PeftModel.from_pretrained` reads."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets if isinstance(self.targets, str) else sorted(self.targets),
            "modules_to_save": list(self.modules_to_save) or None,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
            "ensure_weight_tying": tied_embeddings_trained,
            "revision": None,
        }


# Fields of a PEFT LoRA config that change the computation in ways nanotune does not implement,
# each with the value that means "not used".
_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None,
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
}


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """Read a PEFT `adapter_config.json` (from the folder `path`); unsupported settings are errors."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.exists():
        raise DataError(f"{config_file}: file not found (expected a PEFT adapter folder)")
    text = config_file.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{config_file}:{error.lineno}: not valid JSON ({error.msg})") from None

    def fail(key: str, expected: str):
        match = re.search(rf'"{re.escape(key)}"\s*:', text)
        line = text.count("\n", 0, match.start()) + 1 if match else 1
        raise DataError(f"{config_file}:{line}: field '{key}' is {raw.get(key)!r}; {expected}")

    if raw.get("peft_type") != "LORA":
        fail("peft_type", "nanotune reads LoRA adapters (peft_type LORA)")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        fail("task_type", "expected CAUSAL_LM")
    for key, unused in _UNSUPPORTED.items():
        if raw.get(key) not in (unused, None, [], {}):
            fail(key, f"nanotune's LoRA supports only {unused!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            fail(key, "this field is required")
    if not isinstance(raw["r"], int) or raw["r"] < 1:
        fail("r", "expected a positive integer")
    targets = raw["target_modules"]
    return AdapterConfig(
        r=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout") or 0.0,
        targets=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(raw.get("modules_to_save") or []),
        use_rslora=bool(raw.get("use_rslora")),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder under PEFT's names (`base_model.model....lora_A.weight`)."""
    path = Path(path)
    for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
        if (path / name).exists():
            return dict(iter_file_tensors(path / name))
    raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN} in this folder")


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: x W^T + b + scale * B(A(dropout(x))).

    `weight` and `bias` are the base layer's own Parameters (not copies), so their names and
    storage are unchanged; `lora_A` (in -> r) and `lora_B` (r -> out) are plain `nn.Linear`s.
    Dropout acts on the input of the update only, as in PEFT, so the base path stays exact.
    """

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen by apply_lora
        self.register_parameter("bias", base.bias)  # (out,) or None
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        self.adapters_enabled = True  # False inside `adapters_disabled`: the base layer alone
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as PEFT (Kaiming-uniform, a=sqrt(5)), B zero: the update starts at exactly zero.

        Call again after `to_empty()` when the model was built on the meta device.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.adapters_enabled:
            return result
        x = x.to(self.lora_A.weight.dtype)  # adapters may be kept in higher precision than the base
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale  # (..., r) -> (..., out)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, scale={self.scale:g}"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every LoRA layer of `model` is its base layer alone: the model before any
    adapter training, with no second copy (DPO's reference model). `modules_to_save` train in full
    and are not switched off, so a reference made this way needs them empty."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapter to switch off")
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_enabled = True


# ----------------------------------------------------------------------------------------------
# Putting adapters on a model, and taking them off
# ----------------------------------------------------------------------------------------------


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a string is a regular expression over the whole path; a list entry equals the
    path or its end after a dot."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] | str = ("q_proj", "v_proj"),
    modules_to_save: list[str] | tuple[str, ...] = (),
    use_rslora: bool = False,
) -> nn.Module:
    """Replace the targeted linear layers of `model.model.layers` by `LoRALinear`, in place.

    Every parameter is frozen except `lora_A`/`lora_B` and the parameters of `modules_to_save`
    (e.g. "embed_tokens", "lm_head" after a vocabulary extension), which train in full.
    targets: names ("q_proj", "v_proj", "self_attn.o_proj"...), `"all-linear"` (every linear of
    the blocks), or a regular expression string over the whole module path (as PEFT reads one).
    `lm_head` cannot carry LoRA: the fused loss multiplies by `lm_head.weight` directly.
    Call it before `fully_shard` and before building the optimizer. Returns `model`.
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("LoRA is already applied to this model (model.lora_config is set)")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, not {r!r}")
    if any(_is_sharded(p) for p in model.parameters()):
        raise ValueError("apply LoRA before fully_shard: the model's parameters are already sharded")
    if isinstance(targets, (list, tuple)) and list(targets) == [ALL_LINEAR]:
        targets = ALL_LINEAR
    block_linears = {
        name: module
        for name, module in model.model.layers.named_modules(prefix="model.layers")
        if isinstance(module, nn.Linear)
    }
    short_names = sorted({name.rsplit(".", 1)[-1] for name in block_linears})
    if targets == ALL_LINEAR:
        chosen = list(block_linears)
    else:
        targets = targets if isinstance(targets, str) else list(targets)
        outside = [
            name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in block_linears and _name_matches(name, targets)
        ]
        if outside:
            raise ValueError(
                f"LoRA targets {targets} match {', '.join(outside)}, outside the blocks: LoRA goes on the "
                f"linear layers of model.layers (the fused loss reads lm_head.weight directly); train "
                f"lm_head in full with modules_to_save instead"
            )
        chosen = [name for name in block_linears if _name_matches(name, targets)]
        if isinstance(targets, str):
            unmatched = [] if chosen else [targets]
        else:
            unmatched = [t for t in targets if not any(_name_matches(name, [t]) for name in block_linears)]
        if unmatched:
            raise ValueError(
                f"LoRA target(s) {unmatched} match no linear layer; the linear layers of the blocks "
                f"are: {', '.join(short_names)} (or use 'all-linear')"
            )
    save_modules = _resolve_modules_to_save(model, list(modules_to_save))
    overlap = [name for name in chosen if any(name == m or name.startswith(m + ".") for m in save_modules)]
    if overlap:
        raise ValueError(f"{', '.join(overlap)} cannot be both a LoRA target and in modules_to_save")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = AdapterConfig(
        r=r, alpha=alpha, dropout=dropout,
        targets=sorted({name.rsplit(".", 1)[-1] for name in chosen}) if targets == ALL_LINEAR else targets,
        modules_to_save=list(modules_to_save), use_rslora=use_rslora,
    )
    for name in chosen:
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r, config.scale, dropout))
    for module_name in save_modules:
        for parameter in model.get_submodule(module_name).parameters():
            parameter.requires_grad_(True)
    model.lora_config = config
    return model


def _resolve_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths that `names` select (same matching rule as targets); a name matching nothing is an error."""
    all_modules = [name for name, _ in model.named_modules() if name]
    resolved = []
    for wanted in names:
        found = [name for name in all_modules if name == wanted or name.endswith("." + wanted)]
        if not found:
            top_level = [n for n in all_modules if "layers." not in n]
            raise ValueError(
                f"modules_to_save entry {wanted!r} matches no module; candidates: {', '.join(top_level)}"
            )
        resolved.extend(found)
    return resolved


def merged_weight(name: str, module: LoRALinear) -> torch.Tensor:
    """W + scale * B @ A, summed in fp32 and cast to W's dtype. (out, in)"""
    if _is_sharded(module.weight):
        raise ValueError(f"{name}: cannot merge sharded (FSDP) weights; save_adapter, then merge.py lora")
    update = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scale  # (out, r) @ (r, in)
    return (module.weight.float() + update).to(module.weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight, W += scale * B @ A, and go back to plain nn.Linear.

    Parameter names are unchanged, so `save_pretrained` then writes an ordinary HF checkpoint.
    The sum is formed in fp32 and cast to the weight's dtype: in bf16 an update smaller than half
    a bf16 step of W is rounded away (see merge.py's notes). Afterwards every parameter trains
    again, as in a freshly loaded model.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        merged = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        merged.weight = nn.Parameter(merged_weight(name, module))
        merged.bias = module.bias
        parent_name, child_name = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child_name, merged)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.lora_config = None
    return model


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the updates folded in, leaving `model` (and its training) untouched.

    Only the merged weights are new tensors; every other parameter (embeddings, norms, untargeted
    layers) is shared with `model`, so the copy costs the memory of the targeted weights alone.
    Treat it as read-only (export it, evaluate it), and do not use it under FSDP (see merge_lora).
    """
    _require_lora(model)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = merged_weight(name, module)
    for name, tensor in model.state_dict().items():
        if ".lora_A." not in name and ".lora_B." not in name:
            state.setdefault(name, tensor.detach())
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        copy.lm_head.weight = copy.model.embed_tokens.weight
    return copy.train(model.training)


# ----------------------------------------------------------------------------------------------
# What trains, and what an adapter file holds
# ----------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains: the adapters and `modules_to_save`."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under nanotune's names: all a LoRA checkpoint needs to hold.

    The LoRA factors plus the parameters of `modules_to_save` (a tied embedding/head once, as
    `model.embed_tokens.weight`). Tensors are the live parameters (DTensors under FSDP), detached.
    Load one back with `model.load_state_dict(state, strict=False)` after `apply_lora`.
    """
    config = _require_lora(model)
    save_modules = _resolve_modules_to_save(model, config.modules_to_save)
    wanted = {id(p) for m in save_modules for p in model.get_submodule(m).parameters()}
    for module in model.modules():
        if isinstance(module, LoRALinear):
            wanted |= {id(module.lora_A.weight), id(module.lora_B.weight)}
    # named_parameters() names a shared tensor once, by its first name (model.embed_tokens.weight).
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in wanted}


def _require_lora(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter: call apply_lora or load_adapter first")
    return config


def _ties_trained_embedding(model: nn.Module, state: dict) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and any(n in state for n in TIED_PAIR)


def save_adapter(
    model: nn.Module, path: str | os.PathLike, run=None, base_model_name_or_path: str | None = None
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` into the folder `path`, as PEFT does.

    Tensor names are PEFT's (`base_model.model.` + nanotune's name). A trained tied embedding is
    written under both of its names, as PEFT writes it. Under FSDP every rank must call this
    (gathering a sharded tensor is a collective) and only the main rank of `run` (a
    `distributed.Run`; None = a single process) writes. Each file is written under a temporary
    name and renamed (files.write_atomically), so other files in the folder (the tokenizer...) are
    left alone.
    """
    is_writer = run is None or run.is_main
    config = _require_lora(model)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = str(base_model_name_or_path)
    state = lora_state_dict(model)
    tensors = {}
    for name, tensor in state.items():
        full = tensor.full_tensor() if _is_sharded(tensor) else tensor
        tensors[PEFT_PREFIX + name] = full.cpu().contiguous()
    tied = _ties_trained_embedding(model, state)
    if tied:  # one tensor, two names: safetensors refuses shared storage, so the second is a copy
        for name in TIED_PAIR:
            tensors.setdefault(PEFT_PREFIX + name, tensors[PEFT_PREFIX + TIED_PAIR[0]].clone())
    if not is_writer:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_text_atomically(path / ADAPTER_CONFIG, json.dumps(config.to_peft_dict(tied), indent=2))


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format adapter folder into `model`, applying LoRA first if it is not applied yet.

    Every tensor of the file must find its parameter and every adapter parameter must be in the
    file; otherwise one error lists the missing, unexpected and mis-shaped tensors. Call it before
    `fully_shard`. Returns `model`.
    """
    path = Path(path)
    config = read_adapter_config(path)
    applied = getattr(model, "lora_config", None)
    if applied is None:
        apply_lora(model, config.r, config.alpha, config.dropout, config.targets, config.modules_to_save,
                   config.use_rslora)
        model.lora_config.base_model_name_or_path = config.base_model_name_or_path
    elif (applied.r, applied.scale) != (config.r, config.scale):
        raise ValueError(
            f"{path / ADAPTER_CONFIG}: r={config.r}, scale={config.scale:g} but the model's LoRA has "
            f"r={applied.r}, scale={applied.scale:g}"
        )
    parameters = lora_state_dict(model)
    tensors = {}
    for peft_name, tensor in read_adapter_tensors(path).items():
        tensors[peft_name.removeprefix(PEFT_PREFIX)] = tensor
    if _ties_trained_embedding(model, parameters):
        tensors = one_name_for_tied_embedding(tensors, path)
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    wrong_shape = [
        f"{name}: {tuple(tensors[name].shape)} in the file, model needs {tuple(p.shape)}"
        for name, p in parameters.items() if name in tensors and tensors[name].shape != p.shape
    ]
    raise_on_mismatch(path, missing, unexpected, wrong_shape)
    for name, parameter in parameters.items():
        if _is_sharded(parameter):
            raise ValueError("load the adapter before fully_shard: the model's parameters are already sharded")
        parameter.copy_(tensors[name])
    return model


def one_name_for_tied_embedding(tensors: dict, path: Path) -> dict:
    """A tied embedding/head is one parameter (`model.embed_tokens.weight`); the file may name it twice."""
    embed, head = TIED_PAIR
    if embed in tensors and head in tensors and not torch.equal(tensors[embed], tensors[head]):
        raise CheckpointError(
            f"{path}: the model ties embed_tokens and lm_head, but the adapter holds two different tensors "
            f"for them (trained untied in PEFT without ensure_weight_tying)"
        )
    tensors = dict(tensors)
    if head in tensors:
        tensors.setdefault(embed, tensors[head])
        del tensors[head]
    return tensors
