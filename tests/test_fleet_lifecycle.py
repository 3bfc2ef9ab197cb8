"""Cold loads on demand, single flight, eviction by priority and LRU, pins, busy models kept: real processes."""

from __future__ import annotations

import re

import anthropic
import httpx
import pytest
import trio

from tests.budget_helpers import HI, MODEL, admin, budget_cortex, create_key, usage
from tests.conftest import Proc, Stack, wait_until

GIB_MB = 1024


def _catalogue(stack: Stack, models: list[dict], pinned: str | None = None) -> str:
    lines = []
    for m in models:
        lines += ["[[models]]", f'id = "{m["id"]}"', f"memory_mb = {m.get('memory_mb', GIB_MB)}",
                  f"residency_priority = {m.get('priority', 100)}"]
        if m.get("pinned"):
            lines.append(f'pinned_on = ["{pinned}"]')
    path = stack.tmp_path / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return f'[fleet]\nmodels_file = "{path}"\npoll_interval_s = 0.5\n'


def _ask(cortex: Proc, key: str, model: str, **extra) -> httpx.Response:
    return httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": HI, "max_tokens": 5, **extra})


def _resident(neuron: Proc) -> dict[str, str]:
    return {m["id"]: m["status"] for m in httpx.get(neuron.url + "/models", timeout=10).json()["data"]}


def _metric(proc: Proc, name: str, **labels: str) -> float:
    text = httpx.get(proc.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if re.fullmatch(rf"{name}\{{{re.escape(want)}\}} \S+", line) or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_burst_on_a_cold_model_waits_on_one_load_and_is_all_served(stack: Stack):
    neuron = stack.neuron("--memory-mb", "4096", "--model-memory-mb", "1024")
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "cold-a"}]))
    key_id, key = create_key(cortex, balance_tokens=1_000_000)
    statuses: list[int] = []

    async def one(http: httpx.AsyncClient) -> None:
        r = await http.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                            json={"model": "cold-a", "messages": HI, "max_tokens": 5})
        statuses.append(r.status_code)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one, http)
    assert statuses == [200] * 50
    assert _metric(neuron, "neuron_model_loads_total", model="cold-a") == 1  # the neuron's own count: one load
    assert _metric(cortex, "cortex_model_loads_total", model="cold-a", outcome="loaded") == 1
    assert _resident(neuron)["cold-a"] == "ready"
    recent = admin(cortex, "GET", f"keys/{key_id}?recent=100").json()["recent"]
    assert len(recent) == 50 and {r["state"] for r in recent} == {"settled"}  # each held across the load, then settled


def test_eviction_takes_the_lowest_priority_then_the_least_recently_used_and_never_a_pin(stack: Stack):
    neuron = stack.neuron("--memory-mb", "2048", "--model-memory-mb", "1024")  # two models fit
    models = [{"id": MODEL, "priority": 1, "pinned": True}, {"id": "low", "priority": 10},
              {"id": "mid", "priority": 50}, {"id": "high", "priority": 200}]
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, models, pinned=neuron.url))
    _, key = create_key(cortex, balance_tokens=1_000_000)
    assert _ask(cortex, key, "low").status_code == 200
    assert set(_resident(neuron)) == {MODEL, "low"}
    assert _ask(cortex, key, "mid").status_code == 200  # low (10) goes; the pinned mock (priority 1) stays
    assert set(_resident(neuron)) == {MODEL, "mid"}
    assert _ask(cortex, key, "high").status_code == 200
    assert set(_resident(neuron)) == {MODEL, "high"}
    # Nothing of lower or equal priority than `low` is left to evict: the pin and `high` stay.
    r = _ask(cortex, key, "low")
    assert r.status_code == 503 and r.headers.get("retry-after")
    assert _metric(cortex, "cortex_evictions_total", model="low", reason="make_room") == 1
    assert _metric(cortex, "cortex_evictions_total", model="mid", reason="make_room") == 1
    listing = {e["id"]: e for e in httpx.get(cortex.url + "/v1/models", timeout=10).json()["data"]}
    assert listing["low"]["loaded"] is False and listing["low"]["feasible_on"] == [neuron.url]
    assert listing["high"]["loaded"] is True and listing["high"]["locations"] == [{"url": neuron.url, "status": "ready"}]


