"""Budget alerts, the Trio shell: the durable outbox and webhook delivery.

The pure core (`cortex.budget.alerts`) decides what fires. This module
turns its decisions into ledger ops (`fire_ops`), which the budget service
commits through the store, and delivers the queued events from the outbox
in `AlertDelivery.run`, a background task owned by the app's nursery and
never on the request path.

Durability: a `FireAlert` writes the fired state and the outbox row in the
ledger's transaction, so an alert fires once per threshold per period even
across restarts, and an event committed is delivered at least once (or
given up as *expired* after `retry_for_s`, or dropped as *outbox_full* when
more than `outbox_max` events wait: the oldest go first). A row leaves the
outbox only after a 2xx from the receiver; cancelling `run` (shutdown)
leaves every undelivered row where it is, for the next start.

Delivery: each attempt POSTs the stored JSON body with `content-type:
application/json`, `x-cortex-event-id`, `user-agent: cortex-alerts/1`, and
`x-cortex-signature` (see `alerts.sign`, signed at send time so the
timestamp is fresh on every retry) when the rule has a secret. Anything but
a 2xx is retried after `backoff(attempts)`: reason `status` for a non-2xx
answer, `timeout` when the attempt ran out of `timeout_s`, `connect` for
any other failure (refused, reset, protocol errors). The first failure at
or after `created_at + retry_for_s` gives the event up (`expired`).

A rule removed from the config after its event was queued: the event is
dropped, logged (`alert_rule_removed`) and counted (reason `rule_removed`);
its receiver is no longer the operator's choice and there is no secret to
sign with. (An unnamed rule's id comes from its url, so editing the list
moves no event to another rule.) A rule that still exists is used as it is
now: its current url and secret (an operator fixing a url or rotating a
secret wants queued events to follow).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from cortex import logs
from cortex.budget.alerts import SIGNATURE_HEADER, AlertRule, Decision, Fire, FiredKey, Rearm, backoff_s, sign
from cortex.metrics import GatewayMetrics

ALERTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_state (
    rule_id TEXT NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    cap TEXT NOT NULL,
    threshold REAL NOT NULL,
    epoch TEXT NOT NULL,
    fired_at REAL NOT NULL,
    PRIMARY KEY (rule_id, principal_kind, principal_id, cap, threshold)
);
CREATE TABLE IF NOT EXISTS alert_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    rule_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS alert_outbox_next_attempt_at ON alert_outbox(next_attempt_at);
-- Events dropped from a full outbox and not yet counted in the metrics.
CREATE TABLE IF NOT EXISTS alert_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

OUTBOX_MAX_DEFAULT = 10_000
USER_AGENT = "cortex-alerts/1"
LAST_ERROR_LENGTH_MAX = 500
POLL_MAX_S = 30.0  # the longest the loop sleeps without looking at the outbox
COMMIT_SHIELD_S = 5.0  # the longest a delivered event's commit may hold up shutdown
_DROPPED = "outbox_dropped"


# --- ops: the alert tables' writes, applied by the store inside its transaction --------


@dataclass(frozen=True)
class FireAlert:
    key: FiredKey
    epoch: str
    event_id: str
    rule_id: str
    url: str
    body: bytes
    created_at: float
    outbox_max: int = OUTBOX_MAX_DEFAULT

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        assert self.outbox_max >= 1 and self.key[0] == self.rule_id
        # Conditional, so that of replicas sharing a ledger only one fires a crossing (and a replay fires none).
        fired = conn.execute(
            "INSERT INTO alert_state (rule_id, principal_kind, principal_id, cap, threshold, epoch, fired_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rule_id, principal_kind, principal_id, cap, threshold)"
            " DO UPDATE SET epoch = excluded.epoch, fired_at = excluded.fired_at WHERE alert_state.epoch <> excluded.epoch"
            " RETURNING epoch",
            (*self.key, self.epoch, self.created_at),
        ).fetchone()
        if fired is None:
            return
        conn.execute(  # idempotent: applying the same op twice queues one event
            "INSERT INTO alert_outbox (event_id, rule_id, url, body, created_at, attempts, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (event_id) DO NOTHING",
            (self.event_id, self.rule_id, self.url, self.body, self.created_at, self.created_at),
        )
        depth = outbox_depth(conn)
        if depth > self.outbox_max:
            dropped = depth - self.outbox_max
            conn.execute(
                "DELETE FROM alert_outbox WHERE seq IN (SELECT seq FROM alert_outbox ORDER BY seq LIMIT ?)", (dropped,)
            )
            conn.execute(
                "INSERT INTO alert_counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (_DROPPED, dropped),
            )


@dataclass(frozen=True)
class RearmAlert:
    key: FiredKey

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "DELETE FROM alert_state WHERE rule_id = ? AND principal_kind = ? AND principal_id = ? AND cap = ?"
            " AND threshold = ?",
            self.key,
        )


@dataclass(frozen=True)
class AlertDelivered:
    seq: int

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM alert_outbox WHERE seq = ?", (self.seq,))


@dataclass(frozen=True)
class AlertRetry:
    seq: int
    attempts: int
    next_attempt_at: float
    last_error: str

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        assert self.attempts >= 1
        conn.execute(
            "UPDATE alert_outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE seq = ?",
            (self.attempts, self.next_attempt_at, self.last_error[:LAST_ERROR_LENGTH_MAX], self.seq),
        )


@dataclass(frozen=True)
class AlertExpired:
    seq: int

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM alert_outbox WHERE seq = ?", (self.seq,))


@dataclass(frozen=True)
class AlertDropsCounted:
    """The shell has counted `dropped` outbox drops in its metrics."""

    dropped: int

    def apply_sql(self, conn: sqlite3.Connection) -> None:
        assert self.dropped >= 1
        conn.execute("UPDATE alert_counters SET value = value - ? WHERE name = ?", (self.dropped, _DROPPED))


AlertOp = FireAlert | RearmAlert | AlertDelivered | AlertRetry | AlertExpired | AlertDropsCounted


def fire_ops(
    decisions: Sequence[Decision], rules: Sequence[AlertRule], now: float, outbox_max: int = OUTBOX_MAX_DEFAULT
) -> list[AlertOp]:
    """The ops that make `evaluate`'s decisions durable (and queue their events)."""
    by_id = {rule.id: rule for rule in rules}
    ops: list[AlertOp] = []
    for decision in decisions:
        if isinstance(decision, Rearm):
            ops.append(RearmAlert(decision.key))
            continue
        assert isinstance(decision, Fire)
        rule = by_id[decision.key[0]]
        body = json.dumps(decision.event, separators=(",", ":"), sort_keys=True).encode()
        ops.append(FireAlert(decision.key, decision.epoch, decision.event["id"], rule.id, rule.url, body, now, outbox_max))
    return ops


