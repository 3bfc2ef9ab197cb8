"""The durable store: group commit, isolation of bad jobs, recovery, and the pure meter."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from cortex.budget.ledger import Caps
from cortex.budget.meter import Meter
from cortex.budget.store import (
    OpenHold,
    PutAccount,
    PutKey,
    SCHEMA_VERSION,
    ResolveHold,
    StoreError,
    SyncStore,
    ThreadedStore,
    apply,
    connect,
    recover_and_load,
)


def _principals():
    return [PutAccount("acct", Caps(balance_tokens=1000), 0.0), PutKey("k", "acct", "n", b"h" * 32, "sk-cx-abcd…", Caps(), 0.0)]


async def test_concurrent_commits_share_transactions(tmp_path):
    batches: list[int] = []
    async with ThreadedStore.open(tmp_path / "l.db", "normal", lambda size, _s: batches.append(size)) as store:
        await store.commit(_principals())
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.commit, [OpenHold(f"h{i}", "k", "acct", 5, 0.0, 60.0)])
        rows = await store.query(lambda conn: conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0])
    assert rows == 200
    assert sum(batches) == 201
    assert max(batches) > 1  # group commit: one transaction served several tasks


async def test_a_bad_job_fails_alone_and_its_neighbours_commit(tmp_path):
    async with ThreadedStore.open(tmp_path / "l.db", "normal") as store:
        await store.commit(_principals())
        results: dict[str, object] = {}

        async def run(name, ops):
            try:
                await store.commit(ops)
                results[name] = "ok"
            except StoreError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "good1", [OpenHold("a", "k", "acct", 5, 0.0, 60.0)])
            nursery.start_soon(run, "bad", [ResolveHold("never-opened", "k", "acct", "settled", 1, 1, 1.0)])
            nursery.start_soon(run, "good2", [OpenHold("b", "k", "acct", 5, 0.0, 60.0)])
        ids = await store.query(lambda conn: sorted(r[0] for r in conn.execute("SELECT id FROM holds")))
    assert results["good1"] == results["good2"] == "ok"
    assert isinstance(results["bad"], StoreError)
    assert ids == ["a", "b"]


async def test_resolving_a_hold_twice_is_refused_by_the_store(tmp_path):
    store = SyncStore(connect(tmp_path / "l.db"))
    await store.commit([*_principals(), OpenHold("h", "k", "acct", 5, 0.0, 60.0)])
    await store.commit([ResolveHold("h", "k", "acct", "settled", 4, 4, 1.0)])
    with pytest.raises(StoreError, match="not open"):
        await store.commit([ResolveHold("h", "k", "acct", "released", 0, None, 2.0)])
    spent = store.conn.execute("SELECT spent_tokens FROM keys").fetchone()[0]
    assert spent == 4


def test_recovery_charges_open_holds_in_full_and_replays_window_usage(tmp_path):
    conn = connect(tmp_path / "l.db")
    with conn:
        for op in [*_principals(), OpenHold("open1", "k", "acct", 30, 0.0, 60.0), OpenHold("done", "k", "acct", 9, 0.0, 60.0)]:
            apply(conn, op)
        apply(conn, ResolveHold("done", "k", "acct", "settled", 7, 7, 5.0))
    snapshot = recover_and_load(conn, now=10.0, horizon_s=100.0)
    assert snapshot.orphaned == [("open1", "k", 30)]
    assert conn.execute("SELECT state, charged_tokens FROM holds WHERE id = 'open1'").fetchone() == ("orphaned", 30)
    assert [row["spent_tokens"] for row in snapshot.keys] == [37]
    assert snapshot.recent_charges == [("k", 5.0, 7, 0), ("k", 10.0, 30, 0)]
    again = recover_and_load(conn, now=11.0, horizon_s=100.0)
    assert again.orphaned == []  # recovery happens once


def test_a_failed_open_reports_the_reason(tmp_path):
    (tmp_path / "dir.db").mkdir()

    async def main():
        async with ThreadedStore.open(tmp_path / "dir.db", "full"):
            pass

    with pytest.raises(StoreError, match="cannot open the ledger"):
        trio.run(main)


@pytest.mark.parametrize(
    ("meter", "expected"),
    [
        (Meter(False, 9, usage={"prompt_tokens": 9, "completion_tokens": 5}, dispatched=True), ("settle", 14)),
        (Meter(True, 9, usage={"prompt_tokens": 9, "completion_tokens": 5}, dispatched=True), ("settle", 14)),
        (Meter(True, 9, relayed_output_tokens=3, dispatched=True, client_gone=True), ("settle", 12)),
        (Meter(True, 9, relayed_output_tokens=3, dispatched=True), ("settle", 12)),
        (Meter(True, 9, dispatched=True, client_gone=True), ("settle", 9)),
        (Meter(True, 9, dispatched=True), ("release", 0)),
        (Meter(True, 9), ("release", 0)),
        (Meter(False, 9, client_gone=True), ("release", 0)),
        (Meter(False, 9, dispatched=True, client_gone=True), ("charge_hold", 0)),
        (Meter(False, 9, dispatched=True), ("release", 0)),
        (Meter(False, 9, usage={"prompt_tokens": "x"}, dispatched=True, client_gone=True), ("charge_hold", 0)),
        # Upstream counts that are missing, malformed or below what was relayed (hardening #3).
        (Meter(False, 9, usage=12.0, relayed_output_tokens=5, dispatched=True, responded=True), ("settle", 14)),
        (Meter(False, 9, usage="lots", relayed_output_tokens=5, dispatched=True, responded=True), ("settle", 14)),
        (Meter(False, 9, usage=[1, 2], relayed_output_tokens=0, dispatched=True, responded=True), ("settle", 9)),
        (Meter(True, 9, usage={"prompt_tokens": 9, "completion_tokens": 0}, relayed_output_tokens=20, dispatched=True),
         ("settle", 29)),
        (Meter(True, 9, usage={"prompt_tokens": 9, "completion_tokens": 1.5}, relayed_output_tokens=4, dispatched=True),
         ("settle", 13)),
        (Meter(True, 9, usage={"prompt_tokens": True, "completion_tokens": 3}, relayed_output_tokens=4, dispatched=True),
         ("settle", 13)),
        (Meter(True, 9, usage={"prompt_tokens": 7, "completion_tokens": 30}, relayed_output_tokens=20, dispatched=True),
         ("settle", 37)),
    ],
    ids=[
        "whole-usage", "stream-usage-frame", "stream-disconnect", "stream-broke-mid", "stream-disconnect-before-token",
        "stream-broke-before-token", "never-dispatched", "left-before-dispatch", "whole-disconnect", "whole-upstream-failed",
        "malformed-usage", "float-usage", "string-usage", "list-usage", "zero-usage-below-relayed", "float-count",
        "bool-count", "upstream-above-relayed",
    ],
)
def test_meter_settlement_rules(meter, expected):
    decision = meter.settlement()
    assert (decision.action, decision.tokens) == expected


@pytest.mark.parametrize(
    ("meter", "reason"),
    [
        (Meter(True, 9, usage={"prompt_tokens": 9, "completion_tokens": 0}, relayed_output_tokens=20, dispatched=True),
         "below_relayed"),
        (Meter(False, 9, usage=3.5, dispatched=True, responded=True), "malformed"),
        (Meter(True, 9, relayed_output_tokens=3, dispatched=True, completed=True), "missing"),
        (Meter(True, 9, relayed_output_tokens=3, dispatched=True), None),  # broke mid-stream: no usage expected
        (Meter(True, 9, usage={"prompt_tokens": 9, "completion_tokens": 3}, relayed_output_tokens=3, dispatched=True), None),
    ],
    ids=["below-relayed", "malformed", "missing-on-complete", "missing-on-broken", "agrees"],
)
def test_meter_names_each_disagreement_with_the_upstream(meter, reason):
    assert meter.settlement().disagreement == reason


async def test_deferred_ops_land_before_later_durable_ones_and_on_close(tmp_path):
    path = tmp_path / "l.db"
    async with ThreadedStore.open(path, "normal") as store:
        await store.commit([*_principals(), OpenHold("h1", "k", "acct", 5, 0.0, 60.0), OpenHold("h2", "k", "acct", 5, 0.0, 60.0)])
        await store.commit([ResolveHold("h1", "k", "acct", "settled", 4, 4, 1.0)], durable=False)
        # A durable op queued later carries the deferred one first.
        await store.commit([OpenHold("h3", "k", "acct", 5, 0.0, 60.0)])
        assert await store.query(lambda c: c.execute("SELECT state FROM holds WHERE id = 'h1'").fetchone()[0]) == "settled"
        await store.commit([ResolveHold("h2", "k", "acct", "released", 0, None, 2.0)], durable=False)
        await trio.sleep(0.2)  # the flush timer writes it without help
        assert await store.query(lambda c: c.execute("SELECT state FROM holds WHERE id = 'h2'").fetchone()[0]) == "released"
        await store.commit([ResolveHold("h3", "k", "acct", "settled", 5, 5, 3.0)], durable=False)
    # Closing flushed the last deferred op.
    conn = connect(path)
    assert conn.execute("SELECT state FROM holds WHERE id = 'h3'").fetchone()[0] == "settled"
    assert conn.execute("SELECT spent_tokens FROM keys").fetchone()[0] == 9


def test_a_version_1_ledger_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE holds (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, account_id TEXT NOT NULL,"
        " amount_tokens INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL,"
        " charged_tokens INTEGER NOT NULL DEFAULT 0, actual_tokens INTEGER, resolved_at REAL, request_id TEXT, model TEXT);"
        "INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, request_id)"
        " VALUES ('h1', 'k', 'a', 5, 1, 2, 'settled', 'r1');"
    )
    old.commit()
    old.close()
    conn = connect(path)
    assert conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT id, request_id, client_request_id FROM holds").fetchall() == [("h1", "r1", None)]
