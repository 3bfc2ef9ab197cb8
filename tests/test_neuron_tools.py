"""The mock neuron's tool calls and reasoning: deterministic, exact in tokens, bounded."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import counting
from common.errors import ApiError
from common.openai_schema import chat_request
from neuron.deltas import deltas
from neuron.engines.mock import REASONING_TOKENS, Tool, choose_tool, plan_chat_reply, plan_reply
from neuron.engines.schema_args import DEPTH_MAX, arguments_json
from tests.conftest import Stack, wait_until

MODEL = "cortex-mock"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 3},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}}, "required": ["hourly"]},
        "note": {"type": "string"},
    },
    "required": ["city", "days", "unit", "detail"],
}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "limit": {"type": "number"}},
    "required": ["query", "limit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": SEARCH_SCHEMA}},
]


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def check_weather_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days", "unit", "detail"}  # every required property, no optional one
    assert isinstance(args["city"], str) and args["days"] >= 3 and args["unit"] == "celsius"
    assert args["detail"] == {"hourly": True}


def output_bytes(message: dict[str, Any]) -> int:
    calls = message.get("tool_calls") or []
    text = sum(counting.count_text(message.get(key) or "") for key in ("reasoning_content", "content"))
    return text + sum(counting.count_text(c["function"]["name"] + c["function"]["arguments"]) for c in calls)


# --- the argument generator (pure) ---------------------------------------------------


def test_arguments_fill_every_required_property_with_a_value_of_its_type():
    check_weather_arguments(arguments_json(WEATHER_SCHEMA))
    schema = {"type": "object", "required": ["s", "i", "n", "b", "a", "z", "t"], "properties": {
        "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
        "a": {"type": "array", "items": {"type": "integer"}}, "z": {"type": "null"}, "t": {"type": ["null", "string"]}}}
    assert arguments_json(schema) == '{"s":"mock","i":1,"n":1.5,"b":true,"a":[1],"z":null,"t":"mock"}'


def test_arguments_honour_bounds_formats_and_lengths():
    schema = {"type": "object", "required": ["lo", "hi", "x", "when", "code", "ids"], "properties": {
        "lo": {"type": "integer", "exclusiveMinimum": 7}, "hi": {"type": "number", "maximum": -2},
        "x": {"type": "integer", "minimum": 0, "maximum": 0}, "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "minLength": 6, "maxLength": 6},
        "ids": {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 2}}}
    assert json.loads(arguments_json(schema)) == {
        "lo": 8, "hi": -3, "x": 0, "when": "2025-01-01", "code": "mockmo", "ids": ["mo", "mo"]}


def test_arguments_follow_refs_and_combinators():
    schema = {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "type": "object",
        "required": ["at", "maybe", "both", "fixed"],
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "both": {"allOf": [{"$ref": "#/$defs/Point"}, {"properties": {"y": {"type": "boolean"}}, "required": ["y"]}]},
            "fixed": {"const": "é"},
        },
    }
    text = arguments_json(schema)
    assert text.isascii()  # non-ASCII is escaped: one character, one token
    assert json.loads(text) == {"at": {"x": 1.5}, "maybe": 1, "both": {"y": True, "x": 1.5}, "fixed": "é"}


def test_arguments_without_a_schema_are_an_empty_object():
    assert arguments_json(None) == arguments_json({}) == arguments_json({"type": "object"}) == "{}"


def test_a_recursive_schema_stops_at_the_depth_bound():
    schema = {"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}, "required": ["next"]}},
              "$ref": "#/$defs/N"}
    assert arguments_json(schema).count("{") == DEPTH_MAX + 1


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {f"p{i}": {"$ref": "#"} for i in range(50)}, "required": [f"p{i}" for i in range(50)]},
        {"type": "object", "required": ["a"], "properties": {"a": {"allOf": [{"$ref": "#"}] * 10}}},
        {"allOf": [{"$ref": "#"}] * 10},
        {"$ref": "#"},
    ],
    ids=["wide", "allof-fan-out", "allof-cycle", "ref-cycle"],
)
def test_self_referencing_schemas_stay_small_and_fast(schema):
    started = time.monotonic()
    assert len(arguments_json(schema)) < 64 * 1024
    assert time.monotonic() - started < 2.0  # generous: bounded work, not a benchmark


schema_words = st.sampled_from([
    "type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "allOf", "$ref", "minimum",
    "exclusiveMaximum", "maxLength", "minItems", "format", "string", "object", "array", "integer", "number", "#", "x",
])
json_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5) | schema_words
schemas = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(schema_words, inner, max_size=5), max_leaves=30
)


@settings(max_examples=300, deadline=None)
@given(schemas)
def test_any_schema_gives_ascii_json_and_never_raises(schema):
    text = arguments_json(schema)
    assert text.isascii()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


# --- which tool, and the reply's shape (pure) ------------------------------------


@pytest.mark.parametrize(
    "choice, text, called",
    [
        ("required", "hello", "get_weather"),
        ({"type": "function", "function": {"name": "search"}}, "hello", "search"),
        ("auto", "please search, then get_weather", "get_weather"),  # first in tools order, not in the text
        (None, "run a search", "search"),
        ("auto", "hello", None),
        ("auto", "Search", None),  # names match case-sensitively
        ("none", "get_weather", None),
    ],
)
def test_which_tool_the_mock_calls(choice, text, called):
    tool = choose_tool(TOOLS, choice, ask(text))
    assert (tool.name if tool else None) == called


def test_after_a_tool_result_auto_answers_in_text():
    call = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    messages = [*ask("search it"), {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found"}]
    assert choose_tool(TOOLS, "auto", messages) is None
    assert choose_tool(TOOLS, "required", messages).name == "get_weather"


def full_output(tool: Tool | None, effort: str | None, limit: int) -> str:
    reply = plan_chat_reply(0, None, "p", 40, limit, [], tool, effort)
    call = reply.tool_call
    return (reply.reasoning or "") + reply.text + (call.name + call.arguments if call else "")


@pytest.mark.parametrize("effort", [None, "low"])
def test_every_limit_cuts_the_output_as_a_prefix_and_never_splits_the_name(effort):
    tool = Tool("get_weather", WEATHER_SCHEMA)
    whole = full_output(tool, effort, 10_000)
    reasoning = REASONING_TOKENS.get(effort or "none", 0)
    assert len(whole) == reasoning + len("get_weather") + len(arguments_json(WEATHER_SCHEMA))
    for limit in range(len(whole) + 2):
        reply = plan_chat_reply(0, None, "p", 40, limit, [], tool, effort)
        out = full_output(tool, effort, limit)
        assert reply.tokens == len(out) <= limit and whole.startswith(out)
        assert reply.finish_reason == ("tool_calls" if limit >= len(whole) else "length")
        assert (reply.tool_call is not None) == (limit >= reasoning + len("get_weather"))
        if reply.tool_call is None:  # the name did not fit: nothing but the reasoning
            assert len(out) == min(limit, reasoning)


def test_without_a_tool_or_reasoning_the_chat_reply_is_the_plain_reply():
    plain = plan_reply(0, None, "p", 40, 30, ["ex"])
    assert plan_chat_reply(0, None, "p", 40, 30, ["ex"], None, None) == plain
    assert plan_chat_reply(0, None, "p", 40, 30, ["ex"], None, "none") == plain


def test_reasoning_comes_before_the_same_text():
    with_reasoning = plan_chat_reply(0, None, "p", 40, 200, [], None, "minimal")
    assert with_reasoning.text == plan_reply(0, None, "p", 40, 200, []).text
    assert len(with_reasoning.reasoning) == 16 and with_reasoning.tokens == 16 + 40


def test_a_non_ascii_function_name_counts_its_bytes():
    reply = plan_chat_reply(0, None, "p", 40, 10_000, [], Tool("météo", None), None)
    assert reply.tool_call.arguments == "{}" and reply.tokens == len("météo".encode()) + 2 == 9
    assert [d.last_token for d in deltas(reply, 1)] == [6, 7, 8]


@pytest.mark.parametrize("step", [1, 3, 64])
def test_deltas_carry_every_token_once_in_order(step):
    reply = plan_chat_reply(0, None, "p", 40, 10_000, [], Tool("search", SEARCH_SCHEMA), "minimal")
    parts = list(deltas(reply, step))
    assert sum(d.tokens for d in parts) == reply.tokens == parts[-1].last_token + 1
    head = parts[[("tool_calls" in d.fields) for d in parts].index(True)].fields["tool_calls"][0]
    assert head == {"index": 0, "id": reply.tool_call.id, "type": "function", "function": {"name": "search", "arguments": ""}}


# --- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
         "tools[1].function.parameters"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning_effort": "max"}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
    ],
)
def test_malformed_tool_fields_are_400_naming_the_field(extra, param):
    with pytest.raises(ApiError) as info:
        chat_request({"model": MODEL, "messages": ask("hi"), **extra})
    assert info.value.status == 400 and info.value.param == param


def test_tool_choice_auto_or_none_without_tools_is_accepted():
    for choice in ("auto", "none"):
        assert chat_request({"model": MODEL, "messages": ask("hi"), "tool_choice": choice, "tools": []}).tool_choice == choice


# --- neuron serve, end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def neuron(shared_stack: Stack):
    return shared_stack.neuron("--chunk-tokens", "3", "--max-output-tokens", "1000")


def post(neuron, **body: Any) -> httpx.Response:
    return httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=10)


def stream(neuron, **body: Any) -> list[dict[str, Any]]:
    """The chunks of one streamed reply, with the usage frame."""
    payload = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", neuron.url + "/v1/chat/completions", json=payload, timeout=10) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def reassemble(chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(message, finish_reason, usage) from a stream, checking the tool deltas' shape on the way."""
    message: dict[str, Any] = {"reasoning_content": "", "content": "", "tool_calls": []}
    order, finish = [], None
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        for key in ("reasoning_content", "content"):
            if choice["delta"].get(key):
                message[key] += choice["delta"][key]
                order.append(key)
        for call in choice["delta"].get("tool_calls", []):
            order.append("tool_calls")
            assert call["index"] == 0
            if "id" in call:  # the first delta of the call
                assert call["id"].startswith("call_") and call["type"] == "function" and not message["tool_calls"]
                message["tool_calls"].append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:  # later ones carry only argument pieces
                assert list(call["function"]) == ["arguments"] and call["function"]["arguments"]
                message["tool_calls"][0]["function"]["arguments"] += call["function"]["arguments"]
    assert order == sorted(order, key=["reasoning_content", "content", "tool_calls"].index)  # reasoning first
    return message, finish, chunks[-1]["usage"]


