"""The simulator's cortex replicas on one shared ledger (sim/shared_ledger.py): the replicas_fanout
scenario, the planted replica that admits against its own view, determinism, a replica killed
mid-fan-out, the shared database's own rules, change notices, and the scenario keys' errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

from cortex.budget.ledger import Caps, Hold, Ledger, Refusal
from cortex.budget.pg_ledger import Reserve, Resolve
from cortex.budget.service import KeyRecord
from sim import runner
from sim.scenario import ScenarioError, load, parse
from sim.invariants import Checker, RequestRecord
from sim.shared_ledger import LinkSpec, SharedDb, SharedLedgerModel
from sim.trace import Trace
from sim.world import LedgerFaults

SCENARIO = Path("sim/scenarios/replicas_fanout.toml")
SEEDS = (1, 2, 3)
CAP = 1000  # the key's and the account's balance


def scenario_data() -> dict[str, Any]:
    return tomllib.loads(SCENARIO.read_text())


def killed_mid_fanout() -> dict[str, Any]:
    """cortex-2 dies while the admitted streams run (they end near t=1.55) and is back 1 s later."""
    data = scenario_data()
    data["shared_ledger"]["lease_s"] = 2
    data["faults"] = [{"kind": "cortex_restart", "target": "cortex-2", "at_s": 1.2, "for_s": 1}]
    data["expect"] = {"served": {"min": 0, "max": 7}, "failed": {"min": 1}, "refused": {"insufficient_quota": 22}}
    return data


def events(result: runner.Result, ev: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, result.world.trace.lines) if e["ev"] == ev]


# --- the scenario ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_replicas_fanout_admits_exactly_what_fits_across_three_replicas(seed):
    result = runner.run(load(SCENARIO), seed)
    assert result.ok, result.violation or result.expectation_failures
    shared = result.summary["shared_ledger"]
    assert shared["replicas"] == 3 and shared["requests_by_replica"] == {"cortex-1": 10, "cortex-2": 10, "cortex-3": 10}
    assert shared["reserves"] == 30 and shared["admitted"] == 8
    assert shared["reserves_per_batch"] > 1  # group commit: a batch carries what queued during a round trip
    for cap in result.summary["caps"]:  # one key, one account: neither ever passed, at any instant
        assert cap["spent_tokens"] <= CAP and cap["held_tokens_peak"] <= CAP
    holds = events(result, "hold")
    replicas = {result.world.checker.requests[h["req"]].replica for h in holds}
    assert len(holds) == 8 and len(replicas) >= 2  # the cap was shared, not one replica's alone
    assert result.summary["upstreams"][0]["delivered"] == 8


@pytest.mark.parametrize("seed", SEEDS)
def test_a_replica_that_admits_against_its_own_view_is_caught_as_an_overshoot(seed):
    result = runner.run(load(SCENARIO), seed, LedgerFaults(local_admission=True))
    assert result.violation is not None
    assert f"> balance {CAP}" in result.violation


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    scenario = load(SCENARIO)
    first, second, other = runner.run(scenario, 7), runner.run(scenario, 7), runner.run(scenario, 8)
    assert first.trace_sha256 == second.trace_sha256 != other.trace_sha256
    assert first.world.trace.lines == second.world.trace.lines
    volatile = ("wall_s", "requests_per_wall_s")
    assert {k: v for k, v in first.summary.items() if k not in volatile} == {
        k: v for k, v in second.summary.items() if k not in volatile
    }


def test_a_replica_killed_mid_fanout_has_its_holds_reaped_in_full_and_the_caps_hold():
    result = runner.run(parse(killed_mid_fanout()), 4)
    assert result.ok, result.violation or result.expectation_failures
    records = result.world.checker.requests.values()
    orphaned = [r for r in records if r.hold_state == "orphaned"]
    assert orphaned and all(r.replica == "cortex-2" and r.charged == r.hold_amount for r in orphaned)
    assert result.summary["shared_ledger"]["reaped"] == len(orphaned)
    assert result.summary["shared_ledger"]["replica_lives"] == 4  # cortex-2 came back with a new replica id
    reaped_at = [e["t"] for e in events(result, "resolve") if e["state"] == "orphaned"]
    assert min(reaped_at) > 1.0 + 2  # not before the lease (2 s from the hold) had passed
    for cap in result.summary["caps"]:
        assert cap["spent_tokens"] <= CAP and cap["held_tokens_peak"] <= CAP


def test_one_replica_on_the_shared_ledger_holds_the_a0_fanout_cap_exactly():
    data = tomllib.loads(Path("sim/scenarios/a0_fanout.toml").read_text())
    data["shared_ledger"] = {"round_trip_ms": 2.0}
    result = runner.run(parse(data), 1)
    assert result.ok, result.violation or result.expectation_failures
    assert result.world.shared is not None and list(result.world.cortex_hosts) == ["cortex-1"]


def test_a_single_cortex_scenario_keeps_its_sqlite_ledger_and_its_trace():
    result = runner.run(load("sim/scenarios/a0_fanout.toml"), 1)
    assert result.ok and result.world.shared is None and "shared_ledger" not in result.summary
    assert all("replica" not in e for e in events(result, "send"))


# --- the cross-replica end checks -------------------------------------------------------------------


async def test_a_served_request_without_one_hold_and_one_resolution_is_a_violation():
    checker = Checker(Trace())
    checker.requests["r1"] = RequestRecord("r1", "agent", outcome="served", served_by="n1")
    checker.reservations["r1"] = 1
    checker.check_end(0, {}, 0, 0, [])
    assert "r1 was served with 1 hold reserved and 0 resolutions" in checker.violation


async def test_an_upstream_that_saw_other_than_what_the_replicas_dispatched_to_it_is_a_violation():
    checker = Checker(Trace())
    checker.deliveries = 3
    checker.check_end(0, {}, 3, 0, [], {"n1": (3, 0, 2), "n2": (0, 0, 1)})  # the totals agree; n1 and n2 do not
    assert checker.violation.endswith("n1 admitted 3 and refused 0, but cortex dispatched 2 to it")


# --- the shared database, pure -----------------------------------------------------------------


def db_with_key(caps: Caps = Caps(balance_tokens=250), lease_s: float = 10.0) -> SharedDb:
    db = SharedDb(Ledger(), lease_s)
    assert db.create_key(KeyRecord("k1", "acct", "agent", b"h", "sk-cx-", 0.0), caps) == ["account:acct", "key:k1"]
    return db


def reserve(hold_id: str, tokens: int = 100, key: str = "k1") -> Reserve:
    return Reserve(hold_id, key, tokens, 600.0, request_id=f"r-{hold_id}")


def test_a_batch_resolves_first_then_judges_its_reserves_in_order():
    db = db_with_key()
    _, placed = db.step("c1", [], [reserve("h1"), reserve("h2"), reserve("h3")], 1.0)
    assert [type(p) for p in placed] == [Hold, Hold, Refusal] and placed[2].reason == "balance"
    resolved, placed = db.step("c2", [Resolve("h1", "released"), Resolve("h1", "released")], [reserve("h4")], 2.0)
    assert resolved == [True, False]  # a second resolution does nothing
    assert isinstance(placed[0], Hold) and db.rows["h4"].replica_id == "c2"


def test_the_database_refuses_unknown_revoked_and_duplicate_holds_itself():
    db = db_with_key()
    db.step("c1", [], [reserve("h1")], 1.0)
    assert db.revoke("k1", 2.0) and not db.revoke("nope", 2.0)
    _, placed = db.step("c1", [], [reserve("h1"), reserve("h2", key="ghost"), reserve("h3")], 3.0)
    assert [p.reason for p in placed] == ["duplicate", "unknown", "revoked"]
    assert all(p.never_fits and p.retry_after_s is None for p in placed)


def test_a_directory_read_returns_copies_that_do_not_alias_the_database():
    db = db_with_key()
    db.step("c1", [], [reserve("h1")], 1.0)
    read = db.read_directory(1.0, None, None)
    (key, record), = read.keys
    key.held_tokens = 0
    record.revoked_at = 5.0
    assert db.ledger.principal("key", "k1").held_tokens == 100 and db.records["k1"].revoked_at is None
    assert [a.id for a in read.accounts] == ["acct"] and read.accounts[0].held_tokens == 100
    assert db.read_directory(1.0, ["acct", "ghost"], []).keys == []


def test_a_reaper_orphans_only_other_replicas_holds_past_their_lease_charged_in_full():
    db = db_with_key(lease_s=10.0)
    db.step("c1", [], [reserve("h1")], 0.0)
    db.step("c2", [], [reserve("h2")], 0.0)
    assert db.heartbeat("c2", 5.0) == 1  # c2 is alive: its lease runs to 15 s
    assert db.reap("c2", 11.0) == ["r-h1"]  # c1's lapsed at 10 s; a reaper never reaps its own
    assert db.reap("c1", 11.0) == [] and db.reap("c3", 16.0) == ["r-h2"]
    key = db.ledger.principal("key", "k1")
    assert (key.spent_tokens, key.held_tokens, key.in_flight) == (200, 0, 0)
    assert db.states() == (0, {"r-h1": "orphaned", "r-h2": "orphaned"})
    assert db.step("c1", [Resolve("h1", "settled", 10)], [], 12.0)[0] == [False]  # too late: reaped


def test_an_expiry_is_charged_in_full_and_a_settlement_at_most_its_hold():
    db = db_with_key(Caps())
    db.step("c1", [], [reserve("h1"), reserve("h2")], 0.0)
    db.step("c1", [Resolve("h1", "expired"), Resolve("h2", "settled", 10_000)], [], 1.0)
    assert [db.rows[h].hold.charged_tokens for h in ("h1", "h2")] == [100, 100]
    assert [db.rows[h].hold.state.value for h in ("h1", "h2")] == ["expired", "settled"]
    assert [r["hold_id"] for r in db.recent("k1", 5)] == ["h2", "h1"]
    assert db.spend_buckets("account", "acct", 0.0) == [(None, 0, 2, 200, 0)]


def test_a_window_that_grows_is_rebuilt_from_the_resolved_holds():
    db = db_with_key(Caps(window_tokens=1000, window_s=10.0))
    db.step("c1", [], [reserve("h1")], 0.0)
    db.step("c1", [Resolve("h1", "settled", 60)], [], 1.0)
    assert db.ledger.principal("key", "k1").window_usage(20.0) == 0  # aged out of 10 s
    assert db.set_caps("key", "k1", Caps(window_tokens=1000, window_s=60.0), 20.0)
    assert db.ledger.principal("key", "k1").window_usage(20.0) == 60


# --- the handles: group commit and change notices, in virtual time ---------------------------------------


async def test_a_replica_group_commits_what_queued_during_one_round_trip(autojump_clock):
    model = SharedLedgerModel(db_with_key(Caps()), LinkSpec(round_trip_s=0.01))
    handle = model.handle("c1")
    placed_at: dict[str, float] = {}

    async def one(hold_id: str, delay_s: float) -> None:
        await trio.sleep(delay_s)
        result = await handle.reserve(reserve(hold_id))
        assert isinstance(result, Hold)
        placed_at[hold_id] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(handle.run_background, lambda change: None)
        for i, delay_s in enumerate((0.0, 0.001, 0.002, 0.003)):
            nursery.start_soon(one, f"h{i}", delay_s)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    # h0 goes alone (one round trip); h1..h3 queued meanwhile and go together in the next.
    assert placed_at == {"h0": pytest.approx(0.01), "h1": pytest.approx(0.02), "h2": pytest.approx(0.02),
                         "h3": pytest.approx(0.02)}
    assert model.db.counters.batches == 2 and model.db.counters.batch_items_max == 3


async def test_a_deferred_resolution_rides_alone_after_the_flush_deadline_and_is_lost_if_its_replica_dies(autojump_clock):
    model = SharedLedgerModel(db_with_key(Caps()), LinkSpec(round_trip_s=0.01))
    handle = model.handle("c1")
    async with trio.open_nursery() as nursery:
        await nursery.start(handle.run_background, lambda change: None)
        await handle.reserve(reserve("h1"))
        await handle.reserve(reserve("h2"))
        handle.resolve_soon(Resolve("h1", "settled", 50))
        await trio.sleep(0.04)  # DEFER_FLUSH_S (0.05) has not passed
        assert "h1" in model.db.open
        await trio.sleep(0.03)
        assert "h1" not in model.db.open
        handle.dead = True
        handle.resolve_soon(Resolve("h2", "settled", 50))
        await trio.sleep(1.0)
        assert "h2" in model.db.open  # left to a reaper
        nursery.cancel_scope.cancel()


async def test_a_directory_change_reaches_every_other_listening_replica_after_the_notice_delay(autojump_clock):
    model = SharedLedgerModel(SharedDb(Ledger(), 30.0), LinkSpec(round_trip_s=0.002, notice_delay_s=0.005))
    heard: dict[str, list[tuple[float, str]]] = {"c1": [], "c2": [], "c3": []}
    handles = {name: model.handle(name) for name in heard}
    async with trio.open_nursery() as nursery:
        for name, h in handles.items():
            await nursery.start(h.run_background, lambda change, name=name: heard[name].append((trio.current_time(), change)))
        assert await handles["c1"].create_account("team", Caps(balance_tokens=5), 0.0)
        assert not await handles["c2"].create_account("team", Caps(), 0.0)  # taken: no notice
        await handles["c1"].set_caps("account", "team", Caps(balance_tokens=9))
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert heard["c1"] == []  # a replica refreshes its own changes itself
    assert heard["c2"] == heard["c3"] == [(pytest.approx(0.006), "account:team"), (pytest.approx(0.01), "account:team")]
    (team,) = model.db.read_directory(0.1, None, None).accounts
    assert team.caps.balance_tokens == 9


# --- the scenario keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["cortex"].update(replicas=0), "cortex.replicas"),
        (lambda d: d["cortex"].update(replicas=17), "cortex.replicas"),
        (lambda d: d["shared_ledger"].update(round_trip=1), "shared_ledger.round_trip"),
        (lambda d: d["shared_ledger"].update(lease_s=0), "shared_ledger.lease_s"),
        (lambda d: d.update(faults=[{"kind": "cortex_restart", "at_s": 1}]), "faults[0].target"),
        (lambda d: d.update(faults=[{"kind": "cortex_restart", "target": "cortex-4", "at_s": 1}]), "faults[0].target"),
        (lambda d: d["neurons"][0].update(name="cortex-2"), "taken by a cortex replica"),
        (lambda d: d.update(models=[{"id": "m", "memory_mb": 100}]), "not modelled"),
    ],
)
def test_scenario_errors_name_the_bad_replica_key(mutate, needle):
    data = scenario_data()
    mutate(data)
    with pytest.raises(ScenarioError) as info:
        parse(data)
    assert needle in str(info.value)


def test_a_single_cortex_restart_takes_no_target_and_replicas_default_their_shared_ledger():
    data = tomllib.loads(Path("sim/scenarios/cortex_restart_recovery.toml").read_text())
    data["faults"][0]["target"] = "cortex"
    with pytest.raises(ScenarioError, match="faults\\[0\\].target"):
        parse(data)
    data = scenario_data()
    del data["shared_ledger"]
    scenario = parse(data)
    assert scenario.shared_ledger is not None and scenario.replica_names == ("cortex-1", "cortex-2", "cortex-3")
    assert parse(tomllib.loads(Path("sim/scenarios/a0_fanout.toml").read_text())).replica_names == ("cortex",)
