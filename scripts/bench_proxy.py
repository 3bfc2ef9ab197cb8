#!/usr/bin/env python3
"""Benchmark what cortex costs in front of a neuron: direct, budgets off, budgets on, Anthropic.

What it does
------------
1. Starts three daemons as subprocesses, each on an ephemeral port, and waits
   for their one-line JSON ``listening`` announcement on stdout:

       python -m neuron serve --listen 127.0.0.1:0 --reply-tokens 100
       python -m cortex serve ... --neuron NEURON_URL --data-dir TMP/off --no-auth     # "off"
       python -m cortex serve ... --neuron NEURON_URL --data-dir TMP/on                # "on"

   Before "on" starts, a key is created in its data dir with
   ``python -m cortex keys create --name bench --balance 1000000000000 --json
   --data-dir TMP/on``; every request (on all three paths, so the bytes sent
   are identical) carries ``authorization: Bearer KEY``.  "off" has auth off,
   so its requests run unbudgeted; "on" authenticates, reserves a durable hold
   (SQLite, group commit) and settles it, on every request.  A fourth path,
   "msgs", is the budgets-off cortex again, at ``POST /v1/messages`` (the
   Anthropic Messages API: the same proxy block, with the request translated
   to OpenAI chat and the reply or stream translated back); it sends the
   equivalent Anthropic body (same prompt, same ``max_tokens``), the same key
   header and ``anthropic-version: 2023-06-01``.  "msgs" against "off" is the
   cost of the translation.  A fifth path, "pg", is cortex with budgets on a
   shared PostgreSQL ledger, one replica:

       python -m cortex db migrate --ledger URL
       python -m cortex keys create --ledger URL --name bench --balance ... --json
       python -m cortex serve ... --neuron NEURON_URL --data-dir TMP/pg --ledger URL   # "pg"

   on a PostgreSQL the script starts itself (tests/postgres.py's PgServer;
   fsync, synchronous_commit and full_page_writes on, as
   scripts/bench_pg_ledger.py), the password in a PGPASSFILE, never the URL.
   It sends its own key (the same length).  "pg" against "on" is what the
   shared ledger costs a request against SQLite's; the server's CPU per
   request is reported beside cortex's.  By default "pg" runs where a
   PostgreSQL server and psycopg are installed, and is skipped otherwise.

   The mock neuron has zero latency (no TTFT, no inter-token delay), so every
   millisecond measured is HTTP/JSON/event-loop/ledger work.  The daemons'
   stderr (cortex's per-request log) goes to a temporary directory that is
   deleted afterwards, together with both data dirs.
2. Drives ``POST /v1/chat/completions`` (``max_tokens`` 100; ``/v1/messages``
   on "msgs") with the lean trio + h11 load generator in
   ``scripts/_loadgen.py``: ``concurrency`` tasks, one persistent keep-alive
   connection each, sequential requests, latency = full response time (for
   ``stream: true``: until the end of the chunked SSE body, after
   ``data: [DONE]``, or on "msgs" after ``event: message_stop``), for every
   mode and concurrency level.  The first response of every point is checked
   in full (token count; on "msgs" the ``message`` shape, or the event
   sequence from ``message_start`` to ``message_stop``).
3. Warms every path up, then runs every point for a fixed request count or a
   time cap (whichever comes first), ``--repeats`` times.  The paths are
   measured back to back within each repeat, the order rotating per repeat
   (direct, off, msgs, on / off, msgs, on, direct / msgs, on, direct, off / ...),
   so machine drift hits them equally.  The table reports medians over the repeats; ratios, added
   p50s and p99/p50 are medians of per-repeat paired values.
4. Prints one Markdown table, CPU notes (load generator CPU %, daemon CPU ms
   per request, read from /proc) and a check section with PASS/MISS for the
   targets:

   * cortex (budgets off) adds <= 2 ms at p50 at concurrency 1 (non-stream);
   * throughput through cortex (budgets off) at c=64 >= 50% of direct;
   * p99 through cortex at c=64 < 4x its p50 (budgets off and on);
   * budgets add <= 0.5 ms at p50 at concurrency 1 (non-stream; on vs off);
   * the Anthropic translation costs <= 10% of throughput against the OpenAI
     path at concurrency 1 and 64 (msgs vs off, streamed and not);
   * one replica on PostgreSQL keeps >= 70% of the SQLite ledger's
     throughput (pg vs on), at every measured point.

The load generator runs in this process; the daemons are separate processes.
On a small machine they all share the CPUs: through cortex there is one more
busy process, which is part of what the throughput ratio shows (see the CPU
notes to tell CPU cost from added waiting).  The idle cortex instance costs
next to nothing while the other one is measured.

Usage
-----
    python scripts/bench_proxy.py                      # full run (~6 min; 8 on a loaded machine)
    python scripts/bench_proxy.py --quick              # fewer requests, 1 repeat
    python scripts/bench_proxy.py --modes non-stream --concurrency 1,64
    python scripts/bench_proxy.py --paths direct,off   # skip the budget-on cortex
    python scripts/bench_proxy.py --paths off,msgs --concurrency 1,64   # the translation only
    python scripts/bench_proxy.py --paths on,pg --concurrency 1,64      # PostgreSQL against SQLite only
    python scripts/bench_proxy.py --paths on,pg --pg-synchronous-commit off   # what the server's fsync costs
    python scripts/bench_proxy.py --cortex-args "--config my.toml" --label my-config
    python scripts/bench_proxy.py --api-key KEY --cortex-args "--data-dir DIR"  # "on" uses DIR and KEY
    python scripts/bench_proxy.py --profile-cortex /tmp/cortex-prof.txt  # pyinstrument, "on" instance
    python scripts/bench_proxy.py --paths msgs --profile-cortex /tmp/msgs-prof.txt  # the "off" one, msgs only

``--cortex-args`` go to both cortex instances, except ``--data-dir``, which
only the "on" instance gets (the "off" one always uses a temporary dir); with
``--api-key`` no key is created and that key is sent instead.  "msgs" needs no
instance of its own: the "off" one is started for it even without "off".

For a profile without in-process overhead, attach a sampling profiler to a
cortex pid printed at start-up while one of its points runs, e.g.
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

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("non-stream", "stream")
# client -> neuron; -> cortex --no-auth -> neuron; the same cortex at /v1/messages; -> cortex with budgets -> neuron;
# -> cortex with budgets on a PostgreSQL ledger (`serve --ledger URL`, one replica) -> neuron
PATHS = ("direct", "off", "msgs", "on", "pg")
CORTEX_OF = {"off": "off", "msgs": "off", "on": "on", "pg": "pg"}  # path -> the cortex instance that serves it
PG_DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}  # as scripts/bench_pg_ledger.py
DEFAULT_CONCURRENCY = (1, 16, 64)
PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_STREAM_END = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
KEY_BALANCE = 1_000_000_000_000

# Targets
ADDED_P50_MAX_MS = 2.0  # off - direct, non-stream, c=1
THROUGHPUT_RATIO_MIN = 0.50  # off/direct at c=64
TAIL_RATIO_MAX = 4.0  # cortex p99/p50 at c=64
BUDGET_P50_MAX_MS = 0.5  # on - off, non-stream, c=1
TRANSLATION_RATIO_MIN = 0.90  # msgs/off throughput, both modes
TRANSLATION_CONCURRENCY = (1, 64)
TARGET_C_HIGH = 64
PG_RATIO_MIN = 0.70  # pg/on throughput: one replica on PostgreSQL against the SQLite ledger


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


def anthropic_body(tokens: int, stream: bool) -> bytes:
    """The Messages request equivalent to `request_body`: same model, prompt and max_tokens."""
    body: dict = {
        "model": "cortex-mock",
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "bench"}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def make_anthropic_validator(stream: bool, tokens: int):
    """The mock's tokens are one ASCII byte each, so the text is exactly `tokens` long."""

    def check_plain(body: bytes) -> None:
        obj = json.loads(body)
        if obj.get("type") != "message":
            raise lg.BadResponse(f"expected a message, got type {obj.get('type')!r}: {body[:200]!r}")
        text = "".join(b.get("text", "") for b in obj.get("content", ()) if b.get("type") == "text")
        if len(text) != tokens or obj["usage"]["output_tokens"] != tokens:
            raise lg.BadResponse(f"expected {tokens} tokens of text, got {len(text)} "
                                 f"(usage.output_tokens {obj['usage']['output_tokens']})")

    def check_stream(body: bytes) -> None:
        if not body.endswith(ANTHROPIC_STREAM_END):
            raise lg.BadResponse(f"stream did not end with event: message_stop: ...{body[-80:]!r}")
        kinds: list[bytes] = []
        text = deltas = 0
        for event in body.split(b"\n\n"):
            if not event:
                continue
            name, _, data = event.partition(b"\n")
            kind = name.removeprefix(b"event: ")
            kinds.append(kind)
            if kind == b"content_block_delta":
                delta = json.loads(data.removeprefix(b"data: "))["delta"]
                if delta.get("type") == "text_delta":
                    deltas += 1
                    text += len(delta["text"])
        if kinds[0] != b"message_start" or b"error" in kinds:
            raise lg.BadResponse(f"unexpected event sequence: {b', '.join(kinds[:8])!r}...")
        if deltas != tokens or text != tokens:
            raise lg.BadResponse(f"expected {tokens} text deltas of one token, got {deltas} ({text} bytes)")

    return check_stream if stream else check_plain


