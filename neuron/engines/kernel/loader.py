"""Weights: read from safetensors (one file or sharded), checked against the config.

Tensors are stored as F32, F16 or BF16 and upcast to float32 on the CPU
(numpy has no bfloat16, so BF16 is read as raw uint16 and shifted into
the high half of a float32). Every tensor's shape is checked against
config.json before any arithmetic, and errors name the file, the tensor
and both shapes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import safe_open

from neuron.engines.kernel.config import KernelConfigError, ModelConfig, read_json

LIMIT_HEADER_BYTES = 100 << 20  # safetensors' own cap
LIMIT_SHARDS = 4096
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass
class LayerWeights:
    input_norm: np.ndarray  # [hidden]
    q: np.ndarray  # [heads*head_dim, hidden] (HF's [out, in])
    k: np.ndarray  # [kv_heads*head_dim, hidden]
    v: np.ndarray  # [kv_heads*head_dim, hidden]
    o: np.ndarray  # [hidden, heads*head_dim]
    post_norm: np.ndarray  # [hidden]
    gate: np.ndarray  # [intermediate, hidden]
    up: np.ndarray  # [intermediate, hidden]
    down: np.ndarray  # [hidden, intermediate]
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray  # [hidden]
    lm_head: np.ndarray  # [vocab, hidden]; the embedding itself when tied

    def nbytes(self) -> int:
        arrays = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            arrays += [a for a in vars(layer).values() if a is not None]
        return sum(a.nbytes for a in arrays)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, HF Llama names, HF shapes."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_dim, config.kv_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


# Tensors a checkpoint may carry that the forward pass does not use.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weights_from_tensors(config: ModelConfig, get: Any, where: dict[str, str]) -> Weights:
    """Build Weights from `get(name) -> float32 array`; `where[name]` is the file it is in."""
    shapes = expected_shapes(config)
    for name in shapes:
        if name not in where:
            raise KernelConfigError(f"{_files(where)}: tensor '{name}' is missing (config.json expects shape {list(shapes[name])})")

    def t(name: str) -> np.ndarray:
        a = get(name)
        assert a.dtype == np.float32 and a.shape == shapes[name], (name, a.dtype, a.shape)
        return a

    layers = []
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        bias = config.attention_bias
        layers.append(LayerWeights(
            input_norm=t(p + "input_layernorm.weight"),
            q=t(p + "self_attn.q_proj.weight"), k=t(p + "self_attn.k_proj.weight"),
            v=t(p + "self_attn.v_proj.weight"), o=t(p + "self_attn.o_proj.weight"),
            post_norm=t(p + "post_attention_layernorm.weight"),
            gate=t(p + "mlp.gate_proj.weight"), up=t(p + "mlp.up_proj.weight"), down=t(p + "mlp.down_proj.weight"),
            q_bias=t(p + "self_attn.q_proj.bias") if bias else None,
            k_bias=t(p + "self_attn.k_proj.bias") if bias else None,
            v_bias=t(p + "self_attn.v_proj.bias") if bias else None,
        ))
    embed = t("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else t("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=t("model.norm.weight"), lm_head=lm_head)


def _files(where: dict[str, str]) -> str:
    files = sorted(set(where.values()))
    return files[0] if len(files) == 1 else "model.safetensors.index.json"


# -- safetensors -----------------------------------------------------------------------------


def read_header(path: str, name: str) -> dict[str, Any]:
    """The safetensors JSON header: {tensor: {dtype, shape, data_offsets}} (and __metadata__)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise KernelConfigError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", raw)
            if size > LIMIT_HEADER_BYTES:
                raise KernelConfigError(f"{name}: header length {size} is over {LIMIT_HEADER_BYTES} bytes")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise KernelConfigError(f"{name}: file not found at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KernelConfigError(f"{name}: cannot read the safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise KernelConfigError(f"{name}: the safetensors header is not a JSON object")
    return header


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class TensorFile:
    """One safetensors file: shapes from its header, tensors as float32 on demand."""

    def __init__(self, path: str, name: str) -> None:
        self.path, self.name = path, name
        self.header = read_header(path, name)
        with open(path, "rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self.tensors = {k: v for k, v in self.header.items() if k != "__metadata__"}
        for tensor, info in self.tensors.items():
            if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
                dtype = info.get("dtype") if isinstance(info, dict) else info
                raise KernelConfigError(f"{name}: tensor '{tensor}' has dtype {dtype!r}; supported: {', '.join(DTYPES)}")

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self.tensors[tensor]["shape"])

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        """These tensors as contiguous float32 arrays."""
        out: dict[str, np.ndarray] = {}
        try:
            with safe_open(self.path, framework="numpy") as f:
                for tensor in names:
                    if self.tensors[tensor]["dtype"] == "BF16":
                        out[tensor] = self._load_bf16(tensor)
                    else:
                        out[tensor] = np.ascontiguousarray(f.get_tensor(tensor), dtype=np.float32)
        except KernelConfigError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise KernelConfigError(f"{self.name}: cannot read its tensors: {exc}") from None
        return out

    def _load_bf16(self, tensor: str) -> np.ndarray:
        info = self.tensors[tensor]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != 2 * count:
            raise KernelConfigError(f"{self.name}: tensor '{tensor}' holds {end - begin} bytes, not {2 * count}")
        raw = np.fromfile(self.path, dtype="<u2", count=count, offset=self.data_start + begin)
        if raw.size != count:
            raise KernelConfigError(f"{self.name}: tensor '{tensor}' is cut short (the file ends early)")
        return _bf16_to_f32(raw).reshape(info["shape"])


def _shard_files(directory: str) -> dict[str, str]:
    """Tensor name -> file name, from model.safetensors or the sharded index."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise KernelConfigError("model.safetensors.index.json: field 'weight_map' must map tensor names to file names")
        if len(set(weight_map.values())) > LIMIT_SHARDS:
            raise KernelConfigError(f"model.safetensors.index.json: field 'weight_map' names over {LIMIT_SHARDS} shards")
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise KernelConfigError(f"model.safetensors.index.json: field 'weight_map' names {shard!r}, not a file in the directory")
            if not os.path.isfile(os.path.join(directory, shard)):
                raise KernelConfigError(f"model.safetensors.index.json: field 'weight_map' lists shard '{shard}', which is missing from {directory}")
        return dict(weight_map)
    if os.path.isfile(single):
        return {name: "model.safetensors" for name in TensorFile(single, "model.safetensors").tensors}
    raise KernelConfigError(f"model.safetensors: file not found in {directory} (nor model.safetensors.index.json)")


def load_weights(directory: str, config: ModelConfig) -> Weights:
    """Open every shard, check every shape against config.json, then read and upcast."""
    where = _shard_files(directory)
    files = {shard: TensorFile(os.path.join(directory, shard), shard) for shard in sorted(set(where.values()))}
    shapes = expected_shapes(config)
    for name, shard in where.items():
        if name not in files[shard].tensors:
            raise KernelConfigError(f"model.safetensors.index.json: field 'weight_map' puts tensor '{name}' in '{shard}', which does not hold it")
        if name in shapes and files[shard].shape(name) != shapes[name]:
            raise KernelConfigError(
                f"{shard}: tensor '{name}' has shape {list(files[shard].shape(name))}, "
                f"but config.json implies {list(shapes[name])}"
            )
    loaded: dict[str, np.ndarray] = {}
    for shard, file in files.items():
        loaded.update(file.load([n for n, s in where.items() if s == shard and n in shapes]))
    return weights_from_tensors(config, loaded.__getitem__, where)


# -- writing (presets, tests) ----------------------------------------------------------------


def write_bf16_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """safetensors with BF16 tensors (rounded to nearest even), which safetensors.numpy cannot write."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        blob = f32_to_bf16(np.ascontiguousarray(array, dtype=np.float32)).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (finite inputs)."""
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """What x becomes after a bf16 round trip."""
    return _bf16_to_f32(f32_to_bf16(np.ascontiguousarray(x, dtype=np.float32)))


def iter_tensors(weights: Weights, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Weights back to HF-named tensors (for writing a checkpoint)."""
    yield "model.embed_tokens.weight", weights.embed
    for n, layer in enumerate(weights.layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", layer.input_norm
        yield p + "self_attn.q_proj.weight", layer.q
        yield p + "self_attn.k_proj.weight", layer.k
        yield p + "self_attn.v_proj.weight", layer.v
        yield p + "self_attn.o_proj.weight", layer.o
        if config.attention_bias:
            assert layer.q_bias is not None and layer.k_bias is not None and layer.v_bias is not None
            yield p + "self_attn.q_proj.bias", layer.q_bias
            yield p + "self_attn.k_proj.bias", layer.k_bias
            yield p + "self_attn.v_proj.bias", layer.v_bias
        yield p + "post_attention_layernorm.weight", layer.post_norm
        yield p + "mlp.gate_proj.weight", layer.gate
        yield p + "mlp.up_proj.weight", layer.up
        yield p + "mlp.down_proj.weight", layer.down
    yield "model.norm.weight", weights.norm
    if not config.tie_word_embeddings:
        yield "lm_head.weight", weights.lm_head
