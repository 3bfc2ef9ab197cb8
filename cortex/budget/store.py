"""The durable ledger: SQLite (WAL) owned by one writer thread, with group commit.

The pure `Ledger` decides; this module makes its decisions durable. Trio
tasks hand *ops* to the writer thread through a queue; the thread drains
everything queued, applies it in one transaction, commits once, and wakes
every waiter with one call through the Trio token. Under load one fsync
covers hundreds of reserves and settlements.

`SyncStore` runs the same schema and the same `apply` in the calling task,
for the simulator (no threads on the simulated path) and the offline CLI.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from cortex.budget.ledger import Caps, Hold
from cortex.budget.periods import PeriodSpec, period_bounds

SCHEMA_VERSION = "4"
_MONEY_AND_PERIOD_COLUMNS = (
    "balance_usd INTEGER", "window_usd INTEGER", "period TEXT", "period_timezone TEXT", "period_anchor_day INTEGER",
    "period_tokens INTEGER", "period_usd INTEGER", "spent_usd INTEGER NOT NULL DEFAULT 0",
)
_PRINCIPAL_INDEXES = (
    # A calendar period's usage is summed from the holds resolved in it.
    "CREATE INDEX IF NOT EXISTS holds_key_resolved ON holds(key_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
    "CREATE INDEX IF NOT EXISTS holds_account_resolved ON holds(account_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
)
# Holds of the workers sharing the file (`cortex serve --workers N`, cortex/budget/sqlite_shared.py): whose
# they are and until when, and what each principal holds open, found without scanning its history.
_SHARED_COLUMNS_AND_INDEXES = (
    "ALTER TABLE holds ADD COLUMN replica_id TEXT",
    "ALTER TABLE holds ADD COLUMN lease_deadline REAL",
    "ALTER TABLE accounts ADD COLUMN output_holds TEXT",  # a principal's output-hold policy (NULL: inherited)
    "ALTER TABLE keys ADD COLUMN output_holds TEXT",
    "CREATE INDEX IF NOT EXISTS holds_open_key ON holds(key_id) WHERE state = 'open'",
    "CREATE INDEX IF NOT EXISTS holds_open_account ON holds(account_id) WHERE state = 'open'",
)
# Each step takes a ledger from the version before it to the next one.
MIGRATIONS = {
    "1": ("ALTER TABLE holds ADD COLUMN client_request_id TEXT",),
    "2": (
        *(f"ALTER TABLE {table} ADD COLUMN {column}" for table in ("accounts", "keys") for column in _MONEY_AND_PERIOD_COLUMNS),
        "ALTER TABLE holds ADD COLUMN amount_usd INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE holds ADD COLUMN charged_usd INTEGER NOT NULL DEFAULT 0",
        *_PRINCIPAL_INDEXES,
    ),
    "3": _SHARED_COLUMNS_AND_INDEXES,
}
_CAPS_COLUMNS = (
    "balance_tokens INTEGER, window_tokens INTEGER, window_s REAL, max_concurrency INTEGER, "
    + ", ".join(_MONEY_AND_PERIOD_COLUMNS) + ", output_holds TEXT"
)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    {_CAPS_COLUMNS},
    spent_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    {_CAPS_COLUMNS},
    spent_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    amount_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    charged_tokens INTEGER NOT NULL DEFAULT 0,
    actual_tokens INTEGER,
    resolved_at REAL,
    request_id TEXT,  -- cortex's own id, unique per request
    model TEXT,
    client_request_id TEXT,  -- the client's x-request-id, if it sent one; not unique
    amount_usd INTEGER NOT NULL DEFAULT 0,  -- micro-USD
    charged_usd INTEGER NOT NULL DEFAULT 0,
    replica_id TEXT,  -- the worker that opened it, when workers share the file
    lease_deadline REAL  -- after which another worker may reap it
);
CREATE INDEX IF NOT EXISTS holds_open ON holds(state) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS holds_resolved_at ON holds(resolved_at);
CREATE INDEX IF NOT EXISTS holds_key_created ON holds(key_id, created_at);
"""
SCHEMA_INDEXES = ";\n".join((*_PRINCIPAL_INDEXES, *_SHARED_COLUMNS_AND_INDEXES[4:])) + ";"

BATCH_OPS_MAX = 4096
DEFER_FLUSH_S = 0.05  # the longest a settlement waits for a durable commit to ride along with
SYNCHRONOUS_MODES = ("off", "normal", "full", "extra")


class StoreError(Exception):
    pass


# --- ops: what the ledger decided, as data -----------------------------------------


