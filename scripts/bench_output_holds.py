#!/usr/bin/env python3
"""Benchmark incremental output holds on the request path: what extending a hold costs a streamed reply.

Question: with `budget.output_holds = "incremental"`, cortex extends a request's hold a slice at a time as its
reply streams, each extension a durable ledger write the relay waits for. How much latency does that add to a
reply, per 1,000 output tokens? Against: the same cortex code on the worst-case policy (one hold, no
extensions), in the same run, in front of the same mock neuron.

What it does: one mock neuron that writes every reply at full speed (`--token-interval-ms 0`, `--reply-tokens N`, default 4,000),
and three cortex processes on their own SQLite ledgers (synchronous=normal): worst_case, incremental with the
default 1,024-token slices, and incremental with 128-token slices (8x the extensions). Each round sends the same
streamed requests (max_tokens N) to each cortex in turn (the order rotated each round), at concurrency 1 and 16,
and records each reply's
latency (request to last byte). Medians over rounds; the added p50 is scaled to 1,000 output tokens. Then,
in this process, the cost of one extension itself (`BudgetService.extend`: the durable write the relay
waits for), at synchronous normal and full: what a reply waits per slice, whatever the machine's noise.

    python scripts/bench_output_holds.py            # 5 rounds
    python scripts/bench_output_holds.py --quick    # 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _loadgen as lg  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
MODEL = "cortex-mock"
POLICIES = (("worst_case", None), ("incremental", 1024), ("incremental", 128))


def _start(tmp: Path, name: str, cmd: list[str]) -> lg.Daemon:
    daemon = lg.Daemon(name, [sys.executable, "-m", *cmd], stderr_path=str(tmp / f"{name}.log"))
    daemon.wait_listening(60)
    return daemon


async def _round(url: str, key: str, n: int, concurrency: int, tokens: int) -> list[float]:
    latencies: list[float] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    limiter = trio.CapacityLimiter(concurrency)
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {key}"}) as client:
        async def one() -> None:
            async with limiter:
                started = time.perf_counter()
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, r.status_code
                    async for _ in r.aiter_bytes():
                        pass
                latencies.append(time.perf_counter() - started)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return latencies


async def _extension_latency(tmp: Path, extensions: int, synchronous: str) -> list[float]:
    """Seconds per `BudgetService.extend` (one durable ledger write, the relay's wait), in this process."""
    from cortex.budget.estimate import Estimate
    from cortex.budget.ledger import Caps
    from cortex.budget.service import BudgetService
    from cortex.budget.store import ThreadedStore
    from cortex.config import BudgetConfig
    from cortex.metrics import GatewayMetrics

    times: list[float] = []
    async with ThreadedStore.open(tmp / f"ext-{synchronous}.db", synchronous) as store:
        service = await BudgetService.load(store, time.time, BudgetConfig(synchronous=synchronous), GatewayMetrics())
        record, _ = await service.create_key("bench", None, Caps(balance_tokens=10**15))
        hold = await service.reserve(record, Estimate(100, 128), "r", MODEL)
        for _ in range(extensions):
            started = time.perf_counter()
            grown = await service.extend(hold, 128)
            times.append(time.perf_counter() - started)
            assert grown is not None
        await service.settle(hold, 100)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=4000, help="output tokens per reply (default 4000: 3 extensions of 1,024)")
    ap.add_argument("--requests", type=int, default=16, help="requests per point per round")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="bench-output-holds-"))
    neuron = _start(tmp, "neuron", ["neuron", "serve", "--listen", "127.0.0.1:0", "--token-interval-ms", "0",
                                    "--reply-tokens", str(args.tokens)])
    cortexes: dict[str, tuple[lg.Daemon, str]] = {}
    try:
        for policy, slice_tokens in POLICIES:
            label = policy if slice_tokens is None else f"{policy}/{slice_tokens}"
            config = tmp / f"{label.replace('/', '-')}.toml"
            config.write_text(f'[budget]\noutput_holds = "{policy}"\n'
                              + (f"output_slice_tokens = {slice_tokens}\n" if slice_tokens else ""))
            daemon = _start(tmp, label.replace("/", "-"), [
                "cortex", "serve", "--listen", "127.0.0.1:0", "--neuron", neuron.url, "--config", str(config),
                "--data-dir", str(tmp / f"data-{label.replace('/', '-')}"), "--admin-token", ADMIN,
            ])
            r = httpx.post(daemon.url + "/admin/v1/keys", json={"name": "bench", "balance_tokens": 10**12},
                           headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
            cortexes[label] = (daemon, r.json()["key"])
        results: dict[tuple[str, int], list[float]] = {}
        for concurrency in (1, 16):
            for label, (daemon, key) in cortexes.items():  # warm-up: imports, pools, the ledger's pages
                trio.run(_round, daemon.url, key, 4, concurrency, args.tokens)
            labels = list(cortexes)
            for r_ in range(rounds):
                lg.progress(f"concurrency {concurrency}, round {r_ + 1}/{rounds}")
                for label in labels[r_ % len(labels):] + labels[:r_ % len(labels)]:  # rotated: no policy always first
                    daemon, key = cortexes[label]
                    lat = trio.run(_round, daemon.url, key, args.requests, concurrency, args.tokens)
                    results.setdefault((label, concurrency), []).append(statistics.median(lat))
        print(f"\n## Incremental output holds: added latency per streamed reply ({args.tokens} output tokens, "
              f"{rounds} rounds x {args.requests} requests; medians of per-round p50s)\n")
        print("| concurrency | policy | p50 (ms) | added p50 vs worst_case (ms) | added per 1,000 output tokens (ms) | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for concurrency in (1, 16):
            base = statistics.median(results[("worst_case", concurrency)]) * 1000
            for label in cortexes:
                p50 = statistics.median(results[(label, concurrency)]) * 1000
                added = p50 - base
                print(f"| {concurrency} | {label} | {p50:.1f} | {added:+.1f} | {added * 1000 / args.tokens:+.1f} |"
                      f" {p50 / base:.2f} |")
        print("\n## One extension on the request path (BudgetService.extend on SQLite, in process; 500 in a row)\n")
        print("| synchronous | p50 (ms) | p99 (ms) | per 1,000 output tokens at 1,024-token slices (ms) |")
        print("| --- | --- | --- | --- |")
        for synchronous in ("normal", "full"):
            lat = sorted(trio.run(_extension_latency, tmp, 500, synchronous))
            p50, p99 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000
            print(f"| {synchronous} | {p50:.3f} | {p99:.3f} | {p50 * 1000 / 1024:.3f} |")
        print(f"\n{lg.versions()}")
    finally:
        for daemon, _ in cortexes.values():
            daemon.stop()
        neuron.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
