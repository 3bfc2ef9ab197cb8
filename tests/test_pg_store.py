"""PgAdmission (cortex/budget/pg_store.py): group commit, replicas, crashes and cancellation on a real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from cortex.budget import pg_schema
from cortex.budget.ledger import Hold, Refusal
from cortex.budget.pg_ledger import Extend, Reserve, Resolve
from cortex.budget.pg_store import PgAdmission, _cut
from cortex.budget.store import DEFER_FLUSH_S, StoreError

ROOT = Path(__file__).resolve().parent.parent
TTL_S = 600.0

# Every principal: within its balance cap, and its held, in_flight and spent equal to what its holds say.
INVARIANT_SQL = """
SELECT p.kind, p.id FROM (
    SELECT 'account' AS kind, id, balance_tokens, spent_tokens, held_tokens, in_flight FROM accounts
    UNION ALL
    SELECT 'key', id, balance_tokens, spent_tokens, held_tokens, in_flight FROM keys
) p
LEFT JOIN LATERAL (
    SELECT COALESCE(SUM(h.amount_tokens), 0) AS ht, COUNT(*) AS n FROM holds h
    WHERE h.state = 'open' AND (CASE WHEN p.kind = 'key' THEN h.key_id ELSE h.account_id END) = p.id
) o ON true
LEFT JOIN LATERAL (
    SELECT COALESCE(SUM(h.charged_tokens), 0) AS ct FROM holds h
    WHERE h.state <> 'open' AND (CASE WHEN p.kind = 'key' THEN h.key_id ELSE h.account_id END) = p.id
) c ON true
WHERE NOT ((p.balance_tokens IS NULL OR p.spent_tokens + p.held_tokens <= p.balance_tokens)
           AND p.held_tokens = o.ht AND p.in_flight = o.n AND p.spent_tokens = c.ct)
