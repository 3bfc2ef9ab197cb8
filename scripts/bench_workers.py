#!/usr/bin/env python3
"""Benchmark `cortex serve --workers N`: where do more processes on one host pay?

Question: one cortex process is one core of Python. With N worker processes on one port (SO_REUSEPORT)
sharing one ledger through the cross-replica protocol, how does throughput through the full proxy path
(budgets on) change, on the data dir's SQLite (workers share the file: each batch one IMMEDIATE
transaction) and on PostgreSQL? Against: one process on the same ledger kind, in the same run.

What it does: one mock neuron (`--reply-tokens 16`), then, for each configuration in turn, a cortex with
budgets on (its own data dir, or its own PostgreSQL database), a key with a huge balance, and the same
non-streamed chat request at concurrency 1, 16 and 64 (scripts/_loadgen.py: one h11 connection per
worker, a time cap per point). The configurations, each measured in every repeat, the order rotated:

    sqlite   cortex serve                  (the in-memory judge, ThreadedStore)   <- the baseline
    sqlite/2 cortex serve --workers 2      (SqliteShared)
    pg       cortex serve --ledger URL     (PgShared)
    pg/2     cortex serve --ledger URL --workers 2

The machine has 2 cores, which the neuron, the load generator (and PostgreSQL) share with cortex, so more
workers can only pay where cortex's own CPU is the bottleneck. Medians over repeats; ratios per repeat.

    python scripts/bench_workers.py                # 3 repeats, 4 s per point
    python scripts/bench_workers.py --quick        # 1 repeat, 2 s per point
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _loadgen as lg  # noqa: E402
import bench_proxy as bp  # noqa: E402

CONCURRENCY = (1, 16, 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.seconds = 1, 2.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    py = sys.executable
    neuron = lg.Daemon("neuron", [py, "-m", "neuron", "serve", "--listen", "127.0.0.1:0", "--reply-tokens", "16"],
                       stderr_path=str(tmp / "neuron.log"), env=env)
    neuron.wait_listening(60)
    configs: dict[str, list[str]] = {"sqlite": [], "sqlite/2": ["--workers", "2"]}
    server = None
    if not args.no_pg and not bp.pg_unavailable():
        server, url = bp.start_postgres(env)
        configs["pg"] = ["--ledger", url]
        configs["pg/2"] = ["--ledger", url, "--workers", "2"]
    daemons: dict[str, tuple[lg.Daemon, str]] = {}
    try:
        for name, extra in configs.items():
            data_dir = str(tmp / f"data-{name.replace('/', '-')}")
            where = ["--ledger", extra[1]] if extra[:1] == ["--ledger"] else ["--data-dir", data_dir]
            key = bp.create_key(env, *where)
            daemon = lg.Daemon(name, [py, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--neuron", neuron.url,
                                      "--data-dir", data_dir, *extra], stderr_path=str(tmp / f"{name.replace('/', '-')}.log"),
                               env=env)
            daemon.wait_listening(60)
            daemons[name] = (daemon, key)
        rps: dict[tuple[str, int], list[float]] = {}
        ratios: dict[tuple[str, int], list[float]] = {}
        names = list(daemons)
        for r in range(args.repeats):
            for c in CONCURRENCY:
                got: dict[str, float] = {}
                for name in names[r % len(names):] + names[:r % len(names)]:
                    daemon, key = daemons[name]
                    host, port = daemon.host_port
                    req = bp.make_req("on", host, port, False, 16, (("authorization", f"Bearer {key}"),))
                    lg.progress(f"repeat {r + 1}/{args.repeats}, c={c}, {name}")
                    result = trio.run(lg.run_point, req, c, 10**9, args.seconds)
                    if result.errors:
                        raise SystemExit(f"{name} c={c}: {result.errors} errors, first: {result.first_error}")
                    got[name] = result.rps
                    rps.setdefault((name, c), []).append(result.rps)
                for name in names:
                    base = "sqlite" if name.startswith("sqlite") else "pg"
                    ratios.setdefault((name, c), []).append(got[name] / got[base])
        print(f"\n## `cortex serve --workers N`: requests/s through the full proxy path, budgets on "
              f"(non-streamed, 16 output tokens; {args.repeats} repeats x {args.seconds:g} s per point; medians)\n")
        print("| concurrency | " + " | ".join(names) + " | sqlite/2 vs sqlite |"
              + (" pg/2 vs pg |" if "pg" in daemons else ""))
        print("| --- |" + " --- |" * len(names) + " --- |" + (" --- |" if "pg" in daemons else ""))
        for c in CONCURRENCY:
            cells = [f"{statistics.median(rps[(n, c)]):,.0f}" for n in names]
            line = f"| {c} | " + " | ".join(cells) + f" | {statistics.median(ratios[('sqlite/2', c)]):.2f} |"
            if "pg" in daemons:
                line += f" {statistics.median(ratios[('pg/2', c)]):.2f} |"
            print(line)
        print(f"\n{lg.versions()}")
    finally:
        for daemon, _ in daemons.values():
            daemon.stop()
        neuron.stop()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
