"""The budget service of one replica among many, on a shared ledger (PostgreSQL).

The database is the judge: every reserve and resolution goes through the
shared ledger's admission (pg_ledger.py's `cortex_batch`, group-committed by
pg_store.py), so `spent + held <= cap` holds across replicas. What this
replica keeps in memory is a VIEW of the directory (keys, accounts, caps and
their usage, in a pure `Ledger` used only for reading), for authentication,
the unpriced-model check, the rate-limit headers and the alert levels:
  * an administrative change is written in one transaction that NOTIFYs the
    change, and every replica (this one included) re-reads that principal at
    once; a lost notice is made good by a full re-read every
    `SYNC_INTERVAL_S` and whenever the listening connection comes back;
  * the usage views and alert levels re-read what they show first;
  * a key revoked elsewhere and not yet seen here is still refused: the
    database refuses every reserve of a revoked key.

Own holds: the holds this replica placed are kept with a local deadline
(`hold_ttl_s`); one still open after it is expired, charged in full, as on
SQLite. A replica that dies leaves its holds to the other replicas' reapers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from functools import partial
from collections.abc import Callable
from typing import Any, Protocol

import trio

from cortex import logs
from common import errors
from common.errors import ApiError
from cortex.budget import keys as keys_mod
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps, Hold, HoldState, Ledger, Principal, Refusal, Resolution
from cortex.budget.periods import PeriodSpec, period_bounds
from cortex.budget.pg_ledger import Reserve, Resolve
from cortex.budget.pricing import Prices
from cortex.budget.service import (
    ACTUAL_TOKENS_STORED_MAX, DEFAULT_ACCOUNT, SPEND_DAYS, BudgetService, KeyRecord,
    _check_name, check_top_up, principal_usage, raised_caps, refusal_error, spend_view,
)
from cortex.budget.store import StoreError

EVERYTHING = "*"  # a change notice that asks for a full re-read
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics

SYNC_INTERVAL_S = 10.0  # a full re-read of the directory, in case a change notice was lost
UNKNOWN_KEY_RECHECK_S = 1.0  # a key the ledger did not have is looked up again no sooner than this
UNKNOWN_KEYS_MAX = 4096  # remembered misses; past it the oldest are forgotten
UNKNOWN_KEY_LOOKUP_TIMEOUT_S = 1.0  # a flood of distinct bad keys queues for one connection, and is refused


def replica_life_id(name: str = "") -> str:
    """This process life's id in a shared ledger: the configured name (else the host's), the pid and a
    random part. Never reused: a heartbeat extends every open hold under its id, and a reaper skips it,
    so two processes (workers of one config, or a restart) under one id would keep a dead one's holds."""
    return f"{name or socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class SharedBudgetService(BudgetService):
    def __init__(
        self, ledger: Ledger, shared: "SharedLedger", clock: Callable[[], float], config: BudgetConfig, metrics: GatewayMetrics
    ) -> None:
        super().__init__(ledger, shared, clock, config, metrics)
        self.shared = shared
        self._own: dict[str, tuple[Hold, float]] = {}  # this replica's open holds and their local deadlines
        self._pending: set[str] = set()  # "kind:id" (or "*") changed elsewhere, not yet re-read
        self._pending_event = trio.Event()
        # Key hashes the ledger did not have, and when it was asked: a flood of bad keys costs one lookup per
        # key per second, not one per request.
        self._unknown: dict[bytes, float] = {}
        self._lookups = trio.CapacityLimiter(1)  # unknown-key lookups take at most one ledger connection
        # One re-read at a time, installed in the order read: a slow full re-read must not install a
        # snapshot older than a re-read a change notice asked for after it began.
        self._refresh_lock = trio.Lock()

    def open_holds(self) -> list[Hold]:
        return [hold for hold, _ in self._own.values()]

    @classmethod
    async def load(  # type: ignore[override]
        cls, store: Any, clock: Callable[[], float], config: BudgetConfig, metrics: GatewayMetrics,
        ledger: Ledger | None = None,
    ) -> "SharedBudgetService":
        service = cls(ledger or Ledger(), store, clock, config, metrics)
        await service.refresh(None)
        return service

    # --- the view of the directory -----------------------------------------------------------

    async def refresh(self, principals: set[tuple[str, str]] | None) -> None:
        """Re-read `principals` ((kind, id) pairs; None: everything) into the view."""
        if principals is not None:
            keys = sorted(pid for kind, pid in principals if kind == "key")
            accounts = sorted(pid for kind, pid in principals if kind == "account")
            if not keys and not accounts:
                return
        else:
            keys = accounts = None
        async with self._refresh_lock:
            read = await self.shared.read_directory(self.clock(), accounts, keys)
            self._install(read, complete=principals is None)

    def _install(self, read: "Directory", complete: bool) -> None:
        ledger = self.ledger
        if complete:
            ledger.principals.clear()
            ledger.key_accounts.clear()
            self.keys.clear()
            self._by_hash.clear()
        for p in read.accounts:
            ledger.principals[("account", p.id)] = p
        for p, record in read.keys:
            if ("account", record.account_id) not in ledger.principals:
                ledger.principals[("account", record.account_id)] = Principal(record.account_id, "account", Caps())
            ledger.principals[("key", p.id)] = p
            ledger.key_accounts[p.id] = record.account_id
            old = self.keys.get(record.id)
            if old is not None:
                self._by_hash.pop(old.key_hash, None)
            self._index(record)

    def _changed(self, payload: str) -> None:
        """A change notice (called in Trio's thread by the listener)."""
        self._pending.add(payload)
        self._pending_event.set()

    async def _sync_forever(self) -> None:
        while True:
            with trio.move_on_after(SYNC_INTERVAL_S):
                await self._pending_event.wait()
            self._pending_event = trio.Event()
            pending, self._pending = self._pending, set()
            try:
                if not pending or EVERYTHING in pending:
                    await self.refresh(None)
                else:
                    await self.refresh({tuple(p.split(":", 1)) for p in pending if ":" in p})  # type: ignore[misc]
            except Exception as exc:  # a store error, or a row this replica cannot read (a zone its tzdata lacks)
                self._pending |= pending or {EVERYTHING}
                self._pending_event.set()  # read again after the pause, not at the next interval
                logs.event("ledger_read_failed", logging.ERROR, error=str(exc) or type(exc).__name__)
                await trio.sleep(1.0)

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.shared.run_background, self._changed)
            await nursery.start(self.expire_forever)
            nursery.start_soon(self._sync_forever)
            task_status.started()

    # --- the request path ---------------------------------------------------------------------

    async def authenticate_async(self, headers: dict[str, str]) -> KeyRecord:
        """A key made on another replica a moment ago, not yet in this view, is looked up in the ledger."""
        try:
            return self.authenticate(headers)
        except ApiError:
            presented = keys_mod.presented_key(headers)
            if presented is None:
                raise
            digest = keys_mod.key_hash(presented)
            if digest in self._by_hash:
                raise  # known here, and revoked
            now = trio.current_time()
            asked = self._unknown.get(digest)
            if asked is not None and now - asked < UNKNOWN_KEY_RECHECK_S:
                raise
            found = None
            with trio.move_on_after(UNKNOWN_KEY_LOOKUP_TIMEOUT_S):
                async with self._lookups:
                    try:
                        found = await self.shared.key_id_by_hash(digest)
                    except StoreError:
                        pass
            if found is None:
                self._unknown.pop(digest, None)
                self._unknown[digest] = now
                while len(self._unknown) > UNKNOWN_KEYS_MAX:
                    del self._unknown[next(iter(self._unknown))]
                raise
            await self.refresh({("key", found)})
            return self.authenticate(headers)

    async def reserve(
        self, key: KeyRecord, estimate: Estimate, request_id: str, model: str, client_request_id: str | None = None,
        prices: Prices | None = None,
    ) -> Hold:
        self._refuse_unpriced(key, model, prices)
        amount_usd = prices.hold_usd(estimate.prompt_tokens, estimate.output_tokens) if prices is not None else 0
        ttl_s = self.config.hold_ttl_s
        req = Reserve(
            f"hold_{uuid.uuid4().hex}", key.id, estimate.total_tokens, ttl_s, amount_usd, request_id, model,
            client_request_id,
        )
        try:
            with trio.fail_after(self.config.ledger_timeout_s):
                result = await self.shared.reserve(req)
        except (StoreError, trio.TooSlowError) as exc:
            self._release_unknown(req.hold_id)  # it may have been placed; releasing one that was not is a no-op
            logs.event("ledger_write_failed", logging.ERROR, request_id=request_id, error=str(exc) or "timed out")
            raise errors.service_unavailable("The budget ledger is unavailable; try again shortly.", 1) from None
        except BaseException:
            self._release_unknown(req.hold_id)
            raise
        if isinstance(result, Refusal):
            raise self._refused(result)
        self._own[result.id] = (result, self.clock() + ttl_s)
        return result

    def output_holds(self, key: KeyRecord) -> str:
        if not getattr(self.shared, "extends", False):
            return "worst_case"  # this ledger cannot grow a hold yet
        return super().output_holds(key)

    async def extend(self, hold: Hold, tokens: int, usd: int = 0) -> Hold | Refusal | None:
        """As BudgetService.extend, judged by the shared ledger (durable in its batch)."""
        entry = self._own.get(hold.id)
        if entry is None:
            return None  # expired here meanwhile
        revoked = self._revoked_mid_reply(hold)  # this view hears of a revocation within ms
        if revoked is not None:
            return revoked
        try:
            with trio.fail_after(self.config.ledger_timeout_s):
                result = await self.shared.extend(hold.id, tokens, usd)
        except (StoreError, trio.TooSlowError) as exc:
            # It may have been applied: the ledger's hold may be larger than what is forwarded, and the
            # charge is capped at what was forwarded, so treating it as refused is safe.
            logs.event("ledger_write_failed", logging.ERROR, hold_id=hold.id, error=str(exc) or "timed out")
            self.metrics.extensions.inc(result="unavailable")
            return None
        if not isinstance(result, Hold):
            self.metrics.extensions.inc(result="refused" if result is not None else "unavailable")
            return result
        grown = dataclasses.replace(entry[0], amount_tokens=result.amount_tokens, amount_usd=result.amount_usd)
        if hold.id in self._own:
            self._own[hold.id] = (grown, entry[1])
        self.metrics.extensions.inc(result="granted")
        return grown

    def _refused(self, refusal: Refusal) -> ApiError:
        if refusal.reason in ("unknown", "revoked"):
            self._changed(f"key:{refusal.principal_id}")  # this view is behind the database: catch up
            self.metrics.refusals.inc(reason="revoked")
            return ApiError(401, "Incorrect or revoked API key.", code="invalid_api_key")
        if refusal.reason == "duplicate":  # a uuid4 collision: not in this universe, but never a double hold
            return errors.service_unavailable("The budget ledger refused the hold id; try again.", 1)
        self.metrics.refusals.inc(reason=refusal.reason if refusal.unit == "tokens" else f"{refusal.reason}_usd")
        if self.alert_rules and refusal.reason in ("balance", "period") and (refusal.principal_kind, refusal.principal_id) in self.ledger.principals:
            self._mark_exhausted(refusal)
        return refusal_error(refusal, self.config.retry_hint_s)

    def _release_unknown(self, hold_id: str) -> None:
        try:
            self.shared.resolve_soon(Resolve(hold_id, "released"))
        except StoreError:
            pass  # closed: the hold (if placed) is this replica's, and a reaper charges it in full

    async def settle(self, hold: Hold, actual_tokens: int, actual_usd: int = 0) -> Resolution | None:
        return await self._resolve_own(hold, "settled", actual_tokens, actual_usd)

    async def release(self, hold: Hold) -> Resolution | None:
        return await self._resolve_own(hold, "released", 0, 0)

    async def charge_hold(self, hold: Hold) -> Resolution | None:
        return await self._resolve_own(hold, "settled", hold.amount_tokens, hold.amount_usd)

    async def _resolve_own(self, hold: Hold, state: str, actual_tokens: int, actual_usd: int) -> Resolution | None:
        # Synchronous to the end, so cancellation cannot interrupt it: the resolution is queued
        # for the next group commit, and a crash before that leaves the hold to a reaper.
        resolution = self._resolve_now(hold, state, actual_tokens, actual_usd, self.clock())
        await trio.lowlevel.cancel_shielded_checkpoint()
        return resolution

    def _resolve_now(self, hold: Hold, state: str, actual_tokens: int, actual_usd: int, now: float) -> Resolution | None:
        if self._own.pop(hold.id, None) is None:
            logs.event("settle_skipped", logging.WARNING, hold_id=hold.id, error="the hold is no longer open here")
            return None
        actual_tokens = min(max(0, int(actual_tokens)), ACTUAL_TOKENS_STORED_MAX)
        actual_usd = min(max(0, int(actual_usd)), ACTUAL_TOKENS_STORED_MAX)
        if state == "settled":
            charged_tokens, charged_usd = min(actual_tokens, hold.amount_tokens), min(actual_usd, hold.amount_usd)
        elif state == "expired":
            charged_tokens, charged_usd = hold.amount_tokens, hold.amount_usd
        else:
            charged_tokens = charged_usd = 0
        resolved = dataclasses.replace(
            hold, state=HoldState(state), charged_tokens=charged_tokens, charged_usd=charged_usd,
            actual_tokens=actual_tokens if state == "settled" else None, resolved_at=now,
        )
        resolution = Resolution(resolved, charged_tokens, max(0, actual_tokens - hold.amount_tokens), charged_usd)
        self._count(resolution)
        if self.alert_rules and (charged_tokens or charged_usd):
            self._alert_dirty.update((("key", hold.key_id), ("account", hold.account_id)))
            self._alert_dirty_event.set()
        try:
            self.shared.resolve_soon(Resolve(hold.id, state, actual_tokens, actual_usd))
        except StoreError as exc:
            logs.event("ledger_write_failed", logging.ERROR, hold_id=hold.id, error=str(exc))
        return resolution

    async def expire_due(self) -> list[Resolution]:
        now = self.clock()
        due = [hold for hold, deadline in self._own.values() if deadline <= now]
        resolutions = []
        for hold in due:
            r = self._resolve_now(hold, "expired", 0, 0, now)
            if r is not None:
                resolutions.append(r)
                logs.event("hold_expired", logging.WARNING, hold_id=hold.id, key_id=hold.key_id,
                           charged_tokens=r.charged_tokens)
        await trio.lowlevel.checkpoint()
        return resolutions

    async def _refresh_for_alerts(self, principals: set[tuple[str, str]]) -> None:
        await self.refresh(principals)

    # --- administration: one transaction each, NOTIFYing the change --------------------------------

    async def create_account(self, account_id: str, caps: Caps) -> None:
        _check_name(account_id, "account")
        if not await self.shared.create_account(account_id, caps, self.clock()):
            raise ApiError(409, f"Account {account_id!r} already exists.", code="conflict")
        await self.refresh({("account", account_id)})

    async def create_key(self, name: str, account_id: str | None, caps: Caps) -> tuple[KeyRecord, str]:
        _check_name(name, "name")
        account_id = account_id or DEFAULT_ACCOUNT
        _check_name(account_id, "account")
        plaintext = keys_mod.generate_key()
        record = KeyRecord(
            keys_mod.new_key_id(), account_id, name, keys_mod.key_hash(plaintext), keys_mod.key_prefix(plaintext),
            self.clock(),
        )
        await self.shared.create_key(record, caps)
        await self.refresh({("key", record.id), ("account", account_id)})
        return record, plaintext

    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> None:
        if not await self.shared.set_caps(kind, principal_id, caps):
            raise ApiError(404, f"No {kind} {principal_id!r}.", code="not_found")
        await self._after_change(kind, principal_id)

    async def top_up(self, kind: str, principal_id: str, tokens: int = 0, usd: int = 0) -> Caps:
        check_top_up(tokens, usd)
        raised = partial(raised_caps, kind, principal_id, tokens=tokens, usd=usd)  # under the row's lock
        caps = await self.shared.update_caps(kind, principal_id, raised)
        await self._after_change(kind, principal_id)
        return caps

    async def revoke(self, key_id: str) -> KeyRecord:
        if not await self.shared.revoke(key_id, self.clock()):
            raise ApiError(404, f"No key {key_id!r}.", code="not_found")
        await self.refresh({("key", key_id)})
        return self.keys[key_id]

    async def _after_change(self, kind: str, principal_id: str) -> None:
        await self.refresh({(kind, principal_id)})
        await self._alert_after_caps(kind, principal_id)

    # --- views: re-read first -------------------------------------------------------------------

    async def usage(self, kind: str, principal_id: str) -> dict[str, Any]:
        return (await self.usages(kind, [principal_id]))[0]

    async def usages(self, kind: str, ids: list[str]) -> list[dict[str, Any]]:
        await self.refresh({(kind, i) for i in ids})
        now = self.clock()
        for i in ids:
            self._principal_or_404(kind, i)
        return [principal_usage(self.ledger, kind, i, now) for i in ids]

    async def key_records(self) -> list[KeyRecord]:
        await self.refresh(None)
        return list(self.keys.values())

    async def key_record(self, key_id: str) -> KeyRecord | None:
        await self.refresh({("key", key_id)})
        return self.keys.get(key_id)

    def account_ids(self) -> list[str]:
        return sorted(pid for kind, pid in self.ledger.principals if kind == "account")

    async def recent(self, key_id: str, limit: int = 20) -> list[dict[str, Any]]:
        return await self.shared.recent(key_id, limit)

    async def spend(self, kind: str, principal_id: str, days: int = SPEND_DAYS) -> dict[str, Any]:
        await self.refresh({(kind, principal_id)})
        self._principal_or_404(kind, principal_id)
        spec = self.ledger.principal(kind, principal_id).caps.period
        zone = spec.timezone if spec is not None else "UTC"
        since, _ = period_bounds(PeriodSpec("daily", zone), self.clock() - (days - 1) * 86400.0)
        rows = await self.shared.spend_buckets(kind, principal_id, since)
        return spend_view(rows, zone, since)


