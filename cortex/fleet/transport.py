"""A small HTTP/1.1 transport for httpx, built on h11 and Trio sockets.

Why not httpx's own transport: httpcore's connection pool re-scans every
queued request against every connection on each request and release, so
its cost grows with the square of concurrency (encode/httpcore PR #1035).
A gateway holding hundreds of streams open to one neuron sits exactly in
that regime (docs/BENCHMARKS.md has the measurement). Here the pool is a
LIFO stack of idle connections per origin: checkout and release are O(1),
and a request never waits for a pool slot.

Scope: plain HTTP/1.1 to neurons (the data plane is a private network);
`https://` neurons go through httpx's own transport instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

READ_CHUNK_BYTES = 64 * 1024

Origin = tuple[str, int]


def _timeout(request: httpx.Request, kind: str) -> float | None:
    return request.extensions.get("timeout", {}).get(kind)


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.bytes_received = 0

    def reusable(self) -> bool:
        """Idle at both ends and not closed by the server while parked."""
        if self.h11.our_state is not h11.IDLE or self.h11.their_state is not h11.IDLE:
            return False
        # A readable idle socket means EOF or garbage: either way, unusable.
        return not self.stream.socket.is_readable()

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self, read_timeout_s: float | None) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if read_timeout_s is None:  # the common case: deadlines are the caller's
                data = await self.stream.receive_some(READ_CHUNK_BYTES)
            else:
                with trio.move_on_after(read_timeout_s) as scope:
                    data = await self.stream.receive_some(READ_CHUNK_BYTES)
                if scope.cancelled_caught:
                    raise httpx.ReadTimeout("timed out reading from the upstream")
            self.bytes_received += len(data)
            self.h11.receive_data(data)

    def close(self) -> None:
        self.stream.socket.close()  # synchronous: safe in cancelled code, no shield needed


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, transport: "H11Transport", origin: Origin, conn: _Connection, request: httpx.Request) -> None:
        self._transport = transport
        self._origin = origin
        self._conn = conn
        self._request = request
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read_timeout_s = _timeout(self._request, "read")
        while True:
            try:
                event = await self._conn.next_event(read_timeout_s)
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(f"upstream broke the response: {exc}", request=self._request) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(f"upstream connection lost: {exc}", request=self._request) from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                return

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self._complete and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._transport._release(self._origin, conn)
        else:
            conn.close()


class H11Transport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_idle_per_origin: int = 1024) -> None:
        assert max_idle_per_origin >= 0
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"H11Transport speaks plain http only, not {request.url.scheme}")
        origin = (request.url.host, request.url.port or 80)
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, request)
            except _StaleConnection:
                pass  # the server closed a parked connection; one fresh try is safe
        conn = await self._connect(origin, request)
        try:
            return await self._exchange(origin, conn, request)
        except _StaleConnection as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None

    async def _connect(self, origin: Origin, request: httpx.Request) -> _Connection:
        timeout_s = _timeout(request, "connect")
        try:
            with trio.fail_after(timeout_s if timeout_s is not None else float("inf")):
                stream = await trio.open_tcp_stream(*origin)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"timed out connecting to {origin[0]}:{origin[1]}", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}", request=request) from None
        return _Connection(stream)

    async def _exchange(self, origin: Origin, conn: _Connection, request: httpx.Request) -> httpx.Response:
        """Send the request and read the response head; the body streams later."""
        try:
            head = await self._round_trip(conn, request)
        except BaseException:
            conn.close()
            raise
        return httpx.Response(
            head.status_code,
            headers=[(k, v) for k, v in head.headers],
            stream=_ResponseStream(self, origin, conn, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def _round_trip(self, conn: _Connection, request: httpx.Request) -> h11.Response:
        target = request.url.raw_path
        headers = [(k, v) for k, v in request.headers.raw]
        try:
            await conn.send(h11.Request(method=request.method, target=target, headers=headers))
            async for chunk in request.stream:  # type: ignore[union-attr]
                await conn.send(h11.Data(data=chunk))
            await conn.send(h11.EndOfMessage())
            while True:
                event = await conn.next_event(_timeout(request, "read"))
                if isinstance(event, h11.Response):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("server closed the connection")
                # h11.InformationalResponse (1xx): keep reading
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if conn.bytes_received == 0:
                raise _StaleConnection(f"upstream closed the connection before responding: {exc}") from None
            raise httpx.RemoteProtocolError(f"upstream sent a bad response head: {exc}", request=request) from None
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None

    def _checkout(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            conn = stack.pop()  # LIFO: the warmest connection first
            if conn.reusable():
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        stack = self._idle.setdefault(origin, [])
        if self._closed or len(stack) >= self._max_idle:
            conn.close()
            return
        conn.bytes_received = 0
        stack.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """The connection died before any response byte: the request was not served."""
