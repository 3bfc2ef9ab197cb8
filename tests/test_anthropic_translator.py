"""The Anthropic Messages translator: requests, replies, the stream state machine, errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import errors
from common.errors import ApiError
from cortex.api import anthropic as an
from cortex.budget.estimate import estimate
from cortex.budget.ledger import Refusal
from cortex.budget.service import refusal_error

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "qwen3", "max_tokens": 64, "messages": HELLO, **fields}


def upstream(body_: dict[str, Any]) -> dict[str, Any]:
    return an.to_openai(body_).gen.body


def refused(body_: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        an.to_openai(body_)
    assert info.value.status == 400
    assert info.value.message.startswith(f"{info.value.param}: ")  # Anthropic's envelope has no param field
    return info.value


def tool_turns(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A user question, an assistant tool_use, then the user's tool_result turn."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [result]},
    ]


# --- requests: required fields --------------------------------------------------------


def test_model_is_required():
    assert refused({"max_tokens": 1, "messages": HELLO}).param == "model"


def test_max_tokens_is_required():
    assert refused({"model": "m", "messages": HELLO}).param == "max_tokens"


def test_max_tokens_becomes_max_tokens_and_the_output_limit():
    request = an.to_openai(body(max_tokens=77))
    assert request.gen.body["max_tokens"] == 77 and request.gen.max_output_tokens == 77


def test_empty_messages_is_a_400():
    assert refused(body(messages=[])).param == "messages"


def test_messages_must_be_a_list():
    assert refused(body(messages="hi")).param == "messages"


def test_unknown_role_is_a_400():
    assert refused(body(messages=[{"role": "system", "content": "x"}])).param == "messages.0.role"


def test_model_is_kept_as_given():
    assert an.to_openai(body(model="Qwen/Qwen3-8B")).model == "Qwen/Qwen3-8B"


# --- requests: system --------------------------------------------------------------------


def test_system_string_is_one_leading_system_message():
    assert upstream(body(system="Be brief."))["messages"][0] == {"role": "system", "content": "Be brief."}


def test_system_text_blocks_are_forwarded_verbatim_as_one_message():
    system = [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}]
    messages = upstream(body(system=system))["messages"]
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}
    assert [m["role"] for m in messages] == ["system", "user"]


def test_no_system_prompt_is_ever_injected():
    assert [m["role"] for m in upstream(body())["messages"]] == ["user"]


def test_a_non_text_system_block_is_a_400():
    assert refused(body(system=[{"type": "image"}])).param == "system.0"


# --- requests: content blocks ------------------------------------------------------------


def test_text_blocks_become_text_parts():
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}]
    message = upstream(body(messages=[{"role": "user", "content": content}]))["messages"][0]
    assert message == {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}


def test_a_lone_text_block_becomes_plain_string_content():
    message = upstream(body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}]))["messages"][0]
    assert message == {"role": "user", "content": "a"}


def test_base64_image_becomes_an_image_url_part_with_a_data_uri():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    part = upstream(body(messages=[{"role": "user", "content": [image]}]))["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


def test_url_image_becomes_an_image_url_part():
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    part = upstream(body(messages=[{"role": "user", "content": [image]}]))["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("source", "param"),
    [
        (None, "messages.0.content.0.source"),
        ({"type": "base64", "media_type": "image/png", "data": "not base64!"}, "messages.0.content.0.source.data"),
        ({"type": "base64", "media_type": "image/png", "data": base64.b64encode(b"GIF89a...").decode()}, "messages.0.content.0.source.data"),
        ({"type": "base64", "media_type": "image/bmp", "data": PNG}, "messages.0.content.0.source.media_type"),
        ({"type": "url", "url": "file:///etc/passwd"}, "messages.0.content.0.source.url"),
        ({"type": "file", "file_id": "f"}, "messages.0.content.0.source.type"),
    ],
)
def test_a_malformed_image_is_a_400_naming_the_source(source, param):
    assert refused(body(messages=[{"role": "user", "content": [{"type": "image", "source": source}]}])).param == param


def test_tool_use_becomes_assistant_tool_calls():
    messages = upstream(body(messages=tool_turns({"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"})))["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
    }


def test_assistant_text_and_tool_use_share_one_message():
    turns = tool_turns({"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"})
    turns[1]["content"].insert(0, {"type": "text", "text": "Let me look."})
    message = upstream(body(messages=turns))["messages"][1]
    assert message["content"] == "Let me look." and len(message["tool_calls"]) == 1


def test_string_tool_result_becomes_a_tool_message():
    messages = upstream(body(messages=tool_turns({"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"})))["messages"]
    assert messages[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}]


def test_tool_result_blocks_become_text_and_their_images_follow_as_user_content():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a chart"}, image]}
    messages = upstream(body(messages=tool_turns(result)))["messages"]
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "a chart"}
    assert messages[3]["role"] == "user" and messages[3]["content"][0]["type"] == "image_url"


def test_tool_result_with_is_error_is_still_a_tool_message():
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "city unknown", "is_error": True}
    assert upstream(body(messages=tool_turns(result)))["messages"][2]["content"] == "city unknown"


def test_tool_result_without_content_is_an_empty_tool_message():
    result = {"type": "tool_result", "tool_use_id": "toolu_1"}
    assert upstream(body(messages=tool_turns(result)))["messages"][2]["content"] == ""


def test_tool_result_with_no_matching_tool_use_is_a_400():
    result = {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}
    assert refused(body(messages=tool_turns(result))).param == "messages.2.content.0.tool_use_id"


def test_tool_result_answering_twice_is_a_400():
    turns = tool_turns({"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"})
    turns[2]["content"].append({"type": "tool_result", "tool_use_id": "toolu_1", "content": "y"})
    assert refused(body(messages=turns)).param == "messages.2.content.1.tool_use_id"


def test_tool_use_left_unanswered_is_a_400():
    turns = tool_turns({"type": "text", "text": "never mind"})
    assert refused(body(messages=turns)).param == "messages.1"


def test_tool_results_go_before_the_users_text_in_the_same_turn():
    turns = tool_turns({"type": "text", "text": "and tomorrow?"})
    turns[2]["content"].append({"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"})
    assert [m["role"] for m in upstream(body(messages=turns))["messages"]] == ["user", "assistant", "tool", "user"]


def test_thinking_blocks_are_dropped_from_the_prompt_never_replayed_as_text():
    turn = [{"type": "thinking", "thinking": "secret plan", "signature": "sig"}, {"type": "redacted_thinking", "data": "xx"}, {"type": "text", "text": "Hi"}]
    messages = upstream(body(messages=[*HELLO, {"role": "assistant", "content": turn}, {"role": "user", "content": "ok"}]))["messages"]
    assert messages[1] == {"role": "assistant", "content": "Hi"}
    assert "secret plan" not in json.dumps(messages)


def test_plain_text_document_becomes_text():
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The doc."}}
    assert upstream(body(messages=[{"role": "user", "content": [document]}]))["messages"][0]["content"] == "The doc."


def test_a_pdf_document_is_a_400():
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    assert refused(body(messages=[{"role": "user", "content": [document]}])).param == "messages.0.content.0.source"


def test_an_unknown_block_type_is_a_400():
    assert refused(body(messages=[{"role": "user", "content": [{"type": "hologram"}]}])).param == "messages.0.content.0.type"


def test_a_tool_use_block_in_a_user_message_is_a_400():
    block = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    assert refused(body(messages=[{"role": "user", "content": [block]}])).param == "messages.0.content.0"


def test_tool_use_input_must_be_an_object():
    turns = tool_turns({"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"})
    turns[1]["content"][0]["input"] = "Paris"
    assert refused(body(messages=turns)).param == "messages.1.content.0.input"


def test_consecutive_same_role_messages_merge_into_one_turn():
    messages = upstream(body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))["messages"]
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


def test_an_assistant_first_turn_order_is_a_400():
    assert refused(body(messages=[{"role": "assistant", "content": "Hi"}, *HELLO])).param == "messages.0.role"


def test_empty_content_is_a_400_except_in_a_final_assistant_message():
    assert refused(body(messages=[{"role": "user", "content": ""}])).param == "messages.0"
    assert upstream(body(messages=[*HELLO, {"role": "assistant", "content": ""}]))["messages"][-1]["role"] == "assistant"


def test_a_final_assistant_message_is_kept_as_a_prefill():
    messages = upstream(body(messages=[*HELLO, {"role": "assistant", "content": "The answer is"}]))["messages"]
    assert messages[-1] == {"role": "assistant", "content": "The answer is"}


# --- requests: fields -----------------------------------------------------------------------


def test_tool_input_schema_becomes_parameters():
    assert upstream(body(tools=[WEATHER]))["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Weather now"}}
    ]


def test_server_tools_are_refused_with_a_clear_400():
    error = refused(body(tools=[{"type": "web_search_20250305", "name": "web_search"}]))
    assert error.param == "tools.0.type" and "web_search" in error.message


def test_a_tool_without_input_schema_is_a_400():
    assert refused(body(tools=[{"name": "f"}])).param == "tools.0.input_schema"


def test_duplicate_tool_names_are_a_400():
    assert refused(body(tools=[WEATHER, WEATHER])).param == "tools"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice_maps_to_openai(choice, expected):
    assert upstream(body(tools=[WEATHER], tool_choice=choice))["tool_choice"] == expected


def test_tool_choice_naming_an_unknown_tool_is_a_400():
    assert refused(body(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})).param == "tool_choice.name"


def test_tool_choice_any_without_tools_is_a_400():
    assert refused(body(tool_choice={"type": "any"})).param == "tool_choice"


def test_tool_choice_auto_without_tools_is_left_out():
    assert "tool_choice" not in upstream(body(tool_choice={"type": "auto"}))


def test_disable_parallel_tool_use_becomes_parallel_tool_calls_false():
    sent = upstream(body(tools=[WEATHER], tool_choice={"type": "auto", "disable_parallel_tool_use": True}))
    assert sent["parallel_tool_calls"] is False


def test_stop_sequences_become_stop_and_are_kept_for_the_reply():
    request = an.to_openai(body(stop_sequences=["\n\nHuman:", "END"]))
    assert request.gen.body["stop"] == ["\n\nHuman:", "END"] and request.gen.stop == ["\n\nHuman:", "END"]
    assert request.stop_sequences == ("\n\nHuman:", "END")


def test_too_many_stop_sequences_is_a_400_naming_stop_sequences():
    assert refused(body(stop_sequences=list("abcde"))).param == "stop_sequences"


def test_temperature_top_p_and_top_k_pass_through():
    sent = upstream(body(temperature=0.5, top_p=0.9, top_k=40))
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.5, 0.9, 40)


def test_temperature_above_one_is_a_400():
    assert refused(body(temperature=1.5)).param == "temperature"


def test_metadata_user_id_becomes_user():
    assert upstream(body(metadata={"user_id": "user_abc"}))["user"] == "user_abc"


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 8000}, "medium"),
        ({"type": "enabled", "budget_tokens": 31999}, "high"),
        ({"type": "adaptive"}, "high"),
    ],
)
def test_thinking_becomes_reasoning_effort(thinking, effort):
    request = an.to_openai(body(max_tokens=32000, thinking=thinking))
    assert request.gen.body["reasoning_effort"] == effort and request.thinking


def test_disabled_thinking_sends_no_reasoning_switch():
    request = an.to_openai(body(thinking={"type": "disabled"}))
    assert "reasoning_effort" not in request.gen.body and not request.thinking


def test_enabled_thinking_without_a_budget_is_a_400():
    assert refused(body(thinking={"type": "enabled"})).param == "thinking.budget_tokens"


def test_ignored_fields_are_never_an_error():
    sent = upstream(body(
        context_management={"edits": []}, output_config={"effort": "high"}, service_tier="auto",
        some_future_beta={"x": 1}, system=[{"type": "text", "text": "S", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    ))
    assert not {"context_management", "output_config", "service_tier", "some_future_beta"} & set(sent)


def test_stream_is_kept_and_asks_the_upstream_for_usage():
    request = an.to_openai(body(stream=True))
    assert request.stream and request.gen.stream
    assert request.gen.body["stream_options"] == {"include_usage": True}


def test_claude_code_shaped_request_translates():
    request = an.to_openai({
        "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Rules."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"}, {"type": "text", "text": "fix it", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"name": "Bash", "description": "Run", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}],
        "metadata": {"user_id": "user_x_account__session_y"}, "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    })
    assert request.stream and request.thinking and request.gen.body["user"] == "user_x_account__session_y"
    assert [m["role"] for m in request.gen.messages] == ["system", "user"]


# --- count_tokens -------------------------------------------------------------------------


def test_count_tokens_does_not_need_max_tokens():
    assert an.count_tokens_body(an.count_tokens_request({"model": "m", "messages": HELLO}))["input_tokens"] > 0


def test_count_tokens_is_the_prompt_bound_the_budget_reserves():
    fields = {"model": "m", "system": "S", "messages": HELLO, "tools": [WEATHER]}
    counted = an.count_tokens_body(an.count_tokens_request(fields))["input_tokens"]
    reserved = estimate(an.to_openai({**fields, "max_tokens": 10}).gen, None).prompt_tokens
    assert counted == reserved


# --- replies --------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str | None = "stop", usage: Any = None, **choice: Any) -> dict[str, Any]:
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "model": "upstream-name",
             "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}]}
    if usage is not None:
        reply["usage"] = usage
    return reply


PLAIN = an.to_openai(body())
THINKING = an.to_openai(body(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}))
STOPPING = an.to_openai(body(stop_sequences=["END"]))


def call(arguments: str, id_: str | None = "call_1", name: str = "get_weather") -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if id_ is not None:
        entry["id"] = id_
    return entry


def test_reply_text_becomes_a_text_block():
    message = an.from_openai(completion({"content": "Hi there"}), PLAIN, "msg_1")
    assert message["content"] == [{"type": "text", "text": "Hi there"}]
    assert (message["id"], message["type"], message["role"]) == ("msg_1", "message", "assistant")


def test_reply_model_is_the_one_the_client_asked_for():
    assert an.from_openai(completion({"content": "x"}), PLAIN)["model"] == "qwen3"


def test_reply_tool_calls_become_tool_use_blocks_with_parsed_input():
    reply = completion({"content": None, "tool_calls": [call('{"city":"Paris"}'), call('{"city":"Rome"}', "call_2")]}, "tool_calls")
    blocks = an.from_openai(reply, PLAIN)["content"]
    assert blocks == [
        {"type": "tool_use", "id": "toolu_call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]


def test_text_and_tool_use_both_survive_in_order():
    reply = completion({"content": "Checking.", "tool_calls": [call("{}")]}, "tool_calls")
    assert [b["type"] for b in an.from_openai(reply, PLAIN)["content"]] == ["text", "tool_use"]


def test_tool_calls_without_ids_get_distinct_toolu_ids():
    reply = completion({"tool_calls": [call("{}", None), call("{}", None)]}, "tool_calls")
    ids = [b["id"] for b in an.from_openai(reply, PLAIN, "msg_r")["content"]]
    assert len(set(ids)) == 2 and all(i.startswith("toolu_") for i in ids)


def test_invalid_tool_arguments_are_kept_not_dropped():
    block = an.from_openai(completion({"tool_calls": [call('{"city": "Par')]}, "tool_calls"), PLAIN)["content"][0]
    assert block["input"] == {an.UNPARSED_ARGUMENTS_KEY: '{"city": "Par'}


def test_empty_tool_arguments_are_an_empty_input():
    assert an.from_openai(completion({"tool_calls": [call("")]}, "tool_calls"), PLAIN)["content"][0]["input"] == {}


def test_double_encoded_tool_arguments_are_unwrapped():
    encoded = json.dumps('{"city":"Paris"}')
    assert an.from_openai(completion({"tool_calls": [call(encoded)]}, "tool_calls"), PLAIN)["content"][0]["input"] == {"city": "Paris"}


def test_reasoning_becomes_a_thinking_block_first_with_an_empty_signature():
    blocks = an.from_openai(completion({"content": "42", "reasoning_content": "Let me think."}), THINKING)["content"]
    assert blocks == [{"type": "thinking", "thinking": "Let me think.", "signature": ""}, {"type": "text", "text": "42"}]


def test_reasoning_is_never_shown_as_text_when_thinking_was_not_asked():
    blocks = an.from_openai(completion({"content": "42", "reasoning": "Let me think."}), PLAIN)["content"]
    assert blocks == [{"type": "text", "text": "42"}]


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"), (None, "end_turn")],
)
def test_finish_reason_maps_to_stop_reason(finish, stop_reason):
    message = an.from_openai(completion({"content": "x"}, finish), PLAIN)
    assert (message["stop_reason"], message["stop_sequence"]) == (stop_reason, None)


def test_a_matched_stop_sequence_is_stop_sequence_with_the_sequence_set():
    message = an.from_openai(completion({"content": "x"}, "stop", stop_reason="END"), STOPPING)
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")


def test_a_stop_token_that_is_not_a_requested_sequence_is_end_turn():
    assert an.from_openai(completion({"content": "x"}, "stop", stop_reason=151645), STOPPING)["stop_reason"] == "end_turn"


def test_tool_calls_finished_with_stop_are_still_tool_use():
    assert an.from_openai(completion({"tool_calls": [call("{}")]}, "stop"), PLAIN)["stop_reason"] == "tool_use"


def test_usage_maps_prompt_and_completion_tokens():
    usage = an.from_openai(completion({"content": "x"}, usage={"prompt_tokens": 12, "completion_tokens": 3}), PLAIN)["usage"]
    assert usage == {"input_tokens": 12, "output_tokens": 3}


def test_cached_prompt_tokens_become_cache_read_input_tokens():
    raw = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 80}}
    usage = an.from_openai(completion({"content": "x"}, usage=raw), PLAIN)["usage"]
    assert usage == {"input_tokens": 20, "output_tokens": 3, "cache_read_input_tokens": 80}


def test_missing_usage_falls_back_to_the_bytes_cortex_counted():
    assert an.from_openai(completion({"content": "héllo"}), PLAIN)["usage"]["output_tokens"] == len("héllo".encode())


_leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=6)
JUNK = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from(["id", "choices", "usage", "model"]), JUNK) | JUNK)
def test_a_malformed_completion_never_raises(reply):
    message = an.from_openai(reply, PLAIN)
    assert message["type"] == "message" and isinstance(message["content"], list)


@given(JUNK)
def test_malformed_message_parts_never_raise(part):
    reply = {"choices": [{"index": 0, "message": {"content": part, "tool_calls": part, "reasoning_content": part}, "finish_reason": part, "stop_reason": part}], "usage": part}
    an.from_openai(reply, THINKING)


# --- streaming ------------------------------------------------------------------------------


def sse(*chunks: Any, done: bool = True) -> bytes:
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return raw + (b"data: [DONE]\n\n" if done else b"")


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def tool_delta(index: int, arguments: str | None = None, id_: str | None = None, name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    entry: dict[str, Any] = {"index": index, "function": function}
    if id_ is not None:
        entry.update(id=id_, type="function")
    return delta(tool_calls=[entry])


USAGE = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Parse Anthropic SSE bytes, checking each `event:` line names its payload's type."""
    parsed = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        name, payload = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert payload["type"] == name
        parsed.append((name, payload))
    return parsed


