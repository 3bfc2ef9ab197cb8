"""A whole OpenAI response assembled from its stream's chunks. Pure.

Under incremental output holds a non-streamed request is streamed from the
upstream, so that the output can be cut where the hold ends; the client then
gets the one JSON body the upstream would have sent: `chat.completion` (or
`text_completion`) with each choice's text, reasoning and tool calls joined
in order, its finish reason, and the usage frame.
"""

from __future__ import annotations

import json
from typing import Any

_TEXT = ("content", "reasoning_content", "reasoning", "refusal")


class StreamAssembler:
    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, Any] = {}  # id, created, model, system_fingerprint: from the first chunk
        self.usage: Any = None
        self._choices: dict[int, dict[str, Any]] = {}

    def feed(self, payloads: list[bytes]) -> None:
        """The `data:` of relayed events (the relay's `payloads`); [DONE] and non-JSON are skipped."""
        for data in payloads:
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                continue
            if isinstance(chunk, dict):
                self.feed_chunk(chunk)

    def feed_chunk(self, chunk: dict[str, Any]) -> None:
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk and name not in self.head:
                self.head[name] = chunk[name]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) and not isinstance(index, bool) else 0
            slot = self._choices.setdefault(index, {"text": {}, "tools": {}, "finish_reason": None, "logprobs": None})
            delta = choice.get("delta")  # chat chunks
            if isinstance(delta, dict):
                self._delta(slot, delta)
            if isinstance(choice.get("text"), str):  # completions chunks
                slot["text"]["text"] = slot["text"].get("text", "") + choice["text"]
            if choice.get("finish_reason") is not None:
                slot["finish_reason"] = choice["finish_reason"]

    @staticmethod
    def _delta(slot: dict[str, Any], delta: dict[str, Any]) -> None:
        for name in _TEXT:
            if isinstance(delta.get(name), str):
                slot["text"][name] = slot["text"].get(name, "") + delta[name]
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, dict):
                continue
            index = call.get("index", 0)
            tool = slot["tools"].setdefault(index, {"id": None, "type": "function", "name": "", "arguments": ""})
            if isinstance(call.get("id"), str):
                tool["id"] = call["id"]
            if isinstance(call.get("type"), str):
                tool["type"] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    tool["name"] += function["name"]
                if isinstance(function.get("arguments"), str):
                    tool["arguments"] += function["arguments"]

    def text(self) -> str:
        """Everything the chunks carried as output: text, reasoning, tool names and arguments."""
        parts: list[str] = []
        for slot in self._choices.values():
            parts += slot["text"].values()
            for tool in slot["tools"].values():
                parts += (tool["name"], tool["arguments"])
        return "".join(parts)

    def cut(self, finish_reason: str = "length") -> None:
        """Every choice ends here, with `finish_reason`: the output stopped where the hold did."""
        if not self._choices:
            self._choices[0] = {"text": {}, "tools": {}, "finish_reason": None, "logprobs": None}
        for slot in self._choices.values():
            slot["finish_reason"] = finish_reason

    def body(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            slot = self._choices[index]
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": slot["text"].get("content")}
                for name in _TEXT[1:]:
                    if name in slot["text"]:
                        message[name] = slot["text"][name]
                if slot["tools"]:
                    message["tool_calls"] = [
                        {"id": t["id"], "type": t["type"], "function": {"name": t["name"], "arguments": t["arguments"]}}
                        for _, t in sorted(slot["tools"].items())
                    ]
                choices.append({"index": index, "message": message, "logprobs": None,
                                "finish_reason": slot["finish_reason"]})
            else:
                choices.append({"index": index, "text": slot["text"].get("text", ""), "logprobs": None,
                                "finish_reason": slot["finish_reason"]})
        body: dict[str, Any] = {
            "id": self.head.get("id", ""), "object": "chat.completion" if self.chat else "text_completion",
            "created": self.head.get("created", 0), "model": self.head.get("model", ""), "choices": choices,
        }
        if "system_fingerprint" in self.head:
            body["system_fingerprint"] = self.head["system_fingerprint"]
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def cut_events(head: dict[str, Any], chat: bool, usage: dict[str, Any] | None) -> list[bytes]:
    """The `data:` payloads that end a cut stream cleanly: each choice's finish (`length`), the usage
    frame (when the client asked for one) and [DONE], in the stream's own ids."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["delta"] = {}
    else:
        choice["text"] = ""
    base = {
        "id": head.get("id", ""), "object": "chat.completion.chunk" if chat else "text_completion",
        "created": head.get("created", 0), "model": head.get("model", ""),
    }
    events = [json.dumps({**base, "choices": [choice]}, separators=(",", ":")).encode()]
    if usage is not None:
        events.append(json.dumps({**base, "choices": [], "usage": usage}, separators=(",", ":")).encode())
    events.append(b"[DONE]")
    return events
