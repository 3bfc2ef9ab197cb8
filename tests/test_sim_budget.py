"""The simulator and money and calendar-period caps: the scenario keys, the new invariants, month_boundary.

Every new check of the checker is shown to fail on a bug planted in the real ledger: the
ledger's own fault flags where they fit, otherwise a monkeypatch of the one function the bug
lives in (all from this side: cortex/ carries no hook for them).
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from cortex.budget import ledger as ledger_mod
from cortex.budget.ledger import Ledger, Principal
from cortex.budget.periods import PeriodSpec, period_bounds
from sim import runner
from sim.scenario import Scenario, ScenarioError, load, parse
from sim.world import LedgerFaults
from tests.test_sim import sim_cli

SCENARIOS = Path("sim/scenarios")
MONTH_EDGE_S = datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()  # month_boundary's monthly caps (UTC)
AZORES_EDGE_S = datetime(2027, 1, 1, 1, tzinfo=timezone.utc).timestamp()  # its daily cap: midnight in Atlantic/Azores
# A request of `burst` holds 7 + 4 + 3 = 14 prompt tokens and 100 output tokens: 114 tokens, and at
# $2 / $8 per 1M tokens 14 x 2 + 100 x 8 = 828 micro-USD. Four fit under $0.004; the fifth does not.
HOLD_USD = 828


@functools.lru_cache(maxsize=None)
def month_boundary(seed: int) -> runner.Result:
    return runner.run(load(SCENARIOS / "month_boundary.toml"), seed)


def burst(at_s: float = 1.0, count: int = 20, key: str = "k") -> dict[str, Any]:
    return {"kind": "burst", "key": key, "at_s": at_s, "count": count, "prompt_bytes": 7, "max_tokens": 100,
            "stream_share": 0.5}


def small(caps: dict[str, Any], account: dict[str, Any] | None = None, workload: list | None = None, **top: Any) -> dict[str, Any]:
    """One key `k` (with `caps`, on account `acct` when its caps are given) on one neuron, one priced model."""
    data: dict[str, Any] = {
        "name": "plant", "description": "a small priced scenario for planted bugs", "horizon_s": 120,
        "keys": [{"name": "k", **caps, **({"account": "acct"} if account is not None else {})}],
        "neurons": [{"name": "n1", "ttft_ms": 20, "tokens_per_s": 500, "chunk_tokens": 8}],
        "models": [{"id": "cortex-mock", "cost": {"input": 2.0, "output": 8.0}}],
        "workload": workload or [burst()],
        **top,
    }
    if account is not None:
        data["accounts"] = [{"id": "acct", **account}]
    return data


def run(data: dict[str, Any] | Scenario, faults: LedgerFaults | None = None) -> runner.Result:
    return runner.run(data if isinstance(data, Scenario) else parse(data), 1, faults)


# --- month_boundary ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", (1, 2, 3))
def test_month_boundary_holds_every_invariant_and_expectation(seed):
    result = month_boundary(seed)
    assert result.violation is None, "\n".join(result.recent_events)
    assert result.expectation_failures == []
    assert result.summary["start"] == "2026-12-31T23:58:00.000Z"


@pytest.mark.parametrize(("keys", "edge_s"), [(("monthly", "team_a", "team_b"), MONTH_EDGE_S), (("azores",), AZORES_EDGE_S)])
def test_period_refusals_before_the_edge_wait_exactly_for_it_and_are_admitted_after(keys, edge_s):
    result = month_boundary(1)
    origin = result.scenario.start_s
    records = [r for r in result.world.checker.requests.values() if r.key in keys]
    waiting = [r for r in records if r.refusal is not None and r.refusal.cap.startswith("period")
               and r.refusal.wait_s is not None and origin + r.refusal.at < edge_s]
    assert len(waiting) >= 10
    for r in waiting:  # the Retry-After the client received, from the instant cortex refused
        refused_s = origin + r.refusal.at
        assert edge_s - 1e-6 <= refused_s + r.retry_after_s < edge_s + 1  # whole seconds, rounded up
        assert edge_s - 1e-6 <= refused_s + r.retry_after_ms / 1000 < edge_s + 0.001
    admitted = [r for r in records if r.reserved_at is not None and origin + r.reserved_at >= edge_s]
    assert admitted and all(r.outcome == "served" for r in admitted)
    on_the_edge = [r for r in admitted if origin + r.reserved_at < edge_s + 0.1]  # the clients that waited
    assert len(on_the_edge) >= 5


def test_the_azores_day_ignores_midnight_utc():
    """Refused across 00:00Z, told to wait for 01:00Z, and nothing admitted in between."""
    result = month_boundary(1)
    origin = result.scenario.start_s
    azores = [r for r in result.world.checker.requests.values() if r.key == "azores"]
    between = [r for r in azores if r.refusal is not None and MONTH_EDGE_S <= origin + r.refusal.at < AZORES_EDGE_S]
    assert len(between) >= 20 and all(r.refusal.cap == "period" for r in between)
    spent = min(r.refusal.at for r in azores if r.refusal is not None and r.refusal.wait_s is not None)
    assert origin + spent < MONTH_EDGE_S
    assert not [r for r in azores if r.reserved_at is not None and spent <= r.reserved_at < AZORES_EDGE_S - origin]


def test_month_boundary_reports_refusals_before_and_admissions_after_each_edge():
    result = month_boundary(1)
    edges = {(e["principal"], e["edge"]): e for e in result.summary["period_edges"]}
    assert set(edges) == {
        ("account team", "2027-01-01T00:00:00.000Z"), ("key monthly", "2027-01-01T00:00:00.000Z"),
        ("key azores", "2027-01-01T01:00:00.000Z"),
    }
    for edge in edges.values():
        assert edge["waited_for_edge"] >= 5 and edge["admitted_after"] >= 5
    refusals = [json.loads(line) for line in result.world.trace.lines if '"ev":"refuse"' in line]
    assert {e["cap"] for e in refusals} == {"period", "period_usd"}
    assert any(e["who"] == "account team" and e["cap"] == "period_usd" for e in refusals)


def test_month_boundary_reproduces_from_its_seed_in_another_process(tmp_path):
    """The CLI in a process with its own hash seed writes this process's trace, byte for byte."""
    cli = sim_cli("run", "month_boundary", "--seed", "1", "--out", str(tmp_path), env={"PYTHONHASHSEED": "12345"})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "| 2027-01-01T01:00:00.000Z | key azores | daily (Atlantic/Azores) |" in cli.stdout
    assert "by cap: period " in cli.stdout and "result: PASS" in cli.stdout
    here = month_boundary(1)
    assert (tmp_path / "trace.jsonl").read_text() == "".join(line + "\n" for line in here.world.trace.lines)
    assert json.loads((tmp_path / "summary.json").read_text())["trace_sha256"] == here.trace_sha256
    assert here.trace_sha256 != month_boundary(2).trace_sha256


