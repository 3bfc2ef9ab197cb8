"""Run one scenario with one seed in virtual time, and judge it.

Determinism: every random choice comes from a `random.Random` seeded from
(seed, stream name). Trio itself randomises the order of each batch of
ready tasks; we turn on its deterministic-scheduling hook (the one its
Hypothesis plugin uses), which sorts each batch by task creation order and
shuffles it with a generator we seed. Deadline ties, which Trio breaks by
`id()`, then no longer matter: tied tasks land in one batch and are sorted.
The hook is private, so `setup.cfg` pins trio below the next minor release
and `enable_deterministic_scheduling` fails loudly if it is gone.

A scenario with `policies` runs the world once per output-hold policy, same
seed, same requests (`run_policies`), and compares what each delivered for the
same cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from cortex.budget.periods import period_bounds
from sim.invariants import PERIOD_WAIT_TOLERANCE_S, Checker
from sim.scenario import CAP_REFUSALS, Range, Scenario
from sim.world import SETTLE_GRACE_S, LedgerFaults, World, quiet_logs


def enable_deterministic_scheduling(seed: int) -> None:
    run_module = trio._core._run
    if not hasattr(run_module, "_ALLOW_DETERMINISTIC_SCHEDULING") or not hasattr(run_module, "_r"):
        raise RuntimeError("this trio version lacks the deterministic-scheduling hook the simulator relies on")
    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    run_module._r.seed(seed)


@dataclass
class Result:
    scenario: Scenario
    seed: int
    violation: str | None
    expectation_failures: list[str]
    summary: dict[str, Any]
    trace_sha256: str
    recent_events: list[str]
    world: World = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.violation is None and not self.expectation_failures


@dataclass
class Comparison:
    """One scenario and seed run under each of its output-hold policies (`Scenario.policies`)."""

    scenario: Scenario
    seed: int
    results: dict[str, Result]  # by policy, in the scenario's order
    summary: dict[str, Any]
    expectation_failures: list[str]

    @property
    def violation(self) -> str | None:
        return next((f"{r.violation} (under {policy} output holds)" for policy, r in self.results.items() if r.violation), None)

    @property
    def recent_events(self) -> list[str]:
        return next((r.recent_events for r in self.results.values() if r.violation), [])

    @property
    def trace_sha256(self) -> str:
        return str(self.summary["trace_sha256"])

    @property
    def ok(self) -> bool:
        return self.violation is None and not self.expectation_failures


def with_policy(scenario: Scenario, policy: str) -> Scenario:
    """The scenario with cortex's `budget.output_holds` set to `policy`."""
    return dataclasses.replace(scenario, cortex=dataclasses.replace(scenario.cortex, output_holds=policy))


def run_policies(scenario: Scenario, seed: int, faults: LedgerFaults | None = None, keep_samples: bool = False) -> Comparison:
    """The world once per policy of `scenario.policies`, each with the same seed (so the same requests), and what
    each delivered: the incremental/worst_case ratio of useful output tokens, checked against `expect.useful_ratio`."""
    assert scenario.policies, "a scenario without policies runs once: use run()"
    results = {policy: run(with_policy(scenario, policy), seed, faults, keep_samples) for policy in scenario.policies}
    figures = {policy: r.summary["output_holds"] for policy, r in results.items()}
    ratio = useful_ratio(figures)
    digest = hashlib.sha256("".join(f"{policy} {r.trace_sha256}\n" for policy, r in results.items()).encode()).hexdigest()
    summary = {
        "scenario": scenario.name, "seed": seed, "policies": figures, "useful_ratio": ratio,
        "runs": {policy: r.summary for policy, r in results.items()},
        "wall_s": round(sum(r.summary["wall_s"] for r in results.values()), 3), "trace_sha256": digest,
    }
    failures = [f"under {policy} output holds: {f}" for policy, r in results.items() for f in r.expectation_failures]
    if scenario.expect.useful_ratio is not None and all(r.violation is None for r in results.values()):
        if ratio is None:
            failures.append("expected useful_ratio, but worst_case delivered no output to compare with")
        else:
            _check_range(failures, "useful_ratio", scenario.expect.useful_ratio, ratio)
    return Comparison(scenario, seed, results, summary, failures)


