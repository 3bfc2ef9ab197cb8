"""The simulator: bundled scenarios, determinism, planted bugs, the CLI, live mode.

The upstream kinds and the failover invariants in isolation are in test_sim_kinds.py.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim import runner
from sim.cli import bundled
from sim.scenario import ScenarioError, load, parse
from sim.world import LedgerFaults
from tests.budget_helpers import ADMIN_TOKEN, budget_cortex
from tests.conftest import Stack

# The long scenarios run fewer seeds here, to keep the suite near 12 minutes on 2 cores;
# `cortex-sim fuzz NAME --seeds N` runs as many as wanted (test_fuzz_runs_many_seeds_of_fanout_2000
# runs fanout_2000 on seeds 1-6).
SEEDS = {"mixed_day": (1,), "disconnect_storm": (1,), "fanout_2000": (1,)}


@functools.cache
def bundled_run(name: str, seed: int) -> runner.Result:
    """One run of a bundled scenario, shared by the tests that check it (a run is deterministic
    and the tests only read it); planted-bug runs call runner.run themselves."""
    return runner.run(load(Path("sim/scenarios") / f"{name}.toml"), seed)


def sim_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sim", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


LIFECYCLE = {"cold_start_burst", "eviction_churn", "pinned_under_pressure"}  # run in tests/test_sim_lifecycle.py
REPLICAS = {"replicas_fanout"}  # run in tests/test_sim_replicas.py
BUDGET = {"month_boundary"}  # run in tests/test_sim_budget.py
AGENTS = {"agent_fanout"}  # both output-hold policies: run in tests/test_sim_agents.py
CASES = [(path.stem, seed) for path in bundled() if path.stem not in LIFECYCLE | BUDGET | REPLICAS | AGENTS
         for seed in SEEDS.get(path.stem, (1, 2, 3))]


@pytest.mark.parametrize(("name", "seed"), CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def test_bundled_scenario_holds_every_invariant_and_expectation(name, seed):
    result = bundled_run(name, seed)
    assert result.violation is None, "\n".join(result.recent_events)
    assert result.expectation_failures == []
    assert result.summary["requests"] > 0


def test_the_scenarios_prove_what_they_claim():
    """Spot checks that each scenario exercises its fault, not just passes."""
    storm = bundled_run("disconnect_storm", 1)
    cancelled = [r for r in storm.world.checker.requests.values() if r.outcome == "cancelled"]
    assert cancelled and any(0 < r.received_bytes < r.charged < r.hold_amount for r in cancelled)
    assert any(r.received_bytes == 0 and r.charged == r.hold_amount for r in cancelled)  # non-streamed: the hold
    assert sum(app.counters.cancelled_total for app in storm.world.upstream_apps) >= len(cancelled) // 2
    crash = bundled_run("cortex_restart_recovery", 1)
    orphaned = [r for r in crash.world.checker.requests.values() if r.hold_state == "orphaned"]
    assert orphaned and all(r.charged == r.hold_amount for r in orphaned)
    partition = bundled_run("network_partition", 1)
    assert partition.summary["outcomes"].get("failed", 0) == 0
    assert partition.world.deliveries["n2"] > partition.world.deliveries["n1"]


def trace_events(run: runner.Result, ev: str, /, **match: object) -> list[dict]:
    events = (json.loads(line) for line in run.world.trace.lines)
    return [e for e in events if e["ev"] == ev and all(e.get(k) == v for k, v in match.items())]


def test_replica_failover_proves_what_it_claims():
    scenario = load("sim/scenarios/replica_failover.toml")
    result = bundled_run("replica_failover", 1)
    assert result.ok, result.violation or result.expectation_failures
    records = result.world.checker.requests
    deliveries = trace_events(result, "deliver")
    # v1's 503s: each takes v1 out of rotation for its Retry-After (1 s when it sends none).
    bursts = [f for f in scenario.faults if f.kind == "overload"]
    answers = trace_events(result, "answer", host="v1", status=503)
    assert {next(f for f in bursts if f.at_s <= a["t"] < f.at_s + f.for_s).at_s for a in answers} == {f.at_s for f in bursts}
    for a in answers:
        burst = next(f for f in bursts if f.at_s <= a["t"] < f.at_s + f.for_s)
        cooled = [d for d in deliveries if d["host"] == "v1" and a["t"] + 0.01 < d["t"] < a["t"] + (burst.retry_after_s or 1) - 0.01]
        assert cooled == []
    # Every request that met a fault before its first byte was served by another replica, charged once.
    met = {a["req"]: a["host"] for a in answers + trace_events(result, "attempt")}
    assert {h for h in met.values()} == {"v1", "v2", "n1", "l1"}
    for rid, host in met.items():
        record = records[rid]
        assert record.outcome == "served" and record.served_by not in (None, host) and len(record.tried) == 2
        assert result.world.checker.resolutions[rid] == 1 and record.charged <= record.hold_amount
    assert trace_events(result, "attempt", host="v2", result="reset")
    # l1 was killed between requests, refused connections, and took no traffic until it had loaded again.
    killed, back = trace_events(result, "killed", target="l1")[0]["t"], trace_events(result, "recovered", target="l1")[0]["t"]
    assert trace_events(result, "attempt", host="l1", result="refused")
    assert not [d for d in deliveries if d["host"] == "l1" and killed <= d["t"] < back + 2.0]  # load_s = 2
    assert [d for d in deliveries if d["host"] == "l1" and d["t"] > back + 2.0]
    # n1's deaths after the first byte: an SSE error event, charged what was produced, never re-dispatched.
    cut = [r for r in records.values() if r.code == "stream_error"]
    assert cut and all(r.served_by == "n1" and r.tried == ["n1"] for r in cut)
    assert all(r.received_bytes <= r.charged < r.hold_amount for r in cut)


def test_a_mixed_kind_fleet_holds_the_a0_fanout_cap_exactly():
    import tomllib

    data = tomllib.loads(Path("sim/scenarios/a0_fanout.toml").read_text())
    template = data.pop("neurons")[0]
    data["upstreams"] = [{**template, "name": kind, "kind": kind} for kind in ("neuron", "vllm", "sglang", "llamacpp", "ollama", "tgi", "openai")]
    data["expect"] = {"served": 8, "refused": {"insufficient_quota": 12}}
    result = runner.run(parse(data), 1)
    assert result.ok, result.violation or result.expectation_failures
    spent = next(c for c in result.summary["caps"] if c["principal"] == "key agent")
    assert spent["spent_tokens"] + spent["held_tokens_peak"] > 0 and spent["held_tokens_peak"] <= 1000
    served_by = {u["kind"] for u in result.summary["upstreams"] if u["served"]}
    assert len(served_by) >= 4 and sum(u["delivered"] for u in result.summary["upstreams"]) == 8


def test_a_planted_failover_after_the_first_byte_is_caught(monkeypatch):
    """A proxy that, once a stream is relayed, pretends the upstream reset before its head: the
    simulator must see the second dispatch (and the second upstream's body)."""
    from cortex.fleet.upstream import UpstreamReset
    from cortex.proxy import Proxy

    relay = Proxy._relay

    async def relay_then_fail_over(self, request, gen, node, response, *rest):
        await relay(self, request, gen, node, response, *rest)
        if gen.stream:
            raise UpstreamReset("planted: a reset after the first byte")

    monkeypatch.setattr(Proxy, "_relay", relay_then_fail_over)
    result = runner.run(load("sim/scenarios/replica_failover.toml"), 1)
    assert result.violation is not None
    assert "after its response to the client had begun" in result.violation or "a second generation" in result.violation


def test_same_scenario_and_seed_give_a_byte_identical_trace_in_separate_processes(tmp_path):
    outs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"run{i}"
        result = sim_cli("run", "neuron_crash_midstream", "--seed", "11", "--out", str(out), env={"PYTHONHASHSEED": hash_seed})
        assert result.returncode == 0, result.stdout + result.stderr
        outs.append(out)
    first, second = ((o / "trace.jsonl").read_bytes() for o in outs)
    assert first == second and len(first) > 10_000
    summaries = [json.loads((o / "summary.json").read_text()) for o in outs]
    assert summaries[0]["trace_sha256"] == summaries[1]["trace_sha256"]


def test_different_seeds_give_different_runs():
    assert bundled_run("neuron_crash_midstream", 1).trace_sha256 != bundled_run("neuron_crash_midstream", 2).trace_sha256


PLANTED = [
    ("a0_fanout", "skip_cap_check"), ("fanout_2000", "skip_cap_check"),
    ("a0_fanout", "double_charge"), ("fanout_2000", "double_charge"),
    ("cortex_restart_recovery", "window_amnesia"), ("rolling_window_refill", "window_amnesia"),
]


@pytest.mark.parametrize(("name", "bug"), PLANTED, ids=[f"{n}-{b}" for n, b in PLANTED])
def test_a_planted_ledger_bug_is_caught(name, bug):
    result = runner.run(load(f"sim/scenarios/{name}.toml"), 1, LedgerFaults(**{bug: True}))
    assert result.violation is not None
    assert any(word in result.violation for word in ("balance", "window", "in flight", "in the last", "add up to"))


def test_a_window_bug_the_ledger_cannot_see_is_caught_by_the_checkers_own_count():
    result = runner.run(load("sim/scenarios/rolling_window_refill.toml"), 1, LedgerFaults(window_amnesia=True))
    assert "in the last 10 s" in result.violation  # the ledger's own numbers looked fine


def test_the_cli_reports_a_violation_with_its_seed_time_events_and_reproduce_command():
    result = sim_cli("run", "a0_fanout", "--seed", "4", "--plant-bug", "skip_cap_check")
    assert result.returncode == 1
    assert "INVARIANT VIOLATED in a0_fanout with seed 4 at t=" in result.stdout
    assert "events leading up to it:" in result.stdout and '"ev":"hold"' in result.stdout
    assert "reproduce: cortex-sim run" in result.stdout and "--seed 4" in result.stdout


def test_cli_run_prints_the_summary_and_writes_outputs_and_a_plot(tmp_path):
    result = sim_cli("run", "rolling_window_refill", "--seed", "2", "--out", str(tmp_path), "--plot")
    assert result.returncode == 0, result.stderr
    for needle in ("| served | 10 |", "refused by reason: rate_limit_exceeded 5", "admitted on retry 5",
                   "simulated requests per wall-second", "sha256", "result: PASS"):
        assert needle in result.stdout
    assert (tmp_path / "caps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["ev"] == "send"
    assert json.loads((tmp_path / "summary.json").read_text())["outcomes"] == {"refused": 5, "served": 10}


def test_cli_list_names_every_bundled_scenario():
    result = sim_cli("list")
    assert result.returncode == 0
    for path in bundled():
        assert path.stem in result.stdout
    assert len(bundled()) == 15


def test_fuzz_runs_many_seeds_of_fanout_2000():
    result = sim_cli("fuzz", "fanout_2000", "--seeds", "6", "--jobs", "2")  # more: `cortex-sim fuzz`
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 0 failed" in result.stdout
    assert "6/6 seeds" in result.stderr


def test_fuzz_reports_failing_seeds_with_reproduce_commands(tmp_path):
    scenario = tmp_path / "strict.toml"
    text = Path("sim/scenarios/a0_fanout.toml").read_text().replace("served = 8", "served = 9")
    scenario.write_text(text)
    result = sim_cli("fuzz", str(scenario), "--seeds", "3", "--jobs", "1")
    assert result.returncode == 1
    assert "0 passed, 3 failed" in result.stdout
    assert f"reproduce: cortex-sim run {scenario} --seed 2" in result.stdout


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["workload"][0].update(rate=5), "workload[0].rate"),
        (lambda d: d["workload"][0].update(kind="storm"), "workload[0].kind"),
        (lambda d: d["workload"][0].update(key="ghost"), "workload[0].key"),
        (lambda d: d["workload"][0].update(max_tokens={"min": 9, "max": 3}), "workload[0].max_tokens"),
        (lambda d: d["keys"][0].update(window_tokens=5), "keys[0]"),
        (lambda d: d["neurons"][0].update(slots=0), "neurons[0].slots"),
        (lambda d: d.update(faults=[{"kind": "crash", "target": "nope"}]), "faults[0].target"),
        (lambda d: d.update(expect={"served": "many"}), "expect.served"),
        (lambda d: d.update(bogus=1), "scenario.bogus"),
        (lambda d: d["workload"][0].update(count=10_000_000), "limit"),
        (lambda d: d["workload"][0].update(prompt_bytes={"min": 16}), "workload[0].prompt_bytes"),
        (lambda d: d["workload"][0].update(prompt_bytes=10**11), "workload[0].prompt_bytes"),
        (lambda d: d["workload"][0].update(kind="closed", clients=10**8, duration_s=0.0001, think_s=10), "limit"),
        (lambda d: d["workload"][0].update(think_s=float("nan")), "workload[0].think_s"),
        (lambda d: d["neurons"][0].update(tokens_per_s=float("inf")), "neurons[0].tokens_per_s"),
        (lambda d: d["neurons"][0].update(kind="triton"), "neurons[0].kind"),
        (lambda d: d["neurons"][0].update(token_bytes=4), "neurons[0].token_bytes"),
        (lambda d: d["neurons"][0].update(kind="vllm", output_tokens=100), "neurons[0].output_tokens"),
        (lambda d: d["neurons"][0].update(kind="ollama", load_s=3), "neurons[0].load_s"),
        (lambda d: d["neurons"][0].update(kind="llamacpp", models=["a", "b"]), "neurons[0].models"),
        (lambda d: d["neurons"][0].update(kind="vllm", token_bytes=99), "neurons[0].token_bytes"),
        (lambda d: d.update(upstreams=[{"name": "u"}]), "'upstreams' and 'neurons'"),
        (lambda d: d.update(faults=[{"kind": "overload", "target": "n1", "for_s": 1, "status": 500}]), "faults[0].status"),
        (lambda d: d.update(faults=[{"kind": "overload", "target": "n1"}]), "faults[0].for_s"),
        (lambda d: d.update(faults=[{"kind": "drop", "target": "n1", "retry_after_s": 1}]), "faults[0].retry_after_s"),
        (lambda d: d.update(faults=[{"kind": "reset", "target": "n1", "between_requests": True}]), "faults[0].between_requests"),
        (lambda d: d.update(expect={"failovers": "some"}), "expect.failovers"),
    ],
)
def test_scenario_errors_name_the_bad_key(mutate, key):
    import tomllib

    data = tomllib.loads(Path("sim/scenarios/a0_fanout.toml").read_text())
    mutate(data)
    with pytest.raises(ScenarioError) as info:
        parse(data)
    assert key in str(info.value)


