"""The PostgreSQL ledger's schema: versioned migrations, the start-up check, safe URLs, and the SQLite import.

The schema mirrors the SQLite ledger (cortex/budget/store.py and the alert
tables of cortex/budget/alert_delivery.py) in PostgreSQL types: BIGINT for
tokens and micro-USD, DOUBLE PRECISION for times (epoch seconds, as the
SQLite store keeps them), TEXT, BYTEA for key hashes. On top of it, what
many replicas sharing one ledger need: a `replicas` table, holds that carry
the replica that opened them and a lease deadline after which another
replica may reap them, and per-principal `held_tokens`, `held_usd` and
`in_flight` columns, so that a cap's state is one row that a conditional
update can check and change at once.

`MIGRATIONS` is the only description of the schema: version N is what
applying steps 1..N gives. `migrate` applies the missing steps, each in its
own transaction under a transaction-scoped advisory lock, so replicas that
migrate at the same moment apply every step exactly once. `check` is the
start-up test: a ledger older or newer than this cortex is refused with
the command that fixes it.

Passwords never travel in a URL: libpq reads them from PGPASSWORD or a
.pgpass file (PGPASSFILE), so `ledger_url` refuses a URL that carries one,
and `redact` strips any from text bound for a log or an error message.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cortex.budget import store as sqlite_store

Migration = tuple[int, tuple[str, ...]]

# "cortex" in ASCII, then the lock's number: one constant for every cortex, so replicas contend on it.
MIGRATE_LOCK_KEY = 0x636F72746578_0001
MIGRATE_LOCK_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "cortex"
HOLD_STATES = ("open", "settled", "released", "expired", "orphaned")
URL_SCHEMES = ("postgresql", "postgres")
URL_LENGTH_MAX = 2048

_CAPS_COLUMNS = """
    balance_tokens BIGINT CHECK (balance_tokens >= 0),
    window_tokens BIGINT CHECK (window_tokens >= 0),
    window_s DOUBLE PRECISION CHECK (window_s > 0),
    max_concurrency INTEGER CHECK (max_concurrency >= 0),
    balance_usd BIGINT CHECK (balance_usd >= 0),  -- micro-USD, as every money figure here
    window_usd BIGINT CHECK (window_usd >= 0),
    period TEXT CHECK (period IN ('daily', 'weekly', 'monthly')),
    period_timezone TEXT,
    period_anchor_day INTEGER,
    period_tokens BIGINT CHECK (period_tokens >= 0),
    period_usd BIGINT CHECK (period_usd >= 0),
    spent_tokens BIGINT NOT NULL DEFAULT 0 CHECK (spent_tokens >= 0),
    spent_usd BIGINT NOT NULL DEFAULT 0 CHECK (spent_usd >= 0),
    -- What open holds reserve on this principal, kept in the row so that one
    -- conditional UPDATE can admit against spent + held <= cap.
    held_tokens BIGINT NOT NULL DEFAULT 0 CHECK (held_tokens >= 0),
    held_usd BIGINT NOT NULL DEFAULT 0 CHECK (held_usd >= 0),
    in_flight INTEGER NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    CHECK ((window_tokens IS NULL AND window_usd IS NULL) = (window_s IS NULL)),
    CHECK ((period_tokens IS NULL AND period_usd IS NULL) = (period IS NULL))"""

_V1 = (
    # Free-form facts about the ledger (where it was imported from, and when).
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    """CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
)""",
    f"""CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,{_CAPS_COLUMNS}
)""",
    f"""CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,{_CAPS_COLUMNS}
)""",
    # As in SQLite, no foreign keys on holds: the hot path inserts them, and keys are never deleted.
    f"""CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    amount_tokens BIGINT NOT NULL CHECK (amount_tokens >= 0),
    amount_usd BIGINT NOT NULL DEFAULT 0 CHECK (amount_usd >= 0),
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in HOLD_STATES)})),
    charged_tokens BIGINT NOT NULL DEFAULT 0 CHECK (charged_tokens >= 0),
    charged_usd BIGINT NOT NULL DEFAULT 0 CHECK (charged_usd >= 0),
    actual_tokens BIGINT,
    resolved_at DOUBLE PRECISION,
    request_id TEXT,  -- cortex's own id, unique per request
    model TEXT,
    client_request_id TEXT,  -- the client's x-request-id, if it sent one; not unique
    -- The replica that opened it, and the time after which another replica's reaper may resolve it.
    replica_id TEXT,
    lease_deadline DOUBLE PRECISION,
    CHECK ((state = 'open') = (resolved_at IS NULL)),
    CHECK (state <> 'open' OR (replica_id IS NOT NULL AND lease_deadline IS NOT NULL))
)""",
    "CREATE INDEX holds_open_lease ON holds (lease_deadline) WHERE state = 'open'",
    "CREATE INDEX holds_resolved_at ON holds (resolved_at)",
    "CREATE INDEX holds_key_created ON holds (key_id, created_at)",
    # A calendar period's usage is summed from the holds resolved in it.
    "CREATE INDEX holds_key_resolved ON holds (key_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
    "CREATE INDEX holds_account_resolved ON holds (account_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
    """CREATE TABLE alert_state (
    rule_id TEXT NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    cap TEXT NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    epoch TEXT NOT NULL,
    fired_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rule_id, principal_kind, principal_id, cap, threshold)
)""",
    """CREATE TABLE alert_outbox (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    rule_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT
)""",
    "CREATE INDEX alert_outbox_next_attempt_at ON alert_outbox (next_attempt_at)",
    # Events dropped from a full outbox and not yet counted in the metrics.
    "CREATE TABLE alert_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
)

# Ordered; version N is what steps 1..N give. A new step goes at the end, never in the middle.
MIGRATIONS: tuple[Migration, ...] = ((1, _V1),)
# The tables that hold a ledger's contents (schema_version and meta describe the ledger itself).
DATA_TABLES = ("replicas", "accounts", "keys", "holds", "alert_state", "alert_outbox", "alert_counters")


def latest(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1][0] if migrations else 0


def _check_migrations(migrations: Sequence[Migration]) -> None:
    assert [version for version, _ in migrations] == list(range(1, len(migrations) + 1)), "versions must be 1..N"
    assert all(statements for _, statements in migrations), "a step with no statements"


_check_migrations(MIGRATIONS)
SCHEMA_VERSION = latest()


class LedgerUrlError(ValueError):
    """A --ledger URL that cortex will not use."""


class SchemaError(Exception):
    """The ledger's schema is not the one this cortex runs on."""


