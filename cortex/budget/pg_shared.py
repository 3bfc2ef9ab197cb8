"""The shared PostgreSQL ledger as one replica's budget service sees it.

Three faces over one database:
  * the request path: `reserve` and `resolve`, through `PgAdmission` (one
    writer thread, group commit, one round trip per batch; pg_ledger.py
    holds the proof that `spent + held <= cap` across replicas);
  * the directory: keys, accounts and their caps, administrative changes and
    the reads behind the usage views, each a short function run in a worker
    thread on a small pool of connections (`run`);
  * change notices: an administrative change NOTIFYs `cortex_ledger` in its
    own transaction (delivered at commit), and every replica LISTENs on a
    connection of its own, so its view of keys and caps follows within
    milliseconds. A lost listening connection asks for a full reload once it
    is back, since notices sent meanwhile are lost.

`query` and `commit` give the alert code (alert_delivery.py) the store face it
uses on SQLite; its statements are portable, with `?` placeholders turned into
psycopg's.
"""

from __future__ import annotations

import logging
import threading
import math
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import psycopg
import trio
from psycopg.rows import dict_row

from cortex.budget import pg_schema
from cortex.budget.ledger import Caps, Hold, Principal, Refusal
from cortex.budget.periods import period_bounds
from cortex.budget.pg_ledger import Extend, Reserve, Resolve
from cortex.budget.pg_store import PgAdmission
from cortex.budget.service import SPEND_BUCKET_S, KeyRecord
from cortex.budget.shared_service import EVERYTHING, Directory
from cortex.budget.store import CAPS_FIELDS, TABLES, StoreError, caps_of, caps_row

log = logging.getLogger("cortex")

CHANNEL = "cortex_ledger"
POOL_SIZE = 4  # directory connections; administrative traffic and views are light
LISTEN_POLL_S = 0.25  # how often the listening thread looks up from its socket to see whether to stop
LISTEN_BACKOFF_S = (0.05, 2.0)

PRINCIPAL_COLUMNS = (
    "id, created_at, balance_tokens, window_tokens, window_s, max_concurrency, balance_usd, window_usd, period,"
    " period_timezone, period_anchor_day, period_tokens, period_usd, spent_tokens, spent_usd, held_tokens, held_usd,"
    " in_flight, period_start, period_end, period_spec, period_used_tokens, period_used_usd, buckets_window_s,"
    " output_holds"
)
KEY_COLUMNS = "account_id, name, key_hash, key_prefix, revoked_at"