def test_required_calls_the_first_tool_through_the_sdk(neuron):
    client = openai.OpenAI(base_url=neuron.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=ask("hi"), tools=TOOLS, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)
    assert reply.usage.completion_tokens == len(call.function.name) + len(call.function.arguments)
    assert reply.usage.prompt_tokens == counting.count_chat(ask("hi"))  # tools are not in the prompt count


def test_the_sdk_stream_helper_assembles_the_call(neuron):
    client = openai.OpenAI(base_url=neuron.url + "/v1", api_key="x", max_retries=0)
    choice = {"type": "function", "function": {"name": "search"}}
    with client.chat.completions.stream(model=MODEL, messages=ask("hi"), tools=TOOLS, tool_choice=choice) as events:
        final = events.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"query": "mock", "limit": 1.5}
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "choice, text, called",
    [({"type": "function", "function": {"name": "search"}}, "hi", "search"), ("auto", "use search", "search"),
     (None, "get_weather now", "get_weather"), ("auto", "hello", None), ("none", "get_weather", None)],
)
def test_which_tool_is_called_streamed_and_not(neuron, choice, text, called):
    body = {"messages": ask(text), "tools": TOOLS, **({"tool_choice": choice} if choice else {})}
    whole = post(neuron, **body).json()
    message, finish, usage = reassemble(stream(neuron, **body))
    calls = whole["choices"][0]["message"].get("tool_calls")
    assert [c["function"]["name"] for c in calls or []] == [c["function"]["name"] for c in message["tool_calls"]]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ([called] if called else [])
    assert finish == whole["choices"][0]["finish_reason"] == ("tool_calls" if called else "stop")
    assert (whole["choices"][0]["message"]["content"] is None) == bool(called)
    assert usage == whole["usage"]


