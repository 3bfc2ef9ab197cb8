"""The deterministic mock engine.

The reply is a pure function of (engine seed, request seed, rendered
prompt, token limit, stop sequences, and for chat the tool it calls and
the reasoning asked for): the same request always gets the same output.
Each token is one byte: text and reasoning are ASCII, tool arguments are
ASCII JSON, so the byte-level tokenizer is exact in both directions.
Pacing (time to first token, then a fixed interval per token) is separate
from the output, so the simulator can run the same engine in virtual time.

A reply is written in order: reasoning (when asked for), then either the
text or one tool call (its function name, then its arguments). The token
limit cuts that sequence as a prefix, the way a real model is cut: with
finish `length`, the arguments may stop mid-JSON. The function name is
never cut: a call whose name does not fit is not made at all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from common import counting
from neuron.engines.schema_args import arguments_json

WORDS = (
    "the", "quick", "model", "serves", "tokens", "under", "a", "hard", "budget", "and",
    "every", "request", "settles", "exactly", "once", "while", "neurons", "stream", "text",
    "to", "clients", "over", "trio", "nurseries", "with", "no", "orphan", "tasks", "so",
    "spend", "never", "passes", "its", "cap", "even", "when", "hosts", "fail", "or",
    "agents", "fan", "out", "thousands", "of", "calls", "at", "once", "gateway", "ledger",
)


@dataclass(frozen=True)
class Pacing:
    ttft_s: float = 0.0
    token_interval_s: float = 0.0

    def token_due(self, start: float, index: int) -> float:
        """When token `index` (0-based) may be emitted, on the same clock as `start`."""
        return start + self.ttft_s + index * self.token_interval_s


# Natural reasoning length by `reasoning_effort` ("none" asks for no reasoning).
REASONING_TOKENS = {"minimal": 16, "low": 32, "medium": 64, "high": 128, "xhigh": 256}


@dataclass(frozen=True)
class Tool:
    """A function the reply may call: its name and its JSON-schema parameters."""

    name: str
    parameters: Any = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # compact ASCII JSON; a prefix of it when the limit cut the call

    @property
    def tokens(self) -> int:
        return len(self.name.encode("utf-8")) + len(self.arguments)


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop", "length" or "tool_calls"
    reasoning: str | None = None  # None: not asked for; else the reasoning written (maybe "")
    tool_call: ToolCall | None = None

    @property
    def reasoning_tokens(self) -> int:
        return len(self.reasoning or "")  # ASCII only: one byte, one token

    @property
    def tokens(self) -> int:
        """Every output token: reasoning + text + the tool call's name and arguments, in bytes."""
        return self.reasoning_tokens + len(self.text) + (self.tool_call.tokens if self.tool_call else 0)


def _rng(engine_seed: int, request_seed: int | None, prompt: str, purpose: bytes = b"") -> random.Random:
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16)
    digest.update(engine_seed.to_bytes(8, "little", signed=True))
    digest.update((request_seed or 0).to_bytes(8, "little", signed=True))
    digest.update(purpose)  # b"" for the text: unchanged from before reasoning and tools
    return random.Random(int.from_bytes(digest.digest(), "little"))


def reply_text(engine_seed: int, request_seed: int | None, prompt: str, length: int, purpose: bytes = b"") -> str:
    rng = _rng(engine_seed, request_seed, prompt, purpose)
    words: list[str] = []
    size = -1  # the first word has no separating space
    while size < length:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)
    assert len(text) >= length
    return text[:length].capitalize()


def plan_reply(
    engine_seed: int,
    request_seed: int | None,
    prompt: str,
    natural_tokens: int,
    limit_tokens: int,
    stop: list[str],
) -> Reply:
    """The whole reply: a natural length cut by the token limit, then by `stop`."""
    assert natural_tokens >= 0 and limit_tokens >= 0
    length = min(natural_tokens, limit_tokens)
    text = reply_text(engine_seed, request_seed, prompt, length)
    finish = "length" if limit_tokens < natural_tokens else "stop"
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    return Reply(text, finish)


