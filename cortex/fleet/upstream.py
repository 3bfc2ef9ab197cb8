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

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio

from cortex.config import UpstreamConfig
from cortex.fleet.transport import H11Transport

CLOSE_TIMEOUT_S = 1.0
TransportFactory = Callable[[str], httpx.AsyncBaseTransport]


class UpstreamUnavailable(Exception):
    """The neuron could not be reached; it never saw the request, so another may."""


class UpstreamFailed(Exception):
    """The exchange broke after the request was sent."""


class UpstreamTimeout(UpstreamFailed):
    pass


def default_transport(config: UpstreamConfig, url: str) -> httpx.AsyncBaseTransport:
    idle_max = config.max_idle_connections_per_neuron
    if url.startswith("https://"):
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=idle_max))
    return H11Transport(max_idle_per_origin=idle_max)


class UpstreamResponse:
    def __init__(self, response: httpx.Response, idle_timeout_s: float) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self._response = response
        self._chunks = response.aiter_raw()
        self._idle_timeout_s = idle_timeout_s

    async def next_chunk(self) -> bytes:
        """The next body chunk, or b"" at the end; each read has the idle deadline."""
        with trio.move_on_after(self._idle_timeout_s) as scope:
            try:
                return await self._chunks.__anext__()
            except StopAsyncIteration:
                return b""
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"upstream connection broke mid-response: {exc}") from None
        assert scope.cancelled_caught
        raise UpstreamTimeout(f"upstream sent nothing for {self._idle_timeout_s:g} s")

    async def read_all(self, limit_bytes: int) -> bytes:
        parts = []
        size = 0
        while chunk := await self.next_chunk():
            size += len(chunk)
            if size > limit_bytes:
                raise UpstreamFailed(f"upstream response exceeds {limit_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)


class Upstream:
    def __init__(self, config: UpstreamConfig, transport_factory: TransportFactory | None = None) -> None:
        self.config = config
        self._factory = transport_factory or partial(default_transport, config)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout_s, read=None, write=config.idle_timeout_s, pool=config.connect_timeout_s
        )

    def _client(self, url: str) -> httpx.AsyncClient:
        client = self._clients.get(url)
        if client is None:
            client = httpx.AsyncClient(base_url=url, transport=self._factory(url), timeout=self._timeout)
            self._clients[url] = client
        return client

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            for client in self._clients.values():
                await client.aclose()
        self._clients.clear()

    async def get_json(self, url: str, path: str, timeout_s: float) -> Any:
        """GET a small JSON document (health, catalogue); any failure raises UpstreamFailed."""
        try:
            with trio.fail_after(timeout_s):
                response = await self._client(url).get(path)
        except trio.TooSlowError:
            raise UpstreamFailed(f"GET {path} timed out after {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"GET {path}: {exc}") from None
        if response.status_code != 200:
            raise UpstreamFailed(f"GET {path}: HTTP {response.status_code}")
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UpstreamFailed(f"GET {path}: body is not JSON") from None

    @asynccontextmanager
    async def post(
        self, url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[UpstreamResponse]:
        """POST and yield once the response head arrives; the body streams after."""
        client = self._client(url)
        request = client.build_request("POST", path, content=body, headers=headers)
        try:
            with trio.fail_after(self.config.first_byte_timeout_s):
                response = await client.send(request, stream=True)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"upstream sent no response within {self.config.first_byte_timeout_s:g} s"
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamUnavailable(str(exc)) from None
        except httpx.HTTPError as exc:
            raise UpstreamFailed(str(exc)) from None
        try:
            yield UpstreamResponse(response, self.config.idle_timeout_s)
        finally:
            # Closing an unfinished response drops its connection, which is
            # what tells the neuron to stop generating.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await response.aclose()
