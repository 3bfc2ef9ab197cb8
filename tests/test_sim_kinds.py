"""The simulator's upstream kinds and its failover invariants.

Each modelled server is read by cortex's real kind adapter, over the
simulator's own transport: its health, its limits in its own fields, its
overload and context-overflow errors, its streams. Then the checker is fed
synthetic events, one broken rule at a time, to prove each failover
invariant can fail (and that an honest failover passes).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial

import httpx
import pytest
import trio

from common.openai_schema import chat_request
from cortex.budget.estimate import prompt_tokens_bound
from cortex.budget.ledger import Caps, Hold, Ledger
from cortex.fleet.kinds import KINDS
from cortex.fleet.kinds.base import prompt_truncation_suspected
from cortex.proxy import FAILOVERS_MAX
from cortex.relay import StreamRelay
from sim import runner
from sim.invariants import Checker, RequestRecord
from sim.network import SimNetwork
from sim.scenario import LOADING_KINDS, UpstreamSpec, parse
from sim.trace import Trace
from sim.upstream_kinds import WIRES, KindApp, ServerFaults

CONTEXT = 4096
TOKEN_BYTES = 4
SPEC = UpstreamSpec("u", models=("m",), ttft_s=0.01, tokens_per_s=100, context_tokens=CONTEXT,
                    reply_tokens=12, chunk_tokens=2, token_bytes=TOKEN_BYTES)
MODEL_KINDS = sorted(WIRES)


@asynccontextmanager
async def serving(kind: str, faults: ServerFaults | None = None, **spec: object) -> AsyncIterator[httpx.AsyncClient]:
    """One modelled server of `kind` on the simulated network, and a client that reaches it."""
    network = SimNetwork(random.Random(0), 0.0, 0.0)
    host = network.add_host("u")
    up = replace(SPEC, kind=kind, **spec)
    app = KindApp(up, seed=1, faults=faults or ServerFaults(random.Random(0)), ready_at=trio.current_time() + up.load_s)
    async with trio.open_nursery() as nursery:
        host.app, host.nursery = app, nursery
        async with httpx.AsyncClient(transport=network.transport(), base_url="http://u") as client:
            yield client
        nursery.cancel_scope.cancel()


def chat_body(kind: str, content: str = "hello there", max_tokens: int = 8, stream: bool = False) -> dict:
    """What cortex sends this kind: the client's body through the real adapter."""
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}
    return KINDS[kind].prepare_body(body, output_tokens_max=max_tokens, stream=stream)


def overloaded_faults(status: int | None = None, retry_after_s: float | None = None) -> ServerFaults:
    return ServerFaults(random.Random(0), overload_until=float("inf"), overload_status=status, retry_after_s=retry_after_s)


# --- each kind, as its adapter reads it -------------------------------------------------------


@pytest.mark.parametrize("kind", MODEL_KINDS)
async def test_each_kind_is_healthy_and_lists_its_limits_in_its_own_fields(kind, autojump_clock):
    adapter = KINDS[kind]
    async with serving(kind) as client:
        probe = await client.get(adapter.health_path)
        assert adapter.judge_health(probe.status_code, probe.content).healthy
        bodies = {path: (await client.get(path)).json() for path in adapter.model_paths}
    entries = adapter.parse_models(bodies)
    assert list(entries) == ["m"]
    assert entries["m"].context_tokens == (CONTEXT if adapter.reports_context else None)


async def test_llamacpp_reports_n_predict_as_its_output_limit_only_when_set(autojump_clock):
    adapter = KINDS["llamacpp"]
    for output_tokens, expected in ((None, None), (300, 300)):
        async with serving("llamacpp", output_tokens=output_tokens) as client:
            bodies = {path: (await client.get(path)).json() for path in adapter.model_paths}
        assert adapter.parse_models(bodies)["m"].output_tokens == expected