def run(request: an.AnthropicRequest, raw: bytes, finish: bool = True) -> list[tuple[str, dict[str, Any]]]:
    translator = an.StreamTranslator(request, "msg_s", input_tokens=7)
    out = translator.start() + translator.feed(raw) + (translator.finish() if finish else b"")
    return events(out)


def names(parsed: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in parsed]


def deltas(parsed: list[tuple[str, dict[str, Any]]], index: int) -> list[dict[str, Any]]:
    return [p["delta"] for n, p in parsed if n == "content_block_delta" and p["index"] == index]


def partial_json(parsed: list[tuple[str, dict[str, Any]]], index: int) -> str:
    return "".join(d["partial_json"] for d in deltas(parsed, index) if d["type"] == "input_json_delta")


def test_the_stream_opens_with_message_start_carrying_usage():
    name, payload = run(PLAIN, sse(delta(content="hi")))[0]
    assert name == "message_start"
    assert payload["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0} and payload["message"]["model"] == "qwen3"


def test_text_streams_as_one_text_block_of_text_deltas():
    parsed = run(PLAIN, sse(delta(role="assistant", content=""), delta(content="Hel"), delta(content="lo"), delta("stop"), USAGE))
    assert names(parsed) == ["message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert deltas(parsed, 0) == [{"type": "text_delta", "text": "Hel"}, {"type": "text_delta", "text": "lo"}]


def test_an_empty_content_delta_opens_no_block():
    assert names(run(PLAIN, sse(delta(role="assistant", content=""), delta("stop")))) == ["message_start", "message_delta", "message_stop"]


def test_message_delta_carries_the_stop_reason_and_cumulative_usage():
    _, payload = run(PLAIN, sse(delta(content="x"), delta("length"), USAGE))[-2]
    assert payload["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert payload["usage"] == {"input_tokens": 9, "output_tokens": 5}


def test_a_matched_stop_sequence_is_reported_at_the_end_of_the_stream():
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]}
    _, payload = run(STOPPING, sse(delta(content="x"), finish))[-2]
    assert payload["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_parallel_tool_calls_get_distinct_block_indexes():
    parsed = run(PLAIN, sse(
        tool_delta(0, "", "call_a", "get_weather"), tool_delta(0, '{"city":"Paris"}'),
        tool_delta(1, "", "call_b", "get_weather"), tool_delta(1, '{"city":"Rome"}'), delta("tool_calls"),
    ))
    starts = [p for n, p in parsed if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1]
    assert [s["content_block"]["id"] for s in starts] == ["toolu_call_a", "toolu_call_b"]
    assert (partial_json(parsed, 0), partial_json(parsed, 1)) == ('{"city":"Paris"}', '{"city":"Rome"}')
    assert parsed[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_tool_block_starts_with_empty_input_and_arguments_arrive_only_as_partial_json():
    parsed = run(PLAIN, sse(tool_delta(0, '{"city":', "call_a", "get_weather"), tool_delta(0, '"Paris"}'), delta("tool_calls")))
    start = next(p for n, p in parsed if n == "content_block_start")
    assert start["content_block"] == {"type": "tool_use", "id": "toolu_call_a", "name": "get_weather", "input": {}}
    assert partial_json(parsed, 0) == '{"city":"Paris"}'


def test_no_input_json_delta_is_ever_empty():
    parsed = run(PLAIN, sse(tool_delta(0, "", "call_a", "f"), tool_delta(0, ""), tool_delta(0, None), delta("tool_calls")))
    assert [d for d in deltas(parsed, 0) if d["type"] == "input_json_delta"] == []


def test_arguments_that_arrive_before_the_name_are_kept():
    parsed = run(PLAIN, sse(tool_delta(0, '{"a":', "call_a"), tool_delta(0, "1}", name="f"), delta("tool_calls")))
    assert partial_json(parsed, 0) == '{"a":1}'


def test_a_call_whose_name_never_came_still_reaches_the_client():
    parsed = run(PLAIN, sse(tool_delta(0, '{"a":1}', "call_a"), delta("tool_calls")))
    assert partial_json(parsed, 0) == '{"a":1}'


def test_a_new_id_on_a_reused_index_is_a_new_tool_call():
    parsed = run(PLAIN, sse(tool_delta(0, "{}", "call_a", "f"), tool_delta(0, '{"b":2}', "call_b", "g"), delta("tool_calls")))
    assert [p["content_block"]["name"] for n, p in parsed if n == "content_block_start"] == ["f", "g"]
    assert partial_json(parsed, 1) == '{"b":2}'


def test_an_empty_id_on_a_continuation_is_the_same_tool_call():
    parsed = run(PLAIN, sse(tool_delta(0, '{"a":', "call_a", "f"), tool_delta(0, "1}", ""), delta("tool_calls")))
    assert names(parsed).count("content_block_start") == 1 and partial_json(parsed, 0) == '{"a":1}'


def test_arguments_for_an_already_closed_tool_block_are_counted_as_lost():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    translator.feed(sse(tool_delta(0, "{", "call_a", "f"), tool_delta(1, "{}", "call_b", "g"), tool_delta(0, "}")))
    assert translator.lost_tool_deltas == 1  # only an upstream interleaving parallel calls does this


def test_text_then_tool_call_are_two_blocks():
    parsed = run(PLAIN, sse(delta(content="Let me check."), tool_delta(0, "{}", "call_a", "f"), delta("tool_calls")))
    assert [p["content_block"]["type"] for n, p in parsed if n == "content_block_start"] == ["text", "tool_use"]


def test_reasoning_streams_as_a_thinking_block_with_the_signature_last():
    parsed = run(THINKING, sse(delta(reasoning_content="Hmm."), delta(content="42"), delta("stop")))
    assert next(p for n, p in parsed if n == "content_block_start")["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert deltas(parsed, 0) == [{"type": "thinking_delta", "thinking": "Hmm."}, {"type": "signature_delta", "signature": ""}]
    assert deltas(parsed, 1) == [{"type": "text_delta", "text": "42"}]


def test_reasoning_is_never_streamed_as_text_when_thinking_was_not_asked():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    parsed = events(translator.feed(sse(delta(reasoning_content="Hmm."), delta(content="42"), delta("stop"))))
    assert b"Hmm." not in json.dumps([p for _, p in parsed]).encode()
    assert translator.output_tokens == len("Hmm.42")  # reasoning is still output the upstream produced


def test_output_tokens_count_text_reasoning_and_argument_bytes():
    translator = an.StreamTranslator(THINKING, "msg_s")
    translator.feed(sse(delta(reasoning_content="ab"), delta(content="é"), tool_delta(0, '{"x":1}', "c", "f"), done=False))
    assert translator.output_tokens == 2 + 2 + 7


def test_the_upstream_usage_frame_is_kept_for_the_meter():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    translator.feed(sse(delta(content="x"), delta("stop"), USAGE))
    assert translator.usage == USAGE["usage"]


def test_without_a_usage_frame_the_counted_tokens_are_reported():
    _, payload = run(PLAIN, sse(delta(content="héllo"), delta("stop")))[-2]
    assert payload["usage"] == {"input_tokens": 7, "output_tokens": len("héllo".encode())}


def test_a_finished_stream_without_done_closes_normally():
    assert names(run(PLAIN, sse(delta(content="x"), delta("stop"), done=False)))[-2:] == ["message_delta", "message_stop"]


def test_a_stream_that_ends_before_finishing_sends_an_error_event():
    parsed = run(PLAIN, sse(delta(content="x"), done=False))
    assert names(parsed)[-1] == "error" and "message_stop" not in names(parsed)
    assert parsed[-1][1]["error"]["type"] == "api_error"


def test_an_upstream_error_chunk_becomes_an_error_event():
    parsed = run(PLAIN, sse(delta(content="x"), {"error": {"message": "neuron died"}}), finish=True)
    assert names(parsed)[-1] == "error" and "neuron died" in parsed[-1][1]["error"]["message"]


def test_an_oversized_upstream_event_is_an_error_event_not_an_exception():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    out = translator.feed(b"data: " + b"x" * (2 * 1024 * 1024))
    assert names(events(out)) == ["error"] and translator.finish() == b""


def test_nothing_follows_an_error_event():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    translator.feed(sse(delta(content="x"), done=False))
    assert events(translator.error_event(errors.upstream_timeout("slow")))[0][1]["error"]["type"] == "timeout_error"
    assert translator.feed(sse(delta(content="y"))) + translator.finish() + translator.ping() == b""


def test_ping_is_an_event_and_follows_message_start():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    assert names(events(translator.ping() + translator.ping())) == ["message_start", "ping", "ping"]


def test_nothing_follows_message_stop():
    translator = an.StreamTranslator(PLAIN, "msg_s")
    translator.feed(sse(delta(content="x"), delta("stop")))
    assert translator.feed(sse(delta(content="y"))) + translator.finish() == b"" and translator.stop_reason == "end_turn"


# --- stream properties ----------------------------------------------------------------------


def check_well_formed(parsed: list[tuple[str, dict[str, Any]]]) -> None:
    """message_start first; blocks started once, in index order, one open at a time, deltas of
    their own kind and never empty, stopped once; message_delta then message_stop last, or an
    error event as the very last."""
    sequence = [(n, p) for n, p in parsed if n != "ping"]
    assert sequence, "a finished stream says something"
    if sequence[-1][0] == "error":
        sequence = sequence[:-1]
    else:
        assert [n for n, _ in sequence[-2:]] == ["message_delta", "message_stop"]
        sequence = sequence[:-2]
    assert "error" not in names(sequence)
    if not sequence:
        return
    assert sequence[0][0] == "message_start"
    open_kind: str | None = None
    started = 0
    for name, payload in sequence[1:]:
        if name == "content_block_start":
            assert open_kind is None and payload["index"] == started
            open_kind = payload["content_block"]["type"]
            started += 1
            if open_kind == "tool_use":
                assert payload["content_block"]["input"] == {}
        elif name == "content_block_delta":
            assert open_kind is not None and payload["index"] == started - 1
            kind = payload["delta"]["type"]
            allowed = {"text": {"text_delta"}, "thinking": {"thinking_delta", "signature_delta"}, "tool_use": {"input_json_delta"}}
            assert kind in allowed[open_kind]
            value = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}.get(kind)
            assert value is None or payload["delta"][value]
        elif name == "content_block_stop":
            assert open_kind is not None and payload["index"] == started - 1
            open_kind = None
        else:
            raise AssertionError(f"unexpected {name} inside the message")
    assert open_kind is None or parsed[-1][0] == "error"


_tool_entry = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(0, 2) | JUNK,
        "id": st.sampled_from(["call_a", "call_b", "call_c"]) | JUNK,
        "function": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["f", "g"]) | JUNK, "arguments": st.text(max_size=5) | JUNK}) | JUNK,
    },
)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.text(max_size=5) | JUNK,
        "reasoning_content": st.text(max_size=5) | JUNK,
        "reasoning": st.text(max_size=5),
        "tool_calls": st.lists(_tool_entry, max_size=3) | JUNK,
    },
)
_choice = st.fixed_dictionaries(
    {"index": st.just(0) | JUNK},
    optional={"delta": _delta | JUNK, "finish_reason": st.sampled_from(["stop", "length", "tool_calls", None]) | JUNK, "stop_reason": st.sampled_from(["END", None])},
)
CHUNK = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(_choice, max_size=2) | JUNK,
        "usage": st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9) | JUNK, "completion_tokens": st.integers(0, 9) | JUNK}) | JUNK,
        "error": st.none() | st.fixed_dictionaries({"message": st.text(max_size=5)}) | JUNK,
    },
) | JUNK
REQUESTS = st.sampled_from([PLAIN, THINKING, STOPPING])


