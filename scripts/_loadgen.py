"""Lean HTTP/1.1 load generator for the cortex benchmarks (trio + h11).

Shared by ``scripts/bench_proxy.py`` and ``scripts/bench_framework.py``; not a
command of its own.  ``scripts/bench_ledger.py`` and
``scripts/bench_upstream_pool.py`` use only its helpers.

Design: ``concurrency`` Trio tasks, each owning exactly one persistent
keep-alive TCP connection driven by its own ``h11.Connection``.  There is no
pool, no shared queue and no per-request allocation beyond h11's own, so the
client's cost per request stays flat as concurrency grows (a shared
``httpx.AsyncClient`` does not: see ``scripts/bench_upstream_pool.py``).

Latency is the full response time: from just before the request bytes are
written until h11 reports ``EndOfMessage`` (for SSE streams: the end of the
chunked body, i.e. after ``data: [DONE]``).

Also here: helpers to start/stop a daemon that announces itself with one JSON
line on stdout, to read a process's (or thread's) CPU time from /proc, to
format percentiles/medians/table cells the same way in every script, and the
command-line checks the scripts share (``--concurrency``, ``--repeats``, the
``--quick`` defaults of a load-generator point).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import h11
import trio

RECV_BYTES = 65536
SSE_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One request, sent unchanged by every worker."""

    host: str
    port: int
    target: str
    body: bytes
    method: str = "POST"
    stream: bool = False  # expect an SSE body that ends with `data: [DONE]`
    # Optional full check of one response body (first one per point), raising
    # on a wrong answer: catches a benchmark that measures error responses.
    validate: Callable[[bytes], None] | None = None
    headers: tuple[tuple[str, str], ...] = ()  # extra headers, e.g. authorization

    def h11_request(self) -> h11.Request:
        headers = [
            ("host", f"{self.host}:{self.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(self.body))),
            ("accept", "text/event-stream" if self.stream else "application/json"),
            *self.headers,
        ]
        return h11.Request(method=self.method, target=self.target, headers=headers)


@dataclass
class Result:
    concurrency: int
    completed: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    truncated: bool  # stopped by the time cap before issuing all requests
    loadgen_cpu_s: float  # CPU time this (load generator) process used
    first_error: str = ""
    extra: dict = field(default_factory=dict)  # callers may hang numbers here

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        return percentile_ms(self.latencies_s, q)

    @property
    def loadgen_cpu_pct(self) -> float:
        return 100.0 * self.loadgen_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


def percentile_ms(latencies_s: list[float], q: float) -> float:
    """Nearest-rank percentile in ms."""
    if not latencies_s:
        return float("nan")
    s = sorted(latencies_s)
    idx = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[idx] * 1000.0


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def fmt(x: float, spec: str) -> str:
    """`format(x, spec)`, or "n/a" for NaN: one table cell."""
    return "n/a" if x != x else format(x, spec)


class BadResponse(Exception):
    pass


# --------------------------------------------------------------------------
# One keep-alive connection
# --------------------------------------------------------------------------


class Conn:
    """One TCP connection + h11 state machine; reconnects after a close."""

    def __init__(self, req: Req) -> None:
        self.req = req
        self.stream: trio.SocketStream | None = None
        self.h11: h11.Connection | None = None
        self.connects = 0

    async def _ensure(self) -> None:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.req.host, self.req.port)
            self.h11 = h11.Connection(h11.CLIENT)
            self.connects += 1

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream, self.h11 = self.stream, None, None
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def request(self, keep_body: bool = False) -> bytes:
        """Send the request and read the whole response; returns the body if
        `keep_body`, else its last bytes (enough to see `data: [DONE]`)."""
        await self._ensure()
        conn, stream, req = self.h11, self.stream, self.req
        assert conn is not None and stream is not None
        await stream.send_all(
            conn.send(req.h11_request()) + conn.send(h11.Data(data=req.body)) + conn.send(h11.EndOfMessage())
        )
        status = 0
        parts: list[bytes] = []
        tail = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
                continue
            t = type(event)
            if t is h11.Data:
                if keep_body:
                    parts.append(event.data)
                else:
                    tail = (tail + event.data)[-64:]
            elif t is h11.Response:
                status = event.status_code
            elif t is h11.EndOfMessage:
                break
            elif t is h11.ConnectionClosed:
                raise BadResponse("server closed the connection mid-response")
        body = b"".join(parts) if keep_body else tail
        if status != 200:
            raise BadResponse(f"status {status}: {body[-200:]!r}")
        if req.stream and not body.endswith(SSE_DONE):
            raise BadResponse(f"stream did not end with [DONE]: ...{body[-80:]!r}")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.aclose()
        else:
            conn.start_next_cycle()
        return body


# --------------------------------------------------------------------------
# One measurement point
# --------------------------------------------------------------------------


