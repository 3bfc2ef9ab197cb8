"""The pure admission core: principals, caps, holds and sliding windows.

Modelled on TigerBeetle's two-phase transfers. `reserve` places a *hold*
for a request's worst-case cost on its key and its account at once; the
hold is then resolved exactly once: *settled* to actual usage (never more
than the hold), *released* (no charge), *expired* or *orphaned* (charged in
full, the upper bound of what a neuron may have served). A second
resolution is an explicit error.

No I/O, no clock, no threads: every method takes `now` (seconds). The Trio
shell persists what this module decides; the simulator runs it in virtual
time. For every principal and every cap it keeps, at every instant:

    balance:      spent + held <= balance            (tokens; micro-USD)
    window:       window_usage(now) + held <= window  (tokens; micro-USD)
    period:       period_usage(now) + held <= period  (tokens; micro-USD)
    concurrency:  in_flight <= max_concurrency

because a hold is only placed when it fits under all of them, a settlement
never charges more than its hold, and usage only ages out of a window or
rolls out of a calendar period. A hold carries both a token amount and a
money amount (micro-USD, integers); every cap is checked in the same
reserve. A charge lands in the period in which it is resolved: the hold
was counted against every period it was open in, so a hold reserved
before a boundary and settled after it still fits the new period's cap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

from cortex.budget.periods import PeriodSpec, period_bounds
from cortex.budget.pricing import usd_text

RESOLVED_MEMORY_MAX = 100_000  # resolved hold ids remembered for double-resolution errors
WINDOW_SLOTS_MAX = 4096  # entries per sliding window; finer usage is merged conservatively


class HoldState(str, Enum):
    OPEN = "open"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"
    ORPHANED = "orphaned"


class LedgerError(Exception):
    pass


class HoldAlreadyResolved(LedgerError):
    def __init__(self, hold_id: str, state: HoldState) -> None:
        super().__init__(f"hold {hold_id} is already {state.value}")
        self.hold_id = hold_id
        self.state = state


class UnknownHold(LedgerError):
    pass


@dataclass(frozen=True)
class Caps:
    balance_tokens: int | None = None
    window_tokens: int | None = None
    window_s: float | None = None
    max_concurrency: int | None = None
    balance_usd: int | None = None  # micro-USD, as every money figure in the ledger
    window_usd: int | None = None  # over the same window_s as window_tokens
    period: PeriodSpec | None = None  # a calendar period: daily, weekly or monthly
    period_tokens: int | None = None
    period_usd: int | None = None
    # Not a cap but how this principal's requests hold their output: "worst_case" or "incremental";
    # None: the account's choice, else the server's (budget.output_holds).
    output_holds: str | None = None

    def __post_init__(self) -> None:
        assert self.output_holds in (None, "worst_case", "incremental")
        has_window = self.window_tokens is not None or self.window_usd is not None
        assert has_window == (self.window_s is not None), "a window needs an amount and seconds"
        has_period = self.period_tokens is not None or self.period_usd is not None
        assert has_period == (self.period is not None), "a period cap needs an amount and a period"
        for value in (self.balance_tokens, self.window_tokens, self.max_concurrency, self.balance_usd,
                      self.window_usd, self.period_tokens, self.period_usd):
            assert value is None or value >= 0
        assert self.window_s is None or self.window_s > 0

    @property
    def empty(self) -> bool:
        return (self.balance_tokens is None and self.window_s is None and self.max_concurrency is None
                and self.balance_usd is None and self.period is None)

    @property
    def money(self) -> bool:
        """Whether any cap is in money: then every request must have a price."""
        return self.balance_usd is not None or self.window_usd is not None or self.period_usd is not None


class SlidingWindow:
    """Token and micro-USD usage by time, summed over the trailing `window_s` seconds.

    Exact event times are kept; when two charges fall within one slot
    (window_s / WINDOW_SLOTS_MAX) they merge under the *later* time, so
    merged usage ages out no earlier than it really would. That bounds the
    memory and keeps the window conservative.
    """

    def __init__(self, window_s: float) -> None:
        assert window_s > 0
        self.window_s = window_s
        self._slot_s = window_s / WINDOW_SLOTS_MAX
        self._events: deque[list[float]] = deque()  # [first_t, last_t, tokens, usd]
        self._sum = 0
        self._sum_usd = 0

    def add(self, now: float, tokens: int, usd: int = 0) -> None:
        assert tokens >= 0 and usd >= 0
        if tokens == 0 and usd == 0:
            return
        last = self._events[-1] if self._events else None
        if last is not None and now - last[0] < self._slot_s:
            last[1] = max(last[1], now)
            last[2] += tokens
            last[3] += usd
        else:
            self._events.append([now, now, tokens, usd])
        self._sum += tokens
        self._sum_usd += usd

    def resize(self, window_s: float) -> None:
        assert window_s > 0
        self.window_s = window_s
        self._slot_s = window_s / WINDOW_SLOTS_MAX

    def usage(self, now: float) -> int:
        """Token usage at times t with now - window_s < t."""
        self._age(now)
        return self._sum

    def usage_usd(self, now: float) -> int:
        self._age(now)
        return self._sum_usd

    def _age(self, now: float) -> None:
        events = self._events
        while events and events[0][1] <= now - self.window_s:
            event = events.popleft()
            self._sum -= int(event[2])
            self._sum_usd -= int(event[3])

    def wait_s(self, now: float, excess: int, unit: int = 2) -> float | None:
        """Seconds until at least `excess` of usage (tokens: unit 2, micro-USD: 3) has aged out, or None if it never can."""
        self._age(now)
        if excess <= 0:
            return 0.0
        if excess > (self._sum if unit == 2 else self._sum_usd):
            return None
        aged = 0
        for event in self._events:
            aged += int(event[unit])
            if aged >= excess:
                return max(0.0, event[1] + self.window_s - now)
        raise AssertionError("unreachable: excess <= sum")

    def clear_s(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self._age(now)
        return max(0.0, self._events[-1][1] + self.window_s - now) if self._events else 0.0


@dataclass
class Principal:
    """A key or an account: its caps and what it has spent and holds."""

    id: str
    kind: str  # "key" or "account"
    caps: Caps
    spent_tokens: int = 0
    held_tokens: int = 0
    in_flight: int = 0
    spent_usd: int = 0
    held_usd: int = 0
    window: SlidingWindow | None = None
    # The calendar period charges now land in, and what they add up to.
    period_start: float | None = None
    period_end: float | None = None
    period_used_tokens: int = 0
    period_used_usd: int = 0
    # Charges made while a grown window's (or a new period's) history is read
    # from the store; they join the rebuilt usage so none is lost to the race.
    capture: list[tuple[float, int, int]] | None = None

    def __post_init__(self) -> None:
        self._sync_window()

    def set_caps(self, caps: Caps, history: list[tuple[float, int, int]] | None = None) -> None:
        """New caps; `history` (time, tokens, usd) rebuilds a window that grew or appeared."""
        self.caps = caps
        if history is not None and caps.window_s is not None:
            self.window = SlidingWindow(caps.window_s)
            for at, tokens, usd in history:
                self.window.add(at, tokens, usd)
        self._sync_window()
        if caps.period is None:
            self.period_start = self.period_end = None
            self.period_used_tokens = self.period_used_usd = 0

    def set_period_usage(self, start: float, end: float, tokens: int, usd: int) -> None:
        """What the store says was charged in the period [start, end) so far."""
        assert self.caps.period is not None and start < end
        self.period_start, self.period_end = start, end
        self.period_used_tokens, self.period_used_usd = tokens, usd

    def roll_period(self, now: float) -> None:
        """Enter the period that contains `now`: usage resets at the boundary by construction."""
        spec = self.caps.period
        if spec is None or (self.period_end is not None and now < self.period_end):
            return
        start, end = period_bounds(spec, now)
        if start != self.period_start:
            self.period_used_tokens = self.period_used_usd = 0
        self.period_start, self.period_end = start, end

    def period_usage(self, now: float) -> tuple[int, int]:
        self.roll_period(now)
        return self.period_used_tokens, self.period_used_usd

    def _sync_window(self) -> None:
        if self.caps.window_s is None:
            self.window = None
        elif self.window is None:
            self.window = SlidingWindow(self.caps.window_s)
        else:
            self.window.resize(self.caps.window_s)  # usage history is kept

    def window_usage(self, now: float) -> int:
        return self.window.usage(now) if self.window is not None else 0

    def window_usage_usd(self, now: float) -> int:
        return self.window.usage_usd(now) if self.window is not None else 0


@dataclass(frozen=True)
class Refusal:
    """Why a reservation did not fit, and when (if ever) retrying can help."""

    reason: str  # "balance", "window", "period" or "concurrency"
    principal_kind: str
    principal_id: str
    message: str
    retry_after_s: float | None  # None: waiting alone will not help
    never_fits: bool = False  # the estimate exceeds the cap itself
    unit: str = "tokens"  # or "usd": which of the cap's amounts is short


@dataclass
class Hold:
    id: str
    key_id: str
    account_id: str
    amount_tokens: int
    created_at: float
    expires_at: float
    request_id: str | None = None
    state: HoldState = HoldState.OPEN
    charged_tokens: int = 0
    actual_tokens: int | None = None
    resolved_at: float | None = None
    amount_usd: int = 0
    charged_usd: int = 0


@dataclass(frozen=True)
class Resolution:
    hold: Hold
    charged_tokens: int
    overrun_tokens: int  # actual above the hold: the estimate was wrong
    charged_usd: int = 0


@dataclass(frozen=True)
class Headroom:
    """The tightest token cap after a reservation, for x-ratelimit-* headers."""

    limit_tokens: int
    remaining_tokens: int
    reset_s: float | None


@dataclass
class Ledger:
    principals: dict[tuple[str, str], Principal] = field(default_factory=dict)
    key_accounts: dict[str, str] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)  # open holds only
    # Recently resolved holds, so that a second resolution is a named error.
    resolved: dict[str, HoldState] = field(default_factory=dict)
    # Called after every reserve and resolution with (event, hold, now): the
    # simulator checks its invariants there, at every instant.
    observer: Callable[[str, Hold, float], None] | None = None
    # Test-only fault injection, so the simulator can prove it catches bugs.
    fault_skip_cap_check: bool = False
    fault_double_charge: bool = False
    fault_window_amnesia: bool = False  # charges never reach the sliding windows

    # --- principals ------------------------------------------------------------

    def add_account(self, account_id: str, caps: Caps = Caps(), spent_tokens: int = 0, spent_usd: int = 0) -> Principal:
        assert ("account", account_id) not in self.principals
        p = Principal(account_id, "account", caps, spent_tokens, spent_usd=spent_usd)
        self.principals[("account", account_id)] = p
        return p

    def add_key(
        self, key_id: str, account_id: str, caps: Caps = Caps(), spent_tokens: int = 0, spent_usd: int = 0
    ) -> Principal:
        assert ("account", account_id) in self.principals, f"unknown account {account_id}"
        assert ("key", key_id) not in self.principals
        p = Principal(key_id, "key", caps, spent_tokens, spent_usd=spent_usd)
        self.principals[("key", key_id)] = p
        self.key_accounts[key_id] = account_id
        return p

    def principal(self, kind: str, principal_id: str) -> Principal:
        return self.principals[(kind, principal_id)]

    def set_caps(
        self, kind: str, principal_id: str, caps: Caps, history: list[tuple[float, int, int]] | None = None
    ) -> None:
        self.principal(kind, principal_id).set_caps(caps, history)

    def begin_window_rebuild(self, kind: str, principal_id: str) -> None:
        """Start recording charges, from the instant the history query is queued.

        Charges before this instant are in the store's history; charges
        after it are captured; `finish_window_rebuild` joins both.
        """
        p = self.principal(kind, principal_id)
        assert p.capture is None, "one window rebuild at a time per principal"
        p.capture = []

    def finish_window_rebuild(
        self, kind: str, principal_id: str, caps: Caps, history: list[tuple[float, int, int]] | None,
        period: tuple[float, float, int, int] | None = None,
    ) -> None:
        """Apply `caps` with the store's usage: `history` for a window, `period` (start, end, tokens, usd) for a period."""
        p = self.principal(kind, principal_id)
        assert p.capture is not None
        captured, p.capture = p.capture, None
        p.set_caps(caps, sorted(history) + captured if history is not None else None)
        if period is not None:
            start, end, tokens, usd = period
            later = []
            for at, t, u in captured:
                if start <= at < end:
                    tokens, usd = tokens + t, usd + u
                elif at >= end:
                    later.append((at, t, u))
            p.set_period_usage(start, end, tokens, usd)
            for at, t, u in later:  # the query ran across a boundary: these opened the next period
                p.roll_period(at)
                p.period_used_tokens += t
                p.period_used_usd += u

    def abort_window_rebuild(self, kind: str, principal_id: str) -> None:
        self.principal(kind, principal_id).capture = None

    def top_up(self, kind: str, principal_id: str, tokens: int = 0, usd: int = 0) -> Caps:
        """Raise a hard balance. A principal without one has nothing to top up."""
        p = self.principal(kind, principal_id)
        caps = topped_up(p.caps, tokens, usd)
        if isinstance(caps, str):
            raise LedgerError(f"{kind} {principal_id} {caps}")
        p.set_caps(caps)
        return caps

    def record_usage(self, key_id: str, at: float, tokens: int, usd: int = 0) -> None:
        """Replay a past charge into the windows (recovery); lifetime spend is loaded separately."""
        for p in self._chain(key_id):
            if p.window is not None:
                p.window.add(at, tokens, usd)

    def _chain(self, key_id: str) -> tuple[Principal, Principal]:
        return self.principals[("key", key_id)], self.principals[("account", self.key_accounts[key_id])]

    # --- admission -------------------------------------------------------------

    def reserve(
        self, hold_id: str, key_id: str, amount_tokens: int, now: float, ttl_s: float, request_id: str | None = None,
        amount_usd: int = 0,
    ) -> Hold | Refusal:
        """Place a hold of `amount_tokens` and `amount_usd` on the key and its account, or say why it does not fit."""
        assert amount_tokens >= 0 and amount_usd >= 0 and ttl_s > 0
        assert hold_id not in self.holds
        chain = self._chain(key_id)
        if not self.fault_skip_cap_check:
            refusal = self._refusal(chain, amount_tokens, amount_usd, now)
            if refusal is not None:
                return refusal
        for p in chain:
            p.held_tokens += amount_tokens
            p.held_usd += amount_usd
            p.in_flight += 1
        hold = Hold(hold_id, key_id, chain[1].id, amount_tokens, now, now + ttl_s, request_id, amount_usd=amount_usd)
        self.holds[hold_id] = hold
        if self.observer is not None:
            self.observer("reserve", hold, now)
        return hold

    def extend(self, hold_id: str, amount_tokens: int, now: float, amount_usd: int = 0) -> Hold | Refusal:
        """Grow an open hold by `amount_tokens` and `amount_usd`, checked against every cap of the key
        and its account as a reserve is (but not their concurrency: the request is in flight already),
        or say why it does not fit. An incremental output hold takes its next slice so."""
        assert amount_tokens >= 0 and amount_usd >= 0
        hold = self._open(hold_id)
        chain = self._chain(hold.key_id)
        if not self.fault_skip_cap_check:
            refusal = self._refusal(chain, amount_tokens, amount_usd, now, concurrency=False)
            if refusal is not None:
                return refusal
        for p in chain:
            p.held_tokens += amount_tokens
            p.held_usd += amount_usd
        hold.amount_tokens += amount_tokens
        hold.amount_usd += amount_usd
        if self.observer is not None:
            self.observer("extend", hold, now)
        return hold

    def _refusal(
        self, chain: tuple[Principal, ...], amount: int, amount_usd: int, now: float, concurrency: bool = True
    ) -> Refusal | None:
        refusals = [r for p in chain for r in _check(p, amount, amount_usd, now, concurrency)]
        if not refusals:
            return None
        # A spent balance is final; otherwise wait for the slowest cap to clear.
        for r in refusals:
            if r.reason == "balance":
                return r
        never = [r for r in refusals if r.never_fits]
        if never:
            return never[0]
        waits = [r.retry_after_s for r in refusals]
        if any(w is None for w in waits):
            return next(r for r in refusals if r.retry_after_s is None)
        return max(refusals, key=lambda r: r.retry_after_s or 0.0)

    def restore_hold(self, hold: Hold) -> None:
        """Re-place an open hold read back from the store (a read-only view)."""
        assert hold.state is HoldState.OPEN and hold.id not in self.holds
        for p in self._chain(hold.key_id):
            p.held_tokens += hold.amount_tokens
            p.held_usd += hold.amount_usd
            p.in_flight += 1
        self.holds[hold.id] = hold

    # --- resolution ------------------------------------------------------------

    def settle(self, hold_id: str, actual_tokens: int, now: float, actual_usd: int = 0) -> Resolution:
        """Charge actual usage, capped at the hold so no cap can be passed."""
        assert actual_tokens >= 0 and actual_usd >= 0
        hold = self._open(hold_id)
        charged = min(actual_tokens, hold.amount_tokens)
        hold.actual_tokens = actual_tokens
        overrun = max(0, actual_tokens - hold.amount_tokens)
        return self._resolve(hold, HoldState.SETTLED, charged, now, overrun, min(actual_usd, hold.amount_usd))

    def release(self, hold_id: str, now: float) -> Resolution:
        return self._resolve(self._open(hold_id), HoldState.RELEASED, 0, now)

    def orphan(self, hold_id: str, now: float) -> Resolution:
        hold = self._open(hold_id)
        return self._resolve(hold, HoldState.ORPHANED, hold.amount_tokens, now, 0, hold.amount_usd)

    def expire(self, now: float) -> list[Resolution]:
        """Resolve every hold past its expiry at its held amount."""
        due = [h for h in self.holds.values() if h.expires_at <= now]
        return [self._resolve(h, HoldState.EXPIRED, h.amount_tokens, now, 0, h.amount_usd) for h in due]

    def _open(self, hold_id: str) -> Hold:
        hold = self.holds.get(hold_id)
        if hold is None:
            raise self._gone(hold_id)
        return hold

    def _gone(self, hold_id: str) -> LedgerError:
        state = self.resolved.get(hold_id)
        if state is not None:
            return HoldAlreadyResolved(hold_id, state)
        return UnknownHold(f"no hold {hold_id}")

    def _resolve(
        self, hold: Hold, state: HoldState, charged: int, now: float, overrun: int = 0, charged_usd: int = 0
    ) -> Resolution:
        assert hold.state is HoldState.OPEN and 0 <= charged <= hold.amount_tokens
        assert 0 <= charged_usd <= hold.amount_usd
        factor = 2 if self.fault_double_charge else 1
        for p in self._chain(hold.key_id):
            assert p.held_tokens >= hold.amount_tokens and p.held_usd >= hold.amount_usd and p.in_flight >= 1
            p.held_tokens -= hold.amount_tokens
            p.held_usd -= hold.amount_usd
            p.in_flight -= 1
            p.spent_tokens += charged * factor
            p.spent_usd += charged_usd * factor
            if p.window is not None and not self.fault_window_amnesia:
                p.window.add(now, charged, charged_usd)
            if p.caps.period is not None:
                p.roll_period(now)
                p.period_used_tokens += charged * factor
                p.period_used_usd += charged_usd * factor
            if p.capture is not None and (charged or charged_usd):
                p.capture.append((now, charged, charged_usd))
        hold.state = state
        hold.charged_tokens = charged
        hold.charged_usd = charged_usd
        hold.resolved_at = now
        del self.holds[hold.id]
        self.resolved[hold.id] = state
        if len(self.resolved) > RESOLVED_MEMORY_MAX:
            del self.resolved[next(iter(self.resolved))]  # dicts keep insertion order: oldest first
        if self.observer is not None:
            self.observer("resolve", hold, now)
        return Resolution(hold, charged, overrun, charged_usd)

    # --- views -------------------------------------------------------------

    def headroom(self, key_id: str, now: float) -> Headroom | None:
        """The token cap with the least room left over the key and its account."""
        best: Headroom | None = None
        for p in self._chain(key_id):
            for limit, used, reset_s in _token_caps(p, now):
                room = Headroom(limit, max(0, limit - used), reset_s)
                if best is None or room.remaining_tokens < best.remaining_tokens:
                    best = room
        return best