# --- the caps of every kind, and the planted bugs that pass them ------------------------------------

CAPS = [
    ("balance_usd", {"balance_usd": 0.004}, None, "key k: spent $", "> USD balance $0.004"),
    ("window_usd", {"window_usd": 0.004, "window_seconds": 60}, None, "key k: window usage $", "> $0.004 per 60 s"),
    ("period", {"period": "daily", "period_tokens": 500}, None, "key k: period usage ", "> 500 tokens per period (daily:"),
    ("period_usd", {"period": "monthly", "period_usd": 0.004, "period_timezone": "Europe/Berlin"}, None,
     "key k: period usage $", "> $0.004 per period (monthly:1970-01-01@Europe/Berlin)"),
    ("balance_usd", {}, {"balance_usd": 0.004}, "account acct: spent $", "> USD balance $0.004"),
    ("period_usd", {}, {"period": "weekly", "period_anchor_day": 4, "period_usd": 0.004}, "account acct: period usage $",
     "per period (weekly:1970-01-01@UTC)"),
]


@pytest.mark.parametrize(("cap", "caps", "account", "who", "message"), CAPS, ids=[f"{c[0]}-{'account' if c[2] else 'key'}" for c in CAPS])
def test_each_cap_binds_and_a_skipped_cap_check_is_caught_on_it(cap, caps, account, who, message):
    honest = run(small(caps, account))
    assert honest.ok, honest.violation
    assert honest.summary["refused_by_cap"] == {cap: 16}
    planted = run(small(caps, account), LedgerFaults(skip_cap_check=True))
    assert planted.violation is not None and who in planted.violation and message in planted.violation


def test_a_usd_window_that_forgets_charges_is_caught_by_the_checkers_own_count():
    data = small({"window_usd": 0.004, "window_seconds": 60}, workload=[burst(1.0, 4), burst(5.0, 4)])
    honest = run(data)
    assert honest.ok and honest.summary["refused_by_cap"] == {"window_usd": 4}
    planted = run(data, LedgerFaults(window_amnesia=True))
    assert "key k: charged $0.003312 in the last 60 s + held $0.000828 > $0.004" in planted.violation