# --- the seam: what a shared ledger gives the service (PgShared; the simulator's model) ------------


@dataclasses.dataclass
class Directory:
    """Principals as the shared ledger has them, with their window and period usage filled in."""

    accounts: list[Principal]
    keys: list[tuple[Principal, KeyRecord]]


class SharedLedger(Protocol):
    """One replica's handle on a ledger shared by replicas: pg_shared.PgShared, or the simulator's model.

    The request path is the judge's: `reserve` places a hold durably or says why not
    (a Refusal, with the extra reasons "unknown", "revoked" and "duplicate" beside the
    pure ledger's), `resolve_soon` queues a resolution for the next commit without a
    checkpoint (a second one of the same hold does nothing). The rest is the directory
    and the alert store; `run_background` calls `on_change("kind:id")` (or "*") when
    another replica changed something.
    """

    shared: bool  # True: the app builds a SharedBudgetService on it
    replica_id: str | None

    async def reserve(self, req: Reserve) -> Hold | Refusal: ...
    def resolve_soon(self, res: Resolve) -> None: ...
    async def read_directory(self, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory: ...
    async def create_account(self, account_id: str, caps: Caps, now: float) -> bool: ...
    async def create_key(self, record: KeyRecord, caps: Caps) -> None: ...
    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> bool: ...
    async def update_caps(self, kind: str, principal_id: str, change: Callable[[Caps | None], Caps]) -> Caps: ...
    async def revoke(self, key_id: str, at: float) -> bool: ...
    async def key_id_by_hash(self, key_hash: bytes) -> str | None: ...
    # An open hold grown by (tokens, usd), or the Refusal, or None (not open); where `extends` is True.
    async def extend(self, hold_id: str, tokens: int, usd: int) -> Hold | Refusal | None: ...
    async def put_meta(self, k: str, v: str) -> None: ...  # server defaults the offline CLI reads
    async def read_meta(self, k: str) -> str | None: ...
    async def recent(self, key_id: str, limit: int) -> list[dict[str, Any]]: ...
    async def spend_buckets(self, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]: ...
    async def query(self, fn: Callable[[Any], Any]) -> Any: ...
    async def commit(self, ops: Any, durable: bool = True) -> None: ...
    async def run_background(
        self, on_change: Callable[[str], None], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...
