#!/usr/bin/env python3
"""Measure design (b) of issue 13, escrow leases, against design (a), the batched conditional update, on PostgreSQL.

A benchmark-only PROTOTYPE of (b), written here and not in cortex/, run
against cortex's (a) (`PgLedger.step`, one `cortex_batch` per group commit)
on the same durable server in the same run. The question the issue left
open: "Measure both and choose on the figures."

The prototype of (b)
--------------------
Each replica leases a slice of the cap's headroom in ONE transaction
(`escrow_lease`, PL/pgSQL, below) and admits locally against it:
  * The lease. Principals are cortex's own `accounts` and `keys` rows with one
    more column, `leased_tokens`; a lease is a row of `escrow_leases` (its
    replica, its amount, a deadline). `escrow_lease` reports what the
    replica's settled holds consumed since its last report (spent += consumed,
    leased -= consumed), takes back what it returns, and grants a new slice
    with the conditional write-back `... WHERE spent + held + leased + grant
    <= cap` on the account and the key (the same guard as cortex_batch's), in
    cortex's lock order (the lease row, then the account, then the key).
  * Slice sizing: k x recent demand, capped by a fraction of what is left:
    grant = min(LEASE_BATCHES x the batch's demand, LEASE_FRACTION x the
    unleased headroom), and no grant at all when that is less than one batch's
    demand: that is "near the cap".
  * Local admission: a reserve fits when the replica's unused slice covers its
    estimate (integers in memory, under the replica's one writer: no lock).
    Settling at actual usage returns estimate - actual to the slice.
  * The fall-back to (a) near the cap: what the slice does not cover goes to
    `escrow_direct`, a conditional update straight on the principal rows
    (held += n x amount WHERE spent + held + leased + n x amount <= cap, and
    the holds inserted as rows), one transaction per batch, with the earlier
    fall-back holds' settlements, the lease's consumption report and the
    slice's last fragment riding along. So no request is refused while
    UNLEASED headroom remains; one can be refused while another replica still
    has UNUSED slice, which is what scenario 2 counts.
  * Durable before dispatch, three ways (all measured):
      b/sqlite  each batch's local holds (and the previous batch's
                settlements, riding along) in ONE local SQLite transaction,
                WAL, synchronous=FULL (fsync per commit, as PostgreSQL's fsync
                and synchronous_commit here), in cortex's own SQLite holds
                table (cortex/budget/store.py's schema and indexes) plus a
                lease id: the honest minimum, no network round trip.
                A replica restarted on its host replays them (open holds
                charged in full, the rest of its lease returned); a host
                that is gone takes its log with it, and another replica's
                reaper can only charge the whole lease.
      b/pg      each batch's holds and settlements as ONE PostgreSQL
                statement on cortex's `holds` table (its indexes), no
                principal row touched: one transaction and one round trip
                per batch, as in (a), but without the contended rows. Any
                reaper can then resolve a dead replica's holds exactly.
      b/none    no per-request durability at all, only the lease (a crash
                charges the whole lease): a REFERENCE, it does not meet
                "durable before dispatch"; it shows what durability costs.
  * Crash: `escrow_reap` charges a lapsed lease in full (self-checked at start).

The workload (the issue's): one key and one account, shared by every
replica (the worst case), concurrency 256 per replica in a closed loop
with no upstream time: every in-flight request is in each group commit, so
each step settles the previous step's 256 holds at 120 tokens and reserves
256 new ones at 160. Replicas are PROCESSES (no shared GIL), 1, 2 and 3.

Scenario 1, throughput: durable reserve+settle pairs/s, database
transactions and round trips per admitted request (PostgreSQL's, and the
local SQLite commits separately), with the server's xact_commit count as a
cross-check of the client's.

Scenario 2, the cap exhausted: account and key capped at `--cap` tokens;
the busy replicas' populations of requests together ask twice what the cap
admits; each request is tried once (admitted, or refused: its client
leaves). Counted: admitted, refused, and refused WHILE HEADROOM REMAINED,
i.e. a refusal by the fall-back while the refusing replica's fragment, the
other replicas' unused slices and the unleased headroom would have covered
it (each replica publishes its unused slice in shared memory after every
step; read at the refusal, so up to one step stale). Under (a) that count
is 0 by construction: one judge, which refuses only when cap - spent -
held < amount. Two demands: all replicas busy; and 'idle holder', where
replica 0 asks a tenth as much as each other replica and then idles,
keeping its lease until they are done (no idle-return timer).

Usage
-----
    python scripts/bench_escrow.py            # 3 s per point, 3 rounds (~4-5 min on 2 cores)
    python scripts/bench_escrow.py --quick    # 1 s per point, 1 round (~1-1.5 min)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402

from cortex.budget import pg_schema  # noqa: E402
from cortex.budget import store as sqlite_store  # noqa: E402
from cortex.budget.pg_ledger import Hold, PgLedger, Reserve, Resolve  # noqa: E402
from tests import postgres as pgfix  # noqa: E402

CONCURRENCY = 256  # per replica; with no upstream time every in-flight request is in each group commit
REPLICAS = (1, 2, 3)
DESIGNS = ("a", "b/sqlite", "b/pg", "b/none")
ESTIMATE_TOKENS = 160
ACTUAL_TOKENS = 120
TTL_S = 600.0
LEASE_S = 30.0
LEASE_BATCHES = 16  # a slice is this many batches of demand ...
LEASE_FRACTION = 0.25  # ... but at most this share of the unleased headroom
UNCAPPED = 10**15
EXHAUST_CAP = 1_000_000  # tokens: about 8,300 requests at 120
QUICK_EXHAUST_CAP = 500_000
EXHAUST_DEMAND = 2.0  # the replicas' populations together ask this multiple of what the cap admits
EXHAUST_POINTS = ((False, 1), (False, 2), (False, 3), (True, 2), (True, 3))  # (idle holder?, replicas)
IDLE_SHARE = 10  # scenario 2, idle holder: replica 0 asks this many times less than each other replica
EXHAUST_DESIGNS = ("a", "b/sqlite")  # the (b) variants share the lease arithmetic: one is enough
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}  # as bench_pg_ledger.py
STATS_FLUSH_S = 0.6  # a backend's statistics reach pg_stat_database when it exits
BARRIER_TIMEOUT_S = 120.0
BIG = 4611686018427387903  # "no cap" inside the escrow functions

# --- the prototype's schema: cortex's ledger (migrated) plus leases -----------------------------

ESCROW_DDL = (
    "ALTER TABLE accounts ADD COLUMN leased_tokens BIGINT NOT NULL DEFAULT 0 CHECK (leased_tokens >= 0)",
    "ALTER TABLE keys ADD COLUMN leased_tokens BIGINT NOT NULL DEFAULT 0 CHECK (leased_tokens >= 0)",
    "ALTER TABLE holds ADD COLUMN lease_id TEXT",  # NULL: a fall-back hold, on the principal rows
    """CREATE TABLE escrow_leases (
    id TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    amount_tokens BIGINT NOT NULL CHECK (amount_tokens >= 0),  -- leased and not yet reported as consumed
    lease_deadline DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'reaped'))
)""",
    r"""CREATE FUNCTION escrow_room(p_key TEXT, p_account TEXT) RETURNS BIGINT LANGUAGE sql STABLE AS $$
    SELECT LEAST(
        (SELECT COALESCE(balance_tokens, 4611686018427387903) - spent_tokens - held_tokens - leased_tokens
           FROM accounts WHERE id = p_account),
        (SELECT COALESCE(balance_tokens, 4611686018427387903) - spent_tokens - held_tokens - leased_tokens
           FROM keys WHERE id = p_key))
