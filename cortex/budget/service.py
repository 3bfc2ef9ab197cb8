"""The budget shell: authentication, reserve and settle, expiry, administration.

Decisions come from the pure `Ledger`; this module persists them through a
store (`ThreadedStore` in production, `SyncStore` in the simulator), turns
refusals into the API's 429s, and keeps the metrics. Every request that
passes `reserve` holds a `Hold`, and its owner must call `settle`,
`release` or `charge_hold` exactly once; those run under a bounded shield.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import trio

from cortex import logs
from common import errors
from common.errors import ApiError
from cortex.budget import keys as keys_mod
from cortex.budget.alert_delivery import AlertDelivery, FireAlert, fire_ops, load_fired, new_event_id
from cortex.budget.alerts import AlertRule, CapLevel, FiredKey, evaluate, record_fired
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps, Headroom, Hold, Ledger, LedgerError, Refusal, Resolution, topped_up
from cortex.budget.periods import PeriodSpec, period_bounds, period_id, period_view
from cortex.budget.pricing import USD_MICRO_MAX, Prices, usd_number
from cortex.budget.store import (
    ExtendHold,
    OpenHold,
    PutAccount,
    PutKey,
    ResolveHold,
    RevokeKey,
    SetCaps,
    Snapshot,
    StoreError,
    caps_of,
    period_charges,
)
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics

DEFAULT_ACCOUNT = "default"
TOKENS_MAX = 10**15  # far above any real balance, far below SQLite's 2**63
ACTUAL_TOKENS_STORED_MAX = 2**62  # what an upstream claimed is recorded, but never past what SQLite can store
WINDOW_HORIZON_MAX_S = 31 * 24 * 3600.0  # usage older than any sane window is not replayed
ALERT_EVALUATE_INTERVAL_S = 0.05
SPEND_DAYS = 31  # the spend report's reach
SPEND_BUCKET_S = 900  # every zone's UTC offset is a multiple of 15 minutes, so buckets fall into whole local days


@dataclass
class KeyRecord:
    id: str
    account_id: str
    name: str
    key_hash: bytes
    prefix: str
    created_at: float
    revoked_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "account": self.account_id,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "revoked": self.revoked_at is not None,
            "revoked_at": self.revoked_at,
        }


def caps_view(caps: Caps) -> dict[str, Any]:
    """Money as USD numbers (exact micro-USD beside them), a period as its kind, zone and anchor."""
    spec = caps.period
    return {
        "balance_tokens": caps.balance_tokens,
        "window_tokens": caps.window_tokens,
        "window_seconds": caps.window_s,
        "max_concurrency": caps.max_concurrency,
        "balance_usd": _usd_or_none(caps.balance_usd),
        "window_usd": _usd_or_none(caps.window_usd),
        "period": spec.kind if spec else None,
        "period_timezone": spec.timezone if spec else None,
        "period_anchor_day": spec.anchor_day if spec else None,
        "period_tokens": caps.period_tokens,
        "period_usd": _usd_or_none(caps.period_usd),
        "output_holds": caps.output_holds,
        # Exact, for programs: a USD number is for people.
        "balance_micro_usd": caps.balance_usd,
        "window_micro_usd": caps.window_usd,
        "period_micro_usd": caps.period_usd,
    }


def _usd_or_none(micro: int | None) -> float | None:
    return usd_number(micro) if micro is not None else None


def refusal_error(refusal: Refusal, retry_hint_s: float) -> ApiError:
    """A budget refusal in the OpenAI shape: always 429, never 400/401/402."""
    if refusal.reason == "balance":
        return ApiError(
            429, refusal.message, type="insufficient_quota", code="insufficient_quota",
            headers=[(b"x-should-retry", b"false")],
        )
    type_ = "requests" if refusal.reason == "concurrency" else "tokens"
    if refusal.never_fits:
        return ApiError(429, refusal.message, type=type_, code="rate_limit_exceeded", headers=[(b"x-should-retry", b"false")])
    wait_s = refusal.retry_after_s if refusal.retry_after_s is not None else retry_hint_s
    return ApiError(
        429, refusal.message, type=type_, code="rate_limit_exceeded", headers=errors.retry_after_headers(wait_s)
    )


class BudgetService:
    def __init__(
        self, ledger: Ledger, store: Any, clock: Callable[[], float], config: BudgetConfig, metrics: GatewayMetrics
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self.keys: dict[str, KeyRecord] = {}
        self._by_hash: dict[bytes, KeyRecord] = {}
        # Unique across restarts without a syscall per request.
        self._id_prefix = secrets.token_hex(4)
        self._hold_seq = itertools.count(1)
        self._admin_lock = trio.Lock()  # administrative changes are read-modify-write
        # Alerts: the rules, what has fired (the ledger's copy, loaded at start), and the outbox's doorbell.
        self.alert_rules: tuple[AlertRule, ...] = ()
        self._fired: dict[FiredKey, str] = {}
        self._alert_wake: Callable[[], None] | None = None
        # Principals charged since the alert evaluator last looked: settlement only marks them.
        self._alert_dirty: set[tuple[str, str]] = set()
        self._alert_dirty_event = trio.Event()
        # (kind, id, cap) -> epoch: caps that refused a request (spent for practical purposes).
        self._alert_exhausted: dict[tuple[str, str, str], str] = {}
        metrics.holds_outstanding.set_function(lambda: len(self.open_holds()))
        metrics.held_tokens.set_function(lambda: sum(h.amount_tokens for h in self.open_holds()))

    def open_holds(self) -> list[Hold]:
        """The holds this process has open (for the gauges)."""
        return list(self.ledger.holds.values())

    @classmethod
    async def load(
        cls, store: Any, clock: Callable[[], float], config: BudgetConfig, metrics: GatewayMetrics,
        ledger: Ledger | None = None,
    ) -> "BudgetService":
        """Recover (orphaned holds are charged in full) and rebuild the ledger."""
        snapshot: Snapshot = await store.load(clock(), WINDOW_HORIZON_MAX_S)
        service = cls(ledger or Ledger(), store, clock, config, metrics)
        service._rebuild(snapshot)
        for hold_id, key_id, amount in snapshot.orphaned:
            metrics.holds_resolved.inc(state="orphaned")
            logs.event("hold_orphaned", logging.WARNING, hold_id=hold_id, key_id=key_id, charged_tokens=amount)
        return service

    def _rebuild(self, snapshot: Snapshot) -> None:
        for row in snapshot.accounts:
            self.ledger.add_account(row["id"], caps_of(row), row["spent_tokens"], row["spent_usd"])
        for row in snapshot.keys:
            self.ledger.add_key(row["id"], row["account_id"], caps_of(row), row["spent_tokens"], row["spent_usd"])
            self._index(
                KeyRecord(row["id"], row["account_id"], row["name"], bytes(row["key_hash"]), row["key_prefix"],
                          row["created_at"], row["revoked_at"])
            )
        for key_id, at, tokens, usd in snapshot.recent_charges:
            self.ledger.record_usage(key_id, at, tokens, usd)
        for (kind, principal_id), (start, end, tokens, usd) in snapshot.period_usage.items():
            self.ledger.principal(kind, principal_id).set_period_usage(start, end, tokens, usd)
        for row in snapshot.open_holds:
            self.ledger.restore_hold(
                Hold(row["id"], row["key_id"], row["account_id"], row["amount_tokens"], row["created_at"], row["expires_at"],
                     amount_usd=row["amount_usd"])
            )

    def _index(self, record: KeyRecord) -> None:
        self.keys[record.id] = record
        self._by_hash[record.key_hash] = record

    # --- the request path --------------------------------------------------------

    def authenticate(self, headers: dict[str, str]) -> KeyRecord:
        presented = keys_mod.presented_key(headers)
        if presented is None:
            raise ApiError(
                401, "Missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.",
                code="invalid_api_key",
            )
        digest = keys_mod.key_hash(presented)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest) or record.revoked_at is not None:
            raise ApiError(401, "Incorrect or revoked API key.", code="invalid_api_key")
        return record

    async def authenticate_async(self, headers: dict[str, str]) -> KeyRecord:
        """`authenticate`, for a service whose view of the keys may need a look at the ledger first."""
        return self.authenticate(headers)

    async def reserve(
        self, key: KeyRecord, estimate: Estimate, request_id: str, model: str, client_request_id: str | None = None,
        prices: Prices | None = None,
    ) -> Hold:
        """Hold the worst case on every cap that applies, durably, or raise the 429.

        `prices` are the model's (None: unpriced); the hold's money part is
        its worst case at them, held on every money cap in the same reserve.
        """
        now = self.clock()
        self._refuse_unpriced(key, model, prices)
        amount_usd = prices.hold_usd(estimate.prompt_tokens, estimate.output_tokens) if prices is not None else 0
        hold_id = f"hold_{self._id_prefix}{next(self._hold_seq):x}"
        result = self.ledger.reserve(
            hold_id, key.id, estimate.total_tokens, now, self.config.hold_ttl_s, request_id, amount_usd
        )
        if isinstance(result, Refusal):
            self.metrics.refusals.inc(reason=result.reason if result.unit == "tokens" else f"{result.reason}_usd")
            if self.alert_rules and result.reason in ("balance", "period"):
                self._mark_exhausted(result)
            raise refusal_error(result, self.config.retry_hint_s)
        hold = result
        op = OpenHold.of(hold, model, client_request_id)
        try:
            with trio.fail_after(self.config.ledger_timeout_s):
                await self.store.commit([op])
        except (StoreError, trio.TooSlowError) as exc:
            # Never dispatched: resolve it (the release is queued after the hold, so order holds).
            await self.release(hold)
            logs.event("ledger_write_failed", logging.ERROR, request_id=request_id, error=str(exc) or "timed out")
            raise errors.service_unavailable("The budget ledger is unavailable; try again shortly.", 1) from None
        except BaseException:
            await self.release(hold)  # cancelled while the hold was being written
            raise
        return hold

    def _refuse_unpriced(self, key: KeyRecord, model: str, prices: Prices | None) -> None:
        if prices is None and self.config.unpriced != "free" and self._money_capped(key):
            self.metrics.refusals.inc(reason="unpriced")
            raise ApiError(
                403,
                f"The model {model!r} has no price in the catalogue, and this key's budget is in USD, so the request"
                " cannot be charged. Ask the operator to price the model (cost.input and cost.output in the catalogue),"
                " or use a priced model.",
                type="permission_error", code="model_not_priced",
            )

    def output_holds(self, key: KeyRecord) -> str:
        """The output-hold policy for a key's requests: the key's own, else its account's, else the server's."""
        for kind, pid in (("key", key.id), ("account", key.account_id)):
            p = self.ledger.principals.get((kind, pid))
            if p is not None and p.caps.output_holds is not None:
                return p.caps.output_holds
        return self.config.output_holds

    async def extend(self, hold: Hold, tokens: int, usd: int = 0) -> Hold | Refusal | None:
        """Grow an open hold (an incremental output hold's next slice), durably, or say why not.

        A Hold: granted, with its new amounts, on disk before the caller forwards what it covers.
        A Refusal: a cap is in the way. None: the hold is no longer open, or the ledger could not
        make it durable in time; the caller must treat both as not granted (the hold in memory may
        be larger: the charge is capped at what was forwarded, so nothing is charged for it).
        """
        revoked = self._revoked_mid_reply(hold)
        if revoked is not None:
            return revoked
        try:
            result = self.ledger.extend(hold.id, tokens, self.clock(), usd)
        except LedgerError:
            return None
        if isinstance(result, Refusal):
            self.metrics.extensions.inc(result="refused")
            return result
        try:
            with trio.fail_after(self.config.ledger_timeout_s):
                await self.store.commit([ExtendHold(hold.id, result.amount_tokens, result.amount_usd)])
        except (StoreError, trio.TooSlowError) as exc:
            logs.event("ledger_write_failed", logging.ERROR, hold_id=hold.id, error=str(exc) or "timed out")
            self.metrics.extensions.inc(result="unavailable")
            return None
        self.metrics.extensions.inc(result="granted")
        return result

    def _revoked_mid_reply(self, hold: Hold) -> Refusal | None:
        """A key revoked while its reply streams: its next slice is refused, no more output is paid for."""
        record = self.keys.get(hold.key_id)
        if record is None or record.revoked_at is None:
            return None
        self.metrics.extensions.inc(result="refused")
        return Refusal("revoked", "key", hold.key_id, f"The key {hold.key_id} has been revoked.", None, True)

    def _money_capped(self, key: KeyRecord) -> bool:
        return any(self.ledger.principal(kind, pid).caps.money for kind, pid in (("key", key.id), ("account", key.account_id)))

    async def settle(self, hold: Hold, actual_tokens: int, actual_usd: int = 0) -> Resolution | None:
        return await self._resolve(hold, lambda now: self.ledger.settle(hold.id, actual_tokens, now, actual_usd))

    async def release(self, hold: Hold) -> Resolution | None:
        return await self._resolve(hold, lambda now: self.ledger.release(hold.id, now))

    async def charge_hold(self, hold: Hold) -> Resolution | None:
        """Charge the whole hold: usage happened but cannot be observed."""
        return await self._resolve(hold, lambda now: self.ledger.settle(hold.id, hold.amount_tokens, now, hold.amount_usd))

    async def _resolve(self, hold: Hold, decide: Callable[[float], Resolution]) -> Resolution | None:
        # Shielded so a cancelled request still settles; bounded so shutdown cannot hang on it.
        with trio.move_on_after(self.config.ledger_timeout_s, shield=True) as scope:
            try:
                resolution = decide(self.clock())
            except LedgerError as exc:  # e.g. expired while the request ran
                logs.event("settle_skipped", logging.WARNING, hold_id=hold.id, error=str(exc))
                return None
            self._count(resolution)
            if self.alert_rules and (resolution.charged_tokens or resolution.charged_usd):
                self._alert_dirty.update((("key", hold.key_id), ("account", hold.account_id)))
                self._alert_dirty_event.set()
            try:
                # Not awaited to disk: recovery charges an unwritten settlement in full.
                await self.store.commit([_resolve_op(resolution)], durable=False)
            except StoreError as exc:
                logs.event("ledger_write_failed", logging.ERROR, hold_id=hold.id, error=str(exc))
            return resolution
        if scope.cancelled_caught:
            logs.event("settle_not_durable", logging.ERROR, hold_id=hold.id, timeout_s=self.config.ledger_timeout_s)
        return None

    def _count(self, resolution: Resolution) -> None:
        self.metrics.holds_resolved.inc(state=resolution.hold.state.value)
        if resolution.overrun_tokens:
            self.metrics.overruns.inc()
            self.metrics.overrun_tokens.inc(resolution.overrun_tokens)
            logs.event("settle_overrun", logging.WARNING, hold_id=resolution.hold.id, overrun_tokens=resolution.overrun_tokens)

    # --- alerts ------------------------------------------------------------------------

    async def start_alerts(self, rules: tuple[AlertRule, ...], **delivery: Any) -> AlertDelivery:
        """Load what has fired, catch up on crossings a crash left unrecorded, and give the outbox's sender."""
        self.alert_rules = rules
        self._fired = await self.store.query(load_fired)
        sender = AlertDelivery(self.store, self.clock, self.metrics, rules, **delivery)
        self._alert_wake = sender.wake
        await self._commit_alerts(self._alert_ops(list(self.ledger.principals)))
        return sender

    async def evaluate_alerts_forever(
        self, interval_s: float = ALERT_EVALUATE_INTERVAL_S, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Off the request path: look at the principals charged since the last look, at most every `interval_s`.

        Crossing is a state (spent >= threshold x limit, not yet fired), not an edge, so
        looking later misses nothing; a crash before a look is caught by start-up's sweep.
        """
        task_status.started()
        while True:
            await self._alert_dirty_event.wait()
            await trio.sleep(interval_s)  # let a burst of settlements become one look
            self._alert_dirty_event = trio.Event()
            dirty, self._alert_dirty = self._alert_dirty, set()
            try:
                await self._refresh_for_alerts(dirty)
                await self._commit_alerts(self._alert_ops(sorted(dirty)))
            except StoreError as exc:  # the next start-up's sweep fires what this lost
                logs.event("ledger_write_failed", logging.ERROR, alerts=len(dirty), error=str(exc))

    async def _refresh_for_alerts(self, principals: set[tuple[str, str]]) -> None:
        """The ledger in memory is the truth here; a shared ledger's service reads it first."""

    def _mark_exhausted(self, refusal: Refusal) -> None:
        kind, principal_id, cap = refusal.principal_kind, refusal.principal_id, f"{refusal.reason}_{refusal.unit}"
        epoch = _epoch(self.ledger.principal(kind, principal_id), cap)
        if epoch is not None and self._alert_exhausted.get((kind, principal_id, cap)) != epoch:
            self._alert_exhausted[(kind, principal_id, cap)] = epoch
            self._alert_dirty.add((kind, principal_id))
            self._alert_dirty_event.set()

    async def _commit_alerts(self, ops: list[Any]) -> None:
        if ops:
            await self.store.commit(ops)
            self._ring(ops)

    def _alert_ops(self, principals: Any) -> list[Any]:
        """Fire and re-arm decisions for `principals` ((kind, id) pairs) as ledger ops; recorded before any await."""
        if not self.alert_rules:
            return []
        now = self.clock()
        ops: list[Any] = []
        for kind, principal_id in principals:
            levels = cap_levels(self.ledger.principal(kind, principal_id), now, self._alert_exhausted)
            if not levels:
                continue
            decisions = evaluate(self.alert_rules, kind, principal_id, levels, self._fired, now, new_event_id)
            if decisions:
                record_fired(self._fired, decisions)
                ops += fire_ops(decisions, self.alert_rules, now, self.config.alert_outbox_max)
        return ops

    def _ring(self, ops: list[Any]) -> None:
        if self._alert_wake is not None and any(isinstance(op, FireAlert) for op in ops):
            self._alert_wake()

    def headroom(self, key: KeyRecord) -> Headroom | None:
        """The tightest token cap's room, for each surface's rate-limit headers."""
        return self.ledger.headroom(key.id, self.clock())

    # --- background ------------------------------------------------------------------

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """What the service runs beside the requests, in the app's nursery: here, hold expiry."""
        await self.expire_forever(task_status=task_status)

    async def expire_forever(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.config.expiry_interval_s)
            await self.expire_due()

    async def expire_due(self) -> list[Resolution]:
        resolutions = self.ledger.expire(self.clock())
        for r in resolutions:
            self._count(r)
            if self.alert_rules and (r.charged_tokens or r.charged_usd):
                self._alert_dirty.update((("key", r.hold.key_id), ("account", r.hold.account_id)))
                self._alert_dirty_event.set()
            logs.event("hold_expired", logging.WARNING, hold_id=r.hold.id, key_id=r.hold.key_id, charged_tokens=r.charged_tokens)
        if resolutions:
            try:
                with trio.move_on_after(self.config.ledger_timeout_s, shield=True):
                    await self.store.commit([_resolve_op(r) for r in resolutions])
            except StoreError as exc:  # recovery charges these holds in full anyway
                logs.event("ledger_write_failed", logging.ERROR, expired=len(resolutions), error=str(exc))
        return resolutions

    # --- administration -------------------------------------------------------------------

    async def create_account(self, account_id: str, caps: Caps) -> None:
        async with self._admin_lock:
            if ("account", account_id) in self.ledger.principals:
                raise ApiError(409, f"Account {account_id!r} already exists.", code="conflict")
            _check_name(account_id, "account")
            await self.store.commit([PutAccount(account_id, caps, self.clock())])
            self.ledger.add_account(account_id, caps)

    async def create_key(self, name: str, account_id: str | None, caps: Caps) -> tuple[KeyRecord, str]:
        """A new key; the plaintext is returned once and never stored."""
        _check_name(name, "name")
        account_id = account_id or DEFAULT_ACCOUNT
        async with self._admin_lock:
            new_account = ("account", account_id) not in self.ledger.principals
            ops: list[Any] = []
            if new_account:
                _check_name(account_id, "account")
                ops.append(PutAccount(account_id, Caps(), self.clock()))
            plaintext = keys_mod.generate_key()
            record = KeyRecord(
                keys_mod.new_key_id(), account_id, name, keys_mod.key_hash(plaintext), keys_mod.key_prefix(plaintext),
                self.clock(),
            )
            ops.append(PutKey(record.id, account_id, name, record.key_hash, record.prefix, caps, record.created_at))
            await self.store.commit(ops)
            if new_account:
                self.ledger.add_account(account_id, Caps())
            self.ledger.add_key(record.id, account_id, caps)
            self._index(record)
        return record, plaintext

    def _principal_or_404(self, kind: str, principal_id: str) -> None:
        if (kind, principal_id) not in self.ledger.principals:
            raise ApiError(404, f"No {kind} {principal_id!r}.", code="not_found")

    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> None:
        async with self._admin_lock:
            self._principal_or_404(kind, principal_id)
            await self._apply_caps(kind, principal_id, caps)

    async def top_up(self, kind: str, principal_id: str, tokens: int = 0, usd: int = 0) -> Caps:
        """Raise the token balance by `tokens`, the USD balance by `usd` micro-USD, or both."""
        check_top_up(tokens, usd)
        async with self._admin_lock:  # read-modify-write: concurrent top-ups must all count
            self._principal_or_404(kind, principal_id)
            caps = raised_caps(kind, principal_id, self.ledger.principal(kind, principal_id).caps, tokens, usd)
            await self._apply_caps(kind, principal_id, caps)
        return caps

    async def _apply_caps(self, kind: str, principal_id: str, caps: Caps) -> None:
        old = self.ledger.principal(kind, principal_id).caps
        await self.store.commit([SetCaps(kind, principal_id, caps)])
        grows = caps.window_s is not None and (old.window_s is None or caps.window_s > old.window_s)
        new_period = caps.period is not None and caps.period != old.period
        if not grows and not new_period:
            self.ledger.set_caps(kind, principal_id, caps)
            await self._alert_after_caps(kind, principal_id)
            return
        # Usage older than the old window was already dropped from memory, and
        # a new period's usage was never counted; the store has both. Charges
        # that land while the query runs are captured, not lost.
        now = self.clock()
        since = now - caps.window_s if grows and caps.window_s is not None else None
        bounds = period_bounds(caps.period, now) if new_period and caps.period is not None else None

        def read(conn: sqlite3.Connection) -> tuple[list[tuple[float, int, int]] | None, tuple[int, int] | None]:
            history = charges_since(conn, kind, principal_id, since) if since is not None else None
            sums = period_charges(conn, kind, principal_id, *bounds) if bounds is not None else None
            return history, sums

        self.ledger.begin_window_rebuild(kind, principal_id)  # no checkpoint until the query is queued
        try:
            history, sums = await self.store.query(read)
        except BaseException:
            self.ledger.abort_window_rebuild(kind, principal_id)
            raise
        period = (*bounds, *sums) if bounds is not None and sums is not None else None
        self.ledger.finish_window_rebuild(kind, principal_id, caps, history, period)
        await self._alert_after_caps(kind, principal_id)

    async def _alert_after_caps(self, kind: str, principal_id: str) -> None:
        """A top-up or a new limit re-arms (or fires) a principal's alerts at once."""
        await self._commit_alerts(self._alert_ops([(kind, principal_id)]))

    async def revoke(self, key_id: str) -> KeyRecord:
        async with self._admin_lock:
            self._principal_or_404("key", key_id)
            record = self.keys[key_id]
            if record.revoked_at is None:
                at = self.clock()
                await self.store.commit([RevokeKey(key_id, at)])
                record.revoked_at = at
        return record

    async def usage(self, kind: str, principal_id: str) -> dict[str, Any]:
        self._principal_or_404(kind, principal_id)
        return principal_usage(self.ledger, kind, principal_id, self.clock())

    async def usages(self, kind: str, ids: list[str]) -> list[dict[str, Any]]:
        return [await self.usage(kind, i) for i in ids]

    def account_ids(self) -> list[str]:
        return sorted(pid for kind, pid in self.ledger.principals if kind == "account")

    async def key_records(self) -> list[KeyRecord]:
        return list(self.keys.values())

    async def key_record(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    async def recent(self, key_id: str, limit: int = 20) -> list[dict[str, Any]]:
        return await self.store.query(lambda conn: recent_requests(conn, key_id, limit))

    async def spend(self, kind: str, principal_id: str, days: int = SPEND_DAYS) -> dict[str, Any]:
        """Charged spend per model and per day over the last `days` days (the period's zone's days, else UTC)."""
        self._principal_or_404(kind, principal_id)
        spec = self.ledger.principal(kind, principal_id).caps.period
        zone = spec.timezone if spec is not None else "UTC"
        # From a local midnight: the same report whenever it is asked for that day.
        since, _ = period_bounds(PeriodSpec("daily", zone), self.clock() - (days - 1) * 86400.0)
        rows = await self.store.query(lambda conn: spend_buckets(conn, kind, principal_id, since))
        return spend_view(rows, zone, since)


def check_top_up(tokens: int, usd: int) -> None:
    """A top-up's amounts, or the 400 that refuses them."""
    if not (tokens or usd):
        raise errors.invalid_request("A top-up needs 'tokens' or 'usd'.", param="tokens")
    if not 0 <= tokens <= TOKENS_MAX:
        raise errors.invalid_request(f"'tokens' must be from 1 to {TOKENS_MAX}.", param="tokens")
    if not 0 <= usd <= USD_MICRO_MAX:
        raise errors.invalid_request(f"'usd' must be from 0.000001 to {USD_MICRO_MAX // 10**6}.", param="usd")


def raised_caps(kind: str, principal_id: str, caps: Caps | None, tokens: int, usd: int) -> Caps:
    """The caps a top-up leaves (from those read under the lock), or the error that refuses it."""
    if caps is None:
        raise ApiError(404, f"No {kind} {principal_id!r}.", code="not_found")
    new = topped_up(caps, tokens, usd)
    if isinstance(new, str):
        raise errors.invalid_request(f"{kind} {principal_id} {new}.")
    if (new.balance_tokens or 0) > TOKENS_MAX:
        raise errors.invalid_request(f"The balance would pass the limit of {TOKENS_MAX} tokens.", param="tokens")
    if (new.balance_usd or 0) > USD_MICRO_MAX:
        raise errors.invalid_request(f"The balance would pass the limit of {USD_MICRO_MAX // 10**6} USD.", param="usd")
    return new


def cap_levels(p: Any, now: float, exhausted: dict[tuple[str, str, str], str] | None = None) -> list[CapLevel]:
    """How far along each of a principal's caps its charged spend is, for the alert rules."""
    caps, levels = p.caps, []
    exhausted = exhausted or {}

    def add(cap: str, spent: int, limit: int | None, **extra: Any) -> None:
        if limit:  # a cap of 0 has no fraction to cross
            epoch = extra.setdefault("epoch", "")  # windows have none: they re-arm by falling
            full = bool(epoch) and exhausted.get((p.kind, p.id, cap)) == epoch
            levels.append(CapLevel(cap, spent, limit, exhausted=full, **extra))

    # A balance's epoch is its limit: each level a top-up makes is watched afresh.
    add("balance_tokens", p.spent_tokens, caps.balance_tokens, epoch=str(caps.balance_tokens))
    add("balance_usd", p.spent_usd, caps.balance_usd, epoch=str(caps.balance_usd))
    if caps.window_s is not None:
        add("window_tokens", p.window_usage(now), caps.window_tokens, window_s=caps.window_s)
        add("window_usd", p.window_usage_usd(now), caps.window_usd, window_s=caps.window_s)
    if caps.period is not None:
        used_tokens, used_usd = p.period_usage(now)
        assert p.period_start is not None
        epoch, view = period_id(caps.period, p.period_start), period_view(caps.period, now)
        add("period_tokens", used_tokens, caps.period_tokens, epoch=epoch, period=view)
        add("period_usd", used_usd, caps.period_usd, epoch=epoch, period=view)
    return levels


def _epoch(p: Any, cap: str) -> str | None:
    """The alert epoch of a balance or period cap right now (as `cap_levels` gives it)."""
    if cap.startswith("balance_"):
        limit = p.caps.balance_tokens if cap == "balance_tokens" else p.caps.balance_usd
        return str(limit) if limit else None
    if cap.startswith("period_") and p.caps.period is not None and p.period_start is not None:
        return period_id(p.caps.period, p.period_start)
    return None


def _check_name(value: str, field: str) -> None:
    if not keys_mod.NAME_RE.fullmatch(value):
        raise errors.invalid_request(
            f"'{field}' must be 1-64 characters of letters, digits, '_', '.', '@' or '-'.", param=field
        )


def _resolve_op(r: Resolution) -> ResolveHold:
    h = r.hold
    actual = min(h.actual_tokens, ACTUAL_TOKENS_STORED_MAX) if h.actual_tokens is not None else None
    return ResolveHold(
        h.id, h.key_id, h.account_id, h.state.value, r.charged_tokens, actual, h.resolved_at or 0.0, r.charged_usd
    )


def principal_usage(ledger: Ledger, kind: str, principal_id: str, now: float) -> dict[str, Any]:
    """What a principal has spent and holds, and what is left under each cap (money in micro-USD and USD)."""
    p = ledger.principal(kind, principal_id)
    caps = p.caps
    view: dict[str, Any] = {
        "kind": kind,
        "id": principal_id,
        "limits": caps_view(caps),
        "spent_tokens": p.spent_tokens,
        "held_tokens": p.held_tokens,
        "spent_micro_usd": p.spent_usd,
        "held_micro_usd": p.held_usd,
        "spent_usd": usd_number(p.spent_usd),
        "in_flight": p.in_flight,
        "remaining": {},
    }
    remaining = view["remaining"]
    if caps.balance_tokens is not None:
        remaining["balance_tokens"] = caps.balance_tokens - p.spent_tokens - p.held_tokens
    if caps.balance_usd is not None:
        remaining["balance_micro_usd"] = caps.balance_usd - p.spent_usd - p.held_usd
    if caps.window_s is not None:
        used, used_usd = p.window_usage(now), p.window_usage_usd(now)
        view["window_used_tokens"], view["window_used_micro_usd"] = used, used_usd
        if caps.window_tokens is not None:
            remaining["window_tokens"] = caps.window_tokens - used - p.held_tokens
        if caps.window_usd is not None:
            remaining["window_micro_usd"] = caps.window_usd - used_usd - p.held_usd
    if caps.period is not None:
        used, used_usd = p.period_usage(now)
        view["period"] = {**period_view(caps.period, now), "used_tokens": used, "used_micro_usd": used_usd}
        if caps.period_tokens is not None:
            remaining["period_tokens"] = caps.period_tokens - used - p.held_tokens
        if caps.period_usd is not None:
            remaining["period_micro_usd"] = caps.period_usd - used_usd - p.held_usd
    if caps.max_concurrency is not None:
        remaining["concurrency"] = caps.max_concurrency - p.in_flight
    return view


def charges_since(conn: sqlite3.Connection, kind: str, principal_id: str, since: float) -> list[tuple[float, int, int]]:
    column = "key_id" if kind == "key" else "account_id"
    return conn.execute(
        f"SELECT resolved_at, charged_tokens, charged_usd FROM holds WHERE {column} = ? AND resolved_at > ?"
        " AND (charged_tokens > 0 OR charged_usd > 0) ORDER BY resolved_at",
        (principal_id, since),
    ).fetchall()


def spend_buckets(conn: sqlite3.Connection, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
    column = "key_id" if kind == "key" else "account_id"
    return conn.execute(
        f"SELECT model, CAST(resolved_at / {SPEND_BUCKET_S} AS INTEGER), COUNT(*), SUM(charged_tokens), SUM(charged_usd)"
        f" FROM holds WHERE {column} = ? AND resolved_at >= ? AND (charged_tokens > 0 OR charged_usd > 0)"
        " GROUP BY 1, 2",
        (principal_id, since),
    ).fetchall()


def spend_view(rows: list[tuple[Any, ...]], zone: str, since: float) -> dict[str, Any]:
    """Buckets of (model, 15-minute slot, requests, tokens, micro-USD) summed per model and per local day."""
    tz = ZoneInfo(zone)
    by_model: dict[str, list[int]] = {}
    by_day: dict[str, list[int]] = {}
    for model, slot, requests, tokens, usd in rows:
        day = datetime.fromtimestamp(slot * SPEND_BUCKET_S, tz).date().isoformat()
        for table, name in ((by_model, model or ""), (by_day, day)):
            sums = table.setdefault(name, [0, 0, 0])
            sums[0] += requests
            sums[1] += tokens
            sums[2] += usd

    def rows_of(table: dict[str, list[int]], name: str) -> list[dict[str, Any]]:
        return [
            {name: key or None, "requests": r, "tokens": t, "micro_usd": u, "usd": usd_number(u)}
            for key, (r, t, u) in sorted(table.items())
        ]

    return {
        "since": datetime.fromtimestamp(since, timezone.utc).isoformat().replace("+00:00", "Z"),
        "timezone": zone,
        "by_model": rows_of(by_model, "model"),
        "by_day": rows_of(by_day, "day"),
    }


def recent_requests(conn: sqlite3.Connection, key_id: str, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id, request_id, client_request_id, model, amount_tokens, charged_tokens, actual_tokens, state,"
        " created_at, resolved_at, amount_usd, charged_usd"
        " FROM holds WHERE key_id = ? ORDER BY created_at DESC LIMIT ?",
        (key_id, limit),
    ).fetchall()
    names = ("hold_id", "request_id", "client_request_id", "model", "held_tokens", "charged_tokens", "actual_tokens",
             "state", "created_at", "resolved_at", "held_micro_usd", "charged_micro_usd")
    return [dict(zip(names, row)) for row in rows]
