"""cortex in front of a kernel neuron: `neuron serve --engine kernel --model synth-tiny`
and `cortex serve` as real processes on loopback, through plain HTTP (no SDK).

The core end-to-end and budget checks the mock passes, on real arithmetic: a chat
streamed and not, exact usage, the A0 fan-out on a capped key with zero overshoot,
and a client that drops mid-stream (the sequence is cancelled and freed, the charge
covers what was relayed). The neuron runs `--backend numpy`: numba's first compile
in a fresh checkout costs more than these tests' whole budget, and the serving
layer under test is the same for every backend.
"""

from __future__ import annotations

import json

import httpx
import pytest

from neuron.engines.kernel.checkpoint import preset_config, preset_tokenizer
from tests.budget_helpers import admin, budget_cortex, create_key, fan_out, usage
from tests.conftest import Stack, wait_until
from tests.kernel_helpers import HI, sse_events, streamed_text

MODEL = "synth-tiny"
TOKENIZER = preset_tokenizer(preset_config(MODEL))
HI_PROMPT_TOKENS = len(TOKENIZER.encode_chat(HI))  # what the neuron counts, exactly
GREEDY = {"temperature": 0}  # synth-tiny writes no EOS for HI greedily: every reply runs to max_tokens


@pytest.fixture(scope="module")
def pair(shared_stack: Stack):
    neuron = shared_stack.neuron("--engine", "kernel", "--model", MODEL, "--backend", "numpy")
    cortex = budget_cortex(shared_stack, neuron)
    _, key = create_key(cortex, "plain", balance_tokens=10_000_000)
    return neuron, cortex, key


def _post(url: str, key: str | None, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json={"model": MODEL, **body}, headers=headers, timeout=60)