$$""",
    # Move `delta_*` on the account and the key; the write-back guard re-checks the cap on the locked rows.
    r"""CREATE FUNCTION escrow_move(p_key TEXT, p_account TEXT, d_spent BIGINT, d_held BIGINT, d_leased BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE n INTEGER;
BEGIN
    UPDATE accounts SET spent_tokens = spent_tokens + d_spent, held_tokens = held_tokens + d_held,
                        leased_tokens = leased_tokens + d_leased
     WHERE id = p_account
       AND spent_tokens + held_tokens + leased_tokens + d_spent + d_held + d_leased
           <= COALESCE(balance_tokens, 4611686018427387903) + GREATEST(0, -(d_spent + d_held + d_leased));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> 1 THEN RAISE EXCEPTION 'escrow: the account % would overshoot its cap', p_account; END IF;
    UPDATE keys SET spent_tokens = spent_tokens + d_spent, held_tokens = held_tokens + d_held,
                    leased_tokens = leased_tokens + d_leased
     WHERE id = p_key
       AND spent_tokens + held_tokens + leased_tokens + d_spent + d_held + d_leased
           <= COALESCE(balance_tokens, 4611686018427387903) + GREATEST(0, -(d_spent + d_held + d_leased));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> 1 THEN RAISE EXCEPTION 'escrow: the key % would overshoot its cap', p_key; END IF;
END $$""",
    # One lease transaction: report consumption, return, and maybe grant a new slice. Near the cap (no grant),
    # the replica also gives back `p_spare`, its unused slice: from then on the one judge, (a), decides.
    r"""CREATE FUNCTION escrow_lease(
    p_lease TEXT, p_replica TEXT, p_key TEXT, p_account TEXT, p_consumed BIGINT, p_returned BIGINT, p_spare BIGINT,
    p_want BIGINT, p_min BIGINT, p_fraction DOUBLE PRECISION, p_now DOUBLE PRECISION, p_lease_s DOUBLE PRECISION
) RETURNS TABLE (o_granted BIGINT, o_returned BIGINT, o_unleased BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    v_amount BIGINT; v_room BIGINT; v_grant BIGINT := 0; v_returned BIGINT := p_returned;
BEGIN
    INSERT INTO escrow_leases VALUES (p_lease, p_replica, p_key, p_account, 0, p_now + p_lease_s, 'open')
        ON CONFLICT (id) DO NOTHING;
    -- lock order: the lease (a hold-like row), then the account, then the key
    SELECT amount_tokens INTO v_amount FROM escrow_leases WHERE id = p_lease AND state = 'open' FOR UPDATE;
    IF NOT FOUND THEN RAISE EXCEPTION 'escrow: lease % is not open (reaped?)', p_lease; END IF;
    IF LEAST(p_consumed, p_returned, p_spare) < 0 OR p_consumed + p_returned + p_spare > v_amount THEN
        RAISE EXCEPTION 'escrow: lease % has % tokens, reported % + % + %', p_lease, v_amount, p_consumed,
            p_returned, p_spare;
    END IF;
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    PERFORM 1 FROM keys WHERE id = p_key FOR UPDATE;
    v_room := escrow_room(p_key, p_account) + v_returned;  -- consumption moves leased to spent: room unchanged
    IF p_want > 0 THEN
        v_grant := LEAST(p_want, floor(p_fraction * GREATEST(v_room, 0))::BIGINT);
        IF v_grant < p_min THEN  -- near the cap: no slice, give the spare back, fall back to (a)
            v_grant := 0; v_returned := v_returned + p_spare; v_room := v_room + p_spare;
        END IF;
    END IF;
    PERFORM escrow_move(p_key, p_account, p_consumed, 0, v_grant - p_consumed - v_returned);
    UPDATE escrow_leases SET amount_tokens = amount_tokens - p_consumed - v_returned + v_grant,
                             lease_deadline = p_now + p_lease_s
     WHERE id = p_lease;
    o_granted := v_grant; o_returned := v_returned; o_unleased := v_room - v_grant;
    RETURN NEXT;
END $$""",
    # The fall-back, design (a) in miniature: settle earlier direct holds, admit as many new ones as fit. The
    # replica's lease reports its consumption and returns its unused slice in the same transaction: near the cap
    # every token not in a hold is back in the pool, where the one judge sees it.
    r"""CREATE FUNCTION escrow_direct(
    p_replica TEXT, p_key TEXT, p_account TEXT, p_lease TEXT, p_consumed BIGINT, p_returned BIGINT,
    p_settle TEXT[], p_actual BIGINT, p_new TEXT[], p_amount BIGINT,
    p_now DOUBLE PRECISION, p_ttl_s DOUBLE PRECISION, p_lease_s DOUBLE PRECISION
) RETURNS TABLE (o_admitted INTEGER, o_unleased BIGINT) LANGUAGE plpgsql AS $$
DECLARE v_freed BIGINT; v_charged BIGINT; v_room BIGINT; v_k INTEGER; v_give BIGINT := p_consumed + p_returned;
BEGIN
    -- lock order: holds, the lease, then the account, then the key
    WITH s AS (
        UPDATE holds h SET state = 'settled', charged_tokens = LEAST(p_actual, h.amount_tokens),
                           actual_tokens = p_actual, resolved_at = p_now
          FROM unnest(p_settle) AS u(id)
         WHERE h.id = u.id AND h.state = 'open' AND h.lease_id IS NULL
        RETURNING h.amount_tokens AS amount, LEAST(p_actual, h.amount_tokens) AS charged)
    SELECT COALESCE(sum(amount), 0), COALESCE(sum(charged), 0) INTO v_freed, v_charged FROM s;
    IF v_give > 0 THEN
        UPDATE escrow_leases SET amount_tokens = amount_tokens - v_give, lease_deadline = p_now + p_lease_s
         WHERE id = p_lease AND state = 'open' AND amount_tokens >= v_give AND LEAST(p_consumed, p_returned) >= 0;
        IF NOT FOUND THEN RAISE EXCEPTION 'escrow: lease % cannot give back % + %', p_lease, p_consumed, p_returned;
        END IF;
    END IF;
    PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE;
    PERFORM 1 FROM keys WHERE id = p_key FOR UPDATE;
    v_room := escrow_room(p_key, p_account) + v_freed - v_charged + p_returned;
    v_k := LEAST(COALESCE(cardinality(p_new), 0), GREATEST(v_room, 0) / p_amount);
    PERFORM escrow_move(p_key, p_account, v_charged + p_consumed, v_k * p_amount - v_freed, -v_give);
    IF v_k > 0 THEN
        INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, replica_id,
                           lease_deadline)
        SELECT id, p_key, p_account, p_amount, p_now, p_now + p_ttl_s, 'open', p_replica, p_now + p_lease_s
          FROM unnest(p_new[1:v_k]) AS id;
    END IF;
    o_admitted := v_k; o_unleased := v_room - v_k * p_amount;
    RETURN NEXT;
END $$""",
    # A dead replica's lapsed leases return to the pool charged in full (its holds are within them).
    r"""CREATE FUNCTION escrow_reap(p_now DOUBLE PRECISION) RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE l RECORD; n INTEGER := 0;
BEGIN
    FOR l IN SELECT * FROM escrow_leases WHERE state = 'open' AND lease_deadline < p_now
             ORDER BY id FOR UPDATE SKIP LOCKED LOOP
        PERFORM 1 FROM accounts WHERE id = l.account_id FOR UPDATE;
        PERFORM 1 FROM keys WHERE id = l.key_id FOR UPDATE;
        PERFORM escrow_move(l.key_id, l.account_id, l.amount_tokens, 0, -l.amount_tokens);
        UPDATE escrow_leases SET state = 'reaped', amount_tokens = 0 WHERE id = l.id;
        n := n + 1;
    END LOOP;
    RETURN n;
END $$""",
)

LEASE_SQL = ("SELECT o_granted, o_returned, o_unleased"
             " FROM escrow_lease(%s, %s, 'bench', 'team', %s, %s, %s, %s, %s, %s, %s, %s)")
DIRECT_SQL = ("SELECT o_admitted, o_unleased FROM escrow_direct(%s, 'bench', 'team', %s, %s, %s, %b::text[], %s,"
              " %b::text[], %s, %s, %s, %s)")
# b/pg: one statement per batch on cortex's holds table; no principal row is touched.
PG_HOLDS_SQL = """
WITH s AS (
    UPDATE holds h SET state = 'settled', charged_tokens = LEAST(%(actual)s::bigint, h.amount_tokens),
                       actual_tokens = %(actual)s::bigint, resolved_at = %(now)s::float8
      FROM unnest(%(settle)b::text[]) AS u(id)
     WHERE h.id = u.id AND h.state = 'open'
    RETURNING 1),
i AS (
    INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, replica_id,
                       lease_deadline, lease_id)
    SELECT id, 'bench', 'team', %(amount)s, %(now)s, %(now)s + %(ttl)s, 'open', %(replica)s, %(now)s + %(lease_s)s,
           %(lease)s
      FROM unnest(%(new)b::text[]) AS id
    RETURNING 1)
SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM i)
"""
# b/sqlite: cortex's SQLite holds table (store.py's schema and indexes), plus the lease a hold is under.
LOCAL_DDL = (
    "ALTER TABLE holds ADD COLUMN lease_id TEXT",
    "CREATE TABLE IF NOT EXISTS escrow_lease_log (id TEXT PRIMARY KEY, consumed_unreported INTEGER NOT NULL)",
)
LOCAL_INSERT = ("INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, request_id,"
                " model, client_request_id, amount_usd, lease_id) VALUES (?, 'bench', 'team', ?, ?, ?, 'open', ?, NULL,"
                " NULL, 0, ?)")
LOCAL_SETTLE = ("UPDATE holds SET state = 'settled', charged_tokens = ?, actual_tokens = ?, resolved_at = ?,"
                " charged_usd = 0 WHERE id = ? AND state = 'open'")
LOCAL_CONSUMED = "UPDATE escrow_lease_log SET consumed_unreported = ? WHERE id = ?"


# --- the server and the databases ---------------------------------------------------------------


def start_server() -> pgfix.PgServer:
    """bench_pg_ledger.py's start-up (copied, since that module imports bench_ledger's whole service stack)."""
    bindir, why = pgfix.find_bindir(os.environ)
    if bindir is None:
        sys.exit(f"no PostgreSQL: {why}")
    pgfix.SERVER_SETTINGS = {**pgfix.SERVER_SETTINGS, **DURABLE}
    server = pgfix.PgServer.start(bindir, os.environ)
    os.environ.update(server.env)
    return server


def fresh_ledger(server: pgfix.PgServer, design: str, cap: int) -> str:
    """A fresh database with cortex's schema, one account and one key capped at `cap`; (b) adds the escrow."""
    url = server.url(server.create_database())
    with pg_schema.connect(url) as conn:
        pg_schema.migrate(conn)
        conn.execute("INSERT INTO accounts (id, created_at, balance_tokens) VALUES ('team', 0, %s)", (cap,))
        conn.execute("INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, balance_tokens)"
                     " VALUES ('bench', 'team', 'bench', 'x', 'sk', 0, %s)", (cap,))
        if design != "a":
            with conn.transaction():
                for ddl in ESCROW_DDL:
                    conn.execute(ddl)
    return url


