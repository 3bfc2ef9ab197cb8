"""Money caps and calendar periods in the budget service, on a real SQLite store and an injected clock."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from common.errors import ApiError
from cortex.api.admin import caps_from
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps
from cortex.budget.meter import Meter
from cortex.budget.periods import PeriodSpec
from cortex.budget.pricing import Prices, usd_text, usd_to_micro
from cortex.budget.service import BudgetService
from cortex.budget.store import SyncStore, connect
from cortex.config import BudgetConfig
from cortex.fleet.catalogue import Cost
from cortex.metrics import GatewayMetrics


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


async def _service(path, clock, **config) -> BudgetService:
    return await BudgetService.load(SyncStore(connect(path)), clock, BudgetConfig(**config), GatewayMetrics())


def _retry_after(error: ApiError) -> tuple[int, int]:
    headers = dict(error.headers)
    return int(headers[b"retry-after"]), int(headers[b"retry-after-ms"])


# --- pricing -------------------------------------------------------------------------------


def test_prices_are_exact_integers_and_round_up_once_per_request():
    prices = Prices.from_cost(Cost(0.15, 0.6, 0.075))  # USD per 1M tokens
    assert (prices.input_pusd, prices.output_pusd, prices.cached_input_pusd) == (150_000, 600_000, 75_000)
    # 7 prompt tokens, 3 output: 7 * 0.15 + 3 * 0.6 = 2.85 micro-USD -> 3, rounded once, not per part
    assert prices.charge_usd(7, 0, 3) == 3
    assert prices.charge_usd(7, 7, 0) == 1  # 0.525 -> 1
    assert prices.hold_usd(7, 3) == 3
    # Floats that are not what they print (0.1 + 0.2) still price as their decimal text.
    assert Prices.from_cost(Cost(0.30000000000000004, 1.0)).input_pusd == 300_001


def test_the_hold_uses_the_dearer_input_price_so_a_cached_charge_never_passes_it():
    prices = Prices.from_cost(Cost(1.0, 2.0, 5.0))  # a cache read dearer than a plain one
    hold = prices.hold_usd(100, 10)
    assert hold == 100 * 5 + 10 * 2
    assert prices.charge_usd(100, 100, 10) <= hold


def test_usd_amounts_are_exact_and_refuse_sub_micro_precision():
    assert usd_to_micro("12.5") == 12_500_000
    assert usd_to_micro(0.000001) == 1
    assert usd_to_micro(3) == 3_000_000
    for bad in ("0.0000001", "-1", "nan", "inf", True, [1], "1e30"):
        with pytest.raises(ValueError):
            usd_to_micro(bad)
    assert usd_text(1_250_000) == "$1.25" and usd_text(123) == "$0.000123"


def test_a_settlement_prices_cached_prompt_tokens_at_the_cached_price():
    prices = Prices.from_cost(Cost(2.0, 8.0, 0.5))
    meter = Meter(False, 1000, dispatched=True, responded=True, completed=True, relayed_output_tokens=40)
    meter.usage = {"prompt_tokens": 900, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 800}}
    decision = meter.settlement()
    assert (decision.prompt_tokens, decision.cached_tokens, decision.output_tokens) == (900, 800, 40)
    assert decision.usd(prices) == 100 * 2 + 800 * 1 // 2 + 40 * 8  # 200 + 400 + 320 micro-USD
    # A cached count that is not a count is ignored: full input price, never below it.
    for bad in ("800", 901, -1, 8.0, None, True):
        meter.usage = {"prompt_tokens": 900, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": bad}}
        assert meter.settlement().usd(prices) == 900 * 2 + 40 * 8


# --- money caps ----------------------------------------------------------------------------


async def test_a_usd_balance_holds_the_worst_case_and_charges_actual_usage(tmp_path):
    clock = Clock(at("2026-12-01T12:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(balance_usd=1000))
    prices = Prices.from_cost(Cost(1.0, 4.0))  # 1 and 4 micro-USD per token
    hold = await service.reserve(key, Estimate(100, 200), "r1", "m", None, prices)
    assert hold.amount_usd == 100 + 800
    p = service.ledger.principal("key", key.id)
    assert (p.held_usd, p.spent_usd) == (900, 0)
    with pytest.raises(ApiError) as refused:
        await service.reserve(key, Estimate(100, 200), "r2", "m", None, prices)
    error = refused.value
    assert error.status == 429 and error.code == "insufficient_quota"
    assert "$0.0009" in error.message and "$0.0001" in error.message  # the amount asked and what is left, in USD
    resolution = await service.settle(hold, 150, prices.charge_usd(100, 0, 50))
    assert resolution.charged_usd == 300 and (p.held_usd, p.spent_usd) == (0, 300)
    # Durable: a fresh service on the same file sees the same spend.
    again = await _service(tmp_path / "l.db", clock)
    assert again.ledger.principal("key", key.id).spent_usd == 300
    assert again.ledger.principal("account", "default").spent_usd == 300


async def test_a_money_capped_key_is_refused_an_unpriced_model_with_403_unless_unpriced_is_free(tmp_path):
    clock = Clock(at("2026-12-01T12:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", "team", Caps(balance_tokens=10_000))
    await service.set_caps("account", "team", Caps(window_usd=5_000_000, window_s=3600.0))
    with pytest.raises(ApiError) as refused:
        await service.reserve(key, Estimate(10, 10), "r1", "free-model", None, None)
    assert refused.value.status == 403 and refused.value.code == "model_not_priced"
    assert "free-model" in refused.value.message
    assert not service.ledger.holds
    # A key with token caps only is not asked for a price.
    plain, _ = await service.create_key("plain", "other", Caps(balance_tokens=10_000))
    hold = await service.reserve(plain, Estimate(10, 10), "r2", "free-model", None, None)
    assert hold.amount_usd == 0
    free = await _service(tmp_path / "free.db", clock, unpriced="free")
    key2, _ = await free.create_key("k", None, Caps(balance_usd=1))
    assert (await free.reserve(key2, Estimate(10, 10), "r3", "free-model", None, None)).amount_usd == 0


async def test_a_usd_window_refusal_has_an_exact_retry_after(tmp_path):
    clock = Clock(at("2026-12-01T12:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(window_usd=1000, window_s=60.0))
    prices = Prices.from_cost(Cost(1.0, 1.0))
    hold = await service.reserve(key, Estimate(300, 300), "r1", "m", None, prices)
    await service.settle(hold, 600, 600)
    clock.now += 10.5
    with pytest.raises(ApiError) as refused:
        await service.reserve(key, Estimate(300, 300), "r2", "m", None, prices)
    assert refused.value.code == "rate_limit_exceeded"
    assert _retry_after(refused.value) == (50, 49_500)  # the charge ages out at +60 s
    clock.now += 49.5
    await service.reserve(key, Estimate(300, 300), "r3", "m", None, prices)


async def test_top_ups_in_usd_and_tokens_need_the_matching_balance(tmp_path):
    service = await _service(tmp_path / "l.db", Clock(at("2026-12-01T12:00:00")))
    key, _ = await service.create_key("k", None, Caps(balance_usd=10))
    assert (await service.top_up("key", key.id, usd=5)).balance_usd == 15
    with pytest.raises(ApiError) as refused:
        await service.top_up("key", key.id, tokens=5)
    assert "no balance in tokens" in refused.value.message


# --- calendar periods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, before, boundary",
    [
        (PeriodSpec("daily"), "2026-12-01T23:59:58.250", "2026-12-02T00:00:00"),
        (PeriodSpec("monthly"), "2026-12-31T23:58:00", "2027-01-01T00:00:00"),
        # Month end: an anchor of 31 is the last day of a short month.
        (PeriodSpec("monthly", "UTC", 31), "2027-02-27T22:00:00", "2027-02-28T00:00:00"),
        # Leap day: the anchor of 29 is February 29 in 2028.
        (PeriodSpec("monthly", "UTC", 29), "2028-02-28T23:59:59.5", "2028-02-29T00:00:00"),
        (PeriodSpec("weekly"), "2026-12-06T23:00:00", "2026-12-07T00:00:00"),  # a Sunday, then Monday
    ],
    ids=["daily", "monthly", "month-end", "leap-day", "weekly"],
)
async def test_a_period_refusal_retries_exactly_at_the_boundary_and_is_admitted_after_it(tmp_path, spec, before, boundary):
    clock = Clock(at(before))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(period=spec, period_tokens=100))
    hold = await service.reserve(key, Estimate(50, 40), "r1", "m")
    await service.settle(hold, 90)
    with pytest.raises(ApiError) as refused:
        await service.reserve(key, Estimate(10, 10), "r2", "m")
    wait_s = at(boundary) - clock.now
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert _retry_after(refused.value) == (max(1, math.ceil(wait_s)), max(1, math.ceil(wait_s * 1000)))
    assert "per " in refused.value.message and "next period" in refused.value.message
    clock.now = at(boundary) - 0.001
    with pytest.raises(ApiError):
        await service.reserve(key, Estimate(10, 10), "r3", "m")
    clock.now = at(boundary)
    hold = await service.reserve(key, Estimate(10, 10), "r4", "m")  # usage reset by construction
    usage = await service.usage("key", key.id)
    assert usage["period"]["used_tokens"] == 0 and usage["remaining"]["period_tokens"] == 80
    assert usage["period"]["start"] == datetime.fromtimestamp(at(boundary), timezone.utc).isoformat().replace("+00:00", "Z")


async def test_a_daily_period_in_a_dst_zone_ends_at_local_midnight_of_a_23_hour_day(tmp_path):
    zone = "America/New_York"
    clock = Clock(at("2027-03-14T12:00:00", zone))  # spring forward: 2027-03-14 is 23 hours long
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(period=PeriodSpec("daily", zone), period_usd=1000))
    prices = Prices.from_cost(Cost(10.0, 10.0))
    hold = await service.reserve(key, Estimate(50, 50), "r1", "m", None, prices)
    await service.settle(hold, 100, 1000)
    with pytest.raises(ApiError) as refused:
        await service.reserve(key, Estimate(1, 1), "r2", "m", None, prices)
    midnight = at("2027-03-15T00:00:00", zone)
    assert midnight - at("2027-03-14T00:00:00", zone) == 23 * 3600
    assert _retry_after(refused.value)[0] == math.ceil(midnight - clock.now) == 12 * 3600  # 12:00 EDT to midnight
    assert "$0.001" in refused.value.message
    clock.now = midnight
    await service.reserve(key, Estimate(1, 1), "r3", "m", None, prices)


async def test_a_hold_straddling_the_boundary_is_charged_to_the_period_it_settles_in(tmp_path):
    clock = Clock(at("2026-12-31T23:59:59"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(period=PeriodSpec("monthly"), period_tokens=100))
    hold = await service.reserve(key, Estimate(40, 40), "r1", "m")
    clock.now += 2  # into January
    await service.settle(hold, 70)
    p = service.ledger.principal("key", key.id)
    assert p.period_usage(clock.now) == (70, 0)
    # The store agrees after a restart: January has the 70 tokens.
    again = await _service(tmp_path / "l.db", clock)
    assert again.ledger.principal("key", key.id).period_usage(clock.now) == (70, 0)


async def test_usage_in_the_current_period_survives_a_restart_and_a_new_period_cap_counts_it(tmp_path):
    clock = Clock(at("2026-12-15T10:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps())
    for i in range(3):
        hold = await service.reserve(key, Estimate(10, 10), f"r{i}", "m")
        await service.settle(hold, 20)
    # A monthly cap set mid-month counts what December has already spent.
    await service.set_caps("key", key.id, Caps(period=PeriodSpec("monthly"), period_tokens=70))
    assert service.ledger.principal("key", key.id).period_usage(clock.now) == (60, 0)
    with pytest.raises(ApiError):
        await service.reserve(key, Estimate(10, 10), "r9", "m")
    again = await _service(tmp_path / "l.db", clock)
    assert again.ledger.principal("key", key.id).period_usage(clock.now) == (60, 0)


def test_caps_from_validates_money_and_period_fields_with_their_names():
    caps = caps_from({"balance_usd": "2.50", "period": "monthly", "period_usd": 100, "period_anchor_day": 15})
    assert caps.balance_usd == 2_500_000 and caps.period == PeriodSpec("monthly", "UTC", 15)
    assert caps_from({"period": "daily", "period_tokens": 5}, "Europe/Berlin").period.timezone == "Europe/Berlin"
    for body, param in [
        ({"balance_usd": "0.0000001"}, "balance_usd"),
        ({"balance_usd": -1}, "balance_usd"),
        ({"window_usd": 5}, "window_usd"),
        ({"period": "monthly"}, "period_tokens"),
        ({"period_tokens": 5}, "period"),
        ({"period": "hourly", "period_tokens": 5}, "period"),
        ({"period": "daily", "period_tokens": 5, "period_timezone": "Mars/Olympus"}, "period"),
        ({"period": "monthly", "period_tokens": 5, "period_anchor_day": 32}, "period"),
    ]:
        with pytest.raises(ApiError) as refused:
            caps_from(body)
        assert refused.value.status == 400 and refused.value.param == param, (body, refused.value.message)


async def test_spend_is_reported_per_model_and_per_local_day(tmp_path):
    zone = "Asia/Kolkata"  # +05:30: a UTC day splits across two local days
    clock = Clock(at("2026-12-01T23:00:00", zone))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(period=PeriodSpec("daily", zone), period_tokens=10**6))
    prices = Prices.from_cost(Cost(1.0, 1.0))
    for model, when in (("small", "2026-12-01T23:00:00"), ("big", "2026-12-01T23:50:00"), ("big", "2026-12-02T00:10:00")):
        clock.now = at(when, zone)
        hold = await service.reserve(key, Estimate(5, 5), f"r-{when}", model, None, prices)
        await service.settle(hold, 10, 10)
    spend = await service.spend("key", key.id)
    assert spend["timezone"] == zone
    assert [(r["model"], r["requests"], r["tokens"], r["micro_usd"]) for r in spend["by_model"]] == [
        ("big", 2, 20, 20), ("small", 1, 10, 10)
    ]
    assert [(r["day"], r["requests"]) for r in spend["by_day"]] == [("2026-12-01", 2), ("2026-12-02", 1)]


def test_an_unknown_limit_field_is_refused_not_ignored():
    # Another gateway's name for a budget must not create an uncapped key.
    for body in ({"max_budget": 5}, {"balance": 100}, {"budget_duration": "30d"}):
        with pytest.raises(ApiError) as refused:
            caps_from(body)
        assert refused.value.status == 400 and refused.value.param == next(iter(body))
    assert caps_from({"name": "k", "balance_usd": 1}, also=("name",)).balance_usd == 1_000_000


@pytest.mark.parametrize("seconds", [1e-300, 1e-6, 0.5, 0, -1, float("nan"), float("inf")])
def test_a_window_shorter_than_a_second_or_not_a_length_is_refused(seconds):
    # 64 buckets of a microsecond's window are shorter than a timestamp's resolution: settlement could not record them.
    with pytest.raises(ApiError) as refused:
        caps_from({"window_tokens": 10, "window_seconds": seconds})
    assert refused.value.status == 400 and refused.value.param == "window_seconds"
    assert caps_from({"window_tokens": 10, "window_seconds": 1}).window_s == 1.0


def test_a_period_cap_set_across_a_boundary_keeps_the_charges_of_the_new_period():
    from cortex.budget.ledger import Ledger
    from cortex.budget.periods import period_bounds

    ledger = Ledger()
    ledger.add_account("a")
    ledger.add_key("k", "a")
    spec = PeriodSpec("daily")
    before = at("2026-12-01T23:59:59.900")
    bounds = period_bounds(spec, before)
    ledger.begin_window_rebuild("key", "k")  # the usage query is queued just before midnight ...
    hold = ledger.reserve("h", "k", 800, before, 60)
    ledger.settle(hold.id, 800, at("2026-12-02T00:00:00.100"))  # ... and a charge lands just after it
    ledger.finish_window_rebuild("key", "k", Caps(period=spec, period_tokens=1000), None, (*bounds, 0, 0))
    p = ledger.principal("key", "k")
    assert p.period_usage(at("2026-12-02T00:00:01")) == (800, 0)
    assert ledger.reserve("h2", "k", 300, at("2026-12-02T00:00:01"), 60).__class__.__name__ == "Refusal"


async def test_a_balance_that_refuses_fires_its_full_threshold_though_spend_is_below_it(tmp_path):
    import trio

    from cortex.budget.alerts import parse_alert_rules

    clock = Clock(at("2026-12-01T12:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    # Every cap kind at once, so each kind's level is built for the rules.
    key, _ = await service.create_key("k", None, Caps(
        balance_tokens=100, window_tokens=10**6, window_s=60.0, balance_usd=10**6, window_usd=10**6,
        period=PeriodSpec("monthly"), period_tokens=10**6, period_usd=10**6,
    ))
    rules = parse_alert_rules([{"url": "http://127.0.0.1:9/hook", "thresholds": [0.9, 1.0]}], {})
    await service.start_alerts(rules)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.evaluate_alerts_forever, 0.001)
        prices = Prices.from_cost(Cost(1.0, 1.0))
        hold = await service.reserve(key, Estimate(46, 46), "r1", "m", None, prices)
        await service.settle(hold, 92, 92)
        with pytest.raises(ApiError):
            await service.reserve(key, Estimate(5, 5), "r2", "m", None, prices)  # 10 tokens cannot fit in the 8 left
        with trio.fail_after(5):
            while len(service._fired) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    rows = service.store.conn.execute("SELECT threshold, epoch FROM alert_state WHERE cap = 'balance_tokens'").fetchall()
    assert sorted(rows) == [(0.9, "100"), (1.0, "100")]
    body = service.store.conn.execute("SELECT body FROM alert_outbox ORDER BY seq DESC LIMIT 1").fetchone()[0]
    assert b'"exhausted":true' in body and b'"spent":92' in body


async def test_an_expired_hold_marks_its_key_and_account_for_the_alert_evaluator(tmp_path):
    from cortex.budget.alerts import parse_alert_rules

    clock = Clock(at("2026-12-01T12:00:00"))
    service = await _service(tmp_path / "l.db", clock)
    key, _ = await service.create_key("k", None, Caps(balance_tokens=100))
    await service.start_alerts(parse_alert_rules([{"url": "http://127.0.0.1:9/hook"}], {}))
    await service.reserve(key, Estimate(30, 30), "r1", "m")
    assert not service._alert_dirty
    clock.now += service.config.hold_ttl_s + 1
    (expired,) = await service.expire_due()
    assert expired.charged_tokens == 60
    assert service._alert_dirty == {("key", key.id), ("account", "default")}


def test_a_top_up_refuses_an_unknown_field():
    from cortex.api.admin import _top_up_amounts

    assert _top_up_amounts({"tokens": 5, "usd": "0.5"}) == (5, 500_000)
    with pytest.raises(ApiError) as refused:
        _top_up_amounts({"tokens": 5, "credits": 5})
    assert refused.value.status == 400 and refused.value.param == "credits"
