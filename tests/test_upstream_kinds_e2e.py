"""cortex in front of real-server stand-ins of every kind (`tests/standins.py`):
the kind's own health, limits and errors, budgets, and the upstream's key."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest

from tests.budget_helpers import budget_cortex, create_key, usage
from tests.conftest import Proc, Stack

MODEL = "served-model"
KINDS = ("vllm", "sglang", "llamacpp", "tgi", "ollama", "openai")
UPSTREAM_KEY = "upstream-secret-0123456789"


def standin(stack: Stack, kind: str, *args: str) -> Proc:
    proc = Proc(
        [sys.executable, "-m", "tests.standins", kind, "--model", MODEL, *args],
        stack.tmp_path / f"standin-{kind}-{len(stack.procs)}.log",
    )
    stack.procs.append(proc)
    return proc.wait_ready()


def fronted(stack: Stack, kind: str, *args: str, config: str = "") -> tuple[Proc, Proc]:
    upstream = standin(stack, kind, "--context", "2048", *args)
    path = stack.tmp_path / f"up-{len(stack.procs)}.toml"
    path.write_text(config + f'[[fleet.upstreams]]\nurl = "{upstream.url}"\nkind = "{kind}"\n')
    cortex = budget_cortex(stack, config=path.read_text())
    return upstream, cortex


@pytest.mark.parametrize("kind", KINDS)
def test_the_openai_sdk_through_each_kind_streamed_and_not_within_the_hold(stack: Stack, kind):
    upstream, cortex = fronted(stack, kind)
    key_id, key = create_key(cortex, balance_tokens=100_000)
    client = openai.OpenAI(base_url=cortex.url + "/v1", api_key=key, max_retries=0)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    assert whole.choices[0].message.content and whole.usage.completion_tokens <= 12
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True
        )
        if c.choices
    )
    assert text
    view = usage(cortex, key_id)["usage"]
    assert view["held_tokens"] == 0 and view["in_flight"] == 0
    recent = usage(cortex, key_id)["recent"]
    assert all(r["charged_tokens"] <= r["held_tokens"] for r in recent) and len(recent) == 2


@pytest.mark.parametrize("kind", ("vllm", "sglang", "llamacpp", "tgi"))
def test_models_carry_the_context_limit_the_kind_reports(stack: Stack, kind):
    _, cortex = fronted(stack, kind)
    (entry,) = httpx.get(cortex.url + "/v1/models", timeout=10).json()["data"]
    assert entry["id"] == MODEL and entry["limit"]["context"] == 2048
    node = httpx.get(cortex.url + "/health", timeout=10).json()["nodes"][0]
    assert node["kind"] == kind and node["limits"] == {MODEL: "reported"}


@pytest.mark.parametrize("kind", ("ollama", "openai"))
def test_a_kind_that_reports_no_limits_uses_the_configured_defaults_and_says_so(stack: Stack, kind):
    _, cortex = fronted(stack, kind, config="[fleet]\ndefault_context_tokens = 3000\ndefault_output_tokens = 700\n")
    (entry,) = httpx.get(cortex.url + "/v1/models", timeout=10).json()["data"]
    assert entry["limit"] == {"context": 3000, "output": 700}
    assert httpx.get(cortex.url + "/health", timeout=10).json()["nodes"][0]["limits"] == {MODEL: "default"}


@pytest.mark.parametrize("kind", ("vllm", "sglang", "llamacpp", "tgi"))
def test_a_prompt_past_the_context_by_cortexs_bound_is_the_upstreams_decision_and_its_refusal_frees_the_hold(stack: Stack, kind):
    # Over an unknown tokenizer cortex's byte bound is no count: the upstream, which knows its
    # tokenizer, decides; its refusal is mapped to context_length_exceeded and nothing is charged.
    upstream, cortex = fronted(stack, kind, "--context", "300")
    key_id, key = create_key(cortex, balance_tokens=100_000)
    r = httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 5},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert [q for q in httpx.get(upstream.url + "/_standin/requests", timeout=10).json() if q["method"] == "POST"]
    view = usage(cortex, key_id)["usage"]
    assert view["spent_tokens"] == 0 and view["held_tokens"] == 0


@pytest.mark.parametrize("kind", ("vllm", "llamacpp"))
def test_a_prompt_that_fits_the_upstream_but_not_cortexs_byte_bound_is_served(stack: Stack, kind):
    # 800 bytes of prompt: past a 300-token context by the byte bound, about 205 tokens by the
    # stand-in's own tokenizer (4 bytes a token), so it fits.
    upstream, cortex = fronted(stack, kind, "--context", "300")
    key_id, key = create_key(cortex, balance_tokens=100_000)
    r = httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 160}], "max_tokens": 5},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] + 5 <= 300 < len("word " * 160)


def test_an_overflow_only_the_upstream_knows_of_is_mapped_to_context_length_exceeded(stack: Stack):
    # A plain OpenAI-compatible server reports no context, so cortex holds under its default
    # (8192) and the server, with 300, refuses in its own words.
    upstream, cortex = fronted(stack, "openai", "--context", "300")
    key_id, key = create_key(cortex, balance_tokens=100_000)
    r = httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 5},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert [q for q in httpx.get(upstream.url + "/_standin/requests", timeout=10).json() if q["method"] == "POST"]
    view = usage(cortex, key_id)["usage"]
    assert view["spent_tokens"] == 0 and view["held_tokens"] == 0


def test_the_clients_key_never_reaches_the_upstream_and_the_configured_one_does(stack: Stack, monkeypatch):
    monkeypatch.setenv("VLLM_KEY", UPSTREAM_KEY)
    upstream = standin(stack, "vllm", "--api-key", UPSTREAM_KEY)
    config = f'[[fleet.upstreams]]\nurl = "{upstream.url}"\nkind = "vllm"\napi_key_env = "VLLM_KEY"\n'
    cortex = budget_cortex(stack, config=config)
    _, key = create_key(cortex, balance_tokens=10_000)
    for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
        r = httpx.post(
            cortex.url + "/v1/chat/completions", headers=headers, timeout=30,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
        assert r.status_code == 200, r.text
    seen = httpx.get(upstream.url + "/_standin/requests", timeout=10).json()
    posts = [req for req in seen if req["method"] == "POST"]
    assert len(posts) == 2
    for req in posts:
        headers = {k.lower(): v for k, v in req["headers"].items()} if isinstance(req["headers"], dict) else {
            k.lower(): v for k, v in req["headers"]}
        assert headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert key not in repr(req)
    assert UPSTREAM_KEY not in cortex.logs()


def test_an_unset_upstream_key_variable_fails_start_up_naming_it(tmp_path):
    import subprocess

    config = tmp_path / "c.toml"
    config.write_text('[[fleet.upstreams]]\nurl = "http://127.0.0.1:9"\nkind = "vllm"\napi_key_env = "NO_SUCH_KEY_VAR"\n')
    r = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--config", str(config),
         "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "NO_SUCH_KEY_VAR" in r.stderr


def test_upstream_flags_name_their_kind(tmp_path):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--upstream", "nonsense=http://x", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "KIND=URL" in r.stderr


# --- failover before the first byte ------------------------------------------------------


def _two_replicas(stack: Stack, kind: str = "vllm") -> tuple[Proc, Proc, Proc]:
    a, b = standin(stack, kind, "--context", "2048"), standin(stack, kind, "--context", "2048")
    config = "".join(f'[[fleet.upstreams]]\nurl = "{u.url}"\nkind = "{kind}"\n' for u in (a, b))
    return a, b, budget_cortex(stack, config=config)


def _posts(upstream: Proc) -> int:
    return sum(q["method"] == "POST" for q in httpx.get(upstream.url + "/_standin/requests", timeout=10).json())


def _chat(cortex: Proc, key: str, stream: bool = False) -> httpx.Response:
    return httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream},
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_replica_that_is_overloaded_before_the_first_byte_fails_over_with_one_charge(stack: Stack, stream):
    a, b, cortex = _two_replicas(stack)
    key_id, key = create_key(cortex, balance_tokens=10_000)
    # Routing ties go to the first configured replica: it refuses once, and says when to come back.
    httpx.post(a.url + "/_standin/faults", json={"overload_next": 1, "retry_after": "30"}, timeout=10)
    r = _chat(cortex, key, stream)
    assert r.status_code == 200 and "error" not in r.text
    assert (_posts(a), _posts(b)) == (1, 1)  # one refusal, one answer
    recent = usage(cortex, key_id)["recent"]
    assert len(recent) == 1 and recent[0]["state"] == "settled" and recent[0]["charged_tokens"] > 0
    # The refusing replica cools down for its Retry-After: the next requests all go to the other.
    before = (_posts(a), _posts(b))
    for _ in range(3):
        assert _chat(cortex, key).status_code == 200
    assert (_posts(a) - before[0], _posts(b) - before[1]) == (0, 3)


def test_when_every_replica_is_overloaded_the_client_gets_503_with_retry_after_and_pays_nothing(stack: Stack):
    a, b, cortex = _two_replicas(stack)
    key_id, key = create_key(cortex, balance_tokens=10_000)
    for replica in (a, b):
        httpx.post(replica.url + "/_standin/faults", json={"overload_next": 5, "retry_after": "7"}, timeout=10)
    r = _chat(cortex, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "7"
    assert _posts(a) + _posts(b) == 2  # tried once each, no more
    view = usage(cortex, key_id)["usage"]
    assert view["spent_tokens"] == 0 and view["held_tokens"] == 0


def test_a_reset_before_the_response_head_fails_over_to_another_replica(stack: Stack):
    from tests.fake_upstream import FakeUpstream

    neuron = stack.neuron()
    dead = FakeUpstream(b"", models_body=b'{"data":[{"id":"cortex-mock","limit":{"context":32768,"output":4096}}]}')
    try:
        cortex = budget_cortex(stack, dead, neuron)
        key_id, key = create_key(cortex, balance_tokens=10_000)
        for _ in range(2):  # least-dispatched routing sends one of these to the dead replica first
            r = httpx.post(
                cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                json={"model": "cortex-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            )
            assert r.status_code == 200, r.text
        assert neuron.get_json("/health")["requests_total"] == 2
        assert [row["state"] for row in usage(cortex, key_id)["recent"]] == ["settled", "settled"]
        assert any(e.get("event") == "upstream_reset" for e in cortex.log_events())
    finally:
        dead.close()


def test_ollama_cutting_a_prompt_silently_is_seen_and_counted(stack: Stack):
    _, cortex = fronted(stack, "ollama", config="[fleet]\ndefault_context_tokens = 200000\n")
    _, key = create_key(cortex, balance_tokens=1_000_000)
    # 100 kB, far past the stand-in's 2,048-token context: it keeps what fits and says nothing.
    long_prompt = [{"role": "user", "content": "word " * 20000}]
    r = httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": long_prompt, "max_tokens": 5},
    )
    assert r.status_code == 200, r.text
    metrics = httpx.get(cortex.url + "/metrics", timeout=10).text
    assert any(line.startswith("cortex_upstream_truncations_total{") and line.endswith(" 1") for line in metrics.splitlines())
    assert any(e.get("event") == "upstream_truncated_prompt" for e in cortex.log_events())
    short = httpx.post(
        cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert short.status_code == 200
    assert sum(e.get("event") == "upstream_truncated_prompt" for e in cortex.log_events()) == 1


async def test_one_key_cannot_take_more_than_its_fair_share_of_a_model(stack: Stack):
    import trio

    from tests.budget_helpers import HI, MODEL as MOCK

    neuron = stack.neuron("--token-interval-ms", "20", "--reply-tokens", "40")
    cortex = budget_cortex(stack, neuron, config="[fleet]\nmax_in_flight_per_key = 2\n")
    _, greedy = create_key(cortex, name="greedy", balance_tokens=1_000_000)
    _, other = create_key(cortex, name="other", balance_tokens=1_000_000)
    results: list[tuple[str, int, dict]] = []

    async def one(http: httpx.AsyncClient, who: str, key: str) -> None:
        r = await http.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                            json={"model": MOCK, "messages": HI, "max_tokens": 40})
        results.append((who, r.status_code, dict(r.headers)))

    async with httpx.AsyncClient(timeout=60) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one, http, "greedy", greedy)
            await trio.sleep(0.3)
            nursery.start_soon(one, http, "other", other)
    greedy_ok = [s for who, s, _ in results if who == "greedy" and s == 200]
    refused = [h for who, s, h in results if who == "greedy" and s == 429]
    assert len(greedy_ok) == 2 and len(refused) == 4
    assert all(h["retry-after"] for h in refused)
    assert [s for who, s, _ in results if who == "other"] == [200]
