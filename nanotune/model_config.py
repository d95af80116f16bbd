"""The shape of a LLaMA model (`LlamaConfig`), with the field names of HF's `config.json`.

Kept apart from `model.py` so that reading or writing a checkpoint's config, or counting a model's
parameters, needs no model code; `nanotune.model` re-exports `LlamaConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class LlamaConfig:
    """The shape of a LLaMA model, with HF `config.json` field names.

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
    # Keys of config.json that we do not model but must give back unchanged on save.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
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
        """Build from the dict of a HF `config.json` (transformers 4.x or 5.x spelling)."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", None):
            raise ValueError(f"config.json has model_type {model_type!r}; nanotune reads LLaMA models")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json has hidden_act {act!r}; LLaMA uses silu")
        rope = hf.pop("rope_parameters", None)
        if rope and "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        if rope and rope.get("rope_type", "default") != "default":
            hf.setdefault("rope_scaling", rope)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in hf.items() if k in known}
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict:
        """The dict to write as `config.json`; transformers 4.x and 5.x both load it."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        out.pop("rope_parameters", None)
        out["model_type"] = "llama"
        out["architectures"] = ["LlamaForCausalLM"]
        out["hidden_act"] = "silu"
        out.setdefault("attention_dropout", 0.0)
        out.setdefault("pretraining_tp", 1)
        return out

    @property
    def n_params(self) -> int:
        """Parameter count, computed from the shape alone (no model needed)."""
        C, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = C * q + 2 * C * kv + q * C
        mlp = 3 * C * self.intermediate_size
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + L * (attn + mlp + 2 * C) + C + head