@pytest.mark.parametrize("kind", sorted(LOADING_KINDS))
async def test_a_loading_server_is_not_ready_and_refuses_generation_until_loaded(kind, autojump_clock):
    adapter = KINDS[kind]
    async with serving(kind, load_s=5.0) as client:
        probe = await client.get(adapter.health_path)
        assert adapter.judge_health(probe.status_code, probe.content).state == "not_ready"
        refused = await client.post("/v1/chat/completions", json=chat_body(kind))
        assert adapter.normalise_error(refused.status_code, refused.content).overloaded
        await trio.sleep(5.0)
        probe = await client.get(adapter.health_path)
        assert adapter.judge_health(probe.status_code, probe.content).healthy
        assert (await client.post("/v1/chat/completions", json=chat_body(kind))).status_code == 200


async def test_llamacpp_says_it_is_loading_the_model_in_its_own_words(autojump_clock):
    async with serving("llamacpp", load_s=5.0) as client:
        probe = await client.get("/health")
    assert probe.status_code == 503 and probe.json()["error"]["message"] == "Loading model"
    assert "loading" in (KINDS["llamacpp"].judge_health(probe.status_code, probe.content).reason or "")


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize(("status", "retry_after_s"), [(None, 7.0), (None, None), (529, 3.0)])
async def test_an_overload_fault_answers_in_the_kinds_shape_and_its_adapter_reads_an_overload(kind, status, retry_after_s, autojump_clock):
    adapter = KINDS[kind]
    async with serving(kind, overloaded_faults(status, retry_after_s)) as client:
        reply = await client.post("/v1/chat/completions", json=chat_body(kind))
    assert reply.status_code == (status or WIRES[kind].overload_status)
    assert reply.headers.get("retry-after") == (None if retry_after_s is None else f"{retry_after_s:g}")
    err = adapter.normalise_error(reply.status_code, reply.content, reply.headers.get("retry-after"))
    assert err.overloaded and err.retry_after_s == (retry_after_s or 1.0)


async def test_tgi_answers_a_streamed_overload_in_band_after_a_200(autojump_clock):
    async with serving("tgi", overloaded_faults()) as client:
        reply = await client.post("/v1/chat/completions", json=chat_body("tgi", stream=True))
    assert reply.status_code == 200
    first = json.loads(reply.content.split(b"\n\n")[0].removeprefix(b"data: "))
    err = KINDS["tgi"].stream_error(first)
    assert err is not None and err.overloaded


@pytest.mark.parametrize("kind", [k for k in MODEL_KINDS if k != "ollama"])
async def test_a_prompt_over_the_context_is_refused_in_words_the_adapter_maps_to_context_length_exceeded(kind, autojump_clock):
    adapter = KINDS[kind]
    too_long = "x" * (CONTEXT * TOKEN_BYTES + 64)
    async with serving(kind) as client:
        reply = await client.post("/v1/chat/completions", json=chat_body(kind, too_long))
    assert 400 <= reply.status_code < 500
    err = adapter.normalise_error(reply.status_code, reply.content)
    assert err.context_overflow and err.status == 400


async def test_ollama_cuts_an_oversized_prompt_silently_and_cortex_can_tell(autojump_clock):
    too_long = "x" * (CONTEXT * TOKEN_BYTES * 8)  # far over: cortex flags a count under 1/16 of its bound
    async with serving("ollama") as client:
        reply = await client.post("/v1/chat/completions", json=chat_body("ollama", too_long))
    assert reply.status_code == 200
    reported = reply.json()["usage"]["prompt_tokens"]
    bound = prompt_tokens_bound(chat_request({"model": "m", "messages": [{"role": "user", "content": too_long}]}))
    assert reported <= CONTEXT and prompt_truncation_suspected(reported, bound)


@pytest.mark.parametrize("kind", MODEL_KINDS)
async def test_a_stream_carries_whole_tokens_a_usage_frame_and_done(kind, autojump_clock):
    adapter = KINDS[kind]
    async with serving(kind) as client:
        reply = await client.post("/v1/chat/completions", json=chat_body(kind, max_tokens=8, stream=True))
    assert reply.status_code == 200
    relay = StreamRelay(client_wants_usage=True, output_tokens_max=adapter.output_bytes_max(8))
    relay.feed(reply.content)
    assert relay.done and not relay.overflowed
    usage = relay.usage
    assert usage["completion_tokens"] == 8 == relay.output_tokens // TOKEN_BYTES  # reply_tokens 12, cut at 8
    prompt = "hello there"
    assert usage["prompt_tokens"] <= prompt_tokens_bound(chat_request(chat_body(kind, prompt)))


