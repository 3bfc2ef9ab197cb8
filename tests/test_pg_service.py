"""SharedBudgetService (cortex/budget/shared_service.py): the budget service of replicas sharing one PostgreSQL ledger."""

from __future__ import annotations

import math
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

from common.errors import ApiError
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps, Hold, Refusal
from cortex.budget.pg_shared import PgShared
from cortex.budget.pricing import Prices
from cortex.budget.shared_service import SharedBudgetService
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics

from tests.test_pg_store import INVARIANT_SQL


@asynccontextmanager
async def replica(url: str, clock: Any = time.time, **config: Any) -> AsyncIterator[SharedBudgetService]:
    async with PgShared.open(url, lease_s=config.pop("lease_s", 30.0)) as shared:
        service = await SharedBudgetService.load(shared, clock, BudgetConfig(**config), GatewayMetrics())
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run_background)
            yield service
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def replicas(url: str, n: int, **config: Any) -> AsyncIterator[list[SharedBudgetService]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(replica(url, **config)) for _ in range(n)]


def headers(plaintext: str) -> dict[str, str]:
    return {"authorization": f"Bearer {plaintext}"}


async def eventually(check: Any, timeout_s: float = 1.0) -> float:
    """Seconds until `check()` is true (fails past `timeout_s`)."""
    start = trio.current_time()
    while not check():
        if trio.current_time() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await trio.sleep(0.01)
    return trio.current_time() - start


async def test_a_key_made_on_one_replica_works_on_another_within_a_second(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps(balance_tokens=100))
        await eventually(lambda: record.id in b.keys)
        assert b.authenticate(headers(plaintext)).id == record.id
        hold = await b.reserve(b.authenticate(headers(plaintext)), Estimate(10, 20), "r1", "m")
        usage = await a.usage("key", record.id)
        assert usage["held_tokens"] == 30 and usage["remaining"]["balance_tokens"] == 70
        await b.settle(hold, 12)
        await b.shared.admission.heartbeat()  # the deferred settlement rides with the next batch
        usage = await a.usage("account", "acct")
        assert usage["spent_tokens"] == 12 and usage["held_tokens"] == 0


async def test_the_cap_holds_across_replicas_and_refusals_are_429s(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 3) as services:
        record, plaintext = await services[0].create_key("k", "acct", Caps(balance_tokens=1000))
        await eventually(lambda: all(record.id in s.keys for s in services))
        admitted, refused = [], []

        async def one(service: SharedBudgetService, i: int) -> None:
            key = service.authenticate(headers(plaintext))
            try:
                admitted.append(await service.reserve(key, Estimate(30, 70), f"r{i}", "m"))
            except ApiError as err:
                assert err.status == 429 and err.code == "insufficient_quota"
                refused.append(err)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, services[i % 3], i)
        assert len(admitted) == 10 and len(refused) == 50
        conn_rows = await services[0].shared.run(lambda conn: conn.execute(INVARIANT_SQL).fetchall())
        assert conn_rows == []


async def test_revocation_on_one_replica_stops_the_key_on_every_replica_within_a_second(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 3) as services:
        record, plaintext = await services[0].create_key("k", None, Caps())
        await eventually(lambda: all(record.id in s.keys for s in services))
        await services[1].revoke(record.id)
        elapsed = [await eventually(lambda s=s: s.keys[record.id].revoked_at is not None) for s in services]
        assert max(elapsed) < 1.0
        for s in services:
            with pytest.raises(ApiError) as refused:
                s.authenticate(headers(plaintext))
            assert refused.value.status == 401


async def test_a_revoked_key_is_refused_by_the_ledger_even_before_a_replica_hears_of_it(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 1) as (a,):
        record, plaintext = await a.create_key("k", None, Caps())
        key = a.authenticate(headers(plaintext))
        await a.shared.run(lambda conn: conn.execute("UPDATE keys SET revoked_at = 1 WHERE id = %s", (record.id,)))
        with pytest.raises(ApiError) as refused:  # no NOTIFY was sent: only the ledger knows
            await a.reserve(key, Estimate(1, 1), "r", "m")
        assert refused.value.status == 401