def test_a_model_with_streams_in_flight_is_not_evicted_while_they_run(stack: Stack):
    neuron = stack.neuron("--memory-mb", "2048", "--model-memory-mb", "1024", "--token-interval-ms", "20")
    models = [{"id": MODEL, "pinned": True}, {"id": "busy", "priority": 10}, {"id": "next", "priority": 10}]
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, models, pinned=neuron.url))
    _, key = create_key(cortex, balance_tokens=1_000_000)
    assert _ask(cortex, key, "busy").status_code == 200
    with httpx.stream("POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      timeout=60, json={"model": "busy", "messages": HI, "max_tokens": 40, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(lines)  # under way
        r = _ask(cortex, key, "next")
        assert r.status_code == 503  # `busy` would make room, but it is streaming
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the stream was not cut
    assert "busy" in _resident(neuron)
    assert _ask(cortex, key, "next").status_code == 200  # idle now: it goes
    assert set(_resident(neuron)) == {MODEL, "next"}


def test_a_model_that_fits_nowhere_is_a_404_on_both_surfaces_and_costs_nothing(stack: Stack):
    neuron = stack.neuron("--memory-mb", "2048", "--model-memory-mb", "1024")
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "huge", "memory_mb": 8192}]))
    key_id, key = create_key(cortex, balance_tokens=1000)
    r = _ask(cortex, key, "huge")
    assert r.status_code == 404 and "fits on no neuron" in r.json()["error"]["message"]
    client = anthropic.Anthropic(base_url=cortex.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError, match="fits on no neuron"):
        client.messages.create(model="huge", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert usage(cortex, key_id)["usage"]["spent_tokens"] == 0
    health = httpx.get(cortex.url + "/health", timeout=10).json()
    assert [u["model"] for u in health["unservable_models"]] == ["huge"]


def _slow_neuron(stack: Stack, load_ms: int, *extra: str) -> Proc:
    return stack.neuron("--memory-mb", "4096", "--model-memory-mb", "1024", "--load-ms", str(load_ms), *extra)


def test_a_load_past_its_deadline_releases_every_waiting_hold_with_the_right_error(stack: Stack):
    neuron = _slow_neuron(stack, 4000)
    config = _catalogue(stack, [{"id": "slow"}]) + "load_timeout_s = 1.0\n"
    cortex = budget_cortex(stack, neuron, config=config)
    key_id, key = create_key(cortex, balance_tokens=1000)
    r = _ask(cortex, key, "slow")
    assert r.status_code == 503 and r.headers.get("retry-after") and "did not finish within 1 s" in r.text
    with pytest.raises(anthropic.InternalServerError) as caught:  # 529 overloaded_error on the Anthropic surface
        anthropic.Anthropic(base_url=cortex.url, api_key=key, max_retries=0).messages.create(
            model="slow", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 529
    view = usage(cortex, key_id)
    assert view["usage"]["spent_tokens"] == 0 and view["usage"]["held_tokens"] == 0
    assert {row["state"] for row in view["recent"]} == {"released"}
    assert _metric(cortex, "cortex_model_loads_total", model="slow", outcome="timeout") >= 1


async def test_a_client_that_leaves_while_waiting_releases_its_hold_and_the_load_goes_on(stack: Stack):
    neuron = _slow_neuron(stack, 1500)
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "cold"}]))
    leaver_id, leaver = create_key(cortex, name="leaver", balance_tokens=1000)
    _, stayer = create_key(cortex, name="stayer", balance_tokens=1000)
    body = {"model": "cold", "messages": HI, "max_tokens": 5}
    async with httpx.AsyncClient(timeout=60) as http:
        async with trio.open_nursery() as nursery:
            async def leave() -> None:
                with trio.move_on_after(0.4):  # gives up while the load is under way
                    await http.post(cortex.url + "/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {leaver}"})
            nursery.start_soon(leave)
            await trio.sleep(0.1)
            stayed = await http.post(cortex.url + "/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {stayer}"})
    assert stayed.status_code == 200
    assert _metric(neuron, "neuron_model_loads_total", model="cold") == 1
    (row,) = usage(cortex, leaver_id)["recent"]
    assert row["state"] == "released" and usage(cortex, leaver_id)["usage"]["held_tokens"] == 0


def test_a_neuron_that_restarts_loses_its_models_and_cortex_loads_again_on_demand(stack: Stack):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = ("--listen", f"127.0.0.1:{port}", "--memory-mb", "4096", "--model-memory-mb", "1024")
    neuron = stack._start("neuron", ["serve", *listen])
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "cold"}]))
    _, key = create_key(cortex, balance_tokens=10_000)
    assert _ask(cortex, key, "cold").status_code == 200
    neuron.kill()
    fresh = stack._start("neuron", ["serve", *listen])
    assert "cold" not in _resident(fresh)
    # Until cortex's poll sees the restart, a request may find the model gone and answer 502/503;
    # once it has, the model is loaded again on demand.
    wait_until(lambda: _ask(cortex, key, "cold").status_code == 200)
    assert _resident(fresh)["cold"] == "ready"
    assert _metric(fresh, "neuron_model_loads_total", model="cold") == 1


