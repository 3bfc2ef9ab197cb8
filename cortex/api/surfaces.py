"""The API surfaces: how one proxied generation looks to its client.

The proxy runs every request the same way (estimate, reserve, dispatch,
relay, settle) on OpenAI chat or completions underneath. A surface is the
one seam where a client's API differs: the error envelope, the rate-limit
headers, the shape of a whole reply and of a stream. `OpenAISurface`
passes the upstream's bytes through; `AnthropicSurface` runs them through
the pure translator in `cortex/api/anthropic.py`. The proxy never asks
which one it has.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from common import asgi
from common.errors import ApiError
from cortex.api import anthropic
from cortex.budget.ledger import Headroom


class StreamShape(Protocol):
    """One stream's client bytes, fed the OpenAI events the relay forwarded."""

    ping_interval_s: float | None  # keep-alives while the upstream is silent; None: none

    def start(self) -> bytes: ...
    def relay(self, data: bytes, payloads: list[bytes]) -> bytes: ...  # the relay's bytes and their events' data
    def end(self) -> bytes: ...
    def error(self, err: ApiError) -> bytes: ...
    def ping(self) -> bytes: ...


class Surface(Protocol):
    name: str

    def error_response(self, err: ApiError, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]: ...
    def ratelimit_headers(self, room: Headroom | None) -> list[tuple[bytes, bytes]]: ...
    def whole(self, body: dict[str, Any], raw: bytes) -> bytes: ...
    def stream(self) -> StreamShape: ...


# --- OpenAI: the upstream's own bytes -----------------------------------------------


class _OpenAIStream:
    ping_interval_s = None

    def start(self) -> bytes:
        return b""

    def relay(self, data: bytes, payloads: list[bytes]) -> bytes:
        return data

    def end(self) -> bytes:
        return b""  # the upstream's [DONE] was relayed

    def error(self, err: ApiError) -> bytes:
        return asgi.sse_data(err.openai_body())

    def ping(self) -> bytes:
        return b""


class OpenAISurface:
    name = "openai"

    def error_response(self, err: ApiError, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        return err.status, err.openai_bytes(), asgi.JSON_HEADERS + err.headers

    def ratelimit_headers(self, room: Headroom | None) -> list[tuple[bytes, bytes]]:
        if room is None:
            return []
        headers = [
            (b"x-ratelimit-limit-tokens", str(room.limit_tokens).encode()),
            (b"x-ratelimit-remaining-tokens", str(room.remaining_tokens).encode()),
        ]
        if room.reset_s is not None:
            headers.append((b"x-ratelimit-reset-tokens", f"{math.ceil(room.reset_s * 1000) / 1000:g}s".encode()))
        return headers

    def whole(self, body: dict[str, Any], raw: bytes) -> bytes:
        return raw

    def stream(self) -> StreamShape:
        return _OpenAIStream()


OPENAI = OpenAISurface()


# --- Anthropic: translated ----------------------------------------------------------


class _AnthropicStream:
    def __init__(self, request: anthropic.AnthropicRequest, message_id: str, input_tokens: int, ping_s: float) -> None:
        self._translator = anthropic.StreamTranslator(request, message_id, input_tokens)
        self.ping_interval_s = ping_s

    def start(self) -> bytes:
        return self._translator.start()

    def relay(self, data: bytes, payloads: list[bytes]) -> bytes:
        return self._translator.feed_payloads(payloads)

    def end(self) -> bytes:
        return self._translator.finish()

    def error(self, err: ApiError) -> bytes:
        return self._translator.error_event(err)

    def ping(self) -> bytes:
        return self._translator.ping()


class AnthropicSurface:
    """One Messages request: the translated request it came from and its ids."""

    name = "anthropic"

    def __init__(self, request: anthropic.AnthropicRequest | None, request_id: str, ping_interval_s: float) -> None:
        self.request = request
        self.message_id = anthropic.message_id_for(request_id)
        self.ping_interval_s = ping_interval_s
        self.input_tokens = 0  # the prompt bound, for message_start before the upstream counts it

    def error_response(self, err: ApiError, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        headers = asgi.JSON_HEADERS + anthropic.error_headers(err, request_id)
        return anthropic.error_status(err), anthropic.error_bytes(err, request_id), headers

    def ratelimit_headers(self, room: Headroom | None) -> list[tuple[bytes, bytes]]:
        if room is None:
            return []
        reset_at = time.time() + room.reset_s if room.reset_s is not None else None
        return anthropic.ratelimit_headers(room.limit_tokens, room.remaining_tokens, reset_at)

    def whole(self, body: dict[str, Any], raw: bytes) -> bytes:
        assert self.request is not None
        return asgi.encode_json(anthropic.from_openai(body, self.request, self.message_id))

    def stream(self) -> StreamShape:
        assert self.request is not None
        return _AnthropicStream(self.request, self.message_id, self.input_tokens, self.ping_interval_s)
