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


def test_a_claude_code_shaped_request_holds_its_exact_prompt_and_a_slice_and_is_admitted(stack: Stack):
    n = stack.neuron("--token-interval-ms", "0.2", "--reply-tokens", "500", "--context-length", "131072",
                     "--max-output-tokens", "32000")
    tools = [{"name": f"Tool{i}", "description": ("Reads, edits or runs things in the workspace. " * 90)[:3400],
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "body": {"type": "string"}},
                               "required": ["path"]}} for i in range(12)]
    body = {
        "model": MODEL, "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code, an agent for software engineering. " * 40,
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Follow the repository's conventions. " * 60},
                   {"type": "text", "text": "Environment: linux, git repo, tests with pytest. " * 20}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test in the parser."}]}],
        "tools": tools,
        "thinking": {"type": "enabled", "budget_tokens": 8000},
    }
    assert 45_000 <= len(json.dumps(body)) <= 52_000  # the measured request's size: 48.6 KB
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    counted = None
    for config, expect in (("", 429), ('[budget]\noutput_holds = "incremental"\n', 200)):
        cortex = budget_cortex(stack, n, config=config)
        probe_id, probe = create_key(cortex, balance_tokens=10_000_000)
        counted = httpx.post(cortex.url + "/v1/messages/count_tokens", headers={**headers, "x-api-key": probe},
                             json={k: v for k, v in body.items() if k not in ("max_tokens", "stream")}, timeout=30)
        exact = counted.json()["input_tokens"]
        key_id, key = create_key(cortex, balance_tokens=exact + 3000)  # room for the real reply, not for 32,000
        r = httpx.post(cortex.url + "/v1/messages", json=body, headers={**headers, "x-api-key": key}, timeout=60)
        assert r.status_code == expect, r.text
        if expect == 200:
            assert b"event: message_stop" in r.content and b'"stop_reason":"max_tokens"' not in r.content
            recent = wait_until(lambda: [x for x in key_usage(cortex, key_id)["recent"] if x["state"] == "settled"])
            # The hold: the exact prompt and the first slice (one more slice as the reply neared its end).
            assert recent[0]["held_tokens"] - exact in (1024, 2048)
            # Charged the reply's 500 tokens and the prompt as the neuron counted it (the mock leaves the tools'
            # JSON out of its count; cortex's holds it, an upper bound).
            assert recent[0]["actual_tokens"] == recent[0]["charged_tokens"] and recent[0]["charged_tokens"] - 500 <= exact


def _stream_some(cortex, key: str, n_chunks: int):
    """Open a long stream and read `n_chunks` data events; the response is left open for the caller."""
    client = httpx.Client(timeout=60)
    response = client.send(client.build_request(
        "POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": HI, "max_tokens": LONG, "stream": True}), stream=True)
    lines = response.iter_lines()
    seen = []
    for line in lines:
        if line.startswith("data: "):
            seen.append(line)
            if len(seen) >= n_chunks:
                break
    return client, response, lines, seen


def test_a_revocation_mid_reply_ends_it_at_the_next_slice(stack: Stack):
    n = stack.neuron("--token-interval-ms", "3", "--reply-tokens", str(LONG))
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    client, response, lines, seen = _stream_some(cortex, key, 10)
    assert admin(cortex, "POST", f"keys/{key_id}/revoke").status_code == 200
    rest = [line for line in lines if line.startswith("data: ") or line.startswith(":")]
    client.close()
    assert ": x-cortex-budget-truncated: true" in rest and rest[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in seen + rest if line.startswith("data: {") and json.loads(line[6:]).get("choices"))
    assert len(text.encode()) < LONG // 2  # it ended at the slice in force when the key was revoked, not at LONG
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + len(text.encode())


def test_a_cortex_killed_mid_extension_charges_at_most_the_durable_hold_after_recovery(stack: Stack):
    n = stack.neuron("--token-interval-ms", "3", "--reply-tokens", str(LONG))
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    cap = 50_000
    key_id, key = create_key(cortex, balance_tokens=cap)
    client, response, lines, seen = _stream_some(cortex, key, 3 * SLICE)  # a few extensions in
    cortex.kill()
    client.close()
    import sqlite3

    conn = sqlite3.connect(cortex.data_dir / "ledger.db")
    (amount,), = conn.execute("SELECT amount_tokens FROM holds WHERE state = 'open'").fetchall()
    conn.close()
    assert amount >= HI_PROMPT_TOKENS + 3 * SLICE  # durable before what it covers was forwarded
    again = budget_cortex(stack, n, config=INCREMENTAL, data_dir=cortex.data_dir)
    u = key_usage(again, key_id)
    assert u["usage"]["spent_tokens"] == amount <= cap and u["usage"]["held_tokens"] == 0
    assert [r["state"] for r in u["recent"]] == ["orphaned"]