@settings(max_examples=300)
@given(REQUESTS, st.lists(CHUNK, max_size=12), st.sampled_from(["finish", "done", "error"]))
def test_arbitrary_chunks_never_raise_and_stay_well_formed(request, chunks, ending):
    translator = an.StreamTranslator(request, "msg_p")
    out = [translator.feed_chunk(c) for c in chunks]
    if ending == "done":
        out.append(translator.feed(b"data: [DONE]\n\n"))
    elif ending == "error":
        out.append(translator.error_event(errors.upstream_error("boom")))
    out.append(translator.finish())
    check_well_formed(events(b"".join(out)))
    assert translator.done


@settings(max_examples=200)
@given(REQUESTS, st.lists(CHUNK, max_size=10), st.booleans(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_of_the_upstream_bytes_yields_the_same_events(request, chunks, done, cuts):
    raw = sse(*chunks, done=done)
    whole = an.StreamTranslator(request, "msg_p")
    expected = whole.feed(raw) + whole.finish()
    split = an.StreamTranslator(request, "msg_p")
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    got = b"".join(split.feed(raw[a:b]) for a, b in zip(bounds, bounds[1:])) + split.finish()
    assert got == expected
    check_well_formed(events(got))


_arguments = st.text(st.characters(codec="utf-8"), max_size=12)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["f", "g"]), st.lists(_arguments, max_size=4)), min_size=1, max_size=3))
def test_sequential_tool_arguments_are_never_lost(calls):
    chunks = []
    for index, (name, pieces) in enumerate(calls):
        chunks.append(tool_delta(index, pieces[0] if pieces else None, f"call_{index}", name))
        chunks.extend(tool_delta(index, piece) for piece in pieces[1:])
    parsed = run(PLAIN, sse(*chunks, delta("tool_calls")))
    check_well_formed(parsed)
    for index, (_, pieces) in enumerate(calls):
        assert partial_json(parsed, index) == "".join(pieces)


