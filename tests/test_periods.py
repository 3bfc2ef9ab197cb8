"""Calendar periods (cortex/budget/periods.py): bounds, month ends, DST, and invalid specs."""

from __future__ import annotations

import calendar
import re
import time
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.budget.periods import (
    PERIODS,
    PeriodError,
    PeriodSpec,
    parse_period_spec,
    period_bounds,
    period_id,
    period_view,
)

HOUR_S = 3600.0
DAY_S = 86_400.0


def utc(*fields: int) -> float:
    return datetime(*fields, tzinfo=timezone.utc).timestamp()


def local(zone: str, *fields: int, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=ZoneInfo(zone), fold=fold).timestamp()


def wall(zone: str, ts: float) -> datetime:
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).replace(tzinfo=None)


def midnights(zone: str, day: date) -> int:
    """How often local midnight of `day` occurs in tzdata (0 in a gap, 2 in a fold): the premise of a test."""
    tz, midnight = ZoneInfo(zone), datetime(day.year, day.month, day.day)
    instants = {datetime(day.year, day.month, day.day, tzinfo=tz, fold=fold).timestamp() for fold in (0, 1)}
    return sum(1 for ts in instants if wall(zone, ts) == midnight)


def bounds(kind: str, now: float, zone: str = "UTC", anchor_day: int | None = None) -> tuple[float, float]:
    return period_bounds(parse_period_spec(kind, zone, anchor_day), now)


# -- UTC basics ------------------------------------------------------------------------------


def test_daily_utc_period_is_the_calendar_day():
    assert bounds("daily", utc(2026, 7, 15, 13, 45, 10)) == (utc(2026, 7, 15), utc(2026, 7, 16))


def test_daily_utc_period_contains_its_own_start_and_not_its_end():
    assert bounds("daily", utc(2026, 7, 15)) == (utc(2026, 7, 15), utc(2026, 7, 16))
    assert bounds("daily", utc(2026, 7, 16) - 0.5) == (utc(2026, 7, 15), utc(2026, 7, 16))


def test_weekly_utc_period_starts_on_monday_by_default():
    # 2026-07-15 is a Wednesday.
    assert bounds("weekly", utc(2026, 7, 15, 9)) == (utc(2026, 7, 13), utc(2026, 7, 20))


def test_weekly_anchor_sunday_starts_on_sunday():
    assert bounds("weekly", utc(2026, 7, 15, 9), anchor_day=7) == (utc(2026, 7, 12), utc(2026, 7, 19))


def test_weekly_anchor_on_todays_weekday_starts_today():
    assert bounds("weekly", utc(2026, 7, 15, 9), anchor_day=3) == (utc(2026, 7, 15), utc(2026, 7, 22))


def test_monthly_utc_period_starts_on_the_first_by_default():
    assert bounds("monthly", utc(2026, 7, 15, 9)) == (utc(2026, 7, 1), utc(2026, 8, 1))


def test_monthly_before_the_anchor_day_is_in_the_period_from_last_month():
    assert bounds("monthly", utc(2026, 7, 10), anchor_day=15) == (utc(2026, 6, 15), utc(2026, 7, 15))


def test_monthly_on_the_anchor_day_starts_a_new_period():
    assert bounds("monthly", utc(2026, 7, 15), anchor_day=15) == (utc(2026, 7, 15), utc(2026, 8, 15))


# -- month ends and leap days ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (utc(2027, 2, 10), utc(2027, 1, 31), utc(2027, 2, 28)),
        (utc(2027, 3, 1), utc(2027, 2, 28), utc(2027, 3, 31)),
        (utc(2028, 3, 1), utc(2028, 2, 29), utc(2028, 3, 31)),
        (utc(2027, 4, 15), utc(2027, 3, 31), utc(2027, 4, 30)),
        (utc(2027, 5, 1), utc(2027, 4, 30), utc(2027, 5, 31)),
    ],
)
def test_monthly_anchor_31_starts_on_each_months_last_day(now, start, end):
    assert bounds("monthly", now, anchor_day=31) == (start, end)


def test_monthly_anchor_30_starts_on_the_last_day_of_february():
    assert bounds("monthly", utc(2027, 3, 1), anchor_day=30) == (utc(2027, 2, 28), utc(2027, 3, 30))
    assert bounds("monthly", utc(2028, 2, 29, 12), anchor_day=30) == (utc(2028, 2, 29), utc(2028, 3, 30))