def run_any(scenario: Scenario, seed: int, faults: LedgerFaults | None = None, keep_samples: bool = False) -> Result | Comparison:
    """A scenario as its file says: once, or once per output-hold policy."""
    if scenario.policies:
        return run_policies(scenario, seed, faults, keep_samples)
    return run(scenario, seed, faults, keep_samples)


def useful_ratio(figures: dict[str, dict[str, Any]]) -> float | None:
    """Useful output tokens under incremental holds over those under worst_case (None: not both, or none to divide by)."""
    if "incremental" not in figures or "worst_case" not in figures or not figures["worst_case"]["useful_tokens"]:
        return None
    return round(figures["incremental"]["useful_tokens"] / figures["worst_case"]["useful_tokens"], 4)


def output_hold_figures(world: World) -> dict[str, Any]:
    """What the run's output-hold policy delivered for its cap: admissions, refusals, the output the clients
    received (useful tokens) per token of the tightest cap, truncations (as the clients saw them, and as
    cortex counted them), the output generated past a refused extension (cortex's count) and all the output
    the upstreams generated that no client received (the simulator's), extensions, and the overshoot."""
    checker, spec = world.checker, world.scenario.cortex
    requests = list(checker.requests.values())
    useful = sum(checker.received_tokens(r) for r in requests)
    generated = sum(app.counters.tokens_generated_total for app in world.upstream_apps)
    metrics = [app.budget.metrics for app in world.cortex_lives if app.budget is not None]
    cap = _tightest_token_cap(checker)
    return {
        "policy": spec.output_holds,
        "slice_tokens": spec.output_slice_tokens if spec.output_holds == "incremental" else None,
        "cap_tokens": cap,
        "requests": len(requests),
        "admitted": sum(1 for r in requests if r.hold_amount is not None),
        "served": sum(1 for r in requests if r.outcome == "served"),
        "refused": sum(1 for r in requests if r.outcome == "refused"),
        "useful_tokens": useful,
        "useful_per_cap": round(useful / cap, 6) if cap else None,
        "truncations": sum(1 for r in requests if r.truncated),
        "truncations_cortex": round(sum(sum(m.budget_truncations._values.values()) for m in metrics)),
        "waste_tokens": round(sum(sum(m.truncation_waste_tokens._values.values()) for m in metrics)),
        "undelivered_tokens": generated - useful,
        "extensions": checker.extensions,
        "extensions_refused": sum(checker.extensions_refused.values()),
        "overshoot_tokens": checker.overshoot,
    }


def _tightest_token_cap(checker: Checker) -> int | None:
    """The smallest token amount cap (balance, window or period) of any key or account."""
    if checker.ledger is None:
        return None
    caps = [limit for p in checker.ledger.principals.values()
            for limit in (p.caps.balance_tokens, p.caps.window_tokens, p.caps.period_tokens) if limit is not None]
    return min(caps, default=None)


def run(
    scenario: Scenario, seed: int, faults: LedgerFaults | None = None, keep_samples: bool = False, policy: str = "cortex",
) -> Result:
    """`policy`: cortex's eviction policy (placement.POLICIES); only the benchmark changes it."""
    enable_deterministic_scheduling(seed)
    quiet_logs()
    world = World(scenario, seed, faults, policy)
    world.checker.keep_samples = keep_samples
    clock = trio.testing.MockClock(autojump_threshold=0)
    clock.jump(scenario.start_s)  # the scenario's `start` (0: 1970-01-01T00:00:00Z)
    started = time.perf_counter()
    trio.run(_main, world, clock=clock)
    wall_s = time.perf_counter() - started
    if not world.virtual_end_s:  # stopped early, by a violation
        world.virtual_end_s = clock.current_time() - scenario.start_s
    checker = world.checker
    summary = summarize(world, wall_s)
    failures = [] if checker.violation else check_expectations(scenario, checker, summary)
    return Result(scenario, seed, checker.violation, failures, summary, world.trace.sha256, list(world.trace.recent), world)


