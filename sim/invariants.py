"""The invariants, checked while the scenario runs, not only at its end.

The ledger calls `on_ledger` after every reserve, every extension of an
incremental output hold and every resolution, so the caps — every kind, in
tokens and in micro-USD: balance, window, calendar period, concurrency — are
checked at every instant their numbers change,
against the ledger's own numbers and against the checker's own tally of the
ledger's events (the two must agree, period usage included); each hold's
charge against what it held, tokens and money; and each refusal a period
cap makes against the period's end (`on_refusal`). The network
reports every attempt to reach an upstream (`on_attempt`, `on_deliver`),
every response head (`on_head`) and every body chunk of a 200 an upstream
sends cortex (`on_body`), so failover is checked at every step too: one
upstream's body per request, no dispatch after the client's response began,
at most 1 + FAILOVERS_MAX deliveries, no upstream tried twice, one hold
reserved and resolved once. The fleet lifecycle is checked at the same
seam: every load and unload cortex sends a neuron, every generation request
it has in flight there (`on_open` / `on_close`), and each neuron's own
memory. The simulated clients report every chunk of output they read
(`on_forwarded`): what cortex forwarded must never pass what the request's
hold covers for its output at that instant. A violation is recorded with the
virtual time and stops the run.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cortex.budget.ledger import Hold, HoldState, Ledger, Principal, Refusal
from cortex.budget.periods import PeriodSpec, period_bounds, period_id
from cortex.budget.pricing import usd_text
from cortex.proxy import FAILOVERS_MAX
from cortex.relay import event_data
from sim.trace import Trace

DELIVERIES_MAX = 1 + FAILOVERS_MAX  # upstreams one request may reach: the first, then the failovers
# A period refusal's wait is the period's end less now: float seconds near 2**31 carry about 2.4e-7 s of error.
PERIOD_WAIT_TOLERANCE_S = 1e-6


@dataclass
class RequestRecord:
    id: str
    key: str
    model: str = ""  # what the client asked for
    received_bytes: int = 0  # output text the client received (neuron's tokens; see Checker.received_tokens)
    outcome: str = ""  # served, refused, failed, cancelled
    status: int | None = None
    code: str | None = None
    hold_amount: int | None = None
    charged: int | None = None
    hold_state: str | None = None
    hold_usd: int | None = None  # micro-USD
    charged_usd: int | None = None
    reserved_at: float | None = None  # run time of its hold
    refusal: "RefusalRecord | None" = None  # the ledger's, when a cap refused it
    retry_after_ms: int | None = None  # the 429's Retry-After, as the client received it
    retry_after_s: int | None = None  # the same in whole seconds (the `retry-after` header)
    latency_s: float = 0.0
    tried: list[str] = field(default_factory=list)  # the upstreams cortex tried, in order, whatever came of it
    deliveries: int = 0  # of those, the ones the request reached
    served_by: str | None = None  # the upstream whose 200 body reached cortex
    committed: bool = False  # cortex's 200 head reached the client: no upstream may be tried after it
    replica: str | None = None  # the cortex replica the client sent it to (on a shared ledger)
    prompt_tokens: int | None = None  # its prompt's tokens, by the client's own count: the prompt part of its hold
    extensions: int = 0  # times its (incremental) hold grew
    truncated: bool = False  # the client saw cortex end the reply at the hold's bound (x-cortex-budget-truncated)


@dataclass(frozen=True)
class RefusalRecord:
    """A cap refused a request: which (`cap` as cortex's metrics name it), whose, when (run time), and the wait."""

    cap: str  # balance, balance_usd, window, window_usd, period, period_usd, concurrency
    principal: tuple[str, str]  # (kind, id)
    at: float
    wait_s: float | None  # the ledger's Retry-After; None: waiting alone will not help (or only holds are in the way)
    never_fits: bool


@dataclass
class Tally:
    """The checker's own count for one principal, kept from the ledger's events
    alone, so a bug in the ledger's arithmetic cannot hide itself. Money in micro-USD."""

    held: int = 0
    in_flight: int = 0
    spent: int = 0
    charges: deque[tuple[float, int, int]] = field(default_factory=deque)  # (at, tokens, usd), oldest first
    window_sum: int = 0
    held_usd: int = 0
    spent_usd: int = 0
    window_sum_usd: int = 0
    # The calendar period the latest charge or check fell in, and the charges resolved in it.
    period_start: float | None = None
    period_end: float | None = None
    period_tokens: int = 0
    period_usd: int = 0

    def window_usage(self, now: float, window_s: float) -> tuple[int, int]:
        """(tokens, micro-USD) charged at times t with now - window_s < t."""
        while self.charges and self.charges[0][0] <= now - window_s:
            _, tokens, usd = self.charges.popleft()
            self.window_sum -= tokens
            self.window_sum_usd -= usd
        return self.window_sum, self.window_sum_usd

    def period_usage(self, spec: PeriodSpec, now: float) -> tuple[int, int]:
        """(tokens, micro-USD) charged in the calendar period that contains `now`."""
        if self.period_start is None or self.period_end is None or not self.period_start <= now < self.period_end:
            start, end = period_bounds(spec, now)
            if start != self.period_start:
                self.period_tokens = self.period_usd = 0
            self.period_start, self.period_end = start, end
        return self.period_tokens, self.period_usd

    def charge(self, now: float, tokens: int, usd: int = 0, period: PeriodSpec | None = None) -> None:
        """A charge lands in the windows, and in the period in which it is resolved."""
        self.spent += tokens
        self.spent_usd += usd
        if tokens or usd:
            self.charges.append((now, tokens, usd))
            self.window_sum += tokens
            self.window_sum_usd += usd
        if period is not None:
            self.period_usage(period, now)
            self.period_tokens += tokens
            self.period_usd += usd


@dataclass
class Checker:
    trace: Trace
    ledger: Ledger | None = None
    requests: dict[str, RequestRecord] = field(default_factory=dict)
    resolutions: Counter[str] = field(default_factory=Counter)
    open_by_request: dict[str, Hold] = field(default_factory=dict)
    violation: str | None = None
    cancel_scope: trio.CancelScope | None = None
    peak_held: dict[str, int] = field(default_factory=dict)
    peak_held_usd: dict[str, int] = field(default_factory=dict)
    deliveries: int = 0
    admitted_on_retry: int = 0
    keep_samples: bool = False  # for --plot: (t, principal, cap kind, used, held, cap) at every change
    samples: list[tuple[float, str, str, int, int, int]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # key id -> scenario name
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    reservations: Counter[str] = field(default_factory=Counter)
    token_bytes: dict[str, int] = field(default_factory=dict)  # upstream -> bytes per token of its tokenizer
    client_keys: set[str] = field(default_factory=set)  # `Bearer <key>` of every simulated client
    lifecycle: "LifecycleChecks" = field(default_factory=lambda: LifecycleChecks())
    reserved: dict[str, tuple[int, int]] = field(default_factory=dict)  # request -> (tokens, micro-USD) its hold took
    holds_at: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # principal -> run times of its holds
    refusals: list[tuple[str, RefusalRecord]] = field(default_factory=list)  # (request, refusal), in order
    extensions: int = 0  # holds grown (incremental output holds), every request together
    extensions_refused: Counter[str] = field(default_factory=Counter)  # extensions a cap refused, by cap
    overshoot: int = 0  # the most any amount cap was passed by, by the ledger's numbers (0: never)

    def __post_init__(self) -> None:
        self.lifecycle.fail = self.fail
        self.lifecycle.trace = self.trace

    def fail(self, message: str) -> None:
        if self.violation is None:
            now = self.trace.now()
            when = f" ({self.trace.at(now)})" if self.trace.origin else ""
            self.violation = f"t={now:.6f}{when}: {message}"
            self.trace.event("violation", message=message)
            if self.cancel_scope is not None:
                self.cancel_scope.cancel()

    # --- hooks --------------------------------------------------------------------

    def on_ledger(self, event: str, hold: Hold, now: float) -> None:
        assert self.ledger is not None
        rid = hold.request_id or hold.id
        chain = (("key", hold.key_id), ("account", hold.account_id))
        tallies = [self.tallies.setdefault(who, Tally()) for who in chain]
        principals = [self.ledger.principal(kind, pid) for kind, pid in chain]
        if event == "reserve":
            self._on_reserve(rid, hold, chain, tallies)
        elif event == "extend":
            self._on_extend(rid, hold, tallies)
        else:
            self._on_resolve(rid, hold, now, principals, tallies)
        for p, tally in zip(principals, tallies, strict=True):
            self._check_caps(p, now)
            self._check_tally(p, tally, now)

    def _on_reserve(self, rid: str, hold: Hold, chain: tuple[tuple[str, str], ...], tallies: list[Tally]) -> None:
        self.reservations[rid] += 1
        if self.reservations[rid] > 1:
            self.fail(f"{rid} reserved a hold {self.reservations[rid]} times; a failover must reuse the first")
        self.reserved[rid] = (hold.amount_tokens, hold.amount_usd)
        at = self.trace.now()
        for who, tally in zip(chain, tallies, strict=True):
            tally.held += hold.amount_tokens
            tally.held_usd += hold.amount_usd
            tally.in_flight += 1
            self.holds_at.setdefault(who, []).append(at)
        self.open_by_request[rid] = hold
        self.trace.event("hold", req=rid, amount=hold.amount_tokens, **({"usd": hold.amount_usd} if hold.amount_usd else {}))
        record = self.requests.get(rid)
        if record is not None:
            record.hold_amount, record.hold_usd, record.reserved_at = hold.amount_tokens, hold.amount_usd, at

    def _on_extend(self, rid: str, hold: Hold, tallies: list[Tally]) -> None:
        """An open hold grew (an incremental output hold's next slice): the tallies hold the growth, and the
        checker's record of what the hold took follows it, so its settlement is judged against the grown hold."""
        if rid not in self.open_by_request or rid not in self.reserved:
            self.fail(f"{rid}: a hold that is not open grew to {hold.amount_tokens} tokens")
            return
        was_tokens, was_usd = self.reserved[rid]
        more, more_usd = hold.amount_tokens - was_tokens, hold.amount_usd - was_usd
        if more < 0 or more_usd < 0:
            self.fail(f"{rid}: its hold went from {was_tokens} tokens and {was_usd} micro-USD to {hold.amount_tokens} "
                      f"and {hold.amount_usd} in an extension; an extension only grows a hold")
        self.reserved[rid] = (hold.amount_tokens, hold.amount_usd)
        for tally in tallies:
            tally.held += more
            tally.held_usd += more_usd
        self.extensions += 1
        self.trace.event("extend", req=rid, amount=hold.amount_tokens, **({"usd": hold.amount_usd} if hold.amount_usd else {}))
        record = self.requests.get(rid)
        if record is not None:
            record.hold_amount, record.hold_usd = hold.amount_tokens, hold.amount_usd
            record.extensions += 1

    def on_extend_refused(self, request_id: str, key_id: str, refusal: Refusal, now: float, asked: tuple[int, int]) -> None:
        """A cap refused to grow an open hold by `asked` (tokens, micro-USD): it must be due, as a refused
        reserve must, and never for concurrency (the request is in flight already)."""
        assert self.ledger is not None
        cap = refusal.reason if refusal.unit == "tokens" else f"{refusal.reason}_{refusal.unit}"
        who = (refusal.principal_kind, refusal.principal_id)
        name = f"{who[0]} {self.names.get(who[1], who[1])}"
        self.extensions_refused[cap] += 1
        self.trace.event("extend_refused", req=request_id, cap=cap, who=name)
        if cap == "concurrency":
            self.fail(f"{request_id}: an extension of its hold was refused for concurrency, which extensions are not judged by")
        chain = (("key", key_id), ("account", self.ledger.key_accounts[key_id]))
        for kind, pid in chain:
            principal, tally = self.ledger.principal(kind, pid), self.tallies.setdefault((kind, pid), Tally())
            self._check_caps(principal, now)
            self._check_tally(principal, tally, now)
        self._check_refusal_due(request_id, self.ledger.principal(*who), name, cap, asked, now)

    def on_forwarded(self, record: RequestRecord) -> None:
        """The client read output: what cortex forwarded (in the serving upstream's tokens) must lie within what
        the request's hold covers for output at this instant — its amount less its prompt part, which is the
        client's own count of its prompt (or, without one, within its whole hold)."""
        if self.ledger is None or not record.received_bytes:
            return
        received = self.received_tokens(record)
        if record.hold_amount is None:
            self.fail(f"{record.id}: {received} output tokens forwarded to its client, and it holds no hold")
            return
        covered = record.hold_amount - (record.prompt_tokens or 0)
        if received > covered:
            part = "its hold covers" if record.prompt_tokens is None else \
                f"its hold of {record.hold_amount} covers {record.prompt_tokens} of prompt and"
            self.fail(f"{record.id}: {received} output tokens forwarded to its client, but {part} {covered} of output")

    def _on_resolve(self, rid: str, hold: Hold, now: float, principals: list[Principal], tallies: list[Tally]) -> None:
        # What the hold took, by the checker's own record (when placed, grown by each extension): a hold
        # that grew outside the ledger's events cannot make room for its own charge.
        held, held_usd = self.reserved.get(rid, (hold.amount_tokens, hold.amount_usd))
        if not 0 <= hold.charged_tokens <= held:
            self.fail(f"{rid} charged {hold.charged_tokens}, outside [0, hold {held}]")
        if not 0 <= hold.charged_usd <= held_usd:
            self.fail(f"{rid} charged {usd_text(hold.charged_usd)} ({hold.charged_usd} micro-USD), outside "
                      f"[0, its hold of {usd_text(held_usd)} ({held_usd} micro-USD)]")
        for p, tally in zip(principals, tallies, strict=True):
            tally.held -= held
            tally.held_usd -= held_usd
            tally.in_flight -= 1
            tally.charge(now, hold.charged_tokens, hold.charged_usd, p.caps.period)
        self.resolutions[rid] += 1
        if self.resolutions[rid] > 1:
            self.fail(f"hold of {rid} resolved {self.resolutions[rid]} times")
        self.open_by_request.pop(rid, None)
        extra = {"charged_usd": hold.charged_usd} if held_usd else {}
        self.trace.event("resolve", req=rid, state=hold.state.value, charged=hold.charged_tokens, **extra)
        record = self.requests.get(rid)
        if record is not None:
            record.charged, record.charged_usd, record.hold_state = hold.charged_tokens, hold.charged_usd, hold.state.value

    def on_refusal(self, request_id: str, key_id: str, refusal: Refusal, now: float, asked: tuple[int, int]) -> None:
        """A cap refused a reservation of `asked` (tokens, micro-USD). The refusal must be due, by the checker's
        own count; a period cap refusing on its usage must wait for exactly its period's end; and the principals'
        numbers are checked as at any ledger event (a ledger that wrongly refuses everything makes no other)."""
        assert self.ledger is not None
        cap = refusal.reason if refusal.unit == "tokens" else f"{refusal.reason}_{refusal.unit}"
        who = (refusal.principal_kind, refusal.principal_id)
        name = f"{who[0]} {self.names.get(who[1], who[1])}"
        entry = RefusalRecord(cap, who, self.trace.now(), refusal.retry_after_s, refusal.never_fits)
        self.refusals.append((request_id, entry))
        record = self.requests.get(request_id)
        if record is not None:
            record.refusal = entry
        wait = round(refusal.retry_after_s, 6) if refusal.retry_after_s is not None else None
        self.trace.event("refuse", req=request_id, cap=cap, who=name, wait=wait)
        p = self.ledger.principal(*who)
        if refusal.reason == "period" and refusal.retry_after_s is not None:
            self._check_period_wait(request_id, p, name, refusal.retry_after_s, now)
        chain = (("key", key_id), ("account", self.ledger.key_accounts[key_id]))
        for kind, pid in chain:
            principal, tally = self.ledger.principal(kind, pid), self.tallies.setdefault((kind, pid), Tally())
            self._check_caps(principal, now)
            self._check_tally(principal, tally, now)
        self._check_refusal_due(request_id, p, name, cap, asked, now)

    def _check_period_wait(self, rid: str, p: Principal, name: str, wait_s: float, now: float) -> None:
        spec = p.caps.period
        if spec is None:
            self.fail(f"{rid} was refused by the period cap of {name}, which has none")
            return
        start, end = period_bounds(spec, now)
        if abs(now + wait_s - end) > PERIOD_WAIT_TOLERANCE_S:
            self.fail(f"{rid} was refused by the period cap of {name} and told to wait {wait_s:.6f} s, "
                      f"but its period {period_id(spec, start)} ends in {end - now:.6f} s")

    def _check_refusal_due(self, rid: str, p: Principal, name: str, cap: str, asked: tuple[int, int], now: float) -> None:
        """An exact cap (a balance, a period) refuses only what does not fit by the checker's own count. (A
        window is not exact: the ledger merges charges close in time under the later one, so it may refuse early.)"""
        tally = self.tallies.setdefault((p.kind, p.id), Tally())
        usd = cap.endswith("_usd")
        held, want = (tally.held_usd, asked[1]) if usd else (tally.held, asked[0])
        if cap.startswith("balance"):
            limit, used = (p.caps.balance_usd, tally.spent_usd) if usd else (p.caps.balance_tokens, tally.spent)
        elif cap.startswith("period") and p.caps.period is not None:
            limit = p.caps.period_usd if usd else p.caps.period_tokens
            used = tally.period_usage(p.caps.period, now)[1 if usd else 0]
        else:
            return
        if limit is not None and used + held + want <= limit:
            unit = "micro-USD" if usd else "tokens"
            self.fail(f"{rid} was refused by the {cap} cap of {name}, yet it fits by the checker's count: "
                      f"{used} used + {held} held + {want} asked <= {limit} {unit}")

    def on_orphans(self, orphans: list[tuple[str, str, str, int, int, float]]) -> None:
        """Holds a crash left open, charged in full by the restarted cortex's recovery."""
        assert self.ledger is not None
        for rid, key_id, account_id, amount, amount_usd, at in orphans:
            self.resolutions[rid] += 1
            self.open_by_request.pop(rid, None)
            held, held_usd = self.reserved.get(rid, (amount, amount_usd))
            if (amount, amount_usd) != (held, held_usd):
                self.fail(f"{rid} was orphaned and charged {amount} tokens and {amount_usd} micro-USD; "
                          f"its hold took {held} and {held_usd}")
            self.trace.event("orphaned", req=rid, charged=amount, **({"charged_usd": amount_usd} if amount_usd else {}))
            record = self.requests.get(rid)
            if record is not None:
                record.charged_usd = amount_usd
            for who in (("key", key_id), ("account", account_id)):
                tally = self.tallies.setdefault(who, Tally())
                tally.held -= held
                tally.held_usd -= held_usd
                tally.in_flight -= 1
                tally.charge(at, amount, amount_usd, self.ledger.principal(*who).caps.period)

    def _check_tally(self, p: Principal, tally: Tally, now: float) -> None:
        """The caps against the checker's own counts, and the ledger's counts against them."""
        caps, who = p.caps, f"{p.kind} {self.names.get(p.id, p.id)}"
        if (p.spent_tokens, p.held_tokens, p.in_flight) != (tally.spent, tally.held, tally.in_flight):
            self.fail(
                f"{who}: the ledger says spent {p.spent_tokens}, held {p.held_tokens}, in flight {p.in_flight}; "
                f"its events add up to {tally.spent}, {tally.held}, {tally.in_flight}"
            )
        if (p.spent_usd, p.held_usd) != (tally.spent_usd, tally.held_usd):
            self.fail(
                f"{who}: the ledger says spent {p.spent_usd} micro-USD, held {p.held_usd} micro-USD; "
                f"its events add up to {tally.spent_usd}, {tally.held_usd}"
            )
        if caps.balance_tokens is not None and tally.spent + tally.held > caps.balance_tokens:
            self.fail(f"{who}: charges {tally.spent} + held {tally.held} > balance {caps.balance_tokens}")
        if caps.balance_usd is not None and tally.spent_usd + tally.held_usd > caps.balance_usd:
            self.fail(f"{who}: charges {usd_text(tally.spent_usd)} + held {usd_text(tally.held_usd)} "
                      f"> USD balance {usd_text(caps.balance_usd)}")
        if caps.window_s is not None:
            used, used_usd = tally.window_usage(now, caps.window_s)
            if caps.window_tokens is not None and used + tally.held > caps.window_tokens:
                self.fail(f"{who}: charged {used} in the last {caps.window_s:g} s + held {tally.held} > {caps.window_tokens}")
            if caps.window_usd is not None and used_usd + tally.held_usd > caps.window_usd:
                self.fail(f"{who}: charged {usd_text(used_usd)} in the last {caps.window_s:g} s + held "
                          f"{usd_text(tally.held_usd)} > {usd_text(caps.window_usd)}")
        if caps.period is not None:
            self._check_period_tally(p, tally, now, who)

    def _check_period_tally(self, p: Principal, tally: Tally, now: float, who: str) -> None:
        """Period usage is the charges resolved in the current period, by the checker's own calendar arithmetic."""
        caps = p.caps
        assert caps.period is not None
        used, used_usd = tally.period_usage(caps.period, now)
        assert tally.period_start is not None
        period = period_id(caps.period, tally.period_start)
        ledger_used = p.period_usage(now)
        if ledger_used != (used, used_usd):
            self.fail(f"{who}: the ledger says {ledger_used[0]} tokens and {ledger_used[1]} micro-USD used in the period "
                      f"{period}; the charges resolved in it add up to {used} and {used_usd}")
        if caps.period_tokens is not None and used + tally.held > caps.period_tokens:
            self.fail(f"{who}: charged {used} in the period {period} + held {tally.held} > {caps.period_tokens}")
        if caps.period_usd is not None and used_usd + tally.held_usd > caps.period_usd:
            self.fail(f"{who}: charged {usd_text(used_usd)} in the period {period} + held {usd_text(tally.held_usd)} "
                      f"> {usd_text(caps.period_usd)}")

    def _check_caps(self, p: Principal, now: float) -> None:
        """Every cap against the ledger's own numbers: spent (or used) + held <= cap."""
        caps, who = p.caps, f"{p.kind} {self.names.get(p.id, p.id)}"
        self.peak_held[who] = max(self.peak_held.get(who, 0), p.held_tokens)
        self.peak_held_usd[who] = max(self.peak_held_usd.get(who, 0), p.held_usd)
        for kind, limit, used, held in _cap_numbers(p, now):
            if self.keep_samples:
                self.samples.append((self.trace.now(), who, kind, used, held, limit))
            if used + held > limit:
                self.overshoot = max(self.overshoot, used + held - limit)
                self.fail(f"{who}: {_over(p, kind, used, held, limit, now)}")
        if caps.max_concurrency is not None and p.in_flight > caps.max_concurrency:
            self.fail(f"{who}: {p.in_flight} in flight > {caps.max_concurrency}")

    def on_attempt(self, host: str, request_id: str, result: str) -> None:
        """An attempt that never reached the upstream (refused, unreachable) or broke before its head (reset)."""
        self.trace.event("attempt", req=request_id, host=host, result=result)
        if result != "reset":  # a reset is the fate of a delivered attempt, already counted
            self._tried(host, request_id)

    def on_deliver(self, host: str, request_id: str, authorization: str | None = None) -> None:
        """A generation request reached an upstream: it must hold an open hold, and be allowed this dispatch."""
        self.deliveries += 1
        self.trace.event("deliver", req=request_id, host=host)
        if request_id not in self.open_by_request:
            self.fail(f"{request_id} reached {host} without an open hold")
        if authorization is not None and authorization in self.client_keys:
            self.fail(f"{request_id}: the client's own key reached {host}")
        record = self._tried(host, request_id)
        if record is None:
            return
        record.deliveries += 1
        if record.deliveries > DELIVERIES_MAX:
            self.fail(f"{request_id} reached {record.deliveries} upstreams ({', '.join(record.tried)}); "
                      f"failover allows {DELIVERIES_MAX}")
        if record.committed:
            self.fail(f"{request_id} was dispatched to {host} after its response to the client had begun")

    def on_head(self, host: str, request_id: str, status: int, client: bool) -> None:
        """A response head: from an upstream to cortex, or (`client`) from cortex to its client."""
        record = self.requests.get(request_id)
        if client:
            if record is not None and status == 200:
                record.committed = True
        elif status != 200:
            self.trace.event("answer", req=request_id, host=host, status=status)

    def on_body(self, host: str, request_id: str, chunk: bytes = b"") -> None:
        """Body bytes of an upstream's 200 reached cortex: only one upstream may ever send them.
        A body that is only error events (TGI refuses in band, even an overload) generated nothing."""
        record = self.requests.get(request_id)
        if record is None or _only_error_events(chunk):
            return
        if record.served_by is None:
            record.served_by = host
        elif record.served_by != host:
            self.fail(f"{request_id}: both {record.served_by} and {host} sent body bytes: a second generation")

    def _tried(self, host: str, request_id: str) -> RequestRecord | None:
        record = self.requests.get(request_id)
        if record is None:
            self.fail(f"{request_id} reached {host}, but no client sent it")
            return None
        if host in record.tried:
            self.fail(f"{request_id} was sent to {host} twice ({', '.join(record.tried)}, {host})")
        record.tried.append(host)
        return record

    def received_tokens(self, record: RequestRecord) -> int:
        """What the client received, in the serving upstream's tokens (its tokens are whole multiples of bytes)."""
        token_bytes = self.token_bytes.get(record.served_by or "", 1)
        return -(-record.received_bytes // token_bytes)

    # --- at the end ---------------------------------------------------------------------

    def check_end(
        self, open_in_store: int, store_states: dict[str, str], admitted: int, refused: int, leaked: list[str],
        by_upstream: dict[str, tuple[int, int, int]] | None = None,
    ) -> None:
        """`by_upstream`: name -> (admitted, refused, delivered) of each upstream, every incarnation together."""
        if leaked:
            self.fail(f"tasks still running after the scenario: {', '.join(leaked)}")
        if open_in_store:
            self.fail(f"{open_in_store} holds still open in the ledger store at the end")
        if admitted + refused != self.deliveries:
            self.fail(f"upstreams admitted {admitted} and refused {refused}, but cortex dispatched {self.deliveries}")
        for name, (up_admitted, up_refused, delivered) in (by_upstream or {}).items():
            if up_admitted + up_refused != delivered:
                self.fail(f"{name} admitted {up_admitted} and refused {up_refused}, but cortex dispatched {delivered} to it")
        for rid, record in self.requests.items():
            if record.outcome == "served" and record.served_by is None:
                self.fail(f"{rid} was served, but no upstream sent its body")
            if record.outcome == "served" and (self.reservations[rid], self.resolutions[rid]) != (1, 1):
                holds = self.reservations[rid]
                self.fail(f"{rid} was served with {holds} hold{'' if holds == 1 else 's'} reserved and "
                          f"{self.resolutions[rid]} resolutions; one of each is right")
            state = store_states.get(rid)
            if record.hold_amount is None:
                continue
            if state is None or state == HoldState.OPEN.value:
                self.fail(f"hold of {rid} never resolved")
                continue
            if record.charged is None and state == HoldState.ORPHANED.value:
                record.charged, record.hold_state = record.hold_amount, state  # resolved by recovery
            received = self.received_tokens(record)
            if record.charged is not None and not received <= record.charged <= record.hold_amount:
                self.fail(f"{rid}: charged {record.charged} outside [received {received}, hold {record.hold_amount}]")

    def summary_counts(self) -> dict[str, Any]:
        outcomes = Counter(r.outcome for r in self.requests.values())
        refused = Counter(r.code for r in self.requests.values() if r.outcome == "refused")
        return {"outcomes": dict(sorted(outcomes.items())), "refused": dict(sorted(refused.items()))}


@dataclass
class LifecycleChecks:
    """The fleet lifecycle's invariants, from what crosses the network and the neurons' own state.

    cortex's requests on (neuron, model) count from when cortex sends them until it is done with
    the response (that window lies inside cortex's own in-flight count), so an eviction begun
    while one is open is cortex evicting a busy model, never a race of the checker's."""

    in_flight: Counter[tuple[str, str]] = field(default_factory=Counter)  # cortex's generations on (neuron, model)
    loading: Counter[tuple[str, str]] = field(default_factory=Counter)  # load requests open
    unloading: Counter[tuple[str, str]] = field(default_factory=Counter)  # unload requests open
    pinned: set[tuple[str, str]] = field(default_factory=set)  # (neuron, model) the catalogue pins
    resident: dict[tuple[str, str], float] = field(default_factory=dict)  # loaded there (when), not unloaded since
    loads: Counter[str] = field(default_factory=Counter)  # load requests sent, by model
    load_refusals: int = 0
    evictions: Counter[str] = field(default_factory=Counter)  # unload requests sent, by model
    memory_peak: dict[str, int] = field(default_factory=dict)  # neuron -> most bytes reserved at once
    fail: Callable[[str], None] = field(default=lambda message: _outside_a_checker(message))  # the Checker's, once made
    trace: Trace | None = None

    def on_generation(self, host: str, model: str, opened: bool) -> None:
        where = (host, model)
        if not opened:
            self.in_flight[where] -= 1
            return
        if self.unloading[where]:
            self.fail(f"a request was routed to {model} on {host} while it was being unloaded")
        self.in_flight[where] += 1

    def on_load(self, host: str, model: str, opened: bool) -> None:
        where = (host, model)
        if not opened:
            self.loading[where] -= 1
            return
        assert self.trace is not None
        self.trace.event("load", host=host, model=model)
        self.loads[model] += 1
        if self.loading[where]:
            self.fail(f"a second load of {model} on {host} began while the first was under way")
        if where in self.resident:
            self.fail(f"cortex asked {host} to load {model} again, though it has been loaded there since "
                      f"t={self.resident[where]:.6f} and never unloaded: cortex lost track of it")
        self.loading[where] += 1

    def on_unload(self, host: str, model: str, opened: bool) -> None:
        where = (host, model)
        if not opened:
            self.unloading[where] -= 1
            return
        assert self.trace is not None
        self.trace.event("unload", host=host, model=model)
        self.evictions[model] += 1
        self.resident.pop(where, None)
        if self.in_flight[where]:
            self.fail(f"{model} was evicted from {host} with {self.in_flight[where]} of cortex's requests in flight on it")
        if where in self.pinned:
            self.fail(f"{model} is pinned on {host}, and was evicted from it")
        self.unloading[where] += 1

    def on_answer(self, host: str, path: str, model: str, status: int) -> None:
        if status == 200 and path.endswith("/load"):
            self.resident.setdefault((host, model), trio.current_time())
        if status != 200:
            assert self.trace is not None
            self.trace.event("lifecycle_refused", host=host, path=path, model=model, status=status)
            if path.endswith("/load"):
                self.load_refusals += 1

    def neuron_reset(self, host: str, models: tuple[str, ...] = ()) -> None:
        """A neuron crashed (it holds nothing) or (re)started (its initial models only)."""
        self.resident = {w: t for w, t in self.resident.items() if w[0] != host}
        self.resident.update({(host, m): trio.current_time() for m in models})

    def check_memory(self, host: str, reserved_bytes: int, budget_bytes: float) -> None:
        """Loaded plus loading models within the neuron's memory, by the neuron's own count."""
        self.memory_peak[host] = max(self.memory_peak.get(host, 0), reserved_bytes)
        if reserved_bytes > budget_bytes:
            self.fail(f"{host} holds {reserved_bytes / 2**20:.0f} MiB of loaded and loading models, "
                      f"over its {budget_bytes / 2**20:.0f} MiB")


def _cap_numbers(p: Principal, now: float) -> list[tuple[str, int, int, int]]:
    """(cap kind, cap, used, held) of each amount cap the principal has, by the ledger's own numbers."""
    caps, out = p.caps, []
    for kind, limit, used, held in (
        ("balance", caps.balance_tokens, p.spent_tokens, p.held_tokens),
        ("balance_usd", caps.balance_usd, p.spent_usd, p.held_usd),
    ):
        if limit is not None:
            out.append((kind, limit, used, held))
    if caps.window_tokens is not None:
        out.append(("window", caps.window_tokens, p.window_usage(now), p.held_tokens))
    if caps.window_usd is not None:
        out.append(("window_usd", caps.window_usd, p.window_usage_usd(now), p.held_usd))
    if caps.period is not None:
        used, used_usd = p.period_usage(now)
        if caps.period_tokens is not None:
            out.append(("period", caps.period_tokens, used, p.held_tokens))
        if caps.period_usd is not None:
            out.append(("period_usd", caps.period_usd, used_usd, p.held_usd))
    return out


def _over(p: Principal, kind: str, used: int, held: int, limit: int, now: float) -> str:
    """The message for a passed cap, in the cap's unit."""
    if kind == "balance":
        return f"spent {used} + held {held} > balance {limit}"
    if kind == "window":
        return f"window usage {used} + held {held} > {limit}"
    if kind == "balance_usd":
        return f"spent {usd_text(used)} + held {usd_text(held)} > USD balance {usd_text(limit)}"
    if kind == "window_usd":
        return f"window usage {usd_text(used)} + held {usd_text(held)} > {usd_text(limit)} per {p.caps.window_s:g} s"
    spec = p.caps.period
    assert spec is not None
    period = period_id(spec, period_bounds(spec, now)[0])  # named by the checker's calendar, not the ledger's
    if kind == "period":
        return f"period usage {used} + held {held} > {limit} tokens per period ({period})"
    return f"period usage {usd_text(used)} + held {usd_text(held)} > {usd_text(limit)} per period ({period})"


def _outside_a_checker(message: str) -> None:
    raise AssertionError(f"lifecycle violation, and no Checker to report it: {message}")


def _only_error_events(chunk: bytes) -> bool:
    """Every SSE event in `chunk` is an `{"error": ...}` frame without choices (or the [DONE] after one)."""
    events = [e for e in chunk.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    if not events:
        return False
    for event in events:
        data = event_data(event + b"\n\n")
        if data == b"[DONE]":
            continue  # the end of a refused stream carries no output either
        try:
            frame = json.loads(data)
        except ValueError:
            return False
        if not isinstance(frame, dict) or frame.get("error") is None or frame.get("choices"):
            return False
    return True
