"""The Anthropic Messages surface, as one pure translator. No I/O, no clock.

Anthropic in, OpenAI chat out, and back: `to_openai` validates a Messages
body and builds the OpenAI chat request cortex dispatches; `from_openai`
turns a chat.completion into a `message`; `StreamTranslator` turns the
upstream's chat.completion.chunk stream into Anthropic's event stream; the
`error_*` functions render any `ApiError` in Anthropic's shape.

Documented choices:

* `thinking` (`enabled` with `budget_tokens`, or `adaptive`) becomes OpenAI's
  `reasoning_effort`: a budget under 4096 is "low", under 16384 "medium",
  more is "high"; `adaptive` is "high" (Anthropic's default effort).
  Upstreams that want another switch (`chat_template_kwargs`) map it in
  their kind adapter. Reasoning comes back as `thinking` blocks only when
  the client asked for thinking; it is never turned into visible text.
* Unknown top-level fields are ignored, never an error: Anthropic's beta
  features (`context_management`, `output_config`, `service_tier`,
  `container`, `mcp_servers`...) appear faster than any gateway follows
  them. `cache_control` markers are ignored wherever they sit.
* Consecutive turns of one role are merged, as Anthropic does, so strict
  chat templates always see alternating turns.
* The upstream has no error flag for tool results: `is_error` is checked
  and dropped; the result's own text says what failed. Images inside a
  tool result follow the tool message as user content, since OpenAI tool
  messages carry text only.
* A stop-sequence hit is `stop_sequence` only when the upstream names the
  sequence (vLLM's choice `stop_reason`); plain OpenAI cannot say, so it
  reads `end_turn`.
* Streamed blocks are sequential, as Anthropic's are: a new block closes
  the open one. An upstream that interleaves the arguments of parallel
  tool calls (none known does) loses the late ones; they are counted in
  `StreamTranslator.lost_tool_deltas`.
* Whatever the upstream sends, the translator never raises: a string
  holding a lone surrogate (JSON `"\\udc80"`) counts its 3 bytes and goes
  out JSON-escaped, and output in an unexpected shape (content as a list
  of parts, tool arguments as an object) counts at its JSON size, so
  `output_tokens` is always an upper bound of what the client received.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from common.asgi import encode_json
from common.errors import ApiError
from common.openai_schema import STOP_SEQUENCES_MAX, TOKENS_PER_REQUEST_MAX, GenerationRequest, chat_request
from cortex.budget.estimate import prompt_tokens_bound
from cortex.fleet.registry import ModelInfo
from cortex.relay import DONE, SSEDecoder, SSEProtocolError, event_data

ROLES = ("user", "assistant")
THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})
BLOCK_TYPES = frozenset({"text", "image", "document", "tool_use", "tool_result"}) | THINKING_BLOCKS
IMAGE_SIGNATURES = {  # media type -> how its bytes start; checked so a bad image is our 400, not an upstream crash
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
EFFORT_BY_BUDGET = ((4096, "low"), (16384, "medium"))  # budget_tokens below the bound -> effort
EFFORT_ABOVE = "high"
ADAPTIVE_EFFORT = "high"
OVERLOADED_STATUS = 529  # Anthropic's "no capacity" status, which its SDKs retry
SPEND_LIMIT_CODE = "enforced_spend_limit_reached"
UNPARSED_ARGUMENTS_KEY = "_raw_arguments"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_OPENAI_CONTEXT = re.compile(
    r"maximum context length is (\d+) tokens\. However, you requested \d+ tokens \((\d+) in the messages, (\d+) in"
)


def _bad(param: str, message: str) -> ApiError:
    # Anthropic's envelope has no `param`: the path leads the message so a client sees which field.
    return ApiError(400, f"{param}: {message}", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- requests: Anthropic in, OpenAI chat out ------------------------------------------


@dataclass(frozen=True)
class AnthropicRequest:
    model: str  # as the client named it: echoed in every reply
    stream: bool
    stop_sequences: tuple[str, ...]
    thinking: bool  # the client asked for thinking blocks
    gen: GenerationRequest  # the OpenAI chat request to dispatch; gen.body is the upstream payload


def to_openai(body: dict[str, Any]) -> AnthropicRequest:
    """Validate a `POST /v1/messages` body and translate it; every failure a 400 naming the field."""
    return _translate(body, count_only=False)


def count_tokens_request(body: dict[str, Any]) -> AnthropicRequest:
    """The same for `POST /v1/messages/count_tokens`, whose body has no `max_tokens`."""
    return _translate(body, count_only=True)


def count_tokens_body(request: AnthropicRequest, model: ModelInfo | None = None, exact: int | None = None) -> dict[str, int]:
    """`{"input_tokens": N}`: what the budget reserves for the same request's prompt (the exact
    count on the model's own tokenizer where the catalogue names it, else the bound)."""
    return {"input_tokens": exact if exact is not None else prompt_tokens_bound(request.gen, model)}