def test_monthly_anchor_29_starts_on_the_leap_day_in_a_leap_year():
    assert bounds("monthly", utc(2028, 2, 29, 12), anchor_day=29) == (utc(2028, 2, 29), utc(2028, 3, 29))
    assert bounds("monthly", utc(2028, 2, 28, 23, 59, 59), anchor_day=29) == (utc(2028, 1, 29), utc(2028, 2, 29))


def test_monthly_anchor_29_starts_on_feb_28_outside_leap_years():
    assert bounds("monthly", utc(2027, 2, 28, 12), anchor_day=29) == (utc(2027, 2, 28), utc(2027, 3, 29))
    assert bounds("monthly", utc(2027, 2, 27, 12), anchor_day=29) == (utc(2027, 1, 29), utc(2027, 2, 28))


def test_daily_leap_day_is_its_own_period():
    assert bounds("daily", utc(2028, 2, 29, 6)) == (utc(2028, 2, 29), utc(2028, 3, 1))


# -- year ends ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "anchor_day"), [("daily", 1), ("weekly", 5), ("monthly", 1)])
def test_year_end_separates_the_last_second_of_the_year_from_the_first(kind, anchor_day):
    # weekly anchor 5: 2027-01-01 is a Friday.
    before = bounds(kind, utc(2026, 12, 31, 23, 59, 59), anchor_day=anchor_day)
    after = bounds(kind, utc(2027, 1, 1), anchor_day=anchor_day)
    assert before[1] == after[0] == utc(2027, 1, 1)


def test_monthly_anchor_31_period_from_december_31_runs_to_january_31():
    assert bounds("monthly", utc(2027, 1, 1), anchor_day=31) == (utc(2026, 12, 31), utc(2027, 1, 31))


def test_weekly_period_spans_the_year_end():
    # 2026-12-28 is a Monday.
    assert bounds("weekly", utc(2027, 1, 2)) == (utc(2026, 12, 28), utc(2027, 1, 4))


# -- DST ---------------------------------------------------------------------------------------


def test_daily_new_york_spring_forward_day_is_23_hours():
    start, end = bounds("daily", local("America/New_York", 2027, 3, 14, 12), "America/New_York")
    assert (start, end) == (utc(2027, 3, 14, 5), utc(2027, 3, 15, 4))
    assert end - start == 23 * HOUR_S


def test_daily_new_york_fall_back_day_is_25_hours():
    start, end = bounds("daily", local("America/New_York", 2027, 11, 7, 12), "America/New_York")
    assert (start, end) == (utc(2027, 11, 7, 4), utc(2027, 11, 8, 5))
    assert end - start == 25 * HOUR_S


def test_monthly_berlin_october_includes_the_fall_back_hour():
    start, end = bounds("monthly", utc(2026, 10, 31, 22, 30), "Europe/Berlin")
    assert (start, end) == (utc(2026, 9, 30, 22), utc(2026, 10, 31, 23))
    assert end - start == 31 * DAY_S + HOUR_S


def test_monthly_berlin_after_the_fall_back_is_november():
    assert bounds("monthly", utc(2026, 10, 31, 23), "Europe/Berlin") == (utc(2026, 10, 31, 23), utc(2026, 11, 30, 23))


@pytest.mark.parametrize(
    ("zone", "day", "boundary"),
    [
        ("America/Sao_Paulo", date(2018, 11, 4), utc(2018, 11, 4, 3)),  # 00:00 -03 -> 01:00 -02
        ("America/Havana", date(2024, 3, 10), utc(2024, 3, 10, 5)),  # 00:00 CST -> 01:00 CDT
        ("America/Santiago", date(2022, 9, 11), utc(2022, 9, 11, 4)),  # 00:00 -04 -> 01:00 -03
        ("Asia/Beirut", date(2023, 3, 26), utc(2023, 3, 25, 22)),  # 00:00 EET -> 01:00 EEST
    ],
)
def test_gap_at_midnight_boundary_is_the_first_instant_after_the_gap(zone, day, boundary):
    assert midnights(zone, day) == 0, f"tzdata no longer has a gap at midnight in {zone} on {day}"
    start, end = bounds("daily", boundary + 5 * HOUR_S, zone)
    assert start == boundary
    assert wall(zone, start) == datetime(day.year, day.month, day.day, 1)
    assert end - start == 23 * HOUR_S


def test_gap_across_midnight_boundary_is_where_the_clock_resumes():
    # America/Toronto 1919-03-30 23:30 EST -> 1919-03-31 00:30 EDT: the gap starts before midnight.
    zone, day = "America/Toronto", date(1919, 3, 31)
    assert midnights(zone, day) == 0, f"tzdata no longer has a gap at midnight in {zone} on {day}"
    start, end = bounds("daily", utc(1919, 3, 31, 12), zone)
    assert start == utc(1919, 3, 31, 4, 30)
    assert wall(zone, start) == datetime(1919, 3, 31, 0, 30)
    assert bounds("daily", start - 1, zone)[1] == start