# --- whatever the upstream sends: lone surrogates, odd shapes -------------------------------

SURROGATE = "\udc80"  # what JSON "\udc80" parses to: a str with no UTF-8 encoding
# Text with lone surrogates among quotes, escapes, controls and non-ASCII (st.text never yields surrogates).
WILD = st.lists(st.sampled_from([SURROGATE, "\ud83d", "a", "é", '"', "\\", "\n", "\x01"]) | st.characters(), max_size=6).map("".join)


def json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def test_a_reply_holding_lone_surrogates_translates_and_counts_their_bytes():
    reply = completion({"content": "a" + SURROGATE, "reasoning_content": SURROGATE, "tool_calls": [call('{"q":"' + SURROGATE + '"}')]}, "tool_calls")
    message = an.from_openai(reply, THINKING)
    assert message["content"][:2] == [{"type": "thinking", "thinking": SURROGATE, "signature": ""}, {"type": "text", "text": "a" + SURROGATE}]
    assert message["content"][2]["input"] == {"q": SURROGATE}
    assert message["usage"]["output_tokens"] == 3 + 4 + len('{"q":""}') + 3


def test_a_stream_holding_lone_surrogates_is_never_cut_short():
    raw = sse(  # json.dumps escapes the surrogates as "\udc80", as an upstream would send them
        delta(reasoning_content=SURROGATE), delta(content="a" + SURROGATE),
        tool_delta(0, '{"q":"' + SURROGATE, "call_" + SURROGATE, "f" + SURROGATE), tool_delta(0, '"}'), delta("tool_calls"),
    )
    translator = an.StreamTranslator(THINKING, "msg_s")
    parsed = events(translator.start() + translator.feed(raw) + translator.finish())  # events() decodes strict UTF-8
    check_well_formed(parsed)
    assert names(parsed)[-1] == "message_stop"
    assert deltas(parsed, 0)[0] == {"type": "thinking_delta", "thinking": SURROGATE}
    assert deltas(parsed, 1) == [{"type": "text_delta", "text": "a" + SURROGATE}]
    tool_start = next(p["content_block"] for n, p in parsed if n == "content_block_start" and p["index"] == 2)
    assert tool_start["name"] == "f" + SURROGATE and partial_json(parsed, 2) == '{"q":"' + SURROGATE + '"}'
    assert translator.output_tokens == 3 + 4 + len('{"q":"') + 3 + 2