async def test_concurrent_top_ups_on_several_replicas_all_count(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 3) as services:
        await services[0].create_account("acct", Caps(balance_tokens=0, balance_usd=0))
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(services[i % 3].top_up, "account", "acct", 7, 3)
        usage = await services[2].usage("account", "acct")
        assert usage["limits"]["balance_tokens"] == 210 and usage["limits"]["balance_micro_usd"] == 90


async def test_admin_errors_on_a_shared_ledger(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        await a.create_account("acct", Caps())
        with pytest.raises(ApiError) as dup:
            await b.create_account("acct", Caps())
        assert dup.value.status == 409
        with pytest.raises(ApiError) as missing:
            await b.set_caps("account", "nobody", Caps(balance_tokens=1))
        assert missing.value.status == 404
        with pytest.raises(ApiError) as no_balance:
            await b.top_up("account", "acct", 5)
        assert no_balance.value.status == 400
        with pytest.raises(ApiError) as no_key:
            await b.revoke("key_nope")
        assert no_key.value.status == 404


async def test_limits_changed_on_one_replica_bind_on_another(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps())
        await eventually(lambda: record.id in b.keys)
        await a.set_caps("key", record.id, Caps(balance_tokens=50))
        with pytest.raises(ApiError) as refused:  # the ledger has the new cap at once, whatever b's view says
            await b.reserve(b.authenticate(headers(plaintext)), Estimate(30, 30), "r", "m")
        assert refused.value.status == 429
        await eventually(lambda: b.ledger.principal("key", record.id).caps.balance_tokens == 50)


async def test_own_holds_expire_charged_in_full_and_a_late_settlement_is_skipped(pg_ledger_url: str) -> None:
    now = [time.time()]
    async with replicas(pg_ledger_url, 1, hold_ttl_s=5.0) as (a,):
        a.clock = lambda: now[0]
        record, plaintext = await a.create_key("k", "acct", Caps(balance_tokens=100))
        hold = await a.reserve(a.authenticate(headers(plaintext)), Estimate(10, 10), "r", "m")
        now[0] += 6.0
        (expired,) = await a.expire_due()
        assert expired.charged_tokens == 20 and expired.hold.state.value == "expired"
        assert await a.settle(hold, 3) is None
        await a.shared.admission.heartbeat()
        state = await a.shared.run(lambda conn: conn.execute("SELECT state, charged_tokens FROM holds").fetchall())
        assert state == [{"state": "expired", "charged_tokens": 20}]


async def test_money_caps_and_the_unpriced_refusal_on_a_shared_ledger(pg_ledger_url: str) -> None:
    prices = Prices(input_pusd=1_000_000, output_pusd=2_000_000, cached_input_pusd=500_000)  # $1 and $2 per 1M
    async with replicas(pg_ledger_url, 1) as (a,):
        record, plaintext = await a.create_key("k", "acct", Caps(balance_usd=1_000_000))
        key = a.authenticate(headers(plaintext))
        with pytest.raises(ApiError) as unpriced:
            await a.reserve(key, Estimate(10, 10), "r", "m", prices=None)
        assert unpriced.value.status == 403 and unpriced.value.code == "model_not_priced"
        hold = await a.reserve(key, Estimate(10, 10), "r", "m", prices=prices)
        assert hold.amount_usd == 30  # 10 x 1 + 10 x 2 micro-USD
        await a.settle(hold, 15, 25)
        await a.shared.admission.heartbeat()
        usage = await a.usage("key", record.id)
        assert usage["spent_micro_usd"] == 25 and usage["remaining"]["balance_micro_usd"] == 1_000_000 - 25


async def test_recent_and_spend_read_the_shared_ledger(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps())
        await eventually(lambda: record.id in b.keys)
        hold = await b.reserve(b.authenticate(headers(plaintext)), Estimate(5, 5), "req-1", "llama", "client-1")
        await b.settle(hold, 7)
        await b.shared.admission.heartbeat()
        (row,) = await a.recent(record.id)
        assert row["request_id"] == "req-1" and row["client_request_id"] == "client-1" and row["charged_tokens"] == 7
        spend = await a.spend("key", record.id)
        assert spend["by_model"] == [{"model": "llama", "requests": 1, "tokens": 7, "micro_usd": 0, "usd": 0.0}]
        assert math.isclose(sum(d["tokens"] for d in spend["by_day"]), 7)


async def test_window_and_period_refusals_on_a_shared_ledger_say_when_to_retry(pg_ledger_url: str) -> None:
    from cortex.budget.periods import PeriodSpec

    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps(window_tokens=100, window_s=30.0))
        await eventually(lambda: record.id in b.keys)
        hold = await a.reserve(a.authenticate(headers(plaintext)), Estimate(30, 30), "r1", "m")
        await a.settle(hold, 60)
        await a.shared.admission.heartbeat()
        with pytest.raises(ApiError) as refused:
            await b.reserve(b.authenticate(headers(plaintext)), Estimate(30, 30), "r2", "m")
        err = refused.value
        assert err.status == 429 and err.code == "rate_limit_exceeded"
        wait_ms = int(dict(err.headers)[b"retry-after-ms"])
        # When the first charge's bucket leaves the window: conservative by at most one bucket (window / 64).
        assert 0 < wait_ms <= 30_000 * (1 + 1 / 64) + 5
        usage = await b.usage("key", record.id)
        assert usage["window_used_tokens"] == 60 and usage["remaining"]["window_tokens"] == 40

        await a.set_caps("account", "acct", Caps(period=PeriodSpec("daily", "UTC"), period_tokens=70))
        with pytest.raises(ApiError) as period:  # the period's usage is summed from the ledger: 60 of 70 used
            await b.reserve(b.authenticate(headers(plaintext)), Estimate(5, 10), "r3", "m")
        assert period.value.status == 429 and b"retry-after" in dict(period.value.headers)
        account = await b.usage("account", "acct")
        assert account["period"]["used_tokens"] == 60 and account["remaining"]["period_tokens"] == 10