def _anthropic_stream_events(cortex: Proc, key: str, model: str) -> list[str]:
    body = {"model": model, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", cortex.url + "/v1/messages", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        return [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]


def test_an_anthropic_stream_hears_pings_through_a_cold_load_and_its_end(stack: Stack):
    neuron = _slow_neuron(stack, 1200)
    config = _catalogue(stack, [{"id": "cold"}, {"id": "stuck"}]) + "[server]\nstream_ping_interval_s = 0.2\n"
    cortex = budget_cortex(stack, neuron, config=config)
    key_id, key = create_key(cortex, balance_tokens=10_000)
    events = _anthropic_stream_events(cortex, key, "cold")
    assert events[0] == "message_start" and events.count("ping") >= 3  # ~1.2 s of load at 0.2 s a ping
    first_block = events.index("content_block_start")
    assert all(e == "ping" for e in events[1:first_block]) and events[-1] == "message_stop"
    assert usage(cortex, key_id)["recent"][0]["state"] == "settled"


def test_a_failed_load_under_an_early_anthropic_stream_ends_it_with_an_error_event_and_no_charge(stack: Stack):
    neuron = _slow_neuron(stack, 3000)
    config = (_catalogue(stack, [{"id": "stuck"}]) + "load_timeout_s = 0.6\n"
              + "[server]\nstream_ping_interval_s = 0.2\n")
    cortex = budget_cortex(stack, neuron, config=config)
    key_id, key = create_key(cortex, balance_tokens=10_000)
    events = _anthropic_stream_events(cortex, key, "stuck")
    assert events[0] == "message_start" and "ping" in events and events[-1] == "error"
    view = usage(cortex, key_id)
    assert view["usage"]["spent_tokens"] == 0 and view["recent"][0]["state"] == "released"


def test_fleet_status_load_and_unload_from_the_cli_and_the_admin_api(stack: Stack):
    import json as jsonlib
    import subprocess
    import sys

    neuron = stack.neuron("--memory-mb", "4096", "--model-memory-mb", "1024")
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "extra"}]))
    _, key = create_key(cortex, balance_tokens=10_000)
    cli = [sys.executable, "-m", "cortex", "fleet"]
    where = ["--data-dir", str(cortex.data_dir)]  # over the data dir's admin socket: no token
    loaded = subprocess.run([*cli, "load", "extra", *where, "--json"], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    (node,) = jsonlib.loads(loaded.stdout)["neurons"]
    assert node["models"]["extra"]["status"] == "ready" and node["memory_free_bytes"] == 2 * 1024 * 2**20
    assert _ask(cortex, key, "extra").status_code == 200  # warm: the admin's load was the only one
    assert _metric(cortex, "cortex_model_loads_total", model="extra", outcome="loaded") == 1
    status = subprocess.run([*cli, "status", *where], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "extra: ready, 1024 MiB, 0 in flight" in status.stdout
    r = admin(cortex, "POST", "fleet/unload", {"model": "extra", "neuron": neuron.url})
    assert r.status_code == 200 and "extra" not in r.json()["neurons"][0]["models"]
    assert "extra" not in _resident(neuron)
    assert _metric(cortex, "cortex_evictions_total", model="extra", reason="admin") == 1
    missing = subprocess.run([*cli, "unload", "extra", *where], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "No neuron holds `extra`" in missing.stderr
    assert admin(cortex, "POST", "fleet/load", {"model": "extra", "neuron": "http://nowhere:1"}).status_code == 404
    assert admin(cortex, "POST", "fleet/load", {"model": 5}).status_code == 400


def test_last_use_times_survive_a_restart_in_the_data_dir(tmp_path):
    from cortex.config import FleetConfig, UpstreamConfig
    from cortex.fleet.catalogue import Catalogue
    from cortex.fleet.lifecycle import Lifecycle
    from cortex.fleet.registry import Fleet
    from cortex.fleet.upstream import Upstream
    from cortex.metrics import GatewayMetrics

    def lifecycle(now: float) -> Lifecycle:
        return Lifecycle(Fleet(["http://n"]), Upstream(UpstreamConfig()), FleetConfig(), Catalogue, GatewayMetrics(),
                         str(tmp_path), clock=lambda: now)

    first = lifecycle(1000.0)
    first.used("http://n", "a")
    first.save()
    again = lifecycle(2000.0)
    assert again.last_used == {"http://n a": 1000.0}
    (tmp_path / "residency.json").write_text("{not json")
    assert lifecycle(0.0).last_used == {}  # a damaged file costs the history, never the start


def test_a_neuron_that_refuses_a_load_with_507_is_answered_as_out_of_memory(stack: Stack):
    neuron = stack.neuron("--memory-mb", "2048", "--model-memory-mb", "1024")
    cortex = budget_cortex(stack, neuron, config=_catalogue(stack, [{"id": "big", "memory_mb": 4096}]))
    r = admin(cortex, "POST", "fleet/load", {"model": "big", "neuron": neuron.url})  # placement would never try
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory" and r.headers["retry-after"]
    assert "big" not in _resident(neuron)