def _translate(body: dict[str, Any], count_only: bool) -> AnthropicRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required, a non-empty string.")
    max_tokens = _max_tokens(body.get("max_tokens"), required=not count_only)
    stream = False if count_only else _stream(body.get("stream"))
    openai: dict[str, Any] = {"model": model, "messages": _system(body.get("system")) + _messages(body.get("messages"))}
    if max_tokens is not None:
        openai["max_tokens"] = max_tokens
    _tools_and_choice(body, openai)
    stop = _stop_sequences(body.get("stop_sequences"))
    if stop:
        openai["stop"] = list(stop)
    _sampling(body, openai)
    _metadata(body.get("metadata"), openai)
    effort = _reasoning_effort(body.get("thinking"))
    if effort is not None:
        openai["reasoning_effort"] = effort
    if stream:  # the stream translator needs the usage frame for message_delta
        openai.update(stream=True, stream_options={"include_usage": True})
    return AnthropicRequest(model, stream, stop, effort is not None, chat_request(openai))


def _max_tokens(value: Any, required: bool) -> int | None:
    if value is None and not required:
        return None
    if not _is_int(value) or not 1 <= value <= TOKENS_PER_REQUEST_MAX:
        raise _bad("max_tokens", f"required, an integer from 1 to {TOKENS_PER_REQUEST_MAX}.")
    return value


def _stream(value: Any) -> bool:
    if value is not None and not isinstance(value, bool):
        raise _bad("stream", "must be a boolean.")
    return bool(value)


def _system(value: Any) -> list[dict[str, Any]]:
    """One leading system message, verbatim; nothing when there is no system prompt."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}]
    if not isinstance(value, list):
        raise _bad("system", "must be a string or a list of text blocks.")
    parts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"system.{i}", "system blocks must be text blocks.")
        parts.append(_text(f"system.{i}", block))
    return [{"role": "system", "content": _content(parts)}]


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text part as a plain string (what every template takes); otherwise the parts."""
    if not parts:
        return ""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


@dataclass
class _Turn:
    role: str
    blocks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (param path, block)
    first: int = 0  # index of the first message merged into it


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad("messages", "required, a list of messages.")
    if not value:
        raise _bad("messages", "must contain at least one message.")
    out: list[dict[str, Any]] = []
    asked: dict[str, str] = {}  # tool_use id -> where the previous assistant turn asked for it
    for turn in _turns(value):
        if turn.role == "assistant":
            message, asked = _assistant(turn)
            out.append(message)
        else:
            out.extend(_user_turn(turn, asked))
            _all_answered(asked)
            asked = {}
    _all_answered(asked)
    return out


def _turns(messages: list[Any]) -> list[_Turn]:
    """Validate each message's shape and merge consecutive same-role ones."""
    turns: list[_Turn] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(where, "each message must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be 'user' or 'assistant', got {role!r}.")
        blocks = _blocks(where, message.get("content"), may_be_empty=i == last and role == "assistant")
        if i == 0 and role != "user":  # chat templates that check turn order refuse an assistant opening
            raise _bad(f"{where}.role", "the first message must use the 'user' role.")
        if not turns or turns[-1].role != role:
            turns.append(_Turn(role, first=i))
        turns[-1].blocks.extend(blocks)
    return turns


def _blocks(where: str, content: Any, may_be_empty: bool) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(content, str):
        blocks = [(f"{where}.content", {"type": "text", "text": content})] if content else []
    elif isinstance(content, list):
        blocks = [(f"{where}.content.{j}", block) for j, block in enumerate(content)]
    else:
        raise _bad(f"{where}.content", "required, a string or a list of content blocks.")
    if not blocks and not may_be_empty:
        raise _bad(where, "all messages must have non-empty content except for the optional final assistant message.")
    return blocks


def _block_type(path: str, block: Any) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise _bad(path, "each content block must be an object with a string 'type'.")
    kind = block["type"]
    if kind not in BLOCK_TYPES:
        raise _bad(
            f"{path}.type",
            f"unknown content block type {kind!r}; cortex accepts text, image, tool_use, tool_result, "
            "thinking, redacted_thinking and plain-text document blocks.",
        )
    return kind