def server_commits(url: str) -> int:
    with pg_schema.connect(url) as conn:
        sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        return int(conn.execute(sql).fetchone()[0])


def postgres_cpu_s(server: pgfix.PgServer) -> float:
    """CPU seconds (user + system) of the postmaster, of its live children, and of the children it has reaped.

    The postmaster's cutime/cstime hold what its exited children (backends, autovacuum workers) used, so a
    process that exits between two readings moves from one term to the other instead of vanishing.
    """
    assert server.process is not None
    root, tick, total = server.process.pid, os.sysconf("SC_CLK_TCK"), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # fields[1]: ppid; [11:15]: utime stime cutime cstime
        except OSError:
            continue
        if int(entry) == root:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == root:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def principals(url: str, design: str) -> list[tuple[int, int, int]]:
    """(spent, held, leased) of the account and the key."""
    leased = "leased_tokens" if design != "a" else "0"
    with pg_schema.connect(url) as conn:
        return [tuple(r) for r in conn.execute(
            f"SELECT spent_tokens, held_tokens, {leased} FROM accounts UNION ALL"
            f" SELECT spent_tokens, held_tokens, {leased} FROM keys").fetchall()]


def self_check(server: pgfix.PgServer) -> None:
    """The escrow functions keep spent + held + leased <= cap, refuse past it, and a lapsed lease is reaped."""
    url = fresh_ledger(server, "b/pg", 10_000)
    with pg_schema.connect(url) as conn:
        q = conn.execute

        def lease(lid: str, consumed: int, returned: int, spare: int, want: int, minimum: int, now: float) -> Any:
            return q(LEASE_SQL, (lid, "r", consumed, returned, spare, want, minimum, 0.5, now, LEASE_S)).fetchone()

        assert lease("L1", 0, 0, 0, 8_000, 1_000, 0.0) == (5_000, 0, 5_000)  # half the headroom, not the 8,000 asked
        assert lease("L2", 0, 0, 0, 8_000, 3_000, 0.0) == (0, 0, 5_000)  # 2,500 < the minimum: near the cap
        admitted, room = q(DIRECT_SQL, ("r2", "L2", 0, 0, [], ACTUAL_TOKENS, [f"d{i}" for i in range(40)],
                                        ESTIMATE_TOKENS, 0.0, TTL_S, LEASE_S)).fetchone()
        assert (admitted, room) == (31, 5_000 - 31 * ESTIMATE_TOKENS), (admitted, room)  # the fall-back fills it
        admitted, room = q(DIRECT_SQL, ("r2", "L2", 0, 0, [f"d{i}" for i in range(31)], ACTUAL_TOKENS, [],
                                        ESTIMATE_TOKENS, 0.0, TTL_S, LEASE_S)).fetchone()
        assert (admitted, room) == (0, 5_000 - 31 * ACTUAL_TOKENS), (admitted, room)  # settled: 40 back each
        # L1 reports 1,200 consumed, asks for more near the cap: no grant, its 800 spare goes back to the pool.
        assert lease("L1", 1_200, 0, 800, 8_000, 3_000, 1.0) == (0, 800, 5_000 - 31 * ACTUAL_TOKENS + 800)
        assert q("SELECT escrow_reap(%s)", (LEASE_S,)).fetchone()[0] == 0  # renewed at 1.0: not lapsed yet
        assert q("SELECT escrow_reap(%s)", (LEASE_S + 2.0,)).fetchone()[0] == 2  # L1 (3,000 left) and L2 (empty)
        try:
            lease("L1", 0, 0, 0, 1_000, 1, 2.0)
            raise AssertionError("a reaped lease was renewed")
        except psycopg.errors.RaiseException:
            pass
    for spent, held, leased in principals(url, "b/pg"):
        assert (spent, held, leased) == (1_200 + 3_000 + 31 * ACTUAL_TOKENS, 0, 0), (spent, held, leased)