async def run_point(
    req: Req,
    concurrency: int,
    total_requests: int,
    max_seconds: float,
    warmup_per_worker: int = 2,
    probes: dict[str, Callable[[], float]] | None = None,
) -> Result:
    """`concurrency` workers, one connection each, issue sequential requests
    until `total_requests` were issued or `max_seconds` passed.

    Each worker first sends `warmup_per_worker` untimed requests (opening its
    connection).  `probes` (name -> counter, e.g. a daemon's CPU seconds) are
    read right before and after the timed phase; the deltas land in
    `Result.extra[name]`."""
    probes = probes or {}
    gc.collect()
    conns = [Conn(req) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    issued = 0
    first_error: list[str] = []
    max_errors = max(20, total_requests // 10)

    def note(exc: BaseException) -> None:
        nonlocal errors
        errors += 1
        if not first_error:
            first_error.append(f"{type(exc).__name__}: {exc}")
        if errors > max_errors:
            raise RuntimeError(f"too many errors ({errors}); first: {first_error[0]}")

    async def warm(c: Conn, i: int) -> None:
        for k in range(warmup_per_worker):
            try:
                body = await c.request(keep_body=(i == 0 and k == 0 and req.validate is not None))
                if i == 0 and k == 0 and req.validate is not None:
                    req.validate(body)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, BadResponse) as exc:
                note(exc)
                await c.aclose()

    try:
        async with trio.open_nursery() as nursery:
            for i, c in enumerate(conns):
                nursery.start_soon(warm, c, i)
        errors = 0
        first_error.clear()

        perf = time.perf_counter
        deadline = perf() + max_seconds

        async def worker(c: Conn) -> None:
            nonlocal issued
            append = latencies.append
            while issued < total_requests and perf() < deadline:
                issued += 1
                t0 = perf()
                try:
                    await c.request()
                except (OSError, trio.BrokenResourceError, h11.ProtocolError, BadResponse) as exc:
                    note(exc)
                    await c.aclose()
                    continue
                append(perf() - t0)

        before = {name: probe() for name, probe in probes.items()}
        cpu0 = time.process_time()
        start = perf()
        async with trio.open_nursery() as nursery:
            for c in conns:
                nursery.start_soon(worker, c)
        elapsed = perf() - start
        cpu = time.process_time() - cpu0
        extra = {name: probe() - before[name] for name, probe in probes.items()}
    finally:
        for c in conns:
            await c.aclose()

    return Result(
        concurrency=concurrency,
        completed=len(latencies),
        errors=errors,
        elapsed_s=elapsed,
        latencies_s=latencies,
        truncated=issued < total_requests,
        loadgen_cpu_s=cpu,
        first_error=first_error[0] if first_error else "",
        extra=extra,
    )


# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------


class Daemon:
    """A subprocess that prints {"event": "listening", "url": ...} on stdout."""

    def __init__(self, name: str, cmd: list[str], stderr_path: str | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd,
        )
        self.url = ""

    def wait_listening(self, timeout_s: float = 20.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        buf = b""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening"
                                   f"{self._stderr_hint()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name} did not announce itself in {timeout_s:g} s{self._stderr_hint()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.2))
            if not ready:
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "listening":
                    self.url = msg["url"]
                    return self.url

    def _stderr_hint(self) -> str:
        if not self.stderr_path:
            return ""
        try:
            with open(self.stderr_path, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""
        return f"\n--- {self.name} stderr (tail) ---\n{tail}"

    @property
    def host_port(self) -> tuple[str, int]:
        rest = self.url.split("://", 1)[1].rstrip("/")
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT (graceful: lets a profiler write its output), then kill."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """User+system CPU seconds of `pid` (Linux /proc; NaN elsewhere)."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of `pid` and its live children (a server's worker processes), from /proc.

    A child that exits between two readings takes its CPU with it: use it on servers whose workers live
    through the measurement (e.g. PostgreSQL's backends of long-lived connections)."""
    total = proc_cpu_s(pid)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
    return total


def thread_cpu_s(native_id: int | None) -> float:
    """User+system CPU seconds of one thread of this process (Linux /proc; NaN elsewhere)."""
    if native_id is None:
        return float("nan")
    return _stat_cpu_s(f"/proc/self/task/{native_id}/stat")


def _stat_cpu_s(stat_path: str) -> float:
    """utime + stime of a /proc/.../stat file, in seconds; NaN if unreadable."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def versions(*extra: str) -> str:
    import platform

    parts = [
        f"python {platform.python_version()}",
        f"trio {trio.__version__}",
        f"h11 {h11.__version__}",
    ]
    try:
        from importlib.metadata import version

        parts.append(f"hypercorn {version('hypercorn')}")
    except Exception:  # noqa: BLE001 - informational only
        pass
    parts.extend(extra)
    parts.append(f"cpus {os.cpu_count()}")
    return ", ".join(parts)


def git_rev(repo_root: str) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{rev}{'+dirty' if dirty else ''}" if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Command-line checks shared by the scripts
# --------------------------------------------------------------------------


def parse_concurrency(ap: argparse.ArgumentParser, value: str) -> list[int]:
    """The levels of a comma-separated --concurrency value; `ap.error` unless
    they are whole numbers >= 1 (and at least one)."""
    try:
        levels = [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        ap.error("--concurrency must be comma-separated integers")
    if not levels or any(c < 1 for c in levels):
        ap.error("concurrency levels must be >= 1")
    return levels


def resolve_repeats(ap: argparse.ArgumentParser, repeats: int | None, quick: bool) -> int:
    """--repeats: default 3, with --quick 1; `ap.error` below 1."""
    if repeats is None:
        repeats = 1 if quick else 3
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    return repeats


def resolve_point_args(ap: argparse.ArgumentParser, args: argparse.Namespace, *,
                       requests: int, quick_requests: int,
                       max_seconds: float, quick_max_seconds: float) -> None:
    """Fill in the per-point settings of a `run_point` script in place:
    `args.repeats` (see `resolve_repeats`), `args.requests` and
    `args.max_seconds` (the given defaults, or the quick ones with --quick),
    and the warm-up budget `args.warmup_requests` / `args.warmup_seconds`."""
    args.repeats = resolve_repeats(ap, args.repeats, args.quick)
    if args.requests is None:
        args.requests = quick_requests if args.quick else requests
    if args.max_seconds is None:
        args.max_seconds = quick_max_seconds if args.quick else max_seconds
    args.warmup_requests = 300 if args.quick else 1000
    args.warmup_seconds = 0.5 if args.quick else 1.0
