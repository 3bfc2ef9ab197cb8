"""The pure ledger under random interleavings (hypothesis), plus its exact edges."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dataclasses import replace

from cortex.budget.ledger import Caps, Hold, HoldAlreadyResolved, HoldState, Ledger, LedgerError, Refusal, SlidingWindow, UnknownHold
from cortex.budget.periods import PeriodSpec, period_bounds

KEYS = ("k1", "k2", "k3")
MIDNIGHT = 1798761600.0  # 2027-01-01T00:00:00Z: the machine starts a minute before a day, a week and a month end
PERIODS = (PeriodSpec("daily"), PeriodSpec("weekly", "Europe/Berlin"), PeriodSpec("monthly", "UTC", 31))


def _caps(b, w, s, c, bu, wu, period, pt, pu) -> Caps:
    has_window = w is not None or wu is not None
    has_period = pt is not None or pu is not None
    return Caps(b, w, s if has_window else None, c, bu, wu, period if has_period else None, pt, pu)


class LedgerMachine(RuleBasedStateMachine):
    """Keys k1 and k2 share account a1 (which has its own caps); k3 is alone on a2."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.now = MIDNIGHT - 60.0
        self.open: list[str] = []
        self.resolved: set[str] = set()
        self.counter = 0
        self.charged: dict[str, int] = {}
        self.charged_usd: dict[str, int] = {}
        # (key, account, at, tokens, usd): what the store has
        self.store_log: list[tuple[str, str, float, int, int]] = []
        self.rebuild: tuple[str, str, Caps, list[tuple[float, int, int]], tuple | None] | None = None

    @initialize(
        caps=st.lists(
            st.builds(
                _caps,
                st.none() | st.integers(0, 500),
                st.none() | st.integers(0, 300),
                st.sampled_from([0.5, 1.0, 7.5]),
                st.none() | st.integers(0, 4),
                st.none() | st.integers(0, 500),
                st.none() | st.integers(0, 300),
                st.sampled_from(PERIODS),
                st.none() | st.integers(0, 400),
                st.none() | st.integers(0, 400),
            ),
            min_size=5,
            max_size=5,
        ),
        start=st.floats(0, 90),
    )
    def setup(self, caps, start):
        self.now = MIDNIGHT - start
        self.ledger.add_account("a1", caps[0])
        self.ledger.add_account("a2", caps[1])
        self.ledger.add_key("k1", "a1", caps[2])
        self.ledger.add_key("k2", "a1", caps[3])
        self.ledger.add_key("k3", "a2", caps[4])

    @rule(key=st.sampled_from(KEYS), amount=st.integers(0, 200), usd=st.integers(0, 200), ttl=st.floats(0.1, 5))
    def reserve(self, key, amount, usd, ttl):
        self.counter += 1
        hold_id = f"h{self.counter}"
        result = self.ledger.reserve(hold_id, key, amount, self.now, ttl, amount_usd=usd)
        if isinstance(result, Hold):
            self.open.append(hold_id)
        else:
            assert isinstance(result, Refusal)
            assert result.message
            if result.retry_after_s is not None:
                assert result.retry_after_s >= 0

    @precondition(lambda self: self.open)
    @rule(data=st.data(), actual=st.integers(0, 400), actual_usd=st.integers(0, 400))
    def settle(self, data, actual, actual_usd):
        hold_id = data.draw(st.sampled_from(self.open))
        hold = self.ledger.holds[hold_id]
        resolution = self.ledger.settle(hold_id, actual, self.now, actual_usd)
        assert resolution.charged_tokens == min(actual, hold.amount_tokens)
        assert resolution.charged_usd == min(actual_usd, hold.amount_usd)
        assert resolution.overrun_tokens == max(0, actual - hold.amount_tokens)
        self._resolved(hold_id, resolution.charged_tokens, resolution.charged_usd)
        self.store_log.append((hold.key_id, hold.account_id, self.now, resolution.charged_tokens, resolution.charged_usd))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), amount=st.integers(0, 150), usd=st.integers(0, 150))
    def extend(self, data, amount, usd):
        """An incremental output hold's next slice: every cap but concurrency, or nothing changes."""
        hold_id = data.draw(st.sampled_from(self.open))
        hold = self.ledger.holds[hold_id]
        before = (hold.amount_tokens, hold.amount_usd)
        chain = [self.ledger.principal("key", hold.key_id), self.ledger.principal("account", hold.account_id)]
        held = [(p.held_tokens, p.held_usd, p.in_flight) for p in chain]
        result = self.ledger.extend(hold_id, amount, self.now, usd)
        if isinstance(result, Hold):
            assert result is hold and (hold.amount_tokens, hold.amount_usd) == (before[0] + amount, before[1] + usd)
            assert [(p.held_tokens, p.held_usd, p.in_flight) for p in chain] == [
                (t + amount, u + usd, n) for t, u, n in held
            ]
        else:
            assert isinstance(result, Refusal) and result.reason != "concurrency"
            assert (hold.amount_tokens, hold.amount_usd) == before
            assert [(p.held_tokens, p.held_usd, p.in_flight) for p in chain] == held

    @precondition(lambda self: self.resolved)
    @rule(data=st.data())
    def extending_a_resolved_hold_is_an_error(self, data):
        hold_id = data.draw(st.sampled_from(sorted(self.resolved)))
        with pytest.raises(LedgerError):
            self.ledger.extend(hold_id, 1, self.now)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data):
        hold_id = data.draw(st.sampled_from(self.open))
        resolution = self.ledger.release(hold_id, self.now)
        assert resolution.charged_tokens == 0 and resolution.charged_usd == 0
        self._resolved(hold_id, 0, 0)

    @rule()
    def expire(self):
        for resolution in self.ledger.expire(self.now):
            assert resolution.hold.state is HoldState.EXPIRED
            assert resolution.charged_tokens == resolution.hold.amount_tokens
            assert resolution.charged_usd == resolution.hold.amount_usd
            self._resolved(resolution.hold.id, resolution.charged_tokens, resolution.charged_usd)
            h = resolution.hold
            self.store_log.append((h.key_id, h.account_id, self.now, resolution.charged_tokens, resolution.charged_usd))

    @precondition(lambda self: self.resolved)
    @rule(data=st.data(), how=st.sampled_from(["settle", "release", "orphan"]))
    def second_resolution_is_an_error(self, data, how):
        hold_id = data.draw(st.sampled_from(sorted(self.resolved)))
        with pytest.raises(HoldAlreadyResolved):
            if how == "settle":
                self.ledger.settle(hold_id, 1, self.now)
            elif how == "release":
                self.ledger.release(hold_id, self.now)
            else:
                self.ledger.orphan(hold_id, self.now)

    # Administrative changes run one at a time (the service's admin lock): no top-up during a rebuild.
    @precondition(lambda self: self.rebuild is None)
    @rule(kind_id=st.sampled_from([("key", "k1"), ("key", "k3"), ("account", "a1")]), tokens=st.integers(1, 300),
          money=st.booleans())
    def top_up(self, kind_id, tokens, money):
        p = self.ledger.principal(*kind_id)
        before = p.caps.balance_usd if money else p.caps.balance_tokens
        amounts = {"usd": tokens} if money else {"tokens": tokens}
        if before is None:
            with pytest.raises(LedgerError):
                self.ledger.top_up(*kind_id, **amounts)
        else:
            caps = self.ledger.top_up(*kind_id, **amounts)
            assert (caps.balance_usd if money else caps.balance_tokens) == before + tokens

    @rule(dt=st.floats(0, 3) | st.floats(3, 40))
    def advance(self, dt):
        self.now += dt

    @precondition(lambda self: self.rebuild is None)
    @rule(kind_id=st.sampled_from([("key", "k1"), ("account", "a1")]), grow_s=st.floats(0.5, 20))
    def begin_window_growth(self, kind_id, grow_s):
        """An admin grows a window: the history query is queued now and answers later."""
        p = self.ledger.principal(*kind_id)
        old_s = p.caps.window_s or 0.0
        # A cap far above any usage: growth alone must not break the caps invariant.
        caps = replace(p.caps, window_tokens=10**9, window_s=old_s + grow_s)
        column = 0 if kind_id[0] == "key" else 1
        since = self.now - caps.window_s
        history = [(at, t, u) for *ids, at, t, u in self.store_log if ids[column] == kind_id[1] and at > since and (t or u)]
        self.ledger.begin_window_rebuild(*kind_id)
        self.rebuild = (*kind_id, caps, history, None)

    @precondition(lambda self: self.rebuild is None)
    @rule(kind_id=st.sampled_from([("key", "k3"), ("account", "a2")]), spec=st.sampled_from(PERIODS))
    def begin_new_period(self, kind_id, spec):
        """An admin sets a period cap (far above usage): its usage so far is read from the store."""
        p = self.ledger.principal(*kind_id)
        caps = replace(p.caps, period=spec, period_tokens=10**9, period_usd=10**9)
        start, end = period_bounds(spec, self.now)
        column = 0 if kind_id[0] == "key" else 1
        rows = [(t, u) for *ids, at, t, u in self.store_log if ids[column] == kind_id[1] and at >= start]
        self.ledger.begin_window_rebuild(*kind_id)
        self.rebuild = (*kind_id, caps, None, (start, end, sum(t for t, _ in rows), sum(u for _, u in rows)))

    @precondition(lambda self: self.rebuild is not None)
    @rule()
    def finish_window_growth(self):
        kind, pid, caps, history, period = self.rebuild
        self.ledger.finish_window_rebuild(kind, pid, caps, history, period)
        self.rebuild = None

    @invariant()
    def no_charge_drops_out_of_a_window(self):
        if self.rebuild is not None:
            return  # the old window stands until the rebuild finishes
        for (kind, pid), p in self.ledger.principals.items():
            if p.window is None:
                continue
            column = 0 if kind == "key" else 1
            recent = [(t, u) for *ids, at, t, u in self.store_log if ids[column] == pid and at > self.now - p.window.window_s]
            # Merging ages usage out late, never early: the window may hold more, never less.
            assert p.window_usage(self.now) >= sum(t for t, _ in recent)
            assert p.window_usage_usd(self.now) >= sum(u for _, u in recent)

    @invariant()
    def a_period_counts_exactly_the_charges_resolved_in_it(self):
        if self.rebuild is not None:
            return
        for (kind, pid), p in self.ledger.principals.items():
            if p.caps.period is None:
                continue
            start, _ = period_bounds(p.caps.period, self.now)
            column = 0 if kind == "key" else 1
            rows = [(t, u) for *ids, at, t, u in self.store_log if ids[column] == pid and at >= start]
            assert p.period_usage(self.now) == (sum(t for t, _ in rows), sum(u for _, u in rows))

    def _resolved(self, hold_id: str, charged: int, charged_usd: int) -> None:
        self.open.remove(hold_id)
        assert hold_id not in self.resolved
        self.resolved.add(hold_id)
        self.charged[hold_id] = charged
        self.charged_usd[hold_id] = charged_usd

    @invariant()
    def caps_hold_at_every_instant(self):
        for p in self.ledger.principals.values():
            caps = p.caps
            if caps.balance_tokens is not None:
                assert p.spent_tokens + p.held_tokens <= caps.balance_tokens
                assert p.spent_tokens <= caps.balance_tokens
            if caps.window_tokens is not None:
                assert p.window_usage(self.now) + p.held_tokens <= caps.window_tokens
            if caps.balance_usd is not None:
                assert p.spent_usd + p.held_usd <= caps.balance_usd
            if caps.window_usd is not None:
                assert p.window_usage_usd(self.now) + p.held_usd <= caps.window_usd
            if caps.period is not None:
                used_tokens, used_usd = p.period_usage(self.now)
                if caps.period_tokens is not None:
                    assert used_tokens + p.held_tokens <= caps.period_tokens
                if caps.period_usd is not None:
                    assert used_usd + p.held_usd <= caps.period_usd
            if caps.max_concurrency is not None:
                assert p.in_flight <= caps.max_concurrency

    @invariant()
    def held_is_the_sum_of_open_holds(self):
        assert sorted(self.ledger.holds) == sorted(self.open)
        for kind, pid in self.ledger.principals:
            holds = [
                h for h in self.ledger.holds.values()
                if (kind == "key" and h.key_id == pid) or (kind == "account" and h.account_id == pid)
            ]
            p = self.ledger.principal(kind, pid)
            assert p.held_tokens == sum(h.amount_tokens for h in holds)
            assert p.held_usd == sum(h.amount_usd for h in holds)
            assert p.in_flight == len(holds)

    @invariant()
    def spent_is_the_sum_of_charges(self):
        for key in KEYS:
            p = self.ledger.principal("key", key)
            assert p.spent_tokens >= 0
        total = sum(self.charged.values())
        keys_spent = sum(self.ledger.principal("key", k).spent_tokens for k in KEYS)
        assert keys_spent == total
        assert sum(self.ledger.principal("key", k).spent_usd for k in KEYS) == sum(self.charged_usd.values())


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_window_refusal_retry_after_is_exactly_when_enough_usage_ages_out():
    ledger = Ledger()
    ledger.add_account("a", Caps())
    ledger.add_key("k", "a", Caps(window_tokens=100, window_s=10))
    for i, t in enumerate((0.0, 2.0, 4.0)):
        hold = ledger.reserve(f"h{i}", "k", 30, t, 60)
        ledger.settle(hold.id, 30, t)
    refusal = ledger.reserve("x", "k", 50, 5.0, 60)
    assert isinstance(refusal, Refusal) and refusal.reason == "window"
    # 90 used + 50 > 100: 40 must age out, i.e. the charges at 0 s and 2 s, the later at 12 s.
    assert refusal.retry_after_s == pytest.approx(7.0)
    assert isinstance(ledger.reserve("y", "k", 50, 5.0 + 7.0 - 1e-6, 60), Refusal)
    assert isinstance(ledger.reserve("z", "k", 50, 12.0, 60), Hold)


