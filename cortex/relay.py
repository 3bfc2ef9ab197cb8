"""Pure streaming relay: upstream SSE bytes in, client bytes out.

cortex always asks the neuron for a usage frame (it needs actual usage to
settle), so the relay drops that frame when the client did not ask for it.
Everything else is forwarded byte for byte, one client write per upstream
read, so streaming stays chunk by chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_EVENT_BYTES = 1024 * 1024
DONE = b"[DONE]"


class SSEProtocolError(ValueError):
    pass


class SSEDecoder:
    """Splits a byte stream into complete SSE events (terminator included)."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        if b"\r" in buffer:
            # SSE ends lines with CRLF, LF or a lone CR; a CR at the very end may be half a CRLF.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            buffer = buffer[: len(buffer) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        events = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            events.append(buffer[start : end + 2])
            start = end + 2
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max_event_bytes:
            raise SSEProtocolError(f"upstream SSE event larger than {self._max_event_bytes} bytes")
        return events

    @property
    def pending(self) -> bool:
        return bool(self._buffer.strip())


def event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event (comments and other fields dropped)."""
    if event.startswith(b"data:") and event.find(b"\n") == len(event) - 2:  # the usual one-line event
        return event[5:-2].lstrip(b" ")
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of a text field; any other value counts at its JSON size, so
    output in an unexpected shape (content parts, arguments as an object) is
    never under-counted."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if value is None:
        return 0
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return len(repr(value).encode("utf-8", "surrogatepass"))


def _message_bytes(message: dict[str, Any]) -> int:
    total = sum(_text_bytes(message.get(name)) for name in _TEXT_FIELDS)
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            total += _text_bytes(function.get("arguments")) + _text_bytes(function.get("name"))
    return total


def output_tokens(frame: Any) -> int:
    """Output tokens in one chunk or whole response, counted as UTF-8 bytes of its text.

    Exact for neuron's byte-level tokenizer and an upper bound for any
    tokenizer whose tokens cover at least a byte each. Text, reasoning and
    tool-call arguments all count: the client received each of them.
    Whatever shape the upstream sent, this returns a count, never raises.
    """
    choices = frame.get("choices") if isinstance(frame, dict) else None
    total = 0
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        # Both shapes are counted whatever the endpoint: an upstream may send either.
        for name in ("delta", "message"):
            body = choice.get(name)
            total += _message_bytes(body) if isinstance(body, dict) else _text_bytes(body)
        total += _text_bytes(choice.get("text"))
    return total


_TEXT_KEYS = (b'"content":', b'"text":')
_SLOW_MARKERS = (b"\\", b'"tool_calls"', b'"reasoning', b'"refusal"', b'"arguments"')


def chunk_output_tokens(data: bytes) -> int:
    """`output_tokens` of one chunk's JSON, without parsing it in the common case.

    A chunk with exactly one text field, a plain string (no escapes, no tool
    calls, no reasoning), is counted by slicing; anything else takes the
    JSON path. Inside a JSON string a quote is always escaped, so the key
    pattern cannot be faked.
    """
    if not any(marker in data for marker in _SLOW_MARKERS):
        if data.count(_TEXT_KEYS[0]) + data.count(_TEXT_KEYS[1]) == 1:
            for key in _TEXT_KEYS:
                start = data.find(key)
                if start >= 0 and data[start + len(key) : start + len(key) + 1] == b'"':
                    start += len(key) + 1
                    end = data.find(b'"', start)
                    if end >= 0:
                        return end - start
    return output_tokens(_json_object(data))


@dataclass
class StreamRelay:
    """Relays one upstream stream, counting its output and enforcing a bound.

    `output_tokens_max` is the output the client's hold covers: an event
    that would take the relayed output past it is not forwarded, and
    `overflowed` tells the caller to end the stream. The upstream was sent
    the same bound, so only a misbehaving one ever trips it.
    """

    client_wants_usage: bool
    output_tokens_max: int | None = None
    usage: Any = None  # the upstream's usage value, as sent
    done: bool = False
    overflowed: bool = False
    data_events: int = 0  # data events relayed, usage frame and [DONE] excluded
    output_tokens: int = 0  # counted from the relayed chunks
    dropped_output_tokens: int = 0  # in the events past the bound: read, never forwarded

    def __post_init__(self) -> None:
        self._decoder = SSEDecoder()
        self.payloads: list[bytes] = []  # the `data:` of each event the last feed forwarded

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in; the bytes to write to the client out (maybe b"").

        `payloads` then holds the data of each forwarded event, so a surface
        that translates need not split the stream again.
        """
        out: list[bytes] = []
        self.payloads = payloads = []
        if self.done or self.overflowed:
            return b""  # nothing after [DONE] or past the bound is the client's
        for event in self._decoder.feed(chunk):
            if self.done:
                break
            data = event_data(event)
            if self.overflowed:  # past the bound: read (and counted as waste), never forwarded
                if data and data != DONE:
                    self.dropped_output_tokens += chunk_output_tokens(data)
                continue
            if data == DONE:
                self.done = True
            elif data:
                if self._is_usage_only(data) and not self.client_wants_usage:
                    continue
                tokens = chunk_output_tokens(data)
                if self.output_tokens_max is not None and self.output_tokens + tokens > self.output_tokens_max:
                    self.overflowed = True
                    self.dropped_output_tokens += tokens
                    continue
                self.data_events += 1
                self.output_tokens += tokens
            out.append(event)
            payloads.append(data)
        return b"".join(out)

    def _is_usage_only(self, data: bytes) -> bool:
        """Record usage (any non-null value); True for a usage-only frame (no choices)."""
        if b'"usage":' not in data or b'"usage":null' in data:
            return False
        frame = _json_object(data)
        usage = frame.get("usage")
        if usage is None:
            return False
        self.usage = usage
        return not frame.get("choices")

    @property
    def truncated(self) -> bool:
        """The upstream ended without [DONE]: a broken stream, not a finished one."""
        return not self.done or self._decoder.pending


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        frame = json.loads(data)
    except ValueError:
        return {}
    return frame if isinstance(frame, dict) else {}