class ImportRefused(Exception):
    """`cortex db import` will not copy into this target, or from this source."""


# --- URLs --------------------------------------------------------------------------------

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@]*)@")
# libpq's secrets: the password, and the passphrase of an SSL client key.
SECRET_PARAMETERS = ("password", "sslpassword")
_PASSWORD_PARAM = re.compile(r"(?i)([?&])(?:ssl)?password=[^&#]*&?")
_PASSWORD_KEYWORD = re.compile(r"(?i)\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")


def redact(url: str) -> str:
    """`url` without any password, for logs and error messages; never raises.

    Removes the password of the user part (`user:secret@host`) and any
    `password=` or `sslpassword=` parameter. Text that does not parse loses everything
    up to its last `@`, which errs on the side of removing too much.
    """
    text = str(url)
    match = _USERINFO.match(text)
    if match is not None:
        user = match["userinfo"].split(":", 1)[0]
        rest = text[match.end():]
        at = rest.rfind("@")
        if at >= 0:  # an unescaped '@' in the password: drop all of it
            rest = rest[at + 1:]
        text = f"{match['scheme']}{user}@{rest}" if user else f"{match['scheme']}{rest}"
    elif "@" in text:
        text = "..." + text[text.rfind("@"):]
    text = _PASSWORD_PARAM.sub(lambda m: m[1], text).rstrip("?&")
    return _PASSWORD_KEYWORD.sub(r"\1=(redacted)", text)  # libpq's keyword=value form


_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://[^\s'\"]+")


def redact_text(text: str) -> str:
    """A message with every URL in it redacted, and any `password=` keyword; never raises."""
    def one(match: re.Match[str]) -> str:
        url = match[0].rstrip(".,;:)")  # the sentence's punctuation, not the URL's
        return redact(url) + match[0][len(url):]

    return _PASSWORD_KEYWORD.sub(r"\1=(redacted)", _URL_IN_TEXT.sub(one, str(text)))


