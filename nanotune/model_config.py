"""The shape of a LLaMA-like model (`LlamaConfig`), with the field names of HF's `config.json`.

Kept apart from `model.py` so that reading or writing a checkpoint's config, or counting a model's
parameters, needs no model code; `nanotune.model` re-exports `LlamaConfig`.

The LLaMA-like families differ in a few switches, not in their layout: one `Llama` reads them all
(`FAMILIES`), each as transformers 5's own modeling file does (models/<family>/modeling_*.py):

  llama    attention_bias (q, k, v, o), mlp_bias, tied embeddings (Llama-3.2), llama3 rope scaling
  mistral  sliding_window on every layer; no biases
  qwen2    bias on q, k, v (never o); sliding window only with use_sliding_window, on the layers
           layer_types marks "sliding_attention" (without layer_types: from max_window_layers on)
  qwen3    RMSNorm over each head's D on q and k, before RoPE (q_norm, k_norm); attention_bias on
           all four projections; the sliding window keys of qwen2

To add a family: its entry in FAMILIES (the HF class name, its switches, the config keys it reads
beyond the common ones, the HF defaults that differ from ours) and, for a new switch, the few lines
of model.py that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

WINDOW_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


@dataclass(frozen=True)
class Family:
    """What sets one LLaMA-like family apart: switches the model reads, the config keys it owns."""

    architecture: str  # the HF class, written to config.json's `architectures`
    keys: tuple[str, ...] = ()  # config keys the family reads beyond those every family reads
    qkv_bias: bool = False  # bias on q, k, v whatever attention_bias says (Qwen2)
    qk_norm: bool = False  # q_norm and k_norm (Qwen3)
    window_on_every_layer: bool = False  # sliding_window applies to every layer (Mistral)
    defaults: dict = field(default_factory=dict)  # transformers' defaults where they differ from ours


_QWEN_DEFAULTS = {"bos_token_id": None, "eos_token_id": None, "sliding_window": 4096}
FAMILIES = {
    "llama": Family("LlamaForCausalLM", keys=("attention_bias", "mlp_bias")),
    "mistral": Family("MistralForCausalLM", keys=("sliding_window",), window_on_every_layer=True,
                      defaults={"sliding_window": 4096}),
    "qwen2": Family("Qwen2ForCausalLM", keys=WINDOW_KEYS, qkv_bias=True, defaults=_QWEN_DEFAULTS),
    "qwen3": Family("Qwen3ForCausalLM", keys=("attention_bias", *WINDOW_KEYS), qk_norm=True,
                    defaults={**_QWEN_DEFAULTS, "head_dim": 128}),
}
FAMILY_KEYS = ("attention_bias", "mlp_bias", *WINDOW_KEYS)  # every key some family reads and others do not


@dataclass
class LlamaConfig:
    """The shape of a LLaMA-like model, with HF `config.json` field names; `model_type` is the family.

    `rope_scaling` is None or a dict with `rope_type` in {"linear", "dynamic", "llama3"} and its
    parameters (`factor`; for llama3 also `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). transformers 5 calls the same thing `rope_parameters`
    (with `rope_theta` inside); `from_hf_dict` reads both spellings.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"  # a key of FAMILIES
    use_sliding_window: bool = False  # qwen2/qwen3: whether sliding_window applies at all
    sliding_window: int | None = None  # W: a query sees the W newest keys, itself included
    max_window_layers: int = 28  # qwen2/qwen3 without layer_types: windowed layers start here
    layer_types: list[str] | None = None  # qwen2/qwen3: "full_attention" or "sliding_attention" per layer
    # Keys of config.json that we do not model but must give back unchanged on save.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not supported: nanotune reads {', '.join(FAMILIES)}")
        defaults = {f.name: f.default for f in fields(self)}
        for key in set(FAMILY_KEYS) - set(self.family.keys):
            if getattr(self, key) != defaults[key]:
                raise ValueError(f"{key} is not a setting of {self.model_type} models (transformers ignores it)")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers; the model has {self.num_hidden_layers}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type in ("linear", "dynamic", "llama3"):
                if "factor" not in scaling:
                    raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
                if rope_type == "llama3":
                    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                        if key not in scaling:
                            raise ValueError(f"rope_scaling of type 'llama3' needs {key!r}")
                self.rope_scaling = scaling
            else:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}: expected none, linear, dynamic or llama3"
                )

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "LlamaConfig":
        """Build from the dict of a HF `config.json` (transformers 4.x or 5.x spelling).

        Keys the family does not read (a Mistral's `attention_bias`...) are kept in `extra`, as
        transformers ignores them too, and given back unchanged on save.
        """
        hf = dict(hf)
        model_type = hf.get("model_type") or "llama"
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not supported: nanotune reads {', '.join(FAMILIES)}")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json has hidden_act {act!r}; LLaMA-like models use silu")
        rope = hf.pop("rope_parameters", None)
        if rope and "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        if rope and rope.get("rope_type", "default") != "default":
            hf.setdefault("rope_scaling", rope)
        family = FAMILIES[model_type]
        hf = {**family.defaults, **hf}
        known = {f.name for f in fields(cls)} - {"extra"} - (set(FAMILY_KEYS) - set(family.keys))
        kwargs = {k: v for k, v in hf.items() if k in known}
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict:
        """The dict to write as `config.json`, of the model's own family (a Qwen3 stays a Qwen3);
        transformers 4.x and 5.x both load it."""
        out = dict(self.extra)
        not_read = set(FAMILY_KEYS) - set(self.family.keys)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra" and f.name not in not_read})
        out.pop("rope_parameters", None)
        out["architectures"] = [self.family.architecture]
        out["hidden_act"] = "silu"
        out.setdefault("attention_dropout", 0.0)
        if self.model_type == "llama":
            out.setdefault("pretraining_tp", 1)
        return out

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family.qkv_bias

    @property
    def layer_windows(self) -> list[int | None]:
        """The sliding window of each layer, None for full causal attention, as transformers 5 decides."""
        if self.family.window_on_every_layer:
            return [self.sliding_window] * self.num_hidden_layers
        if not (self.use_sliding_window and self.sliding_window):
            return [None] * self.num_hidden_layers
        if self.layer_types is not None:
            return [self.sliding_window if kind == "sliding_attention" else None for kind in self.layer_types]
        return [self.sliding_window if i >= self.max_window_layers else None for i in range(self.num_hidden_layers)]

    @property
    def n_params(self) -> int:
        """Parameter count, computed from the shape alone (no model needed)."""
        C, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = C * q + 2 * C * kv + q * C + self.qkv_bias * (q + 2 * kv) + self.attention_bias * C
        attn += 2 * self.head_dim * self.family.qk_norm
        mlp = 3 * C * self.intermediate_size + self.mlp_bias * (2 * self.intermediate_size + C)
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + L * (attn + mlp + 2 * C) + C + head