@dataclass(frozen=True)
class AnthropicStreamReq(lg.Req):
    """A streamed Messages request.

    `_loadgen.Conn` checks that every `stream=True` response ends with
    `data: [DONE]`, which an Anthropic stream never sends (it ends with
    `event: message_stop`).  So this request goes out with `stream=False`
    (no [DONE] check) but the same `accept: text/event-stream` header an
    OpenAI stream sends.  What is timed is unchanged: until h11's
    EndOfMessage, the end of the chunked body, after `message_stop`; the
    status is still checked on every response, and the validator checks
    the first one of every point in full (ending with `message_stop`
    included).
    """

    def h11_request(self) -> h11.Request:
        headers = [
            ("host", f"{self.host}:{self.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(self.body))),
            ("accept", "text/event-stream"),
            *self.headers,
        ]
        return h11.Request(method=self.method, target=self.target, headers=headers)


def make_req(path: str, host: str, port: int, stream: bool, tokens: int, headers: tuple) -> lg.Req:
    """The request for one path and mode: OpenAI chat, or Anthropic Messages on "msgs"."""
    if path != "msgs":
        return lg.Req(host, port, PATH, request_body(tokens, stream), stream=stream,
                      validate=make_validator(stream, tokens), headers=headers)
    cls = AnthropicStreamReq if stream else lg.Req
    return cls(host, port, MESSAGES_PATH, anthropic_body(tokens, stream), stream=False,
               validate=make_anthropic_validator(stream, tokens),
               headers=(*headers, ("anthropic-version", ANTHROPIC_VERSION)))


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


NAN = float("nan")
COMMITS_METRIC = b"cortex_ledger_commit_batch_size_count"


def ledger_commits(daemon: lg.Daemon) -> float:
    """The ledger group commits a cortex has made (its /metrics: batches that carried reserves or resolutions)."""
    import urllib.request

    with urllib.request.urlopen(daemon.url.rstrip("/") + "/metrics", timeout=10) as reply:
        for line in reply.read().splitlines():
            if line.startswith(COMMITS_METRIC):
                return float(line.rsplit(b" ", 1)[1])
    return NAN


@dataclass
class Sample:
    """One measured point of one repeat on one path."""

    result: lg.Result
    neuron_cpu_s: float
    cortex_cpu_s: float  # NaN for direct
    postgres_cpu_s: float = 0.0  # every PostgreSQL server process (the pg path's ledger); 0 elsewhere
    ledger_commits: float = NAN  # the cortex's ledger group commits in the point (its /metrics), on and pg

    @property
    def commits_per_req(self) -> float:
        n = self.result.completed
        return self.ledger_commits / n if n else NAN

    def per_req_ms(self, cpu_s: float) -> float:
        n = self.result.completed
        return 1000.0 * cpu_s / n if n else float("nan")

    @property
    def total_cpu_ms(self) -> float:
        """CPU per request of every process on the path: neuron, cortex (if any), load generator."""
        cortex = 0.0 if self.cortex_cpu_s != self.cortex_cpu_s else self.cortex_cpu_s
        return self.per_req_ms(self.neuron_cpu_s + cortex + self.postgres_cpu_s + self.result.loadgen_cpu_s)


@dataclass
class Cell:
    mode: str
    concurrency: int
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {p: [] for p in PATHS})

    # --- medians over repeats ------------------------------------------------
    def med(self, path: str, fn) -> float:
        return lg.median([fn(s) for s in self.samples[path]])

    def rps(self, path: str) -> float:
        return self.med(path, lambda s: s.result.rps)

    def p(self, path: str, q: float) -> float:
        return self.med(path, lambda s: s.result.pct_ms(q))

    def tail_ratio(self, path: str) -> float:
        return self.med(path, lambda s: s.result.pct_ms(0.99) / s.result.pct_ms(0.5))

    def _paired(self, a: str, b: str, fn) -> float:
        """Median over repeats of fn(sample on a, sample on b), same repeat."""
        return lg.median([fn(x, y) for x, y in zip(self.samples[a], self.samples[b])])

    def ratio(self, path: str, base: str = "direct") -> float:
        return self._paired(path, base, lambda x, y: x.result.rps / y.result.rps if y.result.rps else NAN)

    def added_p50(self, path: str, base: str) -> float:
        return self._paired(path, base, lambda x, y: x.result.pct_ms(0.5) - y.result.pct_ms(0.5))

    def cpu_ratio(self, path: str, base: str) -> float:
        """base/path total CPU per request: the throughput ratio where the CPUs are the bottleneck.
        Steadier than the req/s ratio on a shared machine (other load lowers both rates, not the CPU
        a request costs)."""
        return self._paired(path, base, lambda x, y: y.total_cpu_ms / x.total_cpu_ms if x.total_cpu_ms else NAN)

    @property
    def errors(self) -> int:
        return sum(s.result.errors for ss in self.samples.values() for s in ss)

    @property
    def truncated(self) -> bool:
        return any(s.result.truncated for ss in self.samples.values() for s in ss)


