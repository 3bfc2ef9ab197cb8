#!/usr/bin/env python3
"""Benchmark what cortex costs in front of a neuron: direct vs via cortex.

What it does
------------
1. Starts two daemons as subprocesses, each on an ephemeral port, and waits
   for their one-line JSON ``listening`` announcement on stdout:

       python -m neuron serve --listen 127.0.0.1:0 --reply-tokens 100
       python -m cortex serve --listen 127.0.0.1:0 --neuron NEURON_URL [--cortex-args ...]

   The mock neuron has zero latency (no TTFT, no inter-token delay), so every
   millisecond measured is HTTP/JSON/event-loop work.  cortex's per-request log
   (stderr) goes to a temporary file that is deleted afterwards.
2. Drives ``POST /v1/chat/completions`` (``max_tokens`` 100) with the lean
   trio + h11 load generator in ``scripts/_loadgen.py``: ``concurrency`` tasks,
   one persistent keep-alive connection each, sequential requests, latency =
   full response time (for ``stream: true``: until the end of the chunked SSE
   body, after ``data: [DONE]``).  Once directly (client -> neuron) and once
   through cortex (client -> cortex -> neuron), for every mode and
   concurrency level.
3. Warms both paths up, then runs every point for a fixed request count or a
   time cap (whichever comes first), ``--repeats`` times; direct and via are
   measured back to back in each repeat (alternating which goes first) and the
   table reports medians over the repeats.  The via/direct throughput ratio,
   the added p50 and p99/p50 are medians of the per-repeat paired values.
4. Prints one Markdown table, CPU notes (load generator CPU %, daemon CPU ms
   per request, read from /proc) and a check section with PASS/MISS for the
   targets:

   * cortex adds <= 2 ms at p50 at concurrency 1 (non-stream);
   * throughput through cortex at c=64 >= 50% of direct;
   * p99 through cortex at c=64 < 4x its p50.

The load generator runs in this process; the daemons are separate processes.
On a small machine all three share the CPUs: through cortex there is one more
busy process, which is part of what the throughput ratio shows (see the CPU
notes to tell CPU cost from added waiting).

Usage
-----
    python scripts/bench_proxy.py                      # full run (~2 min)
    python scripts/bench_proxy.py --quick              # fewer requests, 1 repeat
    python scripts/bench_proxy.py --modes non-stream --concurrency 1,64
    python scripts/bench_proxy.py --cortex-args "--config budget.toml" --label budget-on
    python scripts/bench_proxy.py --profile-cortex /tmp/cortex-prof.txt  # pyinstrument

For a profile without in-process overhead, attach a sampling profiler to the
cortex pid printed at start-up while a via-cortex point runs, e.g.
``py-spy record --pid PID --duration 8 --format raw -o cortex.raw``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("non-stream", "stream")
DEFAULT_CONCURRENCY = (1, 16, 64)
PATH = "/v1/chat/completions"

# Targets
ADDED_P50_MAX_MS = 2.0  # non-stream, c=1
THROUGHPUT_RATIO_MIN = 0.50  # via/direct at c=64
TAIL_RATIO_MAX = 4.0  # via p99/p50 at c=64
TARGET_C_HIGH = 64


def request_body(tokens: int, stream: bool) -> bytes:
    body: dict = {
        "model": "cortex-mock",
        "messages": [{"role": "user", "content": "bench"}],
        "max_tokens": tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def make_validator(stream: bool, tokens: int):
    def check_plain(body: bytes) -> None:
        obj = json.loads(body)
        got = obj["usage"]["completion_tokens"]
        if got != tokens:
            raise lg.BadResponse(f"expected {tokens} completion tokens, got {got}")

    def check_stream(body: bytes) -> None:
        events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
        if not events or events[-1] != b"data: [DONE]":
            raise lg.BadResponse("stream did not end with data: [DONE]")
        content = 0
        for line in events[:-1]:
            for choice in json.loads(line[6:]).get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    content += 1
        if content != tokens:
            raise lg.BadResponse(f"expected {tokens} content events, got {content}")

    return check_stream if stream else check_plain


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Sample:
    """One measured point of one repeat (direct or via)."""

    result: lg.Result
    neuron_cpu_s: float
    cortex_cpu_s: float  # NaN for direct

    def per_req_ms(self, cpu_s: float) -> float:
        n = self.result.completed
        return 1000.0 * cpu_s / n if n else float("nan")


@dataclass
class Cell:
    mode: str
    concurrency: int
    direct: list[Sample] = field(default_factory=list)
    via: list[Sample] = field(default_factory=list)

    # --- medians over repeats ------------------------------------------------
    @staticmethod
    def _med(samples: list[Sample], fn) -> float:
        return lg.median([fn(s) for s in samples])

    def rps(self, which: str) -> float:
        return self._med(getattr(self, which), lambda s: s.result.rps)

    def p(self, which: str, q: float) -> float:
        return self._med(getattr(self, which), lambda s: s.result.pct_ms(q))

    def _paired(self, fn) -> float:
        return lg.median([fn(d, v) for d, v in zip(self.direct, self.via)])

    @property
    def ratio(self) -> float:
        return self._paired(lambda d, v: v.result.rps / d.result.rps if d.result.rps else float("nan"))

    @property
    def added_p50(self) -> float:
        return self._paired(lambda d, v: v.result.pct_ms(0.5) - d.result.pct_ms(0.5))

    @property
    def tail_ratio_via(self) -> float:
        return self._med(self.via, lambda s: s.result.pct_ms(0.99) / s.result.pct_ms(0.5))

    @property
    def errors(self) -> int:
        return sum(s.result.errors for s in self.direct + self.via)

    @property
    def truncated(self) -> bool:
        return any(s.result.truncated for s in self.direct + self.via)


async def measure(req: lg.Req, c: int, args, neuron: lg.Daemon, cortex: lg.Daemon | None) -> Sample:
    probes = {"neuron": neuron.cpu_s}
    if cortex is not None:
        probes["cortex"] = cortex.cpu_s
    res = await lg.run_point(req, c, args.requests, args.max_seconds, probes=probes)
    return Sample(res, res.extra["neuron"], res.extra.get("cortex", float("nan")))


async def bench(args, neuron: lg.Daemon, cortex: lg.Daemon) -> list[Cell]:
    reqs: dict[tuple[str, str], lg.Req] = {}
    for mode in args.modes:
        stream = mode == "stream"
        body = request_body(args.tokens, stream)
        validate = make_validator(stream, args.tokens)
        for name, d in (("direct", neuron), ("via", cortex)):
            host, port = d.host_port
            reqs[(mode, name)] = lg.Req(host, port, PATH, body, stream=stream, validate=validate,
                                        headers=args.headers)

    # Warm-up: both paths, every mode (imports, caches, cortex's upstream pool).
    for (mode, name), req in reqs.items():
        lg.progress(f"warm-up {mode} {name} ...")
        res = await lg.run_point(req, max(args.concurrency), args.warmup_requests, args.warmup_seconds)
        if res.errors:
            raise RuntimeError(f"warm-up {mode} {name}: {res.errors} errors; first: {res.first_error}")

    cells = {(m, c): Cell(m, c) for m in args.modes for c in args.concurrency}
    for r in range(args.repeats):
        order = ("direct", "via") if r % 2 == 0 else ("via", "direct")
        for mode in args.modes:
            for c in args.concurrency:
                cell = cells[(mode, c)]
                for name in order:
                    sample = await measure(reqs[(mode, name)], c, args, neuron, cortex if name == "via" else None)
                    getattr(cell, name).append(sample)
                    res = sample.result
                    extra = f", cortex {sample.per_req_ms(sample.cortex_cpu_s):.2f}" if name == "via" else ""
                    lg.progress(
                        f"[{r + 1}/{args.repeats}] {mode:10s} c={c:<3d} {name:6s} "
                        f"{res.completed:5d} ok{'*' if res.truncated else ' '} {res.errors} err  "
                        f"{res.rps:8,.0f} req/s  p50 {res.pct_ms(0.5):7.2f}  p99 {res.pct_ms(0.99):7.2f} ms  "
                        f"cpu ms/req: neuron {sample.per_req_ms(sample.neuron_cpu_s):.2f}{extra}, "
                        f"loadgen {res.loadgen_cpu_pct:.0f}%"
                        + (f"  first error: {res.first_error}" if res.first_error else "")
                    )
    return list(cells.values())


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _f(x: float, fmt: str) -> str:
    return "n/a" if x != x else format(x, fmt)


def format_table(cells: list[Cell]) -> str:
    rows = [
        "| mode | concurrency | direct req/s | via-cortex req/s | via/direct | direct p50 ms | direct p99 ms "
        "| via p50 ms | via p99 ms | added p50 ms | via p99/p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        rows.append(
            f"| {cell.mode} | {cell.concurrency} | {_f(cell.rps('direct'), ',.0f')} | {_f(cell.rps('via'), ',.0f')} "
            f"| {_f(cell.ratio, '.2f')} | {_f(cell.p('direct', 0.5), '.2f')} | {_f(cell.p('direct', 0.99), '.2f')} "
            f"| {_f(cell.p('via', 0.5), '.2f')} | {_f(cell.p('via', 0.99), '.2f')} | {_f(cell.added_p50, '+.2f')} "
            f"| {_f(cell.tail_ratio_via, '.1f')} |"
        )
    return "\n".join(rows)


def format_cpu_notes(cells: list[Cell]) -> str:
    lines = ["CPU (medians; ms of CPU per request, from /proc; loadgen = this process's CPU % of wall time):"]
    for cell in cells:
        med = Cell._med
        lines.append(
            f"- {cell.mode} c={cell.concurrency}: direct: neuron "
            f"{_f(med(cell.direct, lambda s: s.per_req_ms(s.neuron_cpu_s)), '.2f')}, loadgen "
            f"{_f(med(cell.direct, lambda s: s.result.loadgen_cpu_pct), '.0f')}% | via: neuron "
            f"{_f(med(cell.via, lambda s: s.per_req_ms(s.neuron_cpu_s)), '.2f')}, cortex "
            f"{_f(med(cell.via, lambda s: s.per_req_ms(s.cortex_cpu_s)), '.2f')}, loadgen "
            f"{_f(med(cell.via, lambda s: s.result.loadgen_cpu_pct), '.0f')}%"
        )
    return "\n".join(lines)


def format_checks(cells: list[Cell]) -> tuple[str, bool]:
    by = {(c.mode, c.concurrency): c for c in cells}
    lines = ["Checks:"]
    all_ok = True

    def line(ok: bool | None, text: str) -> None:
        nonlocal all_ok
        tag = "n/a " if ok is None else ("PASS" if ok else "MISS")
        if ok is False:
            all_ok = False
        lines.append(f"- {tag} {text}")

    cell = by.get(("non-stream", 1))
    if cell:
        added = cell.added_p50
        line(added <= ADDED_P50_MAX_MS,
             f"added p50 at c=1 (non-stream) <= {ADDED_P50_MAX_MS:g} ms: {added:+.2f} ms "
             f"(direct {cell.p('direct', 0.5):.2f} ms, via {cell.p('via', 0.5):.2f} ms)")
    else:
        line(None, "added p50 at c=1 (non-stream): not measured (needs --modes non-stream, c=1)")

    for mode in MODES:
        cell = by.get((mode, TARGET_C_HIGH))
        if not cell:
            if (mode, 1) in by or any(m == mode for m, _ in by):
                line(None, f"{mode} c={TARGET_C_HIGH} targets: not measured (needs c={TARGET_C_HIGH})")
            continue
        r = cell.ratio
        line(r >= THROUGHPUT_RATIO_MIN,
             f"{mode} c={TARGET_C_HIGH} throughput via/direct >= {THROUGHPUT_RATIO_MIN:.0%}: {r:.0%} "
             f"({cell.rps('via'):,.0f} vs {cell.rps('direct'):,.0f} req/s)")
        t = cell.tail_ratio_via
        line(t < TAIL_RATIO_MAX,
             f"{mode} c={TARGET_C_HIGH} via p99 < {TAIL_RATIO_MAX:g}x p50: {t:.1f}x "
             f"(p50 {cell.p('via', 0.5):.2f} ms, p99 {cell.p('via', 0.99):.2f} ms)")
    return "\n".join(lines), all_ok


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark cortex's overhead: client -> neuron vs client -> cortex -> neuron.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests per point, 1 repeat")
    ap.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                    help="comma-separated concurrency levels (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of: {', '.join(MODES)} (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, default=None, help="requests per point (default 4000, --quick 500)")
    ap.add_argument("--max-seconds", type=float, default=None, help="time cap per point (default 3, --quick 1)")
    ap.add_argument("--tokens", type=int, default=100, help="reply tokens (neuron --reply-tokens and max_tokens)")
    ap.add_argument("--cortex-args", default="",
                    help="extra arguments for `cortex serve` (one string, split with shlex; "
                         "write --cortex-args='--flag' when it starts with a dash and has no space)")
    ap.add_argument("--neuron-args", default="",
                    help="extra arguments for `neuron serve` (one string, split with shlex)")
    ap.add_argument("--api-key", help="send `authorization: Bearer KEY` (both paths; the neuron ignores it)")
    ap.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                    help="extra request header (repeatable)")
    ap.add_argument("--label", default="", help="free text printed with the results (e.g. budget-on)")
    ap.add_argument("--profile-cortex", metavar="OUT",
                    help="run cortex under pyinstrument, text report to OUT (adds profiler overhead)")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep the daemons' stderr logs in DIR")
    args = ap.parse_args(argv)

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        ap.error(f"unknown mode(s): {', '.join(unknown) or '(none)'}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error("--concurrency must be comma-separated integers")
    if not args.concurrency or any(c < 1 for c in args.concurrency):
        ap.error("concurrency levels must be >= 1")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.requests is None:
        args.requests = 500 if args.quick else 4000
    if args.max_seconds is None:
        args.max_seconds = 1.0 if args.quick else 3.0
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            ap.error(f"--header must look like 'Name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    if args.api_key:
        headers.append(("authorization", f"Bearer {args.api_key}"))
    args.headers = tuple(headers)
    args.warmup_requests = 300 if args.quick else 1000
    args.warmup_seconds = 0.5 if args.quick else 1.0
    return args


def _cortex_serve_has(flag: str, env: dict[str, str]) -> bool:
    try:
        out = subprocess.run([sys.executable, "-m", "cortex", "serve", "--help"], capture_output=True, text=True,
                             env=env, cwd=str(REPO_ROOT), timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    py = sys.executable
    tmpdir = tempfile.mkdtemp(prefix="bench_proxy_")  # logs (unless --keep-logs) and cortex's data dir
    logdir = args.keep_logs or tmpdir
    os.makedirs(logdir, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}

    neuron_cmd = [py, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", "--reply-tokens", str(args.tokens),
                  *shlex.split(args.neuron_args)]
    daemons: list[lg.Daemon] = []
    try:
        neuron = lg.Daemon("neuron", neuron_cmd, os.path.join(logdir, "neuron.log"), env=env, cwd=str(REPO_ROOT))
        daemons.append(neuron)
        neuron.wait_listening()
        extra = shlex.split(args.cortex_args)
        if "--data-dir" not in " ".join(extra) and _cortex_serve_has("--data-dir", env):
            # Keep cortex's ledger out of the working tree (and off a running dev instance's lock).
            extra += ["--data-dir", os.path.join(tmpdir, "cortex-data")]
        cortex_cmd = ["-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--neuron", neuron.url, *extra]
        if args.profile_cortex:
            cortex_cmd = ["-m", "pyinstrument", "-o", args.profile_cortex, *cortex_cmd]
        cortex = lg.Daemon("cortex", [py, *cortex_cmd], os.path.join(logdir, "cortex.log"), env=env,
                           cwd=str(REPO_ROOT))
        daemons.append(cortex)
        cortex.wait_listening()
        lg.progress(f"neuron {neuron.url} (pid {neuron.proc.pid}), cortex {cortex.url} (pid {cortex.proc.pid})")
        cells = trio.run(bench, args, neuron, cortex)
    finally:
        for d in reversed(daemons):
            d.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)

    print()
    print(f"Label: {args.label or '-'}; cortex args: {args.cortex_args or '-'}"
          f"{'; api key: yes' if args.api_key else ''}; git {lg.git_rev(str(REPO_ROOT))}")
    print(f"Environment: {lg.versions()}")
    print(
        f"Mock neuron, zero latency, {args.tokens} tokens/reply; {args.requests} requests or "
        f"{args.max_seconds:g} s per point, {args.repeats} repeat(s), medians"
        f"{'; cortex under pyinstrument' if args.profile_cortex else ''}"
    )
    print()
    print(format_table(cells))
    print()
    print("via/direct, added p50 and via p99/p50 are medians of per-repeat paired values.")
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"WARNING: {errors} failed requests in total (see progress on stderr).")
    if any(c.truncated for c in cells):
        print(f"Some points were capped by time ({args.max_seconds:g} s) before {args.requests} requests.")
    print()
    print(format_cpu_notes(cells))
    print()
    checks, _ = format_checks(cells)
    print(checks)
    if args.profile_cortex:
        print(f"\npyinstrument report: {args.profile_cortex}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
