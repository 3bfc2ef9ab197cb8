"""SqliteShared (cortex/budget/sqlite_shared.py): the data dir's SQLite as a ledger shared by a host's workers."""

from __future__ import annotations

import sqlite3
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from common.errors import ApiError
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps
from cortex.budget.pg_ledger import Reserve
from cortex.budget.shared_service import SharedBudgetService
from cortex.budget.sqlite_shared import SqliteShared
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics
from tests.test_pg_service import eventually, headers

# Every principal: within its balance cap, and its spent equal to what its resolved holds were charged.
INVARIANT_SQL = """
SELECT p.kind, p.id FROM (
    SELECT 'account' AS kind, id, balance_tokens, spent_tokens FROM accounts
    UNION ALL SELECT 'key', id, balance_tokens, spent_tokens FROM keys
) p
WHERE NOT (
    (p.balance_tokens IS NULL OR p.spent_tokens + (SELECT COALESCE(SUM(amount_tokens), 0) FROM holds h WHERE h.state = 'open'
        AND (CASE WHEN p.kind = 'key' THEN h.key_id ELSE h.account_id END) = p.id) <= p.balance_tokens)
    AND p.spent_tokens = (SELECT COALESCE(SUM(charged_tokens), 0) FROM holds h WHERE h.state <> 'open'
        AND (CASE WHEN p.kind = 'key' THEN h.key_id ELSE h.account_id END) = p.id)
)
"""


@asynccontextmanager
async def replica(path: Path, **config: Any) -> AsyncIterator[SharedBudgetService]:
    async with SqliteShared.open(path, lease_s=config.pop("lease_s", 30.0), replica_id=config.pop("replica_id", None)) as shared:
        service = await SharedBudgetService.load(shared, time.time, BudgetConfig(**config), GatewayMetrics())
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run_background)
            yield service
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def replicas(path: Path, n: int, **config: Any) -> AsyncIterator[list[SharedBudgetService]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(replica(path, **config)) for _ in range(n)]


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_the_cap_holds_across_workers_sharing_one_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with replicas(path, 3) as services:
        record, plaintext = await services[0].create_key("k", "acct", Caps(balance_tokens=1000))
        await services[0].set_caps("account", "acct", Caps(balance_tokens=700))
        await eventually(lambda: all(record.id in s.keys for s in services))
        admitted, refused = [], []

        async def one(s: SharedBudgetService, i: int) -> None:
            await trio.sleep(i * 0.003)  # arrivals spread, so every worker's batches interleave
            try:
                hold = await s.reserve(s.authenticate(headers(plaintext)), Estimate(30, 70), f"r{i}", "m")
                admitted.append(hold)
                await trio.sleep(0.02)
                await s.settle(hold, 60)
            except ApiError as err:
                assert err.status == 429
                refused.append(err)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, services[i % 3], i)
        # 700 / 100 = 7 in flight at once; as they settle at 60, more fit: spent never passes 700.
        await trio.sleep(0.2)
        (spent,), = rows(path, "SELECT spent_tokens FROM accounts WHERE id = 'acct'")
        assert spent == 60 * len(admitted) <= 700 and len(admitted) + len(refused) == 40
        assert rows(path, INVARIANT_SQL) == []
        assert {r[0] for r in rows(path, "SELECT DISTINCT replica_id FROM holds")} == {s.shared.replica_id for s in services}


async def test_a_revocation_and_a_top_up_reach_every_worker_within_a_second(tmp_path: Path) -> None:
    async with replicas(tmp_path / "ledger.db", 2) as (a, b):
        record, plaintext = await a.create_key("k", None, Caps(balance_tokens=10))
        await eventually(lambda: record.id in b.keys)
        await b.top_up("key", record.id, 90)
        await eventually(lambda: a.ledger.principal("key", record.id).caps.balance_tokens == 100)
        await a.revoke(record.id)
        elapsed = await eventually(lambda: b.keys[record.id].revoked_at is not None)
        assert elapsed < 1.0
        with pytest.raises(ApiError) as refused:
            b.authenticate(headers(plaintext))
        assert refused.value.status == 401