def test_a_raw_utf8_encoded_surrogate_is_read_as_json_loads_reads_it():
    payload = NEURON_HEAD + b',"choices":[{"index":0,"delta":{"content":"\xed\xb2\x80"},"finish_reason":null}]}'
    parsed = run(PLAIN, b"data: " + payload + b"\n\n" + sse(delta("stop")))
    assert deltas(parsed, 0) == [{"type": "text_delta", "text": SURROGATE}] and names(parsed)[-1] == "message_stop"


def test_an_upstream_error_holding_a_lone_surrogate_is_still_an_error_event():
    parsed = run(PLAIN, sse({"error": {"message": "bad " + SURROGATE}}))
    assert parsed[-1][0] == "error" and parsed[-1][1]["error"]["message"].endswith("bad " + SURROGATE)
    assert json.loads(an.error_bytes(ApiError(502, SURROGATE)).decode())["error"]["message"] == SURROGATE


def test_content_parts_and_object_arguments_count_at_their_json_size():
    parts = [{"type": "text", "text": "héllo"}, {"type": "text", "text": " you"}]
    arguments = {"city": "Paris"}
    object_call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = an.from_openai(completion({"content": parts, "tool_calls": [object_call]}, "tool_calls"), PLAIN)
    assert message["content"][0] == {"type": "text", "text": "héllo you"} and message["content"][1]["input"] == arguments
    assert message["usage"]["output_tokens"] == json_size(parts) + json_size(arguments)


