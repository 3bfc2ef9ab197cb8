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
            buffer = buffer.replace(b"\r\n", b"\n")
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
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def output_tokens(frame: dict[str, Any]) -> int:
    """Output tokens in one chunk, counted as UTF-8 bytes of its text.

    Exact for neuron's byte-level tokenizer and an upper bound for any
    tokenizer whose tokens cover at least a byte each, so a charge made
    from this count never falls below what the client received.
    """
    total = 0
    for choice in frame.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            total += len(text.encode())
        for call in (delta.get("tool_calls") if isinstance(delta, dict) else None) or ():
            arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            if isinstance(arguments, str):
                total += len(arguments.encode())
    return total


_TEXT_KEYS = (b'"content":"', b'"text":"')


def chunk_output_tokens(data: bytes) -> int:
    """`output_tokens` of one chunk's JSON, without parsing it in the common case.

    A chunk with one plain text field (no escapes, no tool calls) is
    counted by slicing; anything else takes the JSON path. Inside a JSON
    string a quote is always escaped, so the key pattern cannot be faked.
    """
    if b"\\" not in data and b'"tool_calls"' not in data:
        for key in _TEXT_KEYS:
            start = data.find(key)
            if start >= 0:
                start += len(key)
                end = data.find(b'"', start)
                if end >= 0 and data.find(key, end) < 0:
                    return end - start
    return output_tokens(_json_object(data))


@dataclass
class StreamRelay:
    client_wants_usage: bool
    usage: dict[str, Any] | None = None
    done: bool = False
    data_events: int = 0  # data events relayed, usage frame and [DONE] excluded
    output_tokens: int = 0  # counted from the relayed chunks

    def __post_init__(self) -> None:
        self._decoder = SSEDecoder()

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in; the bytes to write to the client out (maybe b"")."""
        out = []
        for event in self._decoder.feed(chunk):
            data = event_data(event)
            if data == DONE:
                self.done = True
            elif data:
                if b'"usage":{' in data and self._is_usage_frame(_json_object(data)) and not self.client_wants_usage:
                    continue
                self.data_events += 1
                self.output_tokens += chunk_output_tokens(data)
            out.append(event)
        return b"".join(out)

    def _is_usage_frame(self, frame: dict[str, Any]) -> bool:
        """Record usage; True for a usage-only frame (no choices)."""
        usage = frame.get("usage")
        if not isinstance(usage, dict):
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
