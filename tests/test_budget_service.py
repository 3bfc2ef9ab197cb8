"""The budget service against a real store: the awkward interleavings."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from common.errors import ApiError
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps, Refusal
from cortex.budget.service import BudgetService
from cortex.budget.store import StoreError, SyncStore, ThreadedStore, connect
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _service(store, clock=None) -> BudgetService:
    return await BudgetService.load(store, clock or Clock(), BudgetConfig(), GatewayMetrics())


async def test_a_reserve_cancelled_while_its_hold_is_written_releases_the_hold(tmp_path):
    async with ThreadedStore.open(tmp_path / "l.db") as store:
        service = await _service(store)
        record, _ = await service.create_key("k", None, Caps(max_concurrency=1))
        with trio.move_on_after(0):  # the client left at once
            await service.reserve(record, Estimate(5, 5), "r1", "m")
        p = service.ledger.principal("key", record.id)
        assert (p.held_tokens, p.in_flight) == (0, 0)
        assert not service.ledger.holds
        hold = await service.reserve(record, Estimate(5, 5), "r2", "m")  # the slot is free again
        await service.settle(hold, 7)
    states = dict(connect(tmp_path / "l.db").execute("SELECT request_id, state FROM holds").fetchall())
    assert states == {"r1": "released", "r2": "settled"}


async def test_a_ledger_that_cannot_write_refuses_with_503_and_holds_nothing():
    conn = connect(":memory:")
    service = await _service(SyncStore(conn))
    record, _ = await service.create_key("k", None, Caps(balance_tokens=100))
    conn.close()
    with pytest.raises(ApiError) as info:
        await service.reserve(record, Estimate(5, 5), "r1", "m")
    assert info.value.status == 503
    assert service.ledger.principal("key", record.id).held_tokens == 0


async def test_expiry_survives_a_failing_store():
    conn = connect(":memory:")
    clock = Clock()
    service = await _service(SyncStore(conn), clock)
    record, _ = await service.create_key("k", None, Caps(balance_tokens=100))
    await service.reserve(record, Estimate(5, 5), "r1", "m")
    conn.close()
    clock.now += 10_000
    expired = await service.expire_due()  # logs the write failure, does not raise
    assert [r.hold.request_id for r in expired] == ["r1"]


async def test_a_closed_threaded_store_fails_fast(tmp_path):
    async with ThreadedStore.open(tmp_path / "l.db") as store:
        pass
    with pytest.raises(StoreError, match="closed"):
        await store.commit([])
    with pytest.raises(StoreError, match="closed"):
        await store.commit([], durable=False)


async def test_concurrent_top_ups_all_count(tmp_path):
    async with ThreadedStore.open(tmp_path / "l.db") as store:
        service = await _service(store)
        record, _ = await service.create_key("k", None, Caps(balance_tokens=100))
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(service.top_up, "key", record.id, 100)
        assert service.ledger.principal("key", record.id).caps.balance_tokens == 2100
    row = connect(tmp_path / "l.db").execute("SELECT balance_tokens FROM keys").fetchone()
    assert row == (2100,)


async def test_concurrent_key_creation_into_a_new_account_all_succeed(tmp_path):
    async with ThreadedStore.open(tmp_path / "l.db") as store:
        service = await _service(store)
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(service.create_key, f"k{i}", "fresh", Caps())
        assert len(service.keys) == 5


async def test_top_up_rejects_non_positive_and_absurd_amounts():
    service = await _service(SyncStore(connect(":memory:")))
    record, _ = await service.create_key("k", None, Caps(balance_tokens=100))
    for tokens in (0, -50, 10**16):
        with pytest.raises(ApiError) as info:
            await service.top_up("key", record.id, tokens)
        assert info.value.status == 400
    assert service.ledger.principal("key", record.id).caps.balance_tokens == 100


async def test_widening_a_window_brings_back_usage_the_narrow_window_had_dropped():
    clock = Clock()
    service = await _service(SyncStore(connect(":memory:")), clock)
    record, _ = await service.create_key("k", None, Caps(window_tokens=1000, window_s=10))
    hold = await service.reserve(record, Estimate(500, 500), "r1", "m")
    await service.settle(hold, 1000)
    clock.now += 15  # aged out of the 10 s window
    await service.set_caps("key", record.id, Caps(window_tokens=1000, window_s=3600))
    result = service.ledger.reserve("x", record.id, 1, clock(), 60)
    assert isinstance(result, Refusal) and result.reason == "window"


async def test_adding_a_window_counts_recent_usage():
    clock = Clock()
    service = await _service(SyncStore(connect(":memory:")), clock)
    record, _ = await service.create_key("k", None, Caps(balance_tokens=10_000))
    hold = await service.reserve(record, Estimate(400, 400), "r1", "m")
    await service.settle(hold, 800)
    clock.now += 5
    await service.set_caps("key", record.id, Caps(balance_tokens=10_000, window_tokens=1000, window_s=60))
    assert service.ledger.principal("key", record.id).window_usage(clock()) == 800


def test_sync_store_errors_are_store_errors():
    conn = connect(":memory:")
    conn.close()
    with pytest.raises(StoreError):
        trio.run(SyncStore(conn).commit, [])
    assert isinstance(StoreError("x"), Exception) and not isinstance(StoreError("x"), sqlite3.Error)


class GatedQueries:
    """A real store whose query answers are held back until `gate` is set, so
    other tasks can run between a query being asked and it returning."""

    def __init__(self, store) -> None:
        self._store = store
        self.gate = trio.Event()
        self.asked = trio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def query(self, fn):
        result = await self._store.query(fn)
        self.asked.set()
        await self.gate.wait()
        return result


async def test_charges_settled_while_a_grown_window_is_rebuilt_are_not_lost(tmp_path):
    clock = Clock()
    async with ThreadedStore.open(tmp_path / "l.db") as real:
        store = GatedQueries(real)
        service = await _service(store, clock)
        record, _ = await service.create_key("k", None, Caps(window_tokens=1000, window_s=10.0))
        before = await service.reserve(record, Estimate(10, 10), "r0", "m")
        await service.settle(before, 7)  # in the store before the rebuild's query
        during = await service.reserve(record, Estimate(10, 10), "r1", "m")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.set_caps, "key", record.id, Caps(window_tokens=1000, window_s=60.0))
            await store.asked.wait()
            await service.settle(during, 11)  # lands after the query read the store
            store.gate.set()
        p = service.ledger.principal("key", record.id)
        assert p.caps.window_s == 60.0
        assert p.window_usage(clock()) == 7 + 11