def test_a_charge_above_its_hold_in_money_is_caught(monkeypatch):
    """The bug: settle bills the hold plus the actual cost, and widens the hold to match so the
    ledger's own assertion passes. The checker compares with what the hold took when placed."""
    settle = Ledger.settle

    def settle_over_the_hold(self, hold_id, actual_tokens, now, actual_usd=0):
        hold = self.holds[hold_id]
        bill = hold.amount_usd + actual_usd
        for p in self._chain(hold.key_id):
            p.held_usd += bill - hold.amount_usd
        hold.amount_usd = bill
        return settle(self, hold_id, actual_tokens, now, bill)

    monkeypatch.setattr(Ledger, "settle", settle_over_the_hold)
    result = run(small({"balance_usd": 1.0}))
    assert f"outside [0, its hold of $0.000828 ({HOLD_USD} micro-USD)]" in result.violation


def test_held_money_the_ledger_leaks_is_caught_by_the_agreement_check(monkeypatch):
    """One micro-USD of each settled hold stays held: no cap is passed, only the count disagrees."""
    settle = Ledger.settle

    def settle_leaking(self, hold_id, actual_tokens, now, actual_usd=0):
        key_id = self.holds[hold_id].key_id
        resolution = settle(self, hold_id, actual_tokens, now, actual_usd)
        for p in self._chain(key_id):
            p.held_usd += 1
        return resolution

    monkeypatch.setattr(Ledger, "settle", settle_leaking)
    result = run(small({"balance_usd": 1.0}))
    found = re.search(r"key k: the ledger says spent (\d+) micro-USD, held (\d+) micro-USD; its events add up to (\d+), (\d+)",
                      result.violation)
    assert found and found[1] == found[3] and int(found[2]) == int(found[4]) + 1


def test_a_period_that_keeps_its_usage_past_the_boundary_is_caught(monkeypatch):
    """The bug: rolling into the next period keeps the old period's usage. The ledger only refuses
    more than it should, so no cap is passed; the checker's own tally of the period disagrees."""

    def roll_keeping_usage(self: Principal, now: float) -> None:
        if self.caps.period is None or (self.period_end is not None and now < self.period_end):
            return
        self.period_start, self.period_end = period_bounds(self.caps.period, now)

    monkeypatch.setattr(Principal, "roll_period", roll_keeping_usage)
    result = runner.run(load(SCENARIOS / "month_boundary.toml"), 1)
    assert "used in the period monthly:2027-01-01@UTC; the charges resolved in it add up to 0 and 0" in result.violation
    assert "(2027-01-01T00:00:00." in result.violation  # at the edge, not before


def test_a_period_in_the_wrong_timezone_is_caught_by_its_retry_after(monkeypatch):
    """The bug: the ledger computes every period in UTC. The Azores key's refusals then say to
    wait for 00:00Z; its period ends at 01:00Z."""
    real = ledger_mod.period_bounds
    monkeypatch.setattr(ledger_mod, "period_bounds", lambda spec, now: real(PeriodSpec(spec.kind, "UTC", spec.anchor_day), now))
    result = runner.run(load(SCENARIOS / "month_boundary.toml"), 1)
    assert "refused by the period cap of key azores and told to wait" in result.violation
    assert "but its period daily:2026-12-31@Atlantic/Azores ends in" in result.violation


def test_a_refusal_the_caps_do_not_call_for_is_caught(monkeypatch):
    """The bug: the ledger counts each request's ask twice, refusing what fits."""
    check = ledger_mod._check
    monkeypatch.setattr(ledger_mod, "_check", lambda p, amount, amount_usd, now, concurrency=True: check(
        p, 2 * amount, 2 * amount_usd, now, concurrency))
    result = run(small({"balance_usd": 0.004}))
    assert "was refused by the balance_usd cap of key k, yet it fits by the checker's count" in result.violation
    assert f"+ {HOLD_USD} asked <= 4000 micro-USD" in result.violation


def test_a_double_charge_in_money_is_caught():
    result = run(small({"balance_usd": 1.0}), LedgerFaults(double_charge=True))
    assert "its events add up to" in result.violation


# --- prices --------------------------------------------------------------------------------------


def test_a_money_capped_key_on_an_unpriced_model_is_refused_unless_unpriced_is_free():
    data = small({"balance_usd": 1.0}, workload=[burst(1.0, 3)])
    del data["models"]
    refused = run(data)
    assert refused.ok and refused.summary["refused"] == {"model_not_priced": 3}
    free = run({**data, "cortex": {"unpriced": "free"}})
    assert free.ok and free.summary["outcomes"] == {"served": 3} and free.summary["charged_micro_usd"] == 0


def test_charges_follow_the_catalogue_price_of_each_model():
    data = small({"balance_usd": 1.0}, workload=[burst(1.0, 4)])
    data["neurons"][0]["models"] = ["cortex-mock", "cortex-pro"]
    data["models"].append({"id": "cortex-pro", "cost": {"input": 20.0, "output": 80.0}})
    data["workload"].append({**burst(1.5, 4), "model": "cortex-pro"})
    result = run(data)
    assert result.ok, result.violation
    by_model: dict[str, set[int | None]] = {}
    for r in result.world.checker.requests.values():
        by_model.setdefault(r.model, set()).add(r.hold_usd)
    assert by_model == {"cortex-mock": {HOLD_USD}, "cortex-pro": {10 * HOLD_USD}}