# --- one replica, in its own process ------------------------------------------------------------


@dataclass
class Tally:
    pg_tx: int = 0  # PostgreSQL statements (each one transaction: autocommit) = round trips
    local_tx: int = 0  # local SQLite commits
    admitted: int = 0
    refused: int = 0
    refused_with_room: int = 0  # refused while others' unused slices + unleased headroom would have covered it
    settled: int = 0
    leases: int = 0  # lease transactions
    direct_tx: int = 0  # fall-back (a) transactions
    cpu_s: float = 0.0  # the replica process's own CPU time

    def minus(self, other: "Tally") -> "Tally":
        return Tally(**{k: v - getattr(other, k) for k, v in vars(self).items()})


class ReplicaA:
    """Design (a): cortex's PgLedger.step, one cortex_batch per group commit (as bench_pg_ledger.py)."""

    def __init__(self, url: str, replica_id: str) -> None:
        self.ledger = PgLedger(pg_schema.connect(url), replica_id, LEASE_S)
        self.open: list[str] = []
        self.t = Tally()

    def step(self, n_new: int) -> None:
        reserves = [Reserve(uuid.uuid4().hex, "bench", ESTIMATE_TOKENS, TTL_S) for _ in range(n_new)]
        settles = [Resolve(h, "settled", ACTUAL_TOKENS) for h in self.open]
        done, placed = self.ledger.step(settles, reserves, time.time())
        assert all(done)
        self.open = [p.id for p in placed if isinstance(p, Hold)]
        self.t.pg_tx = self.ledger.counters.transactions
        self.t.admitted += len(self.open)
        self.t.refused += n_new - len(self.open)
        self.t.settled += len(settles)

    def drain(self) -> None:
        while self.open:
            self.step(0)

    def finish(self) -> None:
        self.drain()
        self.ledger.conn.close()


