"""A reply as the deltas of an OpenAI stream: a pure function, no I/O.

Each delta carries whole tokens in output order: `reasoning_content`
pieces, then `content` pieces, or the tool call: a first delta with its
index, id, type, function name and empty arguments, then
`function.arguments` pieces. Text, reasoning and argument pieces hold
`step` tokens each (the last of a run may hold fewer); the first tool
delta holds the name's tokens, however many. Pacing uses `last_token`,
the 0-based index of the delta's last token in the whole output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from neuron.engines.mock import Reply

TOOL_CALL_INDEX = 0  # one call per reply


@dataclass(frozen=True)
class Delta:
    fields: dict[str, Any]  # the chunk's `delta` object
    tokens: int
    last_token: int


def deltas(reply: Reply, step: int) -> Iterator[Delta]:
    assert step >= 1
    emitted = 0
    pieces = [("reasoning_content", reply.reasoning or ""), ("content", reply.text)]
    for key, text in pieces:
        for start in range(0, len(text), step):
            piece = text[start : start + step]
            emitted += len(piece)
            yield Delta({key: piece}, len(piece), emitted - 1)
    call = reply.tool_call
    if call is None:
        assert emitted == reply.tokens
        return
    name_tokens = len(call.name.encode("utf-8"))
    emitted += name_tokens
    head = {"index": TOOL_CALL_INDEX, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    yield Delta({"tool_calls": [head]}, name_tokens, emitted - 1)
    for start in range(0, len(call.arguments), step):
        piece = call.arguments[start : start + step]
        emitted += len(piece)
        yield Delta({"tool_calls": [{"index": TOOL_CALL_INDEX, "function": {"arguments": piece}}]}, len(piece), emitted - 1)
    assert emitted == reply.tokens
