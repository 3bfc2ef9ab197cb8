"""The synthetic presets and `make_checkpoint`, which writes one as a real HF directory.

A preset's weights are a pure function of (preset, tensor name): each
tensor draws from its own PCG64 stream, so building in memory and loading
the written checkpoint give the same floats. The scales keep activations
near unit size through the layers (fan-in scaling, residual branches
shrunk by 1/sqrt(2 * layers)) and make the logits peaked enough that
greedy decoding wanders over bytes instead of repeating one token. The
specials' rows of lm_head are shrunk so generations are mostly bytes.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from neuron.engines.kernel.config import KernelConfigError, ModelConfig
from neuron.engines.kernel.loader import expected_shapes, write_bf16_safetensors
from neuron.engines.kernel.tokenizer import KernelTokenizer, build_byte_level_tokenizer

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|tool|>", "<|tool_call|>", "<|tools|>", "<|pad|>",
]
BOS, EOT, END = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
VOCAB = 256 + len(SPECIALS)
SPECIAL_ID = {s: 256 + i for i, s in enumerate(SPECIALS)}

# One role marker per message, the text, then <|eot_id|>; a name goes after the marker on its own line.
# Tool calls are compact JSON of {name, arguments} after <|tool_call|>, and tools are compact JSON
# after <|tools|>: never more bytes than cortex's estimate counts for them.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- if tools -%}\n"
    "{{- '<|tools|>' ~ (tools | tojson(separators=(',', ':'))) -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set role = {'developer': 'system', 'function': 'tool'}.get(message['role'], message['role']) -%}\n"
    "{%- if role not in ['system', 'user', 'assistant', 'tool'] -%}\n"
    "{{- raise_exception('unknown message role: ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- '<|' ~ role ~ '|>' -}}\n"
    "{%- if message.get('name') is string and message['name'] -%}\n"
    "{{- message['name'] ~ '\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- for call in message.get('tool_calls') or [] -%}\n"
    "{{- '<|tool_call|>' ~ ({'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson(separators=(',', ':'))) -}}\n"
    "{%- endfor -%}\n"
    "{{- '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}\n"
)

PRESETS: dict[str, ModelConfig] = {
    "synth-tiny": ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=SPECIAL_ID[BOS], eos_token_ids=(SPECIAL_ID[EOT], SPECIAL_ID[END]),
    ),
    "synth-small": ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=SPECIAL_ID[BOS], eos_token_ids=(SPECIAL_ID[EOT], SPECIAL_ID[END]),
    ),
}
PRESET_SEEDS = {"synth-tiny": 1, "synth-small": 2}
LOGIT_SCALE = 4.0  # std of a byte token's logit for a unit-RMS final state
SPECIAL_ROW_SCALE = 0.25


def preset_config(preset: str) -> ModelConfig:
    try:
        return PRESETS[preset]
    except KeyError:
        raise KernelConfigError(f"preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None


def _draw(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    return rng.standard_normal(shape, dtype=np.float32)


def synth_tensor(config: ModelConfig, seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One preset tensor: a pure function of (seed, name, shape)."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * _draw(seed, name, shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.02 * _draw(seed, name, shape)).astype(np.float32)
    if name == "model.embed_tokens.weight":
        return _draw(seed, name, shape)
    if name == "lm_head.weight":
        w = _draw(seed, name, shape) * np.float32(LOGIT_SCALE / np.sqrt(config.hidden_size))
        w[256:] *= np.float32(SPECIAL_ROW_SCALE)
        return w
    scale = 1.0 / np.sqrt(shape[1])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        scale /= np.sqrt(2 * config.num_hidden_layers)  # keep the residual stream's growth bounded
    elif name.endswith(("q_proj.weight", "k_proj.weight")):
        scale *= 2.0  # sharper attention, so the context matters
    return _draw(seed, name, shape) * np.float32(scale)


def preset_tensors(preset: str, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """All tensors of a preset, HF names; `config` may vary it (tied, biases) for tests."""
    config = config or preset_config(preset)
    seed = PRESET_SEEDS[preset]
    return {name: synth_tensor(config, seed, name, shape) for name, shape in expected_shapes(config).items()}


def tokenizer_config_json() -> dict[str, Any]:
    return {
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(SPECIAL_ID[s]): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                 "rstrip": False, "single_word": False}
            for s in SPECIALS
        },
    }


def preset_tokenizer(config: ModelConfig) -> KernelTokenizer:
    tok_config = dict(tokenizer_config_json(), model_max_length=config.max_position_embeddings)
    return KernelTokenizer(build_byte_level_tokenizer(SPECIALS), tok_config, chat_template=CHAT_TEMPLATE,
                           eos_token_ids=frozenset(config.eos_token_ids), bos_token_id=config.bos_token_id)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_checkpoint(preset: str, directory: str, *, shards: int = 1, dtype: str = "float32",
                    tie_word_embeddings: bool | None = None, model_type: str | None = None) -> str:
    """Write `preset` as an HF-layout directory; returns the directory.

    `shards` > 1 writes model-0000i-of-0000n.safetensors plus the index;
    `dtype` is float32, float16 or bfloat16; the last two options vary the
    architecture (tied embeddings; "qwen2" for q/k/v biases) for tests.
    """
    config = preset_config(preset)
    if tie_word_embeddings is not None:
        config = replace(config, tie_word_embeddings=tie_word_embeddings)
    if model_type is not None:
        config = replace(config, model_type=model_type, attention_bias=model_type == "qwen2" or config.attention_bias)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise KernelConfigError(f"make_checkpoint: dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if not 1 <= shards <= 64:
        raise KernelConfigError(f"make_checkpoint: shards must be from 1 to 64, got {shards}")
    os.makedirs(directory, exist_ok=True)
    tensors = preset_tensors(preset, config)
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    files = ["model.safetensors"] if shards == 1 else [
        f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)
    ]
    for file, group in zip(files, groups):
        part = {n: tensors[n] for n in group}
        path = os.path.join(directory, file)
        if dtype == "bfloat16":
            write_bf16_safetensors(path, part)
        else:
            save_file({n: a.astype(dtype) for n, a in part.items()}, path, metadata={"format": "pt"})
    if shards > 1:
        total = sum(a.size * (4 if dtype == "float32" else 2) for a in tensors.values())
        _write_json(os.path.join(directory, "model.safetensors.index.json"), {
            "metadata": {"total_size": total},
            "weight_map": {n: file for file, group in zip(files, groups) for n in group},
        })
    _write_json(os.path.join(directory, "config.json"), dict(config.to_json(), torch_dtype=dtype))
    build_byte_level_tokenizer(SPECIALS).save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"),
                dict(tokenizer_config_json(), model_max_length=config.max_position_embeddings))
    _write_json(os.path.join(directory, "generation_config.json"), {
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids), "do_sample": True,
        "temperature": 1.0, "top_p": 1.0,
    })
    return directory
