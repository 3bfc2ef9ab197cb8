"""Admission control: the pure arithmetic, then a real kernel neuron (synth-tiny) over
HTTP: 503 with Retry-After when full, 413 for what can never fit, 503 when the
queue wait runs out, KV that holds admission back, and every refusal counted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from neuron import admission
from neuron.admission import AdmissionLimits, Load
from tests.conftest import Stack, wait_until

LIMITS = AdmissionLimits(max_in_flight=2, max_queue_depth=2, queue_wait_s=3.0, kv_budget_tokens=100)
KERNEL = ("--engine", "kernel", "--model", "synth-tiny", "--backend", "numpy")
MODEL = "synth-tiny"
HI = [{"role": "user", "content": "hi"}]


def test_the_reservation_is_the_prompt_and_every_token_it_may_generate_but_the_last():
    assert admission.kv_tokens_needed(6, 10) == 15  # the 10th token ends the sequence unfed
    assert admission.kv_tokens_needed(6, 1) == 6
    assert admission.max_tokens_that_fit(6, LIMITS) == 95 and admission.kv_tokens_needed(6, 95) == 100
    assert admission.max_tokens_that_fit(100, LIMITS) == 1 and admission.max_tokens_that_fit(101, LIMITS) == 0
    assert admission.kv_budget_tokens(512 * 1024, 512) == 1024
    assert admission.never_fits(101, LIMITS) and not admission.never_fits(100, LIMITS)


@pytest.mark.parametrize(
    ("load", "need", "verdict"),
    [
        (Load(0, 0, 0), 100, "admit"),
        (Load(1, 0, 50), 50, "admit"),
        (Load(1, 0, 51), 50, "queue"),  # a slot, but not the KV
        (Load(2, 0, 0), 1, "queue"),  # the KV, but no slot
        (Load(0, 1, 0), 1, "queue"),  # room now, but someone is waiting: no jumping the queue
        (Load(2, 2, 0), 1, "refuse"),
    ],
)
def test_verdicts(load, need, verdict):
    assert admission.verdict(load, need, LIMITS) == verdict


def test_refusals_say_why_and_when_to_retry():
    full = admission.queue_full("m", LIMITS)
    assert full.status == 503 and full.code == "service_unavailable" and dict(full.headers)[b"retry-after"] == b"1"
    big = admission.too_large("m", 150, LIMITS, kv_bytes_per_token=512)
    assert big.status == 413 and "150 tokens" in big.message and "100 tokens" in big.message
    assert admission.wait_expired(1.0, 4.0, LIMITS) and not admission.wait_expired(1.0, 3.9, LIMITS)


def _chat(url: str, max_tokens: int, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _hold(http: httpx.Client, url: str, max_tokens: int):
    """A long stream, started: the caller keeps it open, then leaves it. (Greedy: synth-tiny writes
    no EOS for this prompt, so it runs to max_tokens.)"""
    cm = http.stream("POST", url + "/v1/chat/completions",
                     json={"model": MODEL, "messages": HI, "max_tokens": max_tokens, "stream": True, "temperature": 0})
    response = cm.__enter__()
    assert response.status_code == 200
    raw = response.iter_raw()
    next(raw)
    return cm, raw  # a dropped iterator would close the stream


def _model_health(neuron) -> dict:
    return neuron.get_json("/health")["per_model"][MODEL]


def test_full_queue_queue_wait_and_too_large_are_refused_and_every_refusal_is_counted(stack: Stack):
    # 0.5 MiB of KV at 512 bytes a token: 1024 tokens, one sequence in flight, one queued.
    neuron = stack.neuron(*KERNEL, "--max-in-flight", "1", "--max-queue-depth", "1", "--queue-wait-s", "0.5",
                          "--kv-budget-mb", "0.5")
    too_large = _chat(neuron.url, 1100)  # 6 + 1100 tokens: within the context (2048), over the KV budget
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "kv_budget_exceeded"
    assert "KV budget" in too_large.json()["error"]["message"]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        held = _hold(http, neuron.url, 1000)
        queued = pool.submit(_chat, neuron.url, 5)
        wait_until(lambda: _model_health(neuron)["queued"] == 1)
        full = _chat(neuron.url, 5)
        expired = queued.result(timeout=60)  # the slot stays taken past the queue wait
        held[0].__exit__(None, None, None)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "service_unavailable" and "capacity" in full.json()["error"]["message"]
    assert expired.status_code == 503 and "queue wait" in expired.json()["error"]["message"]
    assert int(expired.headers["retry-after"]) >= 1
    health = wait_until(lambda: (h := neuron.get_json("/health"))["cancelled_total"] == 1 and h)
    per_model = health["per_model"][MODEL]
    assert per_model["rejections"] == {"queue_full": 1, "queue_wait": 1, "too_large": 1, "not_ready": 0}
    assert per_model["sequences"]["admitted"] == 1 and per_model["sequences"]["cancelled_running"] == 1
    assert per_model["sequences"]["expired"] == 1
    # Four requests: each counted once, as admitted or as refused.
    assert health["requests_total"] == 1 and health["rejected_total"] == 3
    assert per_model["in_flight"] == per_model["queued"] == per_model["kv_tokens_used"] == 0
    metrics = httpx.get(neuron.url + "/metrics").text
    for reason in ("queue_full", "queue_wait", "too_large"):
        assert f'neuron_admission_rejections_total{{model="{MODEL}",reason="{reason}"}} 1' in metrics
    # Only the held request's 6-token prompt was prefilled; the expired one never left the queue.
    assert f'neuron_prompt_tokens_total{{model="{MODEL}"}} 6' in metrics.splitlines()


def test_kv_that_would_not_fit_waits_in_the_queue_though_slots_are_free(stack: Stack):
    neuron = stack.neuron(*KERNEL, "--max-in-flight", "4", "--kv-budget-mb", "0.5")
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        held = _hold(http, neuron.url, 1000)  # reserves 1005 of 1024 tokens: a 6-token prompt, 999 more
        waiting = pool.submit(_chat, neuron.url, 100)
        health = wait_until(lambda: (h := _model_health(neuron))["queued"] == 1 and h)
        assert health["in_flight"] == 1 and health["kv_tokens_reserved"] == 1005
        assert 0 < health["kv_tokens_used"] <= 1005 and 0 < health["kv_usage_ratio"] <= 1005 / 1024
        assert health["kv_bytes_used"] == health["kv_tokens_used"] * 512 and health["kv_budget_bytes"] == 512 * 1024
        held[0].__exit__(None, None, None)  # leaving frees the reservation: the queued one goes in
        reply = waiting.result(timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 100
    assert _model_health(neuron)["rejections"]["queue_wait"] == 0


def test_limits_the_client_did_not_set_stay_within_the_kv_budget_and_the_context(stack: Stack):
    # 1024 tokens of KV; synth-tiny's context is 2048.
    neuron = stack.neuron(*KERNEL, "--kv-budget-mb", "0.5")
    chat = httpx.post(neuron.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=60)
    assert chat.status_code == 200, chat.text  # no max_tokens: what the budget holds, not a 413
    usage = chat.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] - 1 <= 1024

    def complete(prompt: str, **extra) -> httpx.Response:
        return httpx.post(neuron.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, **extra}, timeout=60)

    exact = complete("a" * 1024, max_tokens=1)  # 1024 tokens of prompt, one more sampled but never fed back
    assert exact.status_code == 200, exact.text
    assert exact.json()["usage"] == {"prompt_tokens": 1024, "completion_tokens": 1, "total_tokens": 1025}
    over = complete("a" * 1025, max_tokens=1)
    assert over.status_code == 413 and over.json()["error"]["code"] == "kv_budget_exceeded"
    for prompt in ("a" * 2048, "a" * 5000):  # the legacy default of 16 finds no room: the context wall
        wall = complete(prompt)
        assert wall.status_code == 400 and wall.json()["error"]["code"] == "context_length_exceeded", wall.text
    short = complete("a" * 100)  # the legacy default: 16 tokens
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 16
    health = neuron.get_json("/health")["per_model"][MODEL]
    assert health["in_flight"] == health["kv_tokens_used"] == 0


def test_a_load_path_with_a_nul_is_a_400(stack: Stack):
    neuron = stack.neuron(*KERNEL)
    for path in ("/tmp/\u0000x", ""):
        r = httpx.post(neuron.url + "/models/load", json={"model": "m1", "path": path}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
