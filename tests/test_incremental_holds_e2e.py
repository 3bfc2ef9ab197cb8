"""Incremental output holds end to end: real cortex and neuron processes, a real SQLite ledger.

A request holds its prompt and a first output slice; the hold grows a slice at a time as tokens stream, each
extension checked against every cap; when a cap refuses one, the reply ends cleanly where the hold ends."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.budget_helpers import HI, HI_PROMPT_TOKENS, MODEL, admin, budget_cortex, create_key, fan_out
from tests.conftest import Stack, wait_until

SLICE = 64
INCREMENTAL = f'[budget]\noutput_holds = "incremental"\noutput_slice_tokens = {SLICE}\n'
LONG = 2000  # the reply the mock neuron would write, and each request's max_tokens


def neuron(stack: Stack):
    return stack.neuron("--token-interval-ms", "0.5", "--reply-tokens", str(LONG))


def key_usage(cortex, key_id):
    return admin(cortex, "GET", f"keys/{key_id}").json()


def sse_events(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_a_request_the_worst_case_would_refuse_is_admitted_and_ended_cleanly_at_the_cap(stack: Stack):
    n = neuron(stack)
    worst = budget_cortex(stack, n)
    cap = HI_PROMPT_TOKENS + 300
    _, key = create_key(worst, balance_tokens=cap)
    body = {"model": MODEL, "messages": HI, "max_tokens": LONG, "stream": True}
    refused = httpx.post(worst.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert refused.status_code == 429  # the worst case, LONG tokens, cannot fit

    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    key_id, key = create_key(cortex, balance_tokens=cap)
    r = httpx.post(cortex.url + "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}},
                   headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200
    assert b": x-cortex-budget-truncated: true" in r.content
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == len(text.encode()) and usage["prompt_tokens"] == HI_PROMPT_TOKENS
    # Charged exactly what it received, and never past the cap.
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + len(text.encode()) <= cap
    assert cap - u["usage"]["spent_tokens"] < SLICE  # it went on until the next slice no longer fitted
    # The neuron was stopped when cortex cut it, long before its LONG-token reply.
    health = wait_until(lambda: (h := n.get_json("/health"))["cancelled_total"] >= 1 and h)
    assert health["tokens_generated_total"] < LONG
    metrics = httpx.get(cortex.url + "/metrics").text
    assert "cortex_budget_truncations_total 1" in metrics
    assert 'cortex_hold_extensions_total{result="refused"} 1' in metrics


def test_a_non_streamed_request_is_assembled_and_cut_the_same_way(stack: Stack):
    n = neuron(stack)
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    cap = HI_PROMPT_TOKENS + 200
    key_id, key = create_key(cortex, balance_tokens=cap)
    r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": LONG},
                   headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-cortex-budget-truncated"] == "true"
    reply = r.json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "length"
    content = reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == len(content.encode())
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + len(content.encode()) <= cap
    # A reply that fits is not cut: it ends as the neuron ended it, with the neuron's usage.
    _, roomy = create_key(cortex, balance_tokens=100_000)
    whole = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 300},
                       headers={"authorization": f"Bearer {roomy}"}, timeout=60)
    assert whole.status_code == 200 and "x-cortex-budget-truncated" not in whole.headers
    assert whole.json()["choices"][0]["finish_reason"] == "length" and whole.json()["usage"]["completion_tokens"] == 300


def test_the_anthropic_surface_ends_a_cut_reply_with_max_tokens(stack: Stack):
    n = neuron(stack)
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    key_id, key = create_key(cortex, balance_tokens=HI_PROMPT_TOKENS + 250)
    client = anthropic.Anthropic(base_url=cortex.url, api_key=key, max_retries=0)
    with client.messages.stream(model=MODEL, max_tokens=LONG, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and text
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + len(text.encode()) <= HI_PROMPT_TOKENS + 250
    other_id, other = create_key(cortex, balance_tokens=HI_PROMPT_TOKENS + 150)
    whole = anthropic.Anthropic(base_url=cortex.url, api_key=other, max_retries=0).messages.create(
        model=MODEL, max_tokens=LONG, messages=[{"role": "user", "content": "hi"}]
    )
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == len(whole.content[0].text.encode())
    u = wait_until(lambda: (d := key_usage(cortex, other_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] <= HI_PROMPT_TOKENS + 150


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_200_request_fan_out_on_incremental_holds_never_overshoots(stack: Stack, stream):
    n = stack.neuron("--token-interval-ms", "1", "--reply-tokens", "400")
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    cap = 20_000
    key_id, key = create_key(cortex, balance_tokens=cap)
    results = await fan_out(cortex.url, key, 200, stream, max_tokens=400)
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429}
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d, timeout_s=30)
    assert u["usage"]["spent_tokens"] <= cap and u["usage"]["in_flight"] == 0
    # Everything a client received was charged: the sum of what each reply carried, prompt included.
    delivered = 0
    for status, _, body in results:
        if status != 200:
            continue
        if stream:
            text = "".join(
                (json.loads(e)["choices"][0]["delta"].get("content") or "")
                for e in sse_events(body)[:-1] if json.loads(e).get("choices")
            )
        else:
            text = json.loads(body)["choices"][0]["message"]["content"] or ""
        delivered += HI_PROMPT_TOKENS + len(text.encode())
    assert delivered == u["usage"]["spent_tokens"]
    # More requests were served than the worst case could have held at once (400 output tokens each).
    assert statuses.count(200) > cap // (HI_PROMPT_TOKENS + 400)
