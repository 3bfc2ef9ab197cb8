#!/usr/bin/env python3
"""Benchmark the kernel engine's backends: prefill and decode throughput, in one run.

For each backend asked for (default: every one this machine has), load the
preset once, warm it up (numba compiles on first use, CuPy captures its
decode graphs), then measure, as medians over `--repeats`:

* prefill: one sequence of `--prompt-tokens` tokens in one step, tokens/s;
* decode at batch 1, 8 and 32: that many sequences, each holding
  `--context-tokens` tokens, stepped one token each; tokens/s = batch / step time.

Tables (markdown): throughput per backend, the ratio of each backend to
numpy (the oracle, measured in the same run), and on a GPU the decode step
time against the memory-bandwidth roofline: the bytes a step must read
(all weights but the untied embedding rows it does not gather, plus the KV
cache of every sequence) divided by the HBM
bandwidth (`--hbm-tbps`, default from the GPU's name: H200 4.8 TB/s).
A last table compares BLAS (numpy's matmul) with numba_ops' register-blocked
kernel on one projection at 1-32 rows: the numba backend takes the kernel up
to SMALL_ROWS_MAX rows and BLAS above, and this table is why.

    python scripts/bench_neuron.py                       # synth-small, every backend here
    python scripts/bench_neuron.py --preset synth-tiny --quick
    python scripts/bench_neuron.py --backends numba,cupy --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neuron.engines.kernel import numba_ops  # noqa: E402
from neuron.engines.kernel.numba_ops import BLAS_THREADS  # noqa: E402
from neuron.engines.kernel.runner import BACKENDS, ModelRunner, StepInput, cuda_available, load_runner  # noqa: E402

BATCHES = (1, 8, 32)
HBM_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10": 0.6, "L4": 0.3}


def median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt(runner: ModelRunner, tokens: int, salt: int) -> list[int]:
    rng = np.random.default_rng(salt)
    return rng.integers(32, 127, size=tokens).tolist()  # printable bytes: ordinary text to the model


def bench_prefill(runner: ModelRunner, tokens: int, repeats: int) -> float:
    ids = prompt(runner, tokens, 0)
    seq = iter(range(10**6, 2 * 10**6))

    def once() -> None:
        seq_id = next(seq)
        runner.step([StepInput(seq_id, ids)])
        runner.free(seq_id)

    once()  # warm-up
    return tokens / median_s(once, repeats)


def bench_decode(runner: ModelRunner, batch: int, context: int, repeats: int) -> tuple[float, float, int]:
    """(tokens/s, median step seconds, KV bytes read per step at the median)."""
    ids = list(range(batch))
    for i in ids:  # one prefill each: a batch-32 prefill of the oracle would dominate the run
        runner.step([StepInput(i, prompt(runner, context, i + 1))])
    token = [StepInput(i, [65]) for i in ids]
    runner.step(token)  # warm-up (and the CUDA graph's capture for this batch size)
    step_s = median_s(lambda: runner.step(token), repeats)
    kv_bytes = runner.kv_tokens_used() * runner.kv_bytes_per_token
    for i in ids:
        runner.free(i)
    return batch / step_s, step_s, kv_bytes


def gpu_info() -> dict[str, Any]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    free, total = cupy.cuda.Device().mem_info
    return {"name": name, "memory_gib": round(total / 2**30, 1), "cc": f"{props['major']}.{props['minor']}"}


def bench_matmul(hidden: int, inter: int, repeats: int) -> list[dict[str, Any]]:
    """One gate|up projection at several row counts: BLAS against numba_ops.matmul_small.

    The timed loop runs over enough copies of the weight to fill ~400 MB, so each call reads
    its weight from memory as a step does, not from a cache warmed by the call before.
    """
    from neuron.engines.kernel import numba_ops

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * inter, hidden), dtype=np.float32)
    ws = [w] + [w.copy() for _ in range(max(1, (400 << 20) // w.nbytes) - 1)]
    rows = []
    for tokens in (1, 2, 8, 32, 64):
        x = rng.standard_normal((tokens, hidden), dtype=np.float32)
        out = np.empty((tokens, 2 * inter), np.float32)
        numba_ops.matmul_small(x, w, out)  # compile
        np.testing.assert_allclose(out, x @ w.T, rtol=1e-3, atol=1e-3)
        blas = median_s(lambda: [x @ m.T for m in ws], repeats) / len(ws)
        loop = median_s(lambda: [numba_ops.matmul_small(x, m, out) for m in ws], repeats) / len(ws)
        rows.append({"tokens": tokens, "shape": f"[{tokens},{hidden}] x [{hidden},{2 * inter}]",
                     "blas_ms": blas * 1e3, "numba_ms": loop * 1e3,
                     "used": "numba" if 1 < tokens <= numba_ops.SMALL_ROWS_MAX else "BLAS"})
    return rows


def bench_backend(name: str, args: argparse.Namespace, results: dict[str, Any], label: str | None = None) -> None:
    start = time.perf_counter()
    device = "cuda" if name == "cupy" else "cpu"
    runner = load_runner(preset=args.preset, backend=name, device=device)
    load_s = time.perf_counter() - start
    cfg = runner.config
    row: dict[str, Any] = {"load_s": load_s, "weight_bytes": runner.weight_bytes,
                           "kv_bytes_per_token": runner.kv_bytes_per_token,
                           # A step gathers only its tokens' rows of an untied embedding table; tied, it is the lm_head.
                           "embed_unread_bytes": 0 if cfg.tie_word_embeddings else
                           (cfg.vocab_size * cfg.hidden_size * runner.weight_bytes // cfg.param_count()),
                           "row_bytes": cfg.hidden_size * runner.weight_bytes // cfg.param_count()}
    row["prefill_tps"] = bench_prefill(runner, args.prompt_tokens, args.repeats)
    for batch in BATCHES:
        tps, step_s, kv_bytes = bench_decode(runner, batch, args.context_tokens, args.repeats)
        row[f"decode_b{batch}_tps"] = tps
        row[f"decode_b{batch}_step_s"] = step_s
        row[f"decode_b{batch}_kv_bytes"] = kv_bytes
    if name == "cupy":
        backend = runner._backend
        row["graph_failures"] = list(backend.graph_failures)
        row["steps_graphed"], row["steps_eager"] = backend.steps_graphed, backend.steps_eager
    runner.close()
    results["backends"][label or name] = row
    print(f"- {label or name}: loaded in {load_s:.1f} s, weights {runner.weight_bytes / 2**20:.0f} MiB", flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="synth-small", choices=["synth-tiny", "synth-small"])
    parser.add_argument("--backends", help=f"comma-separated, from {', '.join(BACKENDS)} (default: all available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per point (median)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prefill length")
    parser.add_argument("--context-tokens", type=int, default=128, help="tokens each decoding sequence holds")
    parser.add_argument("--quick", action="store_true", help="3 repeats, prompt 64, context 32")
    parser.add_argument("--hbm-tbps", type=float, help="GPU memory bandwidth for the roofline, TB/s")
    parser.add_argument("--no-threaded", action="store_true",
                        help="skip the extra numba run with threaded projections on a CPU that keeps them serial")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.prompt_tokens, args.context_tokens = 3, 64, 32
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    gpu = cuda_available()
    backends = args.backends.split(",") if args.backends else ["numpy", "numba"] + (["cupy"] if gpu else [])
    for b in backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}")
        if b == "cupy" and not gpu:
            parser.error("cupy asked for, but there is no CUDA device (cupy missing or cupy.cuda.is_available() False)")

    machine = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}
    if gpu:
        machine["gpu"] = gpu_info()
    blas = ThreadpoolController()
    machine["blas_threads"] = BLAS_THREADS or "default"
    machine["matmul_threads"] = numba_ops.MATMUL_THREADS
    results: dict[str, Any] = {"preset": args.preset, "machine": machine, "args": vars(args), "backends": {}}
    print(f"# neuron kernel benchmark: {args.preset}\n")
    print(f"machine: {json.dumps(machine)}\n")
    for name in backends:
        # numpy runs under the numba backend's BLAS thread limit too: the ratio compares kernels, not BLAS setups.
        limit = name == "numpy" and BLAS_THREADS > 0
        with blas.limit(limits=BLAS_THREADS, user_api="blas") if limit else nullcontext():
            bench_backend(name, args, results)
    cpus = numba_ops.usable_cpus()
    if "numba" in backends and numba_ops.MATMUL_THREADS == 1 and cpus > 1 and not args.no_threaded:
        # This CPU is small enough that numba_ops keeps projections serial; show what threads give.
        numba_ops.MATMUL_THREADS = min(cpus, numba.config.NUMBA_NUM_THREADS)
        try:
            bench_backend("numba", args, results, label=f"numba, {numba_ops.MATMUL_THREADS} threads")
        finally:
            numba_ops.MATMUL_THREADS = 1

    rows = []
    for name, r in results["backends"].items():
        rows.append([name, r["prefill_tps"]] + [r[f"decode_b{b}_tps"] for b in BATCHES]
                    + [r["decode_b32_tps"] / r["decode_b1_tps"]])
    print(f"\n## Throughput, tokens/s (median of {args.repeats}; prefill {args.prompt_tokens} tokens, "
          f"decode with {args.context_tokens} tokens of context each)\n")
    print(table(["backend", "prefill"] + [f"decode b{b}" for b in BATCHES] + ["b32 / b1"], rows))
    if "numpy" in results["backends"]:
        base = results["backends"]["numpy"]
        rows = [[name, r["prefill_tps"] / base["prefill_tps"]]
                + [r[f"decode_b{b}_tps"] / base[f"decode_b{b}_tps"] for b in BATCHES]
                for name, r in results["backends"].items() if name != "numpy"]
        if rows:
            print("\n## Speed-up over numpy (same run)\n")
            print(table(["backend", "prefill"] + [f"decode b{b}" for b in BATCHES], rows))
    if "cupy" in results["backends"]:
        r = results["backends"]["cupy"]
        tbps = args.hbm_tbps or next((v for k, v in HBM_TBPS.items() if k in machine["gpu"]["name"]), None)
        rows = []
        for b in BATCHES:
            read = r["weight_bytes"] - r["embed_unread_bytes"] + b * r["row_bytes"] * bool(r["embed_unread_bytes"]) \
                + r[f"decode_b{b}_kv_bytes"]
            roof_s = read / (tbps * 1e12) if tbps else float("nan")
            rows.append([b, r[f"decode_b{b}_step_s"] * 1e3, read / 2**20, roof_s * 1e3,
                         r[f"decode_b{b}_step_s"] / roof_s if tbps else float("nan")])
            r[f"decode_b{b}_roofline_s"] = roof_s
        print(f"\n## GPU decode step against the roofline ({machine['gpu']['name']}, "
              f"{tbps if tbps else '?'} TB/s; target: batch 1 within 3x)\n")
        print(table(["batch", "step ms", "bytes read MiB", "roofline ms", "step / roofline"], rows))
        print(f"\ngraphed steps {r['steps_graphed']}, eager steps {r['steps_eager']}"
              + (f", graph capture failed: {r['graph_failures']}" if r["graph_failures"] else ""))
    if "numba" in results["backends"]:
        from neuron.engines.kernel.checkpoint import preset_config

        config = preset_config(args.preset)
        with blas.limit(limits=BLAS_THREADS, user_api="blas") if BLAS_THREADS > 0 else nullcontext():
            mm = bench_matmul(config.hidden_size, config.intermediate_size, args.repeats)  # BLAS as a step runs it
        results["matmul"] = mm
        print("\n## One gate|up projection: BLAS (numpy matmul) vs numba's matmul_small, ms "
              "(weights read from memory, as in a step)\n")
        print(table(["tokens", "shape", "BLAS", "numba", "numba / BLAS", "the backend uses"],
                    [[m["tokens"], m["shape"], m["blas_ms"], m["numba_ms"], m["numba_ms"] / m["blas_ms"], m["used"]]
                     for m in mm]))
    load = [round(v, 2) for v in os.getloadavg()]
    machine["loadavg_at_end"] = load
    print(f"\nload average at start {machine['loadavg_at_start']}, at end {load} (other work on this machine skews CPU figures)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