def test_streamed_content_parts_and_object_arguments_are_counted():
    parts = [{"type": "text", "text": "hé"}]
    translator = an.StreamTranslator(PLAIN, "msg_s")
    translator.feed(sse(delta(content=parts), delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": {"x": 1}}}]), done=False))
    assert translator.output_tokens == json_size(parts) + json_size({"x": 1})


_wild_tool = st.fixed_dictionaries({"index": st.integers(0, 1), "id": WILD, "function": st.fixed_dictionaries({}, optional={"name": WILD, "arguments": WILD | JUNK})})
_wild_delta = st.fixed_dictionaries({}, optional={"content": WILD | JUNK, "reasoning_content": WILD, "tool_calls": st.lists(_wild_tool, max_size=2)})
WILD_CHUNK = st.one_of(
    st.builds(lambda d, f: delta(f, **d), _wild_delta, st.sampled_from([None, "stop", "tool_calls"])),
    st.builds(lambda m: {"error": {"message": m}}, WILD),
)


@settings(max_examples=300)
@given(st.sampled_from([PLAIN, THINKING]), st.lists(WILD_CHUNK, max_size=8), st.booleans())
def test_any_upstream_strings_stream_out_whole_and_are_never_under_counted(request, chunks, done):
    translator = an.StreamTranslator(request, "msg_w")
    parsed = events(translator.start() + translator.feed(sse(*chunks, done=done)) + translator.finish())
    check_well_formed(parsed)
    assert translator.done and names(parsed)[-1] in ("message_stop", "error")
    shown = [d.get("text") or d.get("thinking") or d.get("partial_json") or "" for n, p in parsed if n == "content_block_delta" for d in [p["delta"]]]
    assert translator.output_tokens >= sum(utf8_size(s) for s in shown)


@given(WILD | JUNK, WILD, WILD | JUNK)
def test_any_reply_strings_translate_and_are_never_under_counted(content, reasoning, arguments):
    reply = completion({"content": content, "reasoning_content": reasoning, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}]})
    message = an.from_openai(reply, THINKING)
    shown = [b.get("text") or b.get("thinking") or "" for b in message["content"]]
    assert message["usage"]["output_tokens"] >= sum(utf8_size(s) for s in shown)


# --- the plain-text fast path: read without parsing, the same as parsed ----------------------

NEURON_HEAD = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1754000000,"model":"m","system_fingerprint":"neuron-mock"'
NEURON_TAIL = b'"},"logprobs":null,"finish_reason":null}],"usage":null}'


def neuron_chunk(text: str) -> bytes:
    return b"data: " + NEURON_HEAD + b',"choices":[{"index":0,"delta":{"content":' + json.dumps(text, ensure_ascii=False).encode() + NEURON_TAIL[1:] + b"\n\n"


