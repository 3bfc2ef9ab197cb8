"""The pure cores: validation, tokenizer, mock engine, SSE relay, fleet registry."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ApiError
from common.openai_schema import chat_request, completion_request, parse_json_object
from cortex.fleet.kinds import KINDS
from cortex.fleet.registry import Fleet, ModelInfo, model_info
from cortex.relay import SSEDecoder, SSEProtocolError, StreamRelay, event_data
from common import counting
from neuron.engines.mock import Pacing, plan_reply

HELLO = [{"role": "user", "content": "Hello"}]


# --- validation ---------------------------------------------------------------


def test_chat_request_prefers_max_completion_tokens():
    gen = chat_request({"model": "m", "messages": HELLO, "max_tokens": 10, "max_completion_tokens": 20})
    assert gen.max_output_tokens == 20


def test_chat_request_without_limit_leaves_it_open():
    assert chat_request({"model": "m", "messages": HELLO}).max_output_tokens is None


def test_completions_default_to_sixteen_tokens_like_openai():
    assert completion_request({"model": "m", "prompt": "x"}).max_output_tokens == 16


def test_booleans_are_not_integers():
    with pytest.raises(ApiError) as info:
        chat_request({"model": "m", "messages": HELLO, "max_tokens": True})
    assert info.value.param == "max_tokens"


def test_unknown_fields_pass_through():
    gen = chat_request({"model": "m", "messages": HELLO, "reasoning_effort": "low"})
    assert gen.body["reasoning_effort"] == "low"


def test_invalid_utf8_is_invalid_json():
    with pytest.raises(ApiError) as info:
        parse_json_object(b'{"model": "\xff"}')
    assert info.value.status == 400 and info.value.code == "invalid_json"


# --- tokenizer and mock engine --------------------------------------------------


def test_chat_prompt_tokens_are_bytes_plus_template_overhead():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo", "name": "ann"}]
    expected = (
        counting.REPLY_PRIMER_TOKENS
        + 2 * counting.MESSAGE_OVERHEAD_TOKENS
        + len("Be brief.")
        + len("héllo".encode())
        + len("ann")
    )
    assert counting.count_chat(messages) == expected


def test_text_parts_count_and_other_parts_do_not():
    parts = [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "image_url", "image_url": {}}]}]
    assert counting.count_chat(parts) == counting.REPLY_PRIMER_TOKENS + counting.MESSAGE_OVERHEAD_TOKENS + 2


@given(st.text(max_size=50), st.integers(0, 300), st.integers(0, 300), st.integers(-5, 5))
def test_mock_reply_is_deterministic_and_within_limits(prompt, natural, limit, seed):
    a = plan_reply(seed, None, prompt, natural, limit, [])
    b = plan_reply(seed, None, prompt, natural, limit, [])
    assert a == b
    assert a.tokens == min(natural, limit) == len(a.text.encode())
    assert a.finish_reason == ("length" if limit < natural else "stop")


def test_mock_reply_depends_on_prompt_and_seeds():
    base = plan_reply(0, None, "a", 64, 64, []).text
    assert plan_reply(0, None, "b", 64, 64, []).text != base
    assert plan_reply(1, None, "a", 64, 64, []).text != base
    assert plan_reply(0, 7, "a", 64, 64, []).text != base


def test_mock_stop_cuts_before_the_earliest_stop_sequence():
    full = plan_reply(0, None, "p", 100, 100, []).text
    stops = [full[50:53], full[30:33]]
    cut = plan_reply(0, None, "p", 100, 100, stops)
    assert cut.text == full[: min(full.index(s) for s in stops)]
    assert cut.finish_reason == "stop"


def test_pacing_is_time_to_first_token_then_fixed_interval():
    pacing = Pacing(ttft_s=0.5, token_interval_s=0.1)
    assert pacing.token_due(10.0, 0) == 10.5
    assert pacing.token_due(10.0, 3) == pytest.approx(10.8)


# --- SSE relay --------------------------------------------------------------------


def test_sse_decoder_reassembles_events_split_anywhere():
    stream = b"data: one\n\ndata: two\n\n: comment\n\ndata: [DONE]\n\n"
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [event_data(e) for e in events] == [b"one", b"two", b"", b"[DONE]"]


def test_sse_decoder_accepts_crlf():
    assert [event_data(e) for e in SSEDecoder().feed(b"data: x\r\n\r\n")] == [b"x"]


def test_sse_decoder_bounds_an_endless_event():
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: " + b"x" * 200)


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'


def test_relay_records_and_drops_the_usage_frame_the_client_did_not_ask_for():
    relay = StreamRelay(client_wants_usage=False)
    out = relay.feed(TOKEN + TOKEN + USAGE + b"data: [DONE]\n\n")
    assert out == TOKEN + TOKEN + b"data: [DONE]\n\n"
    assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert relay.data_events == 2 and not relay.truncated


def test_relay_forwards_the_usage_frame_when_asked():
    relay = StreamRelay(client_wants_usage=True)
    assert relay.feed(TOKEN + USAGE) == TOKEN + USAGE
    assert relay.truncated  # no [DONE] yet


# --- fleet registry ---------------------------------------------------------------

M = {"m": ModelInfo("m", 100, 10)}


def test_unpolled_nodes_are_not_routed_to():
    fleet = Fleet(["http://a", "http://b"])
    assert fleet.route("m") is None
    fleet.poll_succeeded("http://b", M)
    assert fleet.route("m").url == "http://b"


def test_route_picks_least_in_flight_then_least_dispatched():
    fleet = Fleet(["http://a", "http://b"])
    for url in ("http://a", "http://b"):
        fleet.poll_succeeded(url, M)
    first = fleet.route("m")
    fleet.acquire(first)
    second = fleet.route("m")
    assert second is not first
    fleet.acquire(second)
    fleet.release(first)
    assert fleet.route("m") is first
    fleet.release(second)
    # Both idle: the one dispatched less often wins; here a tie, so the first configured.
    assert fleet.route("m").url == "http://a"


def test_a_node_turns_unhealthy_only_after_the_failure_threshold():
    fleet = Fleet(["http://a"], unhealthy_after_failures=2)
    fleet.poll_succeeded("http://a", M)
    fleet.poll_failed("http://a", "boom")
    assert fleet.node("http://a").healthy
    fleet.poll_failed("http://a", "boom")
    assert not fleet.node("http://a").healthy
    assert fleet.status()["status"] == "down"
    assert fleet.knows("m") and fleet.route("m") is None  # known model, no healthy node: 503, not 404
    fleet.poll_succeeded("http://a", M)
    assert fleet.status()["status"] == "ok"


def test_dispatch_failure_takes_a_node_out_at_once():
    fleet = Fleet(["http://a", "http://b"])
    for url in ("http://a", "http://b"):
        fleet.poll_succeeded(url, M)
    fleet.dispatch_failed("http://a", "refused")
    assert fleet.route("m").url == "http://b"
    assert fleet.status()["status"] == "degraded"
    assert fleet.route("m", exclude=frozenset({"http://b"})) is None


def parse_models(payload):
    entries = KINDS["neuron"].parse_models({"/v1/models": payload})
    return {name: model_info(e, 8192, 4096) for name, e in entries.items()}


def test_parse_models_rejects_malformed_catalogues():
    assert parse_models({"data": [{"id": "m", "limit": {"context": 5, "output": 2}}]}) == {"m": ModelInfo("m", 5, 2)}
    for bad in (
        {}, {"data": [{"id": "m"}]}, {"data": [{"id": "m", "limit": {"context": "x", "output": 1}}]}, [],
        {"data": [{"id": {"x": 1}, "limit": {"context": 5, "output": 2}}]},
        {"data": [{"id": "m", "limit": {"context": float("inf"), "output": 2}}]},
        {"data": [{"id": "m", "limit": {"context": -5, "output": 2}}]},
        {"data": ["m"]},
    ):
        with pytest.raises(ValueError):
            parse_models(bad)


@pytest.mark.parametrize(
    "frame",
    [
        {"choices": [{"index": 0, "delta": {"content": "héllo wörld"}}]},
        {"choices": [{"index": 0, "delta": {"content": 'say "hi"\\n'}}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [{"index": 0, "text": "abc", "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": '{"a": 1}'}}]}}]},
        {"choices": [{"index": 0, "delta": {"content": 'text with "content":"inside"'}}]},
    ],
)
def test_the_fast_token_count_agrees_with_the_json_count(frame):
    from cortex.relay import chunk_output_tokens, output_tokens

    for ensure_ascii in (False, True):
        data = json.dumps(frame, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()
        assert chunk_output_tokens(data) == output_tokens(frame)


def test_only_an_exact_prompt_count_refuses_a_context_overflow_before_the_upstream():
    from cortex.budget.estimate import estimate

    gen = chat_request(parse_json_object(json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "word " * 100}], "max_tokens": 50}
    ).encode()))
    bound = counting.count_chat(gen.messages)
    assert bound + 50 > 300
    unknown = ModelInfo("m", 300, 300)  # a tokenizer cortex does not know: its bound is no count
    assert estimate(gen, unknown).prompt_tokens == bound  # the upstream decides
    for exact in (ModelInfo("m", 300, 300, bound_exact=True), None):
        with pytest.raises(ApiError) as refused:
            estimate(gen, exact or unknown, exact_prompt_tokens=None if exact else 260)
        assert refused.value.code == "context_length_exceeded"
    assert estimate(gen, unknown, exact_prompt_tokens=240).prompt_tokens == 240  # 240 + 50 fits
    # Without max_tokens the output bound is what the context leaves after the bound, valid anywhere.
    open_ended = chat_request(parse_json_object(json.dumps({"model": "m", "messages": gen.messages}).encode()))
    assert estimate(open_ended, ModelInfo("m", 1000, 1000)).output_tokens == 1000 - bound


def test_a_byte_level_fleet_counts_as_exact_and_a_real_tokenizer_does_not():
    fleet = Fleet(["http://n1"])
    entry = {"id": "m", "limit": {"context": 100, "output": 50}}

    def advertise(e: dict) -> None:
        entries = KINDS["neuron"].parse_models({"/v1/models": {"data": [e]}})
        fleet.poll_succeeded("http://n1", {name: model_info(x, 0, 0) for name, x in entries.items()})

    advertise(entry)
    assert fleet.model_info("m").bound_exact
    advertise({**entry, "tokenizer": {"kind": "byte-level", "message_overhead_tokens": counting.MESSAGE_OVERHEAD_TOKENS,
                                      "reply_primer_tokens": counting.REPLY_PRIMER_TOKENS}})
    assert fleet.model_info("m").bound_exact  # the mock neuron's own advertisement
    advertise({**entry, "tokenizer": {"kind": "bpe", "message_overhead_tokens": 5, "reply_primer_tokens": 3}})
    assert not fleet.model_info("m").bound_exact
