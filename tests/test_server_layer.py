"""The server layer (common/serving.py, common/server_fixes.py) against real processes and sockets.

HTTP/1.1 only, connections freed once the peer closes them, the fd limit,
rate-limited accept errors, the listen backlog and the write timeout.
"""

from __future__ import annotations

import json
import logging
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11
import httpx
import pytest
import trio

from common.asgi import disconnect_watch
from common.serving import AcceptErrorLog, JsonLines, serve
from tests.conftest import Proc, Stack, wait_until

MODEL = "cortex-mock"
STREAM_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2000, "stream": True}


def _address(proc: Proc) -> tuple[str, int]:
    host, _, port = proc.url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _fd_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def _start_with_fd_limit(stack: Stack, nofile: tuple[int, int], module: str, args: list[str]) -> Proc:
    """A daemon started under `prlimit --nofile=SOFT:HARD`, torn down with the stack."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    name = f"{module}-limited-{len(stack.procs)}"
    argv = ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", sys.executable, "-m", module, *args]
    proc = Proc(argv, stack.tmp_path / f"{name}.log")
    stack.procs.append(proc)
    return proc.wait_ready()


def _cortex_args(stack: Stack, neuron: Proc) -> list[str]:
    data_dir = stack.tmp_path / f"data-{len(stack.procs)}"
    return ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--no-auth", "--neuron", neuron.url]


def _exchange(sock: socket.socket, conn: h11.Connection, request: h11.Request) -> list[object]:
    """Send `request` on `sock`; the response events up to its end (or a 101)."""
    sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        if event is h11.PAUSED:
            return events
        events.append(event)
        if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return events
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return events


def _get(host: str, path: str = "/health", headers: tuple[tuple[str, str], ...] = ()) -> h11.Request:
    return h11.Request(method="GET", target=path, headers=[("host", host), *headers])


def _abort(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# HTTP/2 ---------------------------------------------------------------------


def test_http2_prior_knowledge_is_refused_with_http_1_1_required(stack: Stack):
    neuron = stack.neuron()
    cortex = stack.cortex(neuron)
    with httpx.Client(http2=True, http1=False, timeout=10) as http:  # the reported client
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(cortex.url + "/v1/chat/completions", json=STREAM_BODY)
    # What it was told, read with a bare h2 client.
    h2_conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2_conn.initiate_connection()
    h2_conn.send_headers(1, [(":method", "GET"), (":path", "/health"), (":scheme", "http"), (":authority", "x")], end_stream=True)
    with socket.create_connection(_address(cortex), timeout=10) as sock:
        sock.sendall(h2_conn.data_to_send())
        events: list[object] = []
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            data = sock.recv(65536)
            assert data, f"closed without a GOAWAY; events: {events}"
            events += h2_conn.receive_data(data)
    goaway = next(e for e in events if isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
    assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
    assert neuron.get_json("/health")["requests_total"] == 0


def test_h2c_upgrade_is_declined_and_answered_in_http_1_1(stack: Stack):
    cortex = stack.cortex(stack.neuron())
    host, port = _address(cortex)
    upgrade = (("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "AAMAAABkAARAAAAA"))
    with socket.create_connection((host, port), timeout=10) as sock:
        conn = h11.Connection(h11.CLIENT)
        first = _exchange(sock, conn, _get(host, headers=upgrade))
        assert isinstance(first[0], h11.Response)
        assert (first[0].status_code, first[0].http_version) == (200, b"1.1")
        # Still HTTP/1.1 on the same connection: nothing was switched.
        conn.start_next_cycle()
        second = _exchange(sock, conn, _get(host))
        assert isinstance(second[0], h11.Response) and second[0].status_code == 200


async def test_an_http2_capable_client_dropping_20_streams_is_seen_at_the_neuron(stack: Stack):
    # The reported case: 20 streams dropped after 5 events, the client kept
    # open. With HTTP/1.1 each drop closes its connection, which cortex sees.
    neuron = stack.neuron("--token-interval-ms", "20", "--reply-tokens", "2000")
    cortex = stack.cortex(neuron)

    async with httpx.AsyncClient(http2=True, timeout=30) as http:

        async def drop_after_5_events() -> None:
            async with http.stream("POST", cortex.url + "/v1/chat/completions", json=STREAM_BODY) as response:
                assert response.http_version == "HTTP/1.1"
                events = 0
                async for line in response.aiter_lines():
                    events += line.startswith("data:")
                    if events == 5:
                        return

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(drop_after_5_events)
        health = wait_until(lambda: (h := neuron.get_json("/health"))["cancelled_total"] == 20 and h)
        assert health["in_flight"] == 0
        assert health["tokens_generated_total"] < 20 * 2000


# Connections the peer closed --------------------------------------------------


def test_connections_the_client_closed_release_their_fds_at_once(stack: Stack):
    cortex = stack.cortex(stack.neuron())
    host, port = _address(cortex)
    pid = cortex.popen.pid
    baseline = _fd_count(pid)
    clients = []
    for i in range(300):
        sock = socket.create_connection((host, port), timeout=10)
        if i % 3:  # two in three are idle keep-alive connections after a request, the rest never sent one
            conn = h11.Connection(h11.CLIENT)
            assert isinstance(_exchange(sock, conn, _get(host))[0], h11.Response)
        clients.append(sock)
    wait_until(lambda: _fd_count(pid) >= baseline + 290)  # cortex holds them all
    for i, sock in enumerate(clients):
        _abort(sock) if i % 2 else sock.close()  # half RST, half FIN
    # Without the fix they stay open for keep_alive_timeout_s (75 s).
    wait_until(lambda: _fd_count(pid) <= baseline + 10, timeout_s=15)


# File descriptors -------------------------------------------------------------


def test_daemons_raise_the_soft_fd_limit_to_the_hard_limit(stack: Stack):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 512:
        pytest.skip(f"the hard fd limit here is only {hard}")
    neuron = _start_with_fd_limit(stack, (256, hard), "neuron", ["serve", "--listen", "127.0.0.1:0"])
    cortex = _start_with_fd_limit(stack, (256, hard), "cortex", _cortex_args(stack, neuron))
    assert _fd_limits(neuron.popen.pid) == (hard, hard)
    assert _fd_limits(cortex.popen.pid) == (hard, hard)


def test_out_of_fds_is_one_json_line_without_a_traceback_and_cortex_recovers(stack: Stack):
    neuron = stack.neuron()
    cortex = _start_with_fd_limit(stack, (64, 64), "cortex", _cortex_args(stack, neuron))
    host, port = _address(cortex)

    def accept_errors() -> list[dict]:
        return [e for e in cortex.log_events() if e.get("event") == "accept_failed"]

    clients = [socket.create_connection((host, port), timeout=10) for _ in range(150)]  # the backlog queues the rest
    try:
        wait_until(accept_errors)
        time.sleep(1.0)  # trio would log ten tracebacks a second meanwhile
    finally:
        for sock in clients:
            sock.close()

    def healthy() -> bool:
        try:
            return httpx.get(cortex.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=20)
    logs = cortex.logs()
    assert "Traceback" not in logs
    errors = accept_errors()
    assert 1 <= len(errors) <= 2  # one per 10 s interval
    assert errors[0]["level"] == "error" and errors[0]["error"] == "EMFILE"


def test_accept_error_log_passes_one_record_per_interval_and_counts_the_rest():
    now = [100.0]
    log = AcceptErrorLog(interval_s=10.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            exc_info = sys.exc_info()
        return logging.LogRecord(
            "trio.serve_listeners", logging.ERROR, __file__, 1,
            "accept returned %s (%s); retrying in %s seconds", ("EMFILE", "Too many open files", 0.1), exc_info,
        )

    first = record()
    assert log.filter(first)
    line = json.loads(JsonLines().format(first))
    assert (line["event"], line["error"], line["dropped"]) == ("accept_failed", "EMFILE", 0)
    now[0] += 0.1
    assert not any(log.filter(record()) for _ in range(99))
    now[0] += 10.0
    later = record()
    assert log.filter(later)
    assert later.fields["dropped"] == 99


# Backlog ---------------------------------------------------------------------


def test_a_burst_of_500_connects_is_queued_and_every_one_is_served(stack: Stack):
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < 500:
        pytest.skip(f"net.core.somaxconn={somaxconn} caps the listen backlog below the burst")
    cortex = stack.cortex(stack.neuron())
    host, port = _address(cortex)
    clients: list[socket.socket] = []
    # While cortex is stopped, only the kernel's accept queue (the backlog)
    # can take the connects: each one completes only if it fits.
    cortex.signal(signal.SIGSTOP)
    try:
        poller = select.poll()
        for _ in range(500):
            sock = socket.socket()
            sock.setblocking(False)
            assert sock.connect_ex((host, port)) in (0, 115)  # 115: EINPROGRESS
            poller.register(sock, select.POLLOUT)
            clients.append(sock)
        connected: set[int] = set()

        def all_connected() -> bool:
            connected.update(fd for fd, _ in poller.poll(0))
            return len(connected) == 500

        wait_until(all_connected, timeout_s=10)
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in clients)
    finally:
        cortex.signal(signal.SIGCONT)
    try:
        statuses = []
        for sock in clients:
            sock.setblocking(True)
            sock.settimeout(30)
            response = _exchange(sock, h11.Connection(h11.CLIENT), _get(host))[0]
            statuses.append(getattr(response, "status_code", response))
        assert statuses == [200] * 500
    finally:
        for sock in clients:
            sock.close()


# Write timeout ---------------------------------------------------------------


async def _lifespan(receive, send) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await send({"type": "lifespan.shutdown.complete"})


async def test_write_timeout_drops_a_client_that_reads_nothing_and_the_app_sees_it():
    outcome: dict[str, bool] = {}
    app_done = trio.Event()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        async with disconnect_watch(receive) as state:
            while True:  # an endless stream; the client reads none of it
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        outcome["disconnected"] = state.disconnected
        app_done.set()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, "127.0.0.1:0", write_timeout_s=0.5))
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        client = await trio.open_tcp_stream(host, int(port))
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            # Hypercorn shields the socket write: without the write timeout
            # the app's send blocks for as long as this client is connected.
            with trio.fail_after(10):
                await app_done.wait()
        finally:
            await client.aclose()  # also unblocks a write still stuck, so shutdown cannot hang
            nursery.cancel_scope.cancel()
    assert outcome == {"disconnected": True}


async def test_a_response_that_ends_after_the_client_reset_does_not_keep_the_connection():
    ended = 0

    async def app(scope, receive, send) -> None:
        nonlocal ended
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await trio.sleep(0.2)  # the client resets meanwhile; this app does not watch for it
        await send({"type": "http.response.body", "body": b"done"})
        ended += 1

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, "127.0.0.1:0"))
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        baseline = _fd_count_here()
        for _ in range(20):
            client = trio.socket.socket()
            await client.connect((host, int(port)))
            await client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await client.recv(65536)).startswith(b"HTTP/1.1 200")
            _abort(client)
        with trio.fail_after(10):
            while ended < 20 or _fd_count_here() > baseline:  # without the fix: 20 sockets held for 75 s
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def _fd_count_here() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))
