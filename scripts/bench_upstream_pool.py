#!/usr/bin/env python3
"""Benchmark upstream HTTP client connection pooling under Trio.

Background
----------
httpcore's ``AsyncConnectionPool`` (used by ``httpx.AsyncClient``) re-runs
``_assign_requests_to_connections()`` every time a request enters the pool and
every time a response is closed.  That method walks every connection for every
queued request, so each request/release costs O(requests x connections) and a
single shared client slows down sharply beyond roughly 32 concurrent
connections (see encode/httpcore PR #1035).

This script quantifies that effect on the installed httpx/httpcore versions.

What it does
------------
1. Starts a minimal keep-alive HTTP/1.1 server (raw Trio sockets + h11; answers
   every request with ``200`` and a small fixed JSON body) on 127.0.0.1 with an
   ephemeral port.  By default the server runs in a *subprocess* (this same
   file in ``--serve PORTFILE`` mode) so that the client event loop, which is
   what we want to measure, does not share its CPU with the server.
2. For every selected client variant and every concurrency level, opens a
   fresh client, warms it up (one request per task, which also opens the
   connections), then runs ``concurrency`` Trio tasks that each issue
   sequential GET requests until a fixed total number of requests has been
   issued (or a per-point time cap is hit).
3. Prints a Markdown table: variant, concurrency, completed requests, errors,
   TCP connections the server accepted during the point (reveals connection
   churn), req/s, p50 / p99 latency in ms, and req/s relative to the
   ``shared-default`` variant at concurrency 1 measured in the same run.

Client variants
---------------
``shared-default``    one ``httpx.AsyncClient`` with default limits
                      (max_connections=100, max_keepalive_connections=20).
``shared-unbounded``  one ``httpx.AsyncClient`` with
                      ``httpx.Limits(max_connections=None,
                      max_keepalive_connections=None)``.
``bounded-32``        one ``httpx.AsyncClient`` with max_connections=32
                      (excess requests queue inside the pool).
``h11-transport``     ``httpx.AsyncClient(transport=cortex.fleet.transport
                      .H11Transport())``; skipped with a note if that module
                      is not importable.
``per-task``          optional control (not run by default): every task gets
                      its own default ``httpx.AsyncClient``, i.e. one pool per
                      connection, so pool bookkeeping stays O(1); separates
                      the pool's cost from generic event-loop/socket cost.

Usage
-----
    python scripts/bench_upstream_pool.py                 # full run (< ~2 min)
    python scripts/bench_upstream_pool.py --quick         # fewer requests
    python scripts/bench_upstream_pool.py --variants shared-default,h11-transport
    python scripts/bench_upstream_pool.py --concurrency 1,64,256
    python scripts/bench_upstream_pool.py --variants shared-default,per-task
    python scripts/bench_upstream_pool.py --serve PORTFILE  # server only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h11
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

RESPONSE_BODY = b'{"ok":true,"model":"bench","choices":[]}'
RESPONSE_HEADERS = [
    ("content-type", "application/json"),
    ("content-length", str(len(RESPONSE_BODY))),
]

STATS_PATH = "/__stats"  # returns {"connections": <accepted so far>}
_SERVER_STATS = {"connections": 0}

DEFAULT_VARIANTS = ("shared-default", "shared-unbounded", "bounded-32", "h11-transport")
PER_TASK_VARIANT = "per-task"  # optional control, not run by default
ALL_VARIANTS = DEFAULT_VARIANTS + (PER_TASK_VARIANT,)
DEFAULT_CONCURRENCY = (1, 16, 32, 64, 128, 256)
BASELINE_VARIANT = "shared-default"


# --------------------------------------------------------------------------
# Server (raw trio sockets + h11)
# --------------------------------------------------------------------------


async def _handle_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    _SERVER_STATS["connections"] += 1
    target = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" == EOF, h11 turns it into ConnectionClosed
                continue
            if isinstance(event, h11.Request):
                target = event.target
            elif isinstance(event, h11.EndOfMessage):
                body, headers = RESPONSE_BODY, RESPONSE_HEADERS
                if target == STATS_PATH.encode():
                    body = json.dumps(_SERVER_STATS).encode()
                    headers = [
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ]
                out = conn.send(h11.Response(status_code=200, headers=headers))
                out += conn.send(h11.Data(data=body))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                break
            # h11.Data: request bodies are ignored.
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await stream.aclose()


async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve forever on 127.0.0.1:<ephemeral>; reports the port via task_status."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _handle_connection, listeners)
        task_status.started(port)


async def _serve_main(portfile: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve)
        tmp = portfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, portfile)  # atomic: the parent never reads a partial file


# --------------------------------------------------------------------------
# Client variants
# --------------------------------------------------------------------------

TIMEOUT_S = 120.0  # generous: queued requests in a slow pool must not PoolTimeout


def _make_shared_default():
    import httpx

    return httpx.AsyncClient(timeout=TIMEOUT_S)


def _make_shared_unbounded():
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S)


def _make_bounded_32():
    import httpx

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    return httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S)


def _load_h11_transport_factory() -> Callable[[], object] | str:
    """Return a client factory, or a string explaining why it is unavailable."""
    for p in (REPO_ROOT / "src", REPO_ROOT):
        if p.is_dir() and str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        from cortex.fleet import transport as transport_mod  # noqa: PLC0415

        transport_cls = transport_mod.H11Transport
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"

    def factory():
        import httpx

        return httpx.AsyncClient(transport=transport_cls(), timeout=TIMEOUT_S)

    return factory


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Point:
    variant: str
    concurrency: int
    completed: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    truncated: bool  # hit the per-point time cap before issuing all requests
    new_connections: int = -1  # TCP connections the server accepted during the point

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        return lg.percentile_ms(self.latencies_s, q)


async def measure(
    variant: str,
    factory: Callable[[], object],
    url: str,
    concurrency: int,
    total_requests: int,
    max_seconds: float,
) -> Point:
    gc.collect()
    latencies: list[float] = []
    errors = 0
    issued = 0
    first_error: list[BaseException] = []

    # "per-task" gives every task its own client (a pool with one connection):
    # a control that pays no cross-connection pool bookkeeping.
    n_clients = concurrency if variant == PER_TASK_VARIANT else 1
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(factory()) for _ in range(n_clients)]

        async def one(i: int) -> bool:
            nonlocal errors
            client = clients[i % n_clients]
            t0 = time.perf_counter()
            try:
                resp = await client.get(url)
                ok = resp.status_code == 200 and resp.content == RESPONSE_BODY
            except Exception as exc:  # noqa: BLE001 - counted and reported
                if not first_error:
                    first_error.append(exc)
                ok = False
            t1 = time.perf_counter()
            if ok:
                latencies.append(t1 - t0)
            else:
                errors += 1
            return ok

        # Warm-up: one request per task concurrently (opens the connections).
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(one, i)
        latencies.clear()
        errors = 0

        deadline = time.perf_counter() + max_seconds

        async def worker(i: int) -> None:
            nonlocal issued
            while issued < total_requests and time.perf_counter() < deadline:
                issued += 1
                await one(i)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, i)
        elapsed = time.perf_counter() - start

    if first_error:
        print(
            f"  note: {variant} c={concurrency}: first error: "
            f"{type(first_error[0]).__name__}: {first_error[0]}",
            file=sys.stderr,
        )
    return Point(
        variant=variant,
        concurrency=concurrency,
        completed=len(latencies),
        errors=errors,
        elapsed_s=elapsed,
        latencies_s=latencies,
        truncated=issued < total_requests,
    )


# --------------------------------------------------------------------------
# Server management
# --------------------------------------------------------------------------


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        try:
            os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
        except OSError:
            pass


def _start_server_subprocess(pin: bool) -> tuple[subprocess.Popen, int, str]:
    tmpdir = tempfile.mkdtemp(prefix="bench_upstream_pool_")
    portfile = os.path.join(tmpdir, "port")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", portfile]
    if pin:
        cmd.append("--pin")
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 15.0
        while not os.path.exists(portfile):
            if proc.poll() is not None:
                raise RuntimeError(f"server subprocess exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("server subprocess did not report its port in 15 s")
            time.sleep(0.02)
        with open(portfile) as f:
            port = int(f.read().strip())
    except BaseException:
        _stop_server_subprocess(proc, tmpdir)
        raise
    return proc, port, tmpdir


def _stop_server_subprocess(proc: subprocess.Popen, tmpdir: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for name in ("port", "port.tmp"):
        try:
            os.unlink(os.path.join(tmpdir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(tmpdir)
    except OSError:
        pass


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _versions() -> str:
    import httpcore
    import httpx

    return (
        f"python {platform.python_version()}, trio {trio.__version__}, "
        f"httpx {httpx.__version__}, httpcore {httpcore.__version__}, "
        f"h11 {h11.__version__}, cpus {os.cpu_count()}"
    )


def _format_table(points: list[Point], baseline_rps: float) -> str:
    header = (
        "| variant | concurrency | requests | errors | TCP conns | req/s | p50 ms | p99 ms "
        "| x baseline |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for p in points:
        ratio = p.rps / baseline_rps if baseline_rps else float("nan")
        n = f"{p.completed}{'*' if p.truncated else ''}"
        rows.append(
            f"| {p.variant} | {p.concurrency} | {n} | {p.errors} | "
            f"{p.new_connections if p.new_connections >= 0 else '?'} | {p.rps:,.0f} | "
            f"{p.pct_ms(0.50):.2f} | {p.pct_ms(0.99):.2f} | {ratio:.2f} |"
        )
    return "\n".join(rows)


async def _client_main(args: argparse.Namespace, url: str) -> int:
    factories: dict[str, Callable[[], object]] = {
        "shared-default": _make_shared_default,
        "shared-unbounded": _make_shared_unbounded,
        "bounded-32": _make_bounded_32,
        PER_TASK_VARIANT: _make_shared_default,  # one default client per task
    }
    variants = list(args.variants)
    if "h11-transport" in variants:
        loaded = _load_h11_transport_factory()
        if isinstance(loaded, str):
            print(
                f"note: skipping h11-transport (cortex.fleet.transport.H11Transport "
                f"not importable: {loaded})",
                file=sys.stderr,
            )
            variants.remove("h11-transport")
        else:
            factories["h11-transport"] = loaded

    points: list[Point] = []
    baseline: Point | None = None
    if BASELINE_VARIANT not in variants or 1 not in args.concurrency:
        print(f"measuring baseline {BASELINE_VARIANT} c=1 ...", file=sys.stderr)
        baseline = await measure(
            BASELINE_VARIANT, factories[BASELINE_VARIANT], url, 1,
            args.requests, args.max_seconds,
        )

    import httpx

    stats_url = url.split("/", 3)
    stats_url = "/".join(stats_url[:3]) + STATS_PATH
    # One long-lived side connection, so reading the stats adds no connections.
    stats_client = httpx.AsyncClient(timeout=30.0)

    async def accepted() -> int:
        try:
            return int((await stats_client.get(stats_url)).json()["connections"])
        except Exception:  # noqa: BLE001 - stats are best effort
            return -1

    for variant in variants:
        for c in args.concurrency:
            print(f"measuring {variant} c={c} ...", file=sys.stderr, flush=True)
            before = await accepted()
            p = await measure(
                variant, factories[variant], url, c, args.requests, args.max_seconds
            )
            after = await accepted()
            if before >= 0 and after >= 0:
                p.new_connections = after - before
            print(
                f"  {p.completed} ok, {p.errors} err, conns {p.new_connections}, "
                f"{p.rps:,.0f} req/s, "
                f"p50 {p.pct_ms(0.5):.2f} ms, p99 {p.pct_ms(0.99):.2f} ms",
                file=sys.stderr,
                flush=True,
            )
            points.append(p)
            if variant == BASELINE_VARIANT and c == 1:
                baseline = p

    await stats_client.aclose()
    assert baseline is not None
    print()
    print(f"Environment: {_versions()}")
    print(
        f"Server: {'in-process' if args.inproc_server else 'subprocess'}; "
        f"{args.requests} requests per point (cap {args.max_seconds:g} s, "
        f"'*' = capped); baseline = {BASELINE_VARIANT} c=1 at {baseline.rps:,.0f} req/s"
    )
    print()
    print(_format_table(points, baseline.rps))
    print()
    print(
        "TCP conns = connections the server accepted during the point "
        "(warm-up + timed phase)."
    )
    return 0 if all(p.errors == 0 for p in points) else 1


async def _client_with_inproc_server(args: argparse.Namespace) -> int:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve)
        try:
            return await _client_main(args, f"http://127.0.0.1:{port}/v1/chat/completions")
        finally:
            nursery.cancel_scope.cancel()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark httpx/httpcore connection pooling under Trio.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--serve", metavar="PORTFILE",
                    help="run only the HTTP server; write its port to PORTFILE")
    ap.add_argument("--quick", action="store_true",
                    help="fewer requests per point (400 instead of 2000)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated subset of: {', '.join(ALL_VARIANTS)} "
                         f"(default: %(default)s)")
    ap.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                    help="comma-separated concurrency levels (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per point (default 2000, --quick 400)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time cap per point (default 6, --quick 2)")
    ap.add_argument("--inproc-server", action="store_true",
                    help="run the server inside the client's trio.run (shares its CPU)")
    ap.add_argument("--pin", action="store_true",
                    help="pin client to CPU 0 and server subprocess to CPU 1")
    args = ap.parse_args(argv)

    if args.serve:
        return args
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(unknown)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if any(c < 1 for c in args.concurrency):
        ap.error("concurrency levels must be >= 1")
    if args.requests is None:
        args.requests = 400 if args.quick else 2000
    if args.max_seconds is None:
        args.max_seconds = 2.0 if args.quick else 6.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.serve:
        if args.pin:
            _pin(1)
        try:
            trio.run(_serve_main, args.serve)
        except KeyboardInterrupt:
            pass
        return 0

    if args.inproc_server:
        return trio.run(_client_with_inproc_server, args)

    if args.pin:
        _pin(0)
    proc, port, tmpdir = _start_server_subprocess(args.pin)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        return trio.run(_client_main, args, url)
    finally:
        _stop_server_subprocess(proc, tmpdir)


if __name__ == "__main__":
    sys.exit(main())