async def test_an_alert_crossing_seen_by_two_replicas_fires_once(pg_ledger_url: str) -> None:
    from cortex.budget.alerts import parse_alert_rules

    rules = parse_alert_rules([{"url": "http://127.0.0.1:9/hook", "name": "ops", "thresholds": [0.5]}], {})
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps(balance_tokens=100))
        await eventually(lambda: record.id in b.keys)
        for s in (a, b):
            await s.start_alerts(rules)  # no sender started: the outbox keeps what fires
        async with trio.open_nursery() as nursery:
            for s in (a, b):
                nursery.start_soon(s.evaluate_alerts_forever)
            holds = [await s.reserve(s.authenticate(headers(plaintext)), Estimate(15, 15), f"r{i}", "m")
                     for i, s in enumerate((a, b))]
            for s, h in zip((a, b), holds):
                await s.settle(h, 30)  # 60 of 100: both replicas see the key past 0.5
            for s in (a, b):
                await s.shared.admission.heartbeat()
                s._alert_dirty.update({("key", record.id)})
                s._alert_dirty_event.set()
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        events = await a.shared.run(lambda conn: conn.execute(
            "SELECT rule_id, body FROM alert_outbox ORDER BY seq").fetchall())
        key_events = [e for e in events if b'"kind":"key"' in bytes(e["body"])]
        assert len(key_events) == 1, events


async def test_a_key_made_a_moment_ago_elsewhere_is_found_in_the_ledger_and_bad_keys_are_looked_up_once(
    pg_ledger_url: str,
) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", None, Caps())
        b.keys.pop(record.id, None)  # as if b had not heard of it yet: only the ledger can tell it
        b._by_hash.pop(record.key_hash, None)
        assert (await b.authenticate_async(headers(plaintext))).id == record.id
        lookups = []
        real = b.shared.key_id_by_hash

        async def counted(digest: bytes) -> str | None:
            lookups.append(digest)
            return await real(digest)

        b.shared.key_id_by_hash = counted
        for _ in range(5):
            with pytest.raises(ApiError) as refused:
                await b.authenticate_async(headers("sk-cortex-not-a-key"))
            assert refused.value.status == 401
        assert len(lookups) == 1  # a flood of one bad key costs one lookup a second