async def _main(world: World) -> None:
    with trio.CancelScope() as root:
        world.checker.cancel_scope = root
        async with trio.open_nursery() as hosts:
            for name in world.upstream_hosts:
                await world.start_upstream(hosts, name)
            await world.start_cortex(hosts)
            await world.create_principals()
            with trio.move_on_after(world.scenario.horizon_s) as horizon:
                async with trio.open_nursery() as work:
                    for fault in world.scenario.faults:
                        work.start_soon(world.run_fault, fault, hosts)
                    for index, workload in enumerate(world.scenario.workloads):
                        work.start_soon(world.run_workload, index, workload)
            if horizon.cancelled_caught:
                world.checker.fail(f"the scenario did not finish within its horizon of {world.scenario.horizon_s:g} s")
            await trio.sleep(SETTLE_GRACE_S)
            world.virtual_end_s = world.trace.now()
            world.check_memory()
            leaked = world.leaked_tasks()
            await world.stop_cortex()  # every replica that is up
            open_count, states = world.store_states()
            world.checker.check_end(open_count, states, *world.upstream_counts(), leaked, world.upstream_counts_by_name())
            hosts.cancel_scope.cancel()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": round(pick(0.5), 6), "p90": round(pick(0.9), 6), "p99": round(pick(0.99), 6), "max": round(values[-1], 6)}


def summarize(world: World, wall_s: float) -> dict[str, Any]:
    checker = world.checker
    requests = list(checker.requests.values())
    counts = checker.summary_counts()
    caps = []
    ledger = checker.ledger
    if ledger is not None:
        for (kind, pid), p in sorted(ledger.principals.items(), key=lambda item: (item[0][0], checker.names.get(item[0][1], item[0][1]))):
            if p.caps.empty:
                continue
            who = f"{kind} {checker.names.get(pid, pid)}"
            spec = p.caps.period
            caps.append({
                "principal": who,
                "balance_tokens": p.caps.balance_tokens,
                "window_tokens": p.caps.window_tokens,
                "window_seconds": p.caps.window_s,
                "max_concurrency": p.caps.max_concurrency,
                "balance_micro_usd": p.caps.balance_usd,
                "window_micro_usd": p.caps.window_usd,
                "period": f"{spec.kind} ({spec.timezone})" if spec is not None else None,
                "period_tokens": p.caps.period_tokens,
                "period_micro_usd": p.caps.period_usd,
                "spent_tokens": p.spent_tokens,
                "held_tokens_peak": checker.peak_held.get(who, 0),
                "spent_micro_usd": p.spent_usd,
                "held_micro_usd_peak": checker.peak_held_usd.get(who, 0),
            })
    served = [r.latency_s for r in requests if r.outcome == "served"]
    virtual_s = world.virtual_end_s
    cut = [r for r in requests if r.code == "stream_error"]
    served_by = Counter(r.served_by for r in requests)
    upstreams = [
        {"name": u.name, "kind": u.kind, "delivered": world.deliveries[u.name], "served": served_by[u.name]}
        for u in world.scenario.upstreams
    ]
    lifecycle = checker.lifecycle
    by_cap = Counter(refusal.cap for _, refusal in checker.refusals)
    return {
        "scenario": world.scenario.name,
        "seed": world.seed,
        **({"start": world.trace.at(0.0), "end": world.trace.at(virtual_s)} if world.trace.origin else {}),
        "requests": len(requests),
        **counts,
        "refused_by_cap": {cap: by_cap[cap] for cap in CAP_REFUSALS if by_cap[cap]},
        "charged_tokens": sum(r.charged or 0 for r in requests),
        "held_tokens": sum(r.hold_amount or 0 for r in requests),
        "charged_micro_usd": sum(r.charged_usd or 0 for r in requests),
        "held_micro_usd": sum(r.hold_usd or 0 for r in requests),
        "charged_usd": round(sum(r.charged_usd or 0 for r in requests) / 10**6, 6),
        "admitted_on_retry": checker.admitted_on_retry,
        "failovers": sum(1 for r in requests if len(r.tried) > 1),
        "failed_before_first_byte": sum(1 for r in requests if r.outcome == "failed" and r.status != 200),
        "stream_errors": len(cut),
        "partial_charges": sum(1 for r in cut if r.charged is not None and r.hold_amount and 0 < r.charged < r.hold_amount),
        "upstreams": upstreams,
        "loads": sum(lifecycle.loads.values()),
        "load_refusals": lifecycle.load_refusals,
        "evictions": sum(lifecycle.evictions.values()),
        "cold_waits": world.cold_waits,
        "hit_rate": round(1 - world.cold_waits / len(requests), 4) if requests else 1.0,
        "loads_by_model": dict(sorted(lifecycle.loads.items())),
        "evictions_by_model": dict(sorted(lifecycle.evictions.items())),
        "caps": caps,
        "period_edges": period_edges(world),
        "latency_s": _percentiles(served),
        "virtual_s": round(virtual_s, 3),
        "wall_s": round(wall_s, 3),
        "requests_per_wall_s": round(len(requests) / wall_s, 1) if wall_s else 0.0,
        "trace_events": world.trace.count,
        "trace_sha256": world.trace.sha256,
        **world.shared_summary(),
        **({"output_holds": output_hold_figures(world)}
           if world.scenario.policies or world.scenario.cortex.output_holds != "worst_case" else {}),
    }


