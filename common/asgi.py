"""A small raw-ASGI toolkit shared by cortex and neuron.

We serve raw ASGI behind a table router instead of a framework: every
request crosses this path, and each layer a framework adds costs latency
that cortex must not add (see docs/BENCHMARKS.md for the measurement).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import trio

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class BodyTooLarge(Exception):
    """The request body is larger than the configured limit."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"request body exceeds {limit_bytes} bytes")
        self.limit_bytes = limit_bytes


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


class BodyTimeout(Exception):
    """The request body did not arrive within its deadline."""


class BodyBufferFull(Exception):
    """Buffering this body would pass the process-wide bound on buffered request bytes."""


class BodyBudget:
    """A process-wide bound on request-body bytes buffered at once.

    Without it, clients that send most of a large body and then stall
    each pin up to `max_body_bytes` of memory; with it, memory is bounded
    and a body that does not fit is refused, never queued.
    """

    def __init__(self, max_bytes: int) -> None:
        assert max_bytes > 0
        self.max_bytes = max_bytes
        self.in_use_bytes = 0

    def take(self, size: int) -> bool:
        if self.in_use_bytes + size > self.max_bytes:
            return False
        self.in_use_bytes += size
        return True

    def give(self, size: int) -> None:
        assert 0 <= size <= self.in_use_bytes
        self.in_use_bytes -= size


@dataclass
class Request:
    scope: Scope
    receive: Receive
    send: Send
    headers: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    started: float = 0.0  # trio.current_time() when the request arrived
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # added to the response head
    log: dict[str, Any] = field(default_factory=dict)  # fields for the one request log line
    cancel_scope: trio.CancelScope | None = None  # the whole request, for shutdown
    surface: Any = None  # the API surface answering it (its error envelope, its reply shapes)
    shutting_down: bool = False  # cancelled because the server is draining

    @classmethod
    def from_scope(cls, scope: Scope, receive: Receive, send: Send) -> "Request":
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            # First value wins; repeated headers are not meaningful to us.
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        return cls(scope, receive, send, headers)

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.scope.get("query_string", b"").decode("latin-1")))

    async def body(self, limit_bytes: int, timeout_s: float = math.inf, budget: BodyBudget | None = None) -> bytes:
        """Read the whole body within `timeout_s`, refusing early once it passes
        `limit_bytes` or would pass the shared `budget`."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
            raise BodyTooLarge(limit_bytes)
        buffer = bytearray()
        taken = 0
        try:
            with trio.move_on_after(timeout_s) as scope:
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone()
                    chunk = message.get("body", b"")
                    if len(buffer) + len(chunk) > limit_bytes:
                        raise BodyTooLarge(limit_bytes)
                    if budget is not None:
                        if not budget.take(len(chunk)):
                            raise BodyBufferFull()
                        taken += len(chunk)
                    buffer += chunk
                    if not message.get("more_body", False):
                        return bytes(buffer)
            assert scope.cancelled_caught
            raise BodyTimeout()
        finally:
            if budget is not None:
                budget.give(taken)


def encode_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate (from an upstream) has no UTF-8; as a \u escape it is still JSON.
        return json.dumps(obj, separators=(",", ":")).encode()


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    all_headers = headers + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(send, status, encode_json(obj), JSON_HEADERS + (headers or []))


async def start_stream(send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})


async def send_chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def end_stream(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def is_event_stream(headers: Any) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers)


async def refuse_websocket(receive: Receive, send: Send, body: bytes) -> None:
    """Answer a WebSocket upgrade with a plain 400 (ASGI's websocket.http.response), or a close (403)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({
        "type": "websocket.http.response.start", "status": 400,
        "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "websocket.http.response.body", "body": body})


def sse_data(obj: Any) -> bytes:
    return b"data: " + encode_json(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Disconnect:
    disconnected = False  # the client left before the response was complete
    _closing = False

    def closing(self) -> None:
        """Call before the final send: a disconnect after it is a normal close."""
        self._closing = True


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, state: Disconnect) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not state._closing:
                state.disconnected = True
                scope.cancel()
            return


@asynccontextmanager
async def companion(task: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run `task` beside the body of the block, and cancel it when the body ends.

    The body's own exception comes out as itself, not wrapped in a group.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        # The body failed while a scope around both was being cancelled (the client left): the
        # body's own error is the one to answer; the cancel scope is still cancelled, so the
        # cancellation comes again at the next checkpoint.
        _, rest = group.split(trio.Cancelled)
        if rest is not None and len(rest.exceptions) == 1 and not isinstance(rest.exceptions[0], BaseExceptionGroup):
            raise rest.exceptions[0] from None
        raise


@asynccontextmanager
async def disconnect_watch(receive: Receive) -> AsyncIterator[Disconnect]:
    """Cancel the body of the block when the client goes away.

    Hypercorn's Trio worker never makes `is_disconnected()` true, but it
    does deliver `http.disconnect` to `receive()` once the body is read,
    so a task parked on `receive()` is our disconnect detector. Use only
    after the request body has been read.
    """
    state = Disconnect()
    with trio.CancelScope() as scope:
        async with companion(partial(_watch_disconnect, receive, scope, state)):
            yield state


Handler = Callable[[Request], Awaitable[None]]


class Router:
    """Exact-path routing with per-method handlers, 404 and 405."""

    def __init__(
        self,
        not_found: Callable[[Request], Awaitable[None]],
        method_not_allowed: Callable[[Request, list[str]], Awaitable[None]],
    ) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, Handler]] = []
        self._not_found = not_found
        self._method_not_allowed = method_not_allowed

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    def add_prefix(self, prefix: str, handler: Handler) -> None:
        """Every method on every path under `prefix` goes to `handler`."""
        self._prefixes.append((prefix, handler))

    async def dispatch(self, request: Request) -> None:
        methods = self._routes.get(request.path.rstrip("/") or "/")
        if methods is None:
            for prefix, handler in self._prefixes:
                if request.path.startswith(prefix):
                    await handler(request)
                    return
            await self._not_found(request)
            return
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            await self._method_not_allowed(request, sorted(methods))
            return
        await handler(request)


async def serve_lifespan(receive: Receive, send: Send, run: Callable[..., Awaitable[None]]) -> None:
    """Run an ASGI lifespan: `run(task_status)` owns the app's background
    nursery, calls `task_status.started()` when ready and returns on cancel."""
    message = await receive()
    assert message["type"] == "lifespan.startup"
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(run)
        except Exception as exc:  # start-up failure is reported, not raised
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        nursery.cancel_scope.cancel()
    await send({"type": "lifespan.shutdown.complete"})
