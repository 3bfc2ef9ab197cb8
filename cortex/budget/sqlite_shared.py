"""The data dir's SQLite as a ledger shared by the processes of one host (`cortex serve --workers N`).

The same cross-replica protocol as on PostgreSQL, on one file in WAL mode:
every batch of reserves and resolutions is ONE `BEGIN IMMEDIATE` transaction,
which holds SQLite's write lock from its first read to its commit, so the
batches of all processes are serialised and each reads what its
predecessors committed. Inside it the pure `Ledger` is the judge: the
touched principals are built from their rows (caps, spent), their open holds
(held, in flight), their charges in the trailing window and in the current
period, and each reserve is judged in order against what those before it
left. So `spent + held <= cap` holds across processes, with the pure core's
own arithmetic. A hold leaves `open` only through `UPDATE ... WHERE state =
'open'`, once.

Group commit: reserves and resolutions queued while a batch is in the
writer thread go in the next one (one transaction, one fsync). Holds carry
the worker's `replica_id` and a `lease_deadline` that a heartbeat extends;
another worker's reaper charges a dead worker's holds in full (orphaned)
once the lease has passed. Administrative changes bump a generation in
`meta`, which every worker polls (`POLL_S`) to re-read its view.

The view of the directory, the alerts and the reports are the service's,
through the same `SharedLedger` seam as PostgreSQL's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from cortex.budget.ledger import Caps, Hold, Ledger, Principal, Refusal
from cortex.budget.periods import period_bounds
from cortex.budget.pg_ledger import Reserve, Resolve
from cortex.budget.service import KeyRecord, charges_since, recent_requests, spend_buckets
from cortex.budget.shared_service import EVERYTHING, Directory
from cortex.budget.store import (
    CAPS_FIELDS, DEFER_FLUSH_S, TABLES, StoreError, ThreadedStore, caps_of, caps_row, period_charges, read_meta,
)

log = logging.getLogger("cortex")

POLL_S = 0.2  # how often a worker looks for another's administrative change
REAP_BATCH_MAX = 1024
GENERATION = "directory_generation"


class _Waiter:
    __slots__ = ("event", "result", "error", "abandoned")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class SqliteShared:
    """One worker's handle on the host's shared SQLite ledger; build it with `SqliteShared.open`."""

    shared = True
    extends = True  # holds grow in place (incremental output holds)

    def __init__(self, store: ThreadedStore, replica_id: str, lease_s: float) -> None:
        self.store = store
        self.replica_id = replica_id
        self.lease_s = lease_s
        self._reserves: list[tuple[Reserve, _Waiter]] = []
        self._extensions: list[tuple[tuple[str, int, int], _Waiter]] = []
        self._resolutions: list[Resolve] = []
        self._wake = trio.Event()
        self._closed = False
        self.batches = 0
        self.reaped = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: str | Path, replica_id: str | None = None, lease_s: float = 30.0, synchronous: str = "normal",
        on_commit: Any = None,
    ) -> AsyncIterator["SqliteShared"]:
        replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        async with ThreadedStore.open(Path(path), synchronous, on_commit) as store:
            shared = cls(store, replica_id, lease_s)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(shared._batch_forever)
                    try:
                        yield shared
                    finally:
                        await shared._flush()
                        nursery.cancel_scope.cancel()
            finally:
                shared._closed = True

    # --- the request path -----------------------------------------------------------------

    async def reserve(self, req: Reserve) -> Hold | Refusal:
        if self._closed:
            raise StoreError("the ledger store is closed")
        waiter = _Waiter()
        self._reserves.append((req, waiter))
        self._wake.set()
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.event.is_set():
                waiter.abandoned = True  # the batch releases a hold placed for nobody
            elif isinstance(waiter.result, Hold):
                self.resolve_soon(Resolve(waiter.result.id, "released"))
            raise
        if waiter.error is not None:
            raise StoreError(str(waiter.error)) from None
        return waiter.result

    async def extend(self, hold_id: str, tokens: int, usd: int) -> Hold | Refusal | None:
        """Grow an open hold, judged and made durable in the next batch (ahead of its reserves)."""
        if self._closed:
            raise StoreError("the ledger store is closed")
        waiter = _Waiter()
        self._extensions.append(((hold_id, tokens, usd), waiter))
        self._wake.set()
        await waiter.event.wait()  # cancelled, it may still apply: the charge stays capped at what was forwarded
        if waiter.error is not None:
            raise StoreError(str(waiter.error)) from None
        return waiter.result

    def resolve_soon(self, res: Resolve) -> None:
        if self._closed:
            raise StoreError("the ledger store is closed")
        self._resolutions.append(res)
        self._wake.set()

    async def resolve(self, res: Resolve, durable: bool = False) -> bool | None:
        self.resolve_soon(res)
        await trio.lowlevel.checkpoint()
        return None

    async def _batch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._reserves and not self._extensions:  # resolutions alone: let them gather
                with trio.move_on_after(DEFER_FLUSH_S):
                    while not self._reserves and not self._extensions:
                        await self._wake.wait()
                        self._wake = trio.Event()
            await self._run_batch()

    async def _flush(self) -> None:
        with trio.move_on_after(10, shield=True):
            while self._reserves or self._resolutions or self._extensions:
                await self._run_batch()

    async def _run_batch(self) -> None:
        reserves, self._reserves = self._reserves, []
        resolutions, self._resolutions = self._resolutions, []
        extensions, self._extensions = self._extensions, []
        if not reserves and not resolutions and not extensions:
            return
        replica_id, lease_s = self.replica_id, self.lease_s
        now = time.time()
        try:
            _, placed, grown = await self.store.query(
                lambda conn: step(conn, resolutions, [q for q, _ in reserves], now, replica_id, lease_s,
                                  [e for e, _ in extensions])
            )
        except StoreError as exc:
            # Rolled back whole (SQLite commits or does not): nothing was placed, grown or resolved.
            self._resolutions = resolutions + self._resolutions  # retried with the next batch
            for _, waiter in (*reserves, *extensions):
                waiter.error = exc
                waiter.event.set()
            log.error("shared ledger batch failed: %s", exc)
            await trio.sleep(0.05)
            return
        self.batches += 1
        for (_, waiter), result in zip(extensions, grown):
            waiter.result = result
            waiter.event.set()
        for (_, waiter), result in zip(reserves, placed):
            waiter.result = result
            if waiter.abandoned and isinstance(result, Hold):
                self.resolve_soon(Resolve(result.id, "released"))
            waiter.event.set()

    # --- the directory ----------------------------------------------------------------------

    async def read_directory(self, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
        return await self.store.query(lambda conn: read_directory(conn, now, accounts, keys))

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """`fn` in one IMMEDIATE transaction that also bumps the directory's generation."""
        def run(conn: sqlite3.Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute(
                    "INSERT INTO meta (k, v) VALUES (?, '1') ON CONFLICT (k) DO UPDATE SET v = CAST(v AS INTEGER) + 1",
                    (GENERATION,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

        return await self.store.query(run)

    async def create_account(self, account_id: str, caps: Caps, now: float) -> bool:
        return await self._write(lambda conn: _insert_principal(conn, "accounts", {"id": account_id, "created_at": now}, caps))

    async def create_key(self, record: KeyRecord, caps: Caps) -> None:
        def write(conn: sqlite3.Connection) -> None:
            _insert_principal(conn, "accounts", {"id": record.account_id, "created_at": record.created_at}, Caps())
            _insert_principal(conn, "keys", {
                "id": record.id, "account_id": record.account_id, "name": record.name, "key_hash": record.key_hash,
                "key_prefix": record.prefix, "created_at": record.created_at,
            }, caps)

        await self._write(write)

    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> bool:
        return await self._write(lambda conn: conn.execute(
            f"UPDATE {TABLES[kind]} SET {', '.join(f'{f} = ?' for f in CAPS_FIELDS)} WHERE id = ?",
            (*caps_row(caps), principal_id),
        ).rowcount == 1)

    async def update_caps(self, kind: str, principal_id: str, change: Callable[[Caps | None], Caps]) -> Caps:
        def write(conn: sqlite3.Connection) -> Caps:
            conn.row_factory = sqlite3.Row
            try:
                row = conn.execute(f"SELECT * FROM {TABLES[kind]} WHERE id = ?", (principal_id,)).fetchone()
            finally:
                conn.row_factory = None
            caps = change(caps_of(row) if row is not None else None)
            conn.execute(
                f"UPDATE {TABLES[kind]} SET {', '.join(f'{f} = ?' for f in CAPS_FIELDS)} WHERE id = ?",
                (*caps_row(caps), principal_id),
            )
            return caps

        return await self._write(write)

    async def revoke(self, key_id: str, at: float) -> bool:
        return await self._write(lambda conn: conn.execute(
            "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (at, key_id)
        ).rowcount == 1)

    async def key_id_by_hash(self, key_hash: bytes) -> str | None:
        row = await self.store.query(lambda conn: conn.execute("SELECT id FROM keys WHERE key_hash = ?", (key_hash,)).fetchone())
        return row[0] if row is not None else None

    async def put_meta(self, k: str, v: str) -> None:
        await self.store.query(lambda conn: _autocommit(
            conn, "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (k, v)
        ))

    async def read_meta(self, k: str) -> str | None:
        return await self.store.query(lambda conn: read_meta(conn, k))

    async def recent(self, key_id: str, limit: int) -> list[dict[str, Any]]:
        return await self.store.query(lambda conn: recent_requests(conn, key_id, limit))

    async def spend_buckets(self, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
        return await self.store.query(lambda conn: spend_buckets(conn, kind, principal_id, since))

    # --- the alert code's store face ------------------------------------------------------------

    async def query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self.store.query(fn)

    async def commit(self, ops: Sequence[Any], durable: bool = True) -> None:
        await self.store.commit(ops)

    # --- background ---------------------------------------------------------------------------------

    async def run_background(
        self, on_change: Callable[[str], None], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The heartbeat, the reaper and the change poller; until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat_forever)
            nursery.start_soon(self._reap_forever)
            generation = await self.store.query(lambda conn: read_meta(conn, GENERATION))
            nursery.start_soon(self._poll_forever, on_change, generation)
            task_status.started()

    async def _heartbeat_forever(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            await self.heartbeat()

    async def heartbeat(self) -> int:
        until, me = time.time() + self.lease_s, self.replica_id
        try:
            return await self.store.query(lambda conn: _autocommit(
                conn, "UPDATE holds SET lease_deadline = ? WHERE replica_id = ? AND state = 'open'", (until, me)
            ))
        except StoreError as exc:
            log.error("ledger heartbeat of worker %s failed: %s", me, exc)
            return 0

    async def _reap_forever(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 2)
            await self.reap()

    async def reap(self) -> list[str]:
        """Other workers' open holds past their lease (or from a single-process cortex that died), charged in full."""
        me = self.replica_id
        try:
            reaped = await self.store.query(lambda conn: reap(conn, time.time(), me))
        except StoreError as exc:
            log.error("ledger reap by worker %s failed: %s", me, exc)
            return []
        if reaped:
            self.reaped += len(reaped)
            log.warning("worker %s reaped %d holds of dead workers, charged in full", me, len(reaped))
        return reaped

    async def _poll_forever(self, on_change: Callable[[str], None], seen: str | None) -> None:
        while True:
            await trio.sleep(POLL_S)
            try:
                now = await self.store.query(lambda conn: read_meta(conn, GENERATION))
            except StoreError:
                continue
            if now != seen:
                seen = now
                on_change(EVERYTHING)


# --- one batch, in one IMMEDIATE transaction (the writer thread) -------------------------------------


def step(
    conn: sqlite3.Connection, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float,
    replica_id: str, lease_s: float, extensions: Sequence[tuple[str, int, int]] = (),
) -> tuple[list[bool], list[Hold | Refusal], list[Hold | Refusal | None]]:
    """Resolve; then judge, in order, the extensions (a started reply's next slice goes first) and the
    reserves, placing what fits, under SQLite's write lock; commit once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        resolved = [_resolve(conn, res, now) for res in resolutions]
        grown, placed = _judge(conn, extensions, reserves, now, replica_id, lease_s) if reserves or extensions else ([], [])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return resolved, placed, grown


def _resolve(conn: sqlite3.Connection, res: Resolve, now: float, state: str | None = None) -> bool:
    row = conn.execute(
        "SELECT key_id, account_id, amount_tokens, amount_usd FROM holds WHERE id = ? AND state = 'open'", (res.hold_id,)
    ).fetchone()
    if row is None:
        return False  # resolved already (or reaped), or never placed
    key_id, account_id, held_tokens, held_usd = row
    state = state or res.state
    if state == "settled":
        charged = (min(res.actual_tokens, held_tokens), min(res.actual_usd, held_usd))
    elif state in ("expired", "orphaned"):
        charged = (held_tokens, held_usd)
    else:
        charged = (0, 0)
    conn.execute(
        "UPDATE holds SET state = ?, charged_tokens = ?, charged_usd = ?, actual_tokens = ?, resolved_at = ?"
        " WHERE id = ? AND state = 'open'",
        (state, *charged, res.actual_tokens if state == "settled" else None, now, res.hold_id),
    )
    if charged != (0, 0):
        for table, pid in (("keys", key_id), ("accounts", account_id)):
            conn.execute(f"UPDATE {table} SET spent_tokens = spent_tokens + ?, spent_usd = spent_usd + ? WHERE id = ?",
                         (*charged, pid))
    return True


def _judge(
    conn: sqlite3.Connection, extensions: Sequence[tuple[str, int, int]], reserves: Sequence[Reserve], now: float,
    replica_id: str, lease_s: float,
) -> tuple[list[Hold | Refusal | None], list[Hold | Refusal]]:
    conn.row_factory = sqlite3.Row
    try:
        open_holds = {r["id"]: r for r in (
            conn.execute("SELECT * FROM holds WHERE id = ? AND state = 'open'", (hold_id,)).fetchone()
            for hold_id, _, _ in extensions
        ) if r is not None}
    finally:
        conn.row_factory = None
    key_ids = sorted({q.key_id for q in reserves} | {r["key_id"] for r in open_holds.values()})
    keys = {r["id"]: r for r in _rows(conn, "keys", key_ids)}
    accounts = {r["id"]: r for r in _rows(conn, "accounts", sorted({r["account_id"] for r in keys.values()}))}
    judge = Ledger()
    for row in accounts.values():
        judge.principals[("account", row["id"])] = _principal(conn, "account", row, now)
    for row in keys.values():
        judge.principals[("key", row["id"])] = _principal(conn, "key", row, now)
        judge.key_accounts[row["id"]] = row["account_id"]
    grown: list[Hold | Refusal | None] = []
    for hold_id, tokens, usd in extensions:
        row = open_holds.get(hold_id)
        if row is None or row["key_id"] not in keys:
            grown.append(None)
            continue
        if keys[row["key_id"]]["revoked_at"] is not None:  # revoked mid-reply: no more output is paid for
            grown.append(Refusal("revoked", "key", row["key_id"], f"The key {row['key_id']} has been revoked.", None, True))
            continue
        if hold_id not in judge.holds:  # its amounts are in its principals' held already (read from open holds)
            judge.holds[hold_id] = Hold(row["id"], row["key_id"], row["account_id"], row["amount_tokens"],
                                        row["created_at"], row["expires_at"], row["request_id"],
                                        amount_usd=row["amount_usd"])
        result = judge.extend(hold_id, tokens, now, usd)
        if isinstance(result, Hold):
            conn.execute("UPDATE holds SET amount_tokens = ?, amount_usd = ? WHERE id = ? AND state = 'open'",
                         (result.amount_tokens, result.amount_usd, hold_id))
            result = dataclasses.replace(result)  # a copy: the judge's is gone with the batch
        grown.append(result)
    placed: list[Hold | Refusal] = []
    for q in reserves:
        row = keys.get(q.key_id)
        if row is None:
            placed.append(Refusal("unknown", "key", q.key_id, f"The key {q.key_id} is not in the ledger.", None, True))
            continue
        if row["revoked_at"] is not None:
            placed.append(Refusal("revoked", "key", q.key_id, f"The key {q.key_id} has been revoked.", None, True))
            continue
        result = judge.reserve(q.hold_id, q.key_id, q.amount_tokens, now, q.ttl_s, q.request_id, q.amount_usd)
        if isinstance(result, Hold):
            conn.execute(
                "INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, request_id,"
                " model, client_request_id, amount_usd, replica_id, lease_deadline)"
                " VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                (result.id, result.key_id, result.account_id, result.amount_tokens, result.created_at, result.expires_at,
                 q.request_id, q.model, q.client_request_id, result.amount_usd, replica_id, now + lease_s),
            )
        placed.append(result)
    return grown, placed


def reap(conn: sqlite3.Connection, now: float, replica_id: str) -> list[str]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM holds WHERE state = 'open' AND (replica_id IS NULL OR replica_id <> ?)"
            " AND (lease_deadline IS NULL OR lease_deadline < ?) ORDER BY id LIMIT ?",
            (replica_id, now, REAP_BATCH_MAX),
        )]
        for hold_id in ids:
            _resolve(conn, Resolve(hold_id, "expired"), now, state="orphaned")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return ids


# --- reading principals as the judge and the views need them ------------------------------------------


def read_directory(conn: sqlite3.Connection, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
    conn.execute("BEGIN")  # one snapshot (WAL: readers never wait)
    try:
        account_view = [_principal(conn, "account", r, now) for r in _rows(conn, "accounts", accounts)]
        key_view = [
            (_principal(conn, "key", r, now),
             KeyRecord(r["id"], r["account_id"], r["name"], bytes(r["key_hash"]), r["key_prefix"], r["created_at"],
                       r["revoked_at"]))
            for r in _rows(conn, "keys", keys)
        ]
    finally:
        conn.execute("COMMIT")
    return Directory(account_view, key_view)


def _rows(conn: sqlite3.Connection, table: str, ids: list[str] | None) -> list[sqlite3.Row]:
    conn.row_factory = sqlite3.Row
    try:
        if ids is None:
            return conn.execute(f"SELECT * FROM {table}").fetchall()
        if not ids:
            return []
        return conn.execute(
            f"SELECT * FROM {table} WHERE id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
    finally:
        conn.row_factory = None


def _principal(conn: sqlite3.Connection, kind: str, row: sqlite3.Row, now: float) -> Principal:
    """A principal as the ledger has it now: caps and spend from its row, held and in flight from its
    open holds, window usage from its charges in the window, period usage from its charges in the period."""
    caps = caps_of(row)
    column = "key_id" if kind == "key" else "account_id"
    held_tokens, held_usd, in_flight = conn.execute(
        f"SELECT COALESCE(SUM(amount_tokens), 0), COALESCE(SUM(amount_usd), 0), COUNT(*) FROM holds"
        f" WHERE {column} = ? AND state = 'open'", (row["id"],)
    ).fetchone()
    p = Principal(row["id"], kind, caps, spent_tokens=row["spent_tokens"], held_tokens=held_tokens, in_flight=in_flight,
                  spent_usd=row["spent_usd"], held_usd=held_usd)
    if caps.window_s is not None and p.window is not None:
        for at, tokens, usd in charges_since(conn, kind, row["id"], now - caps.window_s):
            p.window.add(at, tokens, usd)
    if caps.period is not None:
        start, end = period_bounds(caps.period, now)
        p.set_period_usage(start, end, *period_charges(conn, kind, row["id"], start, end))
    return p


def _insert_principal(conn: sqlite3.Connection, table: str, fields: dict[str, Any], caps: Caps) -> bool:
    columns = [*fields, *CAPS_FIELDS]
    cursor = conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) ON CONFLICT (id) DO NOTHING",
        (*fields.values(), *caps_row(caps)),
    )
    return cursor.rowcount == 1


def _autocommit(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    with conn:
        return conn.execute(sql, params).rowcount