def period_edges(world: World) -> list[dict[str, Any]]:
    """Each calendar-period boundary the run crossed, per principal with a period cap: the refusals
    its period cap made in the period that ended there, how many of them were told to wait exactly
    until the edge, and the holds placed in the period after it (the checker's record). Run times."""
    checker, ledger, origin = world.checker, world.checker.ledger, world.trace.origin
    if ledger is None:
        return []
    rows = []
    for (kind, pid), p in sorted(ledger.principals.items(), key=lambda item: (item[0][0], checker.names.get(item[0][1], item[0][1]))):
        spec = p.caps.period
        if spec is None:
            continue
        refusals = [r for _, r in checker.refusals if r.principal == (kind, pid) and r.cap.startswith("period")]
        holds = checker.holds_at.get((kind, pid), [])
        start, edge = (t - origin for t in period_bounds(spec, origin))
        while edge <= world.virtual_end_s:
            after = period_bounds(spec, origin + edge)[1] - origin
            before = [r for r in refusals if start <= r.at < edge]
            waited = [r for r in before if r.wait_s is not None and abs(r.at + r.wait_s - edge) < PERIOD_WAIT_TOLERANCE_S]
            rows.append({
                "principal": f"{kind} {checker.names.get(pid, pid)}",
                "period": f"{spec.kind} ({spec.timezone})",
                "edge": world.trace.at(edge),
                "edge_t": round(edge, 6),
                "refused_before": len(before),
                "waited_for_edge": len(waited),
                "admitted_after": sum(1 for t in holds if edge <= t < after),
            })
            start, edge = edge, after
    return rows


def _check_range(failures: list[str], name: str, expected: Range | None, actual: float) -> None:
    if expected is not None and not expected.contains(actual):
        bounds = f"{expected.low:g}" if expected.low == expected.high else f"[{expected.low:g}, {expected.high:g}]"
        failures.append(f"expected {name} {bounds}, got {actual:g}")


def check_expectations(scenario: Scenario, checker: Checker, summary: dict[str, Any]) -> list[str]:
    expect = scenario.expect
    outcomes, refused = summary["outcomes"], summary["refused"]
    failures: list[str] = []
    _check_range(failures, "served", expect.served, outcomes.get("served", 0))
    _check_range(failures, "failed", expect.failed, outcomes.get("failed", 0))
    _check_range(failures, "cancelled", expect.cancelled, outcomes.get("cancelled", 0))
    _check_range(failures, "charged_tokens", expect.charged_tokens, summary["charged_tokens"])
    for name in ("admitted_on_retry", "failovers", "failed_before_first_byte", "stream_errors", "partial_charges",
                 "loads", "load_refusals", "evictions", "cold_waits", "hit_rate"):
        if name in summary:  # live mode sees no failovers
            _check_range(failures, name, getattr(expect, name), summary[name])
    for reason, expected in expect.refused.items():
        _check_range(failures, f"refused {reason}", expected, refused.get(reason, 0))
    for cap, expected in expect.refused_by_cap.items():
        _check_range(failures, f"refused by the {cap} cap", expected, summary.get("refused_by_cap", {}).get(cap, 0))
    if "charged_usd" in summary:
        _check_range(failures, "charged_usd", expect.charged_usd, summary["charged_usd"])
    return failures
