"""The model catalogue: validation that names the key, aliases end to end, limits and prices."""

from __future__ import annotations

import subprocess
import sys

import anthropic
import httpx
import pytest

from cortex.fleet.catalogue import CatalogueError, parse
from tests.budget_helpers import HI, HI_PROMPT_TOKENS, MODEL, budget_cortex, create_key, usage
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
    ],
    ids=["duplicate-id", "alias-to-unknown", "alias-cycle", "alias-shadows-id", "zero-context", "output-over-context",
         "negative-price", "half-a-price", "unknown-key", "no-id", "unknown-section"],
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
