"""Calendar periods for budget caps: where the current day, week or month starts and ends. Pure.

A cap may be per calendar period (`daily`, `weekly`, `monthly`): a key spends at most N in
the period that contains `now`, and usage resets at the boundary by construction, because
the next period is another interval. This module only computes the intervals; no clock is
read here, every function takes `now` (POSIX seconds).

A boundary is local midnight (00:00 wall time in the spec's IANA zone) of the boundary day:
- monthly: day `anchor_day` of each month, clamped to the month's last day (31 means "the
  last day" in short months; 29 means Feb 28 outside leap years);
- weekly: ISO weekday `anchor_day` (1 = Monday .. 7 = Sunday);
- daily: every day.

Where local midnight does not exist (a DST gap at midnight: America/Havana, America/Santiago,
Asia/Beirut, America/Sao_Paulo until 2018) the boundary is the first instant after the gap;
where it occurs twice (a fold at midnight: America/Havana in November) it is the first
occurrence. So a daily period is 23 h or 25 h long across a DST change, and the periods of a
spec always tile the time line: the end of one is the start of the next.
"""

from __future__ import annotations

import calendar
import functools
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone as dt_timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("daily", "weekly", "monthly")

ANCHOR_DAY_MAX = {"daily": 1, "weekly": 7, "monthly": 31}
# `now` outside this range is a caller's bug (a clock in ms, a sentinel): years 1900 .. 3000.
NOW_MIN_S = -2_208_988_800.0
NOW_MAX_S = 32_503_680_000.0
# A gap at midnight is searched within the span its two candidate offsets give; no zone has
# shifted by more than a day (Pacific/Apia skipped 2011-12-30 whole, a 24 h gap).
GAP_SPAN_MAX_S = 2 * 86_400
# Names ZoneInfo loads that are no IANA zone: this machine's own setting, and the leap-second
# "right/" zones, whose clocks are not POSIX time.
NOT_ZONE_NAMES = frozenset({"localtime", "posixrules"})
NOT_ZONE_PREFIXES = ("right/",)
BOUNDARY_CACHE_MAX = 4096  # (zone, day) -> instant; a zone's boundaries are few per year

_ONE_DAY = timedelta(days=1)


class PeriodError(ValueError):
    """A period spec that cannot be used; the message names the bad field and value."""


@dataclass(frozen=True)
class PeriodSpec:
    kind: str  # one of PERIODS
    timezone: str = "UTC"  # an IANA zone name, e.g. "Europe/Berlin"
    # monthly: day of month a period starts (1..31, clamped to the month's last day);
    # weekly: ISO weekday 1=Monday..7=Sunday; daily: must be 1 (ignored)
    anchor_day: int = 1

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        _check_timezone(self.timezone)
        _check_anchor_day(self.kind, self.anchor_day)


def parse_period_spec(kind: str, timezone: str = "UTC", anchor_day: int | None = None) -> PeriodSpec:
    """A validated spec from config/CLI/admin values; `anchor_day` None means 1."""
    return PeriodSpec(kind, timezone, 1 if anchor_day is None else anchor_day)


def period_bounds(spec: PeriodSpec, now: float) -> tuple[float, float]:
    """(start, end) in POSIX seconds, whole seconds, of the period with start <= now < end."""
    assert math.isfinite(now) and NOW_MIN_S <= now <= NOW_MAX_S, f"now out of range: {now!r}"
    tz = ZoneInfo(spec.timezone)
    start_day = _start_day(spec, datetime.fromtimestamp(now, tz).date())
    start, end = _bounds_of(spec, start_day)
    # Near a fold that crosses midnight backwards (America/Goose_Bay 00:01 -> 23:01), or when
    # `now` rounds up to the next microsecond, `now`'s local date is not its period's.
    for _ in range(2):
        if now < start:
            start_day = _start_day(spec, start_day - _ONE_DAY)
        elif now >= end:
            start_day = _next_start_day(spec, start_day)
        else:
            break
        start, end = _bounds_of(spec, start_day)
    assert start <= now < end, (spec, now, start, end)
    return start, end


def period_id(spec: PeriodSpec, start: float) -> str:
    """A stable name of the period that starts at `start`: "monthly:2026-12-01@Europe/Berlin".

    The date is the local date of the period's start day.
    """
    start_day = datetime.fromtimestamp(start, ZoneInfo(spec.timezone)).date()
    assert _bounds_of(spec, _start_day(spec, start_day))[0] == start, f"not a {spec} period start: {start!r}"
    return f"{spec.kind}:{start_day.isoformat()}@{spec.timezone}"


