"""A replica's async face of the shared PostgreSQL ledger: one writer thread, one connection, group commit.

`PgAdmission` is to `PgLedger` (cortex/budget/pg_ledger.py, which holds the
proof of `spent + held <= cap` across replicas) what `ThreadedStore` is to
SQLite. Trio tasks queue reserves, extensions and resolutions; ONE writer
thread owning ONE autocommit connection drains everything queued into ONE
`PgLedger.step(resolutions, reserves, None, extensions)` (one statement: one
transaction, one round trip; `now=None`: the database's clock, the one clock
of all replicas), then wakes every waiter with one `run_sync_soon` through
the Trio token.

Order. Everything goes through one queue, read in order; a deferred
resolution wakes the writer but does not start a batch before an item
someone awaits arrives or `DEFER_FLUSH_S` has passed. `step` runs a
batch's resolutions, then its extensions, then its reserves, so an item that
would see a different ledger in that order than in the queue's cuts the
batch there, and it and what follows go in the next one: a resolution of a
hold reserved or extended EARLIER IN THE SAME batch (a cancelled reserve,
then its release; a slice, then the settlement), and an extension of a hold
reserved earlier in it.

Cancellation. A reserve cancelled while it waits may or may not be placed:
the caller must release it, and `release` of a hold that was never placed
is a no-op (the database reports False). The store also releases, by
itself, a hold whose waiter was cancelled before the answer came, so a
caller that forgets cannot leak it. An extension cancelled while it waits
may or may not have grown its hold; the hold stays the caller's, open, to
settle or release as ever (the store releases nothing for it).

Failures. A lost connection, a serialization failure, a deadlock or a
statement timeout fails the batch's waiters with StoreError (the caller
answers 503, as on SQLite); the writer reconnects with backoff, failing
what arrives meanwhile (within the backoff, 2 s at most). Such a batch may have committed (its reply
was lost), so:
  * every reserve in it is released by the store on the next batch (a no-op
    when it was never placed), before anything queued later, so a retry of
    the same hold id finds the release first;
  * every resolution in it is retried with the next batches until one
    commits (a second resolution reports False and does nothing);
  * a retried reserve whose hold id was in such a batch and that comes back
    `duplicate` counts as placed only if the holds table says so (open,
    this replica's, the same key and amounts); otherwise StoreError: fail
    safe, never a hold the database does not have;
  * every extension in it fails with StoreError and is NOT retried (a
    second extension would grow the hold twice). It may have been applied:
    the caller must treat it as NOT granted for forwarding (stream no tokens
    past the hold it knew before), while the hold in the database may be
    that much larger. That costs only room, never money: settlement charges
    min(actual, hold), and actual counts only the tokens the client received,
    so the client is never charged for the slice it did not get; the extra
    room is freed when the hold is settled or released. A caller that asks
    again (a new `extend` of the same slice) may grow it twice over, which
    errs the same safe way. (A hold that is never settled, because it expires
    or its replica dies and it is reaped, is charged in full as ever: then
    at its grown amount, the upper bound of what may have been served.)
Any other database error (a bug the function's own assertions caught) is
certain to have rolled back: the batch is rerun one item at a time, so one
bad item fails alone (ThreadedStore's rule).

Background (`run_background`, in the app's nursery): a heartbeat every
`lease_s / 3`, through the writer (it is the request path's own proof of
life: when the writer is stuck, the leases should lapse), extending this
replica's open holds' leases and its `replicas` row; and a reaper every
`lease_s / 2` (jittered), on a SECOND connection in a worker thread, so a
slow reap of many orphans stays off the request path (the lock order of
pg_ledger.py, holds < accounts < keys, rules out deadlock between the two).
A reap that fails on a hold it cannot resolve (a bug the batch's checks
caught) is done again one hold per transaction, stepping past that one and
logging it, so one bad hold cannot keep every dead replica's holds open.

The replica id names this process's life: a reaper skips its own id, and
the heartbeat extends every open hold under it, so an id must not be
reused while holds of an earlier life are open (`open` refuses it).
"""

from __future__ import annotations

import logging
import queue
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import psycopg
import trio
from psycopg import errors as pg_errors