def test_streamed_tool_call_arrives_in_several_chunks_and_matches_the_whole_reply(neuron):
    body = {"messages": ask("get_weather for Paris"), "tools": TOOLS, "seed": 4}
    whole = post(neuron, **body).json()
    chunks = stream(neuron, **body)
    message, finish, usage = reassemble(chunks)
    assert sum("tool_calls" in c["choices"][0]["delta"] for c in chunks[:-1]) > 3
    assert message["tool_calls"] == whole["choices"][0]["message"]["tool_calls"]  # same id: deterministic
    check_weather_arguments(message["tool_calls"][0]["function"]["arguments"])
    assert finish == "tool_calls"
    assert usage["completion_tokens"] == output_bytes(message) == output_bytes(whole["choices"][0]["message"])


def test_reasoning_streams_first_and_counts_as_output(neuron):
    body = {"messages": ask("hi"), "reasoning_effort": "low", "max_tokens": 100}
    whole = post(neuron, **body).json()
    message, finish, usage = reassemble(stream(neuron, **body))
    assert len(message["reasoning_content"]) == REASONING_TOKENS["low"] and message["content"]
    assert whole["choices"][0]["message"]["reasoning_content"] == message["reasoning_content"]
    assert whole["choices"][0]["message"]["content"] == message["content"]
    assert usage == whole["usage"]
    assert usage["completion_tokens"] == output_bytes(message) == 100 and finish == "length"
    assert usage["completion_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS["low"]}


def test_reasoning_none_means_no_reasoning(neuron):
    whole = post(neuron, messages=ask("hi"), reasoning_effort="none", max_tokens=10).json()
    assert "reasoning_content" not in whole["choices"][0]["message"]
    assert "completion_tokens_details" not in whole["usage"]


def test_reasoning_then_a_tool_call(neuron):
    body = {"messages": ask("hi"), "tools": TOOLS, "tool_choice": "required", "reasoning_effort": "minimal"}
    message, finish, usage = reassemble(stream(neuron, **body))
    assert len(message["reasoning_content"]) == 16 and not message["content"] and finish == "tool_calls"
    assert usage["completion_tokens"] == output_bytes(message)
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 16}


