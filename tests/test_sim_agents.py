"""The simulator under incremental output holds: `agent_fanout` under both policies, the checker's
`extend` handling, the forwarded-within-the-hold invariant and a planted bug it must catch, the
long-tailed reply lengths, and the new scenario keys' errors."""

from __future__ import annotations

import functools
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from cortex.budget.ledger import Caps, Ledger, Refusal
from sim import cli, report, runner
from sim.invariants import Checker, RequestRecord
from sim.scenario import LogNormal, Scenario, ScenarioError, load, parse
from sim.trace import Trace
from sim.world import LedgerFaults, TailedMockEngine

AGENT_FANOUT = Path("sim/scenarios/agent_fanout.toml")
SEEDS = (1, 2, 3)


@functools.cache
def comparison(seed: int) -> runner.Comparison:
    return runner.run_policies(load(AGENT_FANOUT), seed)


def tighter(scenario: Scenario, balance_tokens: int) -> Scenario:
    """The scenario with the agent key's balance set to `balance_tokens`."""
    keys = tuple(replace(k, caps=replace(k.caps, balance_tokens=balance_tokens)) for k in scenario.keys)
    return replace(scenario, keys=keys)


# --- agent_fanout under both policies -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_agent_fanout_holds_every_invariant_under_both_policies_and_incremental_delivers_3x(seed):
    result = comparison(seed)
    assert result.violation is None, "\n".join(result.recent_events)
    assert result.expectation_failures == []
    figures = result.summary["policies"]
    worst, incremental = figures["worst_case"], figures["incremental"]
    for f in figures.values():
        assert f["overshoot_tokens"] == 0 and f["cap_tokens"] == 1_300_000
        assert f["admitted"] + f["refused"] == f["requests"] == 150
    assert worst["extensions"] == worst["truncations"] == worst["waste_tokens"] == worst["undelivered_tokens"] == 0
    assert incremental["admitted"] > 4 * worst["admitted"]
    assert incremental["extensions"] > 0
    # The ratio is the simulator's own figures, recounted here from what the clients received.
    received = {p: sum(r.world.checker.received_tokens(q) for q in r.world.checker.requests.values())
                for p, r in result.results.items()}
    assert received == {p: f["useful_tokens"] for p, f in figures.items()}
    assert result.summary["useful_ratio"] == round(received["incremental"] / received["worst_case"], 4) >= 3


@pytest.mark.parametrize("seed", SEEDS)
def test_a_truncated_reply_ends_cleanly_and_is_charged_its_prompt_and_what_it_delivered(seed):
    run = comparison(seed).results["incremental"]
    figures = run.summary["output_holds"]
    truncated = [r for r in run.world.checker.requests.values() if r.truncated]
    assert len(truncated) == figures["truncations"] == figures["truncations_cortex"]
    for record in truncated:
        assert record.outcome == "served"
        assert record.charged == record.prompt_tokens + record.received_bytes <= record.hold_amount
    # The output cut in transit, by cortex's count, is all the upstream generated that no client received.
    assert figures["waste_tokens"] == figures["undelivered_tokens"]


def test_a_tight_cap_truncates_replies_yet_passes_no_cap_and_forwards_nothing_past_a_hold():
    result = runner.run(runner.with_policy(tighter(load(AGENT_FANOUT), 1_000_000), "incremental"), 1)
    assert result.violation is None, "\n".join(result.recent_events)
    figures = result.summary["output_holds"]
    assert figures["truncations"] >= 10 and figures["extensions_refused"] >= 10 and figures["overshoot_tokens"] == 0


def test_forwarding_past_an_incremental_hold_is_caught_at_the_chunk_that_does_it():
    scenario = runner.with_policy(tighter(load(AGENT_FANOUT), 1_000_000), "incremental")
    result = runner.run(scenario, 1, LedgerFaults(forward_past_hold=True))
    assert result.violation is not None
    assert "output tokens forwarded to its client, but its hold of" in result.violation, result.violation


def test_forward_past_hold_changes_nothing_under_worst_case_holds():
    scenario = runner.with_policy(load(AGENT_FANOUT), "worst_case")
    assert runner.run(scenario, 1, LedgerFaults(forward_past_hold=True)).trace_sha256 == \
        comparison(1).results["worst_case"].trace_sha256


def test_the_same_seed_gives_the_same_runs_under_both_policies():
    again = runner.run_policies(load(AGENT_FANOUT), 1)
    first = comparison(1)
    assert again.trace_sha256 == first.trace_sha256
    assert again.summary["policies"] == first.summary["policies"]
    assert {p: r.trace_sha256 for p, r in again.results.items()} == {p: r.trace_sha256 for p, r in first.results.items()}
    assert first.results["worst_case"].trace_sha256 != first.results["incremental"].trace_sha256