async def measure(req: lg.Req, c: int, args, neuron: lg.Daemon, cortex: lg.Daemon | None,
                  postgres_pid: int | None = None, budgeted: bool = False) -> Sample:
    probes = {"neuron": neuron.cpu_s}
    if cortex is not None:
        probes["cortex"] = cortex.cpu_s
    if postgres_pid is not None:
        probes["postgres"] = lambda: lg.tree_cpu_s(postgres_pid)
    if budgeted and cortex is not None:
        probes["commits"] = lambda: ledger_commits(cortex)
    res = await lg.run_point(req, c, args.requests, args.max_seconds, probes=probes)
    return Sample(res, res.extra["neuron"], res.extra.get("cortex", NAN), res.extra.get("postgres", 0.0),
                  res.extra.get("commits", NAN))


def rotation(paths: list[str], r: int) -> list[str]:
    k = r % len(paths)
    return paths[k:] + paths[:k]


async def bench(args, neuron: lg.Daemon, cortexes: dict[str, lg.Daemon], postgres_pid: int | None = None) -> list[Cell]:
    targets = {"direct": neuron, **cortexes}
    reqs: dict[tuple[str, str], lg.Req] = {}
    for mode in args.modes:
        stream = mode == "stream"
        for path in args.paths:
            host, port = targets[path].host_port
            reqs[(mode, path)] = make_req(path, host, port, stream, args.tokens, args.headers_of[path])

    # Warm-up: every path, every mode (imports, caches, cortex's upstream pool, the ledger's pages).
    for (mode, path), req in reqs.items():
        lg.progress(f"warm-up {mode} {path} ...")
        res = await lg.run_point(req, max(args.concurrency), args.warmup_requests, args.warmup_seconds)
        if res.errors:
            raise RuntimeError(f"warm-up {mode} {path}: {res.errors} errors; first: {res.first_error}")

    cells = {(m, c): Cell(m, c) for m in args.modes for c in args.concurrency}
    for r in range(args.repeats):
        order = rotation(list(args.paths), r)
        for mode in args.modes:
            for c in args.concurrency:
                cell = cells[(mode, c)]
                for path in order:
                    cortex = cortexes.get(path)
                    sample = await measure(reqs[(mode, path)], c, args, neuron, cortex,
                                           postgres_pid if path == "pg" else None, path in ("on", "pg"))
                    cell.samples[path].append(sample)
                    res = sample.result
                    extra = f", cortex {sample.per_req_ms(sample.cortex_cpu_s):.2f}" if cortex else ""
                    if path == "pg":
                        extra += f", postgres {sample.per_req_ms(sample.postgres_cpu_s):.2f}"
                    if path in ("on", "pg"):
                        extra += f"; ledger commits/req {sample.commits_per_req:.3f}"
                    lg.progress(
                        f"[{r + 1}/{args.repeats}] {mode:10s} c={c:<3d} {path:6s} "
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


def format_table(cells: list[Cell]) -> str:
    rows = [
        "| mode | concurrency | direct req/s | off req/s | on req/s | off/direct | on/direct "
        "| direct p50 ms | off p50 ms | on p50 ms | added p50 ms (off - direct) | budget overhead p50 ms (on - off) "
        "| on p99/p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        rows.append(
            f"| {cell.mode} | {cell.concurrency} "
            f"| {lg.fmt(cell.rps('direct'), ',.0f')} | {lg.fmt(cell.rps('off'), ',.0f')} "
            f"| {lg.fmt(cell.rps('on'), ',.0f')} "
            f"| {lg.fmt(cell.ratio('off'), '.2f')} | {lg.fmt(cell.ratio('on'), '.2f')} "
            f"| {lg.fmt(cell.p('direct', 0.5), '.2f')} | {lg.fmt(cell.p('off', 0.5), '.2f')} "
            f"| {lg.fmt(cell.p('on', 0.5), '.2f')} "
            f"| {lg.fmt(cell.added_p50('off', 'direct'), '+.2f')} | {lg.fmt(cell.added_p50('on', 'off'), '+.2f')} "
            f"| {lg.fmt(cell.tail_ratio('on'), '.1f')} |"
        )
    return "\n".join(rows)


def format_translation_table(cells: list[Cell]) -> str:
    rows = [
        "| mode | concurrency | off req/s | msgs req/s | msgs/off | off p50 ms | msgs p50 ms "
        "| added p50 ms (msgs - off) | msgs p99/p50 | cortex CPU ms/req off | cortex CPU ms/req msgs "
        "| CPU-bound ratio (off/msgs total CPU per req) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        if not cell.samples["msgs"]:
            continue
        cpu = {p: cell.med(p, lambda s: s.per_req_ms(s.cortex_cpu_s)) for p in ("off", "msgs")}
        rows.append(
            f"| {cell.mode} | {cell.concurrency} "
            f"| {lg.fmt(cell.rps('off'), ',.0f')} | {lg.fmt(cell.rps('msgs'), ',.0f')} "
            f"| {lg.fmt(cell.ratio('msgs', 'off'), '.2f')} "
            f"| {lg.fmt(cell.p('off', 0.5), '.2f')} | {lg.fmt(cell.p('msgs', 0.5), '.2f')} "
            f"| {lg.fmt(cell.added_p50('msgs', 'off'), '+.2f')} | {lg.fmt(cell.tail_ratio('msgs'), '.1f')} "
            f"| {lg.fmt(cpu['off'], '.2f')} | {lg.fmt(cpu['msgs'], '.2f')} "
            f"| {lg.fmt(cell.cpu_ratio('msgs', 'off'), '.2f')} |"
        )
    return "\n".join(rows)


def format_pg_table(cells: list[Cell]) -> str:
    rows = [
        "| mode | concurrency | on req/s (SQLite) | pg req/s (PostgreSQL) | pg/on | on p50 ms | pg p50 ms "
        "| added p50 ms (pg - on) | pg p99/p50 | cortex CPU ms/req on | cortex CPU ms/req pg | postgres CPU ms/req "
        "| CPU-bound ratio (on/pg total CPU per req) | ledger commits / req, on | ledger transactions / req, pg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        if not cell.samples["pg"]:
            continue
        cpu = {p: cell.med(p, lambda s: s.per_req_ms(s.cortex_cpu_s)) for p in ("on", "pg")}
        rows.append(
            f"| {cell.mode} | {cell.concurrency} "
            f"| {lg.fmt(cell.rps('on'), ',.0f')} | {lg.fmt(cell.rps('pg'), ',.0f')} "
            f"| {lg.fmt(cell.ratio('pg', 'on'), '.2f')} "
            f"| {lg.fmt(cell.p('on', 0.5), '.2f')} | {lg.fmt(cell.p('pg', 0.5), '.2f')} "
            f"| {lg.fmt(cell.added_p50('pg', 'on'), '+.2f')} | {lg.fmt(cell.tail_ratio('pg'), '.1f')} "
            f"| {lg.fmt(cpu['on'], '.2f')} | {lg.fmt(cpu['pg'], '.2f')} "
            f"| {lg.fmt(cell.med('pg', lambda s: s.per_req_ms(s.postgres_cpu_s)), '.2f')} "
            f"| {lg.fmt(cell.cpu_ratio('pg', 'on'), '.2f')} "
            f"| {lg.fmt(cell.med('on', lambda s: s.commits_per_req), '.3f')} "
            f"| {lg.fmt(cell.med('pg', lambda s: s.commits_per_req), '.3f')} |"
        )
    return "\n".join(rows)


def format_p99(cells: list[Cell]) -> str:
    lines = ["p99 ms (medians) and p99/p50:"]
    for cell in cells:
        parts = [
            f"{path} {lg.fmt(cell.p(path, 0.99), '.2f')} ({lg.fmt(cell.tail_ratio(path), '.1f')}x)"
            for path in PATHS if cell.samples[path]
        ]
        lines.append(f"- {cell.mode} c={cell.concurrency}: " + ", ".join(parts))
    return "\n".join(lines)


def format_cpu_notes(cells: list[Cell]) -> str:
    lines = ["CPU (medians; ms of CPU per request, from /proc; loadgen = this process's CPU % of wall time):"]
    for cell in cells:
        parts = []
        for path in PATHS:
            if not cell.samples[path]:
                continue
            neuron_ms = cell.med(path, lambda s: s.per_req_ms(s.neuron_cpu_s))
            text = f"{path}: neuron {lg.fmt(neuron_ms, '.2f')}"
            if path != "direct":
                cortex_ms = cell.med(path, lambda s: s.per_req_ms(s.cortex_cpu_s))
                text += f", cortex {lg.fmt(cortex_ms, '.2f')}"
            if path == "pg":
                text += f", postgres {lg.fmt(cell.med(path, lambda s: s.per_req_ms(s.postgres_cpu_s)), '.2f')}"
            text += f", loadgen {lg.fmt(cell.med(path, lambda s: s.result.loadgen_cpu_pct), '.0f')}%"
            parts.append(text)
        lines.append(f"- {cell.mode} c={cell.concurrency}: " + " | ".join(parts))
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

    def have(cell: Cell | None, *paths: str) -> bool:
        return cell is not None and all(cell.samples[p] for p in paths)

    cell = by.get(("non-stream", 1))
    if have(cell, "direct", "off"):
        added = cell.added_p50("off", "direct")
        line(added <= ADDED_P50_MAX_MS,
             f"added p50 at c=1 (non-stream, off vs direct) <= {ADDED_P50_MAX_MS:g} ms: {added:+.2f} ms "
             f"(direct {cell.p('direct', 0.5):.2f} ms, off {cell.p('off', 0.5):.2f} ms)")
    else:
        line(None, "added p50 at c=1 (non-stream): not measured (needs non-stream, c=1, paths direct and off)")

    for mode in MODES:
        cell = by.get((mode, TARGET_C_HIGH))
        if cell is None:
            if any(m == mode for m, _ in by):
                line(None, f"{mode} c={TARGET_C_HIGH} targets: not measured (needs c={TARGET_C_HIGH})")
            continue
        if have(cell, "direct", "off"):
            r = cell.ratio("off")
            line(r >= THROUGHPUT_RATIO_MIN,
                 f"{mode} c={TARGET_C_HIGH} throughput off/direct >= {THROUGHPUT_RATIO_MIN:.0%}: {r:.0%} "
                 f"({cell.rps('off'):,.0f} vs {cell.rps('direct'):,.0f} req/s; on/direct {cell.ratio('on'):.0%})")
        for path in ("off", "on"):
            if have(cell, path):
                t = cell.tail_ratio(path)
                line(t < TAIL_RATIO_MAX,
                     f"{mode} c={TARGET_C_HIGH} {path} p99 < {TAIL_RATIO_MAX:g}x p50: {t:.1f}x "
                     f"(p50 {cell.p(path, 0.5):.2f} ms, p99 {cell.p(path, 0.99):.2f} ms)")

    cell = by.get(("non-stream", 1))
    if have(cell, "off", "on"):
        over = cell.added_p50("on", "off")
        line(over <= BUDGET_P50_MAX_MS,
             f"budget overhead p50 at c=1 (non-stream, on vs off) <= {BUDGET_P50_MAX_MS:g} ms: {over:+.2f} ms "
             f"(off {cell.p('off', 0.5):.2f} ms, on {cell.p('on', 0.5):.2f} ms)")
    else:
        line(None, "budget overhead p50 at c=1 (non-stream): not measured (needs non-stream, c=1, paths off and on)")

    levels = " and ".join(f"c={c}" for c in TRANSLATION_CONCURRENCY)
    target = (f"Anthropic translation costs <= {1 - TRANSLATION_RATIO_MIN:.0%} throughput vs the OpenAI path "
              f"at {levels}")
    for mode in MODES:
        if not any(m == mode for m, _ in by):
            continue
        measured = {c: by[(mode, c)] for c in TRANSLATION_CONCURRENCY if have(by.get((mode, c)), "off", "msgs")}
        missing = [f"c={c}" for c in TRANSLATION_CONCURRENCY if c not in measured]
        if not measured:
            line(None, f"{target} ({mode}): not measured (needs {levels}, paths off and msgs)")
            continue
        ratios = {c: cell.ratio("msgs", "off") for c, cell in measured.items()}
        detail = "; ".join(
            f"c={c} msgs/off {r:.2f} ({measured[c].rps('msgs'):,.0f} vs {measured[c].rps('off'):,.0f} req/s, "
            f"added p50 {measured[c].added_p50('msgs', 'off'):+.2f} ms, CPU-bound ratio "
            f"{measured[c].cpu_ratio('msgs', 'off'):.2f})"
            for c, r in ratios.items()
        )
        ok = all(r >= TRANSLATION_RATIO_MIN for r in ratios.values())
        line(None if missing and ok else ok,
             f"{target} ({mode}): {detail}" + (f"; {', '.join(missing)} not measured" if missing else ""))
    for mode in MODES:
        points = [c for c in cells if c.mode == mode and have(c, "on", "pg")]
        for cell in points:
            r = cell.ratio("pg", "on")
            line(r >= PG_RATIO_MIN,
                 f"one PostgreSQL replica keeps >= {PG_RATIO_MIN:.0%} of the SQLite ledger's throughput through the "
                 f"proxy ({mode}, c={cell.concurrency}): pg/on {r:.2f} ({cell.rps('pg'):,.0f} vs {cell.rps('on'):,.0f} "
                 f"req/s, added p50 {cell.added_p50('pg', 'on'):+.2f} ms, CPU-bound ratio {cell.cpu_ratio('pg', 'on'):.2f})")
    return "\n".join(lines), all_ok


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark cortex's overhead: client -> neuron vs client -> cortex (budgets off / on; "
                    "Anthropic /v1/messages on the budgets-off one) -> neuron.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests per point, 1 repeat")
    ap.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                    help="comma-separated concurrency levels (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of: {', '.join(MODES)} (default: %(default)s)")
    ap.add_argument("--paths", default=None,
                    help=f"comma-separated subset of: {', '.join(PATHS)} (default: all; pg only where a PostgreSQL "
                         "server and psycopg are installed)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, default=None, help="requests per point (default 3000, --quick 500)")
    ap.add_argument("--max-seconds", type=float, default=None, help="time cap per point (default 2, --quick 1)")
    ap.add_argument("--tokens", type=int, default=100, help="reply tokens (neuron --reply-tokens and max_tokens)")
    ap.add_argument("--cortex-args", default="",
                    help="extra arguments for both `cortex serve` instances (one string, split with shlex; "
                         "a --data-dir in it goes to the budget-on instance only; "
                         "write --cortex-args='--flag' when it starts with a dash and has no space)")
    ap.add_argument("--neuron-args", default="",
                    help="extra arguments for `neuron serve` (one string, split with shlex)")
    ap.add_argument("--api-key", help="key for the budget-on path (default: one is created in its data dir); "
                                      "sent as `authorization: Bearer KEY` on every path")
    ap.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                    help="extra request header (repeatable)")
    ap.add_argument("--label", default="", help="free text printed with the results")
    ap.add_argument("--profile-cortex", metavar="OUT",
                    help="run the budget-on cortex (else the budget-off one, which serves msgs) under "
                         "pyinstrument, text report to OUT (adds profiler overhead)")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep the daemons' stderr logs in DIR")
    ap.add_argument("--pg-synchronous-commit", choices=("on", "off"), default="on",
                    help="the pg path's server: on (default) waits for the WAL on disk at every commit; off (a "
                         "diagnostic: what the fsync costs) may lose the last commits if the SERVER crashes")
    args = ap.parse_args(argv)

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        ap.error(f"unknown mode(s): {', '.join(unknown) or '(none)'}")
    if args.paths is None:
        why = pg_unavailable()
        if why:
            lg.progress(f"the pg path is skipped: {why}")
        args.paths = ",".join(p for p in PATHS if p != "pg" or not why)
    paths = {p.strip() for p in args.paths.split(",") if p.strip()}
    unknown = sorted(paths - set(PATHS))
    if unknown or not paths:
        ap.error(f"unknown path(s): {', '.join(unknown) or '(none)'}")
    args.paths = [p for p in PATHS if p in paths]
    args.concurrency = lg.parse_concurrency(ap, args.concurrency)
    lg.resolve_point_args(ap, args, requests=3000, quick_requests=500, max_seconds=2.0, quick_max_seconds=1.0)
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            ap.error(f"--header must look like 'Name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    args.extra_headers = headers
    return args


def pg_server_version(server) -> str:
    with server.admin() as conn:  # the Unix socket, trusted: this process has no password file in its environment
        return conn.execute("SHOW server_version").fetchone()[0]


def split_data_dir(extra: list[str]) -> tuple[list[str], str | None]:
    """Take `--data-dir X` / `--data-dir=X` out of cortex's extra args."""
    rest: list[str] = []
    data_dir = None
    it = iter(extra)
    for arg in it:
        if arg == "--data-dir":
            data_dir = next(it, None)
        elif arg.startswith("--data-dir="):
            data_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, data_dir


def cortex_cli(env: dict[str, str], *argv: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cortex", *argv], capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cortex {' '.join(argv[:2])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def create_key(env: dict[str, str], *where: str) -> str:
    """A key with a huge balance in a data dir (`--data-dir DIR`) or on a shared ledger (`--ledger URL`)."""
    out = cortex_cli(env, "keys", "create", "--name", "bench", "--balance", str(KEY_BALANCE), "--json", *where)
    return json.loads(out)["key"]


def pg_unavailable() -> str:
    """Why the pg path cannot run here ("" if it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests import postgres as pgfix

    bindir, why = pgfix.find_bindir(os.environ)
    return "" if bindir is not None else why


def start_postgres(env: dict[str, str], synchronous_commit: str = "on") -> tuple[object, str]:
    """A durable PostgreSQL of its own (tests/postgres.py's PgServer) and a migrated ledger on it: (server, URL).

    The password reaches cortex through PGPASSFILE (added to `env`), never the URL, as an operator's would."""
    why = pg_unavailable()
    if why:
        raise SystemExit(f"the pg path needs PostgreSQL: {why} (or leave pg out of --paths)")
    from tests import postgres as pgfix

    bindir, _ = pgfix.find_bindir(os.environ)
    pgfix.SERVER_SETTINGS = {**pgfix.SERVER_SETTINGS, **PG_DURABLE, "synchronous_commit": synchronous_commit}
    server = pgfix.PgServer.start(bindir, os.environ)
    env.update(server.env)
    env.pop("PGPASSWORD", None)
    url = server.url(server.create_database())
    cortex_cli(env, "db", "migrate", "--ledger", url)
    return server, url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    py = sys.executable
    tmpdir = tempfile.mkdtemp(prefix="bench_proxy_")  # logs (unless --keep-logs) and cortex's data dirs
    logdir = args.keep_logs or tmpdir
    os.makedirs(logdir, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}

    neuron_cmd = [py, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", "--reply-tokens", str(args.tokens),
                  *shlex.split(args.neuron_args)]
    extra, on_data_dir = split_data_dir(shlex.split(args.cortex_args))
    on_data_dir = on_data_dir or os.path.join(tmpdir, "cortex-on")
    data_dirs = {"off": os.path.join(tmpdir, "cortex-off"), "on": on_data_dir}
    data_dirs["pg"] = os.path.join(tmpdir, "cortex-pg")  # the admin socket and fleet state; the ledger is PostgreSQL
    api_key = args.api_key
    if "on" in args.paths and not api_key:
        api_key = create_key(env, "--data-dir", on_data_dir)
    bearer = lambda key: [("authorization", f"Bearer {key}")] if key else []  # noqa: E731
    args.headers = tuple(args.extra_headers + bearer(api_key))
    instances = [i for i in ("off", "on", "pg") if any(CORTEX_OF.get(p) == i for p in args.paths)]
    profiled = "on" if "on" in instances else "off"

    daemons: list[lg.Daemon] = []
    cortexes: dict[str, lg.Daemon] = {}  # measured path -> the cortex instance serving it
    pg_server = None
    pg_url = ""
    try:
        if "pg" in instances:
            pg_server, pg_url = start_postgres(env, args.pg_synchronous_commit)
            pg_key = create_key(env, "--ledger", pg_url)
            # Its own key (the same length, so the same bytes on the wire); every other path sends the "on" one.
            args.headers_of = {p: args.headers for p in args.paths}
            args.headers_of["pg"] = tuple(args.extra_headers + bearer(pg_key))
            if not api_key:
                args.headers_of = {p: args.headers_of["pg"] for p in args.paths}
        else:
            args.headers_of = {p: args.headers for p in args.paths}
        neuron = lg.Daemon("neuron", neuron_cmd, os.path.join(logdir, "neuron.log"), env=env, cwd=str(REPO_ROOT))
        daemons.append(neuron)
        neuron.wait_listening()
        started: dict[str, lg.Daemon] = {}
        for path in instances:
            cmd = ["-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--neuron", neuron.url, *extra,
                   "--data-dir", data_dirs[path], *(["--no-auth"] if path == "off" else []),
                   *(["--ledger", pg_url] if path == "pg" else [])]
            if args.profile_cortex and path == profiled:
                cmd = ["-m", "pyinstrument", "-o", args.profile_cortex, *cmd]
            d = lg.Daemon(f"cortex-{path}", [py, *cmd], os.path.join(logdir, f"cortex-{path}.log"), env=env,
                          cwd=str(REPO_ROOT))
            daemons.append(d)
            d.wait_listening()
            started[path] = d
        cortexes = {p: started[CORTEX_OF[p]] for p in args.paths if p in CORTEX_OF}
        lg.progress(f"neuron {neuron.url} (pid {neuron.proc.pid}); "
                    + "; ".join(f"cortex-{p} {d.url} (pid {d.proc.pid})" for p, d in started.items()))
        postgres_pid = pg_server.process.pid if pg_server is not None else None
        if postgres_pid is not None:
            lg.progress(f"postgres {pg_server.url()} (pid {postgres_pid}; fsync on, synchronous_commit "
                        f"{args.pg_synchronous_commit})")
        cells = trio.run(bench, args, neuron, cortexes, postgres_pid)
        pg_version = pg_server_version(pg_server) if pg_server is not None else ""
    finally:
        for d in reversed(daemons):
            d.stop()
        if pg_server is not None:
            pg_server.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)

    print()
    print(f"Label: {args.label or '-'}; cortex args: {args.cortex_args or '-'}; paths: {', '.join(args.paths)}"
          f"{'; api key: given' if args.api_key else ''}; git {lg.git_rev(str(REPO_ROOT))}")
    print(f"Environment: {lg.versions()}")
    print(
        f"Mock neuron, zero latency, {args.tokens} tokens/reply; {args.requests} requests or "
        f"{args.max_seconds:g} s per point, {args.repeats} repeat(s), paths interleaved (rotating order), medians"
        f"{f'; cortex-{profiled} under pyinstrument' if args.profile_cortex else ''}"
    )
    print("direct = client -> neuron; off = via cortex --no-auth; on = via cortex with budgets "
          "(auth + durable reserve/settle per request); msgs = the off cortex at /v1/messages "
          "(Anthropic in and out, translated to and from OpenAI chat); pg = via cortex with budgets on a "
          "PostgreSQL ledger (`serve --ledger URL`, one replica, its own key).")
    print()
    print(format_table(cells))
    if any(c.samples["pg"] for c in cells):
        print()
        print(f"Budgets on a PostgreSQL ledger (pg: `cortex serve --ledger URL`, one replica; PostgreSQL {pg_version}, "
              f"fsync on, synchronous_commit {args.pg_synchronous_commit}) against the SQLite ledger (on, synchronous = "
              "the config's, default normal), same key balance, same requests:")
        print()
        print(format_pg_table(cells))
        print()
        print("postgres CPU: every PostgreSQL server process, per request. CPU-bound ratio: on's CPU per request "
              "(neuron + cortex + load generator) over pg's (the same plus postgres). Ledger commits / req: the "
              "cortex's own group commits (cortex_ledger_commit_batch_size_count in its /metrics) per request "
              "completed in the point; on PostgreSQL each is one transaction and one round trip (heartbeats, "
              "a few, are not counted).")
    if any(c.samples["msgs"] for c in cells):
        print()
        print("Anthropic Messages (msgs) against the OpenAI path (off), same cortex instance:")
        print()
        print(format_translation_table(cells))
    print()
    print("Ratios, added p50s and p99/p50 are medians of per-repeat paired values.")
    if any(c.samples["msgs"] for c in cells):
        print("CPU-bound ratio: off's CPU per request (neuron + cortex + load generator) over msgs'; "
              "what msgs/off throughput would be if the CPUs alone set the pace.")
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"WARNING: {errors} failed requests in total (see progress on stderr).")
    if any(c.truncated for c in cells):
        print(f"Some points were capped by time ({args.max_seconds:g} s) before {args.requests} requests.")
    print()
    print(format_p99(cells))
    print()
    print(format_cpu_notes(cells))
    print()
    checks, _ = format_checks(cells)
    print(checks)
    if args.profile_cortex:
        print(f"\npyinstrument report (cortex-{profiled}): {args.profile_cortex}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