def ledger_url(url: str) -> str:
    """A checked `postgresql://user@host:port/db` URL; raises LedgerUrlError naming the problem.

    Checked with libpq's own parser, so a password in the user part or as
    a `?password=` parameter (or an `sslpassword=`) is refused either way.
    """
    if len(url) > URL_LENGTH_MAX:
        raise LedgerUrlError(f"the ledger URL is longer than {URL_LENGTH_MAX} characters")
    scheme = url.partition("://")[0]
    if scheme not in URL_SCHEMES or "://" not in url:
        raise LedgerUrlError(f"the ledger must be a postgresql://user@host:port/dbname URL, got {redact(url)!r}")
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise LedgerUrlError(f"cannot parse the ledger URL {redact(url)!r}: {redact_text(str(exc))}") from None
    if any(params.get(name) for name in SECRET_PARAMETERS):
        raise LedgerUrlError(
            f"the ledger URL {redact(url)!r} contains a password; put it in the PGPASSWORD environment variable or"
            " in a .pgpass file (~/.pgpass or PGPASSFILE, mode 0600) instead, so it stays out of the command line,"
            " the process list and the logs"
        )
    return url


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to the ledger at `url` (checked by `ledger_url`); errors carry only the redacted URL."""
    ledger_url(url)
    kwargs.setdefault("autocommit", True)  # so that `conn.transaction()` is always a transaction of its own
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=APPLICATION_NAME, **kwargs)
    except psycopg.OperationalError as exc:
        reason = redact_text(str(exc)).strip()
        raise psycopg.OperationalError(f"cannot connect to the ledger at {redact(url)}: {reason}") from None


def describe(conn: psycopg.Connection[Any]) -> str:
    """The connection as a URL without a password, for messages."""
    info = conn.info
    if info.host.startswith("/"):  # a Unix socket's directory
        return f"postgresql://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


# --- versions and migrations -----------------------------------------------------------------

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)"""


def _assert_idle(conn: psycopg.Connection[Any]) -> None:
    # Inside a caller's transaction, `conn.transaction()` would be a savepoint: no commit, no lock release.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "needs a connection outside a transaction"


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The ledger's schema version; 0 for a database cortex has never migrated."""
    _assert_idle(conn)
    with conn.transaction():
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _too_new(version: int, expected: int) -> SchemaError:
    return SchemaError(
        f"this cortex is older than the ledger's schema {version} (it runs on schema {expected}):"
        " upgrade cortex, or point it at another ledger"
    )


def migrate(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] = MIGRATIONS, clock: Callable[[], float] = time.time
) -> tuple[int, int]:
    """Apply the missing steps, one transaction each; (version before, version after).

    Each transaction first takes a transaction-scoped advisory lock and then
    reads the version, so of several replicas migrating at once exactly one
    applies each step, and the others see it done. A ledger newer than
    `migrations` is refused, never touched.
    """
    _check_migrations(migrations)
    _assert_idle(conn)
    target = latest(migrations)
    start: int | None = None
    while True:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{MIGRATE_LOCK_TIMEOUT_S}s")))
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
            conn.execute(_VERSION_TABLE)
            version = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
            start = version if start is None else start
            if version > target:
                raise _too_new(version, target)
            if version == target:
                return start, version
            step, statements = migrations[version]  # versions are 1..N: step `version + 1` is at index `version`
            assert step == version + 1
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (step, clock()))


def check(conn: psycopg.Connection[Any], expected: int = SCHEMA_VERSION) -> int:
    """The start-up check: the ledger's version if it is `expected`, else SchemaError saying what to do."""
    version = current_version(conn)
    if version > expected:
        raise _too_new(version, expected)
    if version < expected:
        where = describe(conn)
        state = "has no cortex schema" if version == 0 else f"has schema {version}, older than this cortex's {expected}"
        raise SchemaError(f"the ledger at {where} {state}: run `cortex db migrate --ledger {where}`")
    return version


# --- importing a SQLite ledger -----------------------------------------------------------------

