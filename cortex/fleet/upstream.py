"""The one seam through which cortex talks to neurons.

Everything goes through an httpx transport, chosen by a factory: the
production default is `H11Transport` (O(1) pooling, see transport.py); the
simulator swaps in an in-memory streaming transport. Neither the callers
nor the transports know which one is in use.

Deadlines are Trio deadlines, so they run on virtual time in the simulator:
connect (inside the transport), first byte (the response head), and idle
(each body read; not a total deadline, long streams are legitimate).
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import httpx
import trio

from cortex.config import UpstreamConfig
from cortex.fleet.transport import H11Transport

CLOSE_TIMEOUT_S = 1.0
POLL_BODY_MAX_BYTES = 1024 * 1024
TransportFactory = Callable[[str], httpx.AsyncBaseTransport]


class UpstreamUnavailable(Exception):
    """The neuron could not be reached; it never saw the request, so another may."""


class LocalResourceError(Exception):
    """cortex itself ran out of something (file descriptors, buffers): no neuron is to blame."""


LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _is_local(exc: BaseException | None, depth: int = 0) -> bool:
    """An OSError that says this process, not the peer, failed; searched through causes and groups."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        return True
    if isinstance(exc, BaseExceptionGroup) and any(_is_local(e, depth + 1) for e in exc.exceptions):
        return True
    return _is_local(exc.__cause__, depth + 1) or _is_local(exc.__context__, depth + 1)


class UpstreamFailed(Exception):
    """The exchange broke after the request was sent."""


class UpstreamTimeout(UpstreamFailed):
    pass


class UpstreamReset(UpstreamFailed):
    """The exchange broke before the response head: nothing reached the client yet."""


def default_transport(config: UpstreamConfig, url: str) -> httpx.AsyncBaseTransport:
    idle_max = config.max_idle_connections_per_neuron
    if url.startswith("https://"):
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=idle_max))
    return H11Transport(max_idle_per_origin=idle_max)


class UpstreamResponse:
    def __init__(self, response: httpx.Response, idle_timeout_s: float) -> None:
        self.status = response.status_code
        self.headers = response.headers
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        self._stream = stream
        self._chunks = stream.__aiter__()
        self._idle_timeout_s = idle_timeout_s
        self._idle: trio.CancelScope | None = None

    @contextmanager
    def idle_watch(self) -> Iterator[None]:
        """One deadline scope for a whole body, armed only while reading.

        Cheaper than a scope per read (a stream is hundreds of reads), and
        disarmed while we write to the client, so a slow client is
        back-pressure, not an upstream timeout.
        """
        with trio.CancelScope() as scope:
            self._idle = scope
            try:
                yield
            finally:
                self._idle = None
        if scope.cancelled_caught:
            raise UpstreamTimeout(f"upstream sent nothing for {self._idle_timeout_s:g} s")

    async def next_chunk(self) -> bytes:
        """The next body chunk, or b"" at the end; read inside `idle_watch()`."""
        assert self._idle is not None, "next_chunk() reads under idle_watch()"
        self._idle.deadline = trio.current_time() + self._idle_timeout_s
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"upstream connection broke mid-response: {exc}") from None
        finally:
            self._idle.deadline = math.inf

    async def read_all(self, limit_bytes: int) -> bytes:
        parts = []
        size = 0
        with self.idle_watch():
            while chunk := await self.next_chunk():
                size += len(chunk)
                if size > limit_bytes:
                    raise UpstreamFailed(f"upstream response exceeds {limit_bytes} bytes")
                parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]
        await self._stream.aclose()


class Upstream:
    """Requests go straight to each neuron's transport.

    httpx's client layers (URL merging, cookies, auth and redirect
    handling) cost about a fifth of cortex's CPU per proxied request and
    do nothing for a neuron, so the hot path skips them; the transport
    stays the seam.
    """

    def __init__(self, config: UpstreamConfig, transport_factory: TransportFactory | None = None) -> None:
        self.config = config
        self._factory = transport_factory or partial(default_transport, config)
        self._transports: dict[str, httpx.AsyncBaseTransport] = {}
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._timeout = {
            "connect": config.connect_timeout_s,
            "read": None,  # first-byte and idle deadlines are ours, below
            "write": config.idle_timeout_s,
            "pool": config.connect_timeout_s,
        }

    def _transport(self, base_url: str) -> httpx.AsyncBaseTransport:
        transport = self._transports.get(base_url)
        if transport is None:
            transport = self._transports[base_url] = self._factory(base_url)
        return transport

    def _url(self, base_url: str, path: str) -> httpx.URL:
        url = self._urls.get((base_url, path))
        if url is None:
            url = self._urls[(base_url, path)] = httpx.URL(base_url.rstrip("/") + path)
        return url

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            for transport in self._transports.values():
                await transport.aclose()
        self._transports.clear()

    async def _send(self, base_url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        request = httpx.Request(
            method, self._url(base_url, path), content=body, headers=headers, extensions={"timeout": self._timeout}
        )
        return await self._transport(base_url).handle_async_request(request)

    async def get(self, url: str, path: str, timeout_s: float, headers: dict[str, str] | None = None, *,
                  limit_bytes: int = POLL_BODY_MAX_BYTES) -> tuple[int, bytes]:
        """GET a document (health, catalogue: small; a tokenizer: up to `limit_bytes`), whole within
        `timeout_s`: its status and body; a failure to get one raises."""
        assert limit_bytes >= 0
        try:
            with trio.fail_after(timeout_s):
                response = await self._send(url, "GET", path, b"", headers or {})
                reader = UpstreamResponse(response, timeout_s)
                try:
                    raw = await reader.read_all(limit_bytes)
                finally:
                    await reader.aclose()
        except trio.TooSlowError:
            raise UpstreamFailed(f"GET {path} timed out after {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            if _is_local(exc):
                raise LocalResourceError(f"GET {path}: {exc}") from None
            raise UpstreamFailed(f"GET {path}: {exc}") from None
        return response.status_code, raw

    async def get_json(self, url: str, path: str, timeout_s: float, headers: dict[str, str] | None = None) -> Any:
        """GET a small JSON document; anything but a 200 with JSON raises UpstreamFailed."""
        status, raw = await self.get(url, path, timeout_s, headers)
        if status != 200:
            raise UpstreamFailed(f"GET {path}: HTTP {status}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise UpstreamFailed(f"GET {path}: body is not JSON") from None

    @asynccontextmanager
    async def post(
        self, url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[UpstreamResponse]:
        """POST and yield once the response head arrives; the body streams after."""
        try:
            with trio.fail_after(self.config.first_byte_timeout_s):
                response = await self._send(url, "POST", path, body, headers)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"upstream sent no response within {self.config.first_byte_timeout_s:g} s"
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if _is_local(exc):
                raise LocalResourceError(str(exc)) from None
            raise UpstreamUnavailable(str(exc)) from None
        except httpx.HTTPError as exc:
            raise UpstreamReset(str(exc)) from None
        reader = UpstreamResponse(response, self.config.idle_timeout_s)
        try:
            yield reader
        finally:
            # Closing an unfinished response drops its connection, which is
            # what tells the neuron to stop generating.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await reader.aclose()
