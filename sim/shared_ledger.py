"""A model of the shared ledger many cortex replicas stand on, in virtual time.

In production the replicas share PostgreSQL (cortex/budget/pg_ledger.py holds
the proof that `spent + held <= cap` across them; pg_store.py the group
commit; pg_shared.py the directory and the change notices). Here:

  * `SharedDb` is the database, and pure: every method takes `now`. Its
    judge is ONE `cortex.budget.ledger.Ledger`, shared by every replica, so
    the pure admission core decides, and the checker's observer on it sees
    every reserve and resolution of every replica. Beside it: the key
    records, and a row per hold (its replica, its lease, its model) for the
    reaper, `recent` and the spend report.
  * `ReplicaHandle` is one replica's `SharedLedger` (the seam at the end of
    cortex/budget/shared_service.py), the Trio shell around `SharedDb`:
    a writer that group-commits what its tasks queued, one batch per round
    trip; a heartbeat and a reaper; the change notices.

What a handle models, as pg_store.py does it. Reserves are urgent: the
writer takes the first, waits `batch_window_s`, takes everything queued
(up to `batch_max` reserves and resolutions, cut before a resolution of a
hold reserved earlier in the same batch), and sends it: half a round trip
out, judged at the database at the instant it arrives (resolutions first,
then the reserves in order, atomically, as under the rows' locks), half a
round trip back. What arrives meanwhile waits for the next batch: one
connection, one statement at a time. Resolutions (`resolve_soon`) ride with
the next batch, or go on their own `DEFER_FLUSH_S` after they were queued.
A batch on the wire commits even if its replica dies meanwhile (its holds
are then left to the reapers); nothing is queued after the death.

Leases. Every hold carries its replica's id and a lease deadline (`lease_s`
after it was placed); each replica's heartbeat (every `lease_s / 3`) extends
its own open holds' leases, and its reaper (every `lease_s / 2`, jittered
from a seeded generator) orphans other replicas' open holds whose lease has
passed, charged in full, in the order they were placed.

Notices. A directory change commits in one round trip and tells every
OTHER listening replica "kind:id" `notice_delay_s` later (LISTEN/NOTIFY).

Not modelled: connection loss, statement timeouts and the retry of batches
with unknown outcomes (pg_store.py's `_uncertain`); the write-back guard of
`cortex_batch` (the checker plays its part); PostgreSQL's bucketed windows
(the pure ledger's windows judge here); the database's own clock (every
replica reads the one virtual clock, so there is no skew); the alert store
(`query` and `commit` raise StoreError).

The planted bug `local_admission`: the handle judges each reserve against a
ledger of its own (the caps, and only this replica's holds and charges), as
if every replica ran its own SQLite, and the database places what it admits
without judging it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cortex.budget.ledger import Caps, Hold, HoldState, Ledger, Principal, Refusal
from cortex.budget.periods import period_bounds
from cortex.budget.pg_ledger import BATCH_MAX, REAP_BATCH_MAX, Reserve, Resolve
from cortex.budget.service import SPEND_BUCKET_S, KeyRecord
from cortex.budget.shared_service import Directory
from cortex.budget.store import DEFER_FLUSH_S, StoreError

REAP_JITTER = 0.25  # as pg_store.py's: replicas do not reap in step
SHUTDOWN_FLUSH_S = 10.0  # the most a graceful stop waits for the queued work to commit
EXTRA_TEXT = {"unknown": "is not in the ledger", "revoked": "has been revoked", "duplicate": "already has this hold id"}


@dataclass
class HoldRow:
    """A hold as the database keeps it: the ledger's own record (never handed out) and what PG adds."""

    hold: Hold
    replica_id: str
    lease_deadline: float
    model: str | None
    client_request_id: str | None


