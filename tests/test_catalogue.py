"""The model catalogue: validation that names the key, aliases end to end, limits and prices."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import anthropic
import httpx
import pytest

from cortex.fleet.catalogue import CatalogueError, parse
from tests.budget_helpers import ADMIN_TOKEN, HI, HI_PROMPT_TOKENS, MODEL, admin, budget_cortex, create_key, usage
from tests.conftest import Stack

GOOD = {
    "models": [{"id": MODEL, "display_name": "Mock", "limit": {"output": 50}, "cost": {"input": 0.5, "output": 1.5}}],
    "aliases": {"claude-sonnet-4-5": MODEL, "claude-haiku": "claude-sonnet-4-5"},
}


def test_a_good_catalogue_resolves_aliases_through_aliases():
    cat = parse(GOOD)
    assert cat.resolve("claude-haiku") == MODEL and cat.resolve("claude-sonnet-4-5") == MODEL
    assert cat.resolve("other") == "other"
    assert cat.model(MODEL).cost.output == 1.5


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": [{"id": "a"}, {"id": "a"}]}, "models[1].id"),
        ({"models": [{"id": "a"}], "aliases": {"x": "nope"}}, "aliases.x"),
        ({"models": [{"id": "a"}], "aliases": {"x": "y", "y": "x"}}, "aliases.x"),
        ({"models": [{"id": "a"}], "aliases": {"a": "a"}}, "aliases.a"),
        ({"models": [{"id": "a", "limit": {"context": 0}}]}, "models[0].limit.context"),
        ({"models": [{"id": "a", "limit": {"context": 10, "output": 20}}]}, "models[0].limit.output"),
        ({"models": [{"id": "a", "cost": {"input": -1, "output": 1}}]}, "models[0].cost.input"),
        ({"models": [{"id": "a", "cost": {"input": 1}}]}, "models[0].cost.output"),
        ({"models": [{"id": "a", "colour": "red"}]}, "models[0].colour"),
        ({"models": [{"display_name": "x"}]}, "models[0].id"),
        ({"modles": []}, "catalogue.modles"),
        ({"models": [{"id": "a", "max_in_flight_per_key": 0}]}, "models[0].max_in_flight_per_key"),
    ],
    ids=["duplicate-id", "alias-to-unknown", "alias-cycle", "alias-shadows-id", "zero-context", "output-over-context",
         "negative-price", "half-a-price", "unknown-key", "no-id", "unknown-section", "zero-fair-share"],
)
def test_a_bad_catalogue_is_refused_naming_the_key(data, key):
    with pytest.raises(CatalogueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


def test_a_bad_catalogue_fails_start_up_with_the_key_named(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "a"\n[aliases]\nx = "missing"\n')
    r = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--models", str(path),
         "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "aliases.x" in r.stderr


def _toml(stack: Stack) -> str:
    path = stack.tmp_path / "models.toml"
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\ndisplay_name = "Mock"\nlimit = {{ output = 50 }}\n'
        'cost = { input = 0.5, output = 1.5 }\n'
        f'[aliases]\n"claude-sonnet-4-5" = "{MODEL}"\n'
    )
    return f'[fleet]\nmodels_file = "{path}"\n'


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK warns about retired Claude names; ours is an alias
def test_an_alias_is_served_by_its_model_and_charged_to_it(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, config=_toml(stack))
    key_id, key = create_key(cortex, balance_tokens=10_000)
    r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": "claude-sonnet-4-5", "messages": HI, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    (row,) = usage(cortex, key_id)["recent"]
    assert row["model"] == MODEL and row["charged_tokens"] == HI_PROMPT_TOKENS + 5
    logged = [e for e in cortex.log_events() if e.get("path") == "/v1/chat/completions"]
    assert logged[-1]["model"] == MODEL and logged[-1]["model_requested"] == "claude-sonnet-4-5"
    # Claude Code's default model name works unchanged on the Anthropic surface.
    message = anthropic.Anthropic(base_url=cortex.url, api_key=key, max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert message.model == "claude-sonnet-4-5" and message.usage.output_tokens == 5


def test_the_catalogue_limits_override_the_upstreams_in_the_hold_and_the_listing(stack: Stack):
    neuron = stack.neuron("--max-output-tokens", "4096")
    cortex = budget_cortex(stack, neuron, config=_toml(stack))
    key_id, key = create_key(cortex, balance_tokens=10_000)
    r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": MODEL, "messages": HI})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 50
    assert usage(cortex, key_id)["recent"][0]["held_tokens"] == HI_PROMPT_TOKENS + 50
    listing = {e["id"]: e for e in httpx.get(cortex.url + "/v1/models", timeout=10).json()["data"]}
    assert listing[MODEL]["limit"]["output"] == 50 and listing[MODEL]["cost"] == {"input": 0.5, "output": 1.5}
    assert listing["claude-sonnet-4-5"]["alias_of"] == MODEL and listing[MODEL]["display_name"] == "Mock"


# --- reloading: SIGHUP and the admin API ----------------------------------------------

RELOAD_WAIT_S = 20.0


def _write_catalogue(stack: Stack, aliases: dict[str, str], extra: str = "") -> str:
    path = stack.tmp_path / "models.toml"
    lines = [f'[[models]]\nid = "{MODEL}"\n{extra}', "[aliases]", *(f'"{k}" = "{v}"' for k, v in aliases.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _wait_for_event(proc, name: str, count: int) -> dict:
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        seen = [e for e in proc.log_events() if e.get("event") == name]
        if len(seen) >= count:
            return seen[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"no {name} #{count} in the log:\n{proc.logs()}")


def _ask(cortex, key: str, model: str) -> httpx.Response:
    return httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": HI, "max_tokens": 5})


def test_sighup_reloads_the_catalogue_without_dropping_a_stream_and_a_broken_file_keeps_the_old_one(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "20", "--reply-tokens", "60")
    path = _write_catalogue(stack, {"old-name": MODEL})
    cortex = budget_cortex(stack, neuron, config=f'[fleet]\nmodels_file = "{path}"\n')
    _, key = create_key(cortex, balance_tokens=100_000)
    assert _ask(cortex, key, "old-name").status_code == 200
    assert _ask(cortex, key, "new-name").status_code == 404

    _write_catalogue(stack, {"new-name": MODEL})
    with httpx.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      timeout=30, json={"model": "old-name", "messages": HI, "max_tokens": 60, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is under way: now reload under it
        cortex.signal(signal.SIGHUP)
        _wait_for_event(cortex, "catalogue_reloaded", 1)
        rest = list(lines)
    assert r.status_code == 200 and [l for l in rest if l][-1] == "data: [DONE]"  # the admitted stream ran to its end
    assert _ask(cortex, key, "new-name").status_code == 200
    assert _ask(cortex, key, "old-name").status_code == 404

    (stack.tmp_path / "models.toml").write_text('[[models]]\nid = "x"\n[aliases]\nbroken = "missing"\n')
    cortex.signal(signal.SIGHUP)
    refused = _wait_for_event(cortex, "catalogue_reload_refused", 1)
    assert "aliases.broken" in refused["error"]
    assert _ask(cortex, key, "new-name").status_code == 200  # the old catalogue stays in force
    metrics = httpx.get(cortex.url + "/metrics", timeout=10).text
    assert 'cortex_catalogue_reloads_total{result="ok"} 1' in metrics
    assert 'cortex_catalogue_reloads_total{result="refused"} 1' in metrics


def test_fleet_reload_through_the_admin_api_and_the_cli(stack: Stack):
    neuron = stack.neuron()
    path = _write_catalogue(stack, {})
    cortex = budget_cortex(stack, neuron, config=f'[fleet]\nmodels_file = "{path}"\n')
    _, key = create_key(cortex, balance_tokens=100_000)
    _write_catalogue(stack, {"claude-sonnet-4-5": MODEL})
    cli = [sys.executable, "-m", "cortex", "fleet", "reload", "--url", cortex.url]
    r = subprocess.run([*cli, "--admin-token", ADMIN_TOKEN], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "catalogue reloaded" in r.stdout and "claude-sonnet-4-5 -> cortex-mock" in r.stdout
    assert _ask(cortex, key, "claude-sonnet-4-5").status_code == 200

    (stack.tmp_path / "models.toml").write_text('[[models]]\nid = "a"\nlimit = { context = -1 }\n')
    r = subprocess.run(cli, capture_output=True, text=True, timeout=60, env={**_env(), "CORTEX_ADMIN_TOKEN": ADMIN_TOKEN})
    assert r.returncode == 1 and "models[0].limit.context" in r.stderr and "stays" in r.stderr
    refused = admin(cortex, "POST", "fleet/reload")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_catalogue"
    assert _ask(cortex, key, "claude-sonnet-4-5").status_code == 200
    assert admin(cortex, "GET", "fleet/reload").status_code == 405
    assert admin(cortex, "POST", "fleet/reload", token="wrong-token-0123456789").status_code == 401
    r = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 2 and "admin token" in r.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "CORTEX_ADMIN_TOKEN"}


async def test_a_models_own_fair_share_overrides_the_fleet_wide_one(stack: Stack):
    import trio

    neuron = stack.neuron("--token-interval-ms", "20", "--reply-tokens", "40")
    path = _write_catalogue(stack, {}, extra="max_in_flight_per_key = 1\n")
    cortex = budget_cortex(stack, neuron, config=f'[fleet]\nmodels_file = "{path}"\nmax_in_flight_per_key = 3\n')
    _, key = create_key(cortex, balance_tokens=1_000_000)
    statuses: list[int] = []

    async def one(http: httpx.AsyncClient) -> None:
        r = await http.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                            json={"model": MODEL, "messages": HI, "max_tokens": 40})
        statuses.append(r.status_code)

    async with httpx.AsyncClient(timeout=60) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, http)
    assert sorted(statuses) == [200, 429, 429, 429]  # 1 from the catalogue, not the fleet's 3
