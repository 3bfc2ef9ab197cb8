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

    balance:      spent_tokens + held_tokens <= balance_tokens
    window:       window_usage(now) + held_tokens <= window_tokens
    concurrency:  in_flight <= max_concurrency

because a hold is only placed when it fits under all of them, a settlement
never charges more than its hold, and usage only ages out of a window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

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

    def __post_init__(self) -> None:
        assert (self.window_tokens is None) == (self.window_s is None), "a window needs tokens and seconds"
        for value in (self.balance_tokens, self.window_tokens, self.max_concurrency):
            assert value is None or value >= 0
        assert self.window_s is None or self.window_s > 0

    @property
    def empty(self) -> bool:
        return self.balance_tokens is None and self.window_tokens is None and self.max_concurrency is None


class SlidingWindow:
    """Token usage by time, summed over the trailing `window_s` seconds.

    Exact event times are kept; when two charges fall within one slot
    (window_s / WINDOW_SLOTS_MAX) they merge under the *later* time, so
    merged usage ages out no earlier than it really would. That bounds the
    memory and keeps the window conservative.
    """

    def __init__(self, window_s: float) -> None:
        assert window_s > 0
        self.window_s = window_s
        self._slot_s = window_s / WINDOW_SLOTS_MAX
        self._events: deque[list[float]] = deque()  # [first_t, last_t, tokens]
        self._sum = 0

    def add(self, now: float, tokens: int) -> None:
        assert tokens >= 0
        if tokens == 0:
            return
        last = self._events[-1] if self._events else None
        if last is not None and now - last[0] < self._slot_s:
            last[1] = max(last[1], now)
            last[2] += tokens
        else:
            self._events.append([now, now, tokens])
        self._sum += tokens

    def resize(self, window_s: float) -> None:
        assert window_s > 0
        self.window_s = window_s
        self._slot_s = window_s / WINDOW_SLOTS_MAX

    def usage(self, now: float) -> int:
        """Usage at times t with now - window_s < t."""
        events = self._events
        while events and events[0][1] <= now - self.window_s:
            self._sum -= int(events.popleft()[2])
        return self._sum

    def wait_s(self, now: float, excess_tokens: int) -> float | None:
        """Seconds until at least `excess_tokens` of usage has aged out, or None if it never can."""
        self.usage(now)
        if excess_tokens <= 0:
            return 0.0
        if excess_tokens > self._sum:
            return None
        aged = 0
        for _, last_t, tokens in self._events:
            aged += int(tokens)
            if aged >= excess_tokens:
                return max(0.0, last_t + self.window_s - now)
        raise AssertionError("unreachable: excess <= sum")

    def clear_s(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self.usage(now)
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
    window: SlidingWindow | None = None
    # Charges made while a grown window's history is read from the store;
    # they join the rebuilt window so none is lost to the race.
    capture: list[tuple[float, int]] | None = None

    def __post_init__(self) -> None:
        self._sync_window()

    def set_caps(self, caps: Caps, history: list[tuple[float, int]] | None = None) -> None:
        """New caps; `history` (time, tokens) rebuilds a window that grew or appeared."""
        self.caps = caps
        if history is not None and caps.window_s is not None:
            self.window = SlidingWindow(caps.window_s)
            for at, tokens in history:
                self.window.add(at, tokens)
        self._sync_window()

    def _sync_window(self) -> None:
        if self.caps.window_s is None:
            self.window = None
        elif self.window is None:
            self.window = SlidingWindow(self.caps.window_s)
        else:
            self.window.resize(self.caps.window_s)  # usage history is kept

    def window_usage(self, now: float) -> int:
        return self.window.usage(now) if self.window is not None else 0


@dataclass(frozen=True)
class Refusal:
    """Why a reservation did not fit, and when (if ever) retrying can help."""

    reason: str  # "balance", "window" or "concurrency"
    principal_kind: str
    principal_id: str
    message: str
    retry_after_s: float | None  # None: waiting alone will not help
    never_fits: bool = False  # the estimate exceeds the cap itself


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


@dataclass(frozen=True)
class Resolution:
    hold: Hold
    charged_tokens: int
    overrun_tokens: int  # actual above the hold: the estimate was wrong


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

    def add_account(self, account_id: str, caps: Caps = Caps(), spent_tokens: int = 0) -> Principal:
        assert ("account", account_id) not in self.principals
        p = Principal(account_id, "account", caps, spent_tokens)
        self.principals[("account", account_id)] = p
        return p

    def add_key(self, key_id: str, account_id: str, caps: Caps = Caps(), spent_tokens: int = 0) -> Principal:
        assert ("account", account_id) in self.principals, f"unknown account {account_id}"
        assert ("key", key_id) not in self.principals
        p = Principal(key_id, "key", caps, spent_tokens)
        self.principals[("key", key_id)] = p
        self.key_accounts[key_id] = account_id
        return p

    def principal(self, kind: str, principal_id: str) -> Principal:
        return self.principals[(kind, principal_id)]

    def set_caps(
        self, kind: str, principal_id: str, caps: Caps, history: list[tuple[float, int]] | None = None
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
        self, kind: str, principal_id: str, caps: Caps, history: list[tuple[float, int]]
    ) -> None:
        p = self.principal(kind, principal_id)
        assert p.capture is not None
        captured, p.capture = p.capture, None
        p.set_caps(caps, sorted(history) + captured)

    def abort_window_rebuild(self, kind: str, principal_id: str) -> None:
        self.principal(kind, principal_id).capture = None

    def top_up(self, kind: str, principal_id: str, tokens: int) -> Caps:
        """Raise a hard balance. A principal without one has nothing to top up."""
        assert tokens > 0
        p = self.principal(kind, principal_id)
        if p.caps.balance_tokens is None:
            raise LedgerError(f"{kind} {principal_id} has no balance to top up; set one with its limits")
        caps = Caps(p.caps.balance_tokens + tokens, p.caps.window_tokens, p.caps.window_s, p.caps.max_concurrency)
        p.set_caps(caps)
        return caps

    def record_usage(self, key_id: str, at: float, tokens: int) -> None:
        """Replay a past charge into the windows (recovery); lifetime spend is loaded separately."""
        for p in self._chain(key_id):
            if p.window is not None:
                p.window.add(at, tokens)

    def _chain(self, key_id: str) -> tuple[Principal, Principal]:
        return self.principals[("key", key_id)], self.principals[("account", self.key_accounts[key_id])]

    # --- admission -------------------------------------------------------------

    def reserve(
        self, hold_id: str, key_id: str, amount_tokens: int, now: float, ttl_s: float, request_id: str | None = None
    ) -> Hold | Refusal:
        """Place a hold on the key and its account, or say why it does not fit."""
        assert amount_tokens >= 0 and ttl_s > 0
        assert hold_id not in self.holds
        chain = self._chain(key_id)
        if not self.fault_skip_cap_check:
            refusal = self._refusal(chain, amount_tokens, now)
            if refusal is not None:
                return refusal
        for p in chain:
            p.held_tokens += amount_tokens
            p.in_flight += 1
        hold = Hold(hold_id, key_id, chain[1].id, amount_tokens, now, now + ttl_s, request_id)
        self.holds[hold_id] = hold
        if self.observer is not None:
            self.observer("reserve", hold, now)
        return hold

    def _refusal(self, chain: tuple[Principal, ...], amount: int, now: float) -> Refusal | None:
        refusals = [r for p in chain for r in _check(p, amount, now)]
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
            p.in_flight += 1
        self.holds[hold.id] = hold

    # --- resolution ------------------------------------------------------------

    def settle(self, hold_id: str, actual_tokens: int, now: float) -> Resolution:
        """Charge actual usage, capped at the hold so no cap can be passed."""
        assert actual_tokens >= 0
        hold = self._open(hold_id)
        charged = min(actual_tokens, hold.amount_tokens)
        hold.actual_tokens = actual_tokens
        return self._resolve(hold, HoldState.SETTLED, charged, now, max(0, actual_tokens - hold.amount_tokens))

    def release(self, hold_id: str, now: float) -> Resolution:
        return self._resolve(self._open(hold_id), HoldState.RELEASED, 0, now)

    def orphan(self, hold_id: str, now: float) -> Resolution:
        hold = self._open(hold_id)
        return self._resolve(hold, HoldState.ORPHANED, hold.amount_tokens, now)

    def expire(self, now: float) -> list[Resolution]:
        """Resolve every hold past its expiry at its held amount."""
        due = [h for h in self.holds.values() if h.expires_at <= now]
        return [self._resolve(h, HoldState.EXPIRED, h.amount_tokens, now) for h in due]

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

    def _resolve(self, hold: Hold, state: HoldState, charged: int, now: float, overrun: int = 0) -> Resolution:
        assert hold.state is HoldState.OPEN and 0 <= charged <= hold.amount_tokens
        for p in self._chain(hold.key_id):
            assert p.held_tokens >= hold.amount_tokens and p.in_flight >= 1
            p.held_tokens -= hold.amount_tokens
            p.in_flight -= 1
            p.spent_tokens += charged * (2 if self.fault_double_charge else 1)
            if p.window is not None and not self.fault_window_amnesia:
                p.window.add(now, charged)
            if p.capture is not None and charged:
                p.capture.append((now, charged))
        hold.state = state
        hold.charged_tokens = charged
        hold.resolved_at = now
        del self.holds[hold.id]
        self.resolved[hold.id] = state
        if len(self.resolved) > RESOLVED_MEMORY_MAX:
            del self.resolved[next(iter(self.resolved))]  # dicts keep insertion order: oldest first
        if self.observer is not None:
            self.observer("resolve", hold, now)
        return Resolution(hold, charged, overrun)

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


def _token_caps(p: Principal, now: float) -> list[tuple[int, int, float | None]]:
    caps = []
    if p.caps.balance_tokens is not None:
        caps.append((p.caps.balance_tokens, p.spent_tokens + p.held_tokens, None))
    if p.caps.window_tokens is not None and p.window is not None:
        caps.append((p.caps.window_tokens, p.window.usage(now) + p.held_tokens, p.window.clear_s(now)))
    return caps


def _check(p: Principal, amount: int, now: float) -> list[Refusal]:
    caps, out = p.caps, []
    who = f"{p.kind} {p.id}"
    if caps.balance_tokens is not None and p.spent_tokens + p.held_tokens + amount > caps.balance_tokens:
        never = amount > caps.balance_tokens - p.spent_tokens
        left = max(0, caps.balance_tokens - p.spent_tokens - p.held_tokens)
        message = (
            f"This request may cost up to {amount} tokens but the {who} has {left} tokens of balance left"
            + ("." if not never else "; it cannot fit until the balance is topped up.")
        )
        out.append(Refusal("balance", p.kind, p.id, message, None, never))
    if caps.window_tokens is not None and p.window is not None:
        usage = p.window.usage(now)
        excess = usage + p.held_tokens + amount - caps.window_tokens
        if excess > 0:
            if amount > caps.window_tokens:
                message = (
                    f"This request may cost up to {amount} tokens, more than the {who}'s limit of "
                    f"{caps.window_tokens} tokens per {caps.window_s:g} s; it can never fit. Lower max_tokens."
                )
                out.append(Refusal("window", p.kind, p.id, message, None, True))
            else:
                wait = p.window.wait_s(now, excess)
                message = (
                    f"Rate limit of {caps.window_tokens} tokens per {caps.window_s:g} s reached for {who}: "
                    f"{usage} used, {p.held_tokens} held, this request needs up to {amount}."
                )
                out.append(Refusal("window", p.kind, p.id, message, wait))
    if caps.max_concurrency is not None and p.in_flight + 1 > caps.max_concurrency:
        never = caps.max_concurrency == 0
        message = f"Concurrency limit of {caps.max_concurrency} requests in flight reached for {who}."
        out.append(Refusal("concurrency", p.kind, p.id, message, None, never))
    return out

