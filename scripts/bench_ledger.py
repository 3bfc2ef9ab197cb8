#!/usr/bin/env python3
"""Benchmark the durable budget ledger: reserve+settle pairs per second.

Question: how many *durable* admissions (a reserve whose hold is committed to
SQLite before the request may go on, then its settlement, which rides along
with the next commit) can one cortex process do per second, and what does
group commit buy?

What it does
------------
For every concurrency level (default 1 and 256) and every SQLite
``synchronous`` mode (``normal``: survives a process crash; ``full``: survives
a power cut), in a fresh temporary directory per point:

1. Opens the ledger exactly as cortex does -- ``ThreadedStore.open(path,
   synchronous, on_commit)`` (one writer thread, WAL, group commit) -- loads a
   ``BudgetService`` on it and creates one key with a huge balance.
2. Runs N Trio tasks, each looping over the real request-path calls for a fixed
   duration::

       hold = await service.reserve(key, Estimate(...), request_id, model)  # ledger decision + commit([OpenHold])
       await service.settle(hold, actual_tokens)                            # ledger decision + deferred ResolveHold

   Admission latency is the time of ``service.reserve`` (ledger decision plus
   the durable commit).  The ``on_commit`` callback gives the number of ops
   jobs in each group commit, hence the mean batch size, and the writer's time
   per commit.
3. Runs the same point against the baseline *no group commit*: a
   ``ThreadedStore`` subclass whose writer takes ONE job per transaction (same
   connection setup, schema, ops, ``synchronous`` mode and wake-up path; one
   ``COMMIT`` -- and, with ``full``, one WAL fsync -- per op).

Group and baseline are interleaved within each repeat (alternating which goes
first); the table shows medians over ``--repeats``, and the ratio is the
median of per-repeat paired ratios.  CPU columns come from /proc (per thread):
the writer thread's and the Trio (main) thread's CPU as a percentage of wall
time, to tell which side is the bottleneck.

4. Runs the same point with *every cap kind* (variant ``allcaps``): the key
   and its account each carry a token and a USD balance, a token and a USD
   sliding window, a monthly period in tokens and in USD and a concurrency
   cap; the model is priced (so every hold and charge has a money part), and
   an alert rule watches every cap (evaluated on every settlement). Its
   figure is compared with the token-only ``group`` run of the same repeat.

5. PostgreSQL (variant ``postgres``; skip with ``--no-pg``): the same
   workload through the real shared-ledger service -- ``PgShared.open(url)``,
   ``SharedBudgetService.load`` with its background tasks running
   (heartbeat, reaper, change listener, hold expiry), then the same
   ``service.reserve`` / ``service.settle`` loop -- with 1, 2 and 3 replicas
   (``--pg-replicas``) on one key and one account. Each replica is a process
   of its own (this script with ``--replica URL``: they share no GIL) running
   ``concurrency`` tasks; the parent starts a durable PostgreSQL
   (tests/postgres.py's PgServer; fsync, synchronous_commit and
   full_page_writes on, as scripts/bench_pg_ledger.py), makes a fresh
   database per point, waits until every replica has warmed up, gives them
   one start time, and collects each one's figures as a JSON line. Reported:
   pairs/s (all replicas), admit p50/p99, transactions and round trips per
   admitted request (``PgAdmission.counters`` over the measured window),
   pg_stat_database's ``xact_commit`` over the whole point as a cross-check,
   the replicas' and the server's CPU, and the ratio to SQLite's ``group``
   point of the same concurrency and repeat. After the repeats, the server's
   durable commit rate on 1, 8 and 32 connections, no row shared: with
   ``cortex_batch`` of one reserve and one settlement per transaction, and
   with a one-row INSERT per transaction (the WAL-flush ceiling); against
   them the per-request figures say how many replicas one primary takes.

Targets: >= 10,000 durable reserve+settle pairs/s at concurrency 256; with
every cap kind, within 20% of the token-only figure (ratio >= 0.80); on
PostgreSQL, at most 0.2 database transactions per admitted request at
concurrency 256, amortised.

Usage
-----
    python scripts/bench_ledger.py                     # full run (~5 min with PostgreSQL)
    python scripts/bench_ledger.py --quick             # 1 s per point, 1 repeat
    python scripts/bench_ledger.py --no-pg             # SQLite only (~1.5 min)
    python scripts/bench_ledger.py --modes full --no-baseline --pg-replicas 1,3   # PostgreSQL against SQLite full
    python scripts/bench_ledger.py --seconds 5 --concurrency 1,64,256 --modes full
    python scripts/bench_ledger.py --no-baseline       # group commit only

For a profile, run one point under py-spy, e.g.
``py-spy record -o prof.txt --format raw --threads -- python scripts/bench_ledger.py --quick --concurrency 256 --modes full --no-baseline``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _loadgen as lg  # noqa: E402

from cortex.budget import store as store_mod  # noqa: E402
from cortex.budget.estimate import Estimate  # noqa: E402
from cortex.budget.alerts import parse_alert_rules  # noqa: E402
from cortex.budget.ledger import Caps  # noqa: E402
from cortex.budget.periods import PeriodSpec  # noqa: E402
from cortex.budget.pricing import Prices  # noqa: E402
from cortex.fleet.catalogue import Cost  # noqa: E402
from cortex.budget.service import BudgetService  # noqa: E402
from cortex.budget.store import ThreadedStore  # noqa: E402
from cortex.config import BudgetConfig  # noqa: E402
from cortex.metrics import GatewayMetrics  # noqa: E402

DEFAULT_CONCURRENCY = (1, 256)
MODES = ("normal", "full")
VARIANTS = ("group", "single", "allcaps")
ALL_CAPS = Caps(
    balance_tokens=10**15, window_tokens=10**15, window_s=3600.0, max_concurrency=100_000, balance_usd=10**17,
    window_usd=10**17, period=PeriodSpec("monthly"), period_tokens=10**15, period_usd=10**17,
)
PRICES = Prices.from_cost(Cost(0.15, 0.6, 0.075))
ALLCAPS_TARGET_RATIO = 0.80
TARGET_PAIRS_S = 10_000
TARGET_C = 256
ESTIMATE = Estimate(prompt_tokens=60, output_tokens=100)
ACTUAL_TOKENS = 120


class OneTxnStore(ThreadedStore):
    """Baseline: the same writer thread, but one job -- one op, one COMMIT -- per transaction."""

    def _serve_batch(self, conn: Any) -> bool:
        item = self._queue.get()
        if item is store_mod._STOP:
            return False
        self._execute(conn, [item])
        return True


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

@dataclass
class Sample:
    pairs: int
    elapsed_s: float
    admit_s: list[float]
    batches: list[int]
    commit_s: list[float]
    writer_cpu_s: float
    trio_cpu_s: float

    @property
    def pairs_s(self) -> float:
        return self.pairs / self.elapsed_s if self.elapsed_s else float("nan")

    def admit_ms(self, q: float) -> float:
        return lg.percentile_ms(self.admit_s, q)

    @property
    def mean_batch(self) -> float:
        return statistics.fmean(self.batches) if self.batches else float("nan")

    @property
    def commit_ms(self) -> float:
        return 1000.0 * statistics.fmean(self.commit_s) if self.commit_s else float("nan")

    @property
    def commits_s(self) -> float:
        return len(self.batches) / self.elapsed_s if self.elapsed_s else float("nan")

    def pct(self, cpu_s: float) -> float:
        return 100.0 * cpu_s / self.elapsed_s if self.elapsed_s else float("nan")


async def run_point(variant: str, concurrency: int, synchronous: str, seconds: float) -> Sample:
    batches: list[int] = []
    commit_s: list[float] = []
    measuring = False

    def on_commit(batch_size: int, seconds_: float) -> None:
        if measuring:
            batches.append(batch_size)
            commit_s.append(seconds_)

    cls = OneTxnStore if variant == "single" else ThreadedStore
    with tempfile.TemporaryDirectory(prefix="bench_ledger_") as tmp:
        path = Path(tmp) / "ledger.sqlite3"
        async with cls.open(path, synchronous, on_commit) as store:
            config = BudgetConfig(data_dir=tmp, synchronous=synchronous)
            service = await BudgetService.load(store, time.time, config, GatewayMetrics())
            every = variant == "allcaps"
            key, _ = await service.create_key("bench", "team", ALL_CAPS if every else Caps(balance_tokens=10**15))
            prices = PRICES if every else None
            if every:
                await service.set_caps("account", "team", ALL_CAPS)
                service.alert_rules = parse_alert_rules([{"url": "http://127.0.0.1:9/hook"}], {})
            writer_tid = store._thread.native_id
            trio_tid = threading.get_native_id()

            admit: list[float] = []
            pairs = 0
            perf = time.perf_counter
            deadline = 0.0

            async def worker(i: int, timed: bool) -> None:
                nonlocal pairs
                n = 0
                while perf() < deadline:
                    t0 = perf()
                    hold = await service.reserve(key, ESTIMATE, f"req-{i}-{n}", "bench-model", None, prices)
                    t1 = perf()
                    usd = prices.charge_usd(ESTIMATE.prompt_tokens, 0, ACTUAL_TOKENS - ESTIMATE.prompt_tokens) if prices else 0
                    await service.settle(hold, ACTUAL_TOKENS, usd)
                    n += 1
                    if timed:
                        admit.append(t1 - t0)
                        pairs += 1

            # Warm-up: every task once round the loop (the first commits pay for page allocation).
            deadline = perf() + min(0.3, seconds / 4)
            async with trio.open_nursery() as nursery:
                for i in range(concurrency):
                    nursery.start_soon(worker, i, False)

            measuring = True
            w0, m0 = lg.thread_cpu_s(writer_tid), lg.thread_cpu_s(trio_tid)
            start = perf()
            deadline = start + seconds
            async with trio.open_nursery() as nursery:
                if every:  # the alert evaluator runs as in cortex, beside the requests
                    evaluator = trio.CancelScope()

                    async def evaluate() -> None:
                        with evaluator:
                            await service.evaluate_alerts_forever()

                    nursery.start_soon(evaluate)
                async with trio.open_nursery() as workers:
                    for i in range(concurrency):
                        workers.start_soon(worker, i, True)
                elapsed = perf() - start
                if every:
                    evaluator.cancel()
            measuring = False
            w1, m1 = lg.thread_cpu_s(writer_tid), lg.thread_cpu_s(trio_tid)
            if len(service.ledger.holds) != 0:
                raise RuntimeError(f"{len(service.ledger.holds)} holds left open")
    # Pairs whose reserve started before the deadline finish a little after it: elapsed covers them.
    return Sample(pairs, elapsed, admit, batches, commit_s, w1 - w0, m1 - m0)


@dataclass
class Cell:
    concurrency: int
    synchronous: str
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def med(self, variant: str, fn) -> float:
        return lg.median([fn(s) for s in self.samples[variant]])

    @property
    def ratio(self) -> float:
        return self.paired("group", "single")

    def paired(self, top: str, bottom: str) -> float:
        pairs = list(zip(self.samples[top], self.samples[bottom]))
        vals = [a.pairs_s / b.pairs_s for a, b in pairs if b.pairs_s]
        return statistics.median(vals) if vals else float("nan")


async def bench(args, pg: "PgBench | None" = None) -> tuple[list[Cell], list[PgCell]]:
    cells = {(c, m): Cell(c, m) for c in args.concurrency for m in args.modes}
    pg_cells = {(c, n): PgCell(c, n) for c in args.concurrency for n in args.pg_replicas} if pg else {}
    for r in range(args.repeats):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        if not args.baseline:
            order = tuple(v for v in order if v != "single")
        for c in args.concurrency:
            sqlite_first = r % 2 == 0
            if not sqlite_first:
                await _pg_points(args, pg, pg_cells, r, c, reverse=True)
            for m in args.modes:
                for variant in order:
                    s = await run_point(variant, c, m, args.seconds)
                    cells[(c, m)].samples[variant].append(s)
                    print(
                        f"[{r + 1}/{args.repeats}] c={c:<4d} {m:6s} {variant:6s} {s.pairs:7d} pairs "
                        f"{s.pairs_s:9,.0f} pairs/s  admit p50 {s.admit_ms(0.5):7.3f} p99 {s.admit_ms(0.99):7.3f} ms  "
                        f"batch {s.mean_batch:6.1f}  commit {s.commit_ms:6.3f} ms  "
                        f"cpu writer {s.pct(s.writer_cpu_s):3.0f}% trio {s.pct(s.trio_cpu_s):3.0f}%",
                        file=sys.stderr, flush=True,
                    )
            if sqlite_first:
                await _pg_points(args, pg, pg_cells, r, c, reverse=False)
    return list(cells.values()), list(pg_cells.values())


async def _pg_points(args, pg: "PgBench | None", pg_cells: dict, r: int, c: int, reverse: bool) -> None:
    if pg is None:
        return
    for n in (reversed(args.pg_replicas) if reverse else args.pg_replicas):
        s = await run_pg_point(pg, n, c, args.seconds)
        pg_cells[(c, n)].samples.append(s)
        print(
            f"[{r + 1}/{args.repeats}] c={c:<4d} postgres R={n} {sum(x['pairs'] for x in s.results):7d} pairs "
            f"{s.pairs_s:9,.0f} pairs/s  admit p50 {s.admit_ms(0.5):7.3f} p99 {s.admit_ms(0.99):7.3f} ms  "
            f"batch {s.mean_batch:6.1f}  step {s.commit_ms:6.3f} ms  tx/adm {s.tx_per_admitted:.3f}  trips/adm {s.trips_per_admitted:.3f}  "
            f"server/client commits {s.server_per_client:.3f}  cpu writer {s.pct('writer_cpu_s'):3.0f}% "
            f"trio {s.pct('trio_cpu_s'):3.0f}% process {s.pct('process_cpu_s'):3.0f}% postgres {s.postgres_pct:3.0f}%",
            file=sys.stderr, flush=True,
        )


# --------------------------------------------------------------------------
# PostgreSQL: replicas of SharedBudgetService on one shared ledger
# --------------------------------------------------------------------------
#
# Each replica is a child process (this script with --replica URL), so replicas
# do not share a GIL: PgShared + SharedBudgetService with its background tasks
# (heartbeat, reaper, change listener, hold expiry), then `concurrency` Trio
# tasks looping over service.reserve / service.settle exactly as run_point does
# on SQLite. The parent starts a durable PostgreSQL (scripts/bench_pg_ledger.py's
# settings), makes a fresh database per point with the same one key and one
# account, starts every replica, waits until all have warmed up, tells them one
# wall-clock start time, and collects one JSON line of figures from each.

PG_REPLICAS = (1, 2, 3)
PG_DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
PG_STATS_FLUSH_S = 0.6  # a backend that exited has flushed its statistics by then
PG_START_DELAY_S = 0.3  # between "go" and the common start time
REPLICA_READY_TIMEOUT_S = 60.0
TARGET_TX_PER_ADMITTED = 0.2  # at TARGET_C, amortised
COMMIT_RATE_CONNECTIONS = (1, 8, 32)
COMMIT_RATE_SECONDS = 2.0


async def replica_main(url: str, concurrency: int, warm_s: float) -> None:
    """One replica (a child process): load, warm up, say ready, wait for the start time, measure, report."""
    from cortex.budget.pg_shared import PgShared
    from cortex.budget.shared_service import SharedBudgetService

    batches: list[int] = []
    commit_s: list[float] = []
    measuring = False

    def on_commit(batch_size: int, seconds_: float) -> None:
        if measuring:
            batches.append(batch_size)
            commit_s.append(seconds_)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    perf = time.perf_counter
    total_pairs = 0
    async with PgShared.open(url, on_commit=on_commit) as shared:
        adm = shared.admission
        service = await SharedBudgetService.load(shared, time.time, BudgetConfig(), GatewayMetrics())
        async with trio.open_nursery() as background:
            await background.start(service.run_background)
            key = next(k for k in service.keys.values() if k.name == "bench")
            admit: list[float] = []
            deadline = 0.0
            timed = False
            pairs = 0

            async def worker(i: int) -> None:
                nonlocal pairs, total_pairs
                n = 0
                while perf() < deadline:
                    t0 = perf()
                    hold = await service.reserve(key, ESTIMATE, f"req-{i}-{n}", "bench-model")
                    t1 = perf()
                    await service.settle(hold, ACTUAL_TOKENS)
                    n += 1
                    total_pairs += 1
                    if timed:
                        admit.append(t1 - t0)
                        pairs += 1

            async def run_workers() -> None:
                async with trio.open_nursery() as workers:
                    for i in range(concurrency):
                        workers.start_soon(worker, i)

            deadline = perf() + warm_s
            await run_workers()
            say({"event": "ready"})
            go = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))
            await trio.sleep(max(0.0, go["start"] - time.time()))
            writer_tid, trio_tid = adm._thread.native_id, threading.get_native_id()
            c0 = adm.counters
            before = (c0.transactions, c0.round_trips, c0.admitted)
            cpu0 = (lg.thread_cpu_s(writer_tid), lg.thread_cpu_s(trio_tid), time.process_time())
            measuring, timed = True, True
            start = perf()
            deadline = start + go["seconds"]
            await run_workers()
            elapsed = perf() - start
            measuring = False
            c1 = adm.counters
            cpu1 = (lg.thread_cpu_s(writer_tid), lg.thread_cpu_s(trio_tid), time.process_time())
            if service.open_holds():
                raise RuntimeError(f"{len(service.open_holds())} holds left open")
            say({
                "event": "result", "pairs": pairs, "elapsed_s": elapsed,
                "admit_us": [round(a * 1e6, 1) for a in admit], "batches": len(batches),
                "batch_items": sum(batches), "commit_s": sum(commit_s),
                "transactions": c1.transactions - before[0], "round_trips": c1.round_trips - before[1],
                "admitted": c1.admitted - before[2],
                "writer_cpu_s": cpu1[0] - cpu0[0], "trio_cpu_s": cpu1[1] - cpu0[1], "process_cpu_s": cpu1[2] - cpu0[2],
            })
            background.cancel_scope.cancel()
    # Closed: the deferred settlements are flushed; these totals are the whole life's.
    say({"event": "closed", "total_pairs": total_pairs, "transactions": adm.counters.transactions,
         "maintenance_transactions": adm.maintenance_counters.transactions})


@dataclass
class PgSample:
    replicas: int
    results: list[dict[str, Any]]  # one per replica
    server_commits: int  # pg_stat_database xact_commit over the whole point (set-up excluded)
    client_transactions: int  # the replicas' own count over their whole lives (writer + reaper)
    total_pairs: int  # over the replicas' whole lives (warm-up included)
    postgres_cpu_s: float  # every postgres process, over the measured window
    window_s: float

    @property
    def pairs_s(self) -> float:
        return sum(r["pairs"] / r["elapsed_s"] for r in self.results if r["elapsed_s"])

    def admit_ms(self, q: float) -> float:
        return lg.percentile_ms([a / 1e6 for r in self.results for a in r["admit_us"]], q)

    def _sum(self, name: str) -> float:
        return sum(r[name] for r in self.results)

    @property
    def tx_per_admitted(self) -> float:
        return self._sum("transactions") / self._sum("admitted") if self._sum("admitted") else float("nan")

    @property
    def trips_per_admitted(self) -> float:
        return self._sum("round_trips") / self._sum("admitted") if self._sum("admitted") else float("nan")

    @property
    def mean_batch(self) -> float:
        return self._sum("batch_items") / self._sum("batches") if self._sum("batches") else float("nan")

    @property
    def commit_ms(self) -> float:
        return 1000.0 * self._sum("commit_s") / self._sum("batches") if self._sum("batches") else float("nan")

    @property
    def server_per_client(self) -> float:
        return self.server_commits / self.client_transactions if self.client_transactions else float("nan")

    @property
    def server_commits_per_pair(self) -> float:
        return self.server_commits / self.total_pairs if self.total_pairs else float("nan")

    def pct(self, name: str) -> float:
        """Mean over replicas of a thread's CPU as % of its wall time (process_cpu_s: the whole process)."""
        return statistics.fmean(100.0 * r[name] / r["elapsed_s"] for r in self.results)

    @property
    def postgres_pct(self) -> float:
        return 100.0 * self.postgres_cpu_s / self.window_s if self.window_s else float("nan")

    @property
    def postgres_us_per_pair(self) -> float:
        pairs = self.pairs_s * self.window_s
        return 1e6 * self.postgres_cpu_s / pairs if pairs else float("nan")


