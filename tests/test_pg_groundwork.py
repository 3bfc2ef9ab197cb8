"""The PostgreSQL ledger's groundwork, against a real server: migrations, the schema check, URLs, `cortex db`, import."""

from __future__ import annotations

import argparse
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cortex import db_cli
from cortex.budget import datadir, pg_schema
from cortex.budget.alerts import AlertRule
from cortex.budget.estimate import Estimate
from cortex.budget.ledger import Caps
from cortex.budget.periods import PeriodSpec
from cortex.budget.pricing import Prices
from cortex.budget.service import BudgetService
from cortex.budget.store import SyncStore, connect as sqlite_connect, recover_and_load
from cortex.config import BudgetConfig
from cortex.fleet.catalogue import Cost
from cortex.metrics import GatewayMetrics
from tests.postgres import PgServer, find_bindir, unavailable

NOW = 1_796_126_400.0  # 2026-12-01T12:00:00Z
N = pg_schema.SCHEMA_VERSION


def db(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`cortex db ...` in this process: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="cortex")
    db_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        code = db_cli.run(parser.parse_args(["db", *argv]))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def versions(conn: psycopg.Connection[Any]) -> list[int]:
    return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def slow_steps(count: int) -> tuple[pg_schema.Migration, ...]:
    """Steps that each create a table and take a while: two replicas applying one would collide."""
    return tuple((v, (f"CREATE TABLE step_{v} (x INTEGER)", "SELECT pg_sleep(0.02)")) for v in range(1, count + 1))


# --- migrations and the schema check --------------------------------------------------------


def test_migrate_builds_the_schema_on_an_empty_database_and_a_second_run_applies_nothing(pg_url):
    with pg_schema.connect(pg_url) as conn:
        assert pg_schema.current_version(conn) == 0
        assert pg_schema.migrate(conn) == (0, N)
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables >= {*pg_schema.DATA_TABLES, "meta", "schema_version"}
        applied = conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall()
        assert pg_schema.migrate(conn) == (N, N)
        assert conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall() == applied
        assert pg_schema.check(conn) == N


def test_the_schema_keeps_held_amounts_in_the_principal_rows_and_leases_on_holds(pg_url):
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
        columns = {
            (r[0], r[1]): r[2] for r in conn.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public'"
            )
        }
        for table in ("accounts", "keys"):
            for column in ("spent_tokens", "spent_usd", "held_tokens", "held_usd", "balance_usd", "period_tokens"):
                assert columns[(table, column)] == "bigint", (table, column)
        assert columns[("keys", "key_hash")] == "bytea"
        assert columns[("holds", "created_at")] == "double precision"
        assert {("holds", "replica_id"), ("holds", "lease_deadline"), ("replicas", "heartbeat_at")} <= set(columns)
        conn.execute("INSERT INTO accounts (id, created_at) VALUES ('a', 1)")
        with pytest.raises(psycopg.errors.CheckViolation):  # an open hold must say whose it is and until when
            conn.execute("INSERT INTO holds (id, key_id, account_id, amount_tokens, created_at, expires_at, state)"
                         " VALUES ('h', 'k', 'a', 1, 1, 2, 'open')")


def test_concurrent_migrations_apply_each_step_exactly_once(pg_url):
    steps = slow_steps(5)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        try:
            with pg_schema.connect(pg_url) as conn:
                barrier.wait()
                results.append(pg_schema.migrate(conn, steps))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(to for _, to in results) == [5] * 4
    with pg_schema.connect(pg_url) as conn:
        assert versions(conn) == [1, 2, 3, 4, 5]  # the primary key would have refused a second copy anyway
        assert conn.execute("SELECT COUNT(*) FROM pg_tables WHERE tablename LIKE 'step_%'").fetchone()[0] == 5


def test_concurrent_migrations_of_the_real_schema_agree(pg_url):
    results: list[tuple[int, int]] = []
    barrier = threading.Barrier(3)

    def replica() -> None:
        with pg_schema.connect(pg_url) as conn:
            barrier.wait()
            results.append(pg_schema.migrate(conn))

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Each step once: a replica may start between two steps, and then finishes the rest.
    assert sorted(results)[0] == (0, N) and all(to == N for _, to in results)
    assert sum(1 for start, _ in results if start == 0) == 1


