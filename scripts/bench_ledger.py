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

Targets: >= 10,000 durable reserve+settle pairs/s at concurrency 256; with
every cap kind, within 20% of the token-only figure (ratio >= 0.80).

Usage
-----
    python scripts/bench_ledger.py                     # full run (~1.5 min)
    python scripts/bench_ledger.py --quick             # 1 s per point, 1 repeat
    python scripts/bench_ledger.py --seconds 5 --concurrency 1,64,256 --modes full
    python scripts/bench_ledger.py --no-baseline       # group commit only

For a profile, run one point under py-spy, e.g.
``py-spy record -o prof.txt --format raw --threads -- python scripts/bench_ledger.py --quick --concurrency 256 --modes full --no-baseline``.
"""

from __future__ import annotations

import argparse
import statistics
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


async def bench(args) -> list[Cell]:
    cells = {(c, m): Cell(c, m) for c in args.concurrency for m in args.modes}
    for r in range(args.repeats):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        if not args.baseline:
            order = tuple(v for v in order if v != "single")
        for c in args.concurrency:
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
    return list(cells.values())


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
    args = ap.parse_args(argv)
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
    import sqlite3

    cells = trio.run(bench, args)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