"""


@pytest.fixture
def url(pg_ledger_url: str) -> str:
    return pg_ledger_url


@pytest.fixture
def conn(url: str):
    with pg_schema.connect(url) as c:
        yield c


def principals(conn: psycopg.Connection[Any], account_cap: int | None = None, key_cap: int | None = None) -> None:
    """Account `a` and its key `k`, with balance caps in tokens."""
    conn.execute("INSERT INTO accounts (id, created_at, balance_tokens) VALUES ('a', 0, %s)", (account_cap,))
    conn.execute(
        "INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, balance_tokens)"
        " VALUES ('k', 'a', 'k', 'k', 'k', 0, %s)", (key_cap,),
    )


def row(conn: psycopg.Connection[Any], table: str, pid: str) -> tuple[int, int, int]:
    return conn.execute(f"SELECT spent_tokens, held_tokens, in_flight FROM {table} WHERE id = %s", (pid,)).fetchone()


def assert_invariants(conn: psycopg.Connection[Any]) -> None:
    assert conn.execute(INVARIANT_SQL).fetchall() == []


def open_holds(conn: psycopg.Connection[Any], replica: str | None = None) -> int:
    if replica is None:
        return conn.execute("SELECT COUNT(*) FROM holds WHERE state = 'open'").fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM holds WHERE state = 'open' AND replica_id = %s", (replica,)).fetchone()[0]


async def wait_for(condition, timeout_s: float, interval_s: float = 0.02) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(interval_s)


# --- group commit -------------------------------------------------------------------------------


def test_200_concurrent_reserves_become_a_few_batches_and_admit_exactly_what_the_cap_allows(conn, url):
    principals(conn, account_cap=1000)
    results: list[Hold | Refusal] = []
    commits: list[int] = []

    async def main() -> None:
        async with PgAdmission.open(url, "r1", on_commit=lambda n, s: commits.append(n)) as adm:
            async def one(i: int) -> None:
                results.append(await adm.reserve(Reserve(f"h{i}", "k", 7, TTL_S)))

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert adm.round_trips <= 20, adm.round_trips
            assert adm.transactions == adm.round_trips

    trio.run(main)
    held = [r for r in results if isinstance(r, Hold)]
    assert len(results) == 200 and len(held) == 1000 // 7
    assert all(r.reason == "balance" and r.principal_kind == "account" for r in results if isinstance(r, Refusal))
    assert sum(commits) == 200 and len(commits) <= 20
    assert row(conn, "accounts", "a") == (0, 7 * len(held), len(held))
    assert_invariants(conn)


def test_three_replicas_hammering_one_key_and_one_account_admit_exactly_the_cap(conn, url):
    cap, amount = 7000, 7
    principals(conn, account_cap=cap, key_cap=10**9)
    admitted = [0, 0, 0]

    async def hammer(adm: PgAdmission, r: int, t: int) -> None:
        n = 0
        while True:
            got = await adm.reserve(Reserve(f"r{r}-t{t}-{n}", "k", amount, TTL_S))
            n += 1
            if isinstance(got, Refusal):
                assert got.reason == "balance"  # settled in full: a refusal is final
                return
            admitted[r] += 1
            await adm.resolve(Resolve(got.id, "settled", amount))

    async def main() -> None:
        async with PgAdmission.open(url, "r0") as a, PgAdmission.open(url, "r1") as b, PgAdmission.open(url, "r2") as c:
            async with trio.open_nursery() as nursery:
                for r, adm in enumerate((a, b, c)):
                    for t in range(32):
                        nursery.start_soon(hammer, adm, r, t)

    trio.run(main)  # each context flushes its deferred settlements on exit
    assert sum(admitted) == cap // amount and all(admitted)  # every replica got some
    assert row(conn, "accounts", "a") == (cap // amount * amount, 0, 0)
    assert open_holds(conn) == 0
    assert_invariants(conn)


# --- crashes ----------------------------------------------------------------------------------


def test_a_dead_replicas_holds_are_reaped_by_another_after_the_lease_charged_in_full_once(conn, url):
    principals(conn, account_cap=1000)

    async def main() -> None:
        async with PgAdmission.open(url, "dead", lease_s=0.3) as dead:  # no heartbeat: it never runs its background
            for i in range(3):
                assert isinstance(await dead.reserve(Reserve(f"d{i}", "k", 100, TTL_S)), Hold)
        # Its context exited with the holds open: as a process that died would leave them.
        async with PgAdmission.open(url, "alive", lease_s=0.3) as alive, trio.open_nursery() as nursery:
            await nursery.start(alive.run_background)
            await wait_for(lambda: alive.reaped == 3, 5.0)
            assert await alive.reap() == []  # exactly once
            nursery.cancel_scope.cancel()
        async with PgAdmission.open(url, "dead", lease_s=0.3) as late:  # the dead one's id, answering late
            assert await late.resolve(Resolve("d0", "settled", 1), durable=True) is False

    trio.run(main)
    assert conn.execute("SELECT state, charged_tokens, COUNT(*) FROM holds GROUP BY 1, 2").fetchall() == [("orphaned", 100, 3)]
    assert row(conn, "accounts", "a") == (300, 0, 0)
    assert_invariants(conn)


def test_a_hold_that_cannot_be_reaped_does_not_keep_the_other_orphans_open(conn, url, caplog):
    # One reap is one transaction over many holds: a hold whose resolution fails (here a key whose `held` was
    # corrupted below its open holds) must be stepped past, not fail every reap for every dead replica.
    principals(conn, account_cap=10**6)
    for extra in ("k2", "k3"):
        conn.execute("INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at)"
                     " VALUES (%s, 'a', %s, %s, %s, 0)", (extra, extra, extra.encode(), extra))

    async def main() -> None:
        async with PgAdmission.open(url, "dead", lease_s=0.3) as dead:
            for i, key in enumerate(("k", "k2", "k3")):
                assert isinstance(await dead.reserve(Reserve(f"d{i}", key, 100, TTL_S)), Hold)
        conn.execute("UPDATE keys SET held_tokens = 0 WHERE id = 'k2'")
        await trio.sleep(0.4)  # the lease has passed
        async with PgAdmission.open(url, "alive", lease_s=0.3) as alive:
            assert await alive.reap() == ["d0", "d2"]
            assert await alive.reap() == []

    trio.run(main)
    assert conn.execute("SELECT id, state FROM holds ORDER BY id").fetchall() == [
        ("d0", "orphaned"), ("d1", "open"), ("d2", "orphaned")]
    assert "cannot reap hold d1" in caplog.text and "holds less than its open holds" in caplog.text


def test_a_live_replicas_heartbeat_keeps_its_holds_from_the_reapers_past_many_leases(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "live", lease_s=0.3) as live, PgAdmission.open(url, "reaper", lease_s=0.3) as reaper:
            async with trio.open_nursery() as nursery:
                await nursery.start(live.run_background)
                await nursery.start(reaper.run_background)
                hold = await live.reserve(Reserve("h1", "k", 10, TTL_S))
                await trio.sleep(1.2)  # four leases
                assert reaper.reaped == 0 and live.heartbeats >= 3
                assert await live.resolve(Resolve(hold.id, "settled", 5), durable=True) is True
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert row(conn, "keys", "k") == (5, 0, 0)


def test_a_replica_id_with_open_holds_of_an_earlier_life_is_refused_at_open(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            await adm.reserve(Reserve("h1", "k", 1, TTL_S))
        with pytest.raises(StoreError, match="still has 1 open holds from an earlier life"):
            async with PgAdmission.open(url, "r1"):
                pass

    trio.run(main)


VICTIM = """
import sys, trio
from cortex.budget.ledger import Hold
from cortex.budget.pg_ledger import Reserve, Resolve
from cortex.budget.pg_store import PgAdmission

