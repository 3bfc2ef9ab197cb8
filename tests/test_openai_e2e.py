"""The OpenAI path end to end: the official SDK -> cortex serve -> neuron serve."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from tests.conftest import Stack, wait_until

MODEL = "cortex-mock"
HELLO = [{"role": "user", "content": "Hello, cortex"}]


def client(cortex) -> openai.OpenAI:
    return openai.OpenAI(base_url=cortex.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def pair(shared_stack: Stack):
    neuron = shared_stack.neuron()
    cortex = shared_stack.cortex(neuron)
    return neuron, cortex


def test_chat_non_streaming_returns_the_neurons_deterministic_reply(pair):
    neuron, cortex = pair
    reply = client(cortex).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40)
    direct = client(neuron).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40)
    assert reply.choices[0].message.content == direct.choices[0].message.content
    assert len(reply.choices[0].message.content) == 40
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 40
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens


def test_chat_streaming_passes_chunks_through_and_matches_non_streaming(pair):
    _, cortex = pair
    c = client(cortex)
    whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=25).choices[0].message.content
    chunks = list(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=25, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert len(chunks) >= 25  # one chunk per token, not one buffered blob
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)  # the client did not ask for usage


def test_stream_usage_frame_is_forwarded_when_asked(pair):
    _, cortex = pair
    chunks = list(
        client(cortex).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7


def test_legacy_completions_streaming_and_not(pair):
    _, cortex = pair
    c = client(cortex)
    whole = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=12)
    assert len(whole.choices[0].text) == 12
    assert whole.usage.prompt_tokens == len("Once upon")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, stream=True))
    assert streamed == whole.choices[0].text


def test_stop_sequence_cuts_the_reply(pair):
    _, cortex = pair
    c = client(cortex)
    full = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60).choices[0].message.content
    stop = full[20:23]
    cut = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_lists_limits_and_where_each_model_is_loaded(pair):
    neuron, cortex = pair
    models = client(cortex).models.list().data
    assert [m.id for m in models] == [MODEL]
    entry = models[0].model_dump()
    assert entry["limit"] == {"context": 32768, "output": 4096}
    assert entry["neurons"] == [{"url": neuron.url, "healthy": True}]


def test_every_response_carries_a_request_id_and_a_log_line(pair):
    _, cortex = pair
    r = httpx.post(
        cortex.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 5},
        headers={"x-request-id": "trace-abc.123"},
    )
    assert r.headers["x-request-id"] == "trace-abc.123"
    bad = httpx.post(cortex.url + "/v1/chat/completions", content=b"{")
    generated = bad.headers["x-request-id"]
    assert len(generated) == 32
    hostile = httpx.get(cortex.url + "/v1/models", headers={"x-request-id": "a b\tc"})
    assert hostile.headers["x-request-id"] != "a b\tc"

    def logged():
        events = [e for e in cortex.log_events() if e.get("event") == "request"]
        return {e.get("client_request_id", e.get("request_id")): e for e in events}

    lines = wait_until(lambda: "trace-abc.123" in logged() and generated in logged() and logged())
    ok = lines["trace-abc.123"]
    assert len(ok["request_id"]) == 32 and ok["request_id"] != "trace-abc.123"  # cortex's own id beside the client's
    assert ok["status"] == 200 and ok["model"] == MODEL and ok["neuron"]
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 5 and ok["latency_ms"] > 0
    assert lines[generated]["status"] == 400


def test_health_reports_fleet_status(pair):
    _, cortex = pair
    health = cortex.get_json("/health")
    assert health["status"] == "ok"
    assert httpx.head(cortex.url + "/health").status_code == 200  # HEAD is served like GET
    assert health["neurons"] == {"total": 1, "healthy": 1, "unhealthy": 0}


def test_two_neurons_share_traffic_and_merge_their_catalogues(stack: Stack):
    a = stack.neuron("--model", "alpha", "--model", "shared")
    b = stack.neuron("--model", "beta", "--model", "shared", "--context-length", "1000", "--max-output-tokens", "100")
    cortex = stack.cortex(a, b)
    c = client(cortex)
    catalogue = {m.id: m.model_dump() for m in c.models.list().data}
    assert sorted(catalogue) == ["alpha", "beta", "shared"]
    assert catalogue["shared"]["limit"] == {"context": 1000, "output": 100}  # the tightest wins
    assert {n["url"] for n in catalogue["shared"]["neurons"]} == {a.url, b.url}
    for _ in range(6):
        c.chat.completions.create(model="shared", messages=HELLO, max_tokens=3)
    c.chat.completions.create(model="alpha", messages=HELLO, max_tokens=3)
    c.chat.completions.create(model="beta", messages=HELLO, max_tokens=3)
    assert a.get_json("/health")["requests_total"] == 4
    assert b.get_json("/health")["requests_total"] == 4


def test_least_in_flight_routing_under_concurrency(stack: Stack):
    a = stack.neuron("--token-interval-ms", "20")
    b = stack.neuron("--token-interval-ms", "20")
    cortex = stack.cortex(a, b)
    with httpx.Client(timeout=30) as http:
        streams = []
        for _ in range(4):
            cm = http.stream("POST", cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 250, "stream": True})
            raw = cm.__enter__().iter_raw()
            next(raw)  # the stream has started at its neuron; keep `raw` alive
            streams.append((cm, raw))
        in_flight = (a.get_json("/health")["in_flight"], b.get_json("/health")["in_flight"])
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    assert in_flight == (2, 2)


def test_killed_neuron_is_skipped_and_traffic_moves_to_the_other(stack: Stack):
    a = stack.neuron()
    b = stack.neuron()
    cortex = stack.cortex(a, b, args=("--config", str(_write(stack, "fast.toml", "[fleet]\npoll_interval_s = 0.2\n"))))
    c = client(cortex)
    c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    a.kill()
    for _ in range(5):  # the first may hit the dead node and fail over; none may fail
        reply = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert reply.usage.completion_tokens == 3
    assert b.get_json("/health")["requests_total"] >= 5
    health = wait_until(lambda: (h := cortex.get_json("/health"))["status"] == "degraded" and h)
    assert health["neurons"] == {"total": 2, "healthy": 1, "unhealthy": 1}


def test_no_healthy_neuron_gives_503_with_retry_after(stack: Stack):
    neuron = stack.neuron()
    cortex = stack.cortex(neuron, args=("--config", str(_write(stack, "fast.toml", "[fleet]\npoll_interval_s = 0.2\n"))))
    client(cortex).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    neuron.kill()
    r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "service_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert wait_until(lambda: httpx.get(cortex.url + "/health").status_code == 503)
    with pytest.raises(openai.InternalServerError) as info:
        client(cortex).chat.completions.create(model=MODEL, messages=HELLO)
    assert info.value.status_code == 503


def test_client_disconnect_mid_stream_cancels_generation_at_the_neuron(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10")
    cortex = stack.cortex(neuron)
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", cortex.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 2000, "stream": True},
        ) as response:
            raw = response.iter_raw()
            next(raw)
            next(raw)
            assert neuron.get_json("/health")["in_flight"] == 1
        # leaving the block closes the connection mid-stream
    health = wait_until(lambda: (h := neuron.get_json("/health"))["cancelled_total"] == 1 and h)
    assert health["in_flight"] == 0
    generated = health["tokens_generated_total"]
    assert generated < 2000
    # Generation really stopped: the count no longer moves.
    time.sleep(0.2)
    assert neuron.get_json("/health")["tokens_generated_total"] == generated
    line = wait_until(lambda: [e for e in cortex.log_events() if e.get("outcome") == "client_disconnected"])
    assert line[0]["neuron"] == neuron.url


def test_slow_client_applies_back_pressure_to_the_neuron(stack: Stack):
    neuron = stack.neuron("--reply-tokens", "200000", "--max-output-tokens", "200000", "--context-length", "300000")
    cortex = stack.cortex(neuron)
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", cortex.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 200000, "stream": True},
        ) as response:
            assert response.status_code == 200
            # We read nothing more. A proxy that buffered would drain the
            # neuron; with back-pressure, generation stalls part-way.
            stalled = wait_until(lambda: _stalled(neuron), timeout_s=20)
            assert 0 < stalled < 200000
            assert neuron.get_json("/health")["in_flight"] == 1
    wait_until(lambda: neuron.get_json("/health")["cancelled_total"] == 1)


def test_neuron_dying_mid_stream_ends_the_stream_with_an_error_event(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10")
    cortex = stack.cortex(neuron)
    stream = client(cortex).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2000, stream=True)
    with pytest.raises(openai.APIError) as info:
        for i, _ in enumerate(stream):
            if i == 3:
                neuron.signal(signal.SIGKILL)
    assert "upstream" in str(info.value.message).lower()
    line = wait_until(lambda: [e for e in cortex.log_events() if e.get("outcome") == "upstream_broken"])
    assert line[0]["status"] == 200


def _stalled(neuron) -> int:
    first = neuron.get_json("/health")["tokens_generated_total"]
    import time

    time.sleep(0.3)
    second = neuron.get_json("/health")["tokens_generated_total"]
    return first if first == second and first > 0 else 0


def _write(stack: Stack, name: str, text: str):
    path = stack.tmp_path / name
    path.write_text(text)
    return path
