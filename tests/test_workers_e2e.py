"""`cortex serve --workers N`: N processes on one port (SO_REUSEPORT) sharing one PostgreSQL ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.budget_helpers import ADMIN_TOKEN, HI_PROMPT_TOKENS, admin, create_key
from tests.conftest import Proc, Stack, wait_until
from tests.test_pg_replicas_e2e import ledger, spread
from tests.test_pg_store import INVARIANT_SQL

COST = HI_PROMPT_TOKENS + 10


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (each thread lists those it started)."""
    pids = [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
    return [p for p in pids if "zombie" not in Path(f"/proc/{p}/status").read_text()]


def workers(stack: Stack, neuron: Proc, url: str, n: int) -> Proc:
    data_dir = stack.tmp_path / f"data-{len(stack.procs)}"
    proc = stack._start("cortex", [
        "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--neuron", neuron.url,
        "--admin-token", ADMIN_TOKEN, "--ledger", url, "--workers", str(n),
    ])
    proc.data_dir = data_dir
    return proc


async def test_workers_share_one_port_and_one_ledger_and_the_cap_holds(stack: Stack, pg_ledger_url):
    neuron = stack.neuron("--token-interval-ms", "5")
    cortex = workers(stack, neuron, pg_ledger_url, 3)
    assert cortex.announcement["workers"] == 3 and len(cortex.announcement["worker_pids"]) == 3
    assert sorted(children(cortex.popen.pid)) == sorted(cortex.announcement["worker_pids"])
    key_id, key = create_key(cortex, balance_tokens=150 * COST + COST - 1)
    # The key was made through one worker; every worker serves it (each hears of it, or the ledger knows it).
    results = await spread([cortex.url], key, 300)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 150 and statuses.count(429) == 150, set(statuses)
    assert neuron.get_json("/health")["requests_total"] == 150
    wait_until(lambda: ledger(pg_ledger_url, "SELECT held_tokens FROM keys WHERE id = %s", (key_id,))[0][0] == 0)
    (spent,), = ledger(pg_ledger_url, "SELECT spent_tokens FROM keys WHERE id = %s", (key_id,))
    assert spent == 150 * COST
    assert ledger(pg_ledger_url, INVARIANT_SQL) == []
    # The kernel spread the connections: more than one worker admitted requests.
    assert ledger(pg_ledger_url, "SELECT COUNT(DISTINCT replica_id) FROM holds")[0][0] >= 2
    # Administration through the one port answers alike whichever worker takes the connection.
    for _ in range(6):
        assert admin(cortex, "GET", f"keys/{key_id}").json()["usage"]["spent_tokens"] == spent


def test_a_dead_worker_is_started_again_and_sigterm_stops_them_all(stack: Stack, pg_ledger_url):
    neuron = stack.neuron()
    cortex = workers(stack, neuron, pg_ledger_url, 2)
    first = sorted(cortex.announcement["worker_pids"])
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(children(cortex.popen.pid)) == 2 and first[0] not in children(cortex.popen.pid), timeout_s=20)
    _, key = create_key(cortex, balance_tokens=100 * COST)
    for _ in range(10):  # whichever worker, the new one included
        r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "cortex-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
                       timeout=30)
        assert r.status_code == 200, r.text
    pids = children(cortex.popen.pid)
    cortex.signal(signal.SIGTERM)
    assert cortex.popen.wait(30) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_workers_need_a_shared_ledger(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), "--workers", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--ledger" in out.stderr, out.stderr