async def test_replies_extending_while_top_ups_race_them_never_overshoot(stack: Stack):
    import trio

    n = stack.neuron("--token-interval-ms", "1", "--reply-tokens", "600")
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    key_id, key = create_key(cortex, balance_tokens=3_000)

    async def top_ups() -> None:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": "Bearer test-admin-token-0123456789"}) as c:
            for _ in range(20):
                await trio.sleep(0.02)
                r = await c.post(f"{cortex.url}/admin/v1/keys/{key_id}/topup", json={"tokens": 500})
                assert r.status_code == 200, r.text

    results: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(top_ups)

        async def fan() -> None:
            results.extend(await fan_out(cortex.url, key, 60, True, max_tokens=600))

        nursery.start_soon(fan)
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d, timeout_s=30)
    assert u["limits"]["balance_tokens"] == 13_000 and u["usage"]["spent_tokens"] <= 13_000
    delivered = sum(
        HI_PROMPT_TOKENS + len("".join((json.loads(e)["choices"][0]["delta"].get("content") or "")
                                       for e in sse_events(body)[:-1] if json.loads(e).get("choices")).encode())
        for status, _, body in results if status == 200
    )
    assert delivered == u["usage"]["spent_tokens"]


def test_the_policy_is_chosen_per_key_or_account_over_the_server_default(stack: Stack):
    import subprocess
    import sys

    n = neuron(stack)
    cortex = budget_cortex(stack, n)  # the server's default: worst_case, and slices of 1,024 tokens
    cap = HI_PROMPT_TOKENS + 1500  # a slice fits, the whole LONG-token bound does not
    body = {"model": MODEL, "messages": HI, "max_tokens": LONG}

    def ask(key: str) -> httpx.Response:
        return httpx.post(cortex.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                          timeout=60)

    _, plain = create_key(cortex, "plain", balance_tokens=cap)
    assert ask(plain).status_code == 429
    mine_id, mine = create_key(cortex, "mine", balance_tokens=cap, output_holds="incremental")
    assert ask(mine).status_code == 200
    assert key_usage(cortex, mine_id)["limits"]["output_holds"] == "incremental"
    # An account's choice applies to its keys that make none; a key's own wins over it.
    assert admin(cortex, "POST", "accounts", {"id": "agents", "output_holds": "incremental"}).status_code == 201
    _, member = create_key(cortex, "member", account="agents", balance_tokens=cap)
    assert ask(member).status_code == 200
    _, strict = create_key(cortex, "strict", account="agents", balance_tokens=cap, output_holds="worst_case")
    assert ask(strict).status_code == 429
    bad = admin(cortex, "POST", "keys", {"name": "bad", "output_holds": "sometimes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "output_holds"
    # The CLI sets it too, through the running server.
    out = subprocess.run([sys.executable, "-m", "cortex", "keys", "set-limits", mine_id, "--balance", str(cap),
                          "--output-holds", "worst_case", "--data-dir", str(cortex.data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "output holds worst case" in out.stdout
    assert key_usage(cortex, mine_id)["limits"]["output_holds"] == "worst_case"


def test_in_front_of_a_real_tokenizer_upstream_no_more_is_forwarded_than_held(stack: Stack):
    """vLLM's tokens may be many bytes each: the guard counts a token per byte, the most any bytes can be."""
    from tests.test_upstream_kinds_e2e import MODEL as VLLM_MODEL, fronted

    upstream, cortex = fronted(stack, "vllm", "--reply-tokens", "1500", "--context", "8192", config=INCREMENTAL)
    cap = 400
    key_id, key = create_key(cortex, balance_tokens=cap)
    body = {"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(cortex.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    chunks = [json.loads(e) for e in sse_events(r.content) if e != b"[DONE]"]
    delivered = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))  # one token each
    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    assert b"x-cortex-budget-truncated" in r.content and delivered < 1500
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert usage["prompt_tokens"] + delivered <= u["usage"]["spent_tokens"] <= cap


def statuses_ok(results: list) -> int:
    return sum(1 for r in results if r[0] == 200)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_200_request_fan_out_on_messages_is_cut_cleanly_never_overshoots_and_stops_the_neuron(stack: Stack, stream):
    import trio

    from cortex.fleet.transport import H11Transport

    n = stack.neuron("--token-interval-ms", "4", "--reply-tokens", "300")  # still generating when cortex cuts
    cortex = budget_cortex(stack, n, config=INCREMENTAL)
    cap = 20_000
    key_id, key = create_key(cortex, balance_tokens=cap)
    body = {"model": MODEL, "max_tokens": 400, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    results: list[tuple[int, bytes, dict]] = []

    async def one(client: httpx.AsyncClient) -> None:
        r = await client.post(cortex.url + "/v1/messages", json=body, headers=headers)
        results.append((r.status_code, r.content, dict(r.headers)))

    async with httpx.AsyncClient(transport=H11Transport(), timeout=60) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one, client)
    assert {s for s, _, _ in results} <= {200, 429}
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d, timeout_s=30)
    delivered, cut = 0, 0
    for status, raw, hdrs in results:
        if status != 200:
            continue
        if stream:
            events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
            assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
            text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
            stop = next(e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta")
            was_cut = b"x-cortex-budget-truncated" in raw
        else:
            message = json.loads(raw)
            text = "".join(block.get("text", "") for block in message["content"])
            stop = message["stop_reason"]
            was_cut = hdrs.get("x-cortex-budget-truncated") == "true"
        # A whole reply ends as the neuron ended it (its natural 300 tokens); a cut one where the hold did.
        assert stop == ("max_tokens" if was_cut else "end_turn") and (was_cut or len(text.encode()) == 300)
        cut += was_cut
        delivered += HI_PROMPT_TOKENS + len(text.encode())
    assert delivered == u["usage"]["spent_tokens"] <= cap
    assert cut >= 1  # the cap cut some replies short
    health = wait_until(lambda: (h := n.get_json("/health"))["in_flight"] == 0 and h)
    # Cut replies stopped their generations (those the neuron had not finished while cortex, slower under
    # this load, was still relaying them): it wrote less than every admitted reply's 300 tokens.
    assert health["cancelled_total"] >= 1
    assert health["tokens_generated_total"] < statuses_ok(results) * 300


def test_a_cut_reply_on_a_known_tokenizer_is_charged_its_tokens_counted_with_it(stack: Stack):
    from neuron.engines.kernel.checkpoint import make_checkpoint
    from tests.test_exact_count import TRAINED
    from tests.test_upstream_kinds_e2e import MODEL as VLLM_MODEL, standin

    files = make_checkpoint("synth-tiny", str(stack.tmp_path / "tok"))  # for its tokenizer_config.json
    TRAINED["bytelevel"].tokenizer.save(f"{files}/tokenizer.json")  # a BPE with merges: tokens of many bytes
    upstream = standin(stack, "vllm", "--context", "8192", "--reply-tokens", "1500")
    config = stack.tmp_path / "known.toml"
    catalogue = stack.tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{VLLM_MODEL}"\ntokenizer = "{files}/tokenizer.json"\n'
                         f'tokenizer_config = "{files}/tokenizer_config.json"\n')
    config.write_text(INCREMENTAL + f'[[fleet.upstreams]]\nurl = "{upstream.url}"\nkind = "vllm"\n')
    cortex = budget_cortex(stack, config=config.read_text(), args_extra=("--models", str(catalogue)))
    key_id, key = create_key(cortex, balance_tokens=400)
    r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
                         "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and b"x-cortex-budget-truncated" in r.content
    chunks = [json.loads(e) for e in sse_events(r.content) if e != b"[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    from common.chat_template import load_files

    expected = len(load_files(f"{files}/tokenizer.json", f"{files}/tokenizer_config.json").tokenizer
                   .encode(text, add_special_tokens=False).ids)
    assert usage["completion_tokens"] == expected < len(text.encode())  # the tokenizer's count, not the bytes
    u = wait_until(lambda: (d := key_usage(cortex, key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["usage"]["spent_tokens"] == usage["prompt_tokens"] + expected <= 400
