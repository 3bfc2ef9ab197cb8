"""The ledger's schema migrations: v2 (token caps only) to v3 (money, periods, alerts), whole or not at all."""

from __future__ import annotations

import sqlite3

import pytest

from cortex.budget import store as store_mod
from cortex.budget.store import SCHEMA_VERSION, StoreError, connect, recover_and_load

# The schema as release v2 wrote it (cortex/budget/store.py at schema_version 2).
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    balance_tokens INTEGER, window_tokens INTEGER, window_s REAL, max_concurrency INTEGER,
    spent_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    balance_tokens INTEGER, window_tokens INTEGER, window_s REAL, max_concurrency INTEGER,
    spent_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    amount_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    charged_tokens INTEGER NOT NULL DEFAULT 0,
    actual_tokens INTEGER,
    resolved_at REAL,
    request_id TEXT,  -- cortex's own id, unique per request
    model TEXT,
    client_request_id TEXT  -- the client's x-request-id, if it sent one; not unique
);
CREATE INDEX IF NOT EXISTS holds_open ON holds(state) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS holds_resolved_at ON holds(resolved_at);
CREATE INDEX IF NOT EXISTS holds_key_created ON holds(key_id, created_at);
"""


def _v2_ledger(path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V2_SCHEMA)
    with conn:
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        conn.execute("INSERT INTO accounts (id, created_at, balance_tokens, spent_tokens) VALUES ('team', 1.0, 1000, 70)")
        conn.execute(
            "INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, window_tokens, window_s, spent_tokens)"
            " VALUES ('key_a', 'team', 'a', x'01', 'sk-', 1.0, 500, 60.0, 70)"
        )
        conn.execute(
            "INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, charged_tokens,"
            " resolved_at) VALUES ('h1', 'key_a', 'team', 80, 5.0, 600.0, 'settled', 70, 6.0)"
        )
        conn.execute(
            "INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state)"
            " VALUES ('h2', 'key_a', 'team', 40, 7.0, 600.0, 'open')"
        )
    conn.close()


def test_a_v2_ledger_migrates_to_v3_keeping_spend_and_recovering_open_holds(tmp_path):
    path = tmp_path / "ledger.db"
    _v2_ledger(path)
    conn = connect(path)
    assert conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == SCHEMA_VERSION
    snapshot = recover_and_load(conn, now=10.0, horizon_s=3600.0)
    key = snapshot.keys[0]
    assert (key["spent_tokens"], key["window_tokens"], key["spent_usd"], key["balance_usd"]) == (110, 500, 0, None)
    assert snapshot.orphaned == [("h2", "key_a", 40)]
    assert snapshot.recent_charges == [("key_a", 6.0, 70, 0), ("key_a", 10.0, 40, 0)]
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"alert_state", "alert_outbox"}


def test_a_migration_that_fails_part_way_leaves_the_old_version_whole(tmp_path, monkeypatch):
    path = tmp_path / "ledger.db"
    _v2_ledger(path)
    broken = (*store_mod.MIGRATIONS["2"], "ALTER TABLE no_such_table ADD COLUMN x INTEGER")
    monkeypatch.setitem(store_mod.MIGRATIONS, "2", broken)
    with pytest.raises(sqlite3.OperationalError):
        connect(path)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == "2"
    assert "balance_usd" not in {row[1] for row in raw.execute("PRAGMA table_info(accounts)")}  # rolled back
    raw.close()
    monkeypatch.undo()
    conn = connect(path)  # the real migration now runs from the start
    assert conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == SCHEMA_VERSION


def test_a_ledger_from_a_newer_cortex_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    connect(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE meta SET v = '99' WHERE k = 'schema_version'")
    raw.close()
    with pytest.raises(StoreError, match="99"):
        connect(path)
