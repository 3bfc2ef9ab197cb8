#!/usr/bin/env python3
"""Benchmark the eviction decision: `cortex.fleet.placement.place` on simulated fleets.

Each point builds a fleet of N neurons holding M models in all (every neuron
full, random sizes, priorities and last-use times, some in flight, some
pinned) and times `place` for a model that fits nowhere without evicting,
so every call searches for the cheapest eviction. Baseline in the same run:
the smallest fleet. Prints medians over repeats of the per-decision time.

    python scripts/bench_placement.py                 # 10/100, 10/30 and 20/200 neurons/models
    python scripts/bench_placement.py --repeats 9
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cortex.fleet.placement import NeuronView, Plan, Resident, Wanted, place  # noqa: E402

GIB = 2**30
POINTS = ((10, 30), (10, 100), (20, 200))  # (neurons, models)


def fleet(neurons: int, models: int, rng: random.Random) -> list[NeuronView]:
    per = models // neurons
    views = []
    for n in range(neurons):
        residents = tuple(
            Resident(f"m{n}-{i}", "ready", rng.randint(2, 16) * GIB, in_flight=rng.choice((0, 0, 0, 1)),
                     last_used=rng.uniform(0, 1000), priority=rng.choice((10, 50, 100)), pinned_here=rng.random() < 0.1)
            for i in range(per)
        )
        total = sum(r.memory_bytes for r in residents)
        views.append(NeuronView(f"http://n{n}", total, 0, residents))
    return views


def time_point(neurons: int, models: int, calls: int, rng: random.Random) -> tuple[float, float]:
    views = fleet(neurons, models, rng)
    wanted = Wanted("cold", 24 * GIB, priority=100)
    start = time.perf_counter()
    plans = 0
    for _ in range(calls):
        plans += isinstance(place(views, wanted), Plan)
    per_us = (time.perf_counter() - start) / calls * 1e6
    return per_us, plans / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    for neurons, models in POINTS:
        runs = [time_point(neurons, models, args.calls, rng) for _ in range(args.repeats)]
        rows.append((neurons, models, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    base = rows[0][2]
    print(f"`place` for a cold 24 GiB model on full fleets; median of {args.repeats} fleets × {args.calls} calls\n")
    print("| neurons | models | µs per decision | vs 10/30 | decisions with a plan |")
    print("|---:|---:|---:|---:|---:|")
    for neurons, models, us, planned in rows:
        print(f"| {neurons} | {models} | {us:,.1f} | {us / base:.2f}× | {planned:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