class _Qmark:
    """A psycopg connection that takes sqlite3's `?` placeholders (alert_delivery.py's statements are portable)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), tuple(params))


class PgShared:
    """One replica's handle on the shared ledger; build it with `PgShared.open`."""

    shared = True  # the app builds a SharedBudgetService on it
    extends = True  # holds grow in place (incremental output holds)

    def __init__(self, url: str, admission: PgAdmission | None) -> None:
        self.url = url
        self.admission = admission
        self._token = trio.lowlevel.current_trio_token()
        self._idle: list[psycopg.Connection[Any]] = []
        self._limiter = trio.CapacityLimiter(POOL_SIZE)
        self._closed = False

    @property
    def replica_id(self) -> str | None:
        return self.admission.replica_id if self.admission is not None else None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, replica_id: str | None = None, lease_s: float = 30.0, batch_max: int = 512,
        on_commit: Any = None, admission: bool = True,
    ) -> AsyncIterator["PgShared"]:
        """`admission=False` (the offline CLI): the directory only, no replica registered, no writer."""
        if not admission:
            try:
                pg_schema.ledger_url(url)
            except pg_schema.LedgerUrlError as exc:
                raise StoreError(str(exc)) from None
            shared = cls(url, None)
            try:
                await shared.run(_checked)
                yield shared
            finally:
                await shared._close()
            return
        async with PgAdmission.open(url, replica_id, lease_s, batch_max, on_commit) as adm:
            shared = cls(url, adm)
            try:
                yield shared
            finally:
                await shared._close()

    async def _close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- the request path ---------------------------------------------------------------

    async def reserve(self, req: Reserve) -> Hold | Refusal:
        if self.admission is None:
            raise StoreError("this handle on the ledger admits no requests")
        return await self.admission.reserve(req)

    async def resolve(self, res: Resolve, durable: bool = False) -> bool | None:
        if self.admission is None:
            raise StoreError("this handle on the ledger admits no requests")
        return await self.admission.resolve(res, durable)

    async def extend(self, hold_id: str, tokens: int, usd: int) -> Hold | Refusal | None:
        """Grow an open hold, judged in the next group commit ahead of its reserves (pg_ledger.py)."""
        if self.admission is None:
            raise StoreError("this handle on the ledger admits no requests")
        return await self.admission.extend(Extend(hold_id, tokens, usd))

    def resolve_soon(self, res: Resolve) -> None:
        if self.admission is None:
            raise StoreError("this handle on the ledger admits no requests")
        self.admission.resolve_soon(res)

    # --- the directory -------------------------------------------------------------------

    async def run(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """`fn(conn)` in a worker thread on a pooled autocommit connection (dict rows); StoreError on failure.

        Not abandoned on cancellation: an administrative transaction either
        commits or rolls back before its connection goes back to the pool.
        """
        if self._closed:
            raise StoreError("the ledger store is closed")
        async with self._limiter:
            return await trio.to_thread.run_sync(self._run_sync, fn)

    def _run_sync(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        try:
            conn: psycopg.Connection[Any] | None = self._idle.pop()  # atomic: threads share the list
        except IndexError:
            conn = None
        try:
            if conn is None or conn.closed:
                conn = None
                conn = pg_schema.connect(self.url, row_factory=dict_row)
            return fn(conn)
        except psycopg.Error as exc:
            raise StoreError(pg_schema.redact_text(str(exc))) from None
        finally:
            # A refused statement (or a caller's error) leaves the connection idle and usable.
            if conn is not None:
                usable = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if usable and not self._closed:
                    self._idle.append(conn)
                else:
                    conn.close()

    async def read_directory(self, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
        return await self.run(lambda conn: read_directory(conn, now, accounts, keys))

    async def create_account(self, account_id: str, caps: Caps, now: float) -> bool:
        """False if it exists already."""
        def write(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                created = _insert_principal(conn, "accounts", {"id": account_id, "created_at": now}, caps)
                if created:
                    notify(conn, "account", account_id)
                return created

        return await self.run(write)

    async def create_key(self, record: KeyRecord, caps: Caps) -> None:
        """The key, and its account if new, in one transaction."""
        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                if _insert_principal(conn, "accounts", {"id": record.account_id, "created_at": record.created_at}, Caps()):
                    notify(conn, "account", record.account_id)
                _insert_principal(conn, "keys", {
                    "id": record.id, "account_id": record.account_id, "name": record.name, "key_hash": record.key_hash,
                    "key_prefix": record.prefix, "created_at": record.created_at,
                }, caps)
                notify(conn, "key", record.id)

        await self.run(write)

    async def set_caps(self, kind: str, principal_id: str, caps: Caps) -> bool:
        """False if there is no such principal."""
        def write(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                row = conn.execute(
                    f"UPDATE {TABLES[kind]} SET {', '.join(f'{f} = %s' for f in CAPS_FIELDS)} WHERE id = %s RETURNING id",
                    (*caps_row(caps), principal_id),
                ).fetchone()
                if row is not None:
                    notify(conn, kind, principal_id)
                return row is not None

        return await self.run(write)

    async def update_caps(self, kind: str, principal_id: str, change: Callable[[Caps | None], Caps]) -> Caps:
        """Read-modify-write under the row's lock, so that concurrent changes on any replicas all count:
        `change` gets the caps (None: no such principal) and gives the new ones, or raises to change nothing."""
        def write(conn: psycopg.Connection[Any]) -> Caps:
            with conn.transaction():
                row = conn.execute(f"SELECT * FROM {TABLES[kind]} WHERE id = %s FOR UPDATE", (principal_id,)).fetchone()
                caps = change(caps_of(row) if row is not None else None)
                conn.execute(
                    f"UPDATE {TABLES[kind]} SET {', '.join(f'{f} = %s' for f in CAPS_FIELDS)} WHERE id = %s",
                    (*caps_row(caps), principal_id),
                )
                notify(conn, kind, principal_id)
                return caps

        return await self.run(write)

    async def revoke(self, key_id: str, at: float) -> bool:
        """False if there is no such key; a second revocation keeps the first one's time."""
        def write(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                row = conn.execute(
                    "UPDATE keys SET revoked_at = COALESCE(revoked_at, %s) WHERE id = %s RETURNING revoked_at", (at, key_id)
                ).fetchone()
                if row is not None:
                    notify(conn, "key", key_id)
                return row is not None

        return await self.run(write)

    async def key_id_by_hash(self, key_hash: bytes) -> str | None:
        row = await self.run(lambda conn: conn.execute("SELECT id FROM keys WHERE key_hash = %s", (key_hash,)).fetchone())
        return row["id"] if row is not None else None

    async def put_meta(self, k: str, v: str) -> None:
        await self.run(lambda conn: conn.execute(
            "INSERT INTO meta (k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (k, v)
        ))

    async def read_meta(self, k: str) -> str | None:
        row = await self.run(lambda conn: conn.execute("SELECT v FROM meta WHERE k = %s", (k,)).fetchone())
        return row["v"] if row is not None else None

    async def recent(self, key_id: str, limit: int) -> list[dict[str, Any]]:
        return await self.run(lambda conn: recent_requests(conn, key_id, limit))

    async def spend_buckets(self, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
        return await self.run(lambda conn: spend_buckets(conn, kind, principal_id, since))

    # --- the alert code's store face --------------------------------------------------------

    async def query(self, fn: Callable[[Any], Any]) -> Any:
        return await self.run(lambda conn: fn(_Qmark(_tuple_rows(conn))))

    async def commit(self, ops: Sequence[Any], durable: bool = True) -> None:
        def apply(conn: psycopg.Connection[Any]) -> None:
            q = _Qmark(_tuple_rows(conn))
            with conn.transaction():
                for op in ops:
                    op.apply_sql(q)

        await self.run(apply)

    # --- background ---------------------------------------------------------------------------

    async def run_background(
        self, on_change: Callable[[str], None], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The admission's heartbeat and reaper, and the change listener; until cancelled."""
        started = trio.Event()
        stop = threading.Event()
        listener = threading.Thread(
            target=self._listen_sync, args=(lambda p: self._token.run_sync_soon(on_change, p), stop, started.set),
            name="cortex-pg-listener", daemon=True,
        )
        listener.start()
        try:
            async with trio.open_nursery() as nursery:
                if self.admission is not None:
                    await nursery.start(self.admission.run_background)
                await started.wait()
                task_status.started()
                await trio.sleep_forever()
        finally:
            stop.set()  # it looks up from its socket every LISTEN_POLL_S
            with trio.move_on_after(5 * LISTEN_POLL_S + 1, shield=True):
                await trio.to_thread.run_sync(listener.join, abandon_on_cancel=True)

    def _listen_sync(self, notify: Callable[[str], None], stop: threading.Event, started: Callable[[], None]) -> None:
        backoff_s = LISTEN_BACKOFF_S[0]
        first = True
        while not stop.is_set():
            try:
                with pg_schema.connect(self.url) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if first:
                        self._token.run_sync_soon(started)
                        first = False
                    else:
                        notify(EVERYTHING)  # notices sent while this was away are lost
                    backoff_s = LISTEN_BACKOFF_S[0]
                    while not stop.is_set():
                        for notice in conn.notifies(timeout=LISTEN_POLL_S):
                            notify(notice.payload)
            except trio.RunFinishedError:  # the Trio run ended under the thread
                return
            except Exception as exc:  # a lost connection (or anything else): the service polls as well
                log.warning("ledger change listener lost its connection (%s); reconnecting",
                            pg_schema.redact_text(str(exc)))
                if first:
                    try:
                        self._token.run_sync_soon(started)
                    except trio.RunFinishedError:
                        return
                    first = False
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, LISTEN_BACKOFF_S[1])


def _checked(conn: psycopg.Connection[Any]) -> int:
    """pg_schema.check, which reads tuples, on a dict-row connection."""
    conn.row_factory = psycopg.rows.tuple_row
    try:
        return pg_schema.check(conn)
    finally:
        conn.row_factory = dict_row


def _tuple_rows(conn: psycopg.Connection[Any]) -> Any:
    """A cursor factory face of `conn` that gives tuples (the alert code indexes rows by position)."""

    class _Conn:
        def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
            return conn.cursor(row_factory=psycopg.rows.tuple_row).execute(sql, params)

    return _Conn()


def notify(conn: psycopg.Connection[Any], kind: str, principal_id: str) -> None:
    """Tell every replica (at commit) that this principal changed."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{kind}:{principal_id}"))


# --- the directory's reads and writes (in a worker thread, on a dict-row connection) ----------------


def read_directory(conn: Any, now: float, accounts: list[str] | None, keys: list[str] | None) -> Directory:
    """Principals as the ledger has them now, with their window and period usage; None: all of them."""
    with conn.transaction():  # one snapshot for the rows and their buckets
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

        def rows(table: str, ids: list[str] | None, extra: str = "") -> list[dict[str, Any]]:
            columns = PRINCIPAL_COLUMNS + (", " + extra if extra else "")
            if ids is None:
                return conn.execute(f"SELECT {columns} FROM {table}").fetchall()
            if not ids:
                return []
            return conn.execute(f"SELECT {columns} FROM {table} WHERE id = ANY(%s)", (ids,)).fetchall()

        account_rows = rows("accounts", accounts)
        key_rows = rows("keys", keys, KEY_COLUMNS)
        windowed = [("account", r) for r in account_rows if r["window_s"] is not None]
        windowed += [("key", r) for r in key_rows if r["window_s"] is not None]
        buckets: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
        if windowed:
            for b in conn.execute(
                "SELECT b.kind, b.id, b.bucket_end, b.tokens, b.usd FROM usage_buckets b"
                " JOIN unnest(%s::text[], %s::text[]) AS w(kind, id) ON b.kind = w.kind AND b.id = w.id"
                " ORDER BY b.bucket_end",
                ([k for k, _ in windowed], [r["id"] for _, r in windowed]),
            ):
                buckets.setdefault((b["kind"], b["id"]), []).append((b["bucket_end"], int(b["tokens"]), int(b["usd"])))
        account_view = [_principal(conn, "account", r, buckets, now) for r in account_rows]
        key_view = [
            (_principal(conn, "key", r, buckets, now),
             KeyRecord(r["id"], r["account_id"], r["name"], bytes(r["key_hash"]), r["key_prefix"], r["created_at"],
                       r["revoked_at"]))
            for r in key_rows
        ]
    return Directory(account_view, key_view)


def _principal(conn: Any, kind: str, row: dict[str, Any], buckets: dict[Any, Any], now: float) -> Principal:
    caps = caps_of(row)
    p = Principal(
        row["id"], kind, caps, spent_tokens=row["spent_tokens"], held_tokens=row["held_tokens"],
        in_flight=row["in_flight"], spent_usd=row["spent_usd"], held_usd=row["held_usd"],
    )
    column = "key_id" if kind == "key" else "account_id"
    if caps.window_s is not None and p.window is not None:
        if row["buckets_window_s"] == caps.window_s:
            # pg_ledger.py's ageing rule: a bucket counts while its END is inside the window.
            history = [b for b in buckets.get((kind, row["id"]), ()) if b[0] > now - caps.window_s]
        else:  # the window changed since the ledger last built the buckets: from the holds, as it will
            history = [
                (h["resolved_at"], int(h["charged_tokens"]), int(h["charged_usd"])) for h in conn.execute(
                    f"SELECT resolved_at, charged_tokens, charged_usd FROM holds WHERE {column} = %s"
                    " AND resolved_at > %s AND (charged_tokens > 0 OR charged_usd > 0) ORDER BY resolved_at",
                    (row["id"], now - caps.window_s),
                )
            ]
        for at, tokens, usd in history:
            p.window.add(at, tokens, usd)
    spec = caps.period
    if spec is not None:
        current = row["period_start"] is not None and row["period_start"] <= now < (row["period_end"] or -math.inf)
        if row["period_spec"] == f"{spec.kind}/{spec.timezone}/{spec.anchor_day}" and current:
            p.set_period_usage(row["period_start"], row["period_end"], int(row["period_used_tokens"]),
                               int(row["period_used_usd"]))
        else:  # a new spec, or a period no batch has entered yet: summed from the holds, as the ledger will
            start, end = period_bounds(spec, now)
            sums = conn.execute(
                f"SELECT COALESCE(SUM(charged_tokens), 0)::bigint AS t, COALESCE(SUM(charged_usd), 0)::bigint AS u"
                f" FROM holds WHERE {column} = %s AND resolved_at >= %s AND resolved_at < %s"
                " AND (charged_tokens > 0 OR charged_usd > 0)",
                (row["id"], start, end),
            ).fetchone()
            p.set_period_usage(start, end, int(sums["t"]), int(sums["u"]))
    return p


def _insert_principal(conn: Any, table: str, fields: dict[str, Any], caps: Caps) -> bool:
    """Insert a key or an account with its caps; False if one with that id is there already."""
    columns = [*fields, *CAPS_FIELDS]
    row = conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        (*fields.values(), *caps_row(caps)),
    ).fetchone()
    return row is not None


def recent_requests(conn: Any, key_id: str, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id AS hold_id, request_id, client_request_id, model, amount_tokens AS held_tokens, charged_tokens,"
        " actual_tokens, state, created_at, resolved_at, amount_usd AS held_micro_usd, charged_usd AS charged_micro_usd"
        " FROM holds WHERE key_id = %s ORDER BY created_at DESC LIMIT %s",
        (key_id, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def spend_buckets(conn: Any, kind: str, principal_id: str, since: float) -> list[tuple[Any, ...]]:
    column = "key_id" if kind == "key" else "account_id"
    rows = conn.execute(
        f"SELECT model, floor(resolved_at / {SPEND_BUCKET_S})::bigint AS slot, COUNT(*) AS n,"
        " SUM(charged_tokens)::bigint AS t, SUM(charged_usd)::bigint AS u"
        f" FROM holds WHERE {column} = %s AND resolved_at >= %s AND (charged_tokens > 0 OR charged_usd > 0)"
        " GROUP BY 1, 2",
        (principal_id, since),
    ).fetchall()
    return [(r["model"], r["slot"], r["n"], r["t"], r["u"]) for r in rows]
