"""`cortex db migrate|status|import`: the PostgreSQL ledger's schema, and moving a SQLite ledger onto it.

    cortex db migrate --ledger postgresql://cortex@db.internal:5432/cortex
    cortex db status  --ledger URL
    cortex db import  --from-data-dir .cortex --ledger URL

The password is never part of the URL: libpq reads it from PGPASSWORD or
a .pgpass file (~/.pgpass, or the file PGPASSFILE names). A URL with one
is refused before anything connects, and every URL printed is redacted.

`import` copies a data dir's SQLite ledger (accounts, keys and their caps,
every hold, the alerts' fired state and outbox) into a freshly migrated,
empty PostgreSQL ledger in one transaction: all of it or nothing. It takes
the data dir's lock, so it refuses while a cortex server owns the dir, and
no server can start on it mid-copy. It changes nothing in the SQLite
ledger. A hold still open there belonged to a request whose outcome died
with the server; it is imported as `orphaned`, charged in full at the
import's time, exactly what SQLite's recovery would do at the next start,
so the two ledgers agree on every balance and no cap can be passed.

Exit codes: 0 done, 1 refused or failed (with a message on stderr), 2 bad
flags (a URL with a password is a bad flag). `status` exits 1 when the
ledger is not at this cortex's schema version.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from cortex.budget import datadir


def _ledger_flag(value: str) -> str:
    try:
        from cortex.budget import pg_schema
    except ImportError:  # `run` says what is missing
        return value
    try:
        return pg_schema.ledger_url(value)
    except pg_schema.LedgerUrlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", required=True, type=_ledger_flag, metavar="URL",
                        help="postgresql://user@host:port/dbname; the password from PGPASSWORD or .pgpass, never the URL")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    db = sub.add_parser("db", help="the PostgreSQL ledger: schema migrations, status, import from SQLite")
    actions = db.add_subparsers(dest="action", required=True)
    actions.add_parser("migrate", parents=[common], help="apply the schema migrations this ledger is missing")
    actions.add_parser("status", parents=[common], help="the ledger's schema version, and the one this cortex runs on")
    imp = actions.add_parser("import", parents=[common],
                             help="copy a data dir's SQLite ledger into an empty, migrated PostgreSQL ledger")
    imp.add_argument("--from-data-dir", required=True, metavar="DIR", help="the data dir whose ledger.db to copy")


class CliError(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        import psycopg

        from cortex.budget import pg_schema
    except ImportError as exc:
        return _fail(f"`cortex db` needs psycopg 3 ({exc}): pip install 'psycopg[binary]'")
    try:
        with pg_schema.connect(args.ledger) as conn:
            code, result = _ACTIONS[args.action](args, conn)
    except (CliError, pg_schema.SchemaError, pg_schema.ImportRefused, datadir.DataDirBusy) as exc:
        return _fail(str(exc))
    except (OSError, sqlite3.Error) as exc:  # the data dir or its SQLite ledger
        return _fail(f"{args.action} failed: {exc}")
    except psycopg.Error as exc:
        return _fail(pg_schema.redact_text(str(exc)).strip())
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else result["message"])
    return code


def _fail(message: str) -> int:
    print(f"cortex: {message}", file=sys.stderr)
    return 1


def _migrate(args: argparse.Namespace, conn: Any) -> tuple[int, dict[str, Any]]:
    from cortex.budget import pg_schema

    before, after = pg_schema.migrate(conn)
    ledger = pg_schema.redact(args.ledger)
    message = (f"{ledger}: schema {before} -> {after}" if after != before
               else f"{ledger}: schema {after}, up to date; nothing to apply")
    return 0, {"ledger": ledger, "from_version": before, "to_version": after, "message": message}


def _status(args: argparse.Namespace, conn: Any) -> tuple[int, dict[str, Any]]:
    from cortex.budget import pg_schema

    version, expected = pg_schema.current_version(conn), pg_schema.SCHEMA_VERSION
    ledger = pg_schema.redact(args.ledger)
    if version == expected:
        state, advice = "current", "up to date"
    elif version > expected:
        state, advice = "newer", "newer than this cortex: upgrade cortex"
    else:
        state = "empty" if version == 0 else "older"
        advice = f"run `cortex db migrate --ledger {ledger}`"
    message = f"{ledger}: schema {version}, this cortex runs on {expected}: {advice}"
    result = {"ledger": ledger, "version": version, "expected_version": expected, "state": state, "message": message}
    return (0 if state == "current" else 1), result


def _import(args: argparse.Namespace, conn: Any) -> tuple[int, dict[str, Any]]:
    from cortex.budget import pg_schema
    from cortex.budget.store import connect as sqlite_connect

    path = datadir.ledger_path(args.from_data_dir)
    if not path.is_file():
        raise CliError(f"no SQLite ledger at {path}")
    lock = datadir.lock(args.from_data_dir)  # DataDirBusy while a server owns it; held until the copy is done
    try:
        source = sqlite_connect(path)  # brings an older SQLite ledger to the current SQLite schema first
        try:
            report = pg_schema.import_sqlite(source, conn, str(Path(path).resolve()), time.time())
        finally:
            source.close()
    finally:
        lock.close()
    view = report.view()
    orphans = (f"; {report.orphaned} holds left open were charged in full ({report.orphaned_tokens} tokens,"
               f" {report.orphaned_usd} micro-USD), as SQLite's recovery would" if report.orphaned else "")
    view["message"] = (
        f"imported {path} into {report.ledger}: {report.accounts} accounts, {report.keys} keys, {report.holds} holds,"
        f" {report.alert_state} fired alerts, {report.alert_outbox} queued alert events{orphans}"
    )
    return 0, view


_ACTIONS = {"migrate": _migrate, "status": _status, "import": _import}
