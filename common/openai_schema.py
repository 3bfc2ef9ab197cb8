"""Pure validation of OpenAI generation requests.

Shared by cortex (before anything is routed) and neuron (before anything
is generated). Every failure names the offending field in `param`, so a
client can fix its request from the error alone. Unknown fields are
passed through: the OpenAI API grows faster than any gateway.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import invalid_json, invalid_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
STOP_SEQUENCES_MAX = 4
TOKENS_PER_REQUEST_MAX = 10**9
LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
# Far deeper than any real request (tool schemas nest about 10 deep), far
# below where re-encoding the body (Python's recursion limit) would fail.
JSON_DEPTH_MAX = 64
TOOLS_MAX = 128  # OpenAI's own bound on function tools per request
TOOL_CHOICE_MODES = ("none", "auto", "required")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass
class GenerationRequest:
    kind: Literal["chat", "completion"]
    model: str
    body: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    max_output_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    max_tokens_defaulted: bool = False  # /v1/completions' default of 16, not asked for
    tools: list[dict[str, Any]] = field(default_factory=list)  # chat: validated function tools
    tool_choice: str | dict[str, Any] | None = None  # chat: "none", "auto", "required" or a named function
    reasoning_effort: str | None = None  # chat: one of REASONING_EFFORTS


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no upstream can take it back
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def _deeper_than(value: Any, depth_max: int) -> bool:
    """True when containers nest more than `depth_max` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > depth_max:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body, bounded once here for every later use.

    Refused: invalid JSON, NaN and Infinity (not JSON, and an upstream's
    parser may choke on them), nesting past JSON_DEPTH_MAX (re-encoding it
    later would exhaust the stack), lone surrogates (no UTF-8 carries them).
    """
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, over-long integers
        raise invalid_json(str(exc)) from None
    except RecursionError:
        raise invalid_json("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    # Fewer brackets than the bound cannot nest past it: skip the walk for most bodies.
    if raw.count(b"[") + raw.count(b"{") > JSON_DEPTH_MAX and _deeper_than(body, JSON_DEPTH_MAX):
        raise invalid_json(f"the body nests deeper than {JSON_DEPTH_MAX} levels")
    if b"\\u" in raw:  # only escapes can smuggle in lone surrogates, which no UTF-8 can carry
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise invalid_json("the body contains a lone UTF-16 surrogate escape") from None
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid_request(f"'{name}' must be an integer, got {type(value).__name__}.", param=name)
    if not 1 <= value <= TOKENS_PER_REQUEST_MAX:
        raise invalid_request(f"'{name}' must be from 1 to {TOKENS_PER_REQUEST_MAX}, got {value}.", param=name)
    return value


def _number_in(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value) or not low <= value <= high:
        raise invalid_request(f"'{name}' must be a number between {low:g} and {high:g}.", param=name)


def _common(body: dict[str, Any]) -> tuple[str, bool, bool, list[str]]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("'model' is required and must be a non-empty string.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean.", param="stream")
    include_usage = _stream_options(body, stream)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid_request("Only 'n' = 1 is supported.", param="n")
    _number_in(body, "temperature", 0, 2)
    _number_in(body, "top_p", 0, 1)
    for name in ("presence_penalty", "frequency_penalty"):
        _number_in(body, name, -2, 2)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        raise invalid_request("'seed' must be a 64-bit integer.", param="seed")
    return model, stream, include_usage, _stop(body)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if not isinstance(options, dict):
        raise invalid_request("'stream_options' must be an object.", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid_request("'stream_options.include_usage' must be a boolean.", param="stream_options.include_usage")
    return include_usage


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > STOP_SEQUENCES_MAX
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise invalid_request(
            f"'stop' must be a non-empty string or a list of at most {STOP_SEQUENCES_MAX} non-empty strings.",
            param="stop",
        )
    return stop


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid_request(f"'{where}' must be an object.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise invalid_request(
            f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {role!r}.", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            return message
        raise invalid_request(f"'{where}.content' is required.", param=f"{where}.content")
    if isinstance(content, str):
        return message
    if not isinstance(content, list):
        raise invalid_request(f"'{where}.content' must be a string or a list of parts.", param=f"{where}.content")
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid_request(f"'{part_where}' must be an object with a string 'type'.", param=part_where)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise invalid_request(f"'{part_where}.text' must be a string.", param=f"{part_where}.text")
    return message


def chat_request(body: dict[str, Any]) -> GenerationRequest:
    model, stream, include_usage, stop = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid_request("'messages' is required and must be a list.", param="messages")
    if not messages:
        raise invalid_request("'messages' must contain at least one message.", param="messages")
    checked = [_message(i, m) for i, m in enumerate(messages)]
    max_tokens = _positive_int(body, "max_tokens")
    max_completion_tokens = _positive_int(body, "max_completion_tokens")
    limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
    tools = _tools(body.get("tools"))
    return GenerationRequest(
        "chat", model, body, stream, include_usage, limit, stop, messages=checked,
        tools=tools, tool_choice=_tool_choice(body.get("tool_choice"), tools),
        reasoning_effort=_reasoning_effort(body.get("reasoning_effort")),
    )


def _tools(value: Any) -> list[dict[str, Any]]:
    """Function tools, each `{"type": "function", "function": {"name", "description"?, "parameters"?}}`."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > TOOLS_MAX:
        raise invalid_request(f"'tools' must be a list of at most {TOOLS_MAX} function tools.", param="tools")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid_request(
                f"'{where}' must be an object with 'type': 'function' (the only tool type supported).", param=where
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid_request(f"'{where}.function' is required and must be an object.", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request(
                f"'{where}.function.name' is required and must be a non-empty string.", param=f"{where}.function.name"
            )
        for key, kind, label in (("description", str, "a string"), ("parameters", dict, "a JSON schema object")):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise invalid_request(f"'{where}.function.{key}' must be {label}.", param=f"{where}.function.{key}")
    return value


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in TOOL_CHOICE_MODES:
            raise invalid_request(
                f"'tool_choice' must be one of {', '.join(TOOL_CHOICE_MODES)} or a named function; got {value!r}.",
                param="tool_choice",
            )
        if value == "required" and not tools:
            raise invalid_request("'tool_choice' is 'required' but 'tools' is empty.", param="tool_choice")
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid_request(
            "'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
            param="tool_choice",
        )
    if all(tool["function"]["name"] != name for tool in tools):
        raise invalid_request(f"'tool_choice' names function {name!r}, which is not in 'tools'.", param="tool_choice")
    return value


def _reasoning_effort(value: Any) -> str | None:
    if value is not None and value not in REASONING_EFFORTS:
        raise invalid_request(
            f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}; got {value!r}.", param="reasoning_effort"
        )
    return value


def completion_request(body: dict[str, Any]) -> GenerationRequest:
    model, stream, include_usage, stop = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid_request("'prompt' is required and must be a string (or a list of one string).", param="prompt")
    for name in ("echo", "logprobs"):
        if body.get(name):
            raise invalid_request(f"'{name}' is not supported.", param=name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise invalid_request("Only 'best_of' = 1 is supported.", param="best_of")
    max_tokens = _positive_int(body, "max_tokens")
    defaulted = max_tokens is None
    if defaulted:
        max_tokens = LEGACY_COMPLETIONS_DEFAULT_MAX_TOKENS
    return GenerationRequest(
        "completion", model, body, stream, include_usage, max_tokens, stop, prompt=prompt, max_tokens_defaulted=defaulted
    )