def topped_up(caps: Caps, tokens: int = 0, usd: int = 0) -> Caps | str:
    """`caps` with its balances raised, or why not: only a balance there is can be topped up."""
    assert tokens >= 0 and usd >= 0 and (tokens or usd)
    if tokens and caps.balance_tokens is None:
        return "has no balance in tokens to top up; set one with its limits"
    if usd and caps.balance_usd is None:
        return "has no balance in USD to top up; set one with its limits"
    return replace(
        caps,
        balance_tokens=caps.balance_tokens + tokens if caps.balance_tokens is not None else None,
        balance_usd=caps.balance_usd + usd if caps.balance_usd is not None else None,
    )


def _token_caps(p: Principal, now: float) -> list[tuple[int, int, float | None]]:
    caps = []
    if p.caps.balance_tokens is not None:
        caps.append((p.caps.balance_tokens, p.spent_tokens + p.held_tokens, None))
    if p.caps.window_tokens is not None and p.window is not None:
        caps.append((p.caps.window_tokens, p.window.usage(now) + p.held_tokens, p.window.clear_s(now)))
    if p.caps.period_tokens is not None:
        used, _ = p.period_usage(now)
        assert p.period_end is not None
        caps.append((p.caps.period_tokens, used + p.held_tokens, p.period_end - now))
    return caps