from cortex.budget import pg_schema
from cortex.budget.ledger import Hold, Refusal
from cortex.budget.pg_ledger import (
    BATCH_MAX, REAP_BATCH_MAX, UNRESOLVABLE_ERRORS, Counters, Extend, PgLedger, Reserve, Resolve,
)
from cortex.budget.store import DEFER_FLUSH_S, StoreError

log = logging.getLogger("cortex")

SHUTDOWN_FLUSH_S = 10.0  # the most a shutdown waits for the queued work to commit
STATEMENT_TIMEOUT_MS = 10_000  # a batch stuck on a lock fails instead of holding its waiters forever
RECONNECT_BACKOFF_S = (0.05, 2.0)  # first and longest wait between reconnection attempts
UNCERTAIN_MAX = 65_536  # hold ids of failed batches remembered for a retry's `duplicate` check
REAP_JITTER = 0.25  # the reaper's interval varies by +-25%, so replicas do not reap in step
# Failures after which the connection (or the batch) may simply be tried again: the batch's waiters fail,
# its resolutions are kept for the next batch. The last four are a ledger that takes no batch at all for
# now (a standby after a failover, a revoked grant, a schema being replaced), not a bad item.
TRANSIENT_ERRORS = (
    psycopg.OperationalError, pg_errors.SerializationFailure, pg_errors.DeadlockDetected,
    pg_errors.LockNotAvailable, pg_errors.QueryCanceled, pg_errors.ReadOnlySqlTransaction,
    pg_errors.InsufficientPrivilege, pg_errors.UndefinedFunction, pg_errors.UndefinedTable,
)

CommitObserver = Callable[[int, float], None]


class _Waiter:
    __slots__ = ("event", "error", "result", "abandoned", "places")

    def __init__(self, places: bool = False) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self.abandoned = False  # its task was cancelled; set and read only in Trio's thread
        self.places = places  # a reserve's: a Hold answered to nobody is released (an extension's is not)

    @property
    def unwanted_hold(self) -> Hold | None:
        """The hold this waiter placed, if its task is gone: the store releases it."""
        return self.result if self.places and isinstance(self.result, Hold) else None


