"""`cortex serve --workers N`: N processes on one port (SO_REUSEPORT) sharing one ledger, on PostgreSQL or on
the data dir's SQLite file."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.budget_helpers import ADMIN_TOKEN, HI_PROMPT_TOKENS, admin, create_key
from tests.conftest import Proc, Stack, wait_until
from tests.test_pg_replicas_e2e import ledger, spread
from tests.test_pg_store import INVARIANT_SQL as PG_INVARIANT_SQL
from tests.test_sqlite_shared import INVARIANT_SQL as SQLITE_INVARIANT_SQL

COST = HI_PROMPT_TOKENS + 10
Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (each thread lists those it started)."""
    pids = [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
    return [p for p in pids if "zombie" not in Path(f"/proc/{p}/status").read_text()]


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], Query, str]:
    """The --ledger flags, a query on the shared ledger (%s placeholders), and its invariant's SQL."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_ledger_url")
        return ["--ledger", url], lambda sql, params=(): ledger(url, sql, params), PG_INVARIANT_SQL
    path = tmp_path / "data-workers" / "ledger.db"

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()
        finally:
            conn.close()

    return [], query, SQLITE_INVARIANT_SQL


def workers(stack: Stack, neuron: Proc, ledger_args: list[str], n: int) -> Proc:
    data_dir = stack.tmp_path / "data-workers"
    proc = stack._start("cortex", [
        "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--neuron", neuron.url,
        "--admin-token", ADMIN_TOKEN, *ledger_args, "--workers", str(n),
    ])
    proc.data_dir = data_dir
    return proc


async def test_workers_share_one_port_and_one_ledger_and_the_cap_holds(stack: Stack, store):
    ledger_args, query, invariant = store
    neuron = stack.neuron("--token-interval-ms", "5")
    cortex = workers(stack, neuron, ledger_args, 3)
    assert cortex.announcement["workers"] == 3 and len(cortex.announcement["worker_pids"]) == 3
    assert sorted(children(cortex.popen.pid)) == sorted(cortex.announcement["worker_pids"])
    key_id, key = create_key(cortex, balance_tokens=150 * COST + COST - 1)
    # The key was made through one worker; every worker serves it (each hears of it, or the ledger knows it).
    results = await spread([cortex.url], key, 300)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 150 and statuses.count(429) == 150, set(statuses)
    assert neuron.get_json("/health")["requests_total"] == 150
    wait_until(lambda: query("SELECT COUNT(*) FROM holds WHERE state = 'open'")[0][0] == 0)
    (spent,), = query("SELECT spent_tokens FROM keys WHERE id = %s", (key_id,))
    assert spent == 150 * COST
    assert query(invariant) == []
    # The kernel spread the connections: more than one worker admitted requests.
    assert query("SELECT COUNT(DISTINCT replica_id) FROM holds")[0][0] >= 2
    # Administration through the one port answers alike whichever worker takes the connection.
    for _ in range(6):
        assert admin(cortex, "GET", f"keys/{key_id}").json()["usage"]["spent_tokens"] == spent


def test_a_dead_worker_is_started_again_and_sigterm_stops_them_all(stack: Stack):
    ledger_args: list[str] = []  # the supervisor's rules do not depend on the ledger (the data dir's file here)
    neuron = stack.neuron()
    cortex = workers(stack, neuron, ledger_args, 2)
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


def test_the_data_dir_stays_locked_while_worker_0_is_dead(stack: Stack):
    # Else an offline CLI (or a second server) could take the dir and recover the ledger under the live workers,
    # charging their open holds in full, or judge it without seeing their holds.
    from cortex.budget import datadir

    neuron = stack.neuron()
    cortex = workers(stack, neuron, [], 2)
    zero = cortex.announcement["worker_pids"][0]  # the pool's order: worker 0 owns the data dir itself
    with pytest.raises(datadir.DataDirBusy):
        datadir.lock(cortex.data_dir)
    os.kill(zero, signal.SIGKILL)
    wait_until(lambda: zero not in children(cortex.popen.pid), timeout_s=20, interval_s=0.01)
    with pytest.raises(datadir.DataDirBusy):  # before the supervisor starts it again (0.5 s)
        datadir.lock(cortex.data_dir)
    wait_until(lambda: len(children(cortex.popen.pid)) == 2, timeout_s=20)
    _, key = create_key(cortex, balance_tokens=10 * COST)
    for _ in range(4):  # the new worker 0 took the inherited lock and serves
        r = httpx.post(cortex.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "cortex-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
                       timeout=30)
        assert r.status_code == 200, r.text
    cortex.signal(signal.SIGTERM)
    assert cortex.popen.wait(30) == 0
    datadir.lock(cortex.data_dir).close()  # free once they are all gone


def test_the_cli_reaches_the_workers_through_the_data_dir(stack: Stack):
    neuron = stack.neuron()
    cortex = workers(stack, neuron, [], 2)
    out = subprocess.run(
        [sys.executable, "-m", "cortex", "keys", "create", "--name", "cli", "--balance", "500", "--data-dir",
         str(cortex.data_dir), "--json"], capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    import json

    made = json.loads(out.stdout)
    for _ in range(6):  # every worker knows it within its poll
        wait_until(lambda: admin(cortex, "GET", f"keys/{made['id']}").status_code == 200, timeout_s=2)


def test_workers_must_be_a_sane_count(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), "--workers", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--workers" in out.stderr, out.stderr


@pytest.mark.parametrize("abbreviated", [["--work", "2"], ["--worker=2"], ["--data", "x"], ["--led", "sqlite:x"]])
def test_serve_takes_no_abbreviated_flags(abbreviated):
    # A worker's command line drops the supervisor's --workers, --data-dir and --ledger by name: `--work 2` kept
    # would make every worker a supervisor of two more.
    from cortex.cli import build_parser

    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["serve", *abbreviated])
    assert refused.value.code == 2
    assert build_parser().parse_args(["serve", "--workers", "2"]).workers == 2


STUBBORN = (
    "import json, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(json.dumps({'event': 'listening'}), flush=True)\n"
    "time.sleep(60)\n"
)
SILENT = "import time\ntime.sleep(60)\n"


async def _supervised(argv: list[str], monkeypatch, **timeouts: float):
    """A worker under the supervisor's own keeper and stopper, with `signals` a channel the test sends on."""
    import trio

    from cortex import workers as w

    for name, value in timeouts.items():
        monkeypatch.setattr(w, name, value)
    worker = w.Worker(0, argv)
    ready, stopping, done = trio.Event(), trio.Event(), trio.Event()
    send, receive = trio.open_memory_channel(4)
    return w, worker, ready, stopping, done, send, receive


