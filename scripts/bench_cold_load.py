#!/usr/bin/env python3
"""Benchmark what cortex adds to a cold load: a request for an unloaded model, against the neuron's own load.

For each repeat, on a fresh mock neuron with a pretend load time (`--load-ms`):

* **neuron alone**: `POST /models/load` for a model, timed by the client,
  then one chat request to it: the floor any gateway must pay.
* **through cortex**: a cold chat request for a catalogue model (with
  `memory_mb`) on a second fresh neuron behind cortex (budgets on, a key):
  the plan, the residency read, the load, the model-list refresh and the
  request, timed by the client.

The difference is what cortex adds (target, issue 11: at most 50 ms). An
eviction point adds the unload of one resident first. Medians over repeats.

    python scripts/bench_cold_load.py --repeats 5 --load-ms 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "hi"}]
HTTP = httpx.Client(timeout=60)  # one client for every path: no per-call client set-up in the figures


def neuron(tmp: str, env: dict, load_ms: int, name: str, memory_mb: int = 4096) -> lg.Daemon:
    cmd = [sys.executable, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", "--memory-mb", str(memory_mb),
           "--model-memory-mb", "1024", "--load-ms", str(load_ms)]
    d = lg.Daemon(name, cmd, os.path.join(tmp, f"{name}.log"), env=env, cwd=str(REPO_ROOT))
    d.wait_listening()
    return d


def direct(n: lg.Daemon, model: str) -> float:
    HTTP.get(n.url + "/health")
    start = time.perf_counter()
    r = HTTP.post(n.url + "/models/load", json={"model": model, "memory_mb": 1024}, timeout=60)
    assert r.status_code == 200, r.text
    r = HTTP.post(n.url + "/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def through_cortex(tmp: str, env: dict, n: lg.Daemon, model: str, i: int) -> float:
    catalogue = Path(tmp) / f"models-{i}.toml"
    catalogue.write_text(f'[[models]]\nid = "{model}"\nmemory_mb = 1024\n[[models]]\nid = "cortex-mock"\nmemory_mb = 1024\n')
    data = os.path.join(tmp, f"data-{i}")
    made = subprocess.run([sys.executable, "-m", "cortex", "keys", "create", "--name", "b", "--balance", "1000000",
                           "--json", "--data-dir", data], env=env, cwd=str(REPO_ROOT), capture_output=True, text=True)
    key = json.loads(made.stdout)["key"]
    cmd = [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--neuron", n.url, "--models",
           str(catalogue), "--data-dir", data, "--log-level", "warning"]
    c = lg.Daemon(f"cortex-{i}", cmd, os.path.join(tmp, f"cortex-{i}.log"), env=env, cwd=str(REPO_ROOT))
    try:
        c.wait_listening()
        HTTP.get(c.url + "/health")  # the connection is open before the clock starts, as on the direct path's second call
        start = time.perf_counter()
        r = HTTP.post(c.url + "/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 5},
                       headers={"authorization": f"Bearer {key}"}, timeout=60)
        took = time.perf_counter() - start
        assert r.status_code == 200, r.text
        return took
    finally:
        c.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--load-ms", type=int, default=500)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_cold_")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    rows = {"neuron alone": [], "through cortex": [], "through cortex, one eviction": []}
    try:
        for i in range(args.repeats):
            a = neuron(tmp, env, args.load_ms, f"na-{i}")
            b = neuron(tmp, env, args.load_ms, f"nb-{i}")
            full = neuron(tmp, env, args.load_ms, f"nc-{i}", memory_mb=1024)  # only cortex-mock fits: evict it
            try:
                rows["neuron alone"].append(direct(a, "cold"))
                rows["through cortex"].append(through_cortex(tmp, env, b, "cold", 2 * i))
                rows["through cortex, one eviction"].append(through_cortex(tmp, env, full, "cold", 2 * i + 1))
            finally:
                for d in (a, b, full):
                    d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(rows["neuron alone"])
    print(f"Cold request with a {args.load_ms} ms pretend load; median of {args.repeats} fresh neurons\n")
    print("| path | median ms | added by cortex, ms |")
    print("|---|---:|---:|")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1000:,.1f} | {'' if name == 'neuron alone' else f'{(med - base) * 1000:+,.1f}'} |")
    added = statistics.median(rows["through cortex"]) - base
    print(f"\n{'PASS' if added <= 0.050 else 'MISS'} cortex adds at most 50 ms to a cold load: {added * 1000:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