def test_a_ledger_newer_than_this_cortex_is_refused_and_left_alone(pg_url, capsys):
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, 0)", (N + 1,))
        message = f"this cortex is older than the ledger's schema {N + 1}"
        with pytest.raises(pg_schema.SchemaError, match=message):
            pg_schema.check(conn)
        with pytest.raises(pg_schema.SchemaError, match=message):
            pg_schema.migrate(conn)
        assert versions(conn) == [*range(1, N + 1), N + 1]
    code, out, _ = db(capsys, "status", "--ledger", pg_url)
    assert code == 1 and "newer than this cortex" in out


def test_a_ledger_older_than_this_cortex_is_refused_with_the_command_that_fixes_it(pg_url):
    with pg_schema.connect(pg_url) as conn:
        with pytest.raises(pg_schema.SchemaError, match=r"has no cortex schema: run `cortex db migrate --ledger "):
            pg_schema.check(conn)
        pg_schema.migrate(conn)
        newer = (*pg_schema.MIGRATIONS, (N + 1, ("CREATE TABLE later (x INTEGER)",)))
        with pytest.raises(pg_schema.SchemaError) as refused:
            pg_schema.check(conn, expected=N + 1)
        assert f"has schema {N}, older than this cortex's {N + 1}" in str(refused.value)
        assert f"run `cortex db migrate --ledger {pg_url}`" in str(refused.value)
        assert pg_schema.migrate(conn, newer) == (N, N + 1)
        assert pg_schema.check(conn, expected=N + 1) == N + 1


# --- URLs and passwords ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://cortex:s3cret@127.0.0.1:5432/cortex",
    "postgresql://cortex@127.0.0.1:5432/cortex?password=s3cret",
    "postgres://:s3cret@db/cortex",
    "postgresql://cortex@db/cortex?sslpassword=s3cret",  # an SSL key's passphrase is as secret
    "postgresql://cortex@db/cortex?pass%77ord=s3cret",  # libpq decodes a parameter's name
])
def test_a_url_with_a_password_is_refused_without_repeating_it(url, capsys):
    with pytest.raises(pg_schema.LedgerUrlError) as refused:
        pg_schema.connect(url)
    message = str(refused.value)
    assert "PGPASSWORD" in message and ".pgpass" in message and "s3cret" not in message
    code, _, err = db(capsys, "migrate", "--ledger", url)
    assert code == 2 and "PGPASSWORD" in err and "s3cret" not in err


@pytest.mark.parametrize("url, redacted", [
    ("postgresql://cortex:s3cret@db:5432/cortex", "postgresql://cortex@db:5432/cortex"),
    ("postgresql://cortex:s3@cr@et@db/cortex", "postgresql://cortex@db/cortex"),  # an unescaped '@' in it
    ("postgresql://cortex@db/cortex?password=s3cret&sslmode=require", "postgresql://cortex@db/cortex?sslmode=require"),
    ("postgresql://cortex@db/cortex?sslmode=require&password=s3cret", "postgresql://cortex@db/cortex?sslmode=require"),
    ("postgresql://cortex@db/cortex?sslmode=require&sslpassword=s3cret", "postgresql://cortex@db/cortex?sslmode=require"),
    ("host=db password=s3cret user=cortex", "host=db password=(redacted) user=cortex"),
    ("host=db sslpassword='s3 cret' user=cortex", "host=db sslpassword=(redacted) user=cortex"),
    ("postgresql://cortex@db/cortex?pass%77ord=s3cret&sslmode=require", "postgresql://cortex@db/cortex?sslmode=require"),
    ("postgresql://cortex@db/cortex?%70assword=s3cret", "postgresql://cortex@db/cortex"),  # libpq decodes names
    ("postgresql://cortex@db/cortex?sslpass%77ord=s3cret&PASSWORD=s3cret", "postgresql://cortex@db/cortex"),
    ("postgresql://cortex@db:5432/cortex", "postgresql://cortex@db:5432/cortex"),
])
def test_redact_removes_every_form_of_password(url, redacted):
    assert pg_schema.redact(url) == redacted
    assert pg_schema.redact_text(f"cannot reach {url}: refused") == f"cannot reach {redacted}: refused"


