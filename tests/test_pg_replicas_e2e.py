"""Many cortex replicas on one PostgreSQL ledger, end to end: real cortex and neuron processes, a real PostgreSQL."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import psycopg
import pytest
import trio

from cortex.budget import pg_schema
from cortex.fleet.transport import H11Transport
from tests.budget_helpers import ADMIN_TOKEN, HI, HI_PROMPT_TOKENS, MODEL, admin, budget_cortex, create_key
from tests.conftest import Proc, Stack, wait_until
from tests.test_pg_store import INVARIANT_SQL

COST = HI_PROMPT_TOKENS + 10  # the estimate and the actual usage of max_tokens=10


def replicas(stack: Stack, neuron: Proc, url: str, n: int = 3, config: str = "") -> list[Proc]:
    return [budget_cortex(stack, neuron, config=config, args_extra=("--ledger", url)) for _ in range(n)]


def ledger(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with pg_schema.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def key_usage(cortex: Proc, key_id: str) -> dict[str, Any]:
    r = admin(cortex, "GET", f"keys/{key_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def spread(urls: list[str], key: str, n: int, stream: bool = False, max_tokens: int = 10) -> list[tuple[int, bytes, str]]:
    """n concurrent requests on one key, request i to replica i mod len(urls): (status, body, url) each."""
    results: list[tuple[int, bytes, str]] = []
    body = {"model": MODEL, "messages": HI, "max_tokens": max_tokens, "stream": stream}

    async def one(client: httpx.AsyncClient, url: str) -> None:
        try:
            r = await client.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            results.append((r.status_code, r.content, url))
        except httpx.HTTPError as exc:  # a replica killed under it
            results.append((0, repr(exc).encode(), url))

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(transport=H11Transport(), timeout=120, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, client, urls[i % len(urls)])
    return results


@pytest.mark.parametrize("fan", [20, 200, 2000])
async def test_a0_fan_out_across_three_replicas_never_overshoots_one_key_and_one_account(stack: Stack, pg_ledger_url, fan):
    neuron = stack.neuron("--token-interval-ms", "2")
    cortexes = replicas(stack, neuron, pg_ledger_url)
    served_max = {20: 5, 200: 37, 2000: 150}[fan]
    # The account's cap binds first; the key's is looser: both are checked on every replica.
    r = admin(cortexes[0], "POST", "accounts", {"id": "team", "balance_tokens": served_max * COST + COST - 1})
    assert r.status_code == 201, r.text
    key_id, key = create_key(cortexes[0], account="team", balance_tokens=(served_max + 3) * COST)
    wait_until(lambda: all(admin(c, "GET", f"keys/{key_id}").status_code == 200 for c in cortexes))
    results = await spread([c.url for c in cortexes], key, fan)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) == served_max and len(refused) == fan - served_max, sorted({r[0] for r in results})
    assert all(b'"code":"insufficient_quota"' in body for _, body, _ in refused)
    assert {url for *_, url in refused} == {c.url for c in cortexes}  # every replica refused its share
    assert neuron.get_json("/health")["requests_total"] == served_max  # the neuron saw exactly the served
    u = wait_until(lambda: (d := key_usage(cortexes[1], key_id))["account_usage"]["held_tokens"] == 0 and d)
    assert u["account_usage"]["spent_tokens"] == served_max * COST <= u["account_usage"]["limits"]["balance_tokens"]
    assert u["usage"]["spent_tokens"] == served_max * COST and u["usage"]["in_flight"] == 0
    assert ledger(pg_ledger_url, INVARIANT_SQL) == []
    # One hold per served request, each settled once.
    states = ledger(pg_ledger_url, "SELECT state, COUNT(*) FROM holds GROUP BY 1")
    assert states == [("settled", served_max)]


async def test_a_replica_killed_mid_fan_out_leaves_holds_that_are_reaped_and_the_caps_hold(stack: Stack, pg_ledger_url):
    neuron = stack.neuron("--token-interval-ms", "40")  # slow streams: the kill finds them in flight
    cortexes = replicas(stack, neuron, pg_ledger_url, config="[budget]\nlease_s = 3.0\n")
    max_tokens = 50
    cost = HI_PROMPT_TOKENS + max_tokens
    cap = 40 * cost + cost - 1
    key_id, key = create_key(cortexes[0], balance_tokens=cap)
    wait_until(lambda: all(admin(c, "GET", f"keys/{key_id}").status_code == 200 for c in cortexes))
    worst: list[int] = []

    async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:  # spent + held <= cap at every look, before, during and after the kill
            (row,) = await trio.to_thread.run_sync(
                ledger, pg_ledger_url, "SELECT spent_tokens + held_tokens FROM keys WHERE id = %s", (key_id,)
            )
            worst.append(row[0])
            await trio.sleep(0.05)

    async def kill_soon() -> None:
        await trio.to_thread.run_sync(
            wait_until, lambda: ledger(pg_ledger_url, "SELECT COUNT(*) FROM holds WHERE state = 'open'")[0][0] >= 30
        )
        # The victim: a replica with holds in flight (a replica id is NAME-PID-RANDOM).
        (replica_id,), = ledger(pg_ledger_url, "SELECT replica_id FROM holds WHERE state = 'open'"
                                               " GROUP BY 1 ORDER BY COUNT(*) DESC LIMIT 1")
        pid = int(replica_id.rsplit("-", 2)[1])
        (victim,) = [c for c in cortexes if c.popen.pid == pid]
        victim.signal(signal.SIGKILL)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        nursery.start_soon(kill_soon)
        results = await spread([c.url for c in cortexes], key, 120, stream=True, max_tokens=max_tokens)
        # The dead replica's holds: reaped (charged in full) once its lease has passed, by a live replica.
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: ledger(pg_ledger_url, "SELECT COUNT(*) FROM holds WHERE state = 'open'")[0][0] == 0,
                               timeout_s=30)
        )
        nursery.cancel_scope.cancel()
    assert max(worst) <= cap
    states = dict(ledger(pg_ledger_url, "SELECT state, COUNT(*) FROM holds GROUP BY 1"))
    assert states.get("orphaned", 0) > 0, states  # the victim's, reaped
    assert ledger(pg_ledger_url, INVARIANT_SQL) == []
    (spent, held), = ledger(pg_ledger_url, "SELECT spent_tokens, held_tokens FROM keys WHERE id = %s", (key_id,))
    assert held == 0 and spent <= cap
    # Nothing lost: every hold is charged what it produced (settled) or what it held (orphaned).
    (orphan_ok,), = ledger(pg_ledger_url, "SELECT bool_and(charged_tokens = amount_tokens) FROM holds WHERE state = 'orphaned'")
    assert orphan_ok
    served = sum(1 for r in results if r[0] == 200)
    assert served >= 1 and ledger(pg_ledger_url, "SELECT COUNT(*) FROM holds")[0][0] >= served


async def test_replicas_racing_top_ups_limit_changes_and_a_revocation(stack: Stack, pg_ledger_url):
    neuron = stack.neuron("--token-interval-ms", "2")
    cortexes = replicas(stack, neuron, pg_ledger_url)
    key_id, key = create_key(cortexes[0], balance_tokens=10 * COST)
    wait_until(lambda: all(admin(c, "GET", f"keys/{key_id}").status_code == 200 for c in cortexes))
    urls = [c.url for c in cortexes]

    async def top_ups() -> None:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            for i in range(30):
                r = await client.post(f"{urls[i % 3]}/admin/v1/keys/{key_id}/topup", json={"tokens": COST})
                assert r.status_code == 200, r.text

    async with trio.open_nursery() as nursery:
        nursery.start_soon(top_ups)
        nursery.start_soon(spread, urls, key, 300)
    u = wait_until(lambda: (d := key_usage(cortexes[2], key_id))["usage"]["held_tokens"] == 0 and d)
    assert u["limits"]["balance_tokens"] == 40 * COST  # every top-up counted, whichever replica took it
    assert u["usage"]["spent_tokens"] <= 40 * COST
    assert ledger(pg_ledger_url, INVARIANT_SQL) == []
    # A tighter limit made on one replica binds on the others at once (the ledger judges).
    r = admin(cortexes[1], "POST", f"keys/{key_id}/limits", {"balance_tokens": u["usage"]["spent_tokens"]})
    assert r.status_code == 200, r.text
    for c in cortexes:
        refused = httpx.post(c.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 10},
                             headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert refused.status_code == 429, refused.text
    # A revocation on one replica: every replica refuses the key within a second.
    admin(cortexes[1], "POST", f"keys/{key_id}/limits", {})
    assert admin(cortexes[0], "POST", f"keys/{key_id}/revoke").status_code == 200
    revoked_at = time.monotonic()
    for c in cortexes:
        wait_until(lambda c=c: httpx.get(c.url + "/v1/models").status_code == 200)
        r = httpx.post(c.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 10},
                       headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 401, r.text
    assert time.monotonic() - revoked_at < 1.0
    for c in cortexes:  # and each replica's own view has it too (the admin API, /v1/models' auth, count_tokens)
        wait_until(lambda c=c: key_usage(c, key_id)["revoked"] is True, timeout_s=1.0)


def test_serve_refuses_a_ledger_url_with_a_password_and_an_unmigrated_ledger(stack: Stack, pg_url, tmp_path):
    import subprocess
    import sys

    def serve(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
             "--ledger", url], capture_output=True, text=True, timeout=60,
        )

    with_password = serve(pg_url.replace("postgresql://", "postgresql://u:hunter2@"))
    assert with_password.returncode != 0 and "hunter2" not in with_password.stderr + with_password.stdout
    assert "password" in with_password.stderr
    unmigrated = serve(pg_url)
    assert unmigrated.returncode == 1 and "cortex db migrate" in unmigrated.stderr, unmigrated.stderr


def test_the_cli_acts_on_a_shared_ledger_directly(stack: Stack, pg_ledger_url, tmp_path):
    import json
    import subprocess
    import sys

    neuron = stack.neuron()
    (cortex,) = replicas(stack, neuron, pg_ledger_url, n=1)

    def cli(*args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "cortex", *args, "--ledger", pg_ledger_url, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    made = cli("keys", "create", "--name", "ci", "--balance", "500")
    key_id = made["id"]
    # The running replica hears of it (NOTIFY) and serves the key.
    wait_until(lambda: admin(cortex, "GET", f"keys/{key_id}").status_code == 200, timeout_s=2)
    r = httpx.post(cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 10},
                   headers={"authorization": f"Bearer {made['key']}"}, timeout=30)
    assert r.status_code == 200, r.text
    wait_until(lambda: cli("keys", "show", key_id)["usage"]["spent_tokens"] == COST)
    cli("keys", "topup", key_id, "100")
    assert cli("keys", "show", key_id)["limits"]["balance_tokens"] == 600
    cli("keys", "revoke", key_id)
    wait_until(lambda: httpx.post(cortex.url + "/v1/chat/completions",
                                  json={"model": MODEL, "messages": HI, "max_tokens": 10},
                                  headers={"authorization": f"Bearer {made['key']}"}, timeout=30).status_code == 401,
               timeout_s=1.0)


def test_moving_a_sqlite_ledger_to_postgresql_keeps_keys_spend_and_caps(stack: Stack, pg_ledger_url):
    import subprocess
    import sys

    neuron = stack.neuron()
    single = budget_cortex(stack, neuron)
    key_id, key = create_key(single, balance_tokens=3 * COST)
    body = {"model": MODEL, "messages": HI, "max_tokens": 10}
    headers = {"authorization": f"Bearer {key}"}
    assert httpx.post(single.url + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200
    wait_until(lambda: key_usage(single, key_id)["usage"]["held_tokens"] == 0)
    single.stop()
    moved = subprocess.run(
        [sys.executable, "-m", "cortex", "db", "import", "--from-data-dir", str(single.data_dir), "--ledger", pg_ledger_url],
        capture_output=True, text=True, timeout=60,
    )
    assert moved.returncode == 0, moved.stderr
    (a, b) = replicas(stack, neuron, pg_ledger_url, n=2)
    u = key_usage(b, key_id)
    assert u["usage"]["spent_tokens"] == COST and u["limits"]["balance_tokens"] == 3 * COST
    assert [r["state"] for r in u["recent"]] == ["settled"]
    # The same key works on both replicas, and the cap carried over binds: two more requests fit, a third does not.
    statuses = [httpx.post(c.url + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code
                for c in (a, b, a)]
    assert statuses == [200, 200, 429]
    metrics = httpx.get(a.url + "/metrics", timeout=10).text  # /metrics works the same on either store
    assert "cortex_holds_outstanding" in metrics and 'cortex_budget_refusals_total{reason="balance"}' in metrics


@pytest.mark.parametrize("stream", [True], ids=["stream"])  # whole replies: test_incremental_holds_e2e.py
async def test_incremental_holds_across_replicas_never_overshoot_and_charge_what_was_delivered(stack: Stack, pg_ledger_url,
                                                                                             stream):
    import json as json_

    neuron = stack.neuron("--token-interval-ms", "1", "--reply-tokens", "300")
    cortexes = replicas(stack, neuron, pg_ledger_url, n=2,
                        config='[budget]\noutput_holds = "incremental"\noutput_slice_tokens = 64\n')
    cap = 6_000
    key_id, key = create_key(cortexes[0], balance_tokens=cap)
    wait_until(lambda: all(admin(c, "GET", f"keys/{key_id}").status_code == 200 for c in cortexes))
    results = await spread([c.url for c in cortexes], key, 80, stream=stream, max_tokens=300)
    assert {s for s, _, _ in results} <= {200, 429}
    u = wait_until(lambda: (d := key_usage(cortexes[1], key_id))["usage"]["held_tokens"] == 0 and d, timeout_s=30)
    delivered = 0
    for status, body, _ in results:
        if status != 200:
            continue
        if stream:
            frames = [json_.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]
            text = "".join((f["choices"][0]["delta"].get("content") or "") for f in frames if f.get("choices"))
        else:
            text = json_.loads(body)["choices"][0]["message"]["content"] or ""
        delivered += HI_PROMPT_TOKENS + len(text.encode())
    assert delivered == u["usage"]["spent_tokens"] <= cap
    assert ledger(pg_ledger_url, INVARIANT_SQL) == []
