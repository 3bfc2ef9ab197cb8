#!/usr/bin/env python3
"""Benchmark the eviction policy: the `eviction_churn` hit rate, cortex against plain LRU and random.

Runs the simulator's `eviction_churn` scenario (16 models over two 4 GiB
neurons, Zipf demand, the three most asked-for models marked priority 200 and
the four least asked-for 50) once per seed under each policy of
`cortex.fleet.placement` (the real cortex lifecycle, only the victim choice
differs): "cortex" (priority, then fewest evictions, then LRU), "lru" (plain
least-recently-used, priorities ignored) and "random" (seeded). The hit rate
is the share of client requests that did not wait on a cold load. Same seeds,
same run, baseline plain LRU. Prints medians over the seeds.

    python scripts/bench_eviction.py                       # 5 seeds, 120 s of virtual traffic each
    python scripts/bench_eviction.py --seeds 9 --duration-s 300 --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cortex.fleet.placement import POLICIES  # noqa: E402
from sim import runner  # noqa: E402
from sim.scenario import load  # noqa: E402

SCENARIO = Path(__file__).resolve().parent.parent / "sim" / "scenarios" / "eviction_churn.toml"
FIELDS = ("hit_rate", "requests", "served", "failed", "loads", "evictions")


def one(policy: str, seed: int, duration_s: float) -> dict[str, float]:
    scenario = load(SCENARIO)
    scenario = dataclasses.replace(scenario, workloads=tuple(dataclasses.replace(w, duration_s=duration_s)
                                                             for w in scenario.workloads))
    result = runner.run(scenario, seed, policy=policy)
    if result.violation is not None:
        raise SystemExit(f"{policy} seed {seed}: invariant violated: {result.violation}")
    s = result.summary
    outcomes = s["outcomes"]
    return {"hit_rate": s["hit_rate"], "requests": s["requests"], "served": outcomes.get("served", 0),
            "failed": outcomes.get("failed", 0), "loads": s["loads"], "evictions": s["evictions"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=120.0, help="virtual seconds of closed-loop traffic per run")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.duration_s <= 0:
        ap.error("--seeds and --jobs must be at least 1, --duration-s above 0")
    seeds = range(1, args.seeds + 1)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(p, s): pool.submit(one, p, s, args.duration_s) for p in POLICIES for s in seeds}
        runs = {key: future.result() for key, future in futures.items()}
    medians = {p: {f: statistics.median(runs[(p, s)][f] for s in seeds) for f in FIELDS} for p in POLICIES}
    wins = {p: sum(runs[(p, s)]["hit_rate"] > runs[("lru", s)]["hit_rate"] for s in seeds) for p in POLICIES}
    base = medians["lru"]["hit_rate"]
    print(f"`eviction_churn`: 16 models, 2 neurons × 4 GiB, Zipf demand, {args.duration_s:g} s of virtual traffic; "
          f"median of {args.seeds} seeds (the same seeds for every policy)\n")
    print("| policy | hit rate | vs plain LRU | seeds above LRU | requests | served | failed | loads | evictions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in POLICIES:
        m = medians[p]
        ratio = f"{m['hit_rate'] / base:.2f}×" if base else "n/a"
        print(f"| {p} | {m['hit_rate']:.1%} | {ratio} | {wins[p] if p != 'lru' else '—'}/{args.seeds} | "
              f"{m['requests']:,.0f} | {m['served']:,.0f} | {m['failed']:,.0f} | {m['loads']:,.0f} | {m['evictions']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