def new_event_id() -> str:
    """A fresh event id for `evaluate`: 96 random bits, unique across restarts and processes."""
    return "evt_" + secrets.token_hex(12)


# --- reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    event_id: str
    rule_id: str
    url: str
    body: bytes
    created_at: float
    attempts: int
    next_attempt_at: float


def load_fired(conn: sqlite3.Connection) -> dict[FiredKey, str]:
    """The fired state at start-up: the epoch each key fired in."""
    rows = conn.execute("SELECT rule_id, principal_kind, principal_id, cap, threshold, epoch FROM alert_state")
    return {(r[0], r[1], r[2], r[3], float(r[4])): r[5] for r in rows}


def due_events(conn: sqlite3.Connection, now: float, limit: int) -> list[OutboxRow]:
    rows = conn.execute(
        "SELECT seq, event_id, rule_id, url, body, created_at, attempts, next_attempt_at FROM alert_outbox"
        " WHERE next_attempt_at <= ? ORDER BY next_attempt_at, seq LIMIT ?",
        (now, limit),
    )
    return [OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7]) for r in rows]


def next_attempt_at(conn: sqlite3.Connection) -> float | None:
    return conn.execute("SELECT MIN(next_attempt_at) FROM alert_outbox").fetchone()[0]


def outbox_depth(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM alert_outbox").fetchone()[0]


def uncounted_drops(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM alert_counters WHERE name = ?", (_DROPPED,)).fetchone()
    return row[0] if row else 0


# --- the delivery loop ------------------------------------------------------------------


class AlertDelivery:
    """Delivers the outbox: run `run` in the app's nursery and call `wake` after committing FireAlert ops."""

    def __init__(
        self,
        store: Any,
        clock: Callable[[], float],
        metrics: GatewayMetrics,
        rules: Sequence[AlertRule],
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 10.0,
        retry_for_s: float = 86400.0,
        outbox_max: int = OUTBOX_MAX_DEFAULT,
        batch_max: int = 64,
        concurrency_max: int = 8,
        backoff: Callable[[int], float] = backoff_s,
        poll_max_s: float = POLL_MAX_S,
    ) -> None:
        assert timeout_s > 0 and retry_for_s > 0 and outbox_max >= 1 and batch_max >= 1 and concurrency_max >= 1
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.rules = tuple(rules)
        self.transport = transport
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self.outbox_max = outbox_max  # for fire_ops; FireAlert carries the bound
        self.batch_max = batch_max
        self.concurrency_max = concurrency_max
        self.backoff = backoff
        self.poll_max_s = poll_max_s
        self._wake = trio.Event()

    @property
    def rules(self) -> tuple[AlertRule, ...]:
        return self._rules

    @rules.setter
    def rules(self, rules: Sequence[AlertRule]) -> None:  # a config reload may replace them
        self._rules = tuple(rules)
        self._by_id = {rule.id: rule for rule in self._rules}

    def wake(self) -> None:
        """New events were committed: look at the outbox now."""
        self._wake.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.concurrency_max)
        async with httpx.AsyncClient(transport=self.transport, timeout=self.timeout_s, follow_redirects=False) as client:
            task_status.started()
            while True:
                self._wake = trio.Event()  # before the pass: a wake during it is not lost
                delay_s = await self._pass_or_log(client, limiter)
                with trio.move_on_after(delay_s):
                    await self._wake.wait()

    async def _pass_or_log(self, client: httpx.AsyncClient, limiter: trio.CapacityLimiter) -> float:
        """Deliver what is due; the seconds until the next look."""
        try:
            return await self._pass(client, limiter)
        except Exception as exc:  # the store failed; the outbox is still there next time
            logs.event("alert_outbox_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            return self.poll_max_s

    async def _pass(self, client: httpx.AsyncClient, limiter: trio.CapacityLimiter) -> float:
        await self._count_drops()
        while True:
            now = self.clock()
            rows = await self.store.query(lambda conn: due_events(conn, now, self.batch_max))
            async with trio.open_nursery() as nursery:
                for row in rows:
                    nursery.start_soon(self._deliver, client, limiter, row)
            if len(rows) < self.batch_max:
                break
        depth, next_at = await self.store.query(lambda conn: (outbox_depth(conn), next_attempt_at(conn)))
        self.metrics.alerts_outbox.set(depth)
        if next_at is None:
            return self.poll_max_s
        return min(self.poll_max_s, max(0.0, next_at - self.clock()))

    async def _count_drops(self) -> None:
        dropped = await self.store.query(uncounted_drops)
        if dropped > 0:
            await self.store.commit([AlertDropsCounted(dropped)])
            self.metrics.alerts_failed.inc(dropped, reason="outbox_full")
            logs.event("alert_outbox_full", logging.WARNING, dropped=dropped, outbox_max=self.outbox_max)

    async def _deliver(self, client: httpx.AsyncClient, limiter: trio.CapacityLimiter, row: OutboxRow) -> None:
        if row.rule_id not in self._by_id:
            # Its rule was removed: the receiver is no longer ours to call, nor is there a secret to sign with.
            logs.event("alert_rule_removed", logging.WARNING, alert=row.rule_id, event_id=row.event_id)
            with trio.move_on_after(COMMIT_SHIELD_S, shield=True):
                await self.store.commit([AlertExpired(row.seq)])
                self.metrics.alerts_failed.inc(reason="rule_removed")
            return
        async with limiter:
            reason, error = await self._attempt(client, row)
        op = self._outcome(row, reason, error)
        # Shielded, with a deadline: a delivered event's commit should land
        # even while shutting down, or it is sent again after the restart.
        with trio.move_on_after(COMMIT_SHIELD_S, shield=True):
            await self.store.commit([op])
            self._count(row, op, reason, error)

    async def _attempt(self, client: httpx.AsyncClient, row: OutboxRow) -> tuple[str | None, str]:
        """One POST: (None, "") when delivered, else (reason, error)."""
        url, headers = self._request(row)
        try:
            with trio.fail_after(self.timeout_s):
                async with client.stream("POST", url, content=row.body, headers=headers) as response:
                    status = response.status_code  # the body is not read: a receiver's answer is its status
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            return "timeout", f"timed out after {self.timeout_s:g} s ({type(exc).__name__})"
        except Exception as exc:  # a bad receiver never stops the loop
            return "connect", f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None, ""
        return "status", f"HTTP {status}"

    def _request(self, row: OutboxRow) -> tuple[str, dict[str, str]]:
        headers = {"content-type": "application/json", "x-cortex-event-id": row.event_id, "user-agent": USER_AGENT}
        rule = self._by_id[row.rule_id]
        if rule.secret:
            headers[SIGNATURE_HEADER] = sign(rule.secret, int(self.clock()), row.body)
        return rule.url, headers

    def _outcome(self, row: OutboxRow, reason: str | None, error: str) -> AlertOp:
        if reason is None:
            return AlertDelivered(row.seq)
        now = self.clock()
        deadline = row.created_at + self.retry_for_s
        if now >= deadline:
            return AlertExpired(row.seq)
        attempts = row.attempts + 1
        return AlertRetry(row.seq, attempts, min(now + self.backoff(attempts), deadline), error)

    def _count(self, row: OutboxRow, op: AlertOp, reason: str | None, error: str) -> None:
        if reason is None:
            self.metrics.alerts_sent.inc(alert=row.rule_id)
            return
        self.metrics.alerts_failed.inc(reason=reason)
        fields = dict(alert=row.rule_id, event_id=row.event_id, reason=reason, error=error, attempts=row.attempts + 1)
        if isinstance(op, AlertExpired):
            self.metrics.alerts_failed.inc(reason="expired")
            logs.event("alert_expired", logging.ERROR, **fields, retry_for_s=self.retry_for_s)
        else:
            logs.event("alert_delivery_failed", logging.WARNING, **fields)
