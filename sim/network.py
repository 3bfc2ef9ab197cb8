"""The simulated network: an in-memory, streaming httpx transport to ASGI hosts.

httpx's own ASGITransport buffers whole responses, so it cannot model a
stream, a disconnect or a drop. Here each request becomes an ASGI exchange
run in its host's own nursery: the response head and every body chunk cross
a memory channel as the app sends them, `receive()` reports the client's
disconnect, and a crashed host (its nursery cancelled) breaks every
exchange it was serving.

Granularity, chosen for speed: latency (with jitter) is paid once when the
request travels and once when the response head comes back; body chunks
then flow without per-chunk delay. A streamed chunk therefore costs one
wake-up at each hop, not four, and chunk timing comes from the engine's
pacing, which is what budgets and cancellation depend on.

The checker watches every generation request (a POST) on its way: each
attempt to reach a host (refused, unreachable, reset before its head, or
delivered), each response head, and each body chunk of a 200 that its
reader takes, through the `on_*` hooks. Lifecycle requests (`POST
/models/load`, `/models/unload`) are not generations: they are reported
apart, by `on_open` / `on_close` (which every POST gets: when its client
sends it, and once when the client is done with it, whatever came of it)
and `on_head`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

CHANNEL_CHUNKS = 64  # like a socket buffer: a sender only blocks when the reader lags this far
CONTROL_PATHS = ("/models/load", "/models/unload")  # a neuron's lifecycle API: POSTs that generate nothing


@dataclass
class LinkFaults:
    """Faults on the way to one host."""

    extra_delay_s: float = 0.0
    partitioned_until: float = -1.0
    drop_at_chunk: int | None = None  # break responses after this many body chunks
    drop_share: float = 0.0  # the share of responses the drop applies to
    reset_until: float = -1.0  # until then, break a share of generation responses just before their head
    reset_share: float = 0.0


@dataclass
class Host:
    """One simulated machine: an ASGI app and the nursery its requests run in."""

    name: str
    app: Any = None
    nursery: trio.Nursery | None = None
    faults: LinkFaults = field(default_factory=LinkFaults)
    delivered: int = 0  # requests that reached the app
    serving: int = 0  # generation requests (POSTs) it is serving now, of any incarnation
    _idle: trio.Event | None = None

    @property
    def up(self) -> bool:
        return self.app is not None and self.nursery is not None

    async def wait_idle(self) -> None:
        """Until it serves no generation request; returns without a checkpoint when it serves none."""
        while self.serving:
            self._idle = trio.Event()
            await self._idle.wait()

    def _served_one(self) -> None:
        self.serving -= 1
        if not self.serving and self._idle is not None:
            self._idle.set()


class _Exchange:
    """One request/response between a client transport and an ASGI app."""

    def __init__(self, request: httpx.Request, body: bytes, drop_at_chunk: int | None) -> None:
        self.request = request
        self.body = body
        self.head: dict[str, Any] | None = None
        self.head_ready = trio.Event()
        self.client_gone = trio.Event()
        self.complete = False
        self.broken = False
        self.drop_at_chunk = drop_at_chunk
        self.chunks_sent = 0
        self._body_sent = False
        self.send_chunks, self.recv_chunks = trio.open_memory_channel[bytes](CHANNEL_CHUNKS)

    def scope(self) -> dict[str, Any]:
        url = self.request.url
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.request.method,
            "scheme": "http",
            "path": url.path,
            "raw_path": url.raw_path,
            "query_string": url.query,
            "headers": [(k.lower(), v) for k, v in self.request.headers.raw],
            "client": ("sim-client", 0),
            "server": (url.host, url.port or 80),
        }

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.client_gone.is_set() or self.broken:
            return  # like a server writing to a closed socket: dropped
        if message["type"] == "http.response.start":
            self.head = message
            self.head_ready.set()
            return
        data = message.get("body", b"")
        if data:
            if self.drop_at_chunk is not None and self.chunks_sent >= self.drop_at_chunk:
                self._break()
                return
            self.chunks_sent += 1
            await self.send_chunks.send(data)
        if not message.get("more_body", False):
            self.complete = True
            self.send_chunks.close()

    def _break(self) -> None:
        """The connection dies: the client sees an error, the server a disconnect."""
        self.broken = True
        self.head_ready.set()
        self.send_chunks.close()
        self.client_gone.set()

    async def serve(self, app: Any) -> None:
        try:
            await app(self.scope(), self.receive, self.send)
        finally:
            if not self.complete:
                self.broken = True
                self.head_ready.set()
                self.send_chunks.close()


class _SimStream(httpx.AsyncByteStream):
    def __init__(
        self, exchange: _Exchange, on_chunk: Callable[[bytes], None] | None, on_close: Callable[[], None] | None = None,
    ) -> None:
        self._exchange = exchange
        self._on_chunk = on_chunk
        self._on_close = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self._exchange
        async for chunk in ex.recv_chunks:
            # Coalesce what is already buffered: one wake-up per read, as from a socket.
            parts = [chunk]
            while True:
                try:
                    parts.append(ex.recv_chunks.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            data = b"".join(parts)
            if self._on_chunk is not None:
                self._on_chunk(data)
            yield data
        if ex.broken or not ex.complete:
            raise httpx.ReadError("simulated connection lost mid-response")

    async def aclose(self) -> None:
        self._exchange.client_gone.set()
        self._exchange.recv_chunks.close()
        if self._on_close is not None:
            self._on_close()


class SimNetwork:
    """Hosts by base URL, and transports that reach them."""

    def __init__(self, rng: random.Random, latency_s: float, jitter_s: float) -> None:
        self.rng = rng
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.hosts: dict[str, Host] = {}
        # Hooks for the checker, on generation requests (POSTs) only.
        self.on_deliver: Callable[[Host, httpx.Request], None] | None = None
        self.on_attempt: Callable[[Host, httpx.Request, str], None] | None = None  # refused, unreachable, reset
        self.on_head: Callable[[Host, httpx.Request, int], None] | None = None
        self.on_body: Callable[[Host, httpx.Request, bytes], None] | None = None  # a 200's body chunk, as its reader takes it
        # Every POST, generation or lifecycle: sent, and (once) done with from the client's side.
        self.on_open: Callable[[Host, httpx.Request], None] | None = None
        self.on_close: Callable[[Host, httpx.Request], None] | None = None

    def add_host(self, name: str) -> Host:
        host = Host(name)
        self.hosts[f"http://{name}"] = host
        return host

    def transport(self) -> "SimTransport":
        return SimTransport(self)

    def attempted(self, host: Host, request: httpx.Request, result: str) -> None:
        if self.on_attempt is not None:
            self.on_attempt(host, request, result)

    def closer(self, host: Host, request: httpx.Request) -> Callable[[], None]:
        """`on_close` for this exchange, at most once however often it is called."""
        done = False

        def close() -> None:
            nonlocal done
            if not done and self.on_close is not None:
                done = True
                self.on_close(host, request)

        return close

    def one_way_s(self, host: Host) -> float:
        jitter = self.rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0
        return self.latency_s + jitter + host.faults.extra_delay_s


class SimTransport(httpx.AsyncBaseTransport):
    def __init__(self, network: SimNetwork) -> None:
        self.network = network

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        net = self.network
        host = net.hosts.get(f"{request.url.scheme}://{request.url.host}")
        if host is None:
            raise httpx.ConnectError(f"no such host {request.url.host}", request=request)
        if request.method != "POST":
            return await self._handle(host, request, False, None)
        if net.on_open is not None:
            net.on_open(host, request)
        close = net.closer(host, request)
        try:
            return await self._handle(host, request, request.url.path not in CONTROL_PATHS, close)
        except BaseException:
            close()
            raise

    async def _handle(
        self, host: Host, request: httpx.Request, post: bool, close: Callable[[], None] | None,
    ) -> httpx.Response:
        """`post`: a generation request, which the checker follows; `close`: the POST's `on_close`."""
        net = self.network
        body = request.content  # cortex and the simulated clients always send bytes
        await trio.sleep(net.one_way_s(host))
        now = trio.current_time()
        if host.faults.partitioned_until > now:
            if post:
                net.attempted(host, request, "unreachable")
            timeout_s = request.extensions.get("timeout", {}).get("connect") or 5.0
            await trio.sleep(timeout_s)
            raise httpx.ConnectTimeout(f"{host.name} is partitioned away", request=request)
        if not host.up:
            if post:
                net.attempted(host, request, "refused")
            raise httpx.ConnectError(f"{host.name} refused the connection (down)", request=request)
        faults = host.faults
        drop = faults.drop_at_chunk
        if drop is not None and faults.drop_share < 1.0 and net.rng.random() >= faults.drop_share:
            drop = None
        # Resets hit generation requests only, so the health poller's picture stays the link's.
        reset = post and faults.reset_until > now and (faults.reset_share >= 1.0 or net.rng.random() < faults.reset_share)
        exchange = _Exchange(request, body, drop)
        assert host.nursery is not None
        host.delivered += 1
        if post:
            host.serving += 1
            if net.on_deliver is not None:
                net.on_deliver(host, request)
        host.nursery.start_soon(self._serve, host, host.app, exchange, post)
        try:
            await exchange.head_ready.wait()
            if exchange.head is None:
                raise httpx.RemoteProtocolError(f"{host.name} closed the connection before responding", request=request)
            if reset:
                exchange._break()
                net.attempted(host, request, "reset")
                raise httpx.RemoteProtocolError(f"{host.name} reset the connection before the response head", request=request)
            await trio.sleep(net.one_way_s(host))
        except BaseException:
            exchange.client_gone.set()  # the client hung up before the head: the server must hear it
            exchange.recv_chunks.close()
            raise
        status = exchange.head["status"]
        on_chunk = None
        if close is not None and net.on_head is not None:
            net.on_head(host, request, status)
        if post and status == 200 and net.on_body is not None:
            on_chunk = partial(net.on_body, host, request)
        return httpx.Response(
            status,
            headers=[(k, v) for k, v in exchange.head.get("headers", [])],
            stream=_SimStream(exchange, on_chunk, close),
            request=request,
        )

    @staticmethod
    async def _serve(host: Host, app: Any, exchange: _Exchange, post: bool) -> None:
        try:
            await exchange.serve(app)
        finally:
            if post:
                host._served_one()
