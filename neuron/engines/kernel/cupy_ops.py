"""The CuPy GPU backend: cuBLAS matmuls, RawKernels for the fused pieces, fp16 KV on the device.

Weights live on the device in fp16 (q|k|v and gate|up fused); the
residual stream stays fp32. Each step stacks all tokens (prefills and
decodes) into one [tokens, hidden] batch: cuBLAS (through `cupy.matmul`,
fp16 in, fp32 accumulate) does the projections, and RawKernels do
RMSNorm with the residual add, RoPE with the q/k/v split and the KV
write, attention over each sequence's KV cache (one block per query
token and head, online softmax, so prefill and decode share it), and
SwiGLU.

Each sequence owns one fp16 cache [layers, 2, kv_heads, capacity, hd]
that doubles as it grows; kernels find it through a per-token table of
device pointers, so one launch serves every sequence of the batch.

A decode-only step (one token per sequence) replays a CUDA graph captured
once per padded batch size: a Python-launched step costs ~100 kernel
launches, which would dwarf the arithmetic of a small model. Inputs go
into the graph's static buffers first; temporaries come from a memory
pool private to that graph, so nothing else can reuse them. Graphs can be
turned off with NEURON_CUDA_GRAPHS=0 (then every step runs eagerly), and a
graph that fails to capture or to replay turns them off for the backend.

All device work (upload, steps, capture, close) runs on one thread the
backend owns, whichever thread calls it: cupy keeps a cuBLAS handle per
thread and destroys it with the thread, and a captured graph's matmuls use
the workspace of the handle they were captured with. Trio retires idle
worker threads, so without this a graph could outlive its handle.

`import cupy` happens only when this backend is built.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from neuron.engines.kernel.config import KernelConfigError, ModelConfig, rope_tables
from neuron.engines.kernel.loader import Weights

HEAD_DIM_MAX = 256  # 8 values per lane of a warp in the attention kernel
ATTN_THREADS = 128  # 4 warps per (token, head) block (the kernel holds 8 at most)
NORM_THREADS = 256
ELEMENTWISE_THREADS = 256
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # padded batch sizes that get a CUDA graph
KV_CAPACITY_MIN = 16

_SOURCE = r"""
// fp16 as raw bits with PTX conversions: no header needed, whatever CUDA headers the host has.
typedef unsigned short half_t;
__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#define NEG_INF __int_as_float(0xff800000)

extern "C" {

__global__ void embed_gather(const half_t* embed, const int* tokens, float* x, int tokens_n, int hidden) {
    long long total = (long long)tokens_n * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / hidden;
        int c = (int)(i % hidden);
        x[i] = h2f(embed[(long long)tokens[t] * hidden + c]);
    }
}

// One block per output row r (source row rows[r] when has_rows): x += delta; y = rms_norm(x) * w.
__global__ void add_rms_norm(float* x, const half_t* delta, int has_delta, const int* rows, int has_rows,
                             const half_t* w, half_t* y, int hidden, float eps) {
    __shared__ float partial[32];
    int r = blockIdx.x;
    long long src = has_rows ? rows[r] : r;
    float* xr = x + src * hidden;
    float ss = 0.f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float v = xr[c];
        if (has_delta) v += h2f(delta[src * hidden + c]);
        xr[c] = v;
        ss += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        ss = lane < warps ? partial[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
        if (lane == 0) partial[0] = ss;
    }
    __syncthreads();
    float inv = rsqrtf(partial[0] / hidden + eps);
    for (int c = threadIdx.x; c < hidden; c += blockDim.x)
        y[(long long)r * hidden + c] = f2h(xr[c] * inv * h2f(w[c]));
}

