#!/usr/bin/env python3
"""Benchmark what an upstream kind's adapter costs: cortex in front of vLLM against cortex in front of neuron.

What it does
------------
Starts, as subprocesses on ephemeral ports:

* a mock neuron with zero latency (``python -m neuron serve --reply-tokens N``);
* a vLLM stand-in (``python -m tests.standins vllm``: vLLM's wire format, its
  own tokenizer and threaded server, see tests/standins.py);
* three budgets-off cortex instances (``--no-auth``): ``--upstream
  neuron=NEURON``, ``--upstream vllm=NEURON`` (the same neuron reached
  through the vLLM adapter), and ``--upstream vllm=STANDIN``.

and measures five paths in one run, interleaved in a rotating order per
repeat so machine drift hits them equally:

============== ==========================================================
direct-neuron  client -> neuron
neuron         client -> cortex (neuron adapter) -> neuron
vllm-adapter   client -> cortex (vLLM adapter) -> the same neuron
direct-vllm    client -> vLLM stand-in
vllm           client -> cortex (vLLM adapter) -> vLLM stand-in
============== ==========================================================

``vllm-adapter / neuron`` is the adapter's whole cost with the upstream held
fixed: same server, same bytes back, only the kind's request preparation,
model-list parsing, error normalisation and usage handling differ. The
second table puts cortex's relative overhead in front of each server side
by side (``vllm / direct-vllm`` against ``neuron / direct-neuron``): the
stand-in is another server with another speed, so only ratios against its
own direct path compare.

Target (issue 9): the adapter costs under 5 % (``vllm-adapter / neuron`` >=
0.95 at concurrency 1 and 64, streamed and not).

Usage
-----
    python scripts/bench_upstream_kinds.py                 # 3 repeats, c=1 and 64, both modes
    python scripts/bench_upstream_kinds.py --quick         # 1 repeat, fewer requests
    python scripts/bench_upstream_kinds.py --modes stream --concurrency 1,16,64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "cortex-mock"
PATHS = ("direct-neuron", "neuron", "vllm-adapter", "direct-vllm", "vllm")
MODES = ("non-stream", "stream")
ADAPTER_RATIO_MIN = 0.95


class StandInDaemon(lg.Daemon):
    """The stand-ins announce `{"url", "kind", "model"}` rather than a `listening` event."""

    def wait_listening(self, timeout_s: float = 20.0) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited before it announced itself{self._stderr_hint()}")
        self.url = json.loads(line)["url"]
        return self.url


def body(tokens: int, stream: bool) -> bytes:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "bench"}], "max_tokens": tokens}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


def validator(stream: bool):
    """Any 200 with content: the stand-in's tokens are words, neuron's bytes, so counts differ by path."""

    def check(raw: bytes) -> None:
        if stream:
            if not raw.rstrip().endswith(b"data: [DONE]") or b'"content":"' not in raw:
                raise lg.BadResponse(f"not a finished stream: {raw[-200:]!r}")
        elif json.loads(raw)["usage"]["completion_tokens"] <= 0:
            raise lg.BadResponse(f"no output: {raw[:200]!r}")

    return check


@dataclass
class Cell:
    mode: str
    concurrency: int
    rps: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    p50_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    cortex_cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})

    def ratio(self, path: str, base: str) -> float:
        pairs = [a / b for a, b in zip(self.rps[path], self.rps[base]) if b]
        return lg.median(pairs)

    def med(self, table: dict[str, list[float]], path: str) -> float:
        return lg.median(table[path])


async def bench(args: argparse.Namespace, targets: dict[str, lg.Daemon], cortex_of: dict[str, lg.Daemon]) -> list[Cell]:
    cells = []
    for mode in args.modes:
        stream = mode == "stream"
        for c in args.concurrency:
            cell = Cell(mode, c)
            for r in range(args.repeats):
                k = r % len(PATHS)
                for path in PATHS[k:] + PATHS[:k]:
                    host, port = targets[path].host_port
                    req = lg.Req(host, port, "/v1/chat/completions", body(args.tokens, stream), stream=stream,
                                 validate=validator(stream))
                    probes = {"cortex": cortex_of[path].cpu_s} if path in cortex_of else {}
                    res = await lg.run_point(req, c, args.requests, args.max_seconds, probes=probes)
                    if res.errors:
                        lg.progress(f"{path} {mode} c={c}: {res.errors} errors, first: {res.first_error}")
                    cell.rps[path].append(res.rps)
                    cell.p50_ms[path].append(res.pct_ms(0.5))
                    if "cortex" in res.extra and res.completed:
                        cell.cortex_cpu_ms[path].append(1000 * res.extra["cortex"] / res.completed)
                lg.progress(f"{mode} c={c} repeat {r + 1}/{args.repeats}: "
                            + ", ".join(f"{p} {cell.rps[p][-1]:,.0f}/s" for p in PATHS))
            cells.append(cell)
    return cells


def tables(cells: list[Cell]) -> str:
    f = lg.fmt
    out = [
        "| mode | concurrency | neuron req/s | vllm-adapter req/s | vllm-adapter/neuron | neuron p50 ms "
        "| vllm-adapter p50 ms | cortex CPU ms/req, neuron → vllm-adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        out.append(
            f"| {c.mode} | {c.concurrency} | {f(c.med(c.rps, 'neuron'), ',.0f')} | {f(c.med(c.rps, 'vllm-adapter'), ',.0f')} "
            f"| {f(c.ratio('vllm-adapter', 'neuron'), '.2f')} | {f(c.med(c.p50_ms, 'neuron'), '.2f')} "
            f"| {f(c.med(c.p50_ms, 'vllm-adapter'), '.2f')} | {f(c.med(c.cortex_cpu_ms, 'neuron'), '.2f')} → "
            f"{f(c.med(c.cortex_cpu_ms, 'vllm-adapter'), '.2f')} |"
        )
    out += [
        "",
        "Through cortex against direct, per server:",
        "",
        "| mode | concurrency | direct-neuron req/s | neuron/direct-neuron | direct-vllm req/s | vllm/direct-vllm "
        "| cortex CPU ms/req, neuron → vllm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        out.append(
            f"| {c.mode} | {c.concurrency} | {f(c.med(c.rps, 'direct-neuron'), ',.0f')} "
            f"| {f(c.ratio('neuron', 'direct-neuron'), '.2f')} | {f(c.med(c.rps, 'direct-vllm'), ',.0f')} "
            f"| {f(c.ratio('vllm', 'direct-vllm'), '.2f')} | {f(c.med(c.cortex_cpu_ms, 'neuron'), '.2f')} → "
            f"{f(c.med(c.cortex_cpu_ms, 'vllm'), '.2f')} |"
        )
    return "\n".join(out)


def checks(cells: list[Cell]) -> tuple[str, bool]:
    lines, ok = ["Checks:"], True
    for c in cells:
        if c.concurrency not in (1, 64):
            continue
        ratio = c.ratio("vllm-adapter", "neuron")
        passed = ratio >= ADAPTER_RATIO_MIN
        ok &= passed
        lines.append(f"- {'PASS' if passed else 'MISS'} the vLLM adapter costs < 5% ({c.mode}, c={c.concurrency}): "
                     f"vllm-adapter/neuron {ratio:.2f}")
    return "\n".join(lines), ok


def in_process_table(tokens: int) -> str:
    """Each kind's per-request adapter work (request preparation and the output guard), timed
    in-process with time.process_time: steady where the HTTP ratios above are noisy."""
    import time

    sys.path.insert(0, str(REPO_ROOT))
    from cortex.fleet.kinds import KINDS

    request = json.loads(body(tokens, stream=True))
    rows = ["| kind | µs per request (median of 5 × 20,000) | vs neuron |", "|---|---:|---:|"]
    medians = {}
    for name, kind in KINDS.items():
        runs = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(20_000):
                kind.prepare_body(request, output_tokens_max=tokens, stream=True, chat=True)
                kind.output_bytes_max(tokens)
            runs.append((time.process_time() - start) / 20_000 * 1e6)
        medians[name] = lg.median(runs)
    for name, us in medians.items():
        rows.append(f"| {name} | {us:.2f} | {us / medians['neuron']:.2f}× |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per point, 1 repeat")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--tokens", type=int, default=100, help="reply tokens and max_tokens")
    args = ap.parse_args(argv)
    args.concurrency = lg.parse_concurrency(ap, args.concurrency)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes):
        ap.error(f"--modes: each of {', '.join(MODES)}")
    args.repeats = lg.resolve_repeats(ap, args.repeats, args.quick)
    args.requests = args.requests or (300 if args.quick else 2000)
    args.max_seconds = args.max_seconds or (1.0 if args.quick else 2.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="bench_kinds_")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    daemons: list[lg.Daemon] = []

    def start(daemon: lg.Daemon) -> lg.Daemon:
        daemons.append(daemon)
        daemon.wait_listening()
        return daemon

    try:
        neuron = start(lg.Daemon("neuron", [py, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", "--reply-tokens",
                                            str(args.tokens)], os.path.join(tmp, "neuron.log"), env=env, cwd=str(REPO_ROOT)))
        vllm = start(StandInDaemon("vllm-standin", [py, "-m", "tests.standins", "vllm", "--model", MODEL, "--context",
                                                   "32768", "--reply-tokens", str(args.tokens)],
                                   os.path.join(tmp, "vllm.log"), env=env, cwd=str(REPO_ROOT)))
        cortexes = {}
        for name, upstream in (("neuron", f"neuron={neuron.url}"), ("vllm-adapter", f"vllm={neuron.url}"),
                               ("vllm", f"vllm={vllm.url}")):
            cmd = [py, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--no-auth", "--upstream", upstream,
                   "--data-dir", os.path.join(tmp, f"data-{name}"), "--log-level", "warning"]
            cortexes[name] = start(lg.Daemon(f"cortex-{name}", cmd, os.path.join(tmp, f"cortex-{name}.log"), env=env,
                                             cwd=str(REPO_ROOT)))
        targets = {"direct-neuron": neuron, "direct-vllm": vllm, **cortexes}
        cells = trio.run(bench, args, targets, cortexes)
    finally:
        for d in reversed(daemons):
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"git {lg.git_rev(str(REPO_ROOT))}; {lg.versions()}")
    print(f"{args.tokens} tokens/reply; {args.requests} requests or {args.max_seconds:g} s per point, "
          f"{args.repeats} repeat(s), paths interleaved in a rotating order; medians, ratios of paired repeats")
    print()
    print(tables(cells))
    print()
    print("Adapter work per request, in-process (what differs between kinds on the request path):")
    print()
    print(in_process_table(args.tokens))
    print()
    report, _ = checks(cells)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
