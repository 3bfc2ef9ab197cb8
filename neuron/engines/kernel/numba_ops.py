"""The numba CPU backend: the whole batch in one pass, fused kernels between the projections.

All tokens of a step (prefills and decodes together) are stacked into one
[tokens, hidden] matrix, so each weight is read once per step, not once
per sequence. A projection of 2-32 rows (a decode batch) runs in
`matmul_small`, a register-blocked numba loop over the weight in its
checkpoint layout; one row (a gemv) and prefill-sized ones stay in BLAS
(numpy's OpenBLAS), which is as fast or faster there (scripts/bench_neuron.py
measures both). numba does the rest, fused: RMSNorm (with the residual
add), RoPE with the q/k/v split, SwiGLU, and decode attention over each
sequence's KV cache (one pass, online softmax). A prefill chunk's
attention is batched BLAS matmuls instead: a scalar loop cannot match
them once there are many queries.

Kernels are `nogil=True, cache=True`. `parallel=True` is on long-context
attention and, on a CPU with more than two cores (NEURON_MATMUL_THREADS),
on the decode projections; the elementwise kernels and short attention
run faster serial, since a parallel launch costs ~0.5 ms on a small busy
CPU. The cache goes next to this file, or where numba falls back when
that is read-only. Threads: numba's workqueue layer (it parks its threads;
OpenMP's spin) and BLAS held to NEURON_BLAS_THREADS (default 1) during a
step, because on a small or shared CPU spinning helper threads starved
the real work.
"""

from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
from numba import prange
from threadpoolctl import ThreadpoolController

from neuron.engines.kernel.config import KernelConfigError, ModelConfig, rope_tables
from neuron.engines.kernel.loader import Weights
from neuron.engines.kernel.numpy_ref import CpuKV

# The workqueue threading layer parks its threads between kernels; OpenMP's spin, and on a
# small shared CPU the spinning starves OpenBLAS's threads (decode measured 10-20x slower).
# NUMBA_THREADING_LAYER still overrides. workqueue must not run two parallel regions at
# once, so steps take this lock: one numba step at a time per process.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_PARALLEL = threading.Lock()

# BLAS threads during a step. OpenBLAS's helper threads spin after each call, and on a
# small or shared CPU they starve numba's threads and each other: synth-small decode on
# 2 busy cores ran 3-10x faster single-threaded. NEURON_BLAS_THREADS=0 leaves BLAS alone.
def _env_threads(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise KernelConfigError(f"{name}: expected a whole number of threads, at least {minimum}; got {raw!r}")
    return value


BLAS_THREADS = _env_threads("NEURON_BLAS_THREADS", 1, 0)
_BLAS = ThreadpoolController()



def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _matmul_threads() -> int:
    """Threads for a decode step's projections: NEURON_MATMUL_THREADS, else every usable CPU past two.

    On 2 cores shared with other work, a parallel projection waits for a busy core: synth-small
    decode at batch 8 ran 1.44x faster on 2 threads when idle but 1.23x slower beside one busy
    process, so a CPU this small keeps them serial.
    """
    usable = usable_cpus()
    threads = _env_threads("NEURON_MATMUL_THREADS", usable if usable > 2 else 1, 1)
    return min(threads, numba.config.NUMBA_NUM_THREADS)


MATMUL_THREADS = _matmul_threads()

JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


# Serial kernels: each is a single pass over a few MB at most, which a parallel launch costs more than
# it saves (decode on 2 busy cores: ~0.5 ms per launch to wake and join workqueue threads).
@numba.njit(**JIT)
def add_rms_norm(x, delta, weight, eps, out):  # pragma: no cover - compiled
    """x += delta (when delta has rows); out = rms_norm(x) * weight. x, delta, out: [rows, hidden]."""
    rows, hidden = x.shape
    for r in range(rows):
        acc = 0.0
        for c in range(hidden):
            if delta.shape[0]:
                x[r, c] += delta[r, c]
            acc += x[r, c] * x[r, c]
        inv = 1.0 / math.sqrt(acc / hidden + eps)
        for c in range(hidden):
            out[r, c] = np.float32(x[r, c] * inv) * weight[c]


@numba.njit(**JIT)
def rope_split(qkv, positions, cos, sin, heads, kv_heads, q_out, k_out, v_out):  # pragma: no cover
    """qkv [T, (heads + 2 kv_heads) * hd] -> q, k roped (rotate_half) and v, each [T, heads, hd]."""
    tokens = qkv.shape[0]
    hd = q_out.shape[2]
    half = hd // 2
    for t in range(tokens):
        p = positions[t]
        for h in range(heads + kv_heads):
            base = h * hd
            for i in range(half):
                a = qkv[t, base + i]
                b = qkv[t, base + half + i]
                c = cos[p, i]
                s = sin[p, i]
                if h < heads:
                    q_out[t, h, i] = a * c - b * s
                    q_out[t, h, half + i] = b * c + a * s
                else:
                    k_out[t, h - heads, i] = a * c - b * s
                    k_out[t, h - heads, half + i] = b * c + a * s
        vbase = (heads + kv_heads) * hd
        for h in range(kv_heads):
            for i in range(hd):
                v_out[t, h, i] = qkv[t, vbase + h * hd + i]


@numba.njit(**JIT)
def swiglu(gate_up, out):  # pragma: no cover
    """gate_up [T, 2 * inter] (gate then up) -> silu(gate) * up, [T, inter]."""
    tokens, inter = out.shape
    for t in range(tokens):
        for c in range(inter):
            g = gate_up[t, c]
            out[t, c] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, inter + c]