@pytest.mark.parametrize("kind", MODEL_KINDS)
async def test_a_whole_reply_counts_its_tokens_in_the_kinds_tokenizer(kind, autojump_clock):
    async with serving(kind) as client:
        reply = await client.post("/v1/chat/completions", json=chat_body(kind, max_tokens=100))
    assert reply.status_code == 200
    body = reply.json()
    content = body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 12 == len(content) // TOKEN_BYTES  # the natural length
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_fields_a_kind_refuses_are_refused_in_its_words(autojump_clock):
    async with serving("vllm") as client:
        reply = await client.post("/v1/chat/completions", json={**chat_body("vllm"), "stream_options": {"include_usage": True}})
    assert reply.status_code == 400 and "stream" in reply.json()["error"]["message"]
    async with serving("tgi") as client:
        reply = await client.post("/v1/chat/completions", json={**chat_body("tgi"), "max_completion_tokens": 8})
    assert reply.status_code == 422 and b"duplicate field" in reply.content


async def test_a_full_queue_is_the_kinds_own_overload(autojump_clock):
    async with serving("vllm", slots=1, queue_depth=0) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat_body("vllm", max_tokens=100)))
            await trio.sleep(0.001)  # the first takes the only slot
            reply = await client.post("/v1/chat/completions", json=chat_body("vllm"))
    assert reply.status_code == 503 and KINDS["vllm"].normalise_error(503, reply.content).overloaded


# --- failover through the whole world ------------------------------------------------------------


def two_replica_scenario(kind: str, status: int, stream_share: float = 0.5) -> dict:
    upstreams = [{"name": n, "kind": kind, "models": ["m"], "ttft_ms": 20, "tokens_per_s": 200} for n in ("a", "b")]
    return {
        "name": "two", "description": "two replicas, one overloaded", "horizon_s": 120,
        "keys": [{"name": "k", "balance_tokens": 10_000_000}],
        "upstreams": upstreams,
        "workload": [{"kind": "open", "key": "k", "model": "m", "rate_per_s": 10, "duration_s": 8, "stream_share": stream_share}],
        "faults": [{"kind": "overload", "target": "a", "at_s": 0, "for_s": 100, "status": status, "retry_after_s": 1}],
        "expect": {"failed": 0, "failovers": {"min": 1}},
    }


@pytest.mark.parametrize(("kind", "status"), [("openai", 529), ("sglang", 503)])
def test_a_replica_that_answers_overloaded_is_failed_over_and_cooled_down(kind, status):
    result = runner.run(parse(two_replica_scenario(kind, status)), 1)
    assert result.ok, result.violation or result.expectation_failures
    refused = result.world.server_faults["a"].refused_total
    # Each 503 takes a out of rotation for its Retry-After (1 s): about one refusal a second, not one a request.
    assert 1 <= refused <= 12 and result.summary["failovers"] == refused
    assert result.world.deliveries["b"] > 5 * refused


def test_a_tgi_replica_overloaded_on_a_stream_is_failed_over():
    # TGI answers even an overload as a 200 and an error event: cortex reads it before the client's head.
    result = runner.run(parse(two_replica_scenario("tgi", 429, stream_share=1.0)), 1)
    assert result.ok, result.violation or result.expectation_failures


# --- the invariants can fail --------------------------------------------------------------------------


@pytest.fixture
def checker() -> Checker:
    c = Checker(Trace())
    c.requests["r1"] = RequestRecord("r1", "k")
    c.open_by_request["r1"] = Hold("h1", "key1", "acct", 100, 0.0, 600.0, "r1")
    c.token_bytes = {"a": 1, "b": 4, "c": 4}
    return c


def ledger_for(checker: Checker, caps: Caps = Caps(), **faults: bool) -> Ledger:
    ledger = Ledger(**faults)
    ledger.add_account("acct")
    ledger.add_key("key1", "acct", caps)
    ledger.observer = checker.on_ledger
    checker.ledger = ledger
    return ledger