def test_a_true_sliding_window_not_a_fixed_one():
    ledger = Ledger()
    ledger.add_account("a", Caps())
    ledger.add_key("k", "a", Caps(window_tokens=100, window_s=10))
    ledger.settle(ledger.reserve("h1", "k", 100, 9.0, 60).id, 100, 9.0)
    # A fixed window starting at the first request would reset at 10 s; a sliding one frees the tokens at 19 s.
    assert isinstance(ledger.reserve("h2", "k", 1, 11.0, 60), Refusal)
    assert isinstance(ledger.reserve("h3", "k", 1, 19.0, 60), Hold)


def test_an_estimate_larger_than_the_cap_can_never_fit():
    ledger = Ledger()
    ledger.add_account("a", Caps(window_tokens=100, window_s=60))
    ledger.add_key("k", "a", Caps(balance_tokens=1000))
    refusal = ledger.reserve("h", "k", 150, 0.0, 60)
    assert refusal.never_fits and refusal.retry_after_s is None and refusal.principal_kind == "account"
    assert "never fit" in refusal.message


def test_a_spent_balance_wins_over_a_rate_limit():
    ledger = Ledger()
    ledger.add_account("a", Caps())
    ledger.add_key("k", "a", Caps(balance_tokens=100, window_tokens=50, window_s=60))
    ledger.settle(ledger.reserve("h", "k", 50, 0.0, 60).id, 50, 0.0)
    ledger.settle(ledger.reserve("i", "k", 40, 61.0, 60).id, 40, 61.0)
    assert ledger.reserve("j", "k", 20, 62.0, 60).reason == "balance"