def test_gap_at_midnight_the_second_before_the_gap_ends_the_previous_day():
    zone, boundary = "America/Sao_Paulo", utc(2018, 11, 4, 3)
    assert bounds("daily", boundary - 1, zone) == (utc(2018, 11, 3, 3), boundary)


def test_gap_at_midnight_on_a_monthly_anchor_day_starts_the_month_after_the_gap():
    zone = "America/Sao_Paulo"
    assert bounds("monthly", utc(2018, 11, 20), zone, anchor_day=4) == (utc(2018, 11, 4, 3), utc(2018, 12, 4, 2))


def test_fold_at_midnight_boundary_is_the_first_occurrence():
    zone, day = "America/Havana", date(2024, 11, 3)  # 01:00 CDT -> 00:00 CST: 00:00-01:00 repeats
    assert midnights(zone, day) == 2, f"tzdata no longer has a fold at midnight in {zone} on {day}"
    first, second = local(zone, 2024, 11, 3, fold=0), local(zone, 2024, 11, 3, fold=1)
    assert (first, second) == (utc(2024, 11, 3, 4), utc(2024, 11, 3, 5))
    assert bounds("daily", second, zone) == (first, utc(2024, 11, 4, 5))
    assert bounds("daily", first - 1, zone)[1] == first


def test_fold_at_midnight_day_is_25_hours():
    start, end = bounds("daily", utc(2024, 11, 3, 12), "America/Havana")
    assert end - start == 25 * HOUR_S


def test_fold_across_midnight_keeps_the_repeated_hour_in_the_new_day():
    # America/Goose_Bay 2010-11-07 00:01 ADT -> 2010-11-06 23:01 AST: midnight of the 7th comes
    # first at 03:00Z, and the repeated 23:01-00:00 reads the 6th but lies after it.
    zone = "America/Goose_Bay"
    assert midnights(zone, date(2010, 11, 7)) == 2
    repeated = utc(2010, 11, 7, 3, 30)
    assert wall(zone, repeated) == datetime(2010, 11, 6, 23, 30)
    assert bounds("daily", repeated, zone) == (utc(2010, 11, 7, 3), utc(2010, 11, 8, 4))
    assert bounds("daily", utc(2010, 11, 7, 3) - 1, zone) == (utc(2010, 11, 6, 3), utc(2010, 11, 7, 3))


def test_skipped_day_has_no_period_of_its_own():
    # Pacific/Apia skipped 2011-12-30 entirely (-10 -> +14 at the end of the 29th).
    zone = "Pacific/Apia"
    before = bounds("daily", local(zone, 2011, 12, 29, 12), zone)
    after = bounds("daily", local(zone, 2011, 12, 31, 12), zone)
    assert before[1] == after[0] == utc(2011, 12, 30, 10)
    assert period_id(parse_period_spec("daily", zone), after[0]) == "daily:2011-12-31@Pacific/Apia"


# -- ids and views -----------------------------------------------------------------------------


def test_period_id_names_kind_local_start_date_and_zone():
    spec = parse_period_spec("monthly", "Europe/Berlin")
    start, _ = period_bounds(spec, utc(2026, 12, 15))
    assert start == utc(2026, 11, 30, 23)
    assert period_id(spec, start) == "monthly:2026-12-01@Europe/Berlin"


def test_period_id_differs_between_consecutive_periods():
    spec = parse_period_spec("weekly", "Asia/Kolkata", 3)
    start, end = period_bounds(spec, utc(2026, 7, 15))
    assert period_id(spec, start) != period_id(spec, end)


def test_period_view_reports_utc_iso_bounds_and_id():
    spec = parse_period_spec("monthly", "Europe/Berlin")
    assert period_view(spec, utc(2026, 12, 15)) == {
        "kind": "monthly",
        "timezone": "Europe/Berlin",
        "anchor_day": 1,
        "start": "2026-11-30T23:00:00Z",
        "end": "2026-12-31T23:00:00Z",
        "id": "monthly:2026-12-01@Europe/Berlin",
    }


# -- invalid specs -----------------------------------------------------------------------------


def test_parse_period_spec_without_anchor_day_anchors_on_1():
    assert parse_period_spec("weekly") == PeriodSpec("weekly", "UTC", 1)