_INT, _FLOAT, _TEXT, _BYTES = int, float, str, bytes
_CAPS_TYPES = {
    "balance_tokens": _INT, "window_tokens": _INT, "window_s": _FLOAT, "max_concurrency": _INT, "balance_usd": _INT,
    "window_usd": _INT, "period": _TEXT, "period_timezone": _TEXT, "period_anchor_day": _INT, "period_tokens": _INT,
    "period_usd": _INT, "spent_tokens": _INT, "spent_usd": _INT,
}
# What is copied from each SQLite table, column by column, with the Python type PostgreSQL gets.
IMPORT_COLUMNS: dict[str, dict[str, type]] = {
    "accounts": {"id": _TEXT, "created_at": _FLOAT, **_CAPS_TYPES},
    "keys": {
        "id": _TEXT, "account_id": _TEXT, "name": _TEXT, "key_hash": _BYTES, "key_prefix": _TEXT, "created_at": _FLOAT,
        "revoked_at": _FLOAT, **_CAPS_TYPES,
    },
    "holds": {
        "id": _TEXT, "key_id": _TEXT, "account_id": _TEXT, "amount_tokens": _INT, "amount_usd": _INT, "created_at": _FLOAT,
        "expires_at": _FLOAT, "state": _TEXT, "charged_tokens": _INT, "charged_usd": _INT, "actual_tokens": _INT,
        "resolved_at": _FLOAT, "request_id": _TEXT, "model": _TEXT, "client_request_id": _TEXT,
    },
    "alert_state": {
        "rule_id": _TEXT, "principal_kind": _TEXT, "principal_id": _TEXT, "cap": _TEXT, "threshold": _FLOAT,
        "epoch": _TEXT, "fired_at": _FLOAT,
    },
    "alert_outbox": {
        "seq": _INT, "event_id": _TEXT, "rule_id": _TEXT, "url": _TEXT, "body": _BYTES, "created_at": _FLOAT,
        "attempts": _INT, "next_attempt_at": _FLOAT, "last_error": _TEXT,
    },
    "alert_counters": {"name": _TEXT, "value": _INT},
}
SMALL_TABLES = ("accounts", "keys", "alert_state", "alert_outbox", "alert_counters")  # read whole; holds are streamed
COPY_BATCH_ROWS = 10_000  # holds read from SQLite at a time: the history can be long


@dataclass(frozen=True)
class ImportReport:
    source: str
    ledger: str
    accounts: int
    keys: int
    holds: int
    alert_state: int
    alert_outbox: int
    alert_counters: int
    orphaned: int  # holds open in the source, imported as charged in full
    orphaned_tokens: int
    orphaned_usd: int
    spent_tokens: int  # every key's, summed, after the orphaned charges
    spent_usd: int

    def view(self) -> dict[str, Any]:
        return asdict(self)


def _typed(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    if kind is _FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is _BYTES and isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if type(value) is not kind:
        raise ImportRefused(f"{where}: expected {kind.__name__}, the SQLite ledger has {value!r}; nothing was changed")
    return value


def _select(source: sqlite3.Connection, table: str) -> Iterator[dict[str, Any]]:
    columns = IMPORT_COLUMNS[table]
    cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}")
    while batch := cursor.fetchmany(COPY_BATCH_ROWS):
        for row in batch:
            yield {name: _typed(value, kind, f"{table}.{name}") for (name, kind), value in zip(columns.items(), row)}


def _orphaned(hold: dict[str, Any], now: float) -> dict[str, Any]:
    """What SQLite's recovery does to a hold left open (store.recover_and_load), done to the copy instead.

    A hold still open in a ledger no server owns belonged to a request whose
    outcome nobody knows: it is charged in full, so no cap can be passed.
    """
    if hold["state"] != "open":
        return hold
    return {**hold, "state": "orphaned", "charged_tokens": hold["amount_tokens"], "charged_usd": hold["amount_usd"],
            "actual_tokens": None, "resolved_at": now}