def test_settling_more_than_the_hold_charges_the_hold_and_reports_the_overrun():
    ledger = Ledger()
    ledger.add_account("a", Caps(balance_tokens=100))
    ledger.add_key("k", "a")
    hold = ledger.reserve("h", "k", 60, 0.0, 60)
    resolution = ledger.settle(hold.id, 75, 1.0)
    assert (resolution.charged_tokens, resolution.overrun_tokens) == (60, 15)
    assert ledger.principal("account", "a").spent_tokens == 60


def test_unknown_hold_is_its_own_error():
    with pytest.raises(UnknownHold):
        Ledger().release("nope", 0.0)


def test_orphaned_and_expired_holds_are_charged_in_full():
    ledger = Ledger()
    ledger.add_account("a", Caps())
    ledger.add_key("k", "a")
    ledger.reserve("h1", "k", 10, 0.0, 5)
    ledger.reserve("h2", "k", 20, 0.0, 50)
    assert [r.hold.id for r in ledger.expire(5.0)] == ["h1"]
    assert ledger.orphan("h2", 6.0).charged_tokens == 20
    assert ledger.principal("key", "k").spent_tokens == 30


def test_headroom_reports_the_tightest_token_cap():
    ledger = Ledger()
    ledger.add_account("a", Caps(balance_tokens=1000))
    ledger.add_key("k", "a", Caps(window_tokens=300, window_s=60))
    ledger.reserve("h", "k", 100, 0.0, 60)
    room = ledger.headroom("k", 0.0)
    assert (room.limit_tokens, room.remaining_tokens) == (300, 200)


def test_sliding_window_memory_is_bounded_and_merging_is_conservative():
    window = SlidingWindow(10.0)
    for i in range(100_000):
        window.add(i * 1e-5, 1)  # 100,000 charges within one second
    assert len(window._events) <= 4097
    assert window.usage(1.0) == 100_000
    # Merged usage never ages out earlier than the real charges would.
    assert window.usage(10.0) > 0
    assert window.usage(11.0) == 0