def _assistant(turn: _Turn) -> tuple[dict[str, Any], dict[str, str]]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    asked: dict[str, str] = {}
    for path, block in turn.blocks:
        kind = _block_type(path, block)
        if kind == "text":
            parts.append(_text(path, block))
        elif kind == "tool_use":
            call = _tool_call(path, block)
            if call["id"] in asked:
                raise _bad(f"{path}.id", f"tool_use id {call['id']!r} is used twice.")
            asked[call["id"]] = f"messages.{turn.first}"
            calls.append(call)
        elif kind not in THINKING_BLOCKS:  # thinking from earlier turns is dropped, never replayed as text
            raise _bad(path, f"{kind} blocks belong in user messages, not assistant ones.")
    message: dict[str, Any] = {"role": "assistant", "content": _content(parts) if parts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message, asked


def _user_turn(turn: _Turn, asked: dict[str, str]) -> list[dict[str, Any]]:
    """Tool results first (they must follow the assistant's calls), then the user's own content."""
    results: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []  # images from tool results: OpenAI tool messages carry text only
    parts: list[dict[str, Any]] = []
    for path, block in turn.blocks:
        kind = _block_type(path, block)
        if kind == "tool_result":
            result, images = _tool_result(path, block, asked)
            results.append(result)
            moved.extend(images)
        elif kind == "tool_use":
            raise _bad(path, "tool_use blocks belong in assistant messages.")
        elif kind not in THINKING_BLOCKS:
            parts.extend(_user_part(path, kind, block))
    user = [{"role": "user", "content": _content(moved + parts)}] if moved or parts else []
    return results + user


def _all_answered(asked: dict[str, str]) -> None:
    if asked:
        where = next(iter(asked.values()))
        raise _bad(
            where,
            f"tool_use ids were found without tool_result blocks immediately after: {', '.join(asked)}. "
            "Each tool_use block must have a corresponding tool_result block in the next message.",
        )


def _user_part(path: str, kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
    if kind == "text":
        return [_text(path, block)]
    if kind == "image":
        return [_image(path, block)]
    return _document(path, block)


def _text(path: str, block: dict[str, Any]) -> dict[str, Any]:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{path}.text", "required, a string.")
    return {"type": "text", "text": text}


def _image(path: str, block: dict[str, Any]) -> dict[str, Any]:
    where = f"{path}.source"
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(where, "required, an object of type 'base64' or 'url'.")
    kind = source.get("type")
    if kind == "base64":
        url = _data_uri(where, source)
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise _bad(f"{where}.url", "required, an http(s) URL.")
    else:
        raise _bad(f"{where}.type", f"image sources must be 'base64' or 'url', got {kind!r}.")
    return {"type": "image_url", "image_url": {"url": url}}


def _data_uri(where: str, source: dict[str, Any]) -> str:
    media = source.get("media_type")
    if media not in IMAGE_SIGNATURES:
        raise _bad(f"{where}.media_type", f"must be one of {', '.join(IMAGE_SIGNATURES)}, got {media!r}.")
    data = source.get("data")
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) and data else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise _bad(f"{where}.data", "required, non-empty base64 image data.")
    if not raw.startswith(IMAGE_SIGNATURES[media]) or (media == "image/webp" and raw[8:12] != b"WEBP"):
        raise _bad(f"{where}.data", f"the image data is not a valid {media} image.")
    return f"data:{media};base64,{data}"


def _document(path: str, block: dict[str, Any]) -> list[dict[str, Any]]:
    """Plain-text documents become text; anything else (PDFs) is refused, not silently lost."""
    where = f"{path}.source"
    source = block.get("source")
    refusal = _bad(where, "only plain-text documents are supported (source type 'text', or 'content' of text blocks).")
    if not isinstance(source, dict):
        raise refusal
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        if source.get("media_type", "text/plain") != "text/plain":
            raise refusal
        return [{"type": "text", "text": source["data"]}]
    if source.get("type") == "content":
        content = source.get("content")
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
            return [_text(f"{where}.content.{k}", b) for k, b in enumerate(content)]
    raise refusal


def _tool_call(path: str, block: dict[str, Any]) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{path}.id", "required, a non-empty string.")
    if not isinstance(name, str) or not name:
        raise _bad(f"{path}.name", "required, a non-empty string.")
    if not isinstance(arguments, dict):
        raise _bad(f"{path}.input", "required, an object.")
    encoded = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": encoded}}


Parts = list[dict[str, Any]]


def _tool_result(path: str, block: dict[str, Any], asked: dict[str, str]) -> tuple[dict[str, Any], Parts]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or asked.pop(call_id, None) is None:
        raise _bad(
            f"{path}.tool_use_id",
            f"no tool_use block with id {call_id!r} in the assistant message right before; "
            "each tool_result must answer a tool_use from the previous turn, once.",
        )
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _bad(f"{path}.is_error", "must be a boolean.")
    texts, images = _result_content(f"{path}.content", block.get("content"))
    return {"role": "tool", "tool_call_id": call_id, "content": _content(texts)}, images


def _result_content(where: str, content: Any) -> tuple[Parts, Parts]:
    if content is None or content == "":
        return [], []
    if isinstance(content, str):
        return [{"type": "text", "text": content}], []
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of text and image blocks.")
    texts: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for k, block in enumerate(content):
        path = f"{where}.{k}"
        kind = _block_type(path, block)
        if kind not in ("text", "image", "document"):
            raise _bad(f"{path}.type", f"tool_result content may hold text, image and document blocks, not {kind}.")
        part = _user_part(path, kind, block)
        (images if kind == "image" else texts).extend(part)
    return texts, images


def _tools_and_choice(body: dict[str, Any], openai: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "must be a list of tools.")
    functions = [_tool(f"tools.{i}", tool) for i, tool in enumerate(tools or ())]
    names = [f["function"]["name"] for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tools", "tool names must be unique.")
    if functions:
        openai["tools"] = functions
    _tool_choice(body.get("tool_choice"), frozenset(names), openai)


def _tool(path: str, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise _bad(path, "each tool must be an object.")
    kind, name = tool.get("type"), tool.get("name")
    if kind not in (None, "custom"):
        raise _bad(
            f"{path}.type",
            f"server tool {name!r} (type {kind!r}) is not supported: cortex serves open-weight models and runs "
            "no tools itself. Declare it as a custom tool with an input_schema and run it in the client.",
        )
    if not isinstance(name, str) or not name:
        raise _bad(f"{path}.name", "required, a non-empty string.")
    schema, description = tool.get("input_schema"), tool.get("description")
    if not isinstance(schema, dict):
        raise _bad(f"{path}.input_schema", "required, a JSON schema object.")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{path}.description", "must be a string.")
    function: dict[str, Any] = {"name": name, "parameters": schema}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _tool_choice(value: Any, names: frozenset[str], openai: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad("tool_choice", "must be an object with a 'type'.")
    kind = value.get("type")
    choice: str | dict[str, Any]
    if kind == "tool":
        name = value.get("name")
        if name not in names:
            raise _bad("tool_choice.name", f"no tool named {name!r} in 'tools'.")
        choice = {"type": "function", "function": {"name": name}}
    elif kind in ("auto", "any", "none"):
        choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise _bad("tool_choice.type", f"must be 'auto', 'any', 'tool' or 'none', got {kind!r}.")
    if not names:
        if kind == "any":
            raise _bad("tool_choice", "'any' needs at least one tool in 'tools'.")
        return  # auto/none without tools mean nothing, and upstreams refuse tool_choice alone
    openai["tool_choice"] = choice
    disable = value.get("disable_parallel_tool_use")
    if disable is not None:
        if not isinstance(disable, bool):
            raise _bad("tool_choice.disable_parallel_tool_use", "must be a boolean.")
        openai["parallel_tool_calls"] = not disable


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > STOP_SEQUENCES_MAX
        or not all(isinstance(s, str) and s for s in value)
    ):
        raise _bad("stop_sequences", f"must be a list of at most {STOP_SEQUENCES_MAX} non-empty strings.")
    return tuple(value)


def _sampling(body: dict[str, Any], openai: dict[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise _bad(name, "must be a number from 0 to 1.")
        openai[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise _bad("top_k", "must be a non-negative integer.")
        openai["top_k"] = top_k


def _metadata(metadata: Any, openai: dict[str, Any]) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _bad("metadata", "must be an object.")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise _bad("metadata.user_id", "must be a string.")
    if user_id:
        openai["user"] = user_id


def _reasoning_effort(thinking: Any) -> str | None:
    if thinking is None:
        return None
    if not isinstance(thinking, dict):
        raise _bad("thinking", "must be an object with a 'type'.")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return ADAPTIVE_EFFORT
    if kind != "enabled":
        raise _bad("thinking.type", f"must be 'enabled', 'adaptive' or 'disabled', got {kind!r}.")
    budget = thinking.get("budget_tokens")
    if not _is_int(budget) or not 1 <= budget <= TOKENS_PER_REQUEST_MAX:
        raise _bad("thinking.budget_tokens", "required with 'enabled', a positive integer.")
    return next((effort for bound, effort in EFFORT_BY_BUDGET if budget < bound), EFFORT_ABOVE)


# --- responses: OpenAI chat in, Anthropic message out ---------------------------------


def message_id_for(request_id: str) -> str:
    """The `msg_` id of the reply to a request, from cortex's request id."""
    return "msg_" + _ID_UNSAFE.sub("_", request_id)


def from_openai(completion: Any, request: AnthropicRequest, message_id: str | None = None) -> dict[str, Any]:
    """A chat.completion as an Anthropic `message`. Never raises: malformed parts degrade, none are dropped."""
    body = completion if isinstance(completion, dict) else {}
    mid = message_id or "msg_" + _ID_UNSAFE.sub("_", str(body.get("id") or "cortex"))
    choice = _first_choice(body.get("choices"))
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    blocks: list[dict[str, Any]] = []
    reasoning = _reasoning(message)
    if reasoning and request.thinking:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    content = message.get("content")
    text = _message_text(content)
    if text:
        blocks.append({"type": "text", "text": text})
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    for i, call in enumerate(c for c in calls if isinstance(c, dict)):
        blocks.append(_tool_use(call, mid, i))
    used_tool = any(b["type"] == "tool_use" for b in blocks)
    finish, matched = choice.get("finish_reason"), choice.get("stop_reason")
    stop_reason, stop_sequence = _stop_reason(finish, matched, request, used_tool)
    counted = _size(reasoning) + _size(content) + sum(_size(_arguments(c)) for c in calls)
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": anthropic_usage(body.get("usage"), counted),
    }


def _first_choice(choices: Any) -> dict[str, Any]:
    """The n=1 choice: index 0, or the first one when the upstream left indexes out."""
    if not isinstance(choices, list):
        return {}
    found = [c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0]
    return found[0] if found else {}


def _reasoning(message: dict[str, Any]) -> str:
    # vLLM and llama.cpp say `reasoning_content`; newer vLLM, Ollama and OpenRouter say `reasoning`.
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some upstreams answer in parts
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    return function.get("arguments") if isinstance(function, dict) else None


def _size(value: Any) -> int:
    """UTF-8 bytes of an upstream value, never raising: a string as itself (a lone surrogate
    counts 3 bytes), None as nothing, anything else at its compact JSON size, which is at
    least the text a client can get out of it (content parts, arguments as an object)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if value is None:
        return 0
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):  # not JSON (feed_chunk takes any object)
        try:
            text = repr(value)
        except RecursionError:
            return 0
    return len(text.encode("utf-8", "surrogatepass"))


def _json_str(text: str) -> bytes:
    """One string as JSON, as `encode_json` writes it inside a value whose other strings
    are ASCII: raw UTF-8, or \\u-escaped where a lone surrogate has no UTF-8."""
    try:
        return encode_basestring(text).encode()
    except UnicodeEncodeError:
        return encode_basestring_ascii(text).encode()


def _tool_use(call: dict[str, Any], mid: str, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    call_id = tool_use_id(call.get("id"), mid, i)
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input(function.get("arguments"))}


def tool_use_id(upstream_id: Any, mid: str, i: int) -> str:
    """A `toolu_` id: the upstream's (made safe), else one derived from the message id and position."""
    if isinstance(upstream_id, str) and upstream_id:
        safe = _ID_UNSAFE.sub("_", upstream_id)
        return safe if safe.startswith("toolu_") else "toolu_" + safe
    return f"toolu_{mid.removeprefix('msg_')}_{i}"


def tool_input(arguments: Any) -> dict[str, Any]:
    """Tool arguments as the object Anthropic's `input` must be.

    Empty means no arguments. A JSON string holding JSON (double-encoded by
    some models) is unwrapped once. Anything else that is not an object is
    kept verbatim under UNPARSED_ARGUMENTS_KEY: the client's schema check
    then reports it to the model, which can retry, rather than the call
    vanishing.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    value: Any = arguments
    for _ in range(2):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            break
        if not isinstance(value, str):
            break
    return value if isinstance(value, dict) else {UNPARSED_ARGUMENTS_KEY: arguments}


def _stop_reason(finish: Any, matched: Any, request: AnthropicRequest, used_tool: bool) -> tuple[str, str | None]:
    """OpenAI finish_reason -> Anthropic stop_reason and stop_sequence.

    OpenAI does not say which stop sequence matched; vLLM does, in the
    choice's `stop_reason`. Without it a stop-sequence hit reads `end_turn`.
    """
    if finish == "length":
        return "max_tokens", None
    if finish in ("tool_calls", "function_call") or used_tool:  # some upstreams finish tool calls with "stop"
        return "tool_use", None
    if finish == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in request.stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def anthropic_usage(usage: Any, counted_output_tokens: int = 0, input_tokens_hint: int = 0) -> dict[str, int]:
    """OpenAI usage -> Anthropic usage; the counts cortex made stand in for missing ones.

    Anthropic's `input_tokens` excludes cache reads (clients add them
    back), while OpenAI's `prompt_tokens` includes `cached_tokens`.
    """
    raw = usage if isinstance(usage, dict) else {}
    prompt = _count(raw.get("prompt_tokens"), input_tokens_hint)
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    out = {"input_tokens": prompt, "output_tokens": _count(raw.get("completion_tokens"), counted_output_tokens)}
    if _is_int(cached) and cached >= 0:
        out["input_tokens"] = max(0, prompt - cached)
        out["cache_read_input_tokens"] = cached
    return out


def _count(value: Any, fallback: int) -> int:
    return value if _is_int(value) and value >= 0 else fallback


# --- streaming: chunks in, Anthropic events out ---------------------------------------


def sse_event(payload: dict[str, Any]) -> bytes:
    """One Anthropic SSE event: the `event:` line names the payload's type."""
    return b"event: " + payload["type"].encode() + b"\ndata: " + encode_json(payload) + b"\n\n"


PING = sse_event({"type": "ping"})

# Each block kind's one delta (thinking's closing signature_delta aside) as a bytes template,
# `sse_event` of it byte for byte: only the string is JSON-encoded per delta.
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"%s","%s":'
_DELTA_FIELDS = {  # block kind -> (delta type, its string field)
    "text": (b"text_delta", b"text"),
    "thinking": (b"thinking_delta", b"thinking"),
    "tool": (b"input_json_delta", b"partial_json"),
}
_DELTA_END = b"}}\n\n"
_TEXT_START = {"type": "text", "text": ""}
_THINKING_START = {"type": "thinking", "thinking": "", "signature": ""}

# The common chunk, a lone text delta (neuron's and vLLM's shape), read without parsing:
# `<head>,"choices":[{"index":0,"delta":{"content":"<text>"}<tail>` where the head holds none
# of the keys the translator reads and the text needs no escapes. Anything else is parsed.
_TEXT_MARK = b',"choices":[{"index":0,"delta":{"content":"'
_TEXT_TAILS = frozenset(
    b'"}' + logprobs + b',"finish_reason":null}]' + usage + b"}"
    for logprobs in (b"", b',"logprobs":null')
    for usage in (b"", b',"usage":null')
)
_TEXT_UNSAFE = re.compile(rb"[\x00-\x1f\\]")  # bytes a JSON string never holds raw, or that start an escape
_CHUNK_KEYS = frozenset({"choices", "usage", "error"})


@dataclass
class _ToolCall:
    id: Any = None
    name: str = ""
    pending: str = ""  # arguments not yet sent: the block cannot start before the name is known
    index: int | None = None  # its content block, once started
    closed: bool = False


class StreamTranslator:
    """OpenAI chat.completion.chunk stream in, Anthropic Messages events out. Pure; never raises.

    Order: message_start; per block content_block_start, deltas,
    content_block_stop (one block open at a time, each tool call its own
    block); message_delta; message_stop. Or, if the upstream failed, an
    `error` event, after which nothing more is sent. Feed upstream bytes
    with `feed` (or parsed chunks with `feed_chunk`), then call `finish`
    when the upstream body ends, however it ends.
    """

    def __init__(self, request: AnthropicRequest, message_id: str, input_tokens: int = 0) -> None:
        self._request = request
        self._id = message_id
        self._input_tokens_hint = input_tokens
        self._decoder = SSEDecoder()
        self._started = False
        self._open: tuple[str, int] | None = None  # (kind, block index) of the open block
        self._open_tool: _ToolCall | None = None  # the call whose block is open, if a tool block is
        self._blocks = 0
        self._tools: dict[int, _ToolCall] = {}  # in the order the upstream began them
        self._slots: dict[int | None, int] = {}  # the upstream's tool-call index -> the call now on it
        self._matched: str | None = None
        self._delta_head = b""  # _DELTA_HEAD for the open block
        self._head: bytes | None = None  # the last chunk head _plain_head accepted (constant in a stream)
        self.done = False  # message_stop or error sent: the stream is over
        self.upstream_done = False  # [DONE] seen
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.failed: str | None = None  # why the stream ended in an error event
        self.usage: dict[str, Any] | None = None  # the upstream's OpenAI usage, for the meter
        self.output_tokens = 0  # UTF-8 bytes of text, reasoning and tool arguments the upstream produced
        self.lost_tool_deltas = 0  # argument deltas for a tool call whose block had closed (interleaving upstream)

    # -- public ---------------------------------------------------------------------

    def start(self) -> bytes:
        """message_start, once: send it with the headers so the client hears at once."""
        if self._started or self.done:
            return b""
        self._started = True
        usage = {"input_tokens": self._input_tokens_hint, "output_tokens": 0}
        message = {
            "id": self._id, "type": "message", "role": "assistant", "model": self._request.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage,
        }
        return sse_event({"type": "message_start", "message": message})

    def ping(self) -> bytes:
        """A keep-alive for a silent upstream (long prefill, cold load, queue)."""
        return b"" if self.done else self.start() + PING

    def feed(self, data: bytes) -> bytes:
        """Upstream SSE bytes in, client bytes out (maybe b"")."""
        if self.done:
            return b""
        try:
            events = self._decoder.feed(data)
        except SSEProtocolError as exc:
            return self._fail(f"The upstream stream broke: {exc}")
        return self.feed_payloads([event_data(event) for event in events])

    def feed_payloads(self, payloads: list[bytes]) -> bytes:
        """The `data:` payloads of whole events in (as the relay split them), client bytes out."""
        out: list[bytes] = []
        for payload in payloads:
            if self.done:  # an error event or message_stop ended it mid-read: the rest is not ours to send
                break
            if payload == DONE:
                self.upstream_done = True
                out.append(self._close())
            elif payload and not self._plain_text(payload, out):
                out.append(self.feed_chunk(_json_value(payload)))
        return b"".join(out)

    def feed_chunk(self, chunk: Any) -> bytes:
        """One parsed chat.completion.chunk in; anything that is not one is ignored."""
        if self.done or not isinstance(chunk, dict):
            return b""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if chunk.get("error") is not None and not chunk.get("choices"):
            return self._fail(_upstream_message(chunk["error"]))
        choice = _first_choice(chunk.get("choices"))
        out: list[bytes] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._delta(delta, out)
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("stop_reason"), str):  # vLLM names the stop sequence that matched
            self._matched = choice["stop_reason"]
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream body ended: close normally if it finished, else an error event."""
        if self.done:
            return b""
        if self.upstream_done or self.finish_reason is not None:
            return self._close()  # a missing [DONE] or usage frame does not make an answer incomplete
        return self._fail("The upstream ended the stream before the reply was complete.")

    def error_event(self, err: ApiError) -> bytes:
        """End the stream with Anthropic's `error` event (headers are gone: no status to change)."""
        if self.done:
            return b""
        self.done, self.failed = True, err.message
        return error_event(err)

    # -- deltas -----------------------------------------------------------------------

    def _plain_text(self, payload: bytes, out: list[bytes]) -> bool:
        """The common text-only chunk, without parsing it; False: not one, parse it.

        True only where parsing would give a chunk whose one effect is that text delta:
        the head before `"choices"` is checked to be an object's start with no key
        feed_chunk reads (once a stream: heads repeat), the tail is one of the known
        ones, and the text holds no quote, escape or control byte and is valid UTF-8.
        """
        mark = payload.find(_TEXT_MARK)
        if mark < 0:
            return False
        start = mark + len(_TEXT_MARK)
        end = payload.find(b'"', start)
        if end < 0 or payload[end:] not in _TEXT_TAILS:
            return False
        text = payload[start:end]
        if _TEXT_UNSAFE.search(text) is not None:
            return False
        if not text.isascii():
            try:
                text.decode()  # strict: invalid UTF-8 and encoded surrogates take the parser's path
            except UnicodeDecodeError:
                return False
        head = self._head
        if head is None or mark != len(head) or not payload.startswith(head):
            if not _plain_head(payload[:mark]):
                return False
            self._head = payload[:mark]
        if text:
            self._text(b'"' + text + b'"', len(text), out)
        return True

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = _reasoning(delta)
        if reasoning:
            self.output_tokens += _size(reasoning)
            if self._request.thinking:  # otherwise dropped: reasoning is never shown as text
                self._block("thinking", _THINKING_START, out)
                out.append(self._delta_head + _json_str(reasoning) + _DELTA_END)
        text = delta.get("content")
        if isinstance(text, str):
            if text:
                self._text(_json_str(text), _size(text), out)
        elif text is not None:  # parts or any other shape: not streamed as text, still counted
            self.output_tokens += _size(text)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool_delta(call, out)

    def _text(self, encoded: bytes, size: int, out: list[bytes]) -> None:
        """One text delta: `encoded` is the text as a JSON string, `size` its UTF-8 bytes."""
        self.output_tokens += size
        if self._open is None or self._open[0] != "text":
            self._block("text", _TEXT_START, out)
        out.append(self._delta_head + encoded + _DELTA_END)

    def _tool_delta(self, call: dict[str, Any], out: list[bytes]) -> None:
        tool = self._tools.setdefault(self._tool_key(call), _ToolCall())
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if tool.id is None and isinstance(call.get("id"), str) and call["id"]:
            tool.id = call["id"]
        name = function.get("name")
        if isinstance(name, str) and tool.index is None:
            tool.name += name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            self.output_tokens += _size(arguments)
            tool.pending += arguments
        elif arguments is not None:  # an object, say: not streamed as partial_json, still counted
            self.output_tokens += _size(arguments)
        if tool.closed:
            self.lost_tool_deltas += bool(tool.pending)
            tool.pending = ""
        elif tool.index is not None or tool.name:
            self._send_tool(tool, out)

    def _tool_key(self, call: dict[str, Any]) -> int:
        """Which tool call a delta belongs to: by the upstream's index (or the last unindexed
        call); a new id on a known index is a new call, as some upstreams reuse index 0."""
        index, call_id = call.get("index"), call.get("id")
        call_id = call_id if isinstance(call_id, str) and call_id else None  # "" on a continuation is no new id
        slot = index if _is_int(index) else None
        key = self._slots.get(slot)
        known = self._tools.get(key) if key is not None else None
        renamed = call_id is not None and known is not None and known.id is not None and known.id != call_id
        if key is None or renamed:
            key = next((k for k, t in self._tools.items() if call_id is not None and t.id == call_id), len(self._tools))
            self._slots[slot] = key
        return key

    def _send_tool(self, tool: _ToolCall, out: list[bytes]) -> None:
        if tool.index is None:
            self._close_block(out)
            tool.index = self._open_block("tool", self._tool_start(tool), out)
            self._open_tool = tool
        if tool.pending:  # never an empty partial_json: clients choke on it
            out.append(self._delta_head + _json_str(tool.pending) + _DELTA_END)
            tool.pending = ""

    def _tool_start(self, tool: _ToolCall) -> dict[str, Any]:
        # `input` is always {} here: the arguments arrive only as partial_json.
        call_id = tool_use_id(tool.id, self._id, self._blocks)
        return {"type": "tool_use", "id": call_id, "name": tool.name, "input": {}}

    # -- blocks -----------------------------------------------------------------------

    def _block(self, kind: str, start: dict[str, Any], out: list[bytes]) -> None:
        """Make sure a block of `kind` is the open one (a tool block is only ever opened by _send_tool)."""
        if self._open is not None and self._open[0] == kind:
            return
        self._close_block(out)
        self._open_block(kind, start, out)

    def _open_block(self, kind: str, start: dict[str, Any], out: list[bytes]) -> int:
        out.append(self.start())
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        self._delta_head = _DELTA_HEAD % (index, *_DELTA_FIELDS[kind])
        out.append(sse_event({"type": "content_block_start", "index": index, "content_block": start}))
        return index

    def _emit_delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        assert self._open is not None, "a delta needs an open block"
        out.append(sse_event({"type": "content_block_delta", "index": self._open[1], "delta": delta}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        kind, index = self._open
        if kind == "thinking":  # Anthropic sends the signature last; cortex has none to give
            self._emit_delta({"type": "signature_delta", "signature": ""}, out)
        if self._open_tool is not None:
            self._open_tool.closed = True
            self._open_tool = None
        out.append(sse_event({"type": "content_block_stop", "index": index}))
        self._open = None

    # -- the end ----------------------------------------------------------------------

    def _close(self) -> bytes:
        out = [self.start()]
        for tool in self._tools.values():  # calls whose name never came still reach the client
            if tool.index is None and tool.pending:
                self._send_tool(tool, out)
        self._close_block(out)
        used_tool = any(t.index is not None for t in self._tools.values())
        self.stop_reason, stop_sequence = _stop_reason(self.finish_reason, self._matched, self._request, used_tool)
        usage = anthropic_usage(self.usage, self.output_tokens, self._input_tokens_hint)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": stop_sequence}
        out.append(sse_event({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(sse_event({"type": "message_stop"}))
        self.done = True
        return b"".join(out)

    def _fail(self, message: str) -> bytes:
        return self.error_event(ApiError(502, message, type="upstream_error", code="upstream_error"))


_DECODER = json.JSONDecoder()


def _json_value(data: bytes) -> Any:
    """`json.loads(data)`, or None where that raises; a chunk (`{` then a non-NUL byte,
    which json.loads reads as UTF-8) skips its encoding sniffing."""
    try:
        if data[:1] == b"{" and data[1:2] != b"\x00":
            return _DECODER.decode(data.decode("utf-8", "surrogatepass"))
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _plain_head(head: bytes) -> bool:
    """`head + b',"choices":...'` starts a valid object whose other keys feed_chunk never reads."""
    value = _json_value(head + b"}")
    return isinstance(value, dict) and bool(value) and value.keys().isdisjoint(_CHUNK_KEYS)


def _upstream_message(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return f"The upstream failed mid-stream: {message if isinstance(message, str) else 'no detail'}"


# --- errors ---------------------------------------------------------------------------


def error_status(err: ApiError) -> int:
    """The status on this surface: a 503 (no upstream can take the request) is Anthropic's 529."""
    return OVERLOADED_STATUS if err.status == 503 else err.status


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def error_message(err: ApiError) -> str:
    """The message, in Anthropic's own words where agents parse them (context overflow)."""
    found = _OPENAI_CONTEXT.search(err.message) if err.code == "context_length_exceeded" else None
    if found is None:
        return err.message
    context, prompt, output = (int(g) for g in found.groups())
    if prompt > context or output == 0:
        return f"prompt is too long: {prompt} tokens > {context} maximum"
    return (
        f"input length and `max_tokens` exceed context limit: {prompt} + {output} > {context}, "
        "decrease input length or `max_tokens` and try again"
    )


def error_body(err: ApiError, request_id: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}, "request_id"}`."""
    error: dict[str, Any] = {"type": error_type(error_status(err)), "message": error_message(err)}
    if _is_spend_limit(err):  # the SDK raises RateLimitError with .error_code from here
        error["details"] = {"error_code": SPEND_LIMIT_CODE}
    body: dict[str, Any] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_headers(err: ApiError, request_id: str | None = None) -> list[tuple[bytes, bytes]]:
    """The error's headers on this surface, plus `request-id`.

    A spent balance does not come back by waiting: no retry-after, and
    `x-should-retry: false` so the SDKs do not retry.
    """
    headers = list(err.headers)
    if _is_spend_limit(err):
        dropped = (b"retry-after", b"retry-after-ms", b"x-should-retry")
        headers = [(k, v) for k, v in headers if k.lower() not in dropped]
        headers.append((b"x-should-retry", b"false"))
    if request_id is not None:
        headers.append((b"request-id", request_id.encode()))
    return headers


def error_bytes(err: ApiError, request_id: str | None = None) -> bytes:
    return encode_json(error_body(err, request_id))


def error_event(err: ApiError) -> bytes:
    """A mid-stream failure as Anthropic's `event: error` (the SDKs raise it)."""
    return sse_event(error_body(err))


def _is_spend_limit(err: ApiError) -> bool:
    return err.status == 429 and err.code == "insufficient_quota"


# --- the rest of the surface: models, rate-limit headers ------------------------------


def rfc3339(unix_s: float) -> str:
    try:
        moment = datetime.fromtimestamp(unix_s, timezone.utc)
    except (OverflowError, OSError, ValueError):
        moment = datetime.fromtimestamp(0, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def models_list(openai_models: dict[str, Any]) -> dict[str, Any]:
    """GET /v1/models in Anthropic's shape, from the OpenAI list cortex builds."""
    data = openai_models.get("data") if isinstance(openai_models.get("data"), list) else []
    models = [
        {
            "type": "model",
            "id": m["id"],
            "display_name": m["id"],
            "created_at": rfc3339(m["created"] if _is_int(m.get("created")) else 0),
        }
        for m in data
        if isinstance(m, dict) and isinstance(m.get("id"), str)
    ]
    first, last = (models[0]["id"], models[-1]["id"]) if models else (None, None)
    return {"data": models, "has_more": False, "first_id": first, "last_id": last}


def ratelimit_headers(
    limit_tokens: int, remaining_tokens: int, reset_at_unix_s: float | None
) -> list[tuple[bytes, bytes]]:
    """`anthropic-ratelimit-tokens-*`; the reset is an RFC 3339 instant the caller computes from its clock."""
    headers = [
        (b"anthropic-ratelimit-tokens-limit", str(limit_tokens).encode()),
        (b"anthropic-ratelimit-tokens-remaining", str(max(0, remaining_tokens)).encode()),
    ]
    if reset_at_unix_s is not None:
        headers.append((b"anthropic-ratelimit-tokens-reset", rfc3339(reset_at_unix_s).encode()))
    return headers