async def test_an_incremental_hold_grows_on_the_shared_ledger_and_a_revocation_stops_it(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2, output_holds="incremental") as (a, b):
        record, plaintext = await a.create_key("k", "acct", Caps(balance_tokens=200, max_concurrency=1))
        key = a.authenticate(headers(plaintext))
        assert a.output_holds(key) == "incremental"
        hold = await a.reserve(key, Estimate(20, 50), "r1", "m")
        grown = await a.extend(hold, 100)
        assert isinstance(grown, Hold) and grown.amount_tokens == 170
        refused = await a.extend(grown, 31)
        assert isinstance(refused, Refusal) and refused.reason == "balance"
        await b.revoke(record.id)
        await eventually(lambda: a.keys[record.id].revoked_at is not None)
        stopped = await a.extend(grown, 1)
        assert isinstance(stopped, Refusal) and stopped.reason == "revoked"
        await a.settle(grown, 190)
        await a.shared.admission.heartbeat()
        (row,) = await a.shared.run(lambda conn: conn.execute("SELECT amount_tokens, charged_tokens FROM holds").fetchall())
        assert row == {"amount_tokens": 170, "charged_tokens": 170}
        conn_rows = await a.shared.run(lambda conn: conn.execute(INVARIANT_SQL).fetchall())
        assert conn_rows == []


async def test_a_ledger_that_fails_a_reserve_is_a_503_and_the_hold_is_released_if_it_was_placed(pg_ledger_url: str) -> None:
    from cortex.budget.store import StoreError

    async with replicas(pg_ledger_url, 1) as (a,):
        record, plaintext = await a.create_key("k", None, Caps(balance_tokens=100))
        released: list[str] = []

        async def failing(req):
            raise StoreError("connection lost")

        a.shared.reserve = failing
        real_soon = a.shared.resolve_soon
        a.shared.resolve_soon = lambda res: (released.append((res.hold_id, res.state)), real_soon(res))
        with pytest.raises(ApiError) as unavailable:
            await a.reserve(a.authenticate(headers(plaintext)), Estimate(5, 5), "r", "m")
        assert unavailable.value.status == 503
        assert len(released) == 1 and released[0][1] == "released"  # a no-op if it never was placed
        assert a.open_holds() == []


async def test_a_slow_full_reread_cannot_install_a_view_older_than_a_revocation(pg_ledger_url: str) -> None:
    async with replicas(pg_ledger_url, 2) as (a, b):
        record, plaintext = await a.create_key("k", None, Caps())
        await eventually(lambda: record.id in b.keys)
        real = a.shared.read_directory
        read_once = trio.Event()

        async def slow(now, accounts, keys):
            snapshot = await real(now, accounts, keys)
            if accounts is None and not read_once.is_set():  # the full re-read: read before the revocation,
                read_once.set()
                await trio.sleep(0.5)  # installed after it, if nothing orders the installs
            return snapshot

        a.shared.read_directory = slow
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.refresh, None)
            await read_once.wait()
            await b.revoke(record.id)  # a hears of it while its full re-read is in flight
        await trio.sleep(0.3)
        assert a.keys[record.id].revoked_at is not None
        with pytest.raises(ApiError):
            a.authenticate(headers(plaintext))


async def test_the_directory_sync_survives_a_read_it_cannot_take_and_reads_again(pg_ledger_url: str) -> None:
    # A row this replica cannot read (a zone its tzdata lacks, say) must not end its sync: the next read is retried.
    async with replicas(pg_ledger_url, 2) as (a, b):
        real = b.shared.read_directory
        failed = trio.Event()

        async def once_unreadable(now, accounts, keys):
            if not failed.is_set():
                failed.set()
                raise ValueError("unknown time zone")
            return await real(now, accounts, keys)

        b.shared.read_directory = once_unreadable
        record, _ = await a.create_key("k", None, Caps())
        await failed.wait()
        await eventually(lambda: record.id in b.keys, timeout_s=5.0)