# Queue items: (kind, payload, waiter or None).
_RESERVE, _EXTEND, _RESOLVE, _HEARTBEAT, _FLUSH = "reserve", "extend", "resolve", "heartbeat", "flush"
_STOP = object()


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class PgAdmission:
    """One replica's admission through the shared ledger; build it with `PgAdmission.open`."""

    def __init__(self, url: str, replica_id: str, lease_s: float, batch_max: int, on_commit: CommitObserver | None) -> None:
        assert replica_id and lease_s > 0 and 0 < batch_max <= BATCH_MAX
        self.url = url
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.batch_max = batch_max
        self._on_commit = on_commit
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._carry: list[tuple[str, Any, _Waiter | None]] = []  # the writer's retries, ahead of the queue (writer only)
        self._uncertain: dict[str, None] = {}  # hold ids whose batch failed with an unknown outcome (writer only)
        self._thread = threading.Thread(target=self._run, name=f"cortex-pg-writer-{replica_id}", daemon=True)
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._ledger: PgLedger | None = None
        self._maintenance: PgLedger | None = None
        self._stopped = False
        self.batches = 0
        self.failed_batches = 0
        self.heartbeats = 0
        self.reaped = 0

    # --- life ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, replica_id: str | None = None, lease_s: float = 30.0, batch_max: int = 512,
        on_commit: CommitObserver | None = None,
    ) -> AsyncIterator["PgAdmission"]:
        """Check the schema, register the replica, start the writer; on exit flush (bounded), stop, join, close."""
        try:
            pg_schema.ledger_url(url)
        except pg_schema.LedgerUrlError as exc:
            raise StoreError(str(exc)) from None
        store = cls(url, replica_id or default_replica_id(), lease_s, batch_max, on_commit)
        store._thread.start()
        await trio.to_thread.run_sync(store._opened.wait)
        if store._open_error is not None:
            await trio.to_thread.run_sync(store._thread.join)
            raise StoreError(str(store._open_error)) from None
        log.info("ledger replica %s on %s (lease %.1f s)", store.replica_id, pg_schema.redact(url), lease_s)
        try:
            yield store
        finally:
            with trio.move_on_after(SHUTDOWN_FLUSH_S, shield=True) as scope:
                try:
                    await store._submit(_FLUSH, None)  # carries the deferred resolutions (no round trip if none)
                except StoreError as exc:
                    log.error("ledger flush at shutdown failed: %s", exc)
                store._stopped = True
                store._queue.put(_STOP)
                await trio.to_thread.run_sync(store._thread.join, abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.error("ledger writer of replica %s did not stop within %.0f s", store.replica_id, SHUTDOWN_FLUSH_S)

    # --- the request path ------------------------------------------------------------------

    async def reserve(self, req: Reserve) -> Hold | Refusal:
        """Place a hold or say why not, durably, in the next group commit.

        Cancelled while waiting, the hold may or may not have been placed:
        release it (a no-op when it was not); the store releases it too.
        """
        return await self._submit(_RESERVE, req)

    async def extend(self, ext: Extend) -> Hold | Refusal | None:
        """Grow an open hold by its next slice, durably, in the next group commit, or say why not.

        The Hold with its new amounts when every amount cap of its key and
        account allows it (concurrency is not judged: the request is in flight);
        the Refusal a reserve of the extra amounts would get otherwise; None when
        the hold is not open (settled, released, reaped, unknown), and nothing
        changed. StoreError (or a cancellation) means the outcome is unknown:
        treat the slice as NOT granted, and settle the hold as usual; its charge
        is capped at what was actually delivered (see the module's Failures).
        """
        return await self._submit(_EXTEND, ext)

    async def resolve(self, res: Resolve, durable: bool = False) -> bool | None:
        """Settle, release or expire a hold.

        `durable=False` returns once queued (None): the resolution rides
        along with the next batch, at most `DEFER_FLUSH_S` later; a crash
        before then leaves the hold to a reaper, which charges it in full.
        `durable=True` waits for the commit: True resolved, False already
        resolved (or never placed).
        """
        if durable:
            return await self._submit(_RESOLVE, res)
        self._check_open()
        self._defer(res)
        await trio.lowlevel.checkpoint()
        return None

    def resolve_soon(self, res: Resolve) -> None:
        """Queue a resolution without a checkpoint (settlement paths that must not be interrupted)."""
        self._check_open()
        self._defer(res)

    async def release(self, hold_id: str, durable: bool = False) -> bool | None:
        return await self.resolve(Resolve(hold_id, "released"), durable)

    # --- background --------------------------------------------------------------------------

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat and the reaper; runs until cancelled (in the app's nursery)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeat_forever)
            nursery.start_soon(self.reap_forever)
            task_status.started()

    async def heartbeat_forever(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self.heartbeat()
            except StoreError as exc:
                log.error("ledger heartbeat of replica %s failed: %s", self.replica_id, exc)

    async def heartbeat(self) -> int:
        """Extend this replica's open holds' leases now; how many there are."""
        count = await self._submit(_HEARTBEAT, None)
        self.heartbeats += 1
        return count

    async def reap_forever(self) -> None:
        try:
            while True:
                await trio.sleep(self.lease_s / 2 * random.uniform(1 - REAP_JITTER, 1 + REAP_JITTER))
                try:
                    await self.reap()
                except StoreError as exc:
                    log.error("ledger reap by replica %s failed: %s", self.replica_id, exc)
        finally:
            if self._maintenance is not None:
                self._maintenance.conn.close()
                self._maintenance = None

    async def reap(self) -> list[str]:
        """Orphan other replicas' holds past their lease, charged in full, on the maintenance connection."""
        reaped = await trio.to_thread.run_sync(self._reap_sync)
        if reaped:
            self.reaped += len(reaped)
            log.warning("replica %s reaped %d holds of dead replicas, charged in full: %s", self.replica_id,
                        len(reaped), ", ".join(reaped[:10]) + (" ..." if len(reaped) > 10 else ""))
        return reaped

    def _reap_sync(self) -> list[str]:
        try:
            if self._maintenance is None or self._maintenance.conn.closed:
                self._maintenance = PgLedger(self._connect(), self.replica_id, self.lease_s)
            reaped: list[str] = []
            while True:
                try:
                    ids = self._maintenance.reap(None, REAP_BATCH_MAX)
                except UNRESOLVABLE_ERRORS:
                    # One hold the batch cannot resolve fails the whole reap: step past it, one at a time.
                    more, failed = self._maintenance.reap_one_by_one(None)
                    for hold_id, why in failed.items():
                        log.error("replica %s cannot reap hold %s: %s", self.replica_id, hold_id, why)
                    return reaped + more
                reaped += ids
                if len(ids) < REAP_BATCH_MAX:
                    return reaped
        except psycopg.Error as exc:
            if self._maintenance is not None:
                self._maintenance.conn.close()
                self._maintenance = None
            raise StoreError(pg_schema.redact_text(str(exc))) from None

    # --- figures ------------------------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        """The request path's (the writer's) database costs; the reaper's are `maintenance_counters`."""
        return self._ledger.counters if self._ledger is not None else Counters()

    @property
    def maintenance_counters(self) -> Counters:
        return self._maintenance.counters if self._maintenance is not None else Counters()

    @property
    def round_trips(self) -> int:
        return self.counters.round_trips

    @property
    def transactions(self) -> int:
        return self.counters.transactions

    # --- plumbing (Trio side) -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopped:
            raise StoreError("the ledger store is closed")

    def _defer(self, res: Resolve) -> None:
        self._queue.put((_RESOLVE, res, None))

    async def _submit(self, kind: str, payload: Any) -> Any:
        self._check_open()
        waiter = _Waiter(places=kind == _RESERVE)
        self._queue.put((kind, payload, waiter))
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.event.is_set():
                waiter.abandoned = True  # the wake-up releases a hold placed for nobody
            elif (hold := waiter.unwanted_hold) is not None:  # answered, but too late for its task
                self._defer(Resolve(hold.id, "released"))
            raise
        if waiter.error is not None:
            raise StoreError(str(waiter.error)) from None
        return waiter.result

    # --- the writer thread ------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return pg_schema.connect(self.url, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")

    def _open_connection(self) -> PgLedger:
        conn = self._connect()
        try:
            pg_schema.check(conn)
            row = conn.execute(
                "SELECT COUNT(*) FROM holds WHERE replica_id = %s AND state = 'open'", (self.replica_id,)
            ).fetchone()
            if row[0]:
                raise StoreError(
                    f"replica id {self.replica_id!r} still has {row[0]} open holds from an earlier life: start with"
                    " another replica id (the default is unique), or wait until another replica reaps them"
                )
            conn.execute(
                "INSERT INTO replicas AS r (id, started_at, heartbeat_at)"
                " VALUES (%s, extract(epoch FROM clock_timestamp()), extract(epoch FROM clock_timestamp()))"
                " ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                (self.replica_id,),
            )
        except BaseException:
            conn.close()
            raise
        return PgLedger(conn, self.replica_id, self.lease_s)

    def _run(self) -> None:
        try:
            self._ledger = self._open_connection()
        except (psycopg.Error, pg_schema.SchemaError, StoreError) as exc:
            self._open_error = StoreError(pg_schema.redact_text(str(exc)))
            self._opened.set()
            return
        self._opened.set()
        backoff_s = RECONNECT_BACKOFF_S[0]
        try:
            while True:
                items, stop = self._next_batch()
                while items:
                    if self._ledger.conn.closed:
                        if not self._reconnect(items):
                            if not stop:
                                time.sleep(backoff_s)
                            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_S[1])
                            break
                        backoff_s = RECONNECT_BACKOFF_S[0]
                    try:
                        items = self._execute(items)
                    except Exception:  # the writer outlives its own bugs: these items fail, the next batch runs
                        log.exception("ledger replica %s: a batch failed in the writer", self.replica_id)
                        self._fail(items, StoreError("the ledger writer failed on this batch"), sent=True)
                        items = []
                if stop:
                    lost = len(self._carry)
                    if lost:
                        log.error("ledger replica %s stopped with %d resolutions unwritten: reapers charge those"
                                  " holds in full", self.replica_id, lost)
                    return
        finally:
            self._ledger.conn.close()

    def _next_batch(self) -> tuple[list[tuple[str, Any, _Waiter | None]], bool]:
        """Wait for an item someone awaits, or the oldest deferred one's deadline; then drain the queue.

        One queue, read in order: a release queued after its reserve is never ahead of it.
        """
        items, self._carry = self._carry, []  # the writer's own: retries of a failed batch, ahead of later items
        since = time.monotonic() if items else None
        stop = False
        urgent = False
        while not urgent:
            timeout = None if since is None else max(0.0, since + DEFER_FLUSH_S - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            items.append(item)
            urgent = item[2] is not None
            if since is None:
                since = time.monotonic()
        while not stop and len(items) < 2 * self.batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
            else:
                items.append(item)
        return items, stop

    def _reconnect(self, items: list[tuple[str, Any, _Waiter | None]]) -> bool:
        try:
            self._ledger.conn = self._connect()
            log.warning("ledger replica %s reconnected", self.replica_id)
            return True
        except psycopg.Error as exc:
            self._fail(items, StoreError(f"the ledger is unreachable: {pg_schema.redact_text(str(exc))}"), sent=False)
            return False

    def _execute(self, items: list[tuple[str, Any, _Waiter | None]]) -> list[tuple[str, Any, _Waiter | None]]:
        """Run one batch (a prefix of `items`); return what is left for the next."""
        batch, rest = _cut(items, self.batch_max)
        resolutions = [(p, w) for k, p, w in batch if k == _RESOLVE]
        reserves = [(p, w) for k, p, w in batch if k == _RESERVE]
        extensions = [(p, w) for k, p, w in batch if k == _EXTEND]
        others = [(k, w) for k, _, w in batch if k in (_HEARTBEAT, _FLUSH)]
        started = time.perf_counter()
        try:
            resolved, placed, extended = self._ledger.step(
                [p for p, _ in resolutions], [p for p, _ in reserves], None, [p for p, _ in extensions])
        except psycopg.Error as exc:
            self._failed_batch(batch, exc)
            return rest
        except Exception as exc:  # committed, but its answer cannot be read (a bug, a zone unknown here): as if lost
            log.exception("ledger batch of %d: its answer could not be read", len(batch))
            self._fail(batch, StoreError(f"the ledger's answer could not be read: {exc!r}"), sent=True)
            return rest
        # Committed: from here on nothing may fail the batch, or it would be run twice.
        placed = [self._verify_duplicate(q, r) for (q, _), r in zip(reserves, placed)]
        heartbeat: int | StoreError | None = None
        if any(k == _HEARTBEAT for k, _ in others):
            try:
                heartbeat = self._ledger.heartbeat(None)
            except psycopg.Error as exc:
                heartbeat = StoreError(pg_schema.redact_text(str(exc)))
        for (_, w), ok in zip(resolutions, resolved):
            if w is not None:
                w.result = ok
        for (_, w), result in zip(reserves, placed):
            if isinstance(result, StoreError):
                w.error = result
            else:
                w.result = result
        for (_, w), grown in zip(extensions, extended):
            w.result = grown
        for k, w in others:
            if k == _HEARTBEAT and isinstance(heartbeat, StoreError):
                w.error = heartbeat
            else:
                w.result = heartbeat if k == _HEARTBEAT else None
        self.batches += 1
        self._wake([w for _, _, w in batch if w is not None], len(resolutions) + len(reserves) + len(extensions),
                   time.perf_counter() - started)
        return rest

    def _verify_duplicate(self, q: Reserve, result: Hold | Refusal) -> Hold | Refusal | StoreError:
        """A `duplicate` for a hold id whose earlier batch failed: placed only if the holds table says so."""
        if not isinstance(result, Refusal) or result.reason != "duplicate" or q.hold_id not in self._uncertain:
            return result
        del self._uncertain[q.hold_id]
        try:
            row = self._ledger.conn.execute(
                "SELECT state, key_id, account_id, amount_tokens, amount_usd, replica_id, created_at, expires_at"
                " FROM holds WHERE id = %s", (q.hold_id,),
            ).fetchone()
        except psycopg.Error as exc:  # unknown again: release it (a no-op if it was never placed)
            self._carry.append((_RESOLVE, Resolve(q.hold_id, "released"), None))
            return StoreError(f"hold {q.hold_id}: cannot tell whether an earlier attempt placed it"
                              f" ({pg_schema.redact_text(str(exc))}); it is released, retry with a new hold id")
        finally:
            self._ledger.counters.round_trips += 1
            self._ledger.counters.transactions += 1
        if row is not None and row[0] == "open" and (row[5], row[1], row[3], row[4]) == (
            self.replica_id, q.key_id, q.amount_tokens, q.amount_usd,
        ):
            return Hold(q.hold_id, q.key_id, row[2], q.amount_tokens, row[6], row[7], q.request_id, amount_usd=q.amount_usd)
        return StoreError(f"hold {q.hold_id}: an earlier attempt's outcome was unknown, and the store released it;"
                          " retry with a new hold id")

    def _failed_batch(self, batch: list[tuple[str, Any, _Waiter | None]], exc: psycopg.Error) -> None:
        self.failed_batches += 1
        reason = pg_schema.redact_text(str(exc)).strip() or type(exc).__name__
        lost = self._ledger.conn.closed  # the reply is lost: the batch may have committed
        if lost or isinstance(exc, TRANSIENT_ERRORS):
            log.error("ledger batch of %d failed (%s); %s", len(batch), reason, "reconnecting" if lost else "will retry")
            self._fail(batch, StoreError(f"the ledger is unavailable: {reason}"), sent=lost)
            return
        # Certain to have rolled back, and not transient: one item at a time, so a bad one fails alone.
        if len(batch) > 1:
            log.error("ledger batch of %d failed (%s); rerunning its items one by one", len(batch), reason)
            for item in batch:
                self._execute([item])
            return
        kind, payload, waiter = batch[0]
        log.error("ledger %s %r failed: %s", kind, payload, reason)
        if waiter is not None:
            waiter.error = StoreError(reason)
            self._wake([waiter], 0, 0.0)

    def _fail(self, batch: list[tuple[str, Any, _Waiter | None]], error: StoreError, sent: bool) -> None:
        """Fail the waiters; keep the resolutions for the next batch and, if the batch was sent, release its reserves.

        Extensions are not kept: one that may have committed must not grow its hold again (the module's Failures).
        """
        again: list[tuple[str, Any, _Waiter | None]] = []
        for kind, payload, _ in batch:
            if kind == _RESOLVE:
                again.append((_RESOLVE, payload, None))
            elif kind == _RESERVE and sent:
                again.append((_RESOLVE, Resolve(payload.hold_id, "released"), None))
                self._uncertain[payload.hold_id] = None
                while len(self._uncertain) > UNCERTAIN_MAX:
                    self._uncertain.pop(next(iter(self._uncertain)))
        self._carry = again + self._carry  # ahead of anything queued later, a retry of the same id included
        waiters = [w for _, _, w in batch if w is not None]
        for w in waiters:
            w.error = error
        self._wake(waiters, 0, 0.0)

    def _wake(self, waiters: list[_Waiter], batch_size: int, commit_s: float) -> None:
        def wake() -> None:
            for waiter in waiters:
                if waiter.abandoned and (hold := waiter.unwanted_hold) is not None:
                    self._defer(Resolve(hold.id, "released"))  # after its reserve, in the one queue
                waiter.event.set()
            if self._on_commit is not None and batch_size:
                self._on_commit(batch_size, commit_s)

        try:
            self._token.run_sync_soon(wake)
        except trio.RunFinishedError:
            pass


def _cut(items: Sequence[tuple[str, Any, _Waiter | None]], batch_max: int) -> tuple[list, list]:
    """The longest prefix that is one valid batch: at most `batch_max` reserves, extensions and resolutions each,
    and nothing `step`'s order (resolutions, extensions, reserves) would run ahead of an item before it in the
    queue that it depends on: no resolution of a hold reserved or extended earlier in it, and no extension of a
    hold reserved earlier in it."""
    reserved: set[str] = set()
    extended: set[str] = set()
    n_reserve = n_extend = n_resolve = 0
    for i, (kind, payload, _) in enumerate(items):
        if kind == _RESERVE:
            if n_reserve == batch_max:
                return list(items[:i]), list(items[i:])
            n_reserve += 1
            reserved.add(payload.hold_id)
        elif kind == _EXTEND:
            if n_extend == batch_max or payload.hold_id in reserved:
                return list(items[:i]), list(items[i:])
            n_extend += 1
            extended.add(payload.hold_id)
        elif kind == _RESOLVE:
            if n_resolve == batch_max or payload.hold_id in reserved or payload.hold_id in extended:
                return list(items[:i]), list(items[i:])
            n_resolve += 1
    return list(items), []