def test_ledger_connections_notice_a_vanished_peer_within_seconds_unless_the_url_says_otherwise(pg_url):
    with pg_schema.connect(pg_url) as conn:
        params = conn.info.get_parameters()
        assert (params["keepalives_idle"], params["tcp_user_timeout"]) == ("5", "10000")
    with pg_schema.connect(pg_url + "?keepalives_idle=30") as conn:
        assert conn.info.get_parameters()["keepalives_idle"] == "30"


def test_the_password_comes_from_pgpassfile_or_pgpassword_never_the_url(pg_server, pg_url, monkeypatch, tmp_path):
    with pg_schema.connect(pg_url) as conn:  # PGPASSFILE, set by the fixture
        assert conn.execute("SELECT 1").fetchone() == (1,)
    empty = tmp_path / "pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(empty))
    with pytest.raises(psycopg.OperationalError) as refused:
        pg_schema.connect(pg_url)
    assert "password" in str(refused.value) and pg_server.password not in str(refused.value)
    monkeypatch.setenv("PGPASSWORD", pg_server.password)
    with pg_schema.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_migrate_and_status_report_the_versions(pg_url, capsys):
    code, out, _ = db(capsys, "status", "--ledger", pg_url)
    assert code == 1 and f"schema 0, this cortex runs on {N}: run `cortex db migrate --ledger {pg_url}`" in out
    code, out, _ = db(capsys, "migrate", "--ledger", pg_url)
    assert code == 0 and out.strip() == f"{pg_url}: schema 0 -> {N}"
    code, out, _ = db(capsys, "migrate", "--ledger", pg_url, "--json")
    assert code == 0 and f'"from_version": {N}' in out and f'"to_version": {N}' in out
    code, out, _ = db(capsys, "status", "--ledger", pg_url, "--json")
    assert code == 0 and '"state": "current"' in out and f'"expected_version": {N}' in out