def test_a_chat_streamed_and_not_through_cortex_is_the_neurons_reply_with_exact_usage(pair):
    neuron, cortex, key = pair
    body = {"messages": HI, "max_tokens": 24, **GREEDY}
    whole = _post(cortex.url, key, body)
    assert whole.status_code == 200, whole.text
    direct = _post(neuron.url, None, body).json()
    reply = whole.json()
    text = reply["choices"][0]["message"]["content"]
    assert text == direct["choices"][0]["message"]["content"]
    assert reply["usage"] == {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 24,
                              "total_tokens": HI_PROMPT_TOKENS + 24}
    assert reply["choices"][0]["finish_reason"] == "length"
    assert len(text.encode()) <= 24  # never more bytes than tokens: cortex's relay counts bytes
    streamed = _post(cortex.url, key, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200, streamed.text
    events = sse_events(streamed.content)
    assert events[-1] == "[DONE]" and streamed_text(events) == text
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 24
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    legacy = _post(cortex.url, key, {"prompt": "Once upon", "max_tokens": 6, **GREEDY}, "/v1/completions").json()
    assert legacy["usage"]["prompt_tokens"] == len(TOKENIZER.encode("Once upon", add_special_tokens=True))
    assert legacy["usage"]["completion_tokens"] == 6


def test_cortex_lists_the_kernel_model_with_its_limits(pair):
    _, cortex, key = pair
    models = httpx.get(cortex.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert models[0]["limit"] == {"context": 2048, "output": 2048}


def test_stop_sequences_and_the_context_wall(pair):
    _, cortex, key = pair
    full = _post(cortex.url, key, {"messages": HI, "max_tokens": 40, **GREEDY}).json()["choices"][0]["message"]["content"]
    stop = next(full[i:i + 2] for i in range(5, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    cut = _post(cortex.url, key, {"messages": HI, "max_tokens": 40, "stop": [stop], **GREEDY}).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    over = _post(cortex.url, key, {"messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 100})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"




def _received_tokens(body: bytes, stream: bool) -> int:
    """Output the client received, in tokens: exact for the byte-level tokenizer (one per byte)."""
    if stream:
        return len(streamed_text(sse_events(body)).encode())
    return len(json.loads(body)["choices"][0]["message"]["content"].encode())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a0_fan_out_on_a_capped_key_never_overshoots_and_nobody_gets_more_than_charged(pair, stream):
    neuron, cortex, _ = pair
    # cortex's byte bound for HI on synth-tiny's advertised template (3 + 3 + 2 bytes), plus max_tokens; once
    # cortex holds the advertised tokenizer the hold is the exact 6 + 10, and more of the fan-out fits the cap.
    hold = 8 + 10
    cap = 12 * hold + hold - 1
    key_id, key = create_key(cortex, f"fan-{stream}", balance_tokens=cap)
    before = neuron.get_json("/health")["requests_total"]
    results = await fan_out(cortex.url, key, 60, stream, model=MODEL, messages=HI, **GREEDY)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 60 and len(ok) >= 12, [(s, b[:300]) for s, _, b in results if s not in (200, 429)]
    assert all(b'"code":"insufficient_quota"' in body for _, _, body in refused)
    assert neuron.get_json("/health")["requests_total"] - before == len(ok)  # the neuron saw only the served
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    spent = detail["usage"]["spent_tokens"]
    assert spent <= cap  # zero overshoot
    recent = admin(cortex, "GET", f"keys/{key_id}?recent=100").json()["recent"]
    charged = {r["request_id"]: r["charged_tokens"] for r in recent if r["state"] == "settled"}
    assert sum(charged.values()) == spent and len(charged) == len(ok)
    for _, headers, body in ok:
        assert HI_PROMPT_TOKENS + _received_tokens(body, stream) <= charged[headers["x-request-id"]]
        assert charged[headers["x-request-id"]] == HI_PROMPT_TOKENS + 10  # exact usage, below the hold


def test_a_client_dropping_mid_stream_cancels_and_frees_its_sequence_and_pays_what_was_relayed(pair):
    neuron, cortex, _ = pair
    key_id, key = create_key(cortex, "drop", balance_tokens=100_000)
    before = neuron.get_json("/health")["cancelled_total"]
    received = 0
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": HI, "max_tokens": 1500, "stream": True, **GREEDY}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    received += len(json.loads(line[6:])["choices"][0]["delta"]["content"].encode())
                if received >= 15:
                    break
    health = wait_until(lambda: (h := neuron.get_json("/health"))["cancelled_total"] == before + 1 and h)
    per_model = wait_until(lambda: (m := neuron.get_json("/health")["per_model"][MODEL])["in_flight"] == 0 and m)
    assert per_model["kv_tokens_used"] == 0 and per_model["kv_tokens_reserved"] == 0
    assert per_model["sequences"]["cancelled_running"] >= 1
    detail = wait_until(lambda: (d := usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    spent = detail["usage"]["spent_tokens"]
    assert HI_PROMPT_TOKENS + received <= spent < 8 + 1500  # covers what was relayed; far below the hold
    assert detail["recent"][0]["state"] == "settled" and detail["recent"][0]["charged_tokens"] == spent
    assert health["tokens_generated_total"] > 0


def test_seeded_sampling_repeats_and_bad_sampling_fields_are_400(pair):
    neuron, _, _ = pair

    def text(**fields) -> str:
        r = _post(neuron.url, None, {"messages": HI, "max_tokens": 40, **fields})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    seeded = text(temperature=1.0, seed=7)
    assert text(temperature=1.0, seed=7) == seeded != text(temperature=1.0, seed=8)
    assert text(temperature=0.7, top_k=1, seed=3) == text(temperature=0) == text(top_p=0, seed=9)
    bad = _post(neuron.url, None, {"messages": HI, "top_k": "many"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    assert _post(neuron.url, None, {"messages": HI, "temperature": 3}).json()["error"]["param"] == "temperature"


def test_tools_are_rendered_into_the_prompt_and_the_reply_is_text(pair):
    neuron, _, _ = pair
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    r = _post(neuron.url, None, {"messages": HI, "tools": tools, "max_tokens": 5, "reasoning_effort": "high", **GREEDY})
    reply = r.json()
    assert r.status_code == 200 and reply["usage"]["prompt_tokens"] == len(TOKENIZER.encode_chat(HI, tools))
    assert reply["usage"]["prompt_tokens"] > HI_PROMPT_TOKENS
    message = reply["choices"][0]["message"]
    assert "tool_calls" not in message and "reasoning_content" not in message and isinstance(message["content"], str)


def _holds_advertised_tokenizer(cortex) -> bool:
    tokenizers = httpx.get(cortex.url + "/health", timeout=10).json().get("tokenizers", {})
    return tokenizers.get(MODEL, {}).get("state") == "held"


def test_without_a_catalogue_the_advertised_tokenizer_holds_the_exact_prompt_count_and_refuses_overflow_itself(pair):
    from common.counting import count_chat

    neuron, cortex, plain_key = pair
    wait_until(lambda: _holds_advertised_tokenizer(cortex))  # fetched once, in the background, after a poll
    messages = [{"role": "system", "content": "You are a careful coding agent. " * 12},
                {"role": "user", "content": "Refactor the parser, keep the tests green, explain each step. " * 18}]
    exact = len(TOKENIZER.encode_chat(messages))
    bound = count_chat(messages, TOKENIZER.message_overhead_tokens, TOKENIZER.reply_primer_tokens)  # cortex's byte bound
    assert exact < bound
    max_tokens = 8
    key_id, key = create_key(cortex, "advert", balance_tokens=exact + max_tokens)  # the byte bound would not fit
    r = _post(cortex.url, key, {"messages": messages, "max_tokens": max_tokens, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == exact  # the engine's count: the hold's prompt part, exactly
    recent = wait_until(lambda: [x for x in usage(cortex, key_id)["recent"] if x["state"] == "settled"])
    assert recent[0]["held_tokens"] == exact + max_tokens
    counted = httpx.post(cortex.url + "/v1/messages/count_tokens", timeout=30,
                         headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                         json={"model": MODEL, "system": messages[0]["content"], "messages": messages[1:]})
    assert counted.status_code == 200 and counted.json() == {"input_tokens": exact}
    # A context overflow is refused by cortex on its exact count, before the neuron sees it; the
    # request that exactly fills the context (which the byte bound would overflow) goes through.
    long = [{"role": "user", "content": "x" * 2000}]
    long_exact = len(TOKENIZER.encode_chat(long))
    room = 2048 - long_exact
    assert count_chat(long, TOKENIZER.message_overhead_tokens, TOKENIZER.reply_primer_tokens) + room > 2048
    seen = lambda: {k: v for k, v in neuron.get_json("/health").items() if k in ("requests_total", "rejected_total")}  # noqa: E731
    before = seen()
    over = _post(cortex.url, plain_key, {"messages": long, "max_tokens": room + 1})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert f"({long_exact} in the messages, {room + 1} in the completion)" in over.json()["error"]["message"]
    assert seen() == before and len(before) == 2
    fits = _post(cortex.url, plain_key, {"messages": long, "max_tokens": room, **GREEDY})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["prompt_tokens"] == long_exact


def test_a_catalogue_tokenizer_holds_the_exact_prompt_count_and_admits_what_the_byte_bound_would_refuse(shared_stack: Stack):
    from common.counting import count_chat
    from neuron.engines.kernel.checkpoint import make_checkpoint

    neuron = shared_stack.neuron("--engine", "kernel", "--model", MODEL, "--backend", "numpy")
    files = make_checkpoint(MODEL, str(shared_stack.tmp_path / "synth-tiny-files"))
    catalogue = shared_stack.tmp_path / "exact.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\ntokenizer = "{files}/tokenizer.json"\n')
    cortex = budget_cortex(shared_stack, neuron, args_extra=("--models", str(catalogue)))
    # A long prompt (counted off the event loop) whose exact count is below cortex's byte bound.
    # synth-tiny's context is 2048 tokens: about 1,600 bytes of prompt.
    messages = [{"role": "system", "content": "You are a careful coding agent. " * 12},
                {"role": "user", "content": "Refactor the parser, keep the tests green, explain each step. " * 18}]
    exact = len(TOKENIZER.encode_chat(messages))
    bound = count_chat(messages)
    assert exact < bound
    max_tokens = 8
    key_id, key = create_key(cortex, "exact", balance_tokens=exact + max_tokens)  # the byte bound would not fit
    r = _post(cortex.url, key, {"messages": messages, "max_tokens": max_tokens, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == exact  # what the engine counted: the hold's prompt part, exactly
    recent = wait_until(lambda: [x for x in usage(cortex, key_id)["recent"] if x["state"] == "settled"])
    assert recent[0]["held_tokens"] == exact + max_tokens
    assert recent[0]["charged_tokens"] == exact + r.json()["usage"]["completion_tokens"] <= exact + max_tokens
    # Claude Code asks count_tokens before it sends: the answer is the same exact count.
    counted = httpx.post(cortex.url + "/v1/messages/count_tokens", timeout=30,
                         headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                         json={"model": MODEL, "system": messages[0]["content"], "messages": messages[1:]})
    assert counted.status_code == 200 and counted.json() == {"input_tokens": exact}
