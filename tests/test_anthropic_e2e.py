"""The Anthropic surface end to end: the official `anthropic` SDK against real
cortex and neuron processes, with the same hard budgets as the OpenAI path."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
import trio

from cortex.fleet.transport import H11Transport
from tests.budget_helpers import HI_PROMPT_TOKENS, MODEL, budget_cortex, create_key, usage
from tests.conftest import Stack, wait_until

USER_HI = [{"role": "user", "content": "hi"}]


def client(cortex, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=cortex.url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pair(shared_stack: Stack):
    neuron = shared_stack.neuron("--token-interval-ms", "1", "--context-length", "4000")
    cortex = budget_cortex(shared_stack, neuron)
    return neuron, cortex


def test_messages_create_returns_a_message_with_usage_and_request_id(pair):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    raw = client(cortex, key).messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=USER_HI)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.content[0].type == "text" and len(message.content[0].text) == 20
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 20 and message.usage.input_tokens > 0
    assert raw.headers["request-id"] and raw.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert raw.headers["anthropic-ratelimit-tokens-remaining"]
    spent = usage(cortex, key_id)["usage"]["spent_tokens"]
    assert spent == message.usage.input_tokens + message.usage.output_tokens


def test_messages_stream_gives_text_and_a_final_message(pair):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    with client(cortex, key).messages.stream(model=MODEL, max_tokens=30, messages=USER_HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text) == 30 and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 30
    view = usage(cortex, key_id)["usage"]
    assert view["spent_tokens"] == final.usage.input_tokens + 30 and view["held_tokens"] == 0


def test_count_tokens_is_the_prompt_bound_the_budget_holds(pair):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    c = client(cortex, key)
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    counted = c.messages.count_tokens(model=MODEL, system=system, messages=USER_HI)
    c.messages.create(model=MODEL, max_tokens=7, system=system, messages=USER_HI)
    held = usage(cortex, key_id)["recent"][0]["held_tokens"]
    assert counted.input_tokens > 0 and held == counted.input_tokens + 7


@pytest.mark.parametrize(
    ("kwargs", "error", "status", "text"),
    [
        ({"model": "no-such-model", "max_tokens": 5, "messages": USER_HI}, anthropic.NotFoundError, 404, "no-such-model"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, anthropic.BadRequestError, 400, "messages"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "nope"}]}]},
         anthropic.BadRequestError, 400, "messages.0.content.0"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 4100}]},
         anthropic.BadRequestError, 400, "prompt is too long: "),
        ({"model": MODEL, "max_tokens": 3000, "messages": [{"role": "user", "content": "x" * 2000}]},
         anthropic.BadRequestError, 400, "input length and `max_tokens` exceed context limit"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "hi"}]},
         anthropic.BadRequestError, 400, "messages"),
        ({"model": MODEL, "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "ok"}]}]},
         anthropic.BadRequestError, 400, "tool_use"),
        ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}]}]},
         anthropic.BadRequestError, 400, "messages.0.content.0.source"),
    ],
    ids=["unknown-model", "empty-messages", "unknown-block", "prompt-too-long", "prompt-plus-output-too-long",
         "starts-with-assistant", "orphan-tool-result", "malformed-image"],
)
def test_errors_come_in_anthropics_shape_as_the_sdks_exceptions(pair, kwargs, error, status, text):
    neuron, cortex = pair
    _, key = create_key(cortex, balance_tokens=100_000)
    before = neuron.get_json("/health")["requests_total"]
    with pytest.raises(error) as info:
        client(cortex, key).messages.create(**kwargs)
    assert info.value.status_code == status and text in info.value.message
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] and body["request_id"]
    assert neuron.get_json("/health")["requests_total"] == before


def test_a_missing_max_tokens_is_a_400_in_anthropics_shape(pair):
    _, cortex = pair
    _, key = create_key(cortex, balance_tokens=100_000)
    r = httpx.post(
        cortex.url + "/v1/messages", json={"model": MODEL, "messages": USER_HI},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"}, timeout=30,
    )
    assert r.status_code == 400 and r.headers["request-id"]
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_a_bad_key_is_an_authentication_error(pair):
    _, cortex = pair
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(cortex, "sk-cx-nope").messages.create(model=MODEL, max_tokens=5, messages=USER_HI)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_a_spent_balance_is_a_rate_limit_error_with_the_spend_limit_code(pair):
    _, cortex = pair
    _, key = create_key(cortex, balance_tokens=10)
    with pytest.raises(anthropic.RateLimitError) as info:
        client(cortex, key).messages.create(model=MODEL, max_tokens=50, messages=USER_HI)
    assert info.value.body["error"]["details"]["error_code"] == "enforced_spend_limit_reached"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in info.value.response.headers


def test_a_window_refusal_is_a_rate_limit_error_with_retry_after(pair):
    _, cortex = pair
    _, key = create_key(cortex, window_tokens=100, window_seconds=60)
    c = client(cortex, key)
    c.messages.create(model=MODEL, max_tokens=60, messages=USER_HI)
    with pytest.raises(anthropic.RateLimitError) as info:
        c.messages.create(model=MODEL, max_tokens=60, messages=USER_HI)
    headers = info.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert info.value.body["error"]["type"] == "rate_limit_error"


def test_no_healthy_upstream_is_529_overloaded(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, config="[fleet]\npoll_interval_s = 0.2\npoll_timeout_s = 0.2\n")
    _, key = create_key(cortex, balance_tokens=1000)
    neuron.kill()
    wait_until(lambda: httpx.get(cortex.url + "/health", timeout=5).status_code == 503)
    with pytest.raises(anthropic.OverloadedError) as info:
        client(cortex, key).messages.create(model=MODEL, max_tokens=5, messages=USER_HI)
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"


def test_a_body_over_the_limit_is_413_request_too_large(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, config="[server]\nmax_body_bytes = 2000\n")
    _, key = create_key(cortex, balance_tokens=1000)
    with pytest.raises(anthropic.ContentTooLargeError) as info:
        client(cortex, key).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x" * 3000}])
    assert info.value.body["error"]["type"] == "request_too_large"


def test_an_upstream_past_its_first_byte_deadline_is_504_timeout_error(stack: Stack):
    neuron = stack.neuron("--ttft-ms", "3000")
    cortex = budget_cortex(stack, neuron, config="[upstream]\nfirst_byte_timeout_s = 0.5\n")
    key_id, key = create_key(cortex, balance_tokens=1000)
    with pytest.raises(anthropic.GatewayTimeoutError) as info:
        client(cortex, key).messages.create(model=MODEL, max_tokens=5, messages=USER_HI)
    assert info.value.body["error"]["type"] == "timeout_error"
    assert usage(cortex, key_id)["usage"]["held_tokens"] == 0


def test_models_list_has_anthropics_shape_when_asked_by_the_sdk(pair):
    _, cortex = pair
    _, key = create_key(cortex, balance_tokens=10)
    page = client(cortex, key).models.list()
    assert [m.id for m in page.data] == [MODEL] and page.data[0].type == "model"
    assert httpx.get(cortex.url + "/v1/models", timeout=10).json()["object"] == "list"  # OpenAI's shape otherwise


def test_a_claude_code_shaped_request_streams(pair):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    body = {
        "model": MODEL, "max_tokens": 64, "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        "metadata": {"user_id": "user_abc_account_def_session_123"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{"name": "Read", "description": "Read a file",
                   "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}],
    }
    headers = {
        "x-api-key": key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    }
    with httpx.stream("POST", cortex.url + "/v1/messages?beta=true", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events and "message_delta" in events
    assert usage(cortex, key_id)["usage"]["held_tokens"] == 0


def test_a_client_leaving_mid_stream_is_charged_what_was_produced(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "20", "--reply-tokens", "2000")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    with client(cortex, key).messages.stream(model=MODEL, max_tokens=2000, messages=USER_HI) as stream:
        pieces = []
        for piece in stream.text_stream:
            pieces.append(piece)
            if len(pieces) == 5:
                break
    wait_until(lambda: neuron.get_json("/health")["cancelled_total"] == 1)
    view = wait_until(lambda: (u := usage(cortex, key_id)["usage"])["in_flight"] == 0 and u)
    assert view["held_tokens"] == 0 and 5 <= view["spent_tokens"] - HI_PROMPT_TOKENS < 2000


async def test_a0_fan_out_on_messages_never_overshoots_and_refuses_with_the_spend_limit_code(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "2")
    cortex = budget_cortex(stack, neuron)
    probe_id, probe = create_key(cortex, balance_tokens=100_000)
    client(cortex, probe).messages.create(model=MODEL, max_tokens=10, messages=USER_HI)
    cost = usage(cortex, probe_id)["recent"][0]["held_tokens"]
    served_max = 37
    key_id, key = create_key(cortex, balance_tokens=served_max * cost + cost - 1)
    before = neuron.get_json("/health")["requests_total"]
    statuses: list[int] = []
    codes: list[str] = []
    body = {"model": MODEL, "max_tokens": 10, "messages": USER_HI}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}

    async def one(http: httpx.AsyncClient) -> None:
        r = await http.post(cortex.url + "/v1/messages", json=body, headers=headers)
        statuses.append(r.status_code)
        if r.status_code == 429:
            codes.append(r.json()["error"]["details"]["error_code"])

    async with httpx.AsyncClient(transport=H11Transport(), timeout=60) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one, http)
    assert statuses.count(200) == served_max and statuses.count(429) == 200 - served_max
    assert set(codes) == {"enforced_spend_limit_reached"}
    assert neuron.get_json("/health")["requests_total"] - before == served_max
    view = usage(cortex, key_id)["usage"]
    assert view["spent_tokens"] <= view["limits"]["balance_tokens"] and view["held_tokens"] == 0


def test_a_silent_upstream_gets_ping_events_so_agents_do_not_time_out(stack: Stack):
    neuron = stack.neuron("--ttft-ms", "1500")
    cortex = budget_cortex(stack, neuron, config="[server]\nstream_ping_interval_s = 0.3\n")
    _, key = create_key(cortex, balance_tokens=10_000)
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": USER_HI}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", cortex.url + "/v1/messages", json=body, headers=headers, timeout=60) as r:
        events = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    first_text = events.index("content_block_start")
    assert events[:first_text].count("ping") >= 2  # during the 1.5 s before the first token


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_an_upstream_that_sends_its_head_then_prefills_past_a_ping_is_relayed_whole(stack: Stack):
    # vLLM and TGI send the response head at once and the first chunk only after prefill: the wait
    # for that chunk may time out into pings, but the read must go on (a cancelled read ends the body).
    from tests.fake_upstream import FakeUpstream

    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    frames = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": HI_PROMPT_TOKENS + 2}}]
    body = b"".join(_chunked(b"data: " + json.dumps(f).encode() + b"\n\n") for f in frames)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    fake = FakeUpstream([(0.0, head), (1.2, body + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")])
    try:
        cortex = budget_cortex(stack, fake, config="[server]\nstream_ping_interval_s = 0.3\n")
        key_id, key = create_key(cortex, balance_tokens=10_000)
        body_json = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": USER_HI}
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        with httpx.stream("POST", cortex.url + "/v1/messages", json=body_json, headers=headers, timeout=60) as r:
            events = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
        assert events[0] == "message_start" and events[-1] == "message_stop" and "error" not in events
        assert events.count("ping") >= 2 and "content_block_delta" in events
        assert usage(cortex, key_id)["recent"][0]["state"] == "settled"
    finally:
        fake.close()


WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                     "required": ["city", "days"]},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_full_tool_round_trip(pair, stream):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    c = client(cortex, key)
    ask = [{"role": "user", "content": "What is the weather? Use get_weather."}]

    def call(messages):
        if not stream:
            return c.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
        with c.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages) as s:
            for _ in s:
                pass
            return s.get_final_message()

    first = call(ask)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input["city"], str) and isinstance(use.input["days"], int)
    answer = call([
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},
    ])
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text" and answer.content[0].text
    view = usage(cortex, key_id)["usage"]
    charged = sum(r["charged_tokens"] for r in usage(cortex, key_id)["recent"])
    assert view["held_tokens"] == 0 and view["spent_tokens"] == charged
    assert charged >= first.usage.output_tokens + answer.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_thinking_comes_back_as_thinking_blocks_and_counts_as_output(pair, stream):
    _, cortex = pair
    key_id, key = create_key(cortex, balance_tokens=100_000)
    c = client(cortex, key)
    kwargs = {"model": MODEL, "max_tokens": 300, "messages": USER_HI, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    if stream:
        with c.messages.stream(**kwargs) as s:
            for _ in s:
                pass
            message = s.get_final_message()
    else:
        message = c.messages.create(**kwargs)
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and "text" in kinds
    thinking = message.content[0].thinking
    text = "".join(b.text for b in message.content if b.type == "text")
    assert thinking and thinking not in text  # never replayed as visible text
    assert message.usage.output_tokens == len(thinking.encode()) + len(text.encode())
    recent = usage(cortex, key_id)["recent"][0]
    assert recent["charged_tokens"] == message.usage.input_tokens + message.usage.output_tokens