def plan_chat_reply(
    engine_seed: int,
    request_seed: int | None,
    prompt: str,
    natural_tokens: int,
    limit_tokens: int,
    stop: list[str],
    tool: Tool | None = None,
    reasoning_effort: str | None = None,
) -> Reply:
    """Reasoning (if asked for), then the text or a call of `tool`, all cut as one by the limit.

    Stop sequences apply to the text only. Without a tool and reasoning this
    is `plan_reply`, byte for byte.
    """
    reasoning_natural = REASONING_TOKENS.get(reasoning_effort or "none", 0)
    if tool is None and reasoning_natural == 0:
        return plan_reply(engine_seed, request_seed, prompt, natural_tokens, limit_tokens, stop)
    assert limit_tokens >= 0
    reasoning = None
    if reasoning_natural:
        reasoning = reply_text(engine_seed, request_seed, prompt, min(reasoning_natural, limit_tokens), b"reasoning")
        if reasoning_natural > limit_tokens:
            return Reply("", "length", reasoning)
    left = limit_tokens - len(reasoning or "")
    if tool is None:
        answer = plan_reply(engine_seed, request_seed, prompt, natural_tokens, left, stop)
        return Reply(answer.text, answer.finish_reason, reasoning)
    name_tokens = len(tool.name.encode("utf-8"))
    if name_tokens > left:  # a cut name would call another function: no call at all
        return Reply("", "length", reasoning)
    arguments = arguments_json(tool.parameters)
    call = ToolCall(call_id(engine_seed, request_seed, prompt), tool.name, arguments[: left - name_tokens])
    finish = "tool_calls" if len(call.arguments) == len(arguments) else "length"
    reply = Reply("", finish, reasoning, call)
    assert reply.tokens <= limit_tokens
    return reply


def call_id(engine_seed: int, request_seed: int | None, prompt: str) -> str:
    """`call_` and 24 hex digits, from the same seeds as the reply."""
    return f"call_{_rng(engine_seed, request_seed, prompt, b'call').getrandbits(96):024x}"


def choose_tool(
    tools: Sequence[dict[str, Any]], tool_choice: str | dict[str, Any] | None, messages: Sequence[dict[str, Any]]
) -> Tool | None:
    """The function the mock calls, if any, for validated `tools` and `tool_choice`.

    "none" (or no tools): no call. A named function: that one. "required":
    the first tool. "auto" (the default): the first tool, in `tools` order,
    whose name appears (case-sensitive) in the text of the last message,
    and only when that message is the user's; after a tool result the mock
    answers in text, so a tool round trip ends.
    """
    functions = [tool["function"] for tool in tools]
    if not functions or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        wanted = tool_choice["function"]["name"]
        function = next((f for f in functions if f["name"] == wanted), None)
    elif tool_choice == "required":
        function = functions[0]
    else:
        last = messages[-1] if messages else {}
        said = counting.message_text(last) if last.get("role") == "user" else ""
        function = next((f for f in functions if f["name"] in said), None)
    return Tool(function["name"], function.get("parameters")) if function else None


@dataclass(frozen=True)
class MockEngine:
    seed: int = 0
    reply_tokens: int = 256
    pacing: Pacing = Pacing()

    name = "mock"

    def plan(
        self,
        request_seed: int | None,
        prompt: str,
        limit_tokens: int,
        stop: list[str],
        tool: Tool | None = None,
        reasoning_effort: str | None = None,
    ) -> Reply:
        return plan_chat_reply(
            self.seed, request_seed, prompt, self.reply_tokens, limit_tokens, stop, tool, reasoning_effort
        )

    async def wait_for_token(self, start: float, index: int) -> None:
        """Pace token `index`; always a checkpoint, so cancellation lands at once."""
        due = self.pacing.token_due(start, index)
        if due > trio.current_time():
            await trio.sleep_until(due)
        else:
            await trio.lowlevel.checkpoint()
