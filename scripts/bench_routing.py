#!/usr/bin/env python3
"""Benchmark cortex's routing decision at 10, 100 and 1,000 upstreams.

Question: what does picking an upstream cost per request as the fleet
grows? The issue's target: under 50 µs per request at 100 upstreams.

What it does
------------
In process, no network: cortex's real registry (`cortex.fleet.registry.Fleet`)
holds N simulated upstreams of mixed kinds (neuron, vllm, llamacpp, ollama,
sglang, tgi, openai, in turn), each serving 1 to 3 of 8 models, as the poller
would leave them: about 20 % unhealthy (two failed polls), about 5 % cooling
down after an overload. Then, per request, exactly the registry calls the
proxy makes before dispatch (cortex/proxy.py):

    fleet.knows(model)                       # generate(): is the model served at all
    fleet.model_info(model)                  # the estimate's limits
    node = fleet.route(model, now=now)       # _dispatch(): least in flight among the healthy
    fleet.token_bytes_max(node, model)       # the meter's bound for this upstream's tokenizer
    fleet.acquire(node)

timed together as one decision (`time.perf_counter_ns` around the four),
and `route` alone beside it. Between decisions, in-flight counts change: a
random earlier request is released (`fleet.release`), so about 2 x N requests
stay in flight and every pick sees different counts. Models are drawn
uniformly per request among those some healthy upstream serves.

Each size runs `--repeats` rounds of `--decisions` picks; sizes take turns
within each round, so drift hits them alike. The table gives the median and
p90 per decision over every pick of every round, `route` alone, and the
ratio of the median to the 10-upstream median measured in the same run.

`--profile N` runs the decision loop at N upstreams under cProfile and
prints where the time goes.

Usage
-----
    python scripts/bench_routing.py                   # sizes 10,100,1000 (~20 s)
    python scripts/bench_routing.py --quick           # fewer picks, one round
    python scripts/bench_routing.py --sizes 10,100,1000,5000 --repeats 9
    python scripts/bench_routing.py --profile 100
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cortex.config import UpstreamSpec  # noqa: E402
from cortex.fleet.kinds import KINDS  # noqa: E402
from cortex.fleet.registry import Fleet, ModelInfo, Node  # noqa: E402

MODELS = tuple(f"model-{i}" for i in range(8))
UNHEALTHY_SHARE = 0.2
COOLING_SHARE = 0.05
IN_FLIGHT_PER_UPSTREAM = 2  # requests kept in flight, per upstream, while picking
TARGET_US_AT_100 = 50.0


@dataclass
class Bench:
    """One fleet of `size` upstreams and its requests in flight."""

    size: int
    rng: random.Random
    fleet: Fleet = field(init=False)
    in_flight: list[Node] = field(default_factory=list)
    now: float = 1000.0
    decision_ns: list[int] = field(default_factory=list)
    route_ns: list[int] = field(default_factory=list)
    models: tuple[str, ...] = ()  # those some upstream serves: what clients ask for

    def __post_init__(self) -> None:
        kinds = list(KINDS)
        specs = [UpstreamSpec(f"http://upstream-{i}:8000", kinds[i % len(kinds)]) for i in range(self.size)]
        self.fleet = Fleet(specs, unhealthy_after_failures=2)
        for node in self.fleet.nodes:
            served = self.rng.sample(MODELS, self.rng.randint(1, 3))
            self.fleet.poll_succeeded(node.url, {m: ModelInfo(m, 8192 << self.rng.randint(0, 3), 2048) for m in served})
            draw = self.rng.random()
            if draw < UNHEALTHY_SHARE:
                self.fleet.poll_failed(node.url, "simulated")
                self.fleet.poll_failed(node.url, "simulated")
            elif draw < UNHEALTHY_SHARE + COOLING_SHARE:
                self.fleet.cool_down(node.url, self.now + 3600)
        self.models = tuple(m for m in MODELS if self.fleet.route(m, now=self.now) is not None)
        assert self.models, "no model has a healthy upstream"
        self._warm()

    def _warm(self) -> None:
        while len(self.in_flight) < IN_FLIGHT_PER_UPSTREAM * self.size:
            node = self.fleet.route(self.rng.choice(self.models), now=self.now)
            if node is not None:
                self.fleet.acquire(node)
                self.in_flight.append(node)

    def run(self, decisions: int, record: bool = True) -> None:
        fleet, rng, clock = self.fleet, self.rng, time.perf_counter_ns
        models = self.models
        for _ in range(decisions):
            model = rng.choice(models)
            started = clock()
            fleet.knows(model)
            fleet.model_info(model)
            node = fleet.route(model, now=self.now)
            if node is not None:
                fleet.token_bytes_max(node, model)
                fleet.acquire(node)
            ended = clock()
            fleet.route(model, now=self.now)
            route_ended = clock()
            if record:
                self.decision_ns.append(ended - started)
                self.route_ns.append(route_ended - ended)
            self.now += 0.001
            if node is None:
                continue
            # In-flight counts change between picks: this one starts, a random earlier one finishes.
            self.in_flight.append(node)
            fleet.release(self.in_flight.pop(rng.randrange(len(self.in_flight))))


def quantile_us(values_ns: list[int], q: float) -> float:
    ordered = sorted(values_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def table(benches: list[Bench]) -> str:
    base = statistics.median(benches[0].decision_ns) / 1000
    lines = [
        "| upstreams | healthy | decision median (µs) | decision p90 (µs) | route() alone median (µs) | vs 10 upstreams |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in benches:
        median_us = statistics.median(b.decision_ns) / 1000
        healthy = sum(n.healthy and n.cool_until <= b.now for n in b.fleet.nodes)
        lines.append(
            f"| {b.size:,} | {healthy:,} | {median_us:.2f} | {quantile_us(b.decision_ns, 0.9):.2f} | "
            f"{statistics.median(b.route_ns) / 1000:.2f} | {median_us / base:.1f}x |"
        )
    return "\n".join(lines)


def profile(size: int, decisions: int) -> None:
    bench = Bench(size, random.Random(size))
    profiler = cProfile.Profile()
    profiler.enable()
    bench.run(decisions, record=False)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    print(f"cProfile of {decisions:,} picks at {size:,} upstreams (own time first):\n")
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="fleet sizes; the first is the baseline")
    ap.add_argument("--decisions", type=int, default=4000, help="picks per size per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds")
    ap.add_argument("--quick", action="store_true", help="1 round of 1,000 picks")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", type=int, metavar="N", help="profile the picks at N upstreams instead")
    args = ap.parse_args(argv)
    if args.quick:
        args.decisions, args.repeats = 1000, 1
    if args.profile:
        profile(args.profile, args.decisions * args.repeats)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if not sizes or min(sizes) < 1 or args.decisions < 1 or args.repeats < 1:
        ap.error("sizes, --decisions and --repeats must be positive")
    benches = [Bench(size, random.Random(f"{args.seed}:{size}")) for size in sizes]
    for bench in benches:
        bench.run(200, record=False)  # warm-up: caches, branch predictors, allocator
    for _ in range(args.repeats):
        for bench in benches:
            bench.run(args.decisions)
    print(f"routing decision: knows + model_info + route + token_bytes_max + acquire, per request ({args.repeats} x {args.decisions:,} picks "
          f"per size; {len(MODELS)} models; ~{UNHEALTHY_SHARE:.0%} unhealthy, ~{COOLING_SHARE:.0%} cooling down)")
    print(f"python {platform.python_version()} on {platform.machine()}\n")
    print(table(benches))
    at_100 = next((b for b in benches if b.size == 100), None)
    if at_100 is not None:
        median_us = statistics.median(at_100.decision_ns) / 1000
        verdict = "meets" if median_us < TARGET_US_AT_100 else f"misses by {median_us - TARGET_US_AT_100:.1f} µs"
        print(f"\ntarget: under {TARGET_US_AT_100:g} µs per request at 100 upstreams: {median_us:.2f} µs, {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