# Attention may reassociate its float32 sums (fastmath 'reassoc'), so LLVM vectorises the dot products.
ATTN_JIT = dict(JIT, fastmath={"reassoc", "contract"})


@numba.njit(**ATTN_JIT)
def _attend(q, k_cache, v_cache, start, scale, out, i, h):  # pragma: no cover
    """Query i (position start+i), head h: softmax over keys 0..start+i in one pass, running max."""
    hd = q.shape[2]
    kvh = h // (q.shape[1] // k_cache.shape[0])
    acc = np.zeros(hd, np.float32)
    m = -np.inf
    total = 0.0
    for j in range(start + i + 1):
        dot = np.float32(0.0)
        for d in range(hd):
            dot += q[i, h, d] * k_cache[kvh, j, d]
        s = dot * scale
        if s > m:
            shrink = np.float32(math.exp(m - s))
            total *= shrink
            for d in range(hd):
                acc[d] *= shrink
            m = s
        w = np.float32(math.exp(s - m))
        total += w
        for d in range(hd):
            acc[d] += w * v_cache[kvh, j, d]
    for d in range(hd):
        out[i, h, d] = acc[d] / total


@numba.njit(**ATTN_JIT)
def attention(q, k_cache, v_cache, start, scale, out):  # pragma: no cover
    """One sequence. q, out: [n, heads, hd] at positions start..; caches [kv_heads, capacity, hd]."""
    n, heads, _ = q.shape
    for item in range(n * heads):
        _attend(q, k_cache, v_cache, start, scale, out, item // heads, item % heads)


@numba.njit(parallel=True, **ATTN_JIT)
def attention_parallel(q, k_cache, v_cache, start, scale, out):  # pragma: no cover
    """`attention` over (query, head) pairs in parallel: for prefills, where it pays."""
    n, heads, _ = q.shape
    for item in prange(n * heads):
        _attend(q, k_cache, v_cache, start, scale, out, item // heads, item % heads)


def attention_blas(q, k_cache, v_cache, start, scale, out):  # noqa: ANN001 - the kernels' signature
    """`attention` as batched BLAS matmuls (scores, then weights @ values): for prefill chunks.

    Query heads sharing a kv head are stacked, so each kv head is one matmul.
    """
    n, heads, hd = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    total = start + n
    stacked = q.reshape(n, kv_heads, group, hd).transpose(1, 2, 0, 3).reshape(kv_heads, group * n, hd)
    scores = np.matmul(stacked, k_cache[:, :total].transpose(0, 2, 1)).reshape(kv_heads, group, n, total)
    scores *= scale
    hidden = np.arange(total)[None, :] > (start + np.arange(n))[:, None]  # key after the query: masked
    scores = np.where(hidden, np.float32(-np.inf), scores)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    mixed = np.matmul(scores.reshape(kv_heads, group * n, total), v_cache[:, :total])
    out[:] = mixed.reshape(kv_heads, group, n, hd).transpose(2, 0, 1, 3).reshape(n, heads, hd)


# How one sequence's attention runs: BLAS for a chunk of this many tokens or more; below it the
# numba kernel, in parallel once its multiply-adds pass PARALLEL_ATTENTION_MIN (long contexts).
BLAS_ATTENTION_MIN_TOKENS = 8
PARALLEL_ATTENTION_MIN = 1 << 22


def attention_kernel(tokens: int, start: int, heads: int, hd: int):  # noqa: ANN201
    if tokens >= BLAS_ATTENTION_MIN_TOKENS:
        return attention_blas
    return attention_parallel if tokens * heads * (start + tokens) * hd >= PARALLEL_ATTENTION_MIN else attention


# Projections of a few rows (decode) read each weight once and do a few multiply-adds per
# element. With the weights coming from memory, as in a step, OpenBLAS's sgemm measured
# 1.2-2.6x slower than this register-blocked loop at 2-32 rows; they tie at 48 rows, and from 64
# on (prefill) BLAS wins. One row is a gemv, which BLAS streams at memory speed: it keeps those.
# scripts/bench_neuron.py compares the two.
SMALL_ROWS_MAX = 32


@numba.njit(**ATTN_JIT)
def matmul_small(x, w, out):  # pragma: no cover - compiled
    """out = x @ w.T for x [rows, inner], w [cols, inner] (a weight in its checkpoint layout).

    4 columns x 4 rows per pass: 16 independent sums, 8 loads for 16 multiply-adds, vectorised
    along `inner` (contiguous in both), each weight row read once from memory.
    """
    rows, inner = x.shape
    cols = w.shape[0]
    rows4, cols4 = rows - rows % 4, cols - cols % 4
    for n in range(0, cols4, 4):
        for m in range(0, rows4, 4):
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
            for i in range(inner):
                w0, w1, w2, w3 = w[n, i], w[n + 1, i], w[n + 2, i], w[n + 3, i]
                xa, xb, xc, xd = x[m, i], x[m + 1, i], x[m + 2, i], x[m + 3, i]
                a0 += xa * w0
                a1 += xa * w1
                a2 += xa * w2
                a3 += xa * w3
                b0 += xb * w0
                b1 += xb * w1
                b2 += xb * w2
                b3 += xb * w3
                c0 += xc * w0
                c1 += xc * w1
                c2 += xc * w2
                c3 += xc * w3
                d0 += xd * w0
                d1 += xd * w1
                d2 += xd * w2
                d3 += xd * w3
            out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3
            out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = b0, b1, b2, b3
            out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = c0, c1, c2, c3
            out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = d0, d1, d2, d3
        for m in range(rows4, rows):  # the last rows % 4 rows: 4 columns at a time
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(inner):
                xa = x[m, i]
                a0 += xa * w[n, i]
                a1 += xa * w[n + 1, i]
                a2 += xa * w[n + 2, i]
                a3 += xa * w[n + 3, i]
            out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3
    for n in range(cols4, cols):  # the last cols % 4 columns, one at a time
        for m in range(rows):
            acc = np.float32(0.0)
            for i in range(inner):
                acc += x[m, i] * w[n, i]
            out[m, n] = acc


PARALLEL_COLS = 64  # columns per parallel task: 64 weight rows, ~200 KB at hidden 768


@numba.njit(parallel=True, **ATTN_JIT)
def matmul_small_parallel(x, w, out):  # pragma: no cover - compiled
    """`matmul_small` over blocks of PARALLEL_COLS columns in parallel (MATMUL_THREADS > 1)."""
    cols = w.shape[0]
    for block in prange((cols + PARALLEL_COLS - 1) // PARALLEL_COLS):
        n0 = block * PARALLEL_COLS
        n1 = min(cols, n0 + PARALLEL_COLS)
        matmul_small(x, w[n0:n1], out[:, n0:n1])


def project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T: the numba kernel for 2..SMALL_ROWS_MAX rows, BLAS otherwise. x C-contiguous float32."""
    if not 1 < x.shape[0] <= SMALL_ROWS_MAX:
        return x @ w.T
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    (matmul_small_parallel if MATMUL_THREADS > 1 else matmul_small)(x, w, out)
    return out


class _Layer:
    __slots__ = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down")


class NumbaBackend:
    """Fused weights (q|k|v and gate|up concatenated), float32, KV caches per sequence."""

    name = "numba"
    device = "cpu"

    def __init__(self, config: ModelConfig, weights: Weights) -> None:
        self.config = config
        self.layers = []
        for w in weights.layers:
            layer = _Layer()
            layer.input_norm = w.input_norm
            layer.qkv = np.ascontiguousarray(np.concatenate([w.q, w.k, w.v], axis=0))
            layer.qkv_bias = (np.concatenate([w.q_bias, w.k_bias, w.v_bias]) if config.attention_bias else None)
            layer.o = np.ascontiguousarray(w.o)
            layer.post_norm = w.post_norm
            layer.gate_up = np.ascontiguousarray(np.concatenate([w.gate, w.up], axis=0))
            layer.down = np.ascontiguousarray(w.down)
            self.layers.append(layer)
        self.embed, self.norm = weights.embed, weights.norm
        self.lm_head = np.ascontiguousarray(weights.lm_head)
        self.cos, self.sin = rope_tables(config, config.max_position_embeddings)
        self.weight_bytes = weights.nbytes()
        self.kv_bytes_per_token = 2 * config.num_hidden_layers * config.kv_dim * 4
        self._no_delta = np.zeros((0, config.hidden_size), np.float32)
        self._eps = np.float32(config.rms_norm_eps)
        self._scale = np.float32(1.0 / math.sqrt(config.head_dim))

    def new_sequence(self) -> CpuKV:
        return CpuKV(self.config)

    def release(self, kv: CpuKV) -> None:
        pass

    def close(self) -> None:
        pass

    def forward(self, work: list[tuple[CpuKV, int, np.ndarray]]) -> np.ndarray:
        with _PARALLEL:
            if MATMUL_THREADS > 1:
                numba.set_num_threads(MATMUL_THREADS)  # per calling thread: steps run on worker threads
            if BLAS_THREADS <= 0:
                return self._forward(work)
            with _BLAS.limit(limits=BLAS_THREADS, user_api="blas"):
                return self._forward(work)

    def _forward(self, work: list[tuple[CpuKV, int, np.ndarray]]) -> np.ndarray:
        cfg = self.config
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        tokens = np.concatenate([t for _, _, t in work])
        positions = np.concatenate([np.arange(start, start + len(t)) for _, start, t in work]).astype(np.int64)
        bounds = np.cumsum([0] + [len(t) for _, _, t in work])
        for kv, start, t in work:
            kv.reserve(start + len(t))
        total = len(tokens)
        x = self.embed[tokens]  # a copy: the residual stream, updated in place
        h = np.empty_like(x)
        q = np.empty((total, heads, hd), np.float32)
        k = np.empty((total, kv_heads, hd), np.float32)
        v = np.empty((total, kv_heads, hd), np.float32)
        attn = np.empty((total, heads, hd), np.float32)
        act = np.empty((total, cfg.intermediate_size), np.float32)
        delta = self._no_delta
        for index, layer in enumerate(self.layers):
            add_rms_norm(x, delta, layer.input_norm, self._eps, h)
            qkv = project(h, layer.qkv)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            rope_split(qkv, positions, self.cos, self.sin, heads, kv_heads, q, k, v)
            for row, (kv, start, t) in enumerate(work):
                a, b = bounds[row], bounds[row + 1]
                kv.k[index, :, start : start + b - a] = k[a:b].transpose(1, 0, 2)
                kv.v[index, :, start : start + b - a] = v[a:b].transpose(1, 0, 2)
                kernel = attention_kernel(b - a, start, heads, hd)
                kernel(q[a:b], kv.k[index], kv.v[index], start, self._scale, attn[a:b])
            add_rms_norm(x, project(attn.reshape(total, heads * hd), layer.o), layer.post_norm, self._eps, h)
            swiglu(project(h, layer.gate_up), act)
            delta = project(act, layer.down)
        last = np.ascontiguousarray(x[bounds[1:] - 1])
        add_rms_norm(last, delta[bounds[1:] - 1], self.norm, self._eps, last_out := np.empty_like(last))
        return project(last_out, self.lm_head)