async def test_a_worker_that_ignores_sigterm_is_killed_after_the_stop_timeout(monkeypatch):
    import trio

    w, worker, ready, stopping, done, send, receive = await _supervised(
        [sys.executable, "-c", STUBBORN], monkeypatch, STOP_TIMEOUT_S=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w._keep_running, worker, ready, stopping, done)
        nursery.start_soon(w._stop_on_signal, receive, [worker], stopping, [done])
        await ready.wait()
        await send.send(signal.SIGTERM)
        with trio.fail_after(10):  # it ignores SIGTERM: killed once the stop timeout has passed
            await done.wait()
    assert worker.process.returncode == -signal.SIGKILL


async def test_a_second_signal_kills_the_workers_at_once(monkeypatch):
    import trio

    w, worker, ready, stopping, done, send, receive = await _supervised(
        [sys.executable, "-c", STUBBORN], monkeypatch, STOP_TIMEOUT_S=60.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w._keep_running, worker, ready, stopping, done)
        nursery.start_soon(w._stop_on_signal, receive, [worker], stopping, [done])
        await ready.wait()
        await send.send(signal.SIGTERM)
        await trio.sleep(0.2)
        assert worker.process.returncode is None  # draining
        await send.send(signal.SIGINT)
        with trio.fail_after(10):
            await done.wait()
    assert worker.process.returncode == -signal.SIGKILL


async def test_a_worker_that_never_listens_fails_the_start(monkeypatch):
    import trio

    w, worker, ready, stopping, done, send, receive = await _supervised(
        [sys.executable, "-c", SILENT], monkeypatch, STARTUP_TIMEOUT_S=1.0)
    with trio.fail_after(10):
        with pytest.raises(w.WorkerFailed):
            await w._keep_running(worker, ready, stopping, done)
    assert ready.is_set() and worker.process.returncode == -signal.SIGKILL


def test_workers_of_one_named_config_are_distinct_lives_and_a_dead_ones_holds_are_reaped(stack: Stack, pg_ledger_url):
    import threading

    # On PostgreSQL (the shared SQLite file's reaper: tests/test_sqlite_shared.py); the ids are the app's either way.
    ledger_args = ["--ledger", pg_ledger_url]
    query = lambda sql, params=(): ledger(pg_ledger_url, sql, params)  # noqa: E731
    invariant = PG_INVARIANT_SQL
    neuron = stack.neuron("--token-interval-ms", "10", "--reply-tokens", "500")  # streams of 5 s: in flight at the kill
    config = stack.tmp_path / "named.toml"
    config.write_text('[budget]\nreplica_id = "host-a"\nlease_s = 1.0\n')
    data_dir = stack.tmp_path / "data-workers"
    cortex = stack._start("cortex", [
        "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--neuron", neuron.url, "--config", str(config),
        "--admin-token", ADMIN_TOKEN, *ledger_args, "--workers", "2",
    ])
    key_id, key = create_key(cortex, balance_tokens=10**6)

    def stream() -> None:
        try:
            httpx.post(cortex.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                       json={"model": "cortex-mock", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 500, "stream": True})
        except httpx.HTTPError:
            pass  # its worker was killed under it

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: query("SELECT COUNT(*) FROM holds WHERE state = 'open'")[0][0] == 8)
    ids = {r[0] for r in query("SELECT DISTINCT replica_id FROM holds")}
    assert all(i.startswith("host-a-") for i in ids)
    victim = sorted(ids)[0]
    pid = int(victim.split("-")[2])
    assert pid in cortex.announcement["worker_pids"]
    os.kill(pid, signal.SIGKILL)
    # The other worker's reaper charges the dead one's holds in full once its lease (1 s) has passed.
    wait_until(lambda: query("SELECT COUNT(*) FROM holds WHERE replica_id = %s AND state = 'open'", (victim,))[0][0] == 0,
               timeout_s=15)
    assert query("SELECT COUNT(*) FROM holds WHERE replica_id = %s AND state = 'orphaned'", (victim,))[0][0] >= 1
    assert query(invariant) == []
    for t in threads:  # the survivor's streams end on their own: nothing for the teardown to drain
        t.join(30)


def test_workers_do_not_outlive_a_supervisor_killed_outright(stack: Stack):
    neuron = stack.neuron()
    cortex = workers(stack, neuron, [], 2)
    pids = cortex.announcement["worker_pids"]
    cortex.kill()  # SIGKILL: no drain, no forwarding of signals

    def gone(pid: int) -> bool:
        try:
            return "zombie" in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(p) for p in pids), timeout_s=20)
