"""The invariants, checked while the scenario runs, not only at its end.

The ledger calls `on_ledger` after every reserve and every resolution, so
the caps are checked at every instant their numbers change; the network
calls `on_deliver` whenever a request reaches a neuron. A violation is
recorded with the virtual time and stops the run.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from cortex.budget.ledger import Hold, HoldState, Ledger, Principal
from sim.trace import Trace


@dataclass
class RequestRecord:
    id: str
    key: str
    received_tokens: int = 0
    outcome: str = ""  # served, refused, failed, cancelled
    status: int | None = None
    code: str | None = None
    hold_amount: int | None = None
    charged: int | None = None
    hold_state: str | None = None
    latency_s: float = 0.0


@dataclass
class Tally:
    """The checker's own count for one principal, kept from the ledger's events
    alone, so a bug in the ledger's arithmetic cannot hide itself."""

    held: int = 0
    in_flight: int = 0
    spent: int = 0
    charges: deque[tuple[float, int]] = field(default_factory=deque)
    window_sum: int = 0

    def window_usage(self, now: float, window_s: float) -> int:
        while self.charges and self.charges[0][0] <= now - window_s:
            self.window_sum -= self.charges.popleft()[1]
        return self.window_sum

    def charge(self, now: float, tokens: int) -> None:
        self.spent += tokens
        if tokens:
            self.charges.append((now, tokens))
            self.window_sum += tokens


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
    deliveries: int = 0
    admitted_on_retry: int = 0
    keep_samples: bool = False  # for --plot: (t, principal, cap kind, used, held, cap) at every change
    samples: list[tuple[float, str, str, int, int, int]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # key id -> scenario name
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        if self.violation is None:
            self.violation = f"t={trio.current_time():.6f}: {message}"
            self.trace.event("violation", message=message)
            if self.cancel_scope is not None:
                self.cancel_scope.cancel()

    # --- hooks --------------------------------------------------------------------

    def on_ledger(self, event: str, hold: Hold, now: float) -> None:
        assert self.ledger is not None
        rid = hold.request_id or hold.id
        chain = (("key", hold.key_id), ("account", hold.account_id))
        tallies = [self.tallies.setdefault(who, Tally()) for who in chain]
        if event == "reserve":
            for tally in tallies:
                tally.held += hold.amount_tokens
                tally.in_flight += 1
            self.open_by_request[rid] = hold
            self.trace.event("hold", req=rid, amount=hold.amount_tokens)
            record = self.requests.get(rid)
            if record is not None:
                record.hold_amount = hold.amount_tokens
        else:
            for tally in tallies:
                tally.held -= hold.amount_tokens
                tally.in_flight -= 1
                tally.charge(now, hold.charged_tokens)
            self.resolutions[rid] += 1
            if self.resolutions[rid] > 1:
                self.fail(f"hold of {rid} resolved {self.resolutions[rid]} times")
            self.open_by_request.pop(rid, None)
            self.trace.event("resolve", req=rid, state=hold.state.value, charged=hold.charged_tokens)
            record = self.requests.get(rid)
            if record is not None:
                record.charged, record.hold_state = hold.charged_tokens, hold.state.value
            if not 0 <= hold.charged_tokens <= hold.amount_tokens:
                self.fail(f"{rid} charged {hold.charged_tokens}, outside [0, hold {hold.amount_tokens}]")
        for (kind, pid), tally in zip(chain, tallies, strict=True):
            p = self.ledger.principal(kind, pid)
            self._check_caps(p, now)
            self._check_tally(p, tally, now)

    def on_orphans(self, orphans: list[tuple[str, str, str, int, float]]) -> None:
        """Holds a crash left open, charged in full by the restarted cortex's recovery."""
        for rid, key_id, account_id, amount, at in orphans:
            self.resolutions[rid] += 1
            self.open_by_request.pop(rid, None)
            self.trace.event("orphaned", req=rid, charged=amount)
            for who in (("key", key_id), ("account", account_id)):
                tally = self.tallies.setdefault(who, Tally())
                tally.held -= amount
                tally.in_flight -= 1
                tally.charge(at, amount)

    def _check_tally(self, p: Principal, tally: Tally, now: float) -> None:
        """The caps against the checker's own counts, and the ledger's counts against them."""
        caps, who = p.caps, f"{p.kind} {self.names.get(p.id, p.id)}"
        if (p.spent_tokens, p.held_tokens, p.in_flight) != (tally.spent, tally.held, tally.in_flight):
            self.fail(
                f"{who}: the ledger says spent {p.spent_tokens}, held {p.held_tokens}, in flight {p.in_flight}; "
                f"its events add up to {tally.spent}, {tally.held}, {tally.in_flight}"
            )
        if caps.balance_tokens is not None and tally.spent + tally.held > caps.balance_tokens:
            self.fail(f"{who}: charges {tally.spent} + held {tally.held} > balance {caps.balance_tokens}")
        if caps.window_tokens is not None and caps.window_s is not None:
            used = tally.window_usage(now, caps.window_s)
            if used + tally.held > caps.window_tokens:
                self.fail(f"{who}: charged {used} in the last {caps.window_s:g} s + held {tally.held} > {caps.window_tokens}")

    def _check_caps(self, p: Principal, now: float) -> None:
        caps, who = p.caps, f"{p.kind} {self.names.get(p.id, p.id)}"
        self.peak_held[who] = max(self.peak_held.get(who, 0), p.held_tokens)
        if caps.balance_tokens is not None:
            if self.keep_samples:
                self.samples.append((now, who, "balance", p.spent_tokens, p.held_tokens, caps.balance_tokens))
            if p.spent_tokens + p.held_tokens > caps.balance_tokens:
                self.fail(f"{who}: spent {p.spent_tokens} + held {p.held_tokens} > balance {caps.balance_tokens}")
        if caps.window_tokens is not None:
            used = p.window_usage(now)
            if self.keep_samples:
                self.samples.append((now, who, "window", used, p.held_tokens, caps.window_tokens))
            if used + p.held_tokens > caps.window_tokens:
                self.fail(f"{who}: window usage {used} + held {p.held_tokens} > {caps.window_tokens}")
        if caps.max_concurrency is not None and p.in_flight > caps.max_concurrency:
            self.fail(f"{who}: {p.in_flight} in flight > {caps.max_concurrency}")

    def on_deliver(self, host: str, request_id: str) -> None:
        """A generation request reached a neuron: it must hold an open hold."""
        self.deliveries += 1
        self.trace.event("deliver", req=request_id, host=host)
        base = request_id
        if base not in self.open_by_request:
            self.fail(f"{request_id} reached {host} without an open hold")

    # --- at the end ---------------------------------------------------------------------

    def check_end(self, open_in_store: int, store_states: dict[str, str], neuron_admitted: int, neuron_refused: int, leaked: list[str]) -> None:
        if leaked:
            self.fail(f"tasks still running after the scenario: {', '.join(leaked)}")
        if open_in_store:
            self.fail(f"{open_in_store} holds still open in the ledger store at the end")
        if neuron_admitted + neuron_refused != self.deliveries:
            self.fail(
                f"neurons admitted {neuron_admitted} and refused {neuron_refused}, but cortex dispatched {self.deliveries}"
            )
        for rid, record in self.requests.items():
            state = store_states.get(rid)
            if record.hold_amount is None:
                continue
            if state is None or state == HoldState.OPEN.value:
                self.fail(f"hold of {rid} never resolved")
                continue
            if record.charged is None and state == HoldState.ORPHANED.value:
                record.charged, record.hold_state = record.hold_amount, state  # resolved by recovery
            if record.charged is not None and not record.received_tokens <= record.charged <= record.hold_amount:
                self.fail(
                    f"{rid}: charged {record.charged} outside [received {record.received_tokens}, hold {record.hold_amount}]"
                )

    def summary_counts(self) -> dict[str, Any]:
        outcomes = Counter(r.outcome for r in self.requests.values())
        refused = Counter(r.code for r in self.requests.values() if r.outcome == "refused")
        return {"outcomes": dict(sorted(outcomes.items())), "refused": dict(sorted(refused.items()))}