def test_period_error_is_a_value_error():
    assert issubclass(PeriodError, ValueError)


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "Europe/berlin ", "", "America", "../etc/passwd", "localtime", "right/UTC"]
)
def test_unknown_zone_names_period_timezone_and_the_zone(zone):
    with pytest.raises(PeriodError, match=rf"^period_timezone .*{re.escape(repr(zone))}"):
        parse_period_spec("daily", zone)


def test_unknown_kind_names_period():
    with pytest.raises(PeriodError, match=r"^period must be one of daily, weekly, monthly, not 'hourly'"):
        parse_period_spec("hourly")


@pytest.mark.parametrize(
    ("kind", "anchor_day"),
    [
        ("monthly", 0),
        ("monthly", 32),
        ("weekly", 0),
        ("weekly", 8),
        ("daily", 2),
        ("monthly", True),
        ("monthly", "1"),
        ("monthly", 1.0),
    ],
)
def test_bad_anchor_day_names_period_anchor_day_and_the_value(kind, anchor_day):
    with pytest.raises(PeriodError, match=rf"^period_anchor_day for {kind} .*, not {re.escape(repr(anchor_day))}$"):
        parse_period_spec(kind, "UTC", anchor_day)


def test_spec_built_directly_is_validated_too():
    with pytest.raises(PeriodError, match="period_anchor_day"):
        PeriodSpec("weekly", "UTC", 8)


# -- properties --------------------------------------------------------------------------------

ZONES = (
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kolkata",
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/Sao_Paulo",  # DST gaps at midnight until 2018
)
LENGTH_S = {
    "daily": (23 * HOUR_S, 25 * HOUR_S),
    "weekly": (7 * DAY_S - HOUR_S, 7 * DAY_S + HOUR_S),
    "monthly": (28 * DAY_S - HOUR_S, 31 * DAY_S + HOUR_S),
}
ANCHOR_DAYS = {"daily": range(1, 2), "weekly": range(1, 8), "monthly": range(1, 32)}
SPECS = {kind: [PeriodSpec(kind, zone, day) for zone in ZONES for day in ANCHOR_DAYS[kind]] for kind in PERIODS}
specs = st.sampled_from(PERIODS).flatmap(lambda kind: st.sampled_from(SPECS[kind]))  # each kind a third of the time
instants = st.builds(
    lambda s, frac: s + frac,
    st.integers(int(utc(1971, 1, 1)), int(utc(2100, 1, 1))),
    st.sampled_from([0.0, 0.25, 0.5, 0.999999, 0.9999999]),
)
PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(specs, instants)
def test_property_period_contains_now_in_whole_seconds(spec, now):
    start, end = period_bounds(spec, now)
    assert start <= now < end
    assert start.is_integer() and end.is_integer()


@PROPERTY
@given(specs, instants)
def test_property_next_period_starts_where_this_one_ends(spec, now):
    _, end = period_bounds(spec, now)
    assert period_bounds(spec, end)[0] == end


@PROPERTY
@given(specs, instants)
def test_property_period_of_its_start_is_itself(spec, now):
    start, end = period_bounds(spec, now)
    assert period_bounds(spec, start) == (start, end)


@PROPERTY
@given(specs, instants)
def test_property_second_before_the_start_is_in_the_previous_period(spec, now):
    start, _ = period_bounds(spec, now)
    previous_start, previous_end = period_bounds(spec, start - 1)
    assert previous_end == start and previous_start < start


@PROPERTY
@given(specs, instants)
def test_property_period_length_is_its_calendar_length_within_an_hour(spec, now):
    start, end = period_bounds(spec, now)
    low_s, high_s = LENGTH_S[spec.kind]
    assert low_s <= end - start <= high_s


@PROPERTY
@given(specs, instants)
def test_property_period_starts_at_local_midnight_of_its_anchor_day(spec, now):
    start, _ = period_bounds(spec, now)
    first = wall(spec.timezone, start)
    assert wall(spec.timezone, start - 1).date() < first.date()  # a new local day starts here
    assert first.time() == datetime.min.time() or midnights(spec.timezone, first.date()) == 0
    if spec.kind == "weekly":
        assert first.isoweekday() == spec.anchor_day
    if spec.kind == "monthly":
        assert first.day == min(spec.anchor_day, calendar.monthrange(first.year, first.month)[1])


@PROPERTY
@given(specs, instants)
def test_property_period_id_is_the_same_for_every_instant_of_the_period(spec, now):
    start, end = period_bounds(spec, now)
    assert period_view(spec, now)["id"] == period_id(spec, start) == period_view(spec, end - 1)["id"]
    assert period_id(spec, start) != period_id(spec, end)