async def test_an_honest_failover_is_no_violation(checker):
    ledger = ledger_for(checker)
    checker.open_by_request.clear()
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    checker.on_attempt("a", "r1", "refused")
    checker.on_deliver("b", "r1", "Bearer upstream-key")
    checker.on_head("b", "r1", 503, client=False)
    checker.on_deliver("c", "r1")
    checker.on_head("c", "r1", 200, client=False)
    checker.on_body("c", "r1")
    checker.on_head("cortex", "r1", 200, client=True)
    checker.on_body("c", "r1")
    ledger.settle("h1", 30, 1.0)
    record = checker.requests["r1"]
    record.received_bytes, record.outcome = 100, "served"  # 25 tokens of c's tokenizer
    checker.check_end(0, {"r1": "settled"}, 2, 0, [])
    assert checker.violation is None
    assert record.tried == ["a", "b", "c"] and record.deliveries == 2 == 1 + FAILOVERS_MAX


async def test_two_upstreams_sending_body_bytes_for_one_request_is_a_violation(checker):
    checker.on_deliver("b", "r1")
    checker.on_body("b", "r1")
    checker.on_deliver("c", "r1")
    checker.on_body("c", "r1")
    assert "both b and c sent body bytes" in checker.violation


async def test_a_dispatch_after_the_clients_response_began_is_a_violation(checker):
    checker.on_deliver("b", "r1")
    checker.on_head("cortex", "r1", 200, client=True)
    checker.on_deliver("c", "r1")
    assert "after its response to the client had begun" in checker.violation


async def test_more_deliveries_than_failover_allows_is_a_violation(checker):
    for host in ("a", "b", "c")[: 1 + FAILOVERS_MAX]:
        checker.on_deliver(host, "r1")
    assert checker.violation is None
    checker.on_deliver("d", "r1")
    assert f"failover allows {1 + FAILOVERS_MAX}" in checker.violation


async def test_the_same_upstream_tried_twice_is_a_violation(checker):
    checker.on_attempt("a", "r1", "refused")
    checker.on_attempt("a", "r1", "unreachable")
    assert "was sent to a twice" in checker.violation


async def test_a_second_hold_for_one_request_is_a_violation(checker):
    ledger = ledger_for(checker)
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    ledger.reserve("h2", "key1", 100, 0.0, 600.0, "r1")
    assert "r1 reserved a hold 2 times" in checker.violation


async def test_a_hold_settled_twice_is_a_violation(checker):
    ledger = ledger_for(checker)
    hold = ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    ledger.settle("h1", 40, 1.0)
    checker.on_ledger("resolve", hold, 1.0)  # the same resolution, reported again: a double charge
    assert "hold of r1 resolved 2 times" in checker.violation


async def test_a_charge_above_the_hold_is_a_violation(checker):
    ledger = ledger_for(checker)
    hold = ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    checker.on_ledger("resolve", replace(hold, charged_tokens=101), 1.0)
    assert "r1 charged 101, outside [0, hold 100]" in checker.violation


async def test_spend_plus_held_above_a_cap_is_a_violation(checker):
    ledger = ledger_for(checker, Caps(balance_tokens=150), fault_skip_cap_check=True)
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    assert checker.violation is None
    ledger.reserve("h2", "key1", 100, 0.0, 600.0, "r2")
    assert "held 200 > balance 150" in checker.violation


async def test_a_charge_below_what_the_client_received_in_the_upstreams_tokens_is_a_violation(checker):
    record = checker.requests["r1"]
    record.hold_amount, record.charged, record.served_by, record.received_bytes = 100, 30, "b", 124  # 31 tokens of b
    checker.check_end(0, {"r1": "settled"}, 0, 0, [])
    assert "r1: charged 30 outside [received 31, hold 100]" in checker.violation


async def test_the_clients_own_key_reaching_an_upstream_is_a_violation(checker):
    checker.client_keys.add("Bearer sk-cx-client")
    checker.on_deliver("a", "r1", "Bearer sk-cx-client")
    assert "the client's own key reached a" in checker.violation


async def test_a_served_request_whose_body_no_upstream_sent_is_a_violation(checker):
    checker.requests["r1"].outcome = "served"
    checker.check_end(0, {}, 0, 0, [])
    assert "r1 was served, but no upstream sent its body" in checker.violation
