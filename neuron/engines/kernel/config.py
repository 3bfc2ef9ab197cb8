"""config.json of a Llama-family checkpoint: parsed, validated, typed.

Every error names the file and the field, because a person fixing a
checkpoint directory needs both. RoPE frequencies live here too: they are
a pure function of the config, and the `llama3` and `linear` scalings are
the ones transformers defines (`modeling_rope_utils.py`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Llama, Mistral and Qwen2 share one decoder; Qwen2 adds q/k/v biases.
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
LIMIT_LAYERS = 1024
LIMIT_DIM = 1 << 20
LIMIT_CONTEXT_TOKENS = 1 << 24


class KernelConfigError(Exception):
    """Every start-up/load error of the kernel engine; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (always on for qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert self.head_dim % 2 == 0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def param_count(self) -> int:
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * i
        if self.attention_bias:
            layer += q + 2 * kv
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h

    def to_json(self) -> dict[str, Any]:
        """The config.json a transformers LlamaConfig/Qwen2Config would read."""
        out: dict[str, Any] = {
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        return out


def _field(raw: dict[str, Any], key: str, kind: type, source: str, default: Any = ..., low: float | None = None,
           high: float | None = None) -> Any:
    value = raw.get(key, default)
    if value is ...:
        raise KernelConfigError(f"{source}: field '{key}' is missing")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KernelConfigError(f"{source}: field '{key}' must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise KernelConfigError(f"{source}: field '{key}' must be finite, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise KernelConfigError(f"{source}: field '{key}' must be from {low} to {high}, got {value!r}")
    return value


def token_ids(value: Any, source: str, key: str) -> tuple[int, ...]:
    """An `eos_token_id`-style field: null, one id or a list of ids."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise KernelConfigError(f"{source}: field '{key}' must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    scaling = raw.get("rope_scaling")
    if scaling is None and isinstance(raw.get("rope_parameters"), dict):  # transformers v5 spelling
        scaling = {k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            return None
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise KernelConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # transformers accepts both spellings
    where = f"{source}: field 'rope_scaling.rope_type'"
    if kind not in ROPE_TYPES:
        raise KernelConfigError(f"{where} is {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    out = dict(scaling, rope_type=kind)
    out.pop("type", None)
    sub = f"{source}: rope_scaling"
    if kind in ("linear", "llama3"):
        _field(scaling, "factor", float, sub, low=1e-6)
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            _field(scaling, key, float, sub, low=1e-6)
        _field(scaling, "original_max_position_embeddings", int, sub, low=1)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise KernelConfigError(f"{sub}: field 'high_freq_factor' must exceed 'low_freq_factor'")
    return out


def parse_config(raw: Any, source: str = "config.json") -> ModelConfig:
    """Validate a config.json object; `source` names the file in errors."""
    if not isinstance(raw, dict):
        raise KernelConfigError(f"{source}: must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise KernelConfigError(
            f"{source}: field 'model_type' is {model_type!r}; supported: {', '.join(MODEL_TYPES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise KernelConfigError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    hidden = _field(raw, "hidden_size", int, source, low=2, high=LIMIT_DIM)
    heads = _field(raw, "num_attention_heads", int, source, low=1, high=4096)
    kv_heads = _field(raw, "num_key_value_heads", int, source, default=heads, low=1, high=heads)
    if heads % kv_heads:
        raise KernelConfigError(
            f"{source}: field 'num_key_value_heads' ({kv_heads}) must divide 'num_attention_heads' ({heads})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise KernelConfigError(f"{source}: field 'hidden_size' ({hidden}) must be a multiple of 'num_attention_heads' ({heads})")
        head_dim = hidden // heads
    head_dim = _field({"head_dim": head_dim}, "head_dim", int, source, low=2, high=1024)
    if head_dim % 2:
        raise KernelConfigError(f"{source}: field 'head_dim' must be even for RoPE, got {head_dim}")
    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise KernelConfigError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    bias = raw.get("attention_bias", model_type == "qwen2")
    if model_type == "qwen2":
        bias = True  # Qwen2 always has q/k/v biases; its config has no such field
    if not isinstance(bias, bool):
        raise KernelConfigError(f"{source}: field 'attention_bias' must be true or false, got {bias!r}")
    if raw.get("mlp_bias"):
        raise KernelConfigError(f"{source}: field 'mlp_bias' is true; biased MLPs are not supported")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise KernelConfigError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")
    context = _field(raw, "max_position_embeddings", int, source, low=1, high=LIMIT_CONTEXT_TOKENS)
    window = raw.get("sliding_window") if model_type == "mistral" else None
    if isinstance(window, int) and not isinstance(window, bool) and 1 <= window < context:
        context = window  # within the window, full attention is exact: the context wall is the window
    theta = raw.get("rope_theta")
    if theta is None and isinstance(raw.get("rope_parameters"), dict):
        theta = raw["rope_parameters"].get("rope_theta")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_field(raw, "vocab_size", int, source, low=1, high=1 << 24),
        hidden_size=hidden,
        intermediate_size=_field(raw, "intermediate_size", int, source, low=1, high=LIMIT_DIM),
        num_hidden_layers=_field(raw, "num_hidden_layers", int, source, low=1, high=LIMIT_LAYERS),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        rms_norm_eps=_field(raw, "rms_norm_eps", float, source, default=1e-6, low=0.0, high=1.0),
        rope_theta=_field({"rope_theta": 10000.0 if theta is None else theta}, "rope_theta", float, source, low=1.0),
        rope_scaling=_rope_scaling(raw, source),
        tie_word_embeddings=tie,
        attention_bias=bias,
        bos_token_id=(token_ids(raw.get("bos_token_id"), source, "bos_token_id") or (None,))[0],
        eos_token_ids=token_ids(raw.get("eos_token_id"), source, "eos_token_id"),
        raw=raw,
    )


def read_json(path: str, what: str | None = None) -> Any:
    name = what or os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise KernelConfigError(f"{name}: file not found at {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, or a NUL in the path
        raise KernelConfigError(f"{name}: cannot read {path}: {exc}") from None


def load_config(directory: str) -> ModelConfig:
    return parse_config(read_json(os.path.join(directory, "config.json")), "config.json")


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float64), scaled as `rope_scaling` says.

    default: theta^(-2i/d). linear: divided by `factor` (positions / factor).
    llama3: long wavelengths divided by `factor`, short ones kept, and a
    smooth blend between, as transformers' `_compute_llama3_parameters`.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, smoothed, scaled)
    assert kind == "default"
    return inv_freq


def rope_tables(config: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim/2] as float32 (computed in float64)."""
    assert positions >= 1
    angles = np.outer(np.arange(positions, dtype=np.float64), rope_inv_freq(config))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