@dataclass
class PgCell:
    concurrency: int
    replicas: int
    samples: list[PgSample] = field(default_factory=list)

    def med(self, fn) -> float:
        return lg.median([fn(s) for s in self.samples])


class PgBench:
    """The durable PostgreSQL server of the run, and one point on it."""

    def __init__(self) -> None:
        import psycopg  # noqa: F401  (a clear failure before any server starts)

        from tests import postgres as pgfix

        bindir, why = pgfix.find_bindir(os.environ)
        if bindir is None:
            raise SystemExit(f"no PostgreSQL for the --pg points: {why} (or run with --no-pg)")
        pgfix.SERVER_SETTINGS = {**pgfix.SERVER_SETTINGS, **PG_DURABLE}
        self.server = pgfix.PgServer.start(bindir, os.environ)
        self.env = {**os.environ, **self.server.env,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        os.environ.update(self.server.env)
        self.logdir = Path(tempfile.mkdtemp(prefix="bench_ledger_pg_"))

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.logdir, ignore_errors=True)

    @property
    def version(self) -> str:
        with self._connect(self.server.url()) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    def _connect(self, url: str) -> Any:
        from cortex.budget import pg_schema

        return pg_schema.connect(url)

    def server_commits(self, url: str) -> int:
        with self._connect(url) as conn:
            return int(conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0])

    def postgres_cpu(self) -> dict[int, float]:
        """CPU seconds of the postmaster and each of its children (backends, WAL writer, checkpointer...)."""
        root = self.server.process.pid
        out = {root: lg.proc_cpu_s(root)}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == root:
                out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / lg._CLK_TCK
        return out

    async def fresh_ledger(self) -> str:
        """A migrated database with the one key (and its account) every replica uses, made through the service."""
        from cortex.budget import pg_schema
        from cortex.budget.pg_shared import PgShared
        from cortex.budget.shared_service import SharedBudgetService

        url = self.server.url(self.server.create_database())
        with self._connect(url) as conn:
            pg_schema.migrate(conn)
        async with PgShared.open(url, admission=False) as shared:
            service = await SharedBudgetService.load(shared, time.time, BudgetConfig(), GatewayMetrics())
            await service.create_key("bench", "team", Caps(balance_tokens=10**15))
        return url

    def key_totals(self, url: str) -> tuple[int, int]:
        with self._connect(url) as conn:
            return conn.execute("SELECT spent_tokens, held_tokens FROM keys WHERE name = 'bench'").fetchone()

    def run_point(self, url: str, replicas: int, concurrency: int, seconds: float, warm_s: float) -> PgSample:
        time.sleep(PG_STATS_FLUSH_S)  # the set-up's backends have exited and flushed their statistics
        commits0 = self.server_commits(url)
        procs = []
        try:
            for i in range(replicas):
                err = open(self.logdir / f"replica-{i}.log", "wb")
                procs.append((subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--replica", url, "--concurrency", str(concurrency),
                     "--warm-seconds", str(warm_s)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=self.env, cwd=str(REPO_ROOT),
                ), err))
            for i, (p, _) in enumerate(procs):
                self._expect(p, i, "ready", REPLICA_READY_TIMEOUT_S)
            start = time.time() + PG_START_DELAY_S
            for p, _ in procs:
                p.stdin.write((json.dumps({"start": start, "seconds": seconds}) + "\n").encode())
                p.stdin.flush()
            time.sleep(max(0.0, start - time.time()))
            pg0 = self.postgres_cpu()
            t0 = time.perf_counter()
            time.sleep(seconds)
            pg1 = self.postgres_cpu()
            window_s = time.perf_counter() - t0
            results = [self._expect(p, i, "result", seconds + 60) for i, (p, _) in enumerate(procs)]
            closed = [self._expect(p, i, "closed", 60) for i, (p, _) in enumerate(procs)]
            for i, (p, _) in enumerate(procs):
                if p.wait(30) != 0:
                    raise RuntimeError(f"replica {i} exited with {p.returncode}{self._tail(i)}")
        finally:
            for p, err in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                err.close()
        time.sleep(PG_STATS_FLUSH_S)  # the replicas' backends have exited and flushed their statistics
        server = self.server_commits(url) - commits0 - 1  # less the first probe's own
        total_pairs = sum(c["total_pairs"] for c in closed)
        spent, held = self.key_totals(url)
        if held != 0 or spent != total_pairs * ACTUAL_TOKENS:
            raise RuntimeError(f"ledger disagrees: held {held}, spent {spent}, expected {total_pairs * ACTUAL_TOKENS}")
        client = sum(c["transactions"] + c["maintenance_transactions"] for c in closed)
        cpu = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items())
        return PgSample(replicas, results, server, client, total_pairs, cpu, window_s)

    def _tail(self, i: int) -> str:
        try:
            text = (self.logdir / f"replica-{i}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""
        return f"\n--- replica {i} stderr (tail) ---\n{text}"

    def _expect(self, p: subprocess.Popen[bytes], i: int, event: str, timeout_s: float) -> dict[str, Any]:
        """The next JSON line of replica i's stdout, which must be `event`."""
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], timeout_s)
        line = p.stdout.readline() if ready else b""
        try:
            msg = json.loads(line)
        except ValueError:
            msg = {}
        if msg.get("event") != event:
            raise RuntimeError(f"replica {i}: expected {event!r}, got {line[:200]!r}{self._tail(i)}")
        return msg

    def commit_rate(self, connections: int, seconds: float, trivial: bool = False) -> float:
        """Durable commits/s the server takes from `connections` clients at once, none contending on a row:
        each connection loops over cortex_batch(settle its previous hold, reserve one new one) on a key and an
        account of its own -- the real statement, one transaction each. From pg_stat_database.

        `trivial`: a one-row INSERT per transaction instead, into a table of its own per connection: the
        server's ceiling for durable commits (WAL flushes), whatever the statement costs."""
        from cortex.budget import pg_schema
        from cortex.budget.pg_ledger import Hold, PgLedger, Reserve, Resolve

        url = self.server.url(self.server.create_database())
        with self._connect(url) as conn:
            pg_schema.migrate(conn)
            for i in range(connections):
                conn.execute(f"CREATE TABLE bench_commit_{i} (n BIGINT)")
                conn.execute("INSERT INTO accounts (id, created_at) VALUES (%s, 0)", (f"a{i}",))
                conn.execute("INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, balance_tokens)"
                             " VALUES (%s, %s, %s, %s, 'sk', 0, %s)", (f"k{i}", f"a{i}", f"k{i}", f"h{i}".encode(), 10**15))
        time.sleep(PG_STATS_FLUSH_S)
        commits0 = self.server_commits(url)
        ledgers = [PgLedger(pg_schema.connect(url), f"rate-{i}", 30.0) for i in range(connections)]
        stop = [0.0]
        barrier = threading.Barrier(connections + 1)
        errors: list[BaseException] = []

        def loop(ledger: PgLedger, i: int) -> None:
            try:
                held: list[str] = []
                barrier.wait()
                while trivial and time.perf_counter() < stop[0]:
                    ledger.conn.execute(f"INSERT INTO bench_commit_{i} VALUES (1)")
                while not trivial and time.perf_counter() < stop[0]:
                    _, placed = ledger.step([Resolve(h, "settled", ACTUAL_TOKENS) for h in held],
                                            [Reserve(f"h{i}-{ledger.counters.transactions}", f"k{i}", 160, 600.0)], None)
                    assert all(isinstance(p, Hold) for p in placed)
                    held = [p.id for p in placed]
                ledger.step([Resolve(h, "settled", ACTUAL_TOKENS) for h in held], [], None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(lgr, i)) for i, lgr in enumerate(ledgers)]
        for t in threads:
            t.start()
        stop[0] = time.perf_counter() + 10**6
        barrier.wait()
        t0 = time.perf_counter()
        stop[0] = t0 + seconds
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for lgr in ledgers:
            lgr.conn.close()
        if errors:
            raise errors[0]
        time.sleep(PG_STATS_FLUSH_S)
        return (self.server_commits(url) - commits0 - 1) / elapsed