def test_a_neuron_text_stream_is_not_parsed_chunk_by_chunk(monkeypatch):
    parsed_payloads: list[bytes] = []
    parse = an._json_value
    monkeypatch.setattr(an, "_json_value", lambda data: parsed_payloads.append(data) or parse(data))
    translator = an.StreamTranslator(PLAIN, "msg_f")
    words = ["Hel", "lo", " wörld", "!"] * 10
    out = translator.start() + b"".join(translator.feed(neuron_chunk(w)) for w in words) + translator.finish()
    assert len(parsed_payloads) <= 1  # the head, once: every chunk after it is sliced, not parsed
    assert "".join(d["text"] for d in deltas(events(out), 0)) == "".join(words)
    assert translator.output_tokens == len("".join(words).encode())


_HEADS = [NEURON_HEAD, b'{"id":"x"', b" {\"id\": 1 ", b"\xef\xbb\xbf{\"id\":\"x\"", b'{"model":"q\\"\\u00e9"', b'{"model":"\xc3\xa9"',
          b"{", b"{,", b'{"id":"x",', b'{"id":"x"}', b'{"a":[1', b'{"model":"\xff"', b'{"id":"\x01"', b"",
          b'{"usage":{"prompt_tokens":1}', b'{"error":{"message":"e"}', b'{"choices":[]']
_MARKS = [b',"choices":[{"index":0,"delta":{"content":"', b',"choices":[{"index":1,"delta":{"content":"', b',"choices":[{"index":0,"delta":{"role":"assistant","content":"']
_TAILS = [NEURON_TAIL, b'"},"finish_reason":null}]}', b'"},"logprobs":null,"finish_reason":null}]}', b'"},"finish_reason":null}],"usage":null}',
          b'"},"finish_reason":"stop"}]}', b'"},"finish_reason":null,"stop_reason":"END"}]}', b'"},"finish_reason":null}],"usage":{"prompt_tokens":2}}',
          b'"}}]}', b'"},"finish_reason":null}]}x', b'"}']
_texts = st.one_of(
    WILD.map(lambda t: t.encode("utf-8", "surrogatepass")),  # raw: maybe quotes, backslashes, controls, encoded surrogates
    WILD.map(lambda t: json.dumps(t, ensure_ascii=False).encode("utf-8", "surrogatepass")[1:-1]),
    WILD.map(lambda t: json.dumps(t).encode()[1:-1]),
    st.binary(max_size=6),
).map(lambda raw: raw.replace(b"\r", b" ").replace(b"\n", b" "))  # one payload, one data line
_shaped = st.builds(lambda *parts: b"".join(parts), st.sampled_from(_HEADS), st.sampled_from(_MARKS), _texts, st.sampled_from(_TAILS))


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


@settings(max_examples=500)
@given(REQUESTS, st.lists(_shaped, max_size=6), st.booleans())
def test_chunks_read_without_parsing_translate_as_parsed_ones(request, payloads, done):
    sliced = an.StreamTranslator(request, "msg_p")
    got = b"".join(sliced.feed(b"data: " + p + b"\n\n") for p in payloads) + sliced.feed(b"data: [DONE]\n\n" if done else b"") + sliced.finish()
    parsed = an.StreamTranslator(request, "msg_p")
    expected = b"".join(parsed.feed_chunk(_loads(p)) for p in payloads) + (parsed.feed(b"data: [DONE]\n\n") if done else b"") + parsed.finish()
    assert got == expected and sliced.output_tokens == parsed.output_tokens
    check_well_formed(events(got))


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
        (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (504, "timeout_error"),
        (529, "overloaded_error"), (405, "invalid_request_error"),
    ],
)
def test_each_status_has_its_anthropic_error_type(status, type_):
    assert an.error_body(ApiError(status, "m"))["error"] == {"type": type_, "message": "m"}


def test_no_upstream_available_is_529_overloaded():
    err = errors.service_unavailable("No healthy neuron is serving `m` right now.", 2)
    assert an.error_status(err) == 529 and an.error_body(err)["error"]["type"] == "overloaded_error"
    assert (b"retry-after", b"2") in an.error_headers(err)


def test_the_error_body_and_headers_carry_the_request_id():
    err = errors.model_not_found("m")
    assert an.error_body(err, "req_1") == {"type": "error", "error": {"type": "not_found_error", "message": err.message}, "request_id": "req_1"}
    assert (b"request-id", b"req_1") in an.error_headers(err, "req_1")


def test_a_balance_refusal_is_a_spend_limit_rate_limit_error_with_no_retry_after():
    err = refusal_error(Refusal("balance", "key", "k1", "The key's balance is spent.", None), 1.0)
    error = an.error_body(err)["error"]
    assert error["type"] == "rate_limit_error" and error["details"] == {"error_code": "enforced_spend_limit_reached"}
    headers = dict(an.error_headers(err))
    assert headers[b"x-should-retry"] == b"false" and b"retry-after" not in headers and b"retry-after-ms" not in headers


def test_a_window_refusal_is_a_rate_limit_error_with_retry_after():
    err = refusal_error(Refusal("window", "key", "k1", "Window full.", 2.5), 1.0)
    assert an.error_body(err)["error"]["type"] == "rate_limit_error" and "details" not in an.error_body(err)["error"]
    assert dict(an.error_headers(err))[b"retry-after"] == b"3" and dict(an.error_headers(err))[b"retry-after-ms"] == b"2500"


def test_a_prompt_over_the_context_reads_like_anthropics_own_message():
    err = errors.context_length_exceeded(9000, 100, 8192)
    assert an.error_body(err)["error"] == {"type": "invalid_request_error", "message": "prompt is too long: 9000 tokens > 8192 maximum"}


def test_a_prompt_that_fits_but_not_with_max_tokens_says_which_to_decrease():
    message = an.error_message(errors.context_length_exceeded(6000, 4000, 8192))
    assert message.startswith("input length and `max_tokens` exceed context limit: 6000 + 4000 > 8192")


def test_a_mid_stream_error_is_an_anthropic_error_event():
    assert events(an.error_event(errors.server_overloaded("busy", 1))) == [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    ]


# --- models and rate-limit headers ----------------------------------------------------------


def test_models_list_in_anthropic_shape():
    listed = an.models_list({"object": "list", "data": [{"id": "a", "object": "model", "created": 0}, {"id": "b", "created": 1700000000}]})
    assert listed == {
        "data": [
            {"type": "model", "id": "a", "display_name": "a", "created_at": "1970-01-01T00:00:00Z"},
            {"type": "model", "id": "b", "display_name": "b", "created_at": "2023-11-14T22:13:20Z"},
        ],
        "has_more": False, "first_id": "a", "last_id": "b",
    }