def _charge_orphans(source: sqlite3.Connection, small: dict[str, list[dict[str, Any]]]) -> tuple[int, int, int]:
    """Add the open holds' amounts to their key's and account's spend, as `_orphaned` charges them."""
    principals = {("key", r["id"]): r for r in small["keys"]} | {("account", r["id"]): r for r in small["accounts"]}
    count = tokens = usd = 0
    for key_id, account_id, amount_tokens, amount_usd in source.execute(
        "SELECT key_id, account_id, amount_tokens, amount_usd FROM holds WHERE state = 'open'"
    ):
        for principal in (("key", key_id), ("account", account_id)):
            row = principals.get(principal)
            if row is None:
                raise ImportRefused(f"an open hold names {principal[0]} {principal[1]!r}, which the SQLite ledger lacks")
            row["spent_tokens"] += amount_tokens
            row["spent_usd"] += amount_usd
        count, tokens, usd = count + 1, tokens + amount_tokens, usd + amount_usd
    return count, tokens, usd


def _copy(target: psycopg.Connection[Any], table: str, rows: Iterable[dict[str, Any]]) -> int:
    columns = list(IMPORT_COLUMNS[table])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    copied = 0
    with target.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])
            copied += 1
    return copied


def _refuse_unless_empty(target: psycopg.Connection[Any]) -> None:
    # SHARE ROW EXCLUSIVE conflicts with itself and with every write: a second
    # import, or a replica, waits for this transaction and then sees its rows.
    target.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
        sql.SQL(", ").join(map(sql.Identifier, DATA_TABLES))
    ))
    for table in DATA_TABLES:
        if target.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))).fetchone()[0]:
            raise ImportRefused(
                f"the ledger at {describe(target)} is not empty (its {table} table has rows): import only into a"
                " freshly migrated database; nothing was changed"
            )


def import_sqlite(
    source: sqlite3.Connection, target: psycopg.Connection[Any], source_name: str, now: float
) -> ImportReport:
    """Copy a SQLite ledger into an empty, migrated PostgreSQL ledger, in one transaction.

    The caller holds the data dir's lock, so no server is writing `source`;
    it is read in one read transaction all the same. Nothing in `source`
    changes: its open holds are imported as orphaned, charged in full at
    `now`, exactly as SQLite's recovery would charge them at the next start,
    so both ledgers agree on every balance. Holds are streamed (COPY), so the
    history's length costs time, not memory.
    """
    check(target)
    source.execute("BEGIN")  # one snapshot of the source for every read below
    try:
        small = {table: list(_select(source, table)) for table in SMALL_TABLES}
        orphaned, orphaned_tokens, orphaned_usd = _charge_orphans(source, small)
        with target.transaction():
            _refuse_unless_empty(target)
            counts = {table: _copy(target, table, small[table]) for table in ("accounts", "keys")}
            counts["holds"] = _copy(target, "holds", (_orphaned(h, now) for h in _select(source, "holds")))
            counts |= {table: _copy(target, table, small[table]) for table in SMALL_TABLES[2:]}
            if small["alert_outbox"]:  # new events continue after the imported ones
                target.execute(
                    "SELECT setval(pg_get_serial_sequence('alert_outbox', 'seq'), (SELECT MAX(seq) FROM alert_outbox))"
                )
            target.execute(
                "INSERT INTO meta (k, v) VALUES ('imported_from', %s), ('imported_at', %s), ('imported_sqlite_schema', %s)",
                (source_name, repr(now), sqlite_store.SCHEMA_VERSION),
            )
            for table, count in counts.items():  # postcondition: every row arrived, and none is left open
                copied = target.execute(sql.SQL("SELECT COUNT(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
                assert copied == count, (table, copied, count)
            assert not target.execute("SELECT EXISTS (SELECT 1 FROM holds WHERE state = 'open')").fetchone()[0]
    finally:
        source.rollback()
    return ImportReport(
        source=source_name, ledger=describe(target), accounts=counts["accounts"], keys=counts["keys"],
        holds=counts["holds"], alert_state=counts["alert_state"], alert_outbox=counts["alert_outbox"],
        alert_counters=counts["alert_counters"], orphaned=orphaned, orphaned_tokens=orphaned_tokens,
        orphaned_usd=orphaned_usd, spent_tokens=sum(r["spent_tokens"] for r in small["keys"]),
        spent_usd=sum(r["spent_usd"] for r in small["keys"]),
    )