@dataclass(frozen=True)
class _Amount:
    """One cap's arithmetic in one unit, for the refusal message."""

    unit: str  # "tokens" or "usd"
    asked: int
    held: int

    def text(self, value: int) -> str:
        return f"{value} tokens" if self.unit == "tokens" else usd_text(value)


def _check(p: Principal, amount: int, amount_usd: int, now: float, concurrency: bool = True) -> list[Refusal]:
    caps, out = p.caps, []
    who = f"{p.kind} {p.id}"
    tokens = _Amount("tokens", amount, p.held_tokens)
    usd = _Amount("usd", amount_usd, p.held_usd)
    for limit, spent, a in ((caps.balance_tokens, p.spent_tokens, tokens), (caps.balance_usd, p.spent_usd, usd)):
        if limit is not None and spent + a.held + a.asked > limit:
            out.append(_balance_refusal(p, who, limit, spent, a))
    if p.window is not None:
        for limit, a, index in ((caps.window_tokens, tokens, 2), (caps.window_usd, usd, 3)):
            if limit is not None:
                used = p.window.usage(now) if index == 2 else p.window.usage_usd(now)
                excess = used + a.held + a.asked - limit
                if excess > 0:
                    out.append(_window_refusal(p, who, limit, used, excess, a, p.window.wait_s(now, excess, index)))
    if caps.period is not None:
        used_tokens, used_usd = p.period_usage(now)
        for limit, used, a in ((caps.period_tokens, used_tokens, tokens), (caps.period_usd, used_usd, usd)):
            if limit is not None and used + a.held + a.asked > limit:
                out.append(_period_refusal(p, who, limit, used, a, now))
    if concurrency and caps.max_concurrency is not None and p.in_flight + 1 > caps.max_concurrency:
        never = caps.max_concurrency == 0
        message = f"Concurrency limit of {caps.max_concurrency} requests in flight reached for {who}."
        out.append(Refusal("concurrency", p.kind, p.id, message, None, never))
    return out