// qkv [T, (heads + 2 kv_heads) * hd] (+ bias) -> q roped [T, heads, hd]; k roped and v into the caches.
// A cache is [layers, 2, kv_heads, cap, hd]; kv_ptrs[t] and kv_caps[t] are token t's sequence's.
__global__ void rope_store(const half_t* qkv, const half_t* bias, int has_bias, const int* positions,
                           const unsigned long long* kv_ptrs, const int* kv_caps, const float* cos_t,
                           const float* sin_t, half_t* q_out, int tokens_n, int heads, int kv_heads, int hd,
                           int layer) {
    int half_d = hd / 2;
    int rotated = (heads + kv_heads) * half_d;
    int per_token = rotated + kv_heads * hd;
    int width = (heads + 2 * kv_heads) * hd;
    long long total = (long long)tokens_n * per_token;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / per_token;
        int r = (int)(i % per_token);
        long long pos = positions[t];
        long long cap = kv_caps[t];
        const half_t* row = qkv + t * width;
        half_t* cache = (half_t*)kv_ptrs[t];
        if (r < rotated) {
            int h = r / half_d, j = r % half_d;
            int ia = h * hd + j, ib = ia + half_d;
            float a = h2f(row[ia]), b = h2f(row[ib]);
            if (has_bias) { a += h2f(bias[ia]); b += h2f(bias[ib]); }
            float c = cos_t[pos * half_d + j], s = sin_t[pos * half_d + j];
            float lo = a * c - b * s, hi = b * c + a * s;
            if (h < heads) {
                half_t* q = q_out + (t * heads + h) * hd;
                q[j] = f2h(lo);
                q[j + half_d] = f2h(hi);
            } else {
                half_t* k = cache + ((((long long)layer * 2) * kv_heads + (h - heads)) * cap + pos) * hd;
                k[j] = f2h(lo);
                k[j + half_d] = f2h(hi);
            }
        } else {
            int kh = (r - rotated) / hd, d = (r - rotated) % hd;
            int iv = (heads + kv_heads) * hd + kh * hd + d;
            float v = h2f(row[iv]);
            if (has_bias) v += h2f(bias[iv]);
            cache[((((long long)layer * 2 + 1) * kv_heads + kh) * cap + pos) * hd + d] = f2h(v);
        }
    }
}

// One block per (token, head): softmax(q k^T * scale) v over keys 0..positions[t], online, fp32.
// Warps take keys in turn; the lanes of a warp split head_dim (up to 8 values each).
__global__ void attention(const half_t* q, const unsigned long long* kv_ptrs, const int* kv_caps,
                          const int* positions, half_t* out, int heads, int kv_heads, int hd, int layer,
                          float scale) {
    __shared__ float s_m[8], s_l[8], s_acc[8][256];
    int t = blockIdx.x / heads, h = blockIdx.x % heads;
    int kh = h / (heads / kv_heads);
    int n = positions[t] + 1;
    long long cap = kv_caps[t];
    const half_t* cache = (const half_t*)kv_ptrs[t];
    const half_t* K = cache + (((long long)layer * 2) * kv_heads + kh) * cap * hd;
    const half_t* V = cache + (((long long)layer * 2 + 1) * kv_heads + kh) * cap * hd;
    const half_t* qv = q + ((long long)t * heads + h) * hd;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float qr[8], acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int d = lane + 32 * k;
        qr[k] = d < hd ? h2f(qv[d]) * scale : 0.f;
        acc[k] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j = warp; j < n; j += warps) {
        const half_t* kj = K + (long long)j * hd;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int d = lane + 32 * k;
            if (d < hd) s += qr[k] * h2f(kj[d]);
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        float m_new = fmaxf(m, s);
        float shrink = expf(m - m_new);
        float p = expf(s - m_new);
        l = l * shrink + p;
        const half_t* vj = V + (long long)j * hd;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int d = lane + 32 * k;
            acc[k] = acc[k] * shrink + (d < hd ? p * h2f(vj[d]) : 0.f);
        }
        m = m_new;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int d = lane + 32 * k;
        if (d < hd) s_acc[warp][d] = acc[k];
    }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < warps; w++) big = fmaxf(big, s_m[w]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int w = 0; w < warps; w++) {
            if (s_m[w] == NEG_INF) continue;  // a warp that saw no key
            float f = expf(s_m[w] - big);
            num += s_acc[w][d] * f;
            den += s_l[w] * f;
        }
        out[((long long)t * heads + h) * hd + d] = f2h(num / den);
    }
}