def period_view(spec: PeriodSpec, now: float) -> dict:
    """The period containing `now`, as JSON for usage reports and the admin API."""
    start, end = period_bounds(spec, now)
    return {
        "kind": spec.kind,
        "timezone": spec.timezone,
        "anchor_day": spec.anchor_day,
        "start": _iso_utc(start),
        "end": _iso_utc(end),
        "id": period_id(spec, start),
    }


# -- validation -----------------------------------------------------------------------------


def _check_kind(kind: object) -> None:
    if not isinstance(kind, str) or kind not in PERIODS:
        raise PeriodError(f"period must be one of {', '.join(PERIODS)}, not {kind!r}")


def _check_timezone(name: object) -> None:
    if not isinstance(name, str) or not name or name in NOT_ZONE_NAMES or name.startswith(NOT_ZONE_PREFIXES):
        raise PeriodError(f"period_timezone must be an IANA zone name such as 'Europe/Berlin', not {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as error:
        raise PeriodError(f"period_timezone {name!r} is not a known IANA zone name (e.g. 'Europe/Berlin')") from error


def _check_anchor_day(kind: str, anchor_day: object) -> None:
    top = ANCHOR_DAY_MAX[kind]
    if not isinstance(anchor_day, int) or isinstance(anchor_day, bool) or not 1 <= anchor_day <= top:
        meaning = {
            "daily": "daily periods take no anchor day: 1",
            "weekly": "an ISO weekday 1=Monday..7=Sunday",
            "monthly": "a day of month 1..31 (clamped to the month's last day)",
        }[kind]
        raise PeriodError(f"period_anchor_day for {kind} must be {meaning}, not {anchor_day!r}")


# -- calendar arithmetic (local dates) -------------------------------------------------------


def _start_day(spec: PeriodSpec, day: date) -> date:
    """The local date on which the period containing local date `day` starts."""
    if spec.kind == "daily":
        return day
    if spec.kind == "weekly":
        return day - timedelta(days=(day.isoweekday() - spec.anchor_day) % 7)
    this_month = _monthly_start(day.year, day.month, spec.anchor_day)
    if day >= this_month:
        return this_month
    year, month = (day.year, day.month - 1) if day.month > 1 else (day.year - 1, 12)
    return _monthly_start(year, month, spec.anchor_day)


def _next_start_day(spec: PeriodSpec, start_day: date) -> date:
    if spec.kind == "daily":
        return start_day + _ONE_DAY
    if spec.kind == "weekly":
        return start_day + timedelta(days=7)
    year, month = (start_day.year, start_day.month + 1) if start_day.month < 12 else (start_day.year + 1, 1)
    return _monthly_start(year, month, spec.anchor_day)


def _monthly_start(year: int, month: int, anchor_day: int) -> date:
    return date(year, month, min(anchor_day, calendar.monthrange(year, month)[1]))


def _bounds_of(spec: PeriodSpec, start_day: date) -> tuple[float, float]:
    start = _boundary_s(spec.timezone, start_day)
    end = _boundary_s(spec.timezone, _next_start_day(spec, start_day))
    assert start < end, (spec, start_day, start, end)
    return start, end


# -- local midnight -> UTC instant -----------------------------------------------------------


@functools.lru_cache(maxsize=BOUNDARY_CACHE_MAX)
def _boundary_s(zone: str, day: date) -> float:
    """The instant of local midnight of `day` in `zone`: its first occurrence in a fold, the
    first instant after the gap where it does not exist."""
    tz = ZoneInfo(zone)
    wall = datetime(day.year, day.month, day.day)
    candidates = [wall.replace(tzinfo=tz, fold=fold).timestamp() for fold in (0, 1)]
    if candidates[0] == candidates[1]:  # one offset for both folds (PEP 495): neither gap nor fold
        instant = candidates[0]
    else:
        existing = [ts for ts in candidates if _wall(tz, ts) == wall]
        instant = min(existing) if existing else _first_instant_after_gap(tz, wall, min(candidates), max(candidates))
    assert instant.is_integer(), (zone, day, instant)
    return instant


def _first_instant_after_gap(tz: ZoneInfo, wall: datetime, low_s: float, high_s: float) -> float:
    """The least instant in (low_s, high_s] whose wall time is at or after `wall`.

    In a gap the offset before the transition maps `wall` past the transition (high_s) and the
    offset after maps it before (low_s); the clock reads before `wall` at low_s, after at high_s.
    """
    assert 0 < high_s - low_s <= GAP_SPAN_MAX_S, (wall, low_s, high_s)
    low, high = int(low_s), int(high_s)
    assert _wall(tz, low) < wall <= _wall(tz, high), (wall, low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if _wall(tz, mid) >= wall:
            high = mid
        else:
            low = mid
    return float(high)


def _wall(tz: ZoneInfo, ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None)


def _iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