async def test_a_revoked_key_is_refused_by_the_shared_file_before_a_worker_hears_of_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with replicas(path, 1) as (a,):
        record, plaintext = await a.create_key("k", None, Caps())
        key = a.authenticate(headers(plaintext))
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE keys SET revoked_at = 1 WHERE id = ?", (record.id,))
        conn.close()
        with pytest.raises(ApiError) as refused:
            await a.reserve(key, Estimate(1, 1), "r", "m")
        assert refused.value.status == 401


async def test_a_dead_workers_holds_are_reaped_in_full_after_its_lease(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with replicas(path, 1, lease_s=0.5) as (survivor,):
        record, _ = await survivor.create_key("k", "acct", Caps(balance_tokens=100))
        async with SqliteShared.open(path, replica_id="doomed", lease_s=0.5) as doomed:
            hold = await doomed.reserve(Reserve("hold_doomed", record.id, 40, 600.0))
            assert hold.amount_tokens == 40
            doomed._closed = True  # dies: nothing more leaves it (no settlement, no heartbeat)
        await eventually(lambda: rows(path, "SELECT state FROM holds WHERE id = 'hold_doomed'") == [("orphaned",)],
                         timeout_s=3.0)
        assert rows(path, "SELECT spent_tokens FROM keys") == [(40,)]
        assert rows(path, INVARIANT_SQL) == []


async def test_windows_periods_and_views_on_the_shared_file(tmp_path: Path) -> None:
    from cortex.budget.periods import PeriodSpec

    async with replicas(tmp_path / "ledger.db", 2) as (a, b):
        record, plaintext = await a.create_key(
            "k", "acct", Caps(window_tokens=100, window_s=30.0, period=PeriodSpec("daily", "UTC"), period_tokens=80)
        )
        await eventually(lambda: record.id in b.keys)
        hold = await a.reserve(a.authenticate(headers(plaintext)), Estimate(30, 30), "r1", "llama")
        await a.settle(hold, 60)
        await trio.sleep(0.2)
        with pytest.raises(ApiError) as refused:
            await b.reserve(b.authenticate(headers(plaintext)), Estimate(30, 30), "r2", "llama")
        assert refused.value.status == 429 and b"retry-after-ms" in dict(refused.value.headers)
        usage = await b.usage("key", record.id)
        assert usage["window_used_tokens"] == 60 and usage["period"]["used_tokens"] == 60
        assert usage["remaining"]["period_tokens"] == 20
        (row,) = await b.recent(record.id)
        assert row["state"] == "settled" and row["charged_tokens"] == 60
        spend = await b.spend("key", record.id)
        assert spend["by_model"][0]["tokens"] == 60


async def test_an_incremental_hold_grows_on_the_shared_file_within_every_cap(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with replicas(path, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps(balance_tokens=200, max_concurrency=1))
        hold = await a.reserve(a.authenticate(headers(plaintext)), Estimate(20, 50), "r1", "m")
        grown = await a.extend(hold, 100)
        assert grown is not None and grown.amount_tokens == 170
        assert rows(path, "SELECT amount_tokens FROM holds WHERE id = ?", (hold.id,)) == [(170,)]
        refused = await a.extend(grown, 31)  # 170 + 31 > 200: the balance refuses, concurrency does not count
        assert refused is not None and refused.reason == "balance"
        await eventually(lambda: record.id in b.keys)
        with pytest.raises(ApiError):  # the other worker sees the grown hold: 30 left, and one in flight
            await b.reserve(b.authenticate(headers(plaintext)), Estimate(5, 5), "r2", "m")
        await a.settle(grown, 180)  # charged at most the grown hold
        await trio.sleep(0.2)
        assert rows(path, "SELECT charged_tokens FROM holds WHERE id = ?", (hold.id,)) == [(170,)]
        assert await a.extend(grown, 1) is None  # settled: no longer open here
        assert rows(path, INVARIANT_SQL) == []