__global__ void swiglu(const half_t* gate_up, half_t* out, int tokens_n, int inter) {
    long long total = (long long)tokens_n * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / inter;
        int c = (int)(i % inter);
        float g = h2f(gate_up[t * 2 * inter + c]);
        float u = h2f(gate_up[t * 2 * inter + inter + c]);
        out[i] = f2h(g / (1.f + expf(-g)) * u);
    }
}

}
"""


class GpuKV:
    """One sequence's fp16 cache on the device: [layers, 2, kv_heads, capacity, head_dim]."""

    def __init__(self, backend: "CupyBackend") -> None:
        self.backend = backend
        self.cache: Any = None
        self.capacity = 0

    def reserve(self, tokens: int) -> None:
        b = self.backend
        assert tokens <= b.config.max_position_embeddings
        if tokens <= self.capacity:
            return
        capacity = min(max(KV_CAPACITY_MIN, 2 * self.capacity, tokens), b.config.max_position_embeddings)
        c = b.config
        cache = b.cp.empty((c.num_hidden_layers, 2, c.num_key_value_heads, capacity, c.head_dim), b.cp.float16)
        if self.cache is not None:
            cache[:, :, :, : self.capacity] = self.cache
        self.cache, self.capacity = cache, capacity

    @property
    def ptr(self) -> int:
        return int(self.cache.data.ptr)


class _Layer:
    __slots__ = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "down")