class ReplicaB:
    """Design (b): a leased slice, local admission, per-batch durability `durability`, the fall-back to (a)."""

    def __init__(self, url: str, replica_id: str, durability: str, local_path: Path | None, index: int,
                 unused: Any) -> None:
        assert durability in ("sqlite", "pg", "none")
        self.conn = pg_schema.connect(url)
        self.replica_id = replica_id
        self.lease_id = f"{replica_id}-lease"
        self.durability = durability
        self.index = index
        self.unused = unused  # shared: every replica's unused slice, for counting refusals with room elsewhere
        self.leased = 0  # the lease's amount as the database has it
        self.free = 0  # the unused slice: leased - consumed - pending - held locally
        self.consumed = 0  # charged by settled local holds, durable, not yet reported
        self.pending = 0  # charged by settled local holds whose settlement is not durable yet
        self.open_local: list[str] = []
        self.open_direct: list[str] = []
        self.unleased_hint: int | None = None  # the unleased headroom the last lease or fall-back saw
        self.t = Tally()
        self.local: sqlite3.Connection | None = None
        if durability == "sqlite":
            assert local_path is not None
            self.local = sqlite_store.connect(local_path, "full")
            self.local.isolation_level = None
            for ddl in LOCAL_DDL:
                self.local.execute(ddl)
            self.local.execute("INSERT INTO escrow_lease_log VALUES (?, 0)", (self.lease_id,))

    def _lease(self, want: int, minimum: int, returned: int = 0, spare: int = 0) -> None:
        granted, gave, unleased = self.conn.execute(LEASE_SQL, (
            self.lease_id, self.replica_id, self.consumed, returned, spare, want, minimum, LEASE_FRACTION,
            time.time(), LEASE_S)).fetchone()
        assert gave in (returned, returned + spare), (gave, returned, spare)
        self.t.pg_tx += 1
        self.t.leases += 1
        self.leased += granted - self.consumed - gave
        self.free += granted - gave
        self.consumed = 0
        self.unleased_hint = unleased

    def step(self, n_new: int) -> None:
        now = time.time()
        # The previous batch is done: settle it in memory; the slice gets estimate - actual back per hold.
        settle_local, self.open_local = self.open_local, []
        settle_direct, self.open_direct = self.open_direct, []
        self.pending += ACTUAL_TOKENS * len(settle_local)
        self.free += (ESTIMATE_TOKENS - ACTUAL_TOKENS) * len(settle_local)
        need = n_new * ESTIMATE_TOKENS
        # Lease when the slice cannot cover the batch and the pool may have a slice to give.
        if need > self.free and (self.unleased_hint is None or LEASE_FRACTION * self.unleased_hint >= need):
            self._lease(LEASE_BATCHES * need, need, spare=self.free)
        k = min(n_new, self.free // ESTIMATE_TOKENS)
        self.free -= k * ESTIMATE_TOKENS
        new_local = [uuid.uuid4().hex for _ in range(k)]
        admitted = k
        if n_new > k or settle_direct:  # the fall-back to (a), with earlier fall-back holds' settlements
            ids = [uuid.uuid4().hex for _ in range(n_new - k)]
            returned = self.free if n_new > k else 0  # near the cap: the slice's fragment goes back too
            m, unleased = self.conn.execute(DIRECT_SQL, (
                self.replica_id, self.lease_id, self.consumed, returned, settle_direct, ACTUAL_TOKENS, ids,
                ESTIMATE_TOKENS, now, TTL_S, LEASE_S)).fetchone()
            self.t.pg_tx += 1
            self.t.direct_tx += 1
            self.leased -= self.consumed + returned
            self.free -= returned
            self.consumed = 0
            self.unleased_hint = unleased
            self.open_direct = ids[:m]
            admitted += m
            refused = n_new - k - m
            if refused:
                others = sum(self.unused[j] for j in range(len(self.unused)) if j != self.index)
                self.t.refused += refused
                room = others + self.free + max(unleased, 0)  # its own slice's fragment counts too
                self.t.refused_with_room += min(refused, room // ESTIMATE_TOKENS)
        self._durable(new_local, settle_local, now)  # before "dispatch"
        # Only consumption whose settlements are durable is reported (a crash must not charge it twice).
        self.consumed += self.pending
        self.pending = 0
        self.open_local = new_local
        self.unused[self.index] = self.free
        self.t.admitted += admitted
        self.t.settled += len(settle_local) + len(settle_direct)

    def _durable(self, new: list[str], settled: list[str], now: float) -> None:
        if not new and not settled:
            return
        if self.durability == "sqlite":
            assert self.local is not None
            c = self.local
            c.execute("BEGIN IMMEDIATE")
            c.executemany(LOCAL_INSERT, [(h, ESTIMATE_TOKENS, now, now + TTL_S, h, self.lease_id) for h in new])
            c.executemany(LOCAL_SETTLE, [(ACTUAL_TOKENS, ACTUAL_TOKENS, now, h) for h in settled])
            c.execute(LOCAL_CONSUMED, (self.consumed + self.pending, self.lease_id))
            c.execute("COMMIT")
            self.t.local_tx += 1
        elif self.durability == "pg":
            s, i = self.conn.execute(PG_HOLDS_SQL, {
                "actual": ACTUAL_TOKENS, "now": now, "settle": settled, "amount": ESTIMATE_TOKENS, "ttl": TTL_S,
                "replica": self.replica_id, "lease_s": LEASE_S, "lease": self.lease_id, "new": new}).fetchone()
            assert (s, i) == (len(settled), len(new)), (s, i)
            self.t.pg_tx += 1

    def drain(self) -> None:
        while self.open_local or self.open_direct:
            self.step(0)

    def finish(self) -> None:
        self.drain()
        self._lease(0, 0, returned=self.free)  # report the rest, return the unused slice
        assert self.leased == 0 and self.free == 0, (self.leased, self.free)
        if self.local is not None:
            n_open, = self.local.execute("SELECT count(*) FROM holds WHERE state = 'open'").fetchone()
            assert n_open == 0
            self.local.close()
        self.conn.close()


def make_replica(design: str, url: str, index: int, local_dir: str, unused: Any) -> ReplicaA | ReplicaB:
    replica_id = f"replica-{index}"
    if design == "a":
        return ReplicaA(url, replica_id)
    durability = design.split("/")[1]
    return ReplicaB(url, replica_id, durability, Path(local_dir) / f"{replica_id}.sqlite3", index, unused)


def replica_main(cfg: dict[str, Any], index: int, barrier: Any, warm_until: Any, stop_at: Any, unused: Any,
                 busy_done: Any, results: Any) -> None:
    try:
        replica = make_replica(cfg["design"], cfg["url"], index, cfg["local_dir"], unused)
        batch = cfg["batch"]
        barrier.wait(BARRIER_TIMEOUT_S)  # 1: every replica connected
        if cfg["population"] is None:  # scenario 1: a measured window after a warm-up
            counted, mark, t0 = False, Tally(), 0.0
            while True:
                now = time.time()
                if counted and now >= stop_at.value:
                    break
                if not counted and now >= warm_until.value:
                    counted = True
                    barrier.wait(BARRIER_TIMEOUT_S)  # 2: everyone starts the measured part together
                    replica.t.cpu_s = time.process_time()
                    mark, t0 = Tally(**vars(replica.t)), time.time()
                replica.step(batch)
            t1 = time.time()
            replica.t.cpu_s = time.process_time()
            window = replica.t.minus(mark)
        else:  # scenario 2: a finite population, each request tried once
            t0, left = time.time(), cfg["population"][index]
            while left:
                n = min(batch, left)
                replica.step(n)
                left -= n
            t1 = time.time()
            replica.t.cpu_s = time.process_time()
            window = None
            if cfg["idle_holder"] and index == 0:  # its clients are gone; it keeps its slice until the rest finish
                replica.drain()
                while busy_done.value < len(cfg["population"]) - 1:
                    time.sleep(0.005)
            else:
                with busy_done.get_lock():
                    busy_done.value += 1
        replica.finish()
        results.put(("ok", index, {"t0": t0, "t1": t1, "window": vars(window) if window else None,
                                   "total": vars(replica.t)}))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))
        barrier.abort()


# --- the parent: one point, rounds, tables ------------------------------------------------------


