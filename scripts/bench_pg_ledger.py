#!/usr/bin/env python3
"""Benchmark the PostgreSQL cross-replica ledger (cortex/budget/pg_ledger.py) against SQLite's store.

Question: how many *durable* reserve+settle pairs per second does the shared
PostgreSQL ledger take, at group-commit batch sizes 1, 16 and 128 and with 1,
2 and 3 replicas writing at once, and how many database transactions and
round trips does each admitted request cost? Against: SQLite's ThreadedStore
through BudgetService (scripts/bench_ledger.py's `group` point), in the same run.

What it does
------------
1. Starts its own PostgreSQL (tests/postgres.py's PgServer) with durable
   settings: fsync, synchronous_commit and full_page_writes on, so a commit is
   on disk before the reserve returns, as SQLite's `synchronous=full` is.
2. For each (replicas R, batch B): R threads, each one replica's writer thread
   with its own connection and PgLedger, loop for the measured time over
       step(settle the previous B holds at actual usage, reserve B new holds)
   one statement, one transaction, one round trip per loop: the settlements
   ride along with the next group commit, as in the SQLite store. All replicas
   share one key and one account (the worst case: every batch contends on the
   same two rows). pairs/s counts settled pairs; transactions are also read
   from pg_stat_database (xact_commit) to check the client-side count.
3. Runs SQLite's ThreadedStore + BudgetService at concurrency 1 and 256
   (scripts/bench_ledger.py's run_point) for the baseline.

The PostgreSQL figures exclude the Trio shell (not built yet: there is no
BudgetService on PgLedger); the SQLite figures include it. So the ratio is
the ledger's ceiling, not the full request path's.

4. With --batch-cost, instead: the cost of one `cortex_batch` per reserve+settle
   pair at batch sizes 16 to 1024 (one replica, the same durable server), to
   show that it is flat in the batch size: the server's execution time
   (EXPLAIN ANALYZE of the statement, commit excluded) and the client's wall
   time of `step` (driver, round trip and durable commit included).

Usage
-----
    python scripts/bench_pg_ledger.py                # 3 s per point
    python scripts/bench_pg_ledger.py --quick        # 1 s per point
    python scripts/bench_pg_ledger.py --batch-cost   # per-pair cost by batch size
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ledger  # noqa: E402
import psycopg  # noqa: E402

from cortex.budget import pg_schema  # noqa: E402
from cortex.budget.pg_ledger import _BATCH_SQL, Hold, PgLedger, Reserve, Resolve  # noqa: E402
from tests import postgres as pgfix  # noqa: E402

BATCHES = (1, 16, 128)
REPLICAS = (1, 2, 3)
SQLITE_CONCURRENCY = (1, 256)
ESTIMATE_TOKENS = 160
ACTUAL_TOKENS = 120
TTL_S = 600.0
LEASE_S = 30.0
COST_BATCHES = (16, 128, 256, 512, 1024)
COST_PAIRS = 8192  # reserve+settle pairs measured per batch size (at least COST_MIN_STEPS steps)
COST_MIN_STEPS = 8
COST_WARM_STEPS = 3
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@dataclass
class PgPoint:
    replicas: int
    batch: int
    pairs: int
    elapsed_s: float
    transactions: int
    round_trips: int
    server_per_client: float  # pg_stat_database's commits / the client's count, over the whole point

    @property
    def pairs_s(self) -> float:
        return self.pairs / self.elapsed_s

    def per_admitted(self, n: int) -> float:
        return n / self.pairs if self.pairs else float("nan")


def start_server() -> pgfix.PgServer:
    bindir, why = pgfix.find_bindir(os.environ)
    if bindir is None:
        sys.exit(f"no PostgreSQL: {why}")
    pgfix.SERVER_SETTINGS = {**pgfix.SERVER_SETTINGS, **DURABLE}
    server = pgfix.PgServer.start(bindir, os.environ)
    os.environ.update(server.env)
    return server


def fresh_ledger(server: pgfix.PgServer) -> str:
    url = server.url(server.create_database())
    with pg_schema.connect(url) as conn:
        pg_schema.migrate(conn)
        conn.execute("INSERT INTO accounts (id, created_at, balance_tokens) VALUES ('team', 0, %s)", (10**15,))
        conn.execute("INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, balance_tokens)"
                     " VALUES ('bench', 'team', 'bench', 'x', 'sk', 0, %s)", (10**15,))
    return url


def server_commits(url: str) -> int:
    with pg_schema.connect(url) as conn:
        return int(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0])


def run_pg_point(server: pgfix.PgServer, replicas: int, batch: int, seconds: float) -> PgPoint:
    url = fresh_ledger(server)
    time.sleep(0.6)  # the set-up's backend has exited and flushed its statistics
    commits0 = server_commits(url)
    ledgers = [PgLedger(pg_schema.connect(url), f"replica-{i}", LEASE_S) for i in range(replicas)]
    pairs = [0] * replicas
    barrier = threading.Barrier(replicas + 1)
    warm_until = [0.0]
    stop_at = [0.0]
    errors: list[BaseException] = []
    marks = [(0, 0)] * replicas
    ends = [(0, 0)] * replicas

    def writer(i: int) -> None:
        ledger, open_holds, counted = ledgers[i], [], False
        try:
            barrier.wait()
            while True:
                now = time.time()
                if now >= stop_at[0] and counted:
                    ends[i] = (ledger.counters.transactions, ledger.counters.round_trips)
                    break
                if not counted and now >= warm_until[0]:
                    counted = True
                    barrier.wait()  # everyone starts the measured part together
                    marks[i] = (ledger.counters.transactions, ledger.counters.round_trips)
                reserves = [Reserve(uuid.uuid4().hex, "bench", ESTIMATE_TOKENS, TTL_S) for _ in range(batch)]
                settles = [Resolve(h, "settled", ACTUAL_TOKENS) for h in open_holds]
                done, placed = ledger.step(settles, reserves, now)
                assert all(done) and all(isinstance(p, Hold) for p in placed)
                open_holds = [p.id for p in placed]
                if counted:
                    pairs[i] += len(settles)
            ledger.step([Resolve(h, "settled", ACTUAL_TOKENS) for h in open_holds], [], time.time())
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(replicas)]
    for t in threads:
        t.start()
    warm_until[0] = time.time() + min(0.3, seconds / 4)
    stop_at[0] = warm_until[0] + 10**6
    barrier.wait()
    barrier.wait()
    start = time.perf_counter()
    stop_at[0] = time.time() + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    tx = sum(e[0] - m[0] for e, m in zip(ends, marks))
    trips = sum(e[1] - m[1] for e, m in zip(ends, marks))
    client_total = sum(lg.counters.transactions for lg in ledgers)
    for lg in ledgers:
        lg.conn.close()
    time.sleep(0.6)  # the writers' backends have exited and flushed their statistics
    server_total = server_commits(url) - commits0 - 1  # less the first probe's own
    with pg_schema.connect(url) as conn:
        spent, held = conn.execute("SELECT spent_tokens, held_tokens FROM keys").fetchone()
        assert held == 0 and spent % ACTUAL_TOKENS == 0
    return PgPoint(replicas, batch, sum(pairs), elapsed, tx, trips, server_total / client_total)


def run_batch_cost(server: pgfix.PgServer, batch: int) -> tuple[float, float]:
    """(server µs, client µs) per reserve+settle pair at `batch`: medians over the measured steps.

    Each step settles the previous step's `batch` holds and reserves `batch`
    new ones, alternately timed by the client around `PgLedger.step` and by
    the server as EXPLAIN ANALYZE's execution time of the same statement
    (which runs it for real: its holds are the ones the next step settles).
    """
    url = fresh_ledger(server)
    ledger = PgLedger(pg_schema.connect(url), "replica-0", LEASE_S)
    steps = max(COST_MIN_STEPS, COST_PAIRS // batch)
    open_holds: list[str] = []
    server_s: list[float] = []
    client_s: list[float] = []
    try:
        for i in range(COST_WARM_STEPS + 2 * steps):
            reserves = [Reserve(uuid.uuid4().hex, "bench", ESTIMATE_TOKENS, TTL_S) for _ in range(batch)]
            settles = [Resolve(h, "settled", ACTUAL_TOKENS) for h in open_holds]
            if i % 2:
                params = ledger.batch_params(settles, reserves, time.time())
                plan = ledger.conn.execute("EXPLAIN (ANALYZE, TIMING OFF) " + _BATCH_SQL, params).fetchall()
                ms = next(float(m[1]) for (line,) in plan if (m := re.match(r"Execution Time: ([\d.]+) ms", line)))
                if i >= COST_WARM_STEPS:
                    server_s.append(ms / 1000)
                open_holds = [q.hold_id for q in reserves]  # the fresh ledger's cap admits them all
            else:
                started = time.perf_counter()
                done, placed = ledger.step(settles, reserves, time.time())
                if i >= COST_WARM_STEPS:
                    client_s.append(time.perf_counter() - started)
                assert all(done) and all(isinstance(p, Hold) for p in placed)
                open_holds = [p.id for p in placed]
        ledger.step([Resolve(h, "settled", ACTUAL_TOKENS) for h in open_holds], [], time.time())
        spent, held = ledger.conn.execute("SELECT spent_tokens, held_tokens FROM keys").fetchone()
        assert held == 0 and spent % ACTUAL_TOKENS == 0
    finally:
        ledger.conn.close()
    return statistics.median(server_s) / batch * 1e6, statistics.median(client_s) / batch * 1e6


def batch_cost_main() -> int:
    server = start_server()
    try:
        rows = []
        for batch in COST_BATCHES:
            server_us, client_us = run_batch_cost(server, batch)
            rows.append((batch, server_us, client_us))
            print(f"batch {batch:<5d} server {server_us:7.1f} us/pair  step {client_us:7.1f} us/pair",
                  file=sys.stderr, flush=True)
        version = psycopg.connect(server.url(), autocommit=True).execute("SHOW server_version").fetchone()[0]
    finally:
        server.stop()
    print()
    print(f"PostgreSQL {version} (durable), psycopg {psycopg.__version__}; {os.cpu_count()} CPUs; one replica,"
          " one key and one account; each step settles the previous step's batch and reserves a new one")
    print()
    print("| batch | server µs / pair (cortex_batch, commit excluded) | client µs / pair (PgLedger.step, durable commit) |")
    print("|---:|---:|---:|")
    for batch, server_us, client_us in rows:
        print(f"| {batch} | {server_us:.1f} | {client_us:.1f} |")
    return 0


def run_sqlite(seconds: float, modes: list[str]) -> dict[tuple[int, str], float]:
    async def main() -> dict[tuple[int, str], float]:
        out = {}
        for mode in modes:
            for c in SQLITE_CONCURRENCY:
                sample = await bench_ledger.run_point("group", c, mode, seconds)
                out[(c, mode)] = sample.pairs_s
                print(f"sqlite {mode:6s} c={c:<4d} {sample.pairs_s:9,.0f} pairs/s  batch {sample.mean_batch:6.1f}",
                      file=sys.stderr, flush=True)
        return out

    return trio.run(main)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per point")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--batch-cost", action="store_true", help="per-pair cost of one cortex_batch by batch size")
    args = ap.parse_args(argv)
    if args.batch_cost:
        return batch_cost_main()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    modes = ["full", "normal"]
    sqlite = run_sqlite(seconds, modes)
    base = sqlite[(256, "full")]
    server = start_server()
    try:
        points = []
        for replicas in REPLICAS:
            for batch in BATCHES:
                p = run_pg_point(server, replicas, batch, seconds)
                points.append(p)
                print(f"postgres R={replicas} B={batch:<4d} {p.pairs_s:9,.0f} pairs/s  "
                      f"tx/adm {p.per_admitted(p.transactions):.3f}  server/client commits {p.server_per_client:.3f}",
                      file=sys.stderr, flush=True)
        version = psycopg.connect(server.url(), autocommit=True).execute("SHOW server_version").fetchone()[0]
    finally:
        server.stop()
    print()
    print(f"PostgreSQL {version} (fsync, synchronous_commit, full_page_writes on), psycopg {psycopg.__version__};"
          f" {os.cpu_count()} CPUs; {seconds:g} s per point; one key and one account shared by every replica")
    print()
    print("| store | replicas | batch (group commit) | durable pairs/s | transactions / admitted | round trips / admitted "
          "| server commits / client transactions | vs SQLite full c=256 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (c, mode), v in sorted(sqlite.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| SQLite ThreadedStore+BudgetService, synchronous={mode}, concurrency {c} | 1 | (its own) "
              f"| {v:,.0f} | - | - | - | {v / base:.2f}x |")
    for p in points:
        print(f"| PostgreSQL PgLedger.step | {p.replicas} | {p.batch} | {p.pairs_s:,.0f} "
              f"| {p.per_admitted(p.transactions):.3f} | {p.per_admitted(p.round_trips):.3f} "
              f"| {p.server_per_client:.3f} | {p.pairs_s / base:.2f}x |")
    print()
    print("pairs/s: reserve+settle pairs whose hold was committed durably before the reserve returned; the"
          " settlement rides along with the replica's next batch. PostgreSQL figures are the ledger alone"
          " (no Trio shell yet); SQLite's include BudgetService and the Trio writer hand-off.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