class _Graph:
    """A captured decode step for a padded batch size, and the static buffers it reads and writes."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.inputs: dict[str, Any] = {}
        self.logits: Any = None
        self.graph: Any = None
        self.pool: Any = None


class CupyBackend:
    name = "cupy"
    device = "cuda"

    def __init__(self, config: ModelConfig, weights: Weights) -> None:
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuron-cuda")
        try:
            self._device_thread.submit(self._init, config, weights).result()
        except BaseException:
            self._device_thread.shutdown(wait=True)
            raise

    def _init(self, config: ModelConfig, weights: Weights) -> None:
        import cupy  # noqa: PLC0415 - only when this backend is chosen

        if not cupy.cuda.is_available():
            raise KernelConfigError("device: cuda was asked for, but there is no CUDA device")
        if config.head_dim > HEAD_DIM_MAX:
            raise KernelConfigError(f"config.json: field 'head_dim' is {config.head_dim}; the GPU kernels take at most {HEAD_DIM_MAX}")
        self.cp = cp = cupy
        self.config = config
        self.stream = cp.cuda.Stream(non_blocking=True)
        module = cp.RawModule(code=_SOURCE)
        self.k_embed = module.get_function("embed_gather")
        self.k_norm = module.get_function("add_rms_norm")
        self.k_rope = module.get_function("rope_store")
        self.k_attn = module.get_function("attention")
        self.k_swiglu = module.get_function("swiglu")

        def dev(a: np.ndarray) -> Any:
            return cp.asarray(np.ascontiguousarray(a, dtype=np.float16))

        with self.stream:
            self.layers = []
            for w in weights.layers:
                layer = _Layer()
                layer.input_norm = dev(w.input_norm)
                layer.qkv = dev(np.concatenate([w.q, w.k, w.v], axis=0))
                layer.qkv_bias = dev(np.concatenate([w.q_bias, w.k_bias, w.v_bias])) if config.attention_bias else None
                layer.o = dev(w.o)
                layer.post_norm = dev(w.post_norm)
                layer.gate_up = dev(np.concatenate([w.gate, w.up], axis=0))
                layer.down = dev(w.down)
                self.layers.append(layer)
            self.embed = dev(weights.embed)
            self.lm_head = self.embed if weights.lm_head is weights.embed else dev(weights.lm_head)
            self.norm = dev(weights.norm)
            cos, sin = rope_tables(config, config.max_position_embeddings)
            self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
            self.dummy_h = cp.zeros(1, cp.float16)
            self.dummy_i = cp.zeros(1, cp.int32)
            self.pad_kv = GpuKV(self)  # where padded graph rows write: one position, never read back
            self.pad_kv.reserve(1)
        self.stream.synchronize()
        arrays = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            arrays += [a for a in (getattr(layer, s) for s in _Layer.__slots__) if a is not None]
        self.weight_bytes = int(sum(a.nbytes for a in arrays))
        self.kv_bytes_per_token = 2 * config.num_hidden_layers * config.kv_dim * 2
        self.eps = np.float32(config.rms_norm_eps)
        self.scale = np.float32(1.0 / math.sqrt(config.head_dim))
        self.use_graphs = os.environ.get("NEURON_CUDA_GRAPHS", "1") != "0"
        self.graphs: dict[int, _Graph] = {}
        self.graph_failures: list[str] = []
        self.steps_graphed = 0
        self.steps_eager = 0

    # -- the backend interface ---------------------------------------------------------------------

    def new_sequence(self) -> GpuKV:
        return GpuKV(self)

    def release(self, kv: GpuKV) -> None:
        kv.cache = None  # back to cupy's pool; steps are synchronous, so nothing still reads it

    def close(self) -> None:
        try:
            self._device_thread.submit(self._close).result()
        finally:
            self._device_thread.shutdown(wait=True)

    def _close(self) -> None:
        self.stream.synchronize()
        self.graphs.clear()
        self.layers = []
        self.embed = self.lm_head = self.norm = self.cos = self.sin = None
        self.pad_kv.cache = None
        self.cp.get_default_memory_pool().free_all_blocks()

    def forward(self, work: list[tuple[GpuKV, int, np.ndarray]]) -> np.ndarray:
        return self._device_thread.submit(self._forward, work).result()

    def _forward(self, work: list[tuple[GpuKV, int, np.ndarray]]) -> np.ndarray:
        with self.stream:
            for kv, start, tokens in work:
                kv.reserve(start + len(tokens))
            decode = all(len(tokens) == 1 for _, _, tokens in work)
            if decode and self.use_graphs and len(work) <= GRAPH_BATCHES[-1]:
                logits = self._graphed(work)
                if logits is not None:
                    self.steps_graphed += 1
                    return logits
            self.steps_eager += 1
            return self._eager(work)

    # -- arithmetic ---------------------------------------------------------------------------------

    def _host_inputs(self, work: list[tuple[GpuKV, int, np.ndarray]], pad_to: int = 0) -> dict[str, np.ndarray]:
        tokens = np.concatenate([t for _, _, t in work]).astype(np.int32)
        positions = np.concatenate([np.arange(s, s + len(t)) for _, s, t in work]).astype(np.int32)
        ptrs = np.concatenate([np.full(len(t), kv.ptr, np.uint64) for kv, _, t in work])
        caps = np.concatenate([np.full(len(t), kv.capacity, np.int32) for kv, _, t in work])
        pad = pad_to - len(tokens)
        if pad > 0:
            tokens = np.concatenate([tokens, np.zeros(pad, np.int32)])
            positions = np.concatenate([positions, np.zeros(pad, np.int32)])
            ptrs = np.concatenate([ptrs, np.full(pad, self.pad_kv.ptr, np.uint64)])
            caps = np.concatenate([caps, np.full(pad, self.pad_kv.capacity, np.int32)])
        return {"tokens": tokens, "positions": positions, "ptrs": ptrs, "caps": caps}

    def _eager(self, work: list[tuple[GpuKV, int, np.ndarray]]) -> np.ndarray:
        cp = self.cp
        host = self._host_inputs(work)
        inputs = {k: cp.asarray(v) for k, v in host.items()}
        last = np.cumsum([len(t) for _, _, t in work]).astype(np.int32) - 1
        logits = self._body(inputs, len(host["tokens"]), cp.asarray(last), len(work))
        return cp.asnumpy(logits, stream=self.stream)

    def _body(self, inputs: dict[str, Any], total: int, last: Any, rows: int) -> Any:
        """The forward pass on device arrays; only kernel launches and matmuls (capturable)."""
        cp, cfg = self.cp, self.config
        heads, kv_heads, hd, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        i32 = np.int32
        x = cp.empty((total, hidden), cp.float32)
        h = cp.empty((total, hidden), cp.float16)
        qkv = cp.empty((total, cfg.q_dim + 2 * cfg.kv_dim), cp.float16)
        q = cp.empty((total, heads * hd), cp.float16)
        attn = cp.empty((total, heads * hd), cp.float16)
        o = cp.empty((total, hidden), cp.float16)
        gate_up = cp.empty((total, 2 * cfg.intermediate_size), cp.float16)
        act = cp.empty((total, cfg.intermediate_size), cp.float16)
        delta = cp.empty((total, hidden), cp.float16)
        self._launch(self.k_embed, total * hidden, (self.embed, inputs["tokens"], x, i32(total), i32(hidden)))
        has_delta = 0
        for index, layer in enumerate(self.layers):
            self.k_norm((total,), (NORM_THREADS,), (x, delta, i32(has_delta), self.dummy_i, i32(0), layer.input_norm,
                                                    h, i32(hidden), self.eps))
            cp.matmul(h, layer.qkv.T, out=qkv)
            bias = layer.qkv_bias if layer.qkv_bias is not None else self.dummy_h
            per_token = (heads + kv_heads) * (hd // 2) + kv_heads * hd
            self._launch(self.k_rope, total * per_token, (
                qkv, bias, i32(layer.qkv_bias is not None), inputs["positions"], inputs["ptrs"], inputs["caps"],
                self.cos, self.sin, q, i32(total), i32(heads), i32(kv_heads), i32(hd), i32(index)))
            self.k_attn((total * heads,), (ATTN_THREADS,), (
                q, inputs["ptrs"], inputs["caps"], inputs["positions"], attn, i32(heads), i32(kv_heads), i32(hd),
                i32(index), self.scale))
            cp.matmul(attn, layer.o.T, out=o)
            self.k_norm((total,), (NORM_THREADS,), (x, o, i32(1), self.dummy_i, i32(0), layer.post_norm, h,
                                                    i32(hidden), self.eps))
            cp.matmul(h, layer.gate_up.T, out=gate_up)
            self._launch(self.k_swiglu, total * cfg.intermediate_size, (gate_up, act, i32(total), i32(cfg.intermediate_size)))
            cp.matmul(act, layer.down.T, out=delta)
            has_delta = 1
        final = cp.empty((rows, hidden), cp.float16)
        self.k_norm((rows,), (NORM_THREADS,), (x, delta, i32(1), last, i32(1), self.norm, final, i32(hidden), self.eps))
        logits16 = cp.empty((rows, cfg.vocab_size), cp.float16)
        cp.matmul(final, self.lm_head.T, out=logits16)
        return logits16.astype(cp.float32)

    def _launch(self, kernel: Any, items: int, args: tuple) -> None:
        blocks = max(1, min((items + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS, 65535))
        kernel((blocks,), (ELEMENTWISE_THREADS,), args)

    # -- CUDA graphs for decode steps ---------------------------------------------------------------

    def _graphed(self, work: list[tuple[GpuKV, int, np.ndarray]]) -> np.ndarray | None:
        batch = next(b for b in GRAPH_BATCHES if b >= len(work))
        graph = self.graphs.get(batch)
        if graph is None:
            try:
                graph = self._capture(batch)
            except Exception as exc:  # a driver or library that cannot capture: run eagerly from now on
                self.use_graphs = False
                self.graph_failures.append(f"batch {batch}: {exc!r}")
                self.stream.synchronize()
                return None
            self.graphs[batch] = graph
        host = self._host_inputs(work, pad_to=batch)
        try:
            for key, value in host.items():
                graph.inputs[key].set(value, stream=self.stream)
            graph.graph.launch(stream=self.stream)
            return self.cp.asnumpy(graph.logits[: len(work)], stream=self.stream)
        except Exception as exc:  # a replay the driver refuses: this step and the rest run eagerly
            self.use_graphs = False
            self.graph_failures.append(f"batch {batch} replay: {exc!r}")
            try:
                self.stream.synchronize()  # before the graphs' pools go: a launch may still be running
            finally:
                self.graphs.clear()
            return None

    def _capture(self, batch: int) -> _Graph:
        cp = self.cp
        graph = _Graph(batch)
        pad = [(self.pad_kv, 0, np.zeros(1, np.int64))] * batch
        host = self._host_inputs(pad)
        graph.inputs = {k: cp.asarray(v) for k, v in host.items()}
        last = cp.arange(batch, dtype=cp.int32)
        graph.inputs["last"] = last
        self._body(graph.inputs, batch, last, batch)  # warm up: kernels loaded, cuBLAS ready
        self.stream.synchronize()
        graph.pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(graph.pool.malloc):
            self.stream.begin_capture()
            try:
                graph.logits = self._body(graph.inputs, batch, last, batch)
            finally:
                graph.graph = self.stream.end_capture()
        return graph