async def run_pg_point(pg: PgBench, replicas: int, concurrency: int, seconds: float) -> PgSample:
    url = await pg.fresh_ledger()
    return await trio.to_thread.run_sync(pg.run_point, url, replicas, concurrency, seconds, min(0.3, seconds / 4))


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def format_table(cells: list[Cell]) -> str:
    rows = [
        "| concurrency | synchronous | pairs/s | admit p50 ms | admit p99 ms | mean batch | commits/s "
        "| writer ms/commit | writer CPU | trio CPU | no-group pairs/s | no-group p50 ms | no-group p99 ms "
        "| vs no-group | all caps pairs/s | all caps p50 ms | all caps / tokens only |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        g = lambda fn: cell.med("group", fn)  # noqa: E731
        b = lambda fn: cell.med("single", fn)  # noqa: E731
        a = lambda fn: cell.med("allcaps", fn)  # noqa: E731
        rows.append(
            f"| {cell.concurrency} | {cell.synchronous} | {lg.fmt(g(lambda s: s.pairs_s), ',.0f')} "
            f"| {lg.fmt(g(lambda s: s.admit_ms(0.5)), '.3f')} | {lg.fmt(g(lambda s: s.admit_ms(0.99)), '.3f')} "
            f"| {lg.fmt(g(lambda s: s.mean_batch), '.1f')} | {lg.fmt(g(lambda s: s.commits_s), ',.0f')} "
            f"| {lg.fmt(g(lambda s: s.commit_ms), '.3f')} | {lg.fmt(g(lambda s: s.pct(s.writer_cpu_s)), '.0f')}% "
            f"| {lg.fmt(g(lambda s: s.pct(s.trio_cpu_s)), '.0f')}% "
            f"| {lg.fmt(b(lambda s: s.pairs_s), ',.0f')} | {lg.fmt(b(lambda s: s.admit_ms(0.5)), '.3f')} "
            f"| {lg.fmt(b(lambda s: s.admit_ms(0.99)), '.3f')} | {lg.fmt(cell.ratio, '.1f')}x "
            f"| {lg.fmt(a(lambda s: s.pairs_s), ',.0f')} | {lg.fmt(a(lambda s: s.admit_ms(0.5)), '.3f')} "
            f"| {lg.fmt(cell.paired('allcaps', 'group'), '.2f')} |"
        )
    return "\n".join(rows)


def format_checks(cells: list[Cell]) -> str:
    lines = ["Checks:"]
    high = [c for c in cells if c.concurrency == TARGET_C]
    if not high:
        lines.append(f"- n/a  >= {TARGET_PAIRS_S:,} pairs/s at c={TARGET_C}: not measured (needs --concurrency {TARGET_C})")
    for cell in high:
        v = cell.med("group", lambda s: s.pairs_s)
        tag = "PASS" if v >= TARGET_PAIRS_S else "MISS"
        lines.append(
            f"- {tag} >= {TARGET_PAIRS_S:,} durable reserve+settle pairs/s at c={TARGET_C}, "
            f"synchronous={cell.synchronous}: {v:,.0f} pairs/s ({v / TARGET_PAIRS_S:.0%} of target)"
        )
        ratio = cell.paired("allcaps", "group")
        tag = "PASS" if ratio >= ALLCAPS_TARGET_RATIO else "MISS"
        lines.append(
            f"- {tag} every cap kind on the key and its account within 20% of token-only at c={TARGET_C}, "
            f"synchronous={cell.synchronous}: ratio {ratio:.2f}"
        )
    return "\n".join(lines)


def pg_ratio(cell: PgCell, cells: list[Cell], mode: str) -> float:
    """Median over repeats of PostgreSQL pairs/s over SQLite's `group` point (same concurrency, same repeat)."""
    base = next((c for c in cells if c.concurrency == cell.concurrency and c.synchronous == mode), None)
    if base is None:
        return float("nan")
    vals = [p.pairs_s / s.pairs_s for p, s in zip(cell.samples, base.samples["group"]) if s.pairs_s]
    return statistics.median(vals) if vals else float("nan")


def format_pg_table(pg_cells: list[PgCell], cells: list[Cell]) -> str:
    rows = [
        "| concurrency per replica | replicas | pairs/s, all replicas | pairs/s per replica | admit p50 ms "
        "| admit p99 ms | mean batch | writer ms / batch | transactions / admitted | round trips / admitted "
        "| server commits / admitted, whole point | server commits / client transactions | vs SQLite full "
        "| vs SQLite normal | replica CPU: trio / writer / process | postgres CPU | postgres CPU µs / pair |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for cell in pg_cells:
        m = cell.med
        rows.append(
            f"| {cell.concurrency} | {cell.replicas} | {lg.fmt(m(lambda s: s.pairs_s), ',.0f')} "
            f"| {lg.fmt(m(lambda s: s.pairs_s / s.replicas), ',.0f')} "
            f"| {lg.fmt(m(lambda s: s.admit_ms(0.5)), '.3f')} | {lg.fmt(m(lambda s: s.admit_ms(0.99)), '.3f')} "
            f"| {lg.fmt(m(lambda s: s.mean_batch), '.1f')} | {lg.fmt(m(lambda s: s.commit_ms), '.2f')} "
            f"| {lg.fmt(m(lambda s: s.tx_per_admitted), '.4f')} "
            f"| {lg.fmt(m(lambda s: s.trips_per_admitted), '.4f')} | {lg.fmt(m(lambda s: s.server_commits_per_pair), '.4f')} "
            f"| {lg.fmt(m(lambda s: s.server_per_client), '.3f')} "
            f"| {lg.fmt(pg_ratio(cell, cells, 'full'), '.2f')} | {lg.fmt(pg_ratio(cell, cells, 'normal'), '.2f')} "
            f"| {lg.fmt(m(lambda s: s.pct('trio_cpu_s')), '.0f')}% / {lg.fmt(m(lambda s: s.pct('writer_cpu_s')), '.0f')}% "
            f"/ {lg.fmt(m(lambda s: s.pct('process_cpu_s')), '.0f')}% | {lg.fmt(m(lambda s: s.postgres_pct), '.0f')}% "
            f"| {lg.fmt(m(lambda s: s.postgres_us_per_pair), '.0f')} |"
        )
    return "\n".join(rows)


def format_pg_checks(pg_cells: list[PgCell], cells: list[Cell], commit_rates: dict[int, float],
                     trivial_rates: dict[int, float] | None = None) -> str:
    lines = ["Checks (PostgreSQL):"]
    high = [c for c in pg_cells if c.concurrency == TARGET_C]
    if not high:
        lines.append(f"- n/a  <= {TARGET_TX_PER_ADMITTED} transactions per admitted request at c={TARGET_C}: not measured")
    for cell in high:
        v = cell.med(lambda s: s.tx_per_admitted)
        tag = "PASS" if v <= TARGET_TX_PER_ADMITTED else "MISS"
        lines.append(f"- {tag} <= {TARGET_TX_PER_ADMITTED} database transactions per admitted request at c={TARGET_C}, "
                     f"{cell.replicas} replica(s): {v:.4f} (round trips {cell.med(lambda s: s.trips_per_admitted):.4f})")
    for cell in high:
        if cell.replicas == 1:
            lines.append(f"- info PostgreSQL, 1 replica, / SQLite at c={TARGET_C} (the ledger path alone; the >= 0.70 "
                         f"target is through the full proxy, scripts/bench_proxy.py): {pg_ratio(cell, cells, 'full'):.2f} "
                         f"of synchronous=full, {pg_ratio(cell, cells, 'normal'):.2f} of synchronous=normal")
    if commit_rates:
        best_n, best = max(commit_rates.items(), key=lambda kv: kv[1])
        rates = ", ".join(f"{n} connection(s) {v:,.0f}" for n, v in commit_rates.items())
        lines.append(f"Primary commit rate (durable, cortex_batch of 1 reserve + 1 settle, no row shared): {rates} "
                     f"commits/s; best {best:,.0f} ({best_n} connections)")
        if trivial_rates:
            rates = ", ".join(f"{n} connection(s) {v:,.0f}" for n, v in trivial_rates.items())
            lines.append(f"Primary commit rate, one-row INSERT per transaction (the WAL-flush ceiling): {rates} commits/s")
        for cell in [c for c in pg_cells if c.replicas == 1]:
            per_adm = cell.med(lambda s: s.tx_per_admitted)
            per_rep = cell.med(lambda s: s.pairs_s)
            tx_s = per_adm * per_rep
            lines.append(
                f"Scaling by commits, c={cell.concurrency}: one replica admits {per_rep:,.0f}/s at {per_adm:.4f} tx each "
                f"= {tx_s:,.0f} tx/s; {best:,.0f} commits/s / {per_adm:.4f} = {best / per_adm:,.0f} admitted requests/s "
                f"in all, about {best / tx_s:,.1f} such replicas")
            us = cell.med(lambda s: s.postgres_us_per_pair)
            lines.append(f"Scaling by server CPU, c={cell.concurrency}: {us:,.0f} µs of postgres CPU per pair = "
                         f"{1e6 / us:,.0f} pairs/s per server core")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Durable reserve+settle pairs/s through BudgetService + ThreadedStore (group commit vs none).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="1 s per point, 1 repeat")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per point (default 3, --quick 1)")
    ap.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                    help="comma-separated concurrency levels (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated SQLite synchronous modes: normal, full, extra (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3, --quick 1)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the one-transaction-per-op baseline")
    ap.add_argument("--pg-replicas", default=",".join(map(str, PG_REPLICAS)),
                    help="comma-separated replica counts on PostgreSQL (default: %(default)s)")
    ap.add_argument("--no-pg", dest="pg", action="store_false", help="SQLite only: skip the PostgreSQL points")
    ap.add_argument("--no-commit-rate", dest="commit_rate", action="store_false",
                    help="skip measuring the PostgreSQL server's commit rate")
    ap.add_argument("--replica", metavar="URL", help=argparse.SUPPRESS)  # a child: one replica on URL
    ap.add_argument("--warm-seconds", type=float, default=0.3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.pg_replicas = lg.parse_concurrency(ap, args.pg_replicas)
    args.concurrency = lg.parse_concurrency(ap, args.concurrency)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("normal", "full", "extra")]
    if bad or not args.modes:
        ap.error(f"unknown synchronous mode(s): {', '.join(bad) or '(none)'}")
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    args.repeats = lg.resolve_repeats(ap, args.repeats, args.quick)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replica:
        trio.run(replica_main, args.replica, args.concurrency[0], args.warm_seconds)
        return 0
    import sqlite3

    pg = PgBench() if args.pg else None
    try:
        cells, pg_cells = trio.run(bench, args, pg)
        commit_rates: dict[int, float] = {}
        trivial_rates: dict[int, float] = {}
        if pg is not None and args.commit_rate:
            for n in COMMIT_RATE_CONNECTIONS:
                commit_rates[n] = pg.commit_rate(n, min(COMMIT_RATE_SECONDS, 2 * args.seconds))
                trivial_rates[n] = pg.commit_rate(n, min(COMMIT_RATE_SECONDS, 2 * args.seconds), trivial=True)
                print(f"postgres commit rate, {n} connection(s): {commit_rates[n]:,.0f} cortex_batch commits/s, "
                      f"{trivial_rates[n]:,.0f} one-row INSERT commits/s", file=sys.stderr, flush=True)
        pg_version = pg.version if pg is not None else ""
    finally:
        if pg is not None:
            pg.close()
    print()
    print(f"Environment: {lg.versions(f'sqlite {sqlite3.sqlite_version}')}; git {lg.git_rev(str(REPO_ROOT))}; "
          f"temp dir {tempfile.gettempdir()}")
    print(f"{args.seconds:g} s per point, {args.repeats} repeat(s), medians; one key, estimate "
          f"{ESTIMATE.total_tokens} tokens, settled at {ACTUAL_TOKENS}")
    print()
    print(format_table(cells))
    print()
    print("pairs/s: durable reserve+settle pairs (the reserve awaits its commit; the settlement rides along with the next one). admit = service.reserve incl. its durable commit. "
          "mean batch = ops jobs per group commit; writer ms/commit = apply+COMMIT time in the writer thread; "
          "CPU = % of wall time on the writer thread / the Trio thread. no-group = one op per transaction "
          "(same writer, schema, ops and synchronous mode); vs no-group = median of paired ratios.")
    print()
    print(format_checks(cells))
    if pg_cells:
        import psycopg

        print()
        print(f"PostgreSQL {pg_version} (fsync, synchronous_commit, full_page_writes on), psycopg {psycopg.__version__}: "
              f"each replica a process of its own (PgShared + SharedBudgetService, background tasks running), "
              f"`concurrency` tasks per replica, one key and one account shared by every replica")
        print()
        print(format_pg_table(pg_cells, cells))
        print()
        print("pairs/s: the replicas' sum. admit = SharedBudgetService.reserve incl. its durable commit (all replicas' "
              "requests together). transactions and round trips per admitted request: the writers' own counts "
              "(PgAdmission.counters) over the measured window, heartbeats included; writer ms / batch: the writer's "
              "PgLedger.step (round trip, the server's work, the durable commit). server commits: pg_stat_database's "
              "xact_commit over the whole point (warm-up, set-up and background included), per pair the replicas "
              "settled in it, and against the replicas' own counts (the directory reads, the listener and the schema "
              "check make the excess). vs SQLite: median of "
              "per-repeat ratios against the group point of the same concurrency. CPU: % of wall time, mean over "
              "replicas; postgres: every server process together.")
        print()
        print(format_pg_checks(pg_cells, cells, commit_rates, trivial_rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