# --- scenario keys -------------------------------------------------------------------------------


def base() -> dict[str, Any]:
    return small({"balance_usd": 1.0}, account={"period": "daily", "period_usd": 2.0})


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["keys"][0].update(balance_usd="lots"), "keys[0].balance_usd"),
        (lambda d: d["keys"][0].update(balance_usd=0.0000001), "keys[0].balance_usd"),
        (lambda d: d["keys"][0].update(balance_usd=-1), "keys[0].balance_usd"),
        (lambda d: d["keys"][0].update(balance_usd=10**7), "keys[0].balance_usd"),
        (lambda d: d["keys"][0].update(window_usd=1), "'keys[0]': window_seconds goes with"),
        (lambda d: d["keys"][0].update(period="yearly", period_tokens=5), "'keys[0].period': period must be one of"),
        (lambda d: d["keys"][0].update(period_tokens=5), "'keys[0]': period (daily, weekly or monthly) goes with"),
        (lambda d: d["keys"][0].update(period="daily"), "'keys[0]': period (daily, weekly or monthly) goes with"),
        (lambda d: d["keys"][0].update(period_timezone="UTC"), "keys[0].period_timezone' needs a period"),
        (lambda d: d["accounts"][0].update(period_timezone="Mars/Olympus"), "'accounts[0].period_timezone': period_timezone 'Mars/Olympus'"),
        (lambda d: d["accounts"][0].update(period_anchor_day=40), "accounts[0].period_anchor_day"),
        (lambda d: d["accounts"][0].update(period="weekly", period_anchor_day=9), "accounts[0].period_anchor_day"),
        (lambda d: d["accounts"][0].update(period="weekly", period_anchor_day=0), "accounts[0].period_anchor_day"),
        (lambda d: d["accounts"][0].update(period_usd=0.1234567), "accounts[0].period_usd"),
        (lambda d: d.update(start="2026-12-31 23:58"), "scenario.start"),
        (lambda d: d.update(start="tomorrow"), "scenario.start"),
        (lambda d: d.update(start="2026-12-31T23:58:00+01:00"), "scenario.start"),
        (lambda d: d.update(start="1969-12-31T23:59:59Z"), "scenario.start"),
        (lambda d: d.update(start=1798761480), "scenario.start"),
        (lambda d: d["models"][0]["cost"].pop("output"), "models[0].cost.output"),
        (lambda d: d["models"][0]["cost"].update(input=-1), "models[0].cost.input"),
        (lambda d: d["models"][0]["cost"].update(cached_input=float("nan")), "models[0].cost.cached_input"),
        (lambda d: d["models"][0]["cost"].update(bogus=1), "models[0].cost.bogus"),
        (lambda d: d["models"][0].pop("cost"), "models[0].memory_mb"),
        (lambda d: d["models"][0].update(pinned_on=["n1"]), "models[0].pinned_on"),
        (lambda d: d.update(cortex={"unpriced": "maybe"}), "cortex.unpriced"),
        (lambda d: d.update(expect={"refused_by_cap": {"bogus": 1}}), "expect.refused_by_cap.bogus"),
        (lambda d: d.update(expect={"charged_usd": "lots"}), "expect.charged_usd"),
    ],
)
def test_scenario_errors_name_the_bad_budget_key(mutate, needle):
    data = base()
    mutate(data)
    with pytest.raises(ScenarioError) as info:
        parse(data)
    assert needle in str(info.value)


def test_the_start_is_an_iso_utc_instant_as_a_string_or_a_toml_date_time():
    text = 'start = 2026-12-31T23:58:00Z\n'
    as_toml = parse({**base(), **tomllib.loads(text)})
    as_string = parse({**base(), "start": "2026-12-31T23:58:00Z"})
    assert as_toml.start_s == as_string.start_s == datetime(2026, 12, 31, 23, 58, tzinfo=timezone.utc).timestamp()
    assert parse(base()).start_s == 0.0


def test_scenario_caps_and_prices_reach_the_ledger_and_the_catalogue():
    scenario = parse(base())
    key, account = scenario.keys[0].caps, scenario.accounts[0].caps
    assert key.balance_usd == 1_000_000 and account.period == PeriodSpec("daily") and account.period_usd == 2_000_000
    assert scenario.catalogue() == {"models": [{"id": "cortex-mock", "cost": {"input": 2.0, "output": 8.0}}]}