def test_cli_reports_an_unreachable_ledger_with_exit_1(capsys):
    code, _, err = db(capsys, "status", "--ledger", f"postgresql://cortex@127.0.0.1:{_closed_port()}/cortex")
    assert code == 1 and err.startswith("cortex: cannot connect to the ledger at postgresql://cortex@127.0.0.1:")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- import ----------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def build_sqlite_ledger(data_dir: Path) -> dict[str, Any]:
    """A SQLite ledger made by the real code: caps of every kind, settled, released and open holds, fired alerts."""
    data_dir.mkdir()
    clock = Clock(NOW)

    async def service() -> tuple[BudgetService, sqlite3.Connection]:
        conn = sqlite_connect(datadir.ledger_path(data_dir))
        config = BudgetConfig(data_dir=str(data_dir))
        return await BudgetService.load(SyncStore(conn), clock, config, GatewayMetrics()), conn

    first, conn = await service()
    await first.create_account("team", Caps(balance_usd=50_000_000))
    agent, _ = await first.create_key(
        "agent", "team", Caps(balance_tokens=10_000, max_concurrency=4, period=PeriodSpec("monthly", "Europe/Berlin", 15),
                              period_tokens=5_000)
    )
    solo, _ = await first.create_key("solo", None, Caps(balance_usd=2_000_000, period=PeriodSpec("daily"), period_usd=900_000))
    old, _ = await first.create_key("old", "team", Caps())
    await first.revoke(old.id)
    prices = Prices.from_cost(Cost(1.0, 4.0))
    for i, (key, actual) in enumerate([(agent, 120), (agent, 80), (solo, 50)]):
        hold = await first.reserve(key, Estimate(100, 100), f"r{i}", "m", f"client-{i}", prices)
        clock.now += 1
        await first.settle(hold, actual, prices.charge_usd(actual // 2, 0, actual - actual // 2))
    await first.release(await first.reserve(agent, Estimate(10, 10), "r-released", "m", None, prices))
    await first.start_alerts((AlertRule("ops", "http://127.0.0.1:9/hook", thresholds=(0.01,)),))  # fires; never sent
    conn.close()
    # A restart without alert rules adds the window cap: the alert sweep cannot yet price a window
    # (cap_levels passes windows no epoch).
    second, conn = await service()
    await second.set_caps("account", "team", Caps(balance_usd=50_000_000, window_tokens=100_000, window_s=3600.0))
    open_hold = await second.reserve(agent, Estimate(300, 200), "r-open", "m", None, prices)
    conn.close()  # the server "dies" with the hold open
    return {"agent": agent.id, "solo": solo.id, "open": open_hold}


def rows(conn: Any, table: str) -> list[dict[str, Any]]:
    columns = list(pg_schema.IMPORT_COLUMNS[table])
    key = "seq" if table == "alert_outbox" else ", ".join(columns[:5])
    fetched = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}").fetchall()
    return [{c: (bytes(v) if isinstance(v, (bytes, memoryview)) else v) for c, v in zip(columns, r)} for r in fetched]


def recovered_copy(data_dir: Path, tmp_path: Path, now: float) -> sqlite3.Connection:
    """What SQLite's own recovery makes of the ledger, on a copy."""
    source = sqlite3.connect(datadir.ledger_path(data_dir))
    copy = sqlite3.connect(tmp_path / "recovered.db")
    source.backup(copy)
    source.close()
    recover_and_load(copy, now, 3600.0)
    return copy


async def test_import_copies_every_row_and_charges_open_holds_as_recovery_would(tmp_path, pg_url, capsys):
    data_dir = tmp_path / "data"
    made = await build_sqlite_ledger(data_dir)
    source = sqlite3.connect(datadir.ledger_path(data_dir))
    before = {table: rows(source, table) for table in pg_schema.IMPORT_COLUMNS}
    assert before["alert_state"] and before["alert_outbox"]  # the alerts did fire: something to copy
    assert [h["state"] for h in before["holds"]].count("open") == 1
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
    started = time.time()
    code, out, err = db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url, "--json")
    assert code == 0, err
    open_hold = made["open"]
    assert '"orphaned": 1' in out and f'"orphaned_tokens": {open_hold.amount_tokens}' in out
    with pg_schema.connect(pg_url) as conn:
        after = {table: rows(conn, table) for table in pg_schema.IMPORT_COLUMNS}
        # Holds: the same rows, the open one orphaned at its held amount at the import's time.
        imported = {h["id"]: h for h in after["holds"]}
        assert len(imported) == len(before["holds"])
        for hold in before["holds"]:
            if hold["state"] != "open":
                assert imported[hold["id"]] == hold
        orphan = imported[open_hold.id]
        assert (orphan["state"], orphan["charged_tokens"], orphan["charged_usd"]) == (
            "orphaned", open_hold.amount_tokens, open_hold.amount_usd)
        assert open_hold.amount_usd > 0 and started <= orphan["resolved_at"] <= time.time()
        # Principals: every column as it was, spent raised by the orphaned charge, which is what recovery gives.
        recovered = recovered_copy(data_dir, tmp_path, orphan["resolved_at"])
        for table in ("accounts", "keys"):
            assert after[table] == rows(recovered, table)
            changed = {r["id"] for r in before[table]} - {r["id"] for r in after[table] if r in before[table]}
            assert changed == {open_hold.key_id if table == "keys" else open_hold.account_id}
        agent = next(r for r in after["keys"] if r["id"] == made["agent"])
        old_agent = next(r for r in before["keys"] if r["id"] == made["agent"])
        assert agent["spent_tokens"] == old_agent["spent_tokens"] + open_hold.amount_tokens
        assert agent["spent_usd"] == old_agent["spent_usd"] + open_hold.amount_usd
        team = next(r for r in after["accounts"] if r["id"] == "team")
        assert (team["balance_usd"], team["window_tokens"], team["window_s"]) == (50_000_000, 100_000, 3600.0)
        assert (agent["max_concurrency"], agent["period"], agent["period_timezone"], agent["period_anchor_day"]) == (
            4, "monthly", "Europe/Berlin", 15)
        # Every principal's spend is exactly its holds' charges, and nothing is held.
        for table, column in (("keys", "key_id"), ("accounts", "account_id")):
            mismatched = conn.execute(
                f"SELECT p.id FROM {table} p LEFT JOIN (SELECT {column} AS id, SUM(charged_tokens) AS t,"
                f" SUM(charged_usd) AS u FROM holds GROUP BY {column}) h USING (id)"
                " WHERE p.spent_tokens <> COALESCE(h.t, 0) OR p.spent_usd <> COALESCE(h.u, 0)"
                " OR p.held_tokens <> 0 OR p.held_usd <> 0 OR p.in_flight <> 0"
            ).fetchall()
            assert mismatched == []
        assert conn.execute("SELECT SUM(spent_tokens), SUM(spent_usd) FROM keys").fetchone() == (
            sum(h["charged_tokens"] for h in after["holds"]), sum(h["charged_usd"] for h in after["holds"]))
        # Alerts: state and outbox as they were; new events continue after the imported ones.
        for table in ("alert_state", "alert_outbox", "alert_counters"):
            assert after[table] == before[table]
        seq = conn.execute("INSERT INTO alert_outbox (event_id, rule_id, url, body, created_at, next_attempt_at)"
                           " VALUES ('evt_new', 'ops', 'u', '', 0, 0) RETURNING seq").fetchone()[0]
        assert seq == max(r["seq"] for r in before["alert_outbox"]) + 1
        assert conn.execute("SELECT v FROM meta WHERE k = 'imported_from'").fetchone()[0].endswith("ledger.db")
    # The source resolves nothing: its hold is still open there.
    assert rows(sqlite3.connect(datadir.ledger_path(data_dir)), "holds") == before["holds"]


