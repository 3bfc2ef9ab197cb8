#!/usr/bin/env python3
"""Soak cortex: a bounded run of mixed and abusive traffic against real daemons, then its invariants.

What it does
------------
1. In a temporary directory, starts ``--neurons`` mock neurons and one cortex
   in front of them, each a real subprocess on an ephemeral loopback port,
   and waits for their one-line JSON ``listening`` announcement:

       python -m neuron serve --listen 127.0.0.1:0 --token-interval-ms 2 --reply-tokens 64
                              --max-output-tokens 512 --seed N
       python -m cortex serve --listen 127.0.0.1:0 --data-dir TMP/data --neuron URL ...
                              --admin-token <32 chars> --config TMP/cortex.toml

   The config sets only ``server.body_timeout_s = 5`` (BODY_TIMEOUT_S) so a
   stalled request body can be held past its deadline within a short run.
   Every daemon is stopped at the end, whatever happened.
2. Through ``POST /admin/v1/accounts`` and ``POST /admin/v1/keys`` creates the
   keys in KEYS: two roomy ones, and tight ones (a small balance topped up
   every 5 s, a 3000-token / 3 s window, max_concurrency 1, all three caps at
   once, and two keys sharing an account with all three caps) so that every
   kind of 429 happens.
3. Warm-up (``--warmup-s``): the mixed workers below only (no disconnects,
   churn or stalls), which also fills cortex's upstream keep-alive pool; then
   every client connection is closed and, after BASELINE_SETTLE_S, the *start*
   values of cortex's fds and RSS are read. (Connections a server fails to
   release in the warm-up count in the start value; the soak's do not.)
4. Soak (``--duration-s``), all from this Trio process, every loop bounded in
   count and time:

   * ``--concurrency`` workers on one httpx.AsyncClient: chat completions
     streamed and not, with and without ``max_tokens`` (with ``include_usage``
     or not), legacy completions, bursts of 4 streams on the max_concurrency=1
     key, and a few bad inputs (invalid JSON, unknown model, a missing field,
     an unknown key);
   * ``--disconnecters`` raw h11 clients that leave mid-stream after a random
     number of SSE events, before the response head, or in the middle of a
     non-streamed request, closing with FIN or with RST (SO_LINGER 0);
   * ``--churners`` tasks opening about ``--churn-rate`` short-lived keep-alive
     connections a second in all, each carrying 1-3 requests (/health,
     /v1/models, a 1-token chat), then closed: gracefully, by RST, with a
     request unanswered, or after idling;
   * ``--stallers`` tasks sending a ``Content-Length: 1000000`` chat body,
     part of it, then stalling: *short* stalls close before the body timeout;
     *long* stalls (and *trickles*, a few bytes every 0.25 s) wait for cortex
     to answer 408 or close, at most BODY_TIMEOUT_S + STALL_GRACE_S;
   * a sampler reading cortex's /proc/PID/fd (sockets classified through
     /proc/PID/net/{tcp,tcp6,unix}: client connections to cortex's port,
     upstream connections to the neurons, "reset" sockets whose connection the
     kernel has already dropped, the rest) and VmRSS every 0.25 s.
5. Afterwards: closes every client connection, waits (at most DRAIN_TIMEOUT_S)
   until no key or account holds tokens or has requests in flight, then waits
   (at most FD_SETTLE_S, far below the 75 s keep-alive timer) for the fds to
   settle, reads the *end* values, checks, stops the daemons and checks the
   ledger on disk.

Checks (exit status 1 if any fails, each printed with PASS/FAIL)
----------------------------------------------------------------
* balance: every key's and account's ``spent_tokens`` <= its balance (after
  top-ups), from the admin API and from the ledger's holds;
* window: for every windowed key and account, the tokens charged in every
  trailing window (replayed from the ledger's holds at each settlement), and
  the admin API's ``window_used_tokens``, <= ``window_tokens``;
* no leftovers: ``held_tokens == 0`` and ``in_flight == 0`` on every key and
  account, no open hold in the ledger (live and after shutdown), cortex's
  ``cortex_holds_outstanding`` and ``cortex_held_tokens`` gauges 0, and every
  neuron's ``in_flight`` 0;
* ``cortex_settle_overruns_total == 0``;
* ledger consistency: per key, the sum of charged holds == ``keys.spent_tokens``
  on disk == the admin API's ``spent_tokens``;
* client sockets released: at the end, at most INBOUND_END_MAX (2) sockets
  on cortex's port besides the listener, in any state (CLOSE_WAIT: the client
  closed, cortex did not), plus socket fds whose connection the kernel already
  dropped (reset by the client) -- the soak holds no connection open then;
* fds back to baseline: fds other than upstream sockets at the end <= start
  + FD_MARGIN (8); the upstream keep-alive pool is checked on its own: at the
  end it holds at most as many connections as traffic tasks could use at once;
* RSS: end - start < RSS_GROWTH_MAX_MIB (64 MiB);
* stalled bodies: every long stall or trickle was answered (408) or closed by
  cortex within BODY_TIMEOUT_S + STALL_GRACE_S of its head;
* well-formed requests got 200 or 429 (no 5xx, transport error, timeout or
  truncated stream); bad inputs got their documented status and code;
* every refusal reason (balance, window, concurrency) happened at least once;
* cortex's log has no error-level event and no traceback (hypercorn's
  "Error in ASGI Framework" included);
* cortex exits 0 within SHUTDOWN_TIMEOUT_S of SIGTERM.

Usage
-----
    scripts/soak                              # about 60 s of traffic, ~90 s in all
    scripts/soak --duration-s 10 --seed 3     # a short run
    scripts/soak --keep-logs /tmp/soak-logs   # keep the daemons' stderr logs

The choices of every task follow from ``--seed``; timing does not, so two runs
differ in counts but not in kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "cortex-mock"
ADMIN_TOKEN = "soak-admin-0123456789abcdefghijk"  # 32 characters
assert len(ADMIN_TOKEN) == 32

# --- thresholds and bounds ---------------------------------------------------------
FD_MARGIN = 8  # non-upstream fds at the end may exceed the start by this much
INBOUND_END_MAX = 2  # client sockets cortex may still hold at the end (none are open on our side)
FD_SETTLE_S = 10.0  # the longest we wait for fds to settle: far below the 75 s keep-alive timer
BASELINE_SETTLE_S = 2.0  # pause after warm-up before the start values are read
RSS_GROWTH_MAX_MIB = 64.0
DRAIN_TIMEOUT_S = 20.0  # the longest we wait for holds and in-flight counts to reach 0
BODY_TIMEOUT_S = 5.0  # cortex's server.body_timeout_s in this run
STALL_GRACE_S = 3.0  # a body stalled past BODY_TIMEOUT_S must be answered within this much more
STALL_BODY_BYTES = 1_000_000  # the Content-Length a stalled body announces
REQUEST_TIMEOUT_S = 30.0  # any single well-behaved request
SHUTDOWN_TIMEOUT_S = 15.0  # SIGTERM to exit, with nothing in flight
SAMPLE_INTERVAL_S = 0.25
TOPUP_EVERY_S = 5.0
TOPUP_TOKENS = 1500
WINDOW_EDGE_S = 0.001  # windows are replayed 1 ms narrower, so boundary rounding is never a violation

NEURON_ARGS = ("--token-interval-ms", "2", "--reply-tokens", "64", "--max-output-tokens", "512")


@dataclass(frozen=True)
class KeySpec:
    name: str
    limits: dict[str, Any]
    weight: int  # share of the mixed workers' requests
    account: str | None = None


ACCOUNTS: dict[str, dict[str, Any]] = {
    "soak-shared": {"balance_tokens": 40_000, "window_tokens": 6_000, "window_seconds": 4, "max_concurrency": 3},
}
KEYS = (
    KeySpec("bulk-a", {"balance_tokens": 10**12}, 30),
    KeySpec("bulk-b", {}, 15),
    KeySpec("tight-balance", {"balance_tokens": 2_500}, 8),
    KeySpec("tight-window", {"window_tokens": 3_000, "window_seconds": 3}, 8),
    KeySpec("tight-concurrency", {"balance_tokens": 10**9, "max_concurrency": 1}, 8),
    KeySpec("mixed", {"balance_tokens": 150_000, "window_tokens": 12_000, "window_seconds": 5, "max_concurrency": 3}, 10),
    KeySpec("shared-1", {}, 8, "soak-shared"),
    KeySpec("shared-2", {"max_concurrency": 2}, 8, "soak-shared"),
)
TOPUP_KEY = "tight-balance"
BURST_KEY = "tight-concurrency"
BURST_SIZE = 4
DISCONNECT_KEYS = ("bulk-a", "mixed", "tight-concurrency", "shared-1", "shared-2")
REFUSAL_REASONS = ("balance", "window", "concurrency")

PROMPTS = (
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarise: " + "lorem ipsum " * 20}],
    [{"role": "user", "content": "héllo wörld ✓ " * 8}],
    [{"role": "user", "content": "x" * 400}],
)

# Mixed-worker request kinds and their weights.
MIXED_KINDS = {
    "chat": 25, "chat-nomax": 8, "stream": 25, "stream-nomax": 8, "completion": 6, "burst": 4,
    "bad-json": 2, "unknown-model": 2, "bad-field": 2, "bad-key": 2,
}
BAD_EXPECT = {"bad-json": (400, "invalid_json"), "unknown-model": (404, "model_not_found"),
              "bad-field": (400, None), "bad-key": (401, "invalid_api_key")}


# --------------------------------------------------------------------------
# Measuring cortex: fds (classified) and RSS from /proc
# --------------------------------------------------------------------------

TCP_LISTEN, TCP_CLOSE_WAIT = "0A", "08"


@dataclass
class Sample:
    total: int = 0  # every open fd
    inbound: int = 0  # TCP sockets on cortex's port other than the listener: client connections
    close_wait: int = 0  # of those, the ones the client already closed (CLOSE_WAIT)
    upstream: int = 0  # TCP sockets to a neuron port
    gone: int = 0  # socket fds whose connection the kernel already tore down (reset): no TCP or unix entry left
    other: int = 0  # everything else: listener, files, pipes, unix sockets, epoll, ...
    rss_kib: int = 0

    @property
    def released(self) -> int:
        """Sockets of connections that should be gone once no client is connected."""
        return self.inbound + self.gone

    @property
    def non_upstream(self) -> int:
        return self.total - self.upstream

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def _unix_inodes(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            return {int(line.split()[6]) for line in f.read().splitlines()[1:] if len(line.split()) >= 7}
    except OSError:
        return set()


def _tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) from /proc/PID/net/tcp and tcp6."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
            table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return table


def sample_proc(pid: int, port: int, neuron_ports: set[int]) -> Sample:
    s = Sample()
    sockets: list[int] = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return s
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        s.total += 1
        if target.startswith("socket:["):
            sockets.append(int(target[8:-1]))
    tcp = _tcp_table(pid)
    unix = _unix_inodes(pid) if any(inode not in tcp for inode in sockets) else set()
    for inode in sockets:
        entry = tcp.get(inode)
        if entry is None:
            s.gone += inode not in unix
            continue
        if entry[2] == TCP_LISTEN:
            continue
        local, remote, state = entry
        if local == port:
            s.inbound += 1
            s.close_wait += state == TCP_CLOSE_WAIT
        elif remote in neuron_ports:
            s.upstream += 1
    s.other = s.total - s.inbound - s.upstream - s.gone
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    s.rss_kib = int(line.split()[1])
    except OSError:
        pass
    return s


def peak_of(samples: list[Sample]) -> Sample:
    peak = Sample()
    for s in samples:
        for f in fields(Sample):
            setattr(peak, f.name, max(getattr(peak, f.name), getattr(s, f.name)))
    return peak


# --------------------------------------------------------------------------
# The run's shared state
# --------------------------------------------------------------------------


@dataclass
class Key:
    spec: KeySpec
    id: str
    secret: str


@dataclass
class Ctx:
    args: argparse.Namespace
    url: str
    host: str
    port: int
    cortex_pid: int
    neuron_ports: set[int]
    keys: dict[str, Key] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    unexpected: Counter = field(default_factory=Counter)  # (kind, description) -> count
    refusals: Counter = field(default_factory=Counter)  # reason -> count (client-observed 429s)
    bad_inputs: Counter = field(default_factory=Counter)  # (kind, ok?) -> count
    stalls: list[dict[str, Any]] = field(default_factory=list)  # one per long stall / trickle
    samples: list[Sample] = field(default_factory=list)
    churn_connections: int = 0
    topups: int = 0
    requests: int = 0

    def note(self, kind: str, outcome: str, unexpected: str | None = None) -> None:
        self.outcomes[(kind, outcome)] += 1
        self.requests += 1
        if unexpected is not None:
            self.unexpected[(kind, unexpected)] += 1

    def sample(self) -> Sample:
        s = sample_proc(self.cortex_pid, self.port, self.neuron_ports)
        self.samples.append(s)
        return s

    def auth(self, key_name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[key_name].secret}"}


def error_code(body: bytes) -> tuple[str | None, str | None]:
    """(code, type) of an OpenAI error envelope, or (None, None)."""
    try:
        err = json.loads(body)["error"]
        return err.get("code"), err.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def refusal_reason(code: str | None, type_: str | None) -> str:
    if code == "insufficient_quota":
        return "balance"
    if code == "rate_limit_exceeded":
        return "window" if type_ == "tokens" else "concurrency"
    return f"other:{code}"


def classify(ctx: Ctx, kind: str, status: int, body: bytes) -> None:
    """Record a finished response of a request of `kind`."""
    if kind in BAD_EXPECT:
        code, _ = error_code(body)
        want_status, want_code = BAD_EXPECT[kind]
        ok = status == want_status and (want_code is None or code == want_code)
        ctx.bad_inputs[(kind, ok)] += 1
        ctx.note(kind, f"{status} {code}", None if ok else f"status {status} code {code}, want {want_status} {want_code}")
        return
    if status == 429:
        code, type_ = error_code(body)
        reason = refusal_reason(code, type_)
        ctx.refusals[reason] += 1
        ctx.note(kind, f"429 {reason}", None if reason in REFUSAL_REASONS else f"429 with code {code}")
        return
    if status == 200:
        ctx.note(kind, "200")
        return
    code, _ = error_code(body)
    ctx.note(kind, f"{status} {code}", f"status {status} code {code}: {body[:160]!r}")


def sse_events(text: bytes) -> list[bytes]:
    return [e[6:] for e in text.split(b"\n\n") if e.startswith(b"data: ")]


def check_stream(events: list[bytes], max_tokens: int | None) -> str | None:
    """None if an SSE body is complete and consistent, else what is wrong."""
    if not events or events[-1] != b"[DONE]":
        return "stream did not end with [DONE]"
    for raw in events[:-1]:
        try:
            obj = json.loads(raw)
        except ValueError:
            return f"unparseable event {raw[:80]!r}"
        if "error" in obj:
            return f"error event {raw[:160]!r}"
        usage = obj.get("usage")
        if usage and max_tokens is not None and usage.get("completion_tokens", 0) > max_tokens:
            return f"usage {usage} above max_tokens {max_tokens}"
    return None


def check_body(body: bytes, max_tokens: int | None) -> str | None:
    try:
        usage = json.loads(body)["usage"]
    except (ValueError, KeyError, TypeError):
        return f"no usage in body {body[:120]!r}"
    if max_tokens is not None and usage.get("completion_tokens", 0) > max_tokens:
        return f"usage {usage} above max_tokens {max_tokens}"
    return None


def generation_body(rng: random.Random, kind: str) -> tuple[str, dict[str, Any], int | None]:
    """(path, body, max_tokens) for a valid generation request of `kind`."""
    stream = kind.startswith("stream") or kind == "burst" or (kind == "completion" and rng.random() < 0.5)
    max_tokens = None if kind.endswith("nomax") else rng.randint(1, 80)
    if kind == "completion":
        path = "/v1/completions"
        body: dict[str, Any] = {"model": MODEL, "prompt": rng.choice(("Once upon a time", "def f(x):", "ü" * 30))}
    else:
        path = "/v1/chat/completions"
        body = {"model": MODEL, "messages": rng.choice(PROMPTS)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return path, body, max_tokens


def pick_key(rng: random.Random) -> str:
    return rng.choices([k.name for k in KEYS], weights=[k.weight for k in KEYS])[0]


# --------------------------------------------------------------------------
# Well-behaved traffic (httpx on trio)
# --------------------------------------------------------------------------


async def one_generation(ctx: Ctx, client: httpx.AsyncClient, rng: random.Random, kind: str, key: str) -> None:
    path, body, max_tokens = generation_body(rng, kind)
    content = json.dumps(body).encode()
    headers = {**ctx.auth(key), "content-type": "application/json"}
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S + 5):
            if not body.get("stream"):
                r = await client.post(path, content=content, headers=headers)
                if r.status_code == 200:
                    problem = check_body(r.content, max_tokens)
                    if problem:
                        ctx.note(kind, "200 bad body", problem)
                        return
                classify(ctx, kind, r.status_code, r.content)
                return
            async with client.stream("POST", path, content=content, headers=headers) as r:
                raw = await r.aread()
                if r.status_code == 200:
                    problem = check_stream(sse_events(raw), max_tokens)
                    if problem:
                        ctx.note(kind, "200 broken stream", problem)
                        return
                classify(ctx, kind, r.status_code, raw)
    except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
        ctx.note(kind, f"error {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:200])


async def bad_input(ctx: Ctx, client: httpx.AsyncClient, rng: random.Random, kind: str) -> None:
    headers = {**ctx.auth("bulk-b"), "content-type": "application/json"}
    if kind == "bad-json":
        content = rng.choice((b'{"model": "cortex-mock", "messages": [', b"not json", b'{"a": 1,}'))
    elif kind == "unknown-model":
        content = json.dumps({"model": "no-such-model", "messages": PROMPTS[0], "max_tokens": 5}).encode()
    elif kind == "bad-field":
        content = json.dumps({"model": MODEL, "max_tokens": 5}).encode()
    else:  # bad-key
        content = json.dumps({"model": MODEL, "messages": PROMPTS[0], "max_tokens": 5}).encode()
        headers["authorization"] = "Bearer sk-cx-" + "0" * 40
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            r = await client.post("/v1/chat/completions", content=content, headers=headers)
        classify(ctx, kind, r.status_code, r.content)
    except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
        ctx.note(kind, f"error {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:200])


async def mixed_worker(ctx: Ctx, client: httpx.AsyncClient, idx: int, deadline: float, max_requests: int,
                       seed_tag: str) -> None:
    rng = random.Random(f"{ctx.args.seed}-{seed_tag}-{idx}")
    kinds, weights = list(MIXED_KINDS), list(MIXED_KINDS.values())
    for _ in range(max_requests):
        if trio.current_time() >= deadline:
            return
        kind = rng.choices(kinds, weights=weights)[0]
        if kind in BAD_EXPECT:
            await bad_input(ctx, client, rng, kind)
        elif kind == "burst":
            async with trio.open_nursery() as nursery:
                for _ in range(BURST_SIZE):
                    nursery.start_soon(one_generation, ctx, client, random.Random(rng.random()), "burst", BURST_KEY)
        else:
            await one_generation(ctx, client, rng, kind, pick_key(rng))


# --------------------------------------------------------------------------
# Abusive traffic (raw trio sockets + h11)
# --------------------------------------------------------------------------


class RawConn:
    """One client TCP connection to cortex, driven by h11; `close(rst=True)` resets it."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.stream: trio.SocketStream | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def open(self) -> "RawConn":
        self.stream = await trio.open_tcp_stream(self.ctx.host, self.ctx.port)
        return self

    async def send_request(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        assert self.stream is not None
        hdrs = [("host", f"{self.ctx.host}:{self.ctx.port}"), *((headers or {}).items())]
        if method == "POST":
            hdrs += [("content-type", "application/json"), ("content-length", str(len(body)))]
        data = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def next_event(self) -> Any:
        assert self.stream is not None
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.receive_some(65536))

    async def read_response(self) -> tuple[int, bytes]:
        status, parts = 0, []
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise lg.BadResponse("closed mid-response")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def close(self, rst: bool = False) -> None:
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        if rst:
            try:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        with trio.CancelScope(shield=True):
            await stream.aclose()