def test_cli_refuses_a_bad_scenario_file_with_status_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndescription = "y"\n[[neurons]]\nname = "n"\ntokens_per_s = -1\n')
    result = sim_cli("run", str(bad))
    assert result.returncode == 2 and "neurons[0].tokens_per_s" in result.stderr
    assert sim_cli("run", "no_such_scenario").returncode == 2


def test_live_mode_drives_a_real_cortex_and_checks_it_from_outside(stack: Stack):
    neuron = stack.neuron("--ttft-ms", "20", "--token-interval-ms", "2")
    cortex = budget_cortex(stack, neuron)
    result = sim_cli("run", "a0_fanout", "--live", "--cortex", cortex.url, "--admin-token", ADMIN_TOKEN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outcomes: {'refused': 12, 'served': 8}" in result.stdout
    assert "result: PASS" in result.stdout
    assert neuron.get_json("/health")["requests_total"] == 8


def test_fuzz_and_live_report_bad_use_without_a_traceback():
    bad_jobs = sim_cli("fuzz", "a0_fanout", "--seeds", "3", "--jobs", "0")
    assert bad_jobs.returncode == 2 and "Traceback" not in bad_jobs.stderr
    unreachable = sim_cli("run", "a0_fanout", "--live", "--cortex", "http://127.0.0.1:1", "--admin-token", "x" * 20)
    assert unreachable.returncode == 2 and "live run failed" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_scenario_file_that_does_not_exist_is_a_scenario_error():
    with pytest.raises(ScenarioError):
        load("/nonexistent/x.toml")