@pytest.mark.parametrize("max_tokens", [5, 30])
def test_a_tiny_max_tokens_cuts_the_whole_output_at_the_limit(neuron, max_tokens):
    body = {"messages": ask("hi"), "tools": TOOLS, "tool_choice": "required", "reasoning_effort": "minimal"}
    whole = post(neuron, **body, max_tokens=max_tokens).json()
    message, finish, usage = reassemble(stream(neuron, **body, max_tokens=max_tokens))
    assert finish == whole["choices"][0]["finish_reason"] == "length"
    counted = output_bytes(whole["choices"][0]["message"])
    assert usage["completion_tokens"] == output_bytes(message) == counted <= max_tokens
    if max_tokens == 30:  # 16 of reasoning, the 11-byte name, then 3 bytes of arguments
        assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"c'}
    else:  # only reasoning fits: no call with a cut name
        assert not message["tool_calls"] and whole["choices"][0]["message"].get("tool_calls") is None


def test_bad_tool_choice_is_a_400_from_neuron(neuron):
    r = post(neuron, messages=ask("hi"), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_through_cortex_the_counted_output_agrees_with_usage(stack: Stack, neuron):
    cortex = stack.cortex(neuron)
    body = {"messages": ask("get_weather"), "tools": TOOLS, "reasoning_effort": "low"}
    message, finish, usage = reassemble(stream(cortex, **body))
    assert finish == "tool_calls" and usage["completion_tokens"] == output_bytes(message)
    metrics = httpx.get(cortex.url + "/metrics", timeout=10).text
    assert not [line for line in metrics.splitlines() if line.startswith("cortex_usage_disagreements_total{")]


# --- pacing: reasoning and argument bytes are paced tokens ---------------------------


@pytest.fixture(scope="module")
def paced(shared_stack: Stack):
    return shared_stack.neuron("--token-interval-ms", "5")


FORCED = {"messages": ask("hi"), "tools": TOOLS, "tool_choice": "required", "reasoning_effort": "minimal"}


def test_every_output_byte_is_paced_like_a_token(paced):
    started = time.monotonic()
    whole = post(paced, **FORCED).json()
    elapsed_s = time.monotonic() - started
    assert elapsed_s >= (whole["usage"]["completion_tokens"] - 1) * 0.005


def test_a_client_leaving_mid_tool_call_stops_generation(paced):
    before = paced.get_json("/health")
    payload = {"model": MODEL, "stream": True, **FORCED}
    with httpx.stream("POST", paced.url + "/v1/chat/completions", json=payload, timeout=10) as r:
        for line in r.iter_lines():
            if '"tool_calls"' in line:
                break  # the call has started: leave
    health = wait_until(lambda: (h := paced.get_json("/health"))["cancelled_total"] == before["cancelled_total"] + 1 and h)
    assert health["in_flight"] == 0
    total = 16 + len("get_weather") + len(arguments_json(WEATHER_SCHEMA))
    assert health["tokens_generated_total"] - before["tokens_generated_total"] < total