async def main(url):
    async with PgAdmission.open(url, "victim", lease_s=1.0) as adm, trio.open_nursery() as nursery:
        await nursery.start(adm.run_background)
        async def worker(w):
            n = 0
            while True:
                got = await adm.reserve(Reserve(f"v{w}-{n}", "k", 5, 600.0))
                if isinstance(got, Hold) and n % 2:
                    await adm.resolve(Resolve(got.id, "settled", 3))
                n += 1
                if n == 20 and w == 0:
                    print("ready", flush=True)
        for w in range(16):
            nursery.start_soon(worker, w)

trio.run(main, sys.argv[1])
"""


def test_a_replica_killed_mid_batch_has_its_holds_reaped_after_the_lease_and_the_caps_hold_throughout(conn, url, tmp_path):
    principals(conn, account_cap=20_000, key_cap=10**9)
    broken: list[Any] = []
    done = threading.Event()

    def watch() -> None:  # the invariants, from outside, all along
        with pg_schema.connect(url) as c:
            while not done.is_set():
                broken.extend(c.execute(INVARIANT_SQL).fetchall())
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # mid-flight: 16 tasks reserving and settling
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        time.sleep(0.1)  # a statement the server was running when the client died may still commit
        left = open_holds(conn, "victim")
        assert left > 0

        async def reaper() -> None:
            async with PgAdmission.open(url, "reaper", lease_s=1.0) as adm, trio.open_nursery() as nursery:
                await nursery.start(adm.run_background)
                # `reaped` counts once the reap's thread is back in Trio, a moment after its commit shows.
                await wait_for(lambda: open_holds(conn, "victim") == 0 and adm.reaped >= left, 10.0)
                assert adm.reaped == left
                nursery.cancel_scope.cancel()

        trio.run(reaper)
    finally:
        done.set()
        watcher.join()
        if victim.poll() is None:
            victim.kill()
    assert broken == []
    assert conn.execute("SELECT COUNT(*), COALESCE(SUM(charged_tokens), 0) FROM holds WHERE state = 'orphaned'").fetchone() == (
        left, 5 * left,
    )
    assert_invariants(conn)


# --- cancellation, ride-along, schema ---------------------------------------------------------------


def test_a_reserve_cancelled_in_flight_then_released_leaves_no_open_hold(conn, url):
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            async def cancelled(i: int) -> None:
                with trio.move_on_after(i * 0.0005):  # from before the queue to mid-batch
                    await adm.reserve(Reserve(f"c{i}", "k", 10, TTL_S))
                await adm.release(f"c{i}")  # placed or not: the caller's duty, always safe

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(cancelled, i)
            await wait_for(lambda: open_holds(conn) == 0, 2.0)
            assert await adm.release("never-placed", durable=True) is False

    trio.run(main)
    assert row(conn, "accounts", "a") == (0, 0, 0)
    assert_invariants(conn)


def test_a_deferred_settlement_rides_along_with_the_next_batch_or_is_durable_within_the_flush_window(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            one = await adm.reserve(Reserve("h1", "k", 100, TTL_S))
            two = await adm.reserve(Reserve("h2", "k", 100, TTL_S))
            before = adm.round_trips
            assert await adm.resolve(Resolve(one.id, "settled", 40)) is None  # returns once queued
            await trio.sleep(0.01)  # well inside the flush window
            await adm.reserve(Reserve("h3", "k", 100, TTL_S))
            assert adm.round_trips == before + 1  # the settlement rode along with h3's batch
            assert conn.execute("SELECT state FROM holds WHERE id = 'h1'").fetchone() == ("settled",)
            started = trio.current_time()
            await adm.resolve(Resolve(two.id, "released"))
            await wait_for(lambda: conn.execute("SELECT state FROM holds WHERE id = 'h2'").fetchone() == ("released",), 1.0,
                           interval_s=0.005)
            assert trio.current_time() - started < 0.5  # flushed alone, 50 ms after it was queued
            assert adm.round_trips == before + 2

    trio.run(main)
    assert row(conn, "keys", "k") == (40, 100, 1)


def test_the_flush_at_exit_writes_the_deferred_settlements(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            holds = [await adm.reserve(Reserve(f"h{i}", "k", 10, TTL_S)) for i in range(5)]
            for h in holds:
                await adm.resolve(Resolve(h.id, "settled", 4))

    trio.run(main)
    assert row(conn, "accounts", "a") == (20, 0, 0)


def test_a_ledger_with_an_old_or_no_schema_is_refused_at_open_with_the_fix(pg_url):
    async def opening(url: str) -> None:
        async with PgAdmission.open(url, "r1"):
            pass

    with pytest.raises(StoreError, match=r"has no cortex schema: run `cortex db migrate --ledger postgresql://"):
        trio.run(opening, pg_url)
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn, pg_schema.MIGRATIONS[:1])
    with pytest.raises(StoreError, match=rf"has schema 1, older than this cortex's {pg_schema.SCHEMA_VERSION}: run `cortex db migrate"):
        trio.run(opening, pg_url)


def after_commit(ledger: PgLedger, when: Any, then: Any) -> None:
    """Make `ledger.step` run `then()` (which raises) after its batch committed, for batches `when(reserves)` picks."""
    real_step = ledger.step

    def step(resolutions, reserves, now, extensions):
        answer = real_step(resolutions, reserves, now, extensions)
        if when(reserves):
            then()
        return answer

    ledger.step = step  # type: ignore[method-assign]


def test_a_lost_connection_fails_the_batch_with_store_error_and_the_writer_reconnects(conn, url):
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            assert isinstance(await adm.reserve(Reserve("h1", "k", 10, TTL_S)), Hold)
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name = 'cortex' AND pid <> pg_backend_pid()")
            with pytest.raises(StoreError, match="unavailable"):
                await adm.reserve(Reserve("h2", "k", 10, TTL_S))
            got = await adm.reserve(Reserve("h3", "k", 10, TTL_S))  # reconnected
            assert isinstance(got, Hold)
            # The same id again: the store's release of the failed attempt ran first (a no-op: it never reached
            # the server), so the retry is placed afresh.
            assert isinstance(await adm.reserve(Reserve("h2", "k", 10, TTL_S)), Hold)

    trio.run(main)
    assert open_holds(conn) == 3
    assert_invariants(conn)


def test_a_batch_that_committed_but_lost_its_reply_is_released_and_a_retry_of_its_hold_id_fails_safe(conn, url):
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            ledger = adm._ledger  # the writer's: its batch commits, then the connection drops before the reply
            lose = [True]

            def drop_the_reply() -> None:
                lose.clear()
                ledger.conn.close()
                raise psycopg.OperationalError("server closed the connection unexpectedly")

            after_commit(ledger, lambda reserves: lose and any(q.hold_id == "lost" for q in reserves), drop_the_reply)
            with pytest.raises(StoreError, match="unavailable"):
                await adm.reserve(Reserve("lost", "k", 10, TTL_S))
            assert conn.execute("SELECT state FROM holds WHERE id = 'lost'").fetchone() == ("open",)  # it did commit
            with pytest.raises(StoreError, match="outcome was unknown"):  # the store released it first
                await adm.reserve(Reserve("lost", "k", 10, TTL_S))
            assert isinstance(await adm.reserve(Reserve("fresh", "k", 10, TTL_S)), Hold)

    trio.run(main)
    assert conn.execute("SELECT id, state FROM holds ORDER BY id").fetchall() == [("fresh", "open"), ("lost", "released")]
    assert_invariants(conn)


def test_an_answer_the_writer_cannot_read_fails_its_batch_safely_and_the_writer_lives_on(conn, url):
    # A bug, or a refusal naming a zone this replica's tzdata lacks, raised after the commit: the thread must not
    # die (every later reserve would wait and fail), and the batch counts as lost (its hold released).
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            def unreadable() -> None:
                raise ValueError("no such zone")

            after_commit(adm._ledger, lambda reserves: any(q.hold_id == "unreadable" for q in reserves), unreadable)
            with pytest.raises(StoreError, match="could not be read"):
                await adm.reserve(Reserve("unreadable", "k", 10, TTL_S))
            assert isinstance(await adm.reserve(Reserve("next", "k", 10, TTL_S)), Hold)  # the writer lives on
            await adm.resolve(Resolve("next", "settled", 4), durable=True)

    trio.run(main)
    assert conn.execute("SELECT id, state FROM holds ORDER BY id").fetchall() == [("next", "settled"), ("unreadable", "released")]
    assert_invariants(conn)


def test_a_writer_that_fails_on_its_own_side_of_a_batch_fails_that_batch_and_lives_on(conn, url):
    # Past the answer (here checking a retried hold id): a bug in the writer must not end its thread.
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            real = adm._verify_duplicate

            def broken(q, result):
                if q.hold_id == "broken":
                    raise RuntimeError("a bug")
                return real(q, result)

            adm._verify_duplicate = broken
            with trio.fail_after(10):  # a dead writer answers nobody
                with pytest.raises(StoreError, match="writer failed"):
                    await adm.reserve(Reserve("broken", "k", 10, TTL_S))
                assert isinstance(await adm.reserve(Reserve("next", "k", 10, TTL_S)), Hold)

    trio.run(main)
    assert conn.execute("SELECT id, state FROM holds ORDER BY id").fetchall() == [("broken", "released"), ("next", "open")]
    assert_invariants(conn)


def test_a_read_only_ledger_fails_the_batch_keeps_its_settlement_and_takes_it_once_writable(conn, url):
    # A standby after a failover: nothing is written, the settlement waits instead of being dropped.
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            assert isinstance(await adm.reserve(Reserve("h1", "k", 10, TTL_S)), Hold)
            adm._ledger.conn.execute("SET default_transaction_read_only = on")
            await adm.resolve(Resolve("h1", "settled", 3))  # deferred: rides with the next batch
            with pytest.raises(StoreError, match="unavailable"):
                await adm.reserve(Reserve("h2", "k", 10, TTL_S))
            assert conn.execute("SELECT state FROM holds WHERE id = 'h1'").fetchone() == ("open",)
            adm._ledger.conn.execute("SET default_transaction_read_only = off")
            assert isinstance(await adm.reserve(Reserve("h3", "k", 10, TTL_S)), Hold)

    trio.run(main)
    assert conn.execute("SELECT id, state, charged_tokens FROM holds ORDER BY id").fetchall() == [
        ("h1", "settled", 3), ("h3", "open", 0)]
    assert_invariants(conn)


# --- extensions: incremental output holds -------------------------------------------------------------


def hold_amount(conn: psycopg.Connection[Any], hold_id: str) -> tuple[str, int]:
    return conn.execute("SELECT state, amount_tokens FROM holds WHERE id = %s", (hold_id,)).fetchone()


def test_concurrent_extensions_are_group_committed_and_grow_the_hold_exactly_to_the_cap(conn, url):
    principals(conn, account_cap=100)
    results: list[Hold | Refusal | None] = []

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            await adm.reserve(Reserve("h1", "k", 50, TTL_S))
            before = adm.round_trips

            async def one() -> None:
                results.append(await adm.extend(Extend("h1", 10)))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert adm.round_trips - before <= 5, adm.round_trips - before
            assert adm.counters.extensions == 20 and adm.counters.extended == 5
            assert await adm.extend(Extend("nope", 1)) is None
            assert await adm.resolve(Resolve("h1", "settled", 1000), durable=True) is True
            assert await adm.extend(Extend("h1", 1)) is None  # settled: nothing changes

    trio.run(main)
    grown = [r for r in results if isinstance(r, Hold)]
    assert sorted(g.amount_tokens for g in grown) == [60, 70, 80, 90, 100]
    assert all(isinstance(r, Refusal) and r.reason == "balance" for r in results if not isinstance(r, Hold))
    assert hold_amount(conn, "h1") == ("settled", 100)
    assert row(conn, "accounts", "a") == (100, 0, 0)
    assert_invariants(conn)


def test_a_batch_is_cut_where_steps_order_would_run_an_item_ahead_of_one_it_depends_on():
    def items(*spec: tuple[str, str]) -> list[tuple[str, Any, None]]:
        make = {"reserve": lambda h: Reserve(h, "k", 1, TTL_S), "extend": lambda h: Extend(h, 1),
                "resolve": lambda h: Resolve(h, "released")}
        return [(kind, make[kind](h), None) for kind, h in spec]

    def cut_at(*spec: tuple[str, str], batch_max: int = 8) -> int:
        return len(_cut(items(*spec), batch_max)[0])

    assert cut_at(("reserve", "h1"), ("extend", "h1")) == 1  # extensions run before reserves
    assert cut_at(("extend", "h1"), ("resolve", "h1")) == 1  # resolutions run before extensions
    assert cut_at(("resolve", "h1"), ("extend", "h1"), ("extend", "h1")) == 3  # in order already
    assert cut_at(("extend", "h1"), ("extend", "h2"), ("reserve", "h3"), ("resolve", "h4")) == 4
    assert cut_at(("extend", "h1"), ("extend", "h2"), ("extend", "h3"), batch_max=2) == 2


def test_a_settlement_queued_behind_an_extension_of_its_hold_charges_the_grown_hold(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            await adm.reserve(Reserve("h1", "k", 100, TTL_S))
            async with trio.open_nursery() as nursery:
                got: list[Any] = []

                async def grow() -> None:
                    got.append(await adm.extend(Extend("h1", 50)))

                nursery.start_soon(grow)
                await trio.testing.wait_all_tasks_blocked()  # the extension is queued
                adm.resolve_soon(Resolve("h1", "settled", 1000))
            assert isinstance(got[0], Hold) and got[0].amount_tokens == 150

    trio.run(main)
    assert conn.execute("SELECT state, charged_tokens FROM holds WHERE id = 'h1'").fetchone() == ("settled", 150)
    assert row(conn, "keys", "k") == (150, 0, 0)


def test_an_extension_whose_batch_lost_its_reply_fails_is_never_retried_and_settlement_charges_what_was_delivered(
    conn, url
):
    principals(conn, account_cap=10**6)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            ledger = adm._ledger  # the writer's: its batch commits, then the connection drops before the reply
            real_step = ledger.step
            lose = [True]

            def lossy_step(resolutions, reserves, now, extensions):
                answer = real_step(resolutions, reserves, now, extensions)
                if lose and extensions:
                    lose.clear()
                    ledger.conn.close()
                    raise psycopg.OperationalError("server closed the connection unexpectedly")
                return answer

            ledger.step = lossy_step
            await adm.reserve(Reserve("h1", "k", 100, TTL_S))
            with pytest.raises(StoreError, match="unavailable"):
                await adm.extend(Extend("h1", 50))
            assert hold_amount(conn, "h1") == ("open", 150)  # it did commit: the hold is larger than the caller knows
            await adm.reserve(Reserve("h2", "k", 1, TTL_S))  # the next batches carry no second copy of it
            assert hold_amount(conn, "h1") == ("open", 150)
            # The caller took the slice as not granted and streamed only the 100 it knew of: that is the charge.
            assert await adm.resolve(Resolve("h1", "settled", 100), durable=True) is True

    trio.run(main)
    assert conn.execute("SELECT charged_tokens FROM holds WHERE id = 'h1'").fetchone() == (100,)
    assert row(conn, "keys", "k") == (100, 1, 1)
    assert_invariants(conn)


def test_an_extension_cancelled_while_it_waits_never_releases_its_hold(conn, url):
    principals(conn)

    async def main() -> None:
        async with PgAdmission.open(url, "r1") as adm:
            await adm.reserve(Reserve("h1", "k", 100, TTL_S))
            with trio.move_on_after(0):  # queued, then cancelled before the answer
                await adm.extend(Extend("h1", 50))
            await wait_for(lambda: hold_amount(conn, "h1") == ("open", 150), 2.0)
            await trio.sleep(2 * DEFER_FLUSH_S)  # long enough for any deferred release to be written
            assert await adm.release("never-placed", durable=True) is False

    trio.run(main)
    assert hold_amount(conn, "h1") == ("open", 150)  # still the caller's to settle
    assert row(conn, "keys", "k") == (0, 150, 1)
