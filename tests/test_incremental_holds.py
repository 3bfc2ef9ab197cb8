"""Incremental output holds, the pure parts: the ledger's extension, the relay's cut, the assembled reply."""

from __future__ import annotations

import json

from cortex.assemble import StreamAssembler, cut_events
from cortex.budget.ledger import Caps, Hold, Ledger, Refusal
from cortex.relay import StreamRelay


def _ledger(**caps) -> Ledger:
    ledger = Ledger()
    ledger.add_account("a", Caps())
    ledger.add_key("k", "a", Caps(**caps))
    return ledger


def test_an_extension_checks_every_cap_but_not_concurrency():
    ledger = _ledger(balance_tokens=100, max_concurrency=1)
    hold = ledger.reserve("h", "k", 40, 0.0, 60.0)
    assert isinstance(hold, Hold)
    assert isinstance(ledger.reserve("h2", "k", 1, 0.0, 60.0), Refusal)  # concurrency: one in flight
    grown = ledger.extend("h", 50, 1.0)  # the request in flight grows: no new request
    assert grown is hold and hold.amount_tokens == 90 and ledger.principal("key", "k").held_tokens == 90
    refused = ledger.extend("h", 11, 2.0)
    assert isinstance(refused, Refusal) and refused.reason == "balance" and hold.amount_tokens == 90
    resolution = ledger.settle("h", 95, 3.0)  # charged at most the grown hold
    assert resolution.charged_tokens == 90 and ledger.principal("key", "k").spent_tokens == 90


def test_an_extension_of_money_is_checked_on_the_account_too():
    ledger = Ledger()
    ledger.add_account("a", Caps(balance_usd=1000))
    ledger.add_key("k", "a", Caps())
    ledger.reserve("h", "k", 10, 0.0, 60.0, amount_usd=600)
    refused = ledger.extend("h", 10, 1.0, 401)
    assert isinstance(refused, Refusal) and refused.principal_kind == "account" and refused.unit == "usd"
    assert isinstance(ledger.extend("h", 10, 1.0, 400), Hold)


def test_the_relay_stops_at_its_bound_and_counts_what_it_dropped():
    relay = StreamRelay(False, output_tokens_max=5)
    events = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % text for text in (b"abc", b"de", b"fgh", b"ij")
    )
    out = relay.feed(events + b"data: [DONE]\n\n")
    assert out.count(b"data:") == 2 and relay.output_tokens == 5  # "abc" + "de": exactly the bound
    assert relay.overflowed and relay.dropped_output_tokens == 5 and not relay.done
    assert relay.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') == b""  # nothing more, ever


def test_a_cut_stream_ends_in_its_own_ids_with_length_and_done():
    head = {"id": "chatcmpl-1", "created": 7, "model": "m"}
    events = cut_events(head, True, {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    finish, usage, done = events
    assert json.loads(finish) == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "length", "logprobs": None, "delta": {}}]}
    assert json.loads(usage)["usage"]["total_tokens"] == 8 and json.loads(usage)["choices"] == []
    assert done == b"[DONE]"
    assert len(cut_events(head, False, None)) == 2  # no usage frame unless the client asked


def test_the_assembler_joins_text_reasoning_and_tool_calls_in_order():
    chunks = [
        {"id": "c1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a"'}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ': 1}'}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
    ]
    assembler = StreamAssembler(chat=True)
    assembler.feed([json.dumps(c).encode() for c in chunks] + [b"[DONE]"])
    body = assembler.body()
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and body["id"] == "c1" and body["model"] == "m"
    assert message["content"] == "Hello" and message["reasoning_content"] == "think "
    assert message["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and body["usage"]["total_tokens"] == 12
    assembler.cut()
    assert assembler.body()["choices"][0]["finish_reason"] == "length"


def test_the_assembler_builds_a_text_completion_and_ignores_junk():
    assembler = StreamAssembler(chat=False)
    assembler.feed([b'{"id":"cmpl","choices":[{"index":0,"text":"ab"}]}', b"not json", b"[1,2]",
                    b'{"choices":[{"index":0,"text":"c","finish_reason":"stop"}]}'])
    body = assembler.body()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["finish_reason"] == "stop" and "usage" not in body


def test_a_cut_reply_counted_with_the_tokenizer_is_charged_that_not_its_bytes():
    from cortex.budget.meter import Meter

    meter = Meter(True, 10, relayed_output_tokens=400, token_bytes_max=256, dispatched=True, responded=True)
    assert meter.settlement().tokens == 410  # the bytes: an upper bound
    meter.exact_output_tokens = 97
    settlement = meter.settlement()
    assert (settlement.action, settlement.tokens, settlement.output_tokens) == ("settle", 107, 97)


def test_the_text_a_client_received_is_read_from_the_relayed_chunks():
    from cortex.proxy import _output_text

    payloads = [
        b'{"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        b'{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"lo"}}]}',
        b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{}"}}]}}]}',
    ]
    assert sorted(_output_text(payloads)) == sorted("Hellohmf{}")
    assert _output_text([b'{"choices":[{"index":0,"text":"abc"}]}']) == "abc"