@dataclass
class DbCounters:
    batches: int = 0
    reserve_batches: int = 0  # batches with a reserve in them
    batch_items_max: int = 0
    reserves: int = 0
    admitted: int = 0
    resolutions: int = 0  # of those sent, the ones that resolved an open hold
    round_trips: int = 0  # batches, directory operations, heartbeats and reaps
    heartbeats: int = 0
    reaped: int = 0
    notices: int = 0  # change notices delivered


class SharedDb:
    """The database every replica shares. Pure: no I/O, no clock, no Trio; every method takes `now`."""

    def __init__(self, ledger: Ledger, lease_s: float) -> None:
        assert lease_s > 0
        self.ledger = ledger
        self.lease_s = lease_s
        self.records: dict[str, KeyRecord] = {}
        self.rows: dict[str, HoldRow] = {}  # every hold ever placed, in the order placed
        self.open: dict[str, HoldRow] = {}  # the open ones, in the order placed
        self.meta: dict[str, str] = {}  # server defaults the offline CLI reads (the meta table)
        self.counters = DbCounters()

    # --- the request path: one batch is one transaction ------------------------------------

    def step(
        self, replica_id: str, resolutions: list[Resolve], reserves: list[Reserve], now: float,
        judged: list[bool] | None = None,
    ) -> tuple[list[bool], list[Hold | Refusal]]:
        """Resolve, then judge the reserves in order; `judged[i]` False: place reserve i without judging it
        (the planted bug's replica judged it itself). Holds come back as copies."""
        assert len(resolutions) <= BATCH_MAX and len(reserves) <= BATCH_MAX
        self.counters.batches += 1
        self.counters.reserve_batches += bool(reserves)
        self.counters.batch_items_max = max(self.counters.batch_items_max, len(resolutions) + len(reserves))
        resolved = [self._resolve(r, now) for r in resolutions]
        placed = [self._reserve(replica_id, q, now, judged is None or judged[i]) for i, q in enumerate(reserves)]
        self.counters.reserves += len(reserves)
        self.counters.admitted += sum(isinstance(p, Hold) for p in placed)
        self.counters.resolutions += sum(resolved)
        return resolved, placed

    def _reserve(self, replica_id: str, q: Reserve, now: float, judge: bool) -> Hold | Refusal:
        if q.hold_id in self.rows:
            return _extra_refusal("duplicate", "key", q.key_id)
        record = self.records.get(q.key_id)
        if record is None or ("key", q.key_id) not in self.ledger.principals:
            return _extra_refusal("unknown", "key", q.key_id)
        if record.revoked_at is not None:
            return _extra_refusal("revoked", "key", q.key_id)
        ledger, skip = self.ledger, self.ledger.fault_skip_cap_check
        ledger.fault_skip_cap_check = skip or not judge
        try:
            result = ledger.reserve(q.hold_id, q.key_id, q.amount_tokens, now, q.ttl_s, q.request_id, q.amount_usd)
        finally:
            ledger.fault_skip_cap_check = skip
        if isinstance(result, Refusal):
            return result
        row = HoldRow(result, replica_id, now + self.lease_s, q.model, q.client_request_id)
        self.rows[q.hold_id] = self.open[q.hold_id] = row
        return dataclasses.replace(result)

    def _resolve(self, res: Resolve, now: float) -> bool:
        """True: it resolved the open hold; False: no such hold, or no longer open (a second resolution)."""
        row = self.open.get(res.hold_id)
        if row is None:
            return False
        hold = row.hold
        if res.state == "settled":
            self.ledger.settle(hold.id, res.actual_tokens, now, res.actual_usd)
        elif res.state == "released":
            self.ledger.release(hold.id, now)
        else:  # expired by its replica: charged in full. The pure ledger expires holds only by their own
            # deadline, all at once; the database resolves this one, now, as cortex_batch does.
            self.ledger._resolve(hold, HoldState.EXPIRED, hold.amount_tokens, now, 0, hold.amount_usd)
        del self.open[hold.id]
        return True

    # --- leases ---------------------------------------------------------------------------

    def heartbeat(self, replica_id: str, now: float) -> int:
        """Extend this replica's open holds' leases to now + lease_s; how many there are."""
        rows = [row for row in self.open.values() if row.replica_id == replica_id]
        for row in rows:
            row.lease_deadline = max(row.lease_deadline, now + self.lease_s)
        self.counters.heartbeats += 1
        return len(rows)

    def reap(self, replica_id: str, now: float, limit: int = REAP_BATCH_MAX) -> list[str]:
        """Orphan other replicas' open holds whose lease has passed, charged in full, in the order placed."""
        assert 0 < limit <= REAP_BATCH_MAX
        due = [row for row in self.open.values() if row.replica_id != replica_id and row.lease_deadline < now][:limit]
        for row in due:
            self.ledger.orphan(row.hold.id, now)
            del self.open[row.hold.id]
        self.counters.reaped += len(due)
        return [row.hold.request_id or row.hold.id for row in due]

    # --- the directory ----------------------------------------------------------------------

    def read_directory(self, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
        """Principals as they are now (None: all), as COPIES: a replica's view never aliases the database's."""
        principals = self.ledger.principals
        if accounts is None:
            accounts = [pid for kind, pid in principals if kind == "account"]
        if keys is None:
            keys = list(self.records)
        return Directory(
            [self._copy("account", pid, now) for pid in accounts if ("account", pid) in principals],
            [(self._copy("key", pid, now), dataclasses.replace(self.records[pid])) for pid in keys if pid in self.records],
        )

    def _copy(self, kind: str, principal_id: str, now: float) -> Principal:
        p = copy.deepcopy(self.ledger.principal(kind, principal_id))
        p.capture = None
        p.roll_period(now)  # on the copy: a read does not move the database's period
        return p

    def create_account(self, account_id: str, caps: Caps) -> bool:
        if ("account", account_id) in self.ledger.principals:
            return False
        self.ledger.add_account(account_id, caps)
        return True

    def create_key(self, record: KeyRecord, caps: Caps) -> list[str]:
        """The key, and its account if new; the changes ("kind:id"). An id already taken changes nothing."""
        changes = []
        if self.create_account(record.account_id, Caps()):
            changes.append(f"account:{record.account_id}")
        if record.id not in self.records:
            self.ledger.add_key(record.id, record.account_id, caps)
            self.records[record.id] = dataclasses.replace(record)
            changes.append(f"key:{record.id}")
        return changes

    def caps_of(self, kind: str, principal_id: str) -> Caps | None:
        p = self.ledger.principals.get((kind, principal_id))
        return p.caps if p is not None else None

    def set_caps(self, kind: str, principal_id: str, caps: Caps, now: float) -> bool:
        """New caps; a window that grew or appeared is rebuilt, and a new period summed, from the resolved holds."""
        if (kind, principal_id) not in self.ledger.principals:
            return False
        p = self.ledger.principal(kind, principal_id)
        old = p.caps
        history = None
        if caps.window_s is not None and (old.window_s is None or caps.window_s > old.window_s):
            history = [(at, t, u) for at, t, u in self._charges(kind, principal_id) if at > now - caps.window_s]
        self.ledger.set_caps(kind, principal_id, caps, history)
        if caps.period is not None and caps.period != old.period:
            start, end = period_bounds(caps.period, now)
            charged = [(t, u) for at, t, u in self._charges(kind, principal_id) if start <= at < end]
            p.set_period_usage(start, end, sum(t for t, _ in charged), sum(u for _, u in charged))
        return True

    def revoke(self, key_id: str, at: float) -> bool:
        record = self.records.get(key_id)
        if record is None:
            return False
        if record.revoked_at is None:
            record.revoked_at = at
        return True

    def recent(self, key_id: str, limit: int) -> list[dict[str, Any]]:
        rows = [row for row in reversed(self.rows.values()) if row.hold.key_id == key_id][:limit]
        return [{
            "hold_id": h.id, "request_id": h.request_id, "client_request_id": row.client_request_id, "model": row.model,
            "held_tokens": h.amount_tokens, "charged_tokens": h.charged_tokens, "actual_tokens": h.actual_tokens,
            "state": h.state.value, "created_at": h.created_at, "resolved_at": h.resolved_at,
            "held_micro_usd": h.amount_usd, "charged_micro_usd": h.charged_usd,
        } for row in rows for h in (row.hold,)]

    def spend_buckets(self, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
        """(model, slot, requests, tokens, micro-USD) of the charges resolved since `since`, by SPEND_BUCKET_S slot."""
        sums: dict[tuple[str | None, int], list[int]] = {}
        for row in self.rows.values():
            h = row.hold
            if _of(h, kind) != principal_id or h.resolved_at is None or h.resolved_at < since:
                continue
            if h.charged_tokens or h.charged_usd:
                cell = sums.setdefault((row.model, math.floor(h.resolved_at / SPEND_BUCKET_S)), [0, 0, 0])
                cell[0] += 1
                cell[1] += h.charged_tokens
                cell[2] += h.charged_usd
        return [(model, slot, n, t, u) for (model, slot), (n, t, u) in sums.items()]

    def _charges(self, kind: str, principal_id: str) -> list[tuple[float, int, int]]:
        return sorted(
            (h.resolved_at, h.charged_tokens, h.charged_usd) for row in self.rows.values() for h in (row.hold,)
            if _of(h, kind) == principal_id and h.resolved_at is not None and (h.charged_tokens or h.charged_usd)
        )

    # --- at the end -----------------------------------------------------------------------------

    def states(self) -> tuple[int, dict[str, str]]:
        """Open holds, and each request's hold state (the store's view for the checker's end)."""
        return len(self.open), {row.hold.request_id or hold_id: row.hold.state.value for hold_id, row in self.rows.items()}


def _of(hold: Hold, kind: str) -> str:
    return hold.key_id if kind == "key" else hold.account_id


def _extra_refusal(reason: str, kind: str, principal_id: str) -> Refusal:
    """The refusals only the database can give (pg_ledger.py's `_one_refusal`)."""
    return Refusal(reason, kind, principal_id, f"The {kind} {principal_id} {EXTRA_TEXT[reason]}.", None, True)


# --- one replica's handle --------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """How a replica reaches the database."""

    round_trip_s: float = 0.001
    notice_delay_s: float = 0.001
    batch_window_s: float = 0.0
    batch_max: int = 512

    def __post_init__(self) -> None:
        assert self.round_trip_s >= 0 and self.notice_delay_s >= 0 and self.batch_window_s >= 0
        assert 0 < self.batch_max <= BATCH_MAX


class _Waiter:
    __slots__ = ("event", "result", "abandoned")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.abandoned = False  # its task was cancelled before the answer came


_RESERVE, _RESOLVE = "reserve", "resolve"


@dataclass
class _Item:
    kind: str
    payload: Any
    waiter: _Waiter | None
    queued_at: float


@dataclass
class SharedLedgerModel:
    """The database and every replica's handle on it."""

    db: SharedDb
    link: LinkSpec
    seed: int = 0
    handles: list["ReplicaHandle"] = field(default_factory=list)

    def handle(self, replica_id: str, local_admission: bool = False) -> "ReplicaHandle":
        assert all(h.replica_id != replica_id for h in self.handles), "a replica id names one life"
        h = ReplicaHandle(self, replica_id, random.Random(f"{self.seed}:reaper:{replica_id}"), local_admission)
        self.handles.append(h)
        return h

    def notify(self, source: "ReplicaHandle", changes: list[str], now: float) -> None:
        """Tell every other listening replica, `notice_delay_s` after the commit."""
        for h in self.handles:
            if h is not source and h.listening and not h.dead and not h.closed:
                for change in changes:
                    h.inbox.append((now + self.link.notice_delay_s, change))
                h.inbox_bell.set()


class ReplicaHandle:
    """One replica's SharedLedger on the model: see the module's docstring."""

    shared = True  # the app builds a SharedBudgetService on it

    def __init__(self, model: SharedLedgerModel, replica_id: str, rng: random.Random, local_admission: bool) -> None:
        self.model = model
        self.db = model.db
        self.link = model.link
        self.replica_id: str | None = replica_id
        self._rng = rng
        self.dead = False  # crashed: nothing it does from now on reaches the database
        self.closed = False  # stopped gracefully
        self.listening = False
        self.inbox: deque[tuple[float, str]] = deque()  # change notices on their way here: (due, "kind:id")
        self.inbox_bell = trio.Event()
        self._queue: deque[_Item] = deque()
        self._urgent = 0  # reserves in the queue
        self._bell = trio.Event()
        # The planted bug: this replica's own ledger, judged instead of the database's.
        self.local: Ledger | None = Ledger() if local_admission else None

    # --- the request path ------------------------------------------------------------------

    async def reserve(self, req: Reserve) -> Hold | Refusal:
        """Queued for the next group commit; cancelled while waiting, a hold placed for it is released."""
        self._check_usable()
        waiter = _Waiter()
        self._queue.append(_Item(_RESERVE, req, waiter, trio.current_time()))
        self._urgent += 1
        self._bell.set()
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.event.is_set():
                waiter.abandoned = True  # the answer's arrival releases a hold placed for nobody
            elif isinstance(waiter.result, Hold):
                self._defer(Resolve(waiter.result.id, "released"))
            raise
        return waiter.result

    def resolve_soon(self, res: Resolve) -> None:
        """Queued without a checkpoint; rides with the next batch, at most DEFER_FLUSH_S later. Lost if dead."""
        if self.dead:
            return  # kill -9: never written; a reaper charges the hold in full
        self._check_usable()
        self._defer(res)

    def _defer(self, res: Resolve) -> None:
        if self.dead or self.closed:
            return
        if not self._queue:
            self._bell.set()  # the writer's deadline starts now
        self._queue.append(_Item(_RESOLVE, res, None, trio.current_time()))

    def _check_usable(self) -> None:
        if self.dead:
            raise StoreError("this replica is dead")
        if self.closed:
            raise StoreError("the ledger store is closed")

    # --- the writer ------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._until_due()
            if self.link.batch_window_s:
                await trio.sleep(self.link.batch_window_s)
            await self._send(self._take_batch())

    async def _until_due(self) -> None:
        """Until a reserve is queued, or the oldest queued resolution has waited DEFER_FLUSH_S."""
        while not self._urgent:
            if self._queue:
                deadline = self._queue[0].queued_at + DEFER_FLUSH_S
                if trio.current_time() >= deadline:
                    return
                with trio.move_on_at(deadline):
                    await self._bell.wait()
            else:
                await self._bell.wait()
            self._bell = trio.Event()

    def _take_batch(self) -> list[_Item]:
        """The longest queued prefix that is one valid batch (pg_store.py's `_cut`)."""
        batch: list[_Item] = []
        reserved: set[str] = set()
        n_reserve = n_resolve = 0
        limit = self.link.batch_max
        while self._queue:
            item = self._queue[0]
            if item.kind == _RESERVE:
                if n_reserve == limit:
                    break
                n_reserve += 1
                reserved.add(item.payload.hold_id)
                self._urgent -= 1
            else:
                if n_resolve == limit or item.payload.hold_id in reserved:
                    break
                n_resolve += 1
            batch.append(self._queue.popleft())
        return batch

    async def _send(self, batch: list[_Item]) -> None:
        """One statement: out, judged at the database on arrival, back. Shielded, like a writer thread: a
        batch on the wire commits even if this replica dies meanwhile; its answers then reach nobody."""
        if not batch:
            return
        resolutions = [item.payload for item in batch if item.kind == _RESOLVE]
        reserves = [item for item in batch if item.kind == _RESERVE]
        judged = self._judge_locally(resolutions, [item.payload for item in reserves]) if self.local is not None else None
        with trio.CancelScope(shield=True):
            await trio.sleep(self.link.round_trip_s / 2)
            _, placed = self.db.step(self.replica_id or "", resolutions, [item.payload for item in reserves],
                                     trio.current_time(), judged)
            self.db.counters.round_trips += 1
            await trio.sleep(self.link.round_trip_s / 2)
        if self.local is not None:
            self._local_undo(reserves, placed, judged)
        if self.dead:
            return
        for item, result in zip(reserves, placed, strict=True):
            waiter = item.waiter
            assert waiter is not None
            if waiter.abandoned and isinstance(result, Hold):
                self._defer(Resolve(result.id, "released"))
            waiter.result = result
            waiter.event.set()

    # --- the planted bug: admission against this replica's own view ------------------------------

    def _judge_locally(self, resolutions: list[Resolve], reserves: list[Reserve]) -> list[bool]:
        """Resolve and judge on the local ledger; a reserve it refuses is sent to the database to be
        judged (and refused) there, one it admits is placed there unjudged."""
        local, now = self.local, trio.current_time()
        assert local is not None
        for res in resolutions:
            hold = local.holds.get(res.hold_id)
            if hold is None:
                continue  # judged by the database, or already resolved
            if res.state == "released":
                local.release(hold.id, now)
            elif res.state == "expired":
                local.settle(hold.id, hold.amount_tokens, now, hold.amount_usd)
            else:
                local.settle(hold.id, res.actual_tokens, now, res.actual_usd)
        judged = []
        for q in reserves:
            self._local_principals(q.key_id)
            if ("key", q.key_id) not in local.principals:
                judged.append(True)
                continue
            result = local.reserve(q.hold_id, q.key_id, q.amount_tokens, now, q.ttl_s, q.request_id, q.amount_usd)
            judged.append(isinstance(result, Refusal))
        return judged

    def _local_principals(self, key_id: str) -> None:
        """The key and its account on the local ledger, with their caps as the database had them first."""
        local, db = self.local, self.db.ledger
        assert local is not None
        if ("key", key_id) in local.principals or ("key", key_id) not in db.principals:
            return
        account_id = db.key_accounts[key_id]
        if ("account", account_id) not in local.principals:
            local.add_account(account_id, db.principal("account", account_id).caps)
        local.add_key(key_id, account_id, db.principal("key", key_id).caps)

    def _local_undo(self, reserves: list[_Item], placed: list[Hold | Refusal], judged: list[bool] | None) -> None:
        """A locally admitted hold the database refused (unknown, revoked) is released locally."""
        assert self.local is not None and judged is not None
        for item, result, was_judged in zip(reserves, placed, judged, strict=True):
            if not was_judged and isinstance(result, Refusal) and item.payload.hold_id in self.local.holds:
                self.local.release(item.payload.hold_id, trio.current_time())

    # --- background -------------------------------------------------------------------------------

    async def run_background(
        self, on_change: Callable[[str], None], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The writer, the heartbeat, the reaper and the change listener; until cancelled."""
        self._check_usable()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_forever)
            nursery.start_soon(self._heartbeat_forever)
            nursery.start_soon(self._reap_forever)
            nursery.start_soon(self._listen_forever, on_change)
            self.listening = True
            task_status.started()

    async def _heartbeat_forever(self) -> None:
        while True:
            await trio.sleep(self.db.lease_s / 3)
            await self._round_trip(lambda now: self.db.heartbeat(self.replica_id or "", now))

    async def _reap_forever(self) -> None:
        while True:
            await trio.sleep(self.db.lease_s / 2 * self._rng.uniform(1 - REAP_JITTER, 1 + REAP_JITTER))
            await self._round_trip(lambda now: self.db.reap(self.replica_id or "", now))

    async def _listen_forever(self, on_change: Callable[[str], None]) -> None:
        while True:
            while not self.inbox:
                await self.inbox_bell.wait()
                self.inbox_bell = trio.Event()
            due, change = self.inbox[0]
            await trio.sleep_until(due)
            self.inbox.popleft()
            self.db.counters.notices += 1
            on_change(change)

    async def close(self) -> None:
        """A graceful stop: what is queued goes in a last batch (bounded), then nothing more."""
        if self.dead or self.closed:
            return
        with trio.move_on_after(SHUTDOWN_FLUSH_S, shield=True):
            while self._queue:
                await self._send(self._take_batch())
        self.closed = True

    # --- the directory: one round trip each ---------------------------------------------------------

    async def _round_trip(self, fn: Callable[[float], Any]) -> Any:
        """`fn(now)` at the database, half a round trip away; shielded, as a worker thread's transaction."""
        self._check_usable()
        with trio.CancelScope(shield=True):
            await trio.sleep(self.link.round_trip_s / 2)
            result = fn(trio.current_time())
            self.db.counters.round_trips += 1
            await trio.sleep(self.link.round_trip_s / 2)
        self._check_usable()
        return result

    async def _change(self, fn: Callable[[float], tuple[Any, list[str]]]) -> Any:
        """A directory transaction that tells the other replicas what it changed, at its commit."""
        def commit(now: float) -> Any:
            result, changes = fn(now)
            self.model.notify(self, changes, now)
            return result

        return await self._round_trip(commit)

    async def read_directory(self, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
        return await self._round_trip(lambda _: self.db.read_directory(now, accounts, keys))

    async def create_account(self, account_id: str, caps: Caps, now: float) -> bool:
        def write(_: float) -> tuple[bool, list[str]]:
            created = self.db.create_account(account_id, caps)
            return created, [f"account:{account_id}"] if created else []

        return await self._change(write)

    async def create_key(self, record: KeyRecord, caps: Caps) -> None:
        await self._change(lambda _: (None, self.db.create_key(record, caps)))

    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> bool:
        def write(now: float) -> tuple[bool, list[str]]:
            done = self.db.set_caps(kind, principal_id, caps, now)
            return done, [f"{kind}:{principal_id}"] if done else []

        return await self._change(write)

    async def update_caps(self, kind: str, principal_id: str, change: Callable[[Caps | None], Caps]) -> Caps:
        """Read-modify-write in one transaction; `change` may raise to change nothing."""
        def write(now: float) -> tuple[Caps, list[str]]:
            caps = change(self.db.caps_of(kind, principal_id))
            done = self.db.set_caps(kind, principal_id, caps, now)
            return caps, [f"{kind}:{principal_id}"] if done else []

        return await self._change(write)

    async def revoke(self, key_id: str, at: float) -> bool:
        def write(_: float) -> tuple[bool, list[str]]:
            done = self.db.revoke(key_id, at)
            return done, [f"key:{key_id}"] if done else []

        return await self._change(write)

    async def key_id_by_hash(self, key_hash: bytes) -> str | None:
        return await self._round_trip(
            lambda _: next((r.id for r in self.db.records.values() if r.key_hash == key_hash), None)
        )

    async def put_meta(self, k: str, v: str) -> None:
        await self._round_trip(lambda _: self.db.meta.__setitem__(k, v))

    async def read_meta(self, k: str) -> str | None:
        return await self._round_trip(lambda _: self.db.meta.get(k))

    async def recent(self, key_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._round_trip(lambda _: self.db.recent(key_id, limit))

    async def spend_buckets(self, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
        return await self._round_trip(lambda _: self.db.spend_buckets(kind, principal_id, since))

    # --- the alert store: not modelled ----------------------------------------------------------------

    async def query(self, fn: Callable[[Any], Any]) -> Any:
        raise StoreError("alerts are not modelled by the simulator's shared ledger")

    async def commit(self, ops: Any, durable: bool = True) -> None:
        raise StoreError("alerts are not modelled by the simulator's shared ledger")