def _balance_refusal(p: Principal, who: str, limit: int, spent: int, a: _Amount) -> Refusal:
    never = a.asked > limit - spent
    left = max(0, limit - spent - a.held)
    message = (
        f"This request may cost up to {a.text(a.asked)} but the {who} has {a.text(left)} left of its"
        f" {a.text(limit)} balance" + ("." if not never else "; it cannot fit until the balance is topped up.")
    )
    return Refusal("balance", p.kind, p.id, message, None, never, a.unit)


def _window_refusal(
    p: Principal, who: str, limit: int, used: int, excess: int, a: _Amount, wait_s: float | None
) -> Refusal:
    per = f"{a.text(limit)} per {p.caps.window_s:g} s"
    if a.asked > limit:
        return _never_fits("window", p, who, per, a)
    message = (
        f"Rate limit of {per} reached for {who}: {a.text(used)} used, {a.text(a.held)} held, "
        f"this request needs up to {a.text(a.asked)}."
    )
    return Refusal("window", p.kind, p.id, message, wait_s, False, a.unit)


def _period_refusal(p: Principal, who: str, limit: int, used: int, a: _Amount, now: float) -> Refusal:
    spec = p.caps.period
    assert spec is not None and p.period_end is not None
    per = f"{a.text(limit)} per {_PERIOD_NOUNS[spec.kind]} ({spec.timezone})"
    if a.asked > limit:
        return _never_fits("period", p, who, per, a)
    message = (
        f"The {who}'s limit of {per} is reached: {a.text(used)} used, {a.text(a.held)} held, "
        f"this request needs up to {a.text(a.asked)}. It resets at the start of the next period."
    )
    # Only held requests are in the way: they resolve sooner than the boundary.
    wait_s = None if used + a.asked <= limit else max(0.0, p.period_end - now)
    return Refusal("period", p.kind, p.id, message, wait_s, False, a.unit)


def _never_fits(reason: str, p: Principal, who: str, per: str, a: _Amount) -> Refusal:
    message = (
        f"This request may cost up to {a.text(a.asked)}, more than the {who}'s limit of {per}; it can never fit."
        " Lower max_tokens."
    )
    return Refusal(reason, p.kind, p.id, message, None, True, a.unit)


_PERIOD_NOUNS = {"daily": "day", "weekly": "week", "monthly": "month"}
