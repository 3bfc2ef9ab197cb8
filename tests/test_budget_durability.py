"""The ledger across crashes, signals and offline administration (real subprocesses)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from tests.budget_helpers import HI, HI_PROMPT_TOKENS, MODEL, admin, budget_cortex, chat, create_key, usage
from tests.conftest import Stack, wait_until

COST = HI_PROMPT_TOKENS + 10


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cortex", *args], capture_output=True, text=True, timeout=60)


def open_stream(http: httpx.Client, cortex, key: str, max_tokens: int):
    cm = http.stream(
        "POST", cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": HI, "max_tokens": max_tokens, "stream": True},
    )
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    next(lines)
    return cm, lines


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:  # refused, or reset while the listener closed
        return True
    return False


def test_kill_9_with_requests_in_flight_recovers_orphaned_holds_and_the_caps_hold(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "20")
    cortex = budget_cortex(stack, neuron)
    data_dir = cortex.data_dir
    in_flight_cost = HI_PROMPT_TOKENS + 500
    key_id, key = create_key(cortex, balance_tokens=2 * COST + 3 * in_flight_cost)
    assert chat(cortex, key).status_code == 200
    assert chat(cortex, key).status_code == 200
    with httpx.Client(timeout=30) as http:
        streams = [open_stream(http, cortex, key, 500) for _ in range(3)]
        cortex.kill()  # SIGKILL: no settlement, no shutdown
        for cm, _ in streams:
            try:
                cm.__exit__(None, None, None)
            except httpx.HTTPError:
                pass
    restarted = budget_cortex(stack, neuron, data_dir=data_dir)
    detail = usage(restarted, key_id)
    u = detail["usage"]
    assert u["held_tokens"] == 0 and u["in_flight"] == 0
    # Orphans are charged their full hold: an upper bound on what the neuron served.
    assert u["spent_tokens"] == 2 * COST + 3 * in_flight_cost == u["limits"]["balance_tokens"]
    states = sorted(r["state"] for r in detail["recent"])
    assert states == ["orphaned"] * 3 + ["settled"] * 2
    assert sum(e.get("event") == "hold_orphaned" for e in restarted.log_events()) == 3
    r = chat(restarted, key)  # the cap still holds after recovery
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


def test_sigterm_drains_in_flight_requests_then_cancels_and_settles_the_rest(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "10", "--reply-tokens", "5000")
    cortex = budget_cortex(stack, neuron, config="[server]\ngraceful_timeout_s = 3\n")
    key_id, key = create_key(cortex, balance_tokens=100_000)
    with httpx.Client(timeout=30) as http:
        short_cm, short_lines = open_stream(http, cortex, key, 40)
        long_cm, long_lines = open_stream(http, cortex, key, 3000)
        cortex.signal(signal.SIGTERM)
        # No new connections while draining.
        wait_until(lambda: _refused(cortex.url))
        short_tail = [line for line in short_lines if line]
        assert short_tail[-1] == "data: [DONE]"  # finished inside the grace period
        # Cut off once the grace period ran out: with a final error event, not a truncated body.
        long_tail = [line for line in long_lines if line]
        assert json.loads(long_tail[-1].removeprefix("data: "))["error"]["code"] == "service_unavailable"
        for cm in (short_cm, long_cm):
            try:
                cm.__exit__(None, None, None)
            except httpx.HTTPError:
                pass
    assert cortex.popen.wait(30) == 0
    result = cli("usage", key_id, "--json", "--data-dir", str(cortex.data_dir))
    assert result.returncode == 0, result.stderr
    detail = json.loads(result.stdout)["data"][0]
    assert detail["usage"]["held_tokens"] == 0
    by_hold = sorted(detail["recent"], key=lambda r: r["held_tokens"])
    assert [r["state"] for r in by_hold] == ["settled", "settled"]  # resolved before exit, not orphaned
    assert by_hold[0]["charged_tokens"] == HI_PROMPT_TOKENS + 40
    assert HI_PROMPT_TOKENS < by_hold[1]["charged_tokens"] < HI_PROMPT_TOKENS + 3000
    outcomes = [e.get("outcome") for e in cortex.log_events() if e.get("path") == "/v1/chat/completions"]
    assert sorted(outcomes) == ["ok", "shutdown"]


def test_offline_cli_manages_keys_and_accounts(tmp_path):
    data = str(tmp_path / "data")
    created = cli("keys", "create", "--name", "ci", "--account", "team", "--balance", "500", "--json", "--data-dir", data)
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["key"].startswith("sk-cx-") and body["id"].startswith("key_")
    key_id = body["id"]
    human = cli("keys", "create", "--name", "other", "--data-dir", data)
    assert "shown only once" in human.stdout and "sk-cx-" in human.stdout
    assert cli("keys", "topup", key_id, "250", "--data-dir", data).returncode == 0
    assert cli("accounts", "set-limits", "team", "--window-tokens", "100", "--window-seconds", "60", "--data-dir", data).returncode == 0
    shown = json.loads(cli("keys", "show", key_id, "--json", "--data-dir", data).stdout)
    assert shown["usage"]["limits"]["balance_tokens"] == 750
    assert shown["account_usage"]["limits"]["window_tokens"] == 100
    assert body["key"] not in cli("keys", "list", "--data-dir", data).stdout
    assert cli("keys", "revoke", key_id, "--data-dir", data).returncode == 0
    listed = json.loads(cli("keys", "list", "--json", "--data-dir", data).stdout)["data"]
    assert {k["name"]: k["revoked"] for k in listed} == {"ci": True, "other": False}
    bad = cli("keys", "set-limits", key_id, "--window-tokens", "5", "--data-dir", data)
    assert bad.returncode == 1 and "window_seconds" in bad.stderr
    for argv in (("keys", "topup", key_id, "-50"), ("keys", "set-limits", key_id, "--window-tokens", "5", "--window-seconds", "nan")):
        refused = cli(*argv, "--data-dir", data)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    missing = cli("keys", "show", "key_nope", "--data-dir", data)
    assert missing.returncode == 1 and "no key" in missing.stderr


def test_offline_keys_work_when_cortex_starts_and_edits_go_to_it_while_it_runs(stack: Stack):
    data = stack.tmp_path / "shared-data"
    created = json.loads(cli("keys", "create", "--name", "pre", "--balance", str(COST), "--json", "--data-dir", str(data)).stdout)
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, data_dir=data)
    assert chat(cortex, created["key"]).status_code == 200
    topped = cli("keys", "topup", created["id"], "100", "--data-dir", str(data))
    assert topped.returncode == 0, topped.stderr  # over the data dir's admin socket, into the server's ledger
    assert admin(cortex, "GET", f"keys/{created['id']}").json()["usage"]["limits"]["balance_tokens"] == COST + 100
    live = wait_until(lambda: (d := json.loads(cli("usage", created["id"], "--json", "--data-dir", str(data)).stdout)["data"][0])["usage"]["spent_tokens"] == COST and d)
    assert live["recent"][0]["state"] == "settled"
    assert admin(cortex, "GET", f"keys/{created['id']}").json()["usage"]["spent_tokens"] == COST


def test_window_usage_survives_a_restart(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, window_tokens=COST, window_seconds=600)
    charged_at = time.monotonic()
    assert chat(cortex, key).status_code == 200
    cortex.stop()
    restarted = budget_cortex(stack, neuron, data_dir=cortex.data_dir)
    r = chat(restarted, key)
    elapsed_ms = (time.monotonic() - charged_at) * 1000
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 600_000 - elapsed_ms - 1000 <= int(r.headers["retry-after-ms"]) <= 600_000
