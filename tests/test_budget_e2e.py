"""Hard budgets end to end: real cortex and neuron processes, a real SQLite ledger."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.budget_helpers import (
    ADMIN_TOKEN,
    HI,
    HI_PROMPT_TOKENS,
    MODEL,
    admin,
    budget_cortex,
    chat,
    create_key,
    fan_out,
    usage,
)
from tests.conftest import Proc, Stack, wait_until
from tests.fake_upstream import FakeUpstream

COST = HI_PROMPT_TOKENS + 10  # the estimate and the actual usage of chat(max_tokens=10)




@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("fan", [20, 200])
async def test_a0_fan_out_drains_the_cap_then_is_refused_and_the_neuron_sees_only_the_served(stack: Stack, fan, stream):
    neuron = stack.neuron("--token-interval-ms", "2")
    cortex = budget_cortex(stack, neuron)
    served_max = 5 if fan == 20 else 37
    key_id, key = create_key(cortex, balance_tokens=served_max * COST + COST - 1)
    results = await fan_out(cortex.url, key, fan, stream)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) == served_max and len(refused) == fan - served_max
    for _status, headers, body in refused:
        assert headers["x-should-retry"] == "false" and "retry-after" not in headers
        assert b'"code":"insufficient_quota"' in body and b'"type":"insufficient_quota"' in body
    assert neuron.get_json("/health")["requests_total"] == served_max
    # Settlement follows the last byte of each response: give it its moment.
    u = wait_until(lambda: (d := usage(cortex, key_id)["usage"])["held_tokens"] == 0 and d)
    assert u["spent_tokens"] == served_max * COST <= u["limits"]["balance_tokens"]
    assert u["in_flight"] == 0
    assert all(r["state"] == "settled" for r in usage(cortex, key_id)["recent"])


def test_rolling_window_refusal_has_an_exact_retry_after_and_then_admits(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, window_tokens=2 * COST + 5, window_seconds=8)
    assert chat(cortex, key).status_code == 200
    assert chat(cortex, key).status_code == 200
    refused = chat(cortex, key)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "tokens"
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= 8000
    assert int(refused.headers["retry-after"]) == -(-wait_ms // 1000)
    admit_at = time.monotonic() + wait_ms / 1000
    time.sleep(wait_ms / 2 / 1000)
    assert chat(cortex, key).status_code == 429  # not yet: the first charge has not aged out
    time.sleep(max(0.0, admit_at - time.monotonic()) + 0.05)
    assert chat(cortex, key).status_code == 200  # now it has


def test_hard_balance_is_insufficient_quota_until_topped_up(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=COST)
    assert chat(cortex, key).status_code == 200
    r = chat(cortex, key)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == r.json()["error"]["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    assert admin(cortex, "POST", f"keys/{key_id}/topup", {"tokens": COST}).status_code == 200
    assert chat(cortex, key).status_code == 200
    assert usage(cortex, key_id)["usage"]["spent_tokens"] == 2 * COST


def test_an_estimate_larger_than_any_cap_says_it_can_never_fit(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, window_tokens=50, window_seconds=60)
    r = chat(cortex, key, max_tokens=100)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "never fit" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    assert neuron.get_json("/health")["requests_total"] == 0


def test_account_caps_are_shared_by_its_keys(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "20")
    cortex = budget_cortex(stack, neuron)
    assert admin(cortex, "POST", "accounts", {"id": "team", "max_concurrency": 2, "balance_tokens": 10_000}).status_code == 201
    k1_id, k1 = create_key(cortex, "one", account="team")
    _, k2 = create_key(cortex, "two", account="team")
    with httpx.Client(timeout=30) as http:
        streams = []
        for key in (k1, k2):
            cm = http.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": MODEL, "messages": HI, "max_tokens": 300, "stream": True})
            response = cm.__enter__()
            assert response.status_code == 200
            raw = response.iter_raw()
            next(raw)
            streams.append((cm, raw))
        third = chat(cortex, k1)
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "requests" and third.json()["error"]["code"] == "rate_limit_exceeded"
    assert "account team" in third.json()["error"]["message"]
    assert int(third.headers["retry-after"]) >= 1
    detail = wait_until(lambda: (d := usage(cortex, k1_id))["account_usage"]["in_flight"] == 0 and d)
    assert detail["account_usage"]["held_tokens"] == 0
    assert chat(cortex, k1).status_code == 200


def test_client_disconnect_mid_stream_charges_what_was_produced(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    received = 0
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": HI, "max_tokens": 2000, "stream": True}) as response:
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    received += 1
                if received == 15:
                    break
    wait_until(lambda: neuron.get_json("/health")["cancelled_total"] == 1)
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    spent = detail["usage"]["spent_tokens"]
    assert HI_PROMPT_TOKENS + received <= spent < HI_PROMPT_TOKENS + 2000
    assert spent == HI_PROMPT_TOKENS + neuron.get_json("/health")["tokens_generated_total"] or spent < HI_PROMPT_TOKENS + 2000
    assert detail["recent"][0]["state"] == "settled"
    assert detail["recent"][0]["charged_tokens"] == spent


def test_neuron_killed_mid_stream_charges_what_was_produced(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    client = openai.OpenAI(base_url=cortex.url + "/v1", api_key=key, max_retries=0)
    received = 0
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2000, stream=True):
            received += len(chunk.choices[0].delta.content or "") if chunk.choices else 0
            if received == 20:
                neuron.kill()
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert HI_PROMPT_TOKENS + received <= detail["usage"]["spent_tokens"] < HI_PROMPT_TOKENS + 2000


def test_unreachable_neuron_releases_the_hold(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, config="[fleet]\npoll_interval_s = 30\n")
    key_id, key = create_key(cortex, balance_tokens=1000)
    neuron.kill()  # cortex still believes it healthy: the dispatch finds out
    r = chat(cortex, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    u = usage(cortex, key_id)
    assert u["usage"]["spent_tokens"] == 0 and u["usage"]["held_tokens"] == 0
    assert u["recent"][0]["state"] == "released"


def test_context_overflow_is_refused_by_the_estimate_with_no_hold(stack: Stack):
    neuron = stack.neuron("--context-length", "100")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=1000)
    r = chat(cortex, key, max_tokens=95)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert usage(cortex, key_id)["recent"] == []
    assert neuron.get_json("/health")["requests_total"] == 0


def test_successful_responses_carry_ratelimit_headers_for_the_tightest_cap(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=10_000, window_tokens=500, window_seconds=60)
    r = chat(cortex, key)
    assert r.headers["x-ratelimit-limit-tokens"] == "500"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 500 - COST  # the hold, before settlement
    assert r.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_the_official_sdk_sees_rate_limit_errors_and_honours_retry_after_ms(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, window_tokens=COST, window_seconds=3)
    strict = openai.OpenAI(base_url=cortex.url + "/v1", api_key=key, max_retries=0)
    strict.chat.completions.create(model=MODEL, messages=HI, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as info:
        strict.chat.completions.create(model=MODEL, messages=HI, max_tokens=10)
    assert info.value.code == "rate_limit_exceeded"
    patient = openai.OpenAI(base_url=cortex.url + "/v1", api_key=key, max_retries=3)
    reply = patient.chat.completions.create(model=MODEL, messages=HI, max_tokens=10)
    assert reply.usage.total_tokens == COST
    statuses = wait_until(lambda: (s := _statuses(cortex)).count(200) == 2 and s)
    # The patient client waited as told: few retries, not a burst of 429s.
    assert statuses[0] == 200 and statuses[-1] == 200 and 1 <= statuses.count(429) <= 3


def test_the_official_sdk_does_not_retry_insufficient_quota(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=5)
    client = openai.OpenAI(base_url=cortex.url + "/v1", api_key=key, max_retries=3)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10)
    assert info.value.code == "insufficient_quota"
    wait_until(lambda: _statuses(cortex).count(429) == 1)
    time.sleep(0.5)  # room for a retry that must not come
    assert _statuses(cortex).count(429) == 1


def _statuses(cortex) -> list[int]:
    return [e["status"] for e in cortex.log_events() if e.get("event") == "request" and e.get("path") == "/v1/chat/completions"]


def test_x_api_key_header_is_accepted(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex)
    r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 3}, headers={"x-api-key": key})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def refusing_pair(shared_stack: Stack) -> tuple[Proc, Proc]:
    """One neuron and cortex for the cases that must all be refused: none may change what the next sees."""
    neuron = shared_stack.neuron()
    return neuron, budget_cortex(shared_stack, neuron)


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer sk-cx-not-a-real-key-000000000000"}, {"authorization": "Basic abc"}, {"x-api-key": ""}],
    ids=["missing", "unknown", "wrong-scheme", "empty"],
)
def test_bad_keys_are_401_invalid_api_key(refusing_pair: tuple[Proc, Proc], headers):
    neuron, cortex = refusing_pair
    r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert neuron.get_json("/health")["requests_total"] == 0


def test_a_revoked_key_is_refused_and_secrets_never_reach_logs_or_listings(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex)
    assert chat(cortex, key).status_code == 200
    listing = admin(cortex, "GET", "keys").text
    assert key not in listing and key[:10] in listing  # only the prefix is shown again
    assert admin(cortex, "POST", f"keys/{key_id}/revoke").json()["revoked"] is True
    r = chat(cortex, key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    logs = cortex.logs()
    assert key not in logs and key[6:] not in logs and ADMIN_TOKEN not in logs


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "keys", {"name": "x", "window_tokens": 5}, 400, "window_tokens"),
        ("POST", "keys", {"name": "x", "balance_tokens": -1}, 400, "balance_tokens"),
        ("POST", "keys", {"name": "x", "balance_tokens": 10**20}, 400, "balance_tokens"),
        ("POST", "keys", b'{"name": "x", "window_tokens": 5, "window_seconds": 1e999}', 400, None),  # overflows: not a number
        ("POST", "keys", b'{"name": "x", "window_tokens": 5, "window_seconds": NaN}', 400, None),  # not JSON
        ("POST", "keys", {"name": "x", "window_tokens": 5, "window_seconds": 10**9}, 400, "window_seconds"),
        ("POST", "keys", {"name": "x", "max_concurrency": 2**70}, 400, "max_concurrency"),
        ("POST", "keys", {"name": ""}, 400, "name"),
        ("POST", "keys", {"name": 3}, 400, "name"),
        ("POST", "keys/key_nope/topup", {"tokens": 5}, 404, None),
        ("GET", "keys/key_nope", None, 404, None),
        ("POST", "accounts", {"id": "bad id!"}, 400, "account"),
        ("DELETE", "keys", None, 405, None),
        ("GET", "nothing", None, 404, None),
    ],
)
def test_bad_admin_input_gets_clear_errors(refusing_pair: tuple[Proc, Proc], method, path, body, status, param):
    cortex = refusing_pair[1]
    r = admin(cortex, method, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    if param:
        assert r.json()["error"]["param"] == param


def test_admin_topup_validates_tokens_and_needs_a_balance(stack: Stack):
    cortex = budget_cortex(stack)
    key_id, _ = create_key(cortex)
    assert admin(cortex, "GET", f"keys/{key_id}?recent=%C2%B2").json()["error"]["param"] == "recent"
    assert admin(cortex, "GET", f"keys/{key_id}?recent=5").status_code == 200
    assert admin(cortex, "POST", f"keys/{key_id}/topup", {"tokens": -5}).json()["error"]["param"] == "tokens"
    assert "no balance" in admin(cortex, "POST", f"keys/{key_id}/topup", {"tokens": 5}).json()["error"]["message"]
    r = httpx.post(cortex.url + f"/admin/v1/keys/{key_id}/topup", content=b"{", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 400


def test_bad_admin_tokens_are_401_and_no_token_means_no_admin_api(stack: Stack):
    cortex = budget_cortex(stack)
    assert admin(cortex, "GET", "keys", token="wrong-token-wrong-token").json()["error"]["code"] == "invalid_admin_token"
    assert httpx.get(cortex.url + "/admin/v1/keys").status_code == 401
    plain = stack.cortex(auth=True)
    r = admin(plain, "GET", "keys")
    assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"


def test_hold_expiry_charges_the_hold_and_is_counted(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "20")
    cortex = budget_cortex(stack, neuron, config="[budget]\nhold_ttl_s = 0.5\nexpiry_interval_s = 0.1\n")
    key_id, key = create_key(cortex, balance_tokens=10_000)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": HI, "max_tokens": 100, "stream": True}) as response:
            for _ in response.iter_raw():
                pass
    detail = usage(cortex, key_id)
    assert detail["recent"][0]["state"] == "expired"
    assert detail["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + 100
    assert any(e.get("event") == "hold_expired" for e in cortex.log_events())
    assert 'cortex_holds_resolved_total{state="expired"} 1' in httpx.get(cortex.url + "/metrics").text


def test_metrics_count_requests_refusals_tokens_and_commits(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=COST)
    chat(cortex, key)
    chat(cortex, key)
    text = wait_until(lambda: (t := httpx.get(cortex.url + "/metrics").text).count('cortex_requests_total{status="') == 2 and t)
    assert f'cortex_requests_total{{status="200",model="{MODEL}"}} 1' in text
    assert f'cortex_requests_total{{status="429",model="{MODEL}"}} 1' in text
    assert 'cortex_budget_refusals_total{reason="balance"} 1' in text
    assert f'cortex_tokens_total{{direction="out",model="{MODEL}"}} 10' in text
    assert "cortex_holds_outstanding 0" in text
    assert "cortex_neurons_healthy 1" in text and "cortex_neurons 1" in text
    assert 'cortex_holds_resolved_total{state="settled"} 1' in text
    batches = [line for line in text.splitlines() if line.startswith("cortex_ledger_commit_batch_size_count")]
    assert batches and int(batches[0].split()[-1]) >= 2


def test_usage_above_the_hold_is_charged_at_the_hold_and_counted_as_overrun(stack: Stack):
    body = b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":500}}'
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    upstream = FakeUpstream(reply)  # a neuron whose tokenizer disagrees with our estimate
    try:
        cortex = budget_cortex(stack, upstream)
        key_id, key = create_key(cortex, balance_tokens=1000)
        assert chat(cortex, key).status_code == 200
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == COST  # capped at the hold
        metrics = httpx.get(cortex.url + "/metrics").text
        assert "cortex_settle_overruns_total 1" in metrics
        assert f"cortex_settle_overrun_tokens_total {9 + 500 - COST}" in metrics
        assert any(e.get("event") == "settle_overrun" for e in cortex.log_events())
    finally:
        upstream.close()


def test_the_admin_token_can_come_from_the_environment(stack: Stack, monkeypatch):
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "from-the-environment-123")
    cortex = stack.cortex(auth=True)
    assert admin(cortex, "GET", "keys", token="from-the-environment-123").status_code == 200
    assert admin(cortex, "GET", "keys", token=ADMIN_TOKEN).status_code == 401


def test_a_client_leaving_a_non_streamed_request_is_charged_the_whole_hold(stack: Stack):
    neuron = stack.neuron("--ttft-ms", "3000")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=1000)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 10},
                   headers={"authorization": f"Bearer {key}"}, timeout=0.5)
    wait_until(lambda: neuron.get_json("/health")["cancelled_total"] == 1)
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    # The neuron was working and its count never reached cortex: the upper bound is charged.
    assert detail["usage"]["spent_tokens"] == COST
    assert detail["recent"][0]["state"] == "settled" and detail["recent"][0]["charged_tokens"] == COST


def test_a_neuron_refusing_before_any_token_releases_the_hold(stack: Stack):
    neuron = stack.neuron("--slots", "1", "--queue-depth", "0", "--token-interval-ms", "20")
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": HI, "max_tokens": 300, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            busy = chat(cortex, key)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    states = {r["request_id"]: r for r in detail["recent"]}
    refused = states[busy.headers["x-request-id"]]
    assert refused["state"] == "released" and refused["charged_tokens"] == 0
