"""Money caps end to end: real cortex and neuron processes, a real catalogue with prices, real SQLite."""

from __future__ import annotations

import httpx
import pytest
import trio

from cortex.budget.pricing import Prices
from cortex.fleet.catalogue import Cost
from cortex.fleet.transport import H11Transport
from tests.budget_helpers import HI, HI_PROMPT_TOKENS, admin, budget_cortex, create_key, usage
from tests.conftest import Stack, wait_until
from tests.standins import standin

CHEAP, DEAR = Cost(1.0, 2.0), Cost(10.0, 30.0)  # USD per 1M tokens = micro-USD per token
CATALOGUE = """
[[models]]
id = "cheap"
cost = { input = 1.0, output = 2.0 }

[[models]]
id = "dear"
cost = { input = 10.0, output = 30.0 }
"""


def _cost_usd(cost: Cost, max_tokens: int = 10) -> int:
    # The mock neuron's usage is the estimate itself (byte-level prompt, exactly max_tokens out).
    return Prices.from_cost(cost).charge_usd(HI_PROMPT_TOKENS, 0, max_tokens)


def _money_cortex(stack: Stack, *neurons, extra: str = ""):
    catalogue = stack.tmp_path / "models.toml"
    catalogue.write_text(CATALOGUE + extra)
    return budget_cortex(stack, *neurons, args_extra=("--models", str(catalogue)))


async def _fan_out_models(url: str, key: str, models: list[str]) -> list[tuple[str, int, bytes]]:
    results: list[tuple[str, int, bytes]] = []

    async def one(client: httpx.AsyncClient, model: str) -> None:
        body = {"model": model, "messages": HI, "max_tokens": 10}
        r = await client.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        results.append((model, r.status_code, r.content))

    async with httpx.AsyncClient(transport=H11Transport(), timeout=60) as client:
        async with trio.open_nursery() as nursery:
            for model in models:
                nursery.start_soon(one, client, model)
    return results


@pytest.mark.parametrize("fan", [20, 200])
async def test_a0_fan_out_on_a_usd_balance_across_two_prices_never_passes_the_cap(stack: Stack, fan):
    neuron = stack.neuron("--model", "cheap", "--model", "dear", "--token-interval-ms", "2")
    cortex = _money_cortex(stack, neuron)
    cheap, dear = _cost_usd(CHEAP), _cost_usd(DEAR)
    cap = (fan // 8) * (cheap + dear) + cheap - 1  # room for some of each, never all
    key_id, key = create_key(cortex, balance_usd=f"{cap / 10**6:.6f}")
    results = await _fan_out_models(cortex.url, key, ["cheap", "dear"] * (fan // 2))
    served = {m: sum(1 for model, status, _ in results if model == m and status == 200) for m in ("cheap", "dear")}
    refused = [body for _, status, body in results if status == 429]
    assert served["cheap"] and served["dear"] and refused
    assert sum(served.values()) + len(refused) == fan
    assert all(b'"code":"insufficient_quota"' in body and b"$" in body for body in refused)
    assert neuron.get_json("/health")["requests_total"] == sum(served.values())
    u = wait_until(lambda: (d := usage(cortex, key_id)["usage"])["held_micro_usd"] == 0 and d)
    assert u["spent_micro_usd"] == served["cheap"] * cheap + served["dear"] * dear <= cap
    assert u["remaining"]["balance_micro_usd"] == cap - u["spent_micro_usd"]
    # Nothing left that a request could fit into: the cheapest worst case is above what remains.
    assert cap - u["spent_micro_usd"] < Prices.from_cost(CHEAP).hold_usd(HI_PROMPT_TOKENS, 10) or served["cheap"] == fan // 2


def test_an_unpriced_model_under_a_money_cap_is_a_403_on_both_surfaces(stack: Stack):
    neuron = stack.neuron("--model", "cheap", "--model", "unpriced")
    cortex = _money_cortex(stack, neuron)
    _, key = create_key(cortex, balance_usd=1)
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.post(cortex.url + "/v1/chat/completions", headers=headers, timeout=30,
                   json={"model": "unpriced", "messages": HI, "max_tokens": 5})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "model_not_priced" and "unpriced" in r.json()["error"]["message"]
    r = httpx.post(cortex.url + "/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"}, timeout=30,
                   json={"model": "unpriced", "messages": HI, "max_tokens": 5})
    assert r.status_code == 403 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "permission_error"
    assert neuron.get_json("/health")["requests_total"] == 0
    ok = httpx.post(cortex.url + "/v1/chat/completions", headers=headers, timeout=30,
                    json={"model": "cheap", "messages": HI, "max_tokens": 5})
    assert ok.status_code == 200


def test_cached_prompt_tokens_are_charged_at_the_cached_price(stack: Stack):
    with standin("vllm", model="m", cached_tokens=16) as server:
        catalogue = stack.tmp_path / "models.toml"
        catalogue.write_text('[[models]]\nid = "m"\ncost = { input = 3.0, output = 15.0, cached_input = 0.3 }\n')
        cortex = budget_cortex(stack, args_extra=("--models", str(catalogue), "--upstream", f"vllm={server.url}"))
        key_id, key = create_key(cortex, balance_usd=5)
        wait_until(lambda: httpx.get(cortex.url + "/v1/models", timeout=5).json()["data"])
        messages = [{"role": "user", "content": "a prompt long enough to have a cached prefix of sixteen tokens"}]
        r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "m", "messages": messages, "max_tokens": 8})
        assert r.status_code == 200, r.text
        reported = r.json()["usage"]
    prompt, output = reported["prompt_tokens"], reported["completion_tokens"]
    assert reported["prompt_tokens_details"]["cached_tokens"] == 16 < prompt
    expected = Prices.from_cost(Cost(3.0, 15.0, 0.3)).charge_usd(prompt, 16, output)
    assert expected < Prices.from_cost(Cost(3.0, 15.0)).charge_usd(prompt, 0, output)  # the cache made it cheaper
    recent = wait_until(lambda: [x for x in usage(cortex, key_id)["recent"] if x["state"] == "settled"])
    assert recent[0]["charged_micro_usd"] == expected
    assert usage(cortex, key_id)["usage"]["spent_micro_usd"] == expected


def test_a_period_cap_and_usd_top_ups_work_through_the_admin_api(stack: Stack):
    neuron = stack.neuron("--model", "cheap")
    cortex = _money_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_usd="0.000001", period="monthly", period_tokens=10**6)
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "cheap", "messages": HI, "max_tokens": 5}
    assert httpx.post(cortex.url + "/v1/chat/completions", headers=headers, json=body, timeout=30).status_code == 429
    r = admin(cortex, "POST", f"keys/{key_id}/topup", {"usd": "0.01"})
    assert r.status_code == 200, r.text
    assert httpx.post(cortex.url + "/v1/chat/completions", headers=headers, json=body, timeout=30).status_code == 200
    u = wait_until(lambda: (d := usage(cortex, key_id)["usage"])["held_tokens"] == 0 and d)
    assert u["limits"]["balance_usd"] == 0.010001 and u["period"]["kind"] == "monthly"
    assert u["period"]["used_tokens"] == u["spent_tokens"] > 0
    assert u["spend"]["by_model"][0]["model"] == "cheap"