def test_ratelimit_headers_reset_is_rfc3339():
    assert an.ratelimit_headers(1000, 250, 1700000000.4) == [
        (b"anthropic-ratelimit-tokens-limit", b"1000"),
        (b"anthropic-ratelimit-tokens-remaining", b"250"),
        (b"anthropic-ratelimit-tokens-reset", b"2023-11-14T22:13:20Z"),
    ]


# --- the official SDK reads what we write ---------------------------------------------------

anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")


def sdk_client(reply: Any, captured: list[dict[str, Any]] | None = None) -> Any:
    """An Anthropic client whose transport answers in memory: `reply(request) -> (status, headers, bytes)`."""

    def handle(http_request: Any) -> Any:
        sent = json.loads(http_request.content)
        if captured is not None:
            captured.append(sent)
        status, headers, content = reply(an.to_openai(sent) if http_request.url.path == "/v1/messages" else sent)
        return httpx2.Response(status, headers=headers, content=content)

    transport = httpx2.MockTransport(handle)
    return anthropic.Anthropic(api_key="sk-cx-test", base_url="http://cortex.test", max_retries=0, http_client=httpx2.Client(transport=transport))


def answer_json(make_completion: Any) -> Any:
    def reply(request: an.AnthropicRequest) -> tuple[int, dict[str, str], bytes]:
        return 200, {"content-type": "application/json"}, json.dumps(an.from_openai(make_completion(request), request, "msg_sdk")).encode()

    return reply


def answer_stream(raw: bytes) -> Any:
    def reply(request: an.AnthropicRequest) -> tuple[int, dict[str, str], bytes]:
        translator = an.StreamTranslator(request, "msg_sdk", input_tokens=3)
        return 200, {"content-type": "text/event-stream"}, translator.start() + translator.feed(raw) + translator.finish()

    return reply


TOOL_REPLY = completion(
    {"content": "Checking.", "reasoning_content": "Need weather.", "tool_calls": [call('{"city":"Paris"}'), call('{"city":"Rome"}', "call_2")]},
    "tool_calls", usage={"prompt_tokens": 20, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}},
)


def test_the_sdk_validates_a_non_streamed_message():
    message = anthropic.types.Message.model_validate(an.from_openai(TOOL_REPLY, THINKING, "msg_1"))
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[2].input == {"city": "Paris"} and message.usage.cache_read_input_tokens == 4


def test_the_sdk_round_trips_a_tool_call_through_create():
    captured: list[dict[str, Any]] = []
    client = sdk_client(answer_json(lambda _: TOOL_REPLY), captured)
    first = client.messages.create(model="qwen3", max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather?"}])
    assert first.stop_reason == "tool_use" and [b.input for b in first.content if b.type == "tool_use"] == [{"city": "Paris"}, {"city": "Rome"}]
    results = [{"type": "tool_result", "tool_use_id": b.id, "content": "18C"} for b in first.content if b.type == "tool_use"]
    client.messages.create(
        model="qwen3", max_tokens=64, tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": first.content}, {"role": "user", "content": results}],
    )
    replayed = an.to_openai(captured[1]).gen.messages
    assert [m["role"] for m in replayed] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in replayed[1]["tool_calls"]] == [m["tool_call_id"] for m in replayed[2:]]


def test_the_sdk_stream_accumulates_text_and_tool_input():
    raw = sse(
        delta(role="assistant", content=""), delta(content="Check"), delta(content="ing."),
        tool_delta(0, "", "call_a", "get_weather"), tool_delta(0, '{"city":'), tool_delta(0, '"Paris"}'),
        tool_delta(1, '{"city":"Rome"}', "call_b", "get_weather"), delta("tool_calls"), USAGE,
    )
    client = sdk_client(answer_stream(raw))
    with client.messages.stream(model="qwen3", max_tokens=64, tools=[WEATHER], messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Checking." and final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 5)


def test_the_sdk_stream_accumulates_thinking_without_showing_it_as_text():
    raw = sse(delta(reasoning_content="Hmm"), delta(content="42"), delta("stop"))
    client = sdk_client(answer_stream(raw))
    with client.messages.stream(model="qwen3", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "42" and final.content[0].type == "thinking" and final.content[0].thinking == "Hmm"


def test_the_sdk_raises_a_mid_stream_error_event():
    client = sdk_client(answer_stream(sse(delta(content="x"), done=False)))
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(model="qwen3", max_tokens=8, messages=HELLO) as stream:
        stream.get_final_message()


def answer_error(err: ApiError) -> Any:
    def reply(_: Any) -> tuple[int, dict[str, str], bytes]:
        headers = {k.decode(): v.decode() for k, v in an.error_headers(err, "req_e")} | {"content-type": "application/json"}
        return an.error_status(err), headers, an.error_bytes(err, "req_e")

    return reply


@pytest.mark.parametrize(
    ("err", "exception"),
    [
        (ApiError(400, "bad"), "BadRequestError"),
        (ApiError(401, "no key"), "AuthenticationError"),
        (ApiError(403, "no"), "PermissionDeniedError"),
        (errors.model_not_found("m"), "NotFoundError"),
        (errors.payload_too_large(10), "RequestTooLargeError"),
        (refusal_error(Refusal("window", "key", "k", "Window full.", 1.0), 1.0), "RateLimitError"),
        (ApiError(500, "bug", type="server_error"), "InternalServerError"),
        (errors.service_unavailable("No healthy neuron.", 1), "OverloadedError"),
        (errors.upstream_timeout("slow"), "InternalServerError"),
    ],
)
def test_each_error_row_raises_the_sdks_exception_class(err, exception):
    with pytest.raises(getattr(anthropic, exception)) as info:
        sdk_client(answer_error(err)).messages.create(model="qwen3", max_tokens=8, messages=HELLO)
    assert info.value.request_id == "req_e"


def test_the_sdk_raises_a_spent_balance_as_rate_limit_error_with_its_error_code():
    err = refusal_error(Refusal("balance", "key", "k", "Balance spent.", None), 1.0)
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk_client(answer_error(err)).messages.create(model="qwen3", max_tokens=8, messages=HELLO)
    assert info.value.error_code == "enforced_spend_limit_reached"


def test_the_sdks_count_tokens_request_is_accepted():
    def reply(sent: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        return 200, {"content-type": "application/json"}, json.dumps(an.count_tokens_body(an.count_tokens_request(sent))).encode()

    counted = sdk_client(reply).messages.count_tokens(model="qwen3", messages=HELLO, system="S", tools=[WEATHER])
    assert counted.input_tokens > 0
