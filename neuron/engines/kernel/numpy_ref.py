"""The reference forward pass in numpy: the oracle the other backends are tested against.

Written to be obviously right rather than fast: one sequence at a time,
one attention head at a time, the causal mask spelled out, float32
throughout as transformers' Llama runs in fp32. RoPE is HF's rotate_half
convention: a head's first and second halves are the two coordinates of
each rotated pair.
"""

from __future__ import annotations

import numpy as np

from neuron.engines.kernel.config import ModelConfig, rope_inv_freq
from neuron.engines.kernel.loader import Weights

KV_CAPACITY_MIN = 16


class CpuKV:
    """One sequence's KV cache: k and v of [layers, kv_heads, capacity, head_dim] float32.

    Capacity doubles as the sequence grows (never past the context), so a
    long generation copies O(length) in total.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.k = np.zeros((config.num_hidden_layers, config.num_key_value_heads, 0, config.head_dim), np.float32)
        self.v = self.k.copy()

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, tokens: int) -> None:
        assert tokens <= self.config.max_position_embeddings
        if tokens <= self.capacity:
            return
        capacity = min(max(KV_CAPACITY_MIN, 2 * self.capacity, tokens), self.config.max_position_embeddings)
        shape = (*self.k.shape[:2], capacity, self.k.shape[3])
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        k[:, :, : self.capacity] = self.k
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, positions: np.ndarray, config: ModelConfig) -> np.ndarray:
    """x: [tokens, heads, head_dim] at absolute `positions` [tokens]."""
    angles = np.outer(positions.astype(np.float64), rope_inv_freq(config))  # [tokens, head_dim/2]
    emb = np.concatenate([angles, angles], axis=-1)
    cos = np.cos(emb).astype(np.float32)[:, None, :]
    sin = np.sin(emb).astype(np.float32)[:, None, :]
    return x * cos + rotate_half(x) * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, config: ModelConfig) -> np.ndarray:
    """q: [n, heads, hd] at positions start..start+n-1; k, v: [kv_heads, start+n, hd] -> [n, heads, hd]."""
    n = q.shape[0]
    total = start + n
    out = np.zeros_like(q)
    # Query i sits at position start+i and may see keys 0..start+i.
    visible = np.arange(total)[None, :] <= (start + np.arange(n))[:, None]
    for head in range(config.num_attention_heads):
        kv_head = head // config.group_size
        scores = (q[:, head, :] @ k[kv_head].T) / np.float32(np.sqrt(config.head_dim))  # [n, total]
        scores = np.where(visible, scores, -np.inf)
        out[:, head, :] = softmax(scores) @ v[kv_head]
    return out


def forward_sequence(weights: Weights, config: ModelConfig, kv: CpuKV, start: int, tokens: np.ndarray) -> np.ndarray:
    """Append `tokens` at positions start.. to `kv`; return the logits [vocab] after the last one."""
    n = len(tokens)
    kv.reserve(start + n)
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    positions = np.arange(start, start + n)
    x = weights.embed[tokens]  # [n, hidden]
    for index, layer in enumerate(weights.layers):
        h = rms_norm(x, layer.input_norm, config.rms_norm_eps)
        q, k, v = h @ layer.q.T, h @ layer.k.T, h @ layer.v.T
        if config.attention_bias:
            q, k, v = q + layer.q_bias, k + layer.k_bias, v + layer.v_bias
        q = apply_rope(q.reshape(n, heads, hd), positions, config)
        k = apply_rope(k.reshape(n, kv_heads, hd), positions, config)
        kv.k[index, :, start : start + n] = k.transpose(1, 0, 2)
        kv.v[index, :, start : start + n] = v.reshape(n, kv_heads, hd).transpose(1, 0, 2)
        attn = attention(q, kv.k[index, :, : start + n], kv.v[index, :, : start + n], start, config)
        x = x + attn.reshape(n, heads * hd) @ layer.o.T
        h = rms_norm(x, layer.post_norm, config.rms_norm_eps)
        x = x + (silu(h @ layer.gate.T) * (h @ layer.up.T)) @ layer.down.T
    last = rms_norm(x[-1], weights.norm, config.rms_norm_eps)
    return (last @ weights.lm_head.T).astype(np.float32)


class NumpyBackend:
    """The oracle as a backend: each sequence of the batch runs on its own."""

    name = "numpy"
    device = "cpu"

    def __init__(self, config: ModelConfig, weights: Weights) -> None:
        self.config, self.weights = config, weights
        self.weight_bytes = weights.nbytes()
        self.kv_bytes_per_token = 2 * config.num_hidden_layers * config.kv_dim * 4

    def new_sequence(self) -> CpuKV:
        return CpuKV(self.config)

    def forward(self, work: list[tuple[CpuKV, int, np.ndarray]]) -> np.ndarray:
        logits = np.empty((len(work), self.config.vocab_size), np.float32)
        for row, (kv, start, tokens) in enumerate(work):
            logits[row] = forward_sequence(self.weights, self.config, kv, start, tokens)
        return logits

    def release(self, kv: CpuKV) -> None:
        pass  # the arrays go with the last reference

    def close(self) -> None:
        pass