@dataclass
class Point:
    design: str
    replicas: int
    elapsed_s: float
    window: Tally  # the measured window (scenario 1) or the whole run (scenario 2)
    total: Tally  # everything each replica did, warm-up and finish included
    server_per_client: float
    server_cpu_s: float  # PostgreSQL's CPU over the measured window (scenario 1)
    per_replica_admitted: list[int] = field(default_factory=list)
    spent: int = 0

    @property
    def pairs_s(self) -> float:
        return self.window.settled / self.elapsed_s

    def per_admitted(self, n: float) -> float:
        return n / self.window.admitted if self.window.admitted else float("nan")

    @property
    def server_us(self) -> float:
        """PostgreSQL CPU µs per settled pair (the window's pairs at the replicas' rate over the parent's window)."""
        return self.server_cpu_s / self.window.settled * 1e6 if self.window.settled else float("nan")

    @property
    def client_us(self) -> float:
        """The replicas' own CPU µs per settled pair."""
        return self.window.cpu_s / self.window.settled * 1e6 if self.window.settled else float("nan")


def run_point(server: pgfix.PgServer, design: str, replicas: int, batch: int, seconds: float,
              cap: int | None = None, idle_holder: bool = False) -> Point:
    """Scenario 1 (no cap), or 2 (`cap`): every replica busy, or (`idle_holder`) replica 0 asks a tenth as much
    as each of the others and then idles, still holding its lease, until they are done."""
    exhaust = cap is not None
    url = fresh_ledger(server, design, cap if exhaust else UNCAPPED)
    population = None
    if exhaust:
        busy = replicas - 1 if idle_holder else replicas
        each = int(EXHAUST_DEMAND * cap / ACTUAL_TOKENS / busy) + 1
        population = [each // IDLE_SHARE if idle_holder and i == 0 else each for i in range(replicas)]
    if not exhaust:  # scenario 2 does not check the server's count of commits: no need to wait for it
        time.sleep(STATS_FLUSH_S)
    commits0 = server_commits(url)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(replicas + 1)
    warm_until = ctx.Value("d", 1e18, lock=False)
    stop_at = ctx.Value("d", 1e18, lock=False)
    unused = ctx.Array("q", replicas, lock=False)
    busy_done = ctx.Value("i", 0)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench_escrow_") as local_dir:
        cfg = {"design": design, "url": url, "batch": batch, "population": population, "local_dir": local_dir,
               "idle_holder": idle_holder}
        procs = [ctx.Process(target=replica_main,
                             args=(cfg, i, barrier, warm_until, stop_at, unused, busy_done, results))
                 for i in range(replicas)]
        for p in procs:
            p.start()
        cpu_s = 0.0
        try:
            barrier.wait(BARRIER_TIMEOUT_S)
            if not exhaust:
                warm_until.value = time.time() + min(0.3, seconds / 4)
                barrier.wait(BARRIER_TIMEOUT_S)
                cpu0 = postgres_cpu_s(server)
                stop_at.value = time.time() + seconds
                time.sleep(seconds)
                cpu_s = postgres_cpu_s(server) - cpu0
        except threading.BrokenBarrierError:
            pass
        got: dict[int, Any] = {}
        errors = []
        deadline = time.time() + seconds + 300
        while len(got) + len(errors) < replicas:
            try:
                kind, i, body = results.get(timeout=max(1.0, deadline - time.time()))
            except queue.Empty:
                errors.append("no answer from a replica")
                break
            (got.__setitem__(i, body) if kind == "ok" else errors.append(f"replica {i}:\n{body}"))
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    rs = [got[i] for i in range(replicas)]
    elapsed = max(r["t1"] for r in rs) - min(r["t0"] for r in rs)
    total = Tally(**{k: sum(r["total"][k] for r in rs) for k in vars(Tally())})
    window = total if exhaust else Tally(**{k: sum(r["window"][k] for r in rs) for k in vars(Tally())})
    if not exhaust:
        time.sleep(STATS_FLUSH_S)  # the replicas' backends have exited and flushed their statistics
    # Less the probe's two (a backend's start-up reads the catalogue in a transaction of its own, then its SELECT)
    # and each replica connection's start-up.
    server_total = server_commits(url) - commits0 - 2 - replicas
    rows = principals(url, design)
    for spent, held, leased in rows:
        assert held == 0 and leased == 0, rows
        assert spent == ACTUAL_TOKENS * total.settled, (spent, total.settled)  # every settle charged once
        assert not exhaust or spent <= cap, (spent, cap)
    # The parent's CPU window is `seconds`; the replicas' is `elapsed` (up to one step longer): scale to it.
    server_cpu = cpu_s * elapsed / seconds if not exhaust else 0.0
    return Point(design, replicas, elapsed, window, total, server_total / max(1, total.pg_tx), server_cpu,
                 [r["total"]["admitted"] for r in rs], rows[0][0])


def fmt_range(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per point, 1 round, a smaller cap")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per throughput point")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=CONCURRENCY, help="requests per group commit (default: concurrency)")
    ap.add_argument("--cap", type=int, default=None, help="tokens, scenario 2")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    args = ap.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    cap = args.cap or (QUICK_EXHAUST_CAP if args.quick else EXHAUST_CAP)
    designs = [d for d in args.designs.split(",") if d]
    assert all(d in DESIGNS for d in designs) and "a" in designs, designs
    started = time.perf_counter()
    server = start_server()
    tput: dict[tuple[str, int], list[Point]] = {}
    exh: dict[tuple[str, int, bool], list[Point]] = {}
    try:
        self_check(server)
        for rnd in range(rounds):
            for replicas in REPLICAS:
                order = designs[rnd % len(designs):] + designs[:rnd % len(designs)]  # spread the drift
                for design in order:
                    p = run_point(server, design, replicas, args.batch, seconds)
                    tput.setdefault((design, replicas), []).append(p)
                    print(f"round {rnd + 1} {design:8s} R={replicas} {p.pairs_s:9,.0f} pairs/s"
                          f"  pg tx/adm {p.per_admitted(p.window.pg_tx):.5f}"
                          f"  local tx/adm {p.per_admitted(p.window.local_tx):.4f}"
                          f"  server/client {p.server_per_client:.3f}  pg cpu {p.server_us:.1f} us/pair"
                          f"  replica cpu {p.client_us:.1f} us/pair", file=sys.stderr, flush=True)
            for idle, replicas in EXHAUST_POINTS:
                for design in EXHAUST_DESIGNS:
                    p = run_point(server, design, replicas, args.batch, seconds, cap, idle)
                    exh.setdefault((design, replicas, idle), []).append(p)
                    w = p.window
                    print(f"round {rnd + 1} exhaust{' idle' if idle else ''} {design:8s} R={replicas}"
                          f" admitted {w.admitted} refused {w.refused}"
                          f" with room {w.refused_with_room} spent {p.spent:,} per replica {p.per_replica_admitted}"
                          f" leases {w.leases} fall-back tx {w.direct_tx} {p.elapsed_s:.1f} s",
                          file=sys.stderr, flush=True)
        with psycopg.connect(server.url(), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
    finally:
        server.stop()
    med = statistics.median
    print()
    print(f"PostgreSQL {version} (fsync, synchronous_commit, full_page_writes on), psycopg {psycopg.__version__},"
          f" SQLite {sqlite3.sqlite_version}; {os.cpu_count()} CPUs; replicas are processes; one key and one account"
          f" shared by all; {args.batch} requests per group commit (concurrency {CONCURRENCY}, no upstream time);"
          f" {seconds:g} s per point, {rounds} round(s), medians; (b)/(a): median of per-round ratios at the same"
          f" replica count; run took {time.perf_counter() - started:.0f} s")
    print()
    print("Scenario 1, throughput (cap never near):")
    print()
    print("| design | replicas | durable pairs/s (median) | range | PostgreSQL tx / admitted | round trips / admitted"
          " | local SQLite commits / admitted | server / client commits | PostgreSQL CPU µs / pair"
          " | replica CPU µs / pair | (b)/(a) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for design in designs:
        for replicas in REPLICAS:
            ps = tput[(design, replicas)]
            base = tput[("a", replicas)]
            ratio = med([p.pairs_s / b.pairs_s for p, b in zip(ps, base)])
            label = {"a": "(a) PgLedger.step", "b/sqlite": "(b) escrow, holds in local SQLite (FULL)",
                     "b/pg": "(b) escrow, holds in PostgreSQL", "b/none": "(b) escrow, lease only (NOT durable)"}
            print(f"| {label[design]} | {replicas} | {med([p.pairs_s for p in ps]):,.0f} |"
                  f" {fmt_range([p.pairs_s for p in ps])} | {med([p.per_admitted(p.window.pg_tx) for p in ps]):.5f} |"
                  f" {med([p.per_admitted(p.window.pg_tx) for p in ps]):.5f} |"
                  f" {med([p.per_admitted(p.window.local_tx) for p in ps]):.4f} |"
                  f" {med([p.server_per_client for p in ps]):.3f} | {med([p.server_us for p in ps]):.1f} |"
                  f" {med([p.client_us for p in ps]):.1f} | {ratio:.2f}x |")
    print()
    print("pairs/s: reserve+settle pairs whose hold was durable (b/none: NOT durable) before the reserve returned;"
          " settlements ride along with the next batch. Round trips: PostgreSQL's (a local SQLite commit is an fsync,"
          " not a round trip). Server / client commits: pg_stat_database's xact_commit over the point, less each"
          " connection's start-up transaction, over the client's count; a few more are autovacuum workers visiting"
          " the fresh database, visible where the client makes few (b/sqlite). CPU: the whole PostgreSQL server's"
          " (postmaster, live and exited children) and the replica processes' own, over the measured window.")
    print()
    print(f"Scenario 2, the cap exhausted ({cap:,} tokens on the account and the key; the busy replicas' populations"
          f" ask {EXHAUST_DEMAND:g}x what it admits, each request tried once; 'idle holder': replica 0 asks"
          f" 1/{IDLE_SHARE} as much, then idles keeping its lease until the others are done):")
    print()
    print("| design | replicas | demand | admitted | refused | refused while headroom remained | spent / cap"
          " | admitted per replica (min–max) | lease tx | fall-back tx | s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for idle, replicas in EXHAUST_POINTS:
        for design in EXHAUST_DESIGNS:
            ps = exh[(design, replicas, idle)]
            lo = med([min(p.per_replica_admitted) for p in ps])
            hi = med([max(p.per_replica_admitted) for p in ps])
            room = "0 (one judge)" if design == "a" else f"{med([p.window.refused_with_room for p in ps]):,.0f}"
            print(f"| {design} | {replicas} | {'idle holder' if idle else 'all busy'} |"
                  f" {med([p.window.admitted for p in ps]):,.0f} |"
                  f" {med([p.window.refused for p in ps]):,.0f} | {room} |"
                  f" {med([p.spent / cap for p in ps]):.4f} | {lo:,.0f}–{hi:,.0f} |"
                  f" {med([p.window.leases for p in ps]):,.0f} | {med([p.window.direct_tx for p in ps]):,.0f} |"
                  f" {med([p.elapsed_s for p in ps]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