@dataclass(frozen=True)
class PutAccount:
    id: str
    caps: Caps
    created_at: float


@dataclass(frozen=True)
class PutKey:
    id: str
    account_id: str
    name: str
    key_hash: bytes
    key_prefix: str
    caps: Caps
    created_at: float


@dataclass(frozen=True)
class SetCaps:
    kind: str  # "key" or "account"
    id: str
    caps: Caps


@dataclass(frozen=True)
class PutMeta:
    """A server setting the offline CLI must agree with (the default period zone)."""

    k: str
    v: str


@dataclass(frozen=True)
class RevokeKey:
    id: str
    at: float


@dataclass(frozen=True)
class OpenHold:
    id: str
    key_id: str
    account_id: str
    amount_tokens: int
    created_at: float
    expires_at: float
    request_id: str | None = None
    model: str | None = None
    client_request_id: str | None = None
    amount_usd: int = 0

    @classmethod
    def of(cls, hold: Hold, model: str | None = None, client_request_id: str | None = None) -> "OpenHold":
        return cls(hold.id, hold.key_id, hold.account_id, hold.amount_tokens, hold.created_at, hold.expires_at,
                   hold.request_id, model, client_request_id, hold.amount_usd)


@dataclass(frozen=True)
class ResolveHold:
    id: str
    key_id: str
    account_id: str
    state: str
    charged_tokens: int
    actual_tokens: int | None
    resolved_at: float
    charged_usd: int = 0


@dataclass(frozen=True)
class ExtendHold:
    """An open hold's new amounts after an extension (an incremental output hold's next slice)."""

    id: str
    amount_tokens: int
    amount_usd: int = 0


Op = PutAccount | PutKey | SetCaps | RevokeKey | OpenHold | ResolveHold | ExtendHold | PutMeta

TABLES = {"key": "keys", "account": "accounts"}


CAPS_FIELDS = (
    "balance_tokens", "window_tokens", "window_s", "max_concurrency", "balance_usd", "window_usd", "period",
    "period_timezone", "period_anchor_day", "period_tokens", "period_usd", "output_holds",
)
_CAPS_PLACEHOLDERS = ", ".join("?" * len(CAPS_FIELDS))
_CAPS_ASSIGN = ", ".join(f"{name} = ?" for name in CAPS_FIELDS)


def caps_row(caps: Caps) -> tuple[Any, ...]:
    spec = caps.period
    return (
        caps.balance_tokens, caps.window_tokens, caps.window_s, caps.max_concurrency, caps.balance_usd, caps.window_usd,
        spec.kind if spec else None, spec.timezone if spec else None, spec.anchor_day if spec else None,
        caps.period_tokens, caps.period_usd, caps.output_holds,
    )


def apply(conn: sqlite3.Connection, op: Op) -> None:
    """Apply one op inside the caller's transaction."""
    if isinstance(op, OpenHold):
        conn.execute(
            "INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state, request_id, model,"
            " client_request_id, amount_usd)"
            " VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)",
            (op.id, op.key_id, op.account_id, op.amount_tokens, op.created_at, op.expires_at, op.request_id, op.model,
             op.client_request_id, op.amount_usd),
        )
    elif isinstance(op, ResolveHold):
        cursor = conn.execute(
            "UPDATE holds SET state = ?, charged_tokens = ?, actual_tokens = ?, resolved_at = ?, charged_usd = ?"
            " WHERE id = ? AND state = 'open'",
            (op.state, op.charged_tokens, op.actual_tokens, op.resolved_at, op.charged_usd, op.id),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"hold {op.id} is not open in the store")
        if op.charged_tokens or op.charged_usd:
            charged = (op.charged_tokens, op.charged_usd)
            conn.execute(
                "UPDATE keys SET spent_tokens = spent_tokens + ?, spent_usd = spent_usd + ? WHERE id = ?", (*charged, op.key_id)
            )
            conn.execute(
                "UPDATE accounts SET spent_tokens = spent_tokens + ?, spent_usd = spent_usd + ? WHERE id = ?",
                (*charged, op.account_id),
            )
    elif isinstance(op, ExtendHold):
        cursor = conn.execute(
            "UPDATE holds SET amount_tokens = ?, amount_usd = ? WHERE id = ? AND state = 'open'",
            (op.amount_tokens, op.amount_usd, op.id),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"hold {op.id} is not open in the store")
    elif isinstance(op, PutAccount):
        conn.execute(
            f"INSERT INTO accounts (id, created_at, {', '.join(CAPS_FIELDS)}) VALUES (?, ?, {_CAPS_PLACEHOLDERS})",
            (op.id, op.created_at, *caps_row(op.caps)),
        )
    elif isinstance(op, PutKey):
        conn.execute(
            f"INSERT INTO keys (id, account_id, name, key_hash, key_prefix, created_at, {', '.join(CAPS_FIELDS)})"
            f" VALUES (?, ?, ?, ?, ?, ?, {_CAPS_PLACEHOLDERS})",
            (op.id, op.account_id, op.name, op.key_hash, op.key_prefix, op.created_at, *caps_row(op.caps)),
        )
    elif isinstance(op, SetCaps):
        conn.execute(f"UPDATE {TABLES[op.kind]} SET {_CAPS_ASSIGN} WHERE id = ?", (*caps_row(op.caps), op.id))
    elif isinstance(op, RevokeKey):
        conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (op.at, op.id))
    elif isinstance(op, PutMeta):
        conn.execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (op.k, op.v))
    elif hasattr(op, "apply_sql"):  # ops of a subsystem that owns its tables (alerts)
        op.apply_sql(conn)
    else:  # pragma: no cover - exhaustive
        raise TypeError(f"unknown op {op!r}")