RAW_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, lg.BadResponse)


async def disconnecter(ctx: Ctx, idx: int, deadline: float, max_requests: int) -> None:
    """Clients that leave: mid-stream, before the head, or during a non-streamed request."""
    rng = random.Random(f"{ctx.args.seed}-disconnect-{idx}")
    for _ in range(max_requests):
        if trio.current_time() >= deadline:
            return
        mode = rng.choices(("mid-stream", "before-head", "mid-nonstream"), weights=(6, 2, 2))[0]
        kind = f"leave-{mode}"
        key = rng.choice(DISCONNECT_KEYS)
        stream = mode == "mid-stream"
        body = {"model": MODEL, "messages": rng.choice(PROMPTS), "max_tokens": rng.randint(20, 200)}
        if stream:
            body["stream"] = True
        rst = rng.random() < 0.4
        conn = RawConn(ctx)
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await conn.open()
                await conn.send_request("POST", "/v1/chat/completions", json.dumps(body).encode(), ctx.auth(key))
                if mode == "before-head":
                    await trio.sleep(rng.uniform(0, 0.03))
                    ctx.note(kind, "left")
                elif mode == "mid-nonstream":
                    with trio.move_on_after(rng.uniform(0.005, 0.15)):
                        status, raw = await conn.read_response()
                        classify(ctx, kind, status, raw)  # answered before we left
                        continue
                    ctx.note(kind, "left")
                else:
                    leave_after = rng.randint(0, 40)
                    event = await conn.next_event()
                    if not isinstance(event, h11.Response):
                        raise lg.BadResponse(f"unexpected {event!r}")
                    if event.status_code != 200:
                        status, parts = event.status_code, []
                        while not isinstance(event, h11.EndOfMessage):
                            event = await conn.next_event()
                            if isinstance(event, h11.Data):
                                parts.append(bytes(event.data))
                        classify(ctx, kind, status, b"".join(parts))
                        continue
                    seen = 0
                    while seen < leave_after:
                        event = await conn.next_event()
                        if isinstance(event, h11.Data):
                            seen += bytes(event.data).count(b"\n\n")
                        elif isinstance(event, h11.EndOfMessage):
                            break
                    ctx.note(kind, "left" if seen >= leave_after else "finished first")
        except RAW_ERRORS as exc:
            ctx.note(kind, f"error {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:200])
        except trio.TooSlowError:
            ctx.note(kind, "timeout", "no answer within the request timeout")
        finally:
            await conn.close(rst)


async def churner(ctx: Ctx, idx: int, deadline: float, rate_per_task: float) -> None:
    """Short-lived keep-alive connections: 1-3 requests each, then closed one of four ways."""
    rng = random.Random(f"{ctx.args.seed}-churn-{idx}")
    interval = 1.0 / rate_per_task
    next_at = trio.current_time()
    max_connections = int(ctx.args.duration_s * rate_per_task) + 1
    for _ in range(max_connections):
        now = trio.current_time()
        if now >= deadline:
            return
        if next_at > now:
            await trio.sleep(min(next_at - now, deadline - now))
        next_at += interval
        close_how = rng.choices(("fin", "rst", "unanswered", "idle"), weights=(4, 2, 2, 2))[0]
        conn = RawConn(ctx)
        kind = "churn"
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await conn.open()
                ctx.churn_connections += 1
                for i in range(rng.randint(1, 3)):
                    what = rng.choices(("health", "models", "chat"), weights=(4, 3, 3))[0]
                    kind = f"churn-{what}"
                    if what == "chat":
                        body = json.dumps({"model": MODEL, "messages": PROMPTS[0], "max_tokens": 1}).encode()
                        await conn.send_request("POST", "/v1/chat/completions", body, ctx.auth("bulk-a"))
                    else:
                        await conn.send_request("GET", "/health" if what == "health" else "/v1/models")
                    if close_how == "unanswered" and i == 0:
                        ctx.note(kind, "left unanswered")
                        break
                    status, raw = await conn.read_response()
                    if what == "chat":
                        classify(ctx, kind, status, raw)
                    else:
                        ctx.note(kind, str(status), None if status == 200 else f"status {status}")
                    if not conn.reusable():
                        break
                if close_how == "idle":
                    await trio.sleep(rng.uniform(0.05, 1.0))
        except RAW_ERRORS as exc:
            ctx.note(kind, f"error {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:200])
        except trio.TooSlowError:
            ctx.note(kind, "timeout", "no answer within the request timeout")
        finally:
            await conn.close(close_how == "rst")


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


async def staller(ctx: Ctx, idx: int, deadline: float, max_stalls: int) -> None:
    """Request bodies that announce 1 MB, send part of it, then stall (or trickle)."""
    rng = random.Random(f"{ctx.args.seed}-stall-{idx}")
    long_needs = BODY_TIMEOUT_S + STALL_GRACE_S + 0.5
    for n in range(max_stalls):
        left = deadline - trio.current_time()
        if left <= 0.2:
            return
        mode = ("long", "trickle", "short")[idx % 3] if n == 0 else rng.choices(("short", "long", "trickle"), (2, 1, 1))[0]
        if mode != "short" and left < long_needs:
            mode = "short"
        kind = f"stall-{mode}"
        key = rng.choice(("bulk-a", "bulk-b"))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {ctx.host}:{ctx.port}\r\n"
            f"authorization: Bearer {ctx.keys[key].secret}\r\ncontent-type: application/json\r\n"
            f"content-length: {STALL_BODY_BYTES}\r\n\r\n"
        ).encode()
        prefix = b'{"model": "cortex-mock", "messages": [{"role": "user", "content": "'
        part = int(STALL_BODY_BYTES * rng.uniform(0.1, 0.9)) if mode != "trickle" else rng.randint(1000, 10_000)
        body = prefix + b"a" * (part - len(prefix))
        answer: dict[str, Any] = {}
        stream: trio.SocketStream | None = None
        rst = rng.random() < 0.3
        try:
            stream = await trio.open_tcp_stream(ctx.host, ctx.port)
            started = trio.current_time()

            async def listen() -> None:
                try:
                    data = await stream.receive_some(65536)
                except RAW_ERRORS:
                    data = b""
                answer["after_s"] = trio.current_time() - started
                m = STATUS_LINE.match(data)
                answer["status"] = int(m.group(1)) if m else None
                answer["closed"] = not data

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                if mode == "short":  # closed by us before the body timeout, and by the end of the soak
                    limit = min(rng.uniform(0.5, BODY_TIMEOUT_S - 1.5), max(0.0, deadline - trio.current_time()))
                else:  # cortex must answer or close first
                    limit = BODY_TIMEOUT_S + STALL_GRACE_S
                with trio.move_on_after(limit):
                    try:
                        await stream.send_all(head + body)
                        sent = len(body)
                        while mode == "trickle" and sent < STALL_BODY_BYTES - 200 and "after_s" not in answer:
                            await trio.sleep(0.25)
                            await stream.send_all(b"a" * 200)
                            sent += 200
                    except RAW_ERRORS:
                        pass  # cortex closed on us: `listen` sees it
                    while "after_s" not in answer:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        except RAW_ERRORS as exc:
            ctx.note(kind, f"error {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:200])
            continue
        finally:
            if stream is not None:
                if rst:
                    try:
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        if mode == "short":
            if "after_s" in answer:
                ctx.note(kind, f"answered {answer['status'] or 'close'} early")
            else:
                ctx.note(kind, "closed by us")
            continue
        ok = "after_s" in answer and (answer["status"] == 408 or answer["closed"])
        ctx.stalls.append({"mode": mode, **answer, "ok": ok})
        if "after_s" not in answer:
            ctx.note(kind, f"no answer in {BODY_TIMEOUT_S + STALL_GRACE_S:g} s",
                     f"not answered within body_timeout_s {BODY_TIMEOUT_S:g} + {STALL_GRACE_S:g} s")
        else:
            got = f"{answer['status']}" if answer["status"] else "closed"
            ctx.note(kind, f"{got} in time", None if ok else f"answered {got}")


async def topper(ctx: Ctx, admin: httpx.AsyncClient, deadline: float) -> None:
    key_id = ctx.keys[TOPUP_KEY].id
    for _ in range(int(ctx.args.duration_s / TOPUP_EVERY_S) + 1):
        await trio.sleep(min(TOPUP_EVERY_S, max(0.0, deadline - trio.current_time())))
        if trio.current_time() >= deadline:
            return
        r = await admin.post(f"/admin/v1/keys/{key_id}/topup", json={"tokens": TOPUP_TOKENS})
        if r.status_code != 200:
            ctx.unexpected[("admin-topup", f"status {r.status_code}")] += 1
        else:
            ctx.topups += 1


async def sampler(ctx: Ctx) -> None:
    while True:
        ctx.sample()
        await trio.sleep(SAMPLE_INTERVAL_S)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def admin_client(ctx: Ctx) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=ctx.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (plus each bare name summed over its labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[series] = v
        name = series.split("{", 1)[0]
        if "{" in series:
            out[name + "{*}"] = out.get(name + "{*}", 0.0) + v
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, metrics.get(name + "{*}", 0.0))


async def create_keys(ctx: Ctx) -> None:
    async with admin_client(ctx) as admin:
        for account, limits in ACCOUNTS.items():
            r = await admin.post("/admin/v1/accounts", json={"id": account, **limits})
            if r.status_code != 201:
                raise RuntimeError(f"creating account {account}: {r.status_code} {r.text}")
        for spec in KEYS:
            body = {"name": spec.name, **spec.limits, **({"account": spec.account} if spec.account else {})}
            r = await admin.post("/admin/v1/keys", json=body)
            if r.status_code != 201:
                raise RuntimeError(f"creating key {spec.name}: {r.status_code} {r.text}")
            ctx.keys[spec.name] = Key(spec, r.json()["id"], r.json()["key"])


async def wait_drained(ctx: Ctx) -> tuple[bool, float]:
    """Poll until no key or account holds tokens or has requests in flight."""
    t0 = trio.current_time()
    async with admin_client(ctx) as admin:
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            while True:
                keys = (await admin.get("/admin/v1/keys")).json()["data"]
                accounts = (await admin.get("/admin/v1/accounts")).json()["data"]
                views = [k["usage"] for k in keys] + accounts
                if all(v["held_tokens"] == 0 and v["in_flight"] == 0 for v in views):
                    return True, trio.current_time() - t0
                await trio.sleep(0.2)
    return False, trio.current_time() - t0


async def wait_fds_settled(ctx: Ctx, start: Sample) -> tuple[Sample, float]:
    """Poll cortex's fds until they are back near the start, for at most FD_SETTLE_S."""
    t0 = trio.current_time()
    while True:
        s = ctx.sample()
        settled = s.released <= INBOUND_END_MAX and s.non_upstream <= start.non_upstream + FD_MARGIN
        if settled or trio.current_time() - t0 >= FD_SETTLE_S:
            return s, trio.current_time() - t0
        await trio.sleep(SAMPLE_INTERVAL_S)


def pool_client(ctx: Ctx, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=ctx.url,
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_connections=concurrency * (BURST_SIZE + 1), max_keepalive_connections=concurrency),
    )


async def soak(ctx: Ctx, neurons: list[lg.Daemon]) -> dict[str, Any]:
    args = ctx.args
    res: dict[str, Any] = {}
    await create_keys(ctx)
    res["idle"] = ctx.sample()
    async with trio.open_nursery() as bg:
        bg.start_soon(sampler, ctx)

        lg.progress(f"warm-up: {args.warmup_s:g} s of well-behaved traffic at concurrency {args.concurrency}")
        async with pool_client(ctx, args.concurrency) as client:
            deadline = trio.current_time() + args.warmup_s
            async with trio.open_nursery() as nursery:
                for i in range(args.concurrency):
                    nursery.start_soon(mixed_worker, ctx, client, i, deadline, 100_000, "warmup")
        await trio.sleep(BASELINE_SETTLE_S)
        res["start"] = ctx.sample()
        res["warmup_requests"] = ctx.requests
        n0 = len(ctx.samples)

        lg.progress(f"soak: {args.duration_s:g} s: {args.concurrency} mixed workers, {args.disconnecters} disconnecters, "
                    f"{args.churners} churners (~{args.churn_rate:g} connections/s), {args.stallers} stallers")
        t0 = trio.current_time()
        deadline = t0 + args.duration_s
        max_requests = int(args.duration_s * 2000) + 10
        async with admin_client(ctx) as admin, pool_client(ctx, args.concurrency) as client:
            async with trio.open_nursery() as nursery:
                for i in range(args.concurrency):
                    nursery.start_soon(mixed_worker, ctx, client, i, deadline, max_requests, "soak")
                for i in range(args.disconnecters):
                    nursery.start_soon(disconnecter, ctx, i, deadline, max_requests)
                for i in range(args.churners):
                    nursery.start_soon(churner, ctx, i, deadline, args.churn_rate / args.churners)
                for i in range(args.stallers):
                    nursery.start_soon(staller, ctx, i, deadline, int(args.duration_s) + 1)
                nursery.start_soon(topper, ctx, admin, deadline)
        res["traffic_s"] = trio.current_time() - t0
        res["soak_requests"] = ctx.requests - res["warmup_requests"]
        lg.progress(f"traffic done after {res['traffic_s']:.1f} s ({ctx.requests} requests in all); draining")

        res["drained"], res["drain_s"] = await wait_drained(ctx)
        res["end"], res["settle_s"] = await wait_fds_settled(ctx, res["start"])
        res["peak"] = peak_of(ctx.samples[n0:])
        bg.cancel_scope.cancel()

    async with admin_client(ctx) as admin:
        res["keys"] = (await admin.get("/admin/v1/keys")).json()["data"]
        res["accounts"] = (await admin.get("/admin/v1/accounts")).json()["data"]
        res["metrics"] = parse_metrics((await admin.get("/metrics")).text)
    res["neurons"] = []
    for n in neurons:
        async with httpx.AsyncClient(timeout=10) as c:
            res["neurons"].append((await c.get(n.url + "/health")).json())
    return res


# --------------------------------------------------------------------------
# The ledger on disk
# --------------------------------------------------------------------------


def ledger_open_holds(db: Path) -> int:
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return conn.execute("SELECT count(*) FROM holds WHERE state = 'open'").fetchone()[0]
    finally:
        conn.close()


def max_window_use(charges: list[tuple[float, int]], window_s: float) -> int:
    """The most tokens charged within any trailing window ending at a settlement (1 ms narrower)."""
    charges = sorted(charges)
    best = total = 0
    i = 0
    for t, tokens in charges:
        total += tokens
        while charges[i][0] <= t - window_s + WINDOW_EDGE_S:
            total -= charges[i][1]
            i += 1
        best = max(best, total)
    return best


def ledger_facts(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        facts: dict[str, Any] = {"open": conn.execute("SELECT count(*) FROM holds WHERE state = 'open'").fetchone()[0]}
        facts["states"] = dict(conn.execute("SELECT state, count(*) FROM holds GROUP BY state").fetchall())
        facts["spent"] = {("key", i): s for i, s in conn.execute("SELECT id, spent_tokens FROM keys")}
        facts["spent"].update({("account", i): s for i, s in conn.execute("SELECT id, spent_tokens FROM accounts")})
        facts["charged"] = {}
        facts["charges"] = {}
        for column, kind in (("key_id", "key"), ("account_id", "account")):
            for pid, total in conn.execute(f"SELECT {column}, sum(charged_tokens) FROM holds GROUP BY {column}"):
                facts["charged"][(kind, pid)] = total or 0
            for pid, at, tokens in conn.execute(
                f"SELECT {column}, resolved_at, charged_tokens FROM holds WHERE charged_tokens > 0"
            ):
                facts["charges"].setdefault((kind, pid), []).append((at, tokens))
        return facts
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Checks and the report
# --------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed: list[str] = []

    def add(self, ok: bool, name: str, detail: str) -> None:
        self.lines.append(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failed.append(name)


def principal_views(res: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(kind, id, label, usage view) for every key and account."""
    out = [("key", k["id"], k["name"], k["usage"]) for k in res["keys"]]
    out += [("account", a["id"], f"account {a['id']}", a) for a in res["accounts"]]
    return out


def run_checks(ctx: Ctx, res: dict[str, Any], live_open: int, disk: dict[str, Any] | None,
               cortex_exit: tuple[int | None, float], log_problems: list[str]) -> Checks:
    c = Checks()
    views = principal_views(res)
    res["window_max"] = {}

    over = []
    for kind, pid, label, v in views:
        balance = v["limits"].get("balance_tokens")
        charged = disk["charged"].get((kind, pid), 0) if disk else v["spent_tokens"]
        if balance is not None and (v["spent_tokens"] > balance or charged > balance):
            over.append(f"{label} spent {v['spent_tokens']} (ledger {charged}) > balance {balance}")
    capped = sum(v["limits"].get("balance_tokens") is not None for *_, v in views)
    c.add(not over, "spent <= balance", "; ".join(over) or f"{capped} capped keys/accounts within balance")

    over = []
    for kind, pid, label, v in views:
        n, s = v["limits"].get("window_tokens"), v["limits"].get("window_seconds")
        if n is None:
            continue
        used_now = v.get("window_used_tokens", 0)
        replayed = max_window_use(disk["charges"].get((kind, pid), []), s) if disk else used_now
        res["window_max"][(kind, pid)] = replayed
        if used_now > n or replayed > n:
            over.append(f"{label} window use {replayed} (now {used_now}) > {n} per {s:g} s")
    c.add(not over, "window use <= window cap",
          "; ".join(over) or "every trailing window replayed from the ledger within its cap"
          + ("" if disk else " (ledger unreadable: admin view only)"))

    left = [f"{label} held {v['held_tokens']} in_flight {v['in_flight']}"
            for _, _, label, v in views if v["held_tokens"] or v["in_flight"]]
    c.add(not left and res["drained"], "held 0 and in flight 0 after drain",
          "; ".join(left) or f"every key and account at 0 after {res['drain_s']:.1f} s")

    m = res["metrics"]
    outstanding, held = metric(m, "cortex_holds_outstanding"), metric(m, "cortex_held_tokens")
    ok = live_open == 0 and outstanding == 0 and held == 0 and (disk is None or disk["open"] == 0)
    c.add(ok, "no open holds",
          f"ledger (live) {live_open}, after shutdown {disk['open'] if disk else '?'}; "
          f"cortex_holds_outstanding {outstanding:g}, cortex_held_tokens {held:g}")

    overruns = metric(m, "cortex_settle_overruns_total")
    c.add(overruns == 0, "no settle overruns",
          f"cortex_settle_overruns_total {overruns:g}, overrun tokens {metric(m, 'cortex_settle_overrun_tokens_total'):g}")

    if disk is None:
        c.add(False, "ledger consistency", "the ledger could not be read after shutdown")
    else:
        bad = []
        for k in res["keys"]:
            charged, stored, api = disk["charged"].get(("key", k["id"]), 0), disk["spent"].get(("key", k["id"])), k["usage"]["spent_tokens"]
            if not charged == stored == api:
                bad.append(f"{k['name']}: holds {charged}, keys.spent_tokens {stored}, admin {api}")
        c.add(not bad, "ledger consistency", "; ".join(bad) or "per key: sum of charges == stored spent == admin spent")

    busy = [f"{n.get('in_flight')} in flight on neuron {i}" for i, n in enumerate(res["neurons"]) if n.get("in_flight")]
    c.add(not busy, "neurons idle", "; ".join(busy) or "every neuron's in_flight is 0")

    start, end, peak = res["start"], res["end"], res["peak"]
    c.add(end.released <= INBOUND_END_MAX, "client sockets released",
          f"{end.inbound} client sockets on cortex's port ({end.close_wait} of them in CLOSE_WAIT) and {end.gone} reset "
          f"sockets still open at the end (peak {peak.inbound} + {peak.gone}), limit {INBOUND_END_MAX} in all, "
          f"after waiting {res['settle_s']:.1f} s (at most {FD_SETTLE_S:g} s)")
    c.add(end.non_upstream <= start.non_upstream + FD_MARGIN, "fds back to baseline",
          f"non-upstream fds {start.non_upstream} at start, {end.non_upstream} at end (limit start + {FD_MARGIN}); "
          f"all fds {start.total} -> {end.total}, peak {peak.total}")
    pool_max = ctx.args.concurrency * BURST_SIZE + ctx.args.disconnecters + ctx.args.churners + 2
    c.add(end.upstream <= pool_max, "upstream pool bounded",
          f"{end.upstream} upstream sockets at the end (start {start.upstream}, peak {peak.upstream}), "
          f"limit {pool_max} (requests that can be in flight at once)")
    growth = end.rss_mib - start.rss_mib
    c.add(growth < RSS_GROWTH_MAX_MIB, "RSS growth bounded",
          f"{start.rss_mib:.1f} -> {end.rss_mib:.1f} MiB ({growth:+.1f}; limit < {RSS_GROWTH_MAX_MIB:g}), peak {peak.rss_mib:.1f}")

    bad = [s for s in ctx.stalls if not s["ok"]]
    slowest = max((s["after_s"] for s in ctx.stalls if "after_s" in s), default=float("nan"))
    detail = (f"{len(ctx.stalls) - len(bad)}/{len(ctx.stalls)} long stalls and trickles answered (408 or close) within "
              f"body_timeout_s {BODY_TIMEOUT_S:g} + {STALL_GRACE_S:g} s (slowest {slowest:.1f} s)")
    if bad:
        detail += "; e.g. " + ", ".join(
            f"{s['mode']}: " + (f"status {s['status']} after {s['after_s']:.1f} s" if "after_s" in s else "no answer")
            for s in bad[:3])
    c.add(bool(ctx.stalls) and not bad, "stalled bodies timed out", detail)

    bad_valid = {k: n for k, n in ctx.unexpected.items() if k[0] not in BAD_EXPECT}
    total_bad = sum(bad_valid.values())
    c.add(total_bad == 0, "well-formed requests answered", (
        f"{total_bad} unexpected outcomes: " + "; ".join(f"{k}: {d} (x{n})" for (k, d), n in list(bad_valid.items())[:5])
    ) if total_bad else "every request got 200 or 429 (or was left by its client on purpose)")
    bad_in = {k: n for k, n in ctx.unexpected.items() if k[0] in BAD_EXPECT}
    sent = sum(ctx.bad_inputs.values())
    c.add(not bad_in and sent > 0, "bad inputs refused as documented",
          "; ".join(f"{k}: {d} (x{n})" for (k, d), n in bad_in.items()) or f"{sent} bad inputs, each 400/401/404 with its code")

    missing = [r for r in REFUSAL_REASONS if not ctx.refusals.get(r)]
    c.add(not missing, "every refusal reason exercised",
          f"missing {', '.join(missing)}" if missing else ", ".join(f"{r} {ctx.refusals[r]}" for r in REFUSAL_REASONS))

    c.add(not log_problems, "cortex log clean",
          f"{len(log_problems)} error lines, e.g. {log_problems[0][:200]}" if log_problems else "no error-level events or tracebacks")

    code, took = cortex_exit
    c.add(code == 0 and took <= SHUTDOWN_TIMEOUT_S, "cortex shuts down on SIGTERM",
          f"exit {code} after {took:.1f} s (limit {SHUTDOWN_TIMEOUT_S:g} s)")
    return c


def log_problems(path: Path) -> tuple[list[str], Counter]:
    """Error-level lines and tracebacks in cortex's stderr; and request outcomes by count."""
    problems: list[str] = []
    outcomes: Counter = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return [f"cannot read {path}: {exc}"], outcomes
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("level") in ("error", "critical"):
                problems.append(line)
            if obj.get("event") == "request" and obj.get("outcome"):
                outcomes[obj["outcome"]] += 1
        elif line.startswith("Traceback") or " ERROR " in line or line.startswith("ERROR"):
            problems.append(line)
    return problems, outcomes


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


def caps_text(limits: dict[str, Any]) -> str:
    parts = []
    if limits.get("balance_tokens") is not None:
        parts.append(f"bal {limits['balance_tokens']:,}" if limits["balance_tokens"] < 10**11 else "bal huge")
    if limits.get("window_tokens") is not None:
        parts.append(f"win {limits['window_tokens']:,}/{limits['window_seconds']:g}s")
    if limits.get("max_concurrency") is not None:
        parts.append(f"conc {limits['max_concurrency']}")
    return ", ".join(parts) or "none"


def report(ctx: Ctx, res: dict[str, Any], checks: Checks, cortex_outcomes: Counter) -> str:
    args = ctx.args
    out = [
        f"cortex soak: {args.duration_s:g} s of traffic (+{args.warmup_s:g} s warm-up), seed {args.seed}, "
        f"concurrency {args.concurrency}, {args.neurons} neuron(s); git {lg.git_rev(str(REPO_ROOT))}",
        f"Environment: {lg.versions()}",
        f"{ctx.requests} requests ({res['warmup_requests']} in warm-up, {res['soak_requests']} in the soak, "
        f"{res['traffic_s']:.1f} s), {ctx.churn_connections} churned connections, {ctx.topups} top-ups",
        "",
        "Requests by outcome (client side, warm-up included)",
        table(["kind", "outcome", "count"], [[k, o, n] for (k, o), n in sorted(ctx.outcomes.items())]),
        "",
        "cortex's request log by outcome: " + (", ".join(f"{o} {n}" for o, n in cortex_outcomes.most_common()) or "-"),
        "",
        "Refusals by reason",
    ]
    m = res["metrics"]
    reasons = sorted(set(REFUSAL_REASONS) | set(ctx.refusals))
    rows = []
    for r in reasons:
        series = 'cortex_budget_refusals_total{reason="%s"}' % r
        rows.append([r, ctx.refusals.get(r, 0), f"{m.get(series, 0):g}"])
    out.append(table(["reason", "429s seen by clients", "cortex_budget_refusals_total"], rows))
    out += ["", "Tokens charged"]
    rows = []
    for kind, pid, label, v in principal_views(res):
        win = res["window_max"].get((kind, pid))
        rows.append([label, caps_text(v["limits"]), f"{v['spent_tokens']:,}",
                     f"{win:,}/{v['limits']['window_tokens']:,}" if win is not None else "-",
                     v["held_tokens"], v["in_flight"]])
    out.append(table(["key", "caps", "spent", "max window use", "held", "in flight"], rows))
    tokens_in = sum(v for k, v in m.items() if k.startswith('cortex_tokens_total{direction="in"'))
    tokens_out = sum(v for k, v in m.items() if k.startswith('cortex_tokens_total{direction="out"'))
    prefix = 'cortex_holds_resolved_total{state="'
    resolved = ", ".join(f"{k[len(prefix):-2]} {v:g}" for k, v in m.items() if k.startswith(prefix))
    out.append(f"Total charged to keys: {sum(k['usage']['spent_tokens'] for k in res['keys']):,} tokens; "
               f"cortex_tokens_total in {tokens_in:,.0f}, out {tokens_out:,.0f}; holds resolved: {resolved or '-'}")
    idle, start, peak, end = res["idle"], res["start"], res["peak"], res["end"]
    out += ["", f"cortex resources (pid {ctx.cortex_pid}; start = after warm-up, peak = during the soak, "
                f"end = after drain + {res['settle_s']:.1f} s settle)"]
    rsrc = [["fds, all", idle.total, start.total, peak.total, end.total],
            ["- client sockets", idle.inbound, start.inbound, peak.inbound, end.inbound],
            ["  - in CLOSE_WAIT", idle.close_wait, start.close_wait, peak.close_wait, end.close_wait],
            ["- reset sockets", idle.gone, start.gone, peak.gone, end.gone],
            ["- upstream sockets", idle.upstream, start.upstream, peak.upstream, end.upstream],
            ["- other", idle.other, start.other, peak.other, end.other],
            ["RSS MiB", f"{idle.rss_mib:.1f}", f"{start.rss_mib:.1f}", f"{peak.rss_mib:.1f}", f"{end.rss_mib:.1f}"]]
    out.append(table(["", "idle", "start", "peak", "end"], rsrc))
    out += ["", "Checks", *checks.lines, ""]
    if checks.failed:
        out.append(f"FAILED: {len(checks.failed)} of {len(checks.lines)} checks: {', '.join(checks.failed)}")
    else:
        out.append(f"All {len(checks.lines)} checks passed.")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="A bounded soak of cortex against real neurons; exits 1 on a failed check.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=60.0, help="traffic time after warm-up (default %(default)g)")
    ap.add_argument("--warmup-s", type=float, default=None, help="warm-up time (default min(3, duration/5), at least 1)")
    ap.add_argument("--seed", type=int, default=0, help="seeds every task's choices and the neurons (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=16, help="well-behaved workers (default %(default)s)")
    ap.add_argument("--disconnecters", type=int, default=2, help="clients that leave mid-request (default %(default)s)")
    ap.add_argument("--churners", type=int, default=3, help="connection-churn tasks (default %(default)s)")
    ap.add_argument("--churn-rate", type=float, default=30.0, help="churned connections per second, all tasks (default %(default)g)")
    ap.add_argument("--stallers", type=int, default=3, help="stalled-body tasks (default %(default)s)")
    ap.add_argument("--neurons", type=int, default=2, choices=(1, 2), help="neuron processes (default %(default)s)")
    ap.add_argument("--keep-logs", metavar="DIR", help="write the daemons' stderr logs to DIR and keep them")
    args = ap.parse_args(argv)
    if not 1 <= args.duration_s <= 3600:
        ap.error("--duration-s must be from 1 to 3600")
    if args.warmup_s is None:
        args.warmup_s = max(1.0, min(3.0, args.duration_s / 5))
    if not 0 < args.warmup_s <= 600:
        ap.error("--warmup-s must be in (0, 600]")
    for name in ("concurrency", "churners", "stallers"):
        if not 1 <= getattr(args, name) <= 256:
            ap.error(f"--{name} must be from 1 to 256")
    if not 0 <= args.disconnecters <= 256:
        ap.error("--disconnecters must be from 0 to 256")
    if not 0 < args.churn_rate <= 1000:
        ap.error("--churn-rate must be in (0, 1000]")
    return args


def stop_daemon(d: lg.Daemon, timeout_s: float) -> tuple[int | None, float]:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL: (exit status, seconds to exit)."""
    t0 = time.monotonic()
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(timeout=10)
    took = time.monotonic() - t0
    d.stop()  # closes its pipes and log
    return d.proc.returncode, took


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmpdir = Path(tempfile.mkdtemp(prefix="cortex_soak_"))
    logdir = Path(args.keep_logs) if args.keep_logs else tmpdir
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, tmpdir, logdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def run(args: argparse.Namespace, tmpdir: Path, logdir: Path) -> int:
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    data_dir = tmpdir / "data"
    config_path = tmpdir / "cortex.toml"
    config_path.write_text(f"[server]\nbody_timeout_s = {BODY_TIMEOUT_S}\n")
    cortex_log = logdir / "cortex.log"

    neurons: list[lg.Daemon] = []
    cortex: lg.Daemon | None = None
    ctx: Ctx | None = None
    res: dict[str, Any] | None = None
    error: Exception | None = None
    live_open = -1
    cortex_exit: tuple[int | None, float] = (None, 0.0)
    try:
        for i in range(args.neurons):
            n = lg.Daemon(f"neuron-{i}", [py, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", *NEURON_ARGS,
                                          "--seed", str(args.seed + i)],
                          str(logdir / f"neuron-{i}.log"), env=env, cwd=str(REPO_ROOT))
            neurons.append(n)
            n.wait_listening()
        cmd = [py, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
               "--admin-token", ADMIN_TOKEN, "--config", str(config_path)]
        for n in neurons:
            cmd += ["--neuron", n.url]
        cortex = lg.Daemon("cortex", cmd, str(cortex_log), env=env, cwd=str(REPO_ROOT))
        cortex.wait_listening()
        host, port = cortex.host_port
        lg.progress(f"neurons {', '.join(n.url for n in neurons)}; cortex {cortex.url} (pid {cortex.proc.pid}); "
                    f"logs in {logdir}")
        ctx = Ctx(args, cortex.url, host, port, cortex.proc.pid, {n.host_port[1] for n in neurons})
        res = trio.run(soak, ctx, neurons)
        live_open = ledger_open_holds(data_dir / "ledger.db")
    except Exception as exc:  # noqa: BLE001 - reported below, after teardown
        error = exc
    finally:
        if cortex is not None:
            cortex_exit = stop_daemon(cortex, SHUTDOWN_TIMEOUT_S)
        for n in reversed(neurons):
            n.stop()

    if error is not None or res is None or ctx is None:
        print(f"soak: the run failed: {type(error).__name__}: {error}", file=sys.stderr)
        if cortex is not None:
            print(cortex._stderr_hint(), file=sys.stderr)
        return 1
    try:
        disk: dict[str, Any] | None = ledger_facts(data_dir / "ledger.db")
    except sqlite3.Error as exc:
        lg.progress(f"cannot read the ledger after shutdown: {exc}")
        disk = None
    problems, cortex_outcomes = log_problems(cortex_log)
    checks = run_checks(ctx, res, live_open, disk, cortex_exit, problems)
    print(report(ctx, res, checks, cortex_outcomes))
    if checks.failed and not args.keep_logs:
        print("(rerun with --keep-logs DIR to keep the daemons' logs)")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