def test_the_report_prints_each_policy_and_the_ratio():
    summary = comparison(1).summary
    table = report.policies_table(summary)
    assert "| worst_case |" in table and "| incremental |" in table
    assert f"useful tokens, incremental / worst_case: {summary['useful_ratio']:.2f}x" in table
    run_table = report.summary_table(summary["runs"]["incremental"])
    assert "output holds: incremental (slices of 1,024)" in run_table and "overshoot 0" in run_table


def test_cli_run_of_a_scenario_with_policies_prints_both_and_writes_the_summary(tmp_path, capsys):
    rc = cli.main(["run", "agent_fanout", "--seed", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "## under worst_case output holds" in out and "## under incremental output holds" in out
    assert "useful tokens, incremental / worst_case:" in out and "result: PASS" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["useful_ratio"] == comparison(1).summary["useful_ratio"]
    assert set(summary["policies"]) == {"worst_case", "incremental"}
    for policy in ("worst_case", "incremental"):
        assert (tmp_path / f"trace.{policy}.jsonl").read_text().count("\n") == summary["runs"][policy]["trace_events"]


# --- the checker's view of extensions ------------------------------------------------------------


@pytest.fixture
def checker() -> Checker:
    c = Checker(Trace())
    c.requests["r1"] = RequestRecord("r1", "k", prompt_tokens=40)
    return c


def ledger_for(checker: Checker, caps: Caps = Caps(), **faults: bool) -> Ledger:
    ledger = Ledger(**faults)
    ledger.add_account("acct")
    ledger.add_key("key1", "acct", caps)
    ledger.observer = checker.on_ledger
    checker.ledger = ledger
    return ledger


async def test_an_extension_grows_what_the_checker_holds_and_a_charge_within_the_grown_hold_is_no_violation(checker):
    ledger = ledger_for(checker, Caps(balance_tokens=1000))
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    ledger.extend("h1", 50, 1.0)
    assert checker.violation is None
    assert checker.tallies[("key", "key1")].held == 150 == checker.requests["r1"].hold_amount
    assert checker.reserved["r1"] == (150, 0) and checker.extensions == 1
    ledger.settle("h1", 140, 2.0)  # more than the hold took when placed, within what it grew to
    assert checker.violation is None
    assert checker.tallies[("key", "key1")].held == 0 and checker.tallies[("key", "key1")].spent == 140


async def test_a_charge_above_the_grown_hold_is_a_violation(checker):
    ledger = ledger_for(checker)
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    hold = ledger.extend("h1", 50, 1.0)
    checker.on_ledger("resolve", replace(hold, charged_tokens=151), 2.0)
    assert "r1 charged 151, outside [0, hold 150]" in checker.violation


async def test_an_extension_past_a_cap_is_a_violation(checker):
    ledger = ledger_for(checker, Caps(balance_tokens=120), fault_skip_cap_check=True)
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    assert checker.violation is None
    ledger.extend("h1", 50, 1.0)
    assert "held 150 > balance 120" in checker.violation


async def test_a_hold_that_grows_outside_an_extension_cannot_hide_a_charge_above_it(checker):
    ledger = ledger_for(checker)
    hold = ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    hold.amount_tokens = 150  # widened behind the ledger's events: no extension reported it
    checker.on_ledger("resolve", replace(hold, charged_tokens=130), 1.0)
    assert "r1 charged 130, outside [0, hold 100]" in checker.violation


async def test_an_extension_of_a_hold_that_is_not_open_is_a_violation(checker):
    ledger = ledger_for(checker)
    hold = ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    ledger.settle("h1", 10, 1.0)
    checker.on_ledger("extend", replace(hold, amount_tokens=150), 2.0)
    assert "a hold that is not open grew" in checker.violation


async def test_a_refused_extension_that_fits_by_the_checkers_count_is_a_violation(checker):
    ledger = ledger_for(checker, Caps(balance_tokens=1000))
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    refusal = Refusal("balance", "key", "key1", "planted", None)
    checker.on_extend_refused("r1", "key1", refusal, 1.0, (50, 0))
    assert "yet it fits by the checker's count: 0 used + 100 held + 50 asked <= 1000" in checker.violation


async def test_a_due_extension_refusal_is_counted_not_a_violation(checker):
    ledger = ledger_for(checker, Caps(balance_tokens=120))
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    refusal = ledger.extend("h1", 50, 1.0)
    assert isinstance(refusal, Refusal)
    checker.on_extend_refused("r1", "key1", refusal, 1.0, (50, 0))
    assert checker.violation is None and checker.extensions_refused == {"balance": 1}


async def test_output_forwarded_within_the_holds_output_part_is_no_violation_and_past_it_is(checker):
    ledger = ledger_for(checker)
    ledger.reserve("h1", "key1", 100, 0.0, 600.0, "r1")
    record = checker.requests["r1"]
    record.received_bytes = 60  # the hold covers 100 - 40 of prompt
    checker.on_forwarded(record)
    assert checker.violation is None
    record.received_bytes = 61
    checker.on_forwarded(record)
    assert "r1: 61 output tokens forwarded to its client, but its hold of 100 covers 40 of prompt and 60 of output" \
        in checker.violation


async def test_output_forwarded_without_a_hold_is_a_violation(checker):
    ledger_for(checker)
    record = checker.requests["r1"]
    record.received_bytes = 1
    checker.on_forwarded(record)
    assert "and it holds no hold" in checker.violation


# --- long-tailed replies ----------------------------------------------------------------------------


def test_a_tailed_mock_reply_is_long_tailed_clamped_and_the_same_for_the_same_request():
    lengths = LogNormal(900, 0.6, 200, 8000)
    engine = TailedMockEngine(seed=7, reply_tokens=900, lengths=lengths)
    rng = random.Random(1)
    prompts = ["".join(rng.choices("abc ", k=64)) for _ in range(1500)]
    sizes = [engine.plan(None, p, 32000, []).tokens for p in prompts]
    assert sizes == [engine.plan(None, p, 32000, []).tokens for p in prompts]
    assert 200 <= min(sizes) and max(sizes) <= 8000
    assert 800 <= statistics.median(sizes) <= 1000 and max(sizes) > 3 * statistics.median(sizes)
    assert statistics.mean(sizes) > statistics.median(sizes)  # the tail is on the right
    assert engine.plan(None, prompts[0], 100, []).tokens <= 100  # max_tokens still cuts it
    other = TailedMockEngine(seed=8, reply_tokens=900, lengths=lengths)
    assert [other.plan(None, p, 32000, []).tokens for p in prompts[:20]] != sizes[:20]  # the engine's seed matters


# --- the new scenario keys ------------------------------------------------------------------------

BASE = {
    "name": "t", "description": "d",
    "keys": [{"name": "k", "balance_tokens": 1000}],
    "upstreams": [{"name": "n1"}],
    "workload": [{"kind": "burst", "key": "k", "count": 1}],
}


def with_(**top: object) -> dict:
    return {**BASE, **top}


def test_policies_set_the_first_policy_and_run_once_each():
    scenario = parse(with_(policies=["incremental", "worst_case"]))
    assert scenario.policies == ("incremental", "worst_case") and scenario.cortex.output_holds == "incremental"
    assert parse(BASE).policies == () and parse(BASE).cortex.output_holds == "worst_case"
    assert parse(with_(cortex={"output_holds": "incremental", "output_slice_tokens": 256})).cortex.output_slice_tokens == 256


@pytest.mark.parametrize(("top", "message"), [
    ({"policies": ["worst_case", "greedy"]}, "'scenario.policies' must be a list of distinct output-hold policies"),
    ({"policies": ["worst_case", "worst_case"]}, "'scenario.policies' must be a list of distinct"),
    ({"policies": []}, "'scenario.policies' must be a list"),
    ({"policies": ["incremental"], "cortex": {"output_holds": "worst_case"}}, "give it or [cortex] output_holds, not both"),
    ({"cortex": {"output_holds": "eager"}}, "'cortex.output_holds' must be one of worst_case, incremental"),
    ({"cortex": {"output_slice_tokens": 0}}, "'cortex.output_slice_tokens' must be an integer"),
    ({"cortex": {"replicas": 2, "output_holds": "incremental"}}, "not modelled on the simulated shared ledger"),
    ({"expect": {"useful_ratio": {"min": 3}}}, "'expect.useful_ratio' compares the output-hold policies"),
    ({"policies": ["incremental"], "expect": {"useful_ratio": {"min": 3}}}, "'expect.useful_ratio' compares"),
    ({"upstreams": [{"name": "v", "kind": "vllm", "reply_tokens": {"median": 9, "sigma": 1, "min": 1, "max": 99}}]},
     "a long-tailed reply length is modelled for a neuron only"),
    ({"upstreams": [{"name": "n1", "reply_tokens": {"median": 900, "sigma": 0.5, "min": 1000, "max": 2000}}]},
     "the median 900 must lie in [min 1000, max 2000]"),
    ({"upstreams": [{"name": "n1", "reply_tokens": {"median": 900, "sigma": 0.5, "min": 100}}]},
     "'upstreams[0].reply_tokens.max' is required"),
    ({"upstreams": [{"name": "n1", "reply_tokens": {"median": 900, "sigma": 9, "min": 1, "max": 2000}}]},
     "'upstreams[0].reply_tokens.sigma' must be at most 4"),
])
def test_bad_output_hold_keys_are_named(top, message):
    with pytest.raises(ScenarioError) as exc:
        parse(with_(**top))
    assert message in str(exc.value)


def test_a_long_tailed_reply_length_parses():
    scenario = parse(with_(upstreams=[{"name": "n1", "reply_tokens": {"median": 900, "sigma": 0.6, "min": 200, "max": 8000}}]))
    assert scenario.upstreams[0].reply_tokens == LogNormal(900.0, 0.6, 200, 8000)
