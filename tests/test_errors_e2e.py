"""Bad input and upstream trouble: always the OpenAI envelope, the right status, never a hang."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Stack, wait_until
from tests.fake_upstream import FakeUpstream

MODEL = "cortex-mock"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def pair(shared_stack: Stack):
    neuron = shared_stack.neuron("--context-length", "1000", "--max-output-tokens", "500")
    cortex = shared_stack.cortex(neuron)
    return neuron, cortex


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "x-request-id" in response.headers
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_invalid_json_is_400_invalid_request(pair):
    _, cortex = pair
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", content=b'{"model": '), 400)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": -5}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": MODEL, "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "n": 2}, "n"),
        ({"model": MODEL, "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_missing_or_mistyped_chat_fields_are_400_naming_the_field(pair, body, param):
    _, cortex = pair
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", json=body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": MODEL}, "prompt"), ({"model": MODEL, "prompt": 42}, "prompt"), ({"model": MODEL, "prompt": "x", "echo": True}, "echo")],
)
def test_bad_completions_fields_are_400_naming_the_field(pair, body, param):
    _, cortex = pair
    assert _error(httpx.post(cortex.url + "/v1/completions", json=body), 400)["param"] == param


def test_a_json_array_body_is_400(pair):
    _, cortex = pair
    _error(httpx.post(cortex.url + "/v1/chat/completions", json=[1, 2]), 400)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"model": "m", "n": ' + b"9" * 5000 + b"}", b'{"model": "m", "max_tokens": NaN}'],
    ids=["nested-too-deep", "integer-too-long", "nan"],
)
def test_hostile_json_is_a_400_not_a_500(pair, raw):
    _, cortex = pair
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", content=raw), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("target", ["cortex", "neuron"])
@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "cortex-mock", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
    ],
    ids=["in-model", "in-content"],
)
def test_a_lone_surrogate_escape_is_a_400_on_both_daemons(pair, raw, target):
    neuron, cortex = pair
    proc = cortex if target == "cortex" else neuron
    r = httpx.post(proc.url + "/v1/chat/completions", content=raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_seed_outside_64_bits_is_400(pair):
    _, cortex = pair
    body = {"model": MODEL, "messages": HELLO, "seed": 2**70}
    assert _error(httpx.post(cortex.url + "/v1/chat/completions", json=body), 400)["param"] == "seed"


def test_non_ascii_escapes_that_are_valid_still_work(pair):
    _, cortex = pair
    raw = b'{"model": "cortex-mock", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}], "max_tokens": 3}'
    assert httpx.post(cortex.url + "/v1/chat/completions", content=raw).status_code == 200


def test_absurd_max_tokens_is_400_naming_the_field(pair):
    _, cortex = pair
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 10**30}
    assert _error(httpx.post(cortex.url + "/v1/chat/completions", json=body), 400)["param"] == "max_tokens"


def test_unknown_model_is_404_model_not_found_and_never_reaches_a_neuron(pair):
    neuron, cortex = pair
    before = neuron.get_json("/health")["requests_total"]
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": HELLO}), 404)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    assert neuron.get_json("/health")["requests_total"] == before
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=cortex.url + "/v1", api_key="x", max_retries=0).chat.completions.create(model="gpt-9", messages=HELLO)


def test_body_over_the_limit_is_413(pair):
    _, cortex = pair
    big = b'{"model": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", content=big), 413)
    assert err["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413_without_reading_it_all(pair):
    _, cortex = pair

    def chunks():
        for _ in range(80):
            yield b"x" * (64 * 1024)

    _error(httpx.post(cortex.url + "/v1/chat/completions", content=chunks()), 413)


def test_wrong_method_is_405_with_allow(pair):
    _, cortex = pair
    r = httpx.get(cortex.url + "/v1/chat/completions")
    assert _error(r, 405)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    assert httpx.post(cortex.url + "/v1/models").status_code == 405


def test_unknown_path_is_404_in_the_envelope(pair):
    _, cortex = pair
    assert _error(httpx.get(cortex.url + "/v1/nothing"), 404)["code"] == "unknown_url"


def test_neuron_context_length_refusal_is_mapped_through(pair):
    _, cortex = pair
    long = [{"role": "user", "content": "x" * 990}]
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 100}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 501}), 400)
    assert err["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\nboom", 502, "upstream_error"),
        (b"this is not http\r\n\r\n", 502, "upstream_error"),
        (b"", 502, "upstream_error"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n{nope", 502, "upstream_error"),
        (b"HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}", 503, "overloaded"),
    ],
)
def test_upstream_errors_are_mapped_to_clear_errors(stack: Stack, reply, status, code):
    upstream = FakeUpstream(reply)
    try:
        cortex = stack.cortex(upstream.url)
        r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
        err = _error(r, status)
        assert err["code"] == code
        if status == 503:
            assert r.headers["retry-after"] == "7"
    finally:
        upstream.close()


def test_a_neuron_with_a_malformed_catalogue_is_unhealthy_and_cortex_lives_on(stack: Stack):
    upstream = FakeUpstream(b"", models_body=b'{"data": [{"id": {"x": 1}, "limit": {"context": 1e999, "output": 1}}]}')
    try:
        cortex = stack.cortex(upstream.url, args=("--config", str(_poll_fast(stack))))
        health = httpx.get(cortex.url + "/health")
        assert health.status_code == 503 and "malformed model entry" in health.json()["nodes"][0]["last_error"]
        # The poller keeps polling: the node's failure count goes on rising.
        first = health.json()["nodes"][0]["consecutive_failures"]
        wait_until(lambda: httpx.get(cortex.url + "/health").json()["nodes"][0]["consecutive_failures"] > first)
    finally:
        upstream.close()


def _poll_fast(stack: Stack):
    path = stack.tmp_path / "poll.toml"
    path.write_text("[fleet]\npoll_interval_s = 0.1\n")
    return path


def test_idle_timeout_ends_a_stalled_stream_with_an_error_event(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "3000")
    config = stack.tmp_path / "idle.toml"
    config.write_text("[upstream]\nidle_timeout_s = 0.3\n")
    cortex = stack.cortex(neuron, args=("--config", str(config)))
    c = openai.OpenAI(base_url=cortex.url + "/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "sent nothing for 0.3 s" in info.value.message


def test_first_byte_timeout_is_504(stack: Stack):
    neuron = stack.neuron("--ttft-ms", "3000")
    config = stack.tmp_path / "ttfb.toml"
    config.write_text("[upstream]\nfirst_byte_timeout_s = 0.3\n")
    cortex = stack.cortex(neuron, args=("--config", str(config)))
    err = _error(httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 5}), 504)
    assert err["code"] == "upstream_timeout"
