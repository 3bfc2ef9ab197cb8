"""neuron serve on its own: the API, exact accounting, limits, cancellation."""

from __future__ import annotations

import httpx
import openai
import pytest

from common import counting
from tests.conftest import Stack, wait_until

MODEL = "cortex-mock"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def neuron(shared_stack: Stack):
    return shared_stack.neuron("--model", MODEL, "--model", "other", "--context-length", "2000", "--max-output-tokens", "300")


def sdk(proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0)


def test_models_advertise_context_and_output_limits(neuron):
    data = neuron.get_json("/v1/models")["data"]
    assert [m["id"] for m in data] == [MODEL, "other"]
    assert all(m["limit"] == {"context": 2000, "output": 300} for m in data)
    # What cortex needs to bound a prompt: common/counting's byte-level rules.
    tokenizer = {"kind": "byte-level", "message_overhead_tokens": counting.MESSAGE_OVERHEAD_TOKENS,
                 "reply_primer_tokens": counting.REPLY_PRIMER_TOKENS, "completion_prefix_tokens": 0}
    assert all(m["tokenizer"] == tokenizer for m in data)


def test_usage_is_exact_byte_level_accounting(neuron):
    messages = [{"role": "system", "content": "sé"}, {"role": "user", "content": "hi there"}]
    reply = sdk(neuron).chat.completions.create(model=MODEL, messages=messages, max_tokens=33)
    assert reply.usage.prompt_tokens == counting.count_chat(messages)
    assert reply.usage.completion_tokens == len(reply.choices[0].message.content.encode()) == 33
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 33


def test_same_request_same_text_and_request_seed_changes_it(neuron):
    c = sdk(neuron)
    a = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, temperature=1.5).choices[0].message.content
    b = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30).choices[0].message.content
    s = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, seed=9).choices[0].message.content
    assert a == b != s


def test_without_max_tokens_the_reply_ends_naturally(neuron):
    reply = sdk(neuron).chat.completions.create(model=MODEL, messages=HELLO)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 256  # the default --reply-tokens, under limit.output


def test_streamed_usage_chunk_matches_the_text(neuron):
    chunks = list(
        sdk(neuron).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == len(text) == 12


def test_prompt_over_the_context_is_context_length_exceeded(neuron):
    long = [{"role": "user", "content": "x" * 2000}]
    r = httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": long})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    fits_alone = [{"role": "user", "content": "x" * 1900}]
    r = httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": fits_alone, "max_tokens": 200})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_over_limit_output_is_400(neuron):
    r = httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 301})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_unknown_model_is_404(neuron):
    r = httpx.post(neuron.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_and_discovery_describe_the_host(neuron):
    before = neuron.get_json("/health")["requests_total"]
    httpx.post(neuron.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    httpx.post(neuron.url + "/v1/completions", json={"model": MODEL, "prompt": 5})  # refused: not admitted
    health = neuron.get_json("/health")
    assert health["requests_total"] == before + 1
    discovery = neuron.get_json("/discovery")
    assert discovery["engine"] == "mock"
    assert discovery["devices"][0]["kind"] == "cpu" and discovery["devices"][0]["cores"] >= 1
    cpu = discovery["devices"][0]
    assert cpu["memory_total_bytes"] >= cpu["memory_available_bytes"] > 0
    assert [m["id"] for m in discovery["models"]] == [MODEL, "other"]


def test_client_going_away_stops_generation_at_once(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10")
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True}
        ) as response:
            raw = response.iter_raw()
            next(raw)
    health = wait_until(lambda: (h := neuron.get_json("/health"))["cancelled_total"] == 1 and h)
    assert health["in_flight"] == 0 and health["completed_total"] == 0
    assert health["tokens_generated_total"] < 3000


def test_a_full_queue_refuses_with_503_and_retry_after(stack: Stack):
    neuron = stack.neuron("--slots", "1", "--queue-depth", "0", "--token-interval-ms", "20")
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True}
        ) as response:
            assert response.status_code == 200  # a free slot admits at once, queue or not
            raw = response.iter_raw()
            next(raw)
            r = http.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "1"


def test_chunk_tokens_groups_tokens_per_event_without_changing_the_text(stack: Stack):
    neuron = stack.neuron("--chunk-tokens", "4")
    c = sdk(neuron)
    whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10).choices[0].message.content
    pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, stream=True) if ch.choices and ch.choices[0].delta.content]
    assert [len(p) for p in pieces] == [4, 4, 2]
    assert "".join(pieces) == whole


def test_a_client_leaving_mid_body_is_quietly_dropped(stack: Stack):
    import socket

    neuron = stack.neuron()
    host, port = neuron.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mod")
    r = httpx.post(neuron.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    assert "Traceback" not in neuron.logs()


def test_completions_default_max_tokens_fits_a_small_output_limit(stack: Stack):
    neuron = stack.neuron("--max-output-tokens", "10")
    cortex = stack.cortex(neuron)
    for proc in (neuron, cortex):
        r = httpx.post(proc.url + "/v1/completions", json={"model": MODEL, "prompt": "hello"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 10


def test_metrics_count_generations_and_refusals_per_model(stack: Stack):
    neuron = stack.neuron("--slots", "1", "--queue-depth", "0", "--token-interval-ms", "20", "--log-level", "info")
    httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 3})
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": True}
        ) as response:
            raw = response.iter_raw()
            next(raw)
            assert http.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO}).status_code == 503
    text = wait_until(lambda: 'outcome="cancelled"' in (t := httpx.get(neuron.url + "/metrics").text) and t)
    assert f'neuron_generation_tokens_total{{model="{MODEL}"}} 3' in text
    assert f'neuron_prompt_tokens_total{{model="{MODEL}"}} {counting.count_chat(HELLO)}' in text
    assert f'neuron_admission_rejections_total{{model="{MODEL}",reason="queue_full"}} 1' in text
    assert f'neuron_requests_total{{model="{MODEL}",outcome="completed"}} 1' in text
    assert "# TYPE neuron_admission_rejections_total counter" in text
    health = neuron.get_json("/health")
    assert health["per_model"][MODEL]["rejections"]["queue_full"] == 1
    lines = [e for e in neuron.log_events() if e.get("event") == "generation"]
    assert [(e["outcome"], e["completion_tokens"]) for e in lines] == [("completed", 3), ("cancelled", None)]