def apply_all(conn: sqlite3.Connection, ops: Sequence[Op]) -> None:
    with conn:  # one transaction
        for op in ops:
            apply(conn, op)


# --- opening, recovery and loading --------------------------------------------------


def connect(path: str | Path, synchronous: str = "normal") -> sqlite3.Connection:
    """Open (creating if needed) a ledger database in WAL mode."""
    assert synchronous in SYNCHRONOUS_MODES
    if str(path) != ":memory:":
        # Owner-only from the first byte: key hashes and usage are no one else's
        # business. SQLite gives the -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    from cortex.budget.alert_delivery import ALERTS_SCHEMA  # its own module's tables; imported late (no cycle)

    with conn:
        conn.executescript(SCHEMA + ALERTS_SCHEMA)
        row = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
        if row is None:
            conn.executescript(SCHEMA_INDEXES)
            conn.execute("INSERT INTO meta (k, v) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            return conn
    version = row[0]
    if version in MIGRATIONS:
        _migrate(conn, version)
    elif version != SCHEMA_VERSION:
        raise StoreError(f"ledger schema version {version} is not supported (expected {SCHEMA_VERSION})")
    return conn


def _column_exists(conn: sqlite3.Connection, statement: str) -> bool:
    """An `ALTER TABLE t ADD COLUMN c ...` whose column is there already: a table the
    schema script created at this version (an old ledger lacking it) has every column."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    return words[5] in {row[1] for row in conn.execute(f"PRAGMA table_info({words[2]})")}


def _migrate(conn: sqlite3.Connection, version: str) -> None:
    """Every step in one transaction: a crash part-way leaves the old version, whole.

    (sqlite3 does not open a transaction for DDL by itself; SQLite's DDL is transactional when asked.)
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        while version in MIGRATIONS:
            for statement in MIGRATIONS[version]:
                if not _column_exists(conn, statement):
                    conn.execute(statement)
            version = str(int(version) + 1)
            conn.execute("UPDATE meta SET v = ? WHERE k = 'schema_version'", (version,))
        if version != SCHEMA_VERSION:
            raise StoreError(f"ledger schema version {version} is not supported (expected {SCHEMA_VERSION})")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@dataclass
class Snapshot:
    accounts: list[sqlite3.Row] = field(default_factory=list)
    keys: list[sqlite3.Row] = field(default_factory=list)
    # (key_id, resolved_at, tokens, usd)
    recent_charges: list[tuple[str, float, int, int]] = field(default_factory=list)
    orphaned: list[tuple[str, str, int]] = field(default_factory=list)  # (hold_id, key_id, amount)
    open_holds: list[sqlite3.Row] = field(default_factory=list)  # only when not recovering
    # (kind, id) -> (start, end, tokens, usd): each calendar-period cap's current period so far
    period_usage: dict[tuple[str, str], tuple[float, float, int, int]] = field(default_factory=dict)


def recover_and_load(conn: sqlite3.Connection, now: float, horizon_s: float, recover: bool = True) -> Snapshot:
    """Charge holds a crash left open at their held amount, then read the ledger.

    With `recover=False` (a read-only look while a server owns the data
    dir) open holds are reported as they are instead.
    """
    conn.row_factory = sqlite3.Row
    snapshot = Snapshot()
    open_holds = conn.execute("SELECT * FROM holds WHERE state = 'open' ORDER BY created_at").fetchall()
    if not recover:
        snapshot.open_holds = open_holds
    else:
        with conn:
            for hold in open_holds:
                apply(
                    conn,
                    ResolveHold(hold["id"], hold["key_id"], hold["account_id"], "orphaned", hold["amount_tokens"], None, now,
                                hold["amount_usd"]),
                )
                snapshot.orphaned.append((hold["id"], hold["key_id"], hold["amount_tokens"]))
    snapshot.accounts = conn.execute("SELECT * FROM accounts ORDER BY id").fetchall()
    snapshot.keys = conn.execute("SELECT * FROM keys ORDER BY created_at, id").fetchall()
    snapshot.recent_charges = [
        (r["key_id"], r["resolved_at"], r["charged_tokens"], r["charged_usd"])
        for r in conn.execute(
            "SELECT key_id, resolved_at, charged_tokens, charged_usd FROM holds"
            " WHERE resolved_at > ? AND (charged_tokens > 0 OR charged_usd > 0) ORDER BY resolved_at",
            (now - horizon_s,),
        )
    ]
    for kind, rows in (("account", snapshot.accounts), ("key", snapshot.keys)):
        for row in rows:
            spec = caps_of(row).period
            if spec is not None:
                start, end = period_bounds(spec, now)
                snapshot.period_usage[(kind, row["id"])] = (start, end, *period_charges(conn, kind, row["id"], start, end))
    conn.row_factory = None
    return snapshot


def period_charges(conn: sqlite3.Connection, kind: str, principal_id: str, start: float, end: float) -> tuple[int, int]:
    """(tokens, micro-USD) charged to a principal in [start, end)."""
    column = "key_id" if kind == "key" else "account_id"
    row = conn.execute(
        f"SELECT COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(charged_usd), 0) FROM holds"
        f" WHERE {column} = ? AND resolved_at >= ? AND resolved_at < ? AND (charged_tokens > 0 OR charged_usd > 0)",
        (principal_id, start, end),
    ).fetchone()
    return int(row[0]), int(row[1])


def read_meta(conn: sqlite3.Connection, k: str) -> str | None:
    row = conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
    return row[0] if row is not None else None


def caps_of(row: sqlite3.Row) -> Caps:
    period = None
    if row["period"] is not None:
        period = PeriodSpec(row["period"], row["period_timezone"], row["period_anchor_day"])
    return Caps(
        row["balance_tokens"], row["window_tokens"], row["window_s"], row["max_concurrency"], row["balance_usd"],
        row["window_usd"], period, row["period_tokens"], row["period_usd"],
        row["output_holds"] if "output_holds" in row.keys() else None,
    )


# --- the two stores -------------------------------------------------------------------


class SyncStore:
    """Applies ops in the calling task: the simulator's store and the offline CLI's."""

    def __init__(self, conn: sqlite3.Connection, recover: bool = True) -> None:
        self.conn = conn
        self.recover = recover

    async def load(self, now: float, horizon_s: float) -> Snapshot:
        await trio.lowlevel.checkpoint()
        return recover_and_load(self.conn, now, horizon_s, self.recover)

    async def commit(self, ops: Sequence[Op], durable: bool = True) -> None:
        try:
            apply_all(self.conn, ops)
        except (sqlite3.Error, StoreError) as exc:
            raise StoreError(str(exc)) from exc
        await trio.lowlevel.checkpoint()

    async def query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        # Read first, then yield: like the writer thread, the query sees
        # exactly the ops committed before it was asked for.
        result = fn(self.conn)
        await trio.lowlevel.checkpoint()
        return result


class _Waiter:
    __slots__ = ("event", "error", "result", "unwatched")

    def __init__(self, unwatched: bool = False) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self.unwatched = unwatched  # nobody awaits it: its failure is logged instead


_STOP = object()
CommitObserver = Callable[[int, float], None]


class ThreadedStore:
    """SQLite owned by one writer thread; Trio tasks await group commits."""

    def __init__(self, path: Path, synchronous: str, on_commit: CommitObserver | None = None) -> None:
        self.path = path
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._on_commit = on_commit
        self._thread = threading.Thread(target=self._run, name="cortex-ledger-writer", daemon=True)
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._deferred: list[Op] = []
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._flush_pending = False

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, synchronous: str = "normal", on_commit: CommitObserver | None = None) -> AsyncIterator["ThreadedStore"]:
        """Start the writer thread; on exit, flush deferred ops, let it finish what is queued, join it."""
        store = cls(path, synchronous, on_commit)
        store._thread.start()
        await trio.to_thread.run_sync(store._opened.wait)
        if store._open_error is not None:
            await trio.to_thread.run_sync(store._thread.join)
            raise StoreError(f"cannot open the ledger at {path}: {store._open_error}") from store._open_error
        try:
            async with trio.open_nursery() as nursery:
                store._nursery = nursery  # owns the deferred-flush timers
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(10, shield=True):
                if store._deferred:
                    await store._submit(("ops", []))  # carries the deferred ops
                store._stopped = True
                store._queue.put(_STOP)
                await trio.to_thread.run_sync(store._thread.join, abandon_on_cancel=True)

    async def load(self, now: float, horizon_s: float) -> Snapshot:
        return await self._submit(("call", lambda conn: recover_and_load(conn, now, horizon_s)))

    async def commit(self, ops: Sequence[Op], durable: bool = True) -> None:
        """Make `ops` durable and wait for it; or, with `durable=False`, just queue them.

        Deferred ops ride along with the next durable commit (or a flush
        at most `DEFER_FLUSH_S` later): one fsync instead of two on the request
        path. Settlements use it; a crash before the flush loses nothing
        that matters, since recovery charges the hold in full.
        """
        if durable:
            await self._submit(("ops", ops))
            return
        if self._stopped:
            raise StoreError("the ledger store is closed")
        if not self._flush_pending:
            assert self._nursery is not None
            self._flush_pending = True
            self._nursery.start_soon(self._flush_deferred)
        self._deferred.extend(ops)
        await trio.lowlevel.checkpoint()

    async def _flush_deferred(self) -> None:
        """One timer at a time: under load, durable commits carry the deferred ops long before it fires."""
        try:
            await trio.sleep(DEFER_FLUSH_S)
        finally:
            self._flush_pending = False
        if self._deferred:
            try:
                await self._submit(("ops", []))
            except StoreError as exc:
                logging.getLogger("cortex").error("deferred ledger write failed: %s", exc)

    async def query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self._submit(("call", fn))

    async def _submit(self, job: tuple[str, Any]) -> Any:
        if self._stopped:
            raise StoreError("the ledger store is closed")
        if self._deferred:  # earlier ops first: the queue is the order of the ledger
            deferred, self._deferred = self._deferred, []
            self._queue.put((("ops", deferred), _Waiter(unwatched=True)))
        waiter = _Waiter()
        self._queue.put((job, waiter))
        await waiter.event.wait()
        if waiter.error is not None:
            raise StoreError(str(waiter.error)) from waiter.error
        return waiter.result

    # --- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            conn = connect(self.path, self.synchronous)
        except BaseException as exc:  # reported to the opener
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while self._serve_batch(conn):
                pass
        finally:
            conn.close()

    def _serve_batch(self, conn: sqlite3.Connection) -> bool:
        item = self._queue.get()
        batch: list[tuple[tuple[str, Any], _Waiter]] = []
        stop = False
        while True:
            if item is _STOP:
                stop = True
                break
            batch.append(item)
            if len(batch) >= BATCH_OPS_MAX:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if batch:
            self._execute(conn, batch)
        return not stop

    def _execute(self, conn: sqlite3.Connection, batch: list[tuple[tuple[str, Any], _Waiter]]) -> None:
        started = time.perf_counter()
        ops_jobs = [(job, w) for job, w in batch if job[0] == "ops"]
        try:
            apply_all(conn, [op for job, _ in ops_jobs for op in job[1]])
        except Exception:
            # One bad job must not fail its neighbours: redo each alone.
            for job, waiter in ops_jobs:
                try:
                    apply_all(conn, job[1])
                except Exception as exc:
                    waiter.error = exc
        commit_s = time.perf_counter() - started
        for job, waiter in batch:
            if job[0] == "call":
                try:
                    waiter.result = job[1](conn)
                except Exception as exc:
                    waiter.error = exc
        self._wake([w for _, w in batch], len(ops_jobs), commit_s)

    def _wake(self, waiters: list[_Waiter], batch_size: int, commit_s: float) -> None:
        def wake() -> None:
            for waiter in waiters:
                waiter.event.set()
                if waiter.unwatched and waiter.error is not None:
                    logging.getLogger("cortex").error("deferred ledger write failed: %s", waiter.error)
            if self._on_commit is not None and batch_size:
                self._on_commit(batch_size, commit_s)

        try:
            self._token.run_sync_soon(wake)
        except trio.RunFinishedError:
            pass