def test_import_copies_every_column_the_sqlite_ledger_has(tmp_path):
    source = sqlite_connect(tmp_path / "ledger.db")
    for table, columns in pg_schema.IMPORT_COLUMNS.items():
        assert {r[1] for r in source.execute(f"PRAGMA table_info({table})")} == set(columns), table


async def test_import_refuses_a_target_that_is_not_empty_and_changes_nothing(tmp_path, pg_url, capsys):
    data_dir = tmp_path / "data"
    await build_sqlite_ledger(data_dir)
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
        conn.execute("INSERT INTO replicas (id, started_at, heartbeat_at) VALUES ('r1', 1, 1)")
    code, _, err = db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url)
    assert code == 1 and "is not empty (its replicas table has rows)" in err and "nothing was changed" in err
    with pg_schema.connect(pg_url) as conn:
        assert conn.execute("SELECT (SELECT COUNT(*) FROM keys) + (SELECT COUNT(*) FROM holds)").fetchone() == (0,)
        conn.execute("DELETE FROM replicas")
    assert db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url)[0] == 0
    code, _, err = db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url)
    assert code == 1 and "is not empty (its accounts table has rows)" in err


async def test_import_refuses_while_a_server_owns_the_data_dir(tmp_path, pg_url, capsys):
    data_dir = tmp_path / "data"
    await build_sqlite_ledger(data_dir)
    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
    lock = datadir.lock(data_dir)  # what a running server holds
    try:
        code, _, err = db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url)
    finally:
        lock.close()
    assert code == 1 and "in use by a running cortex" in err
    with pg_schema.connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM accounts").fetchone() == (0,)


async def test_import_refuses_an_unmigrated_target_and_a_missing_source(tmp_path, pg_url, capsys):
    data_dir = tmp_path / "data"
    await build_sqlite_ledger(data_dir)
    code, _, err = db(capsys, "import", "--from-data-dir", str(data_dir), "--ledger", pg_url)
    assert code == 1 and "has no cortex schema: run `cortex db migrate --ledger" in err
    code, _, err = db(capsys, "import", "--from-data-dir", str(tmp_path / "nowhere"), "--ledger", pg_url)
    assert code == 1 and "no SQLite ledger at" in err


# --- the fixture itself ------------------------------------------------------------------------


def test_missing_postgresql_fails_loudly_in_ci_and_skips_elsewhere(tmp_path):
    environ = {"CORTEX_TEST_PG_BINDIR": str(tmp_path)}
    bindir, why = find_bindir(environ)
    assert bindir is None and "CORTEX_TEST_PG_BINDIR" in why
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        unavailable(why, {**environ, "CI": "true"})
    for elsewhere in (environ, {**environ, "CI": "false"}):
        with pytest.raises(pytest.skip.Exception, match="PostgreSQL not available"):
            unavailable(why, elsewhere)
