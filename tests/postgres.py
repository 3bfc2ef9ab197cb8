"""A real PostgreSQL server for the tests: `initdb` in a temporary dir, `postgres` on loopback, stopped afterwards.

`pg_server` (session) starts one server for the whole run; `pg_url` (per
test) creates a fresh database on it and returns its URL, with the
password where libpq looks for it (PGPASSFILE), never in the URL. The
server asks for a password over TCP (scram-sha-256), so a test that
connects proves the password really came from the environment.

The binaries: CORTEX_TEST_PG_BINDIR if set, else the newest
/usr/lib/postgresql/*/bin (Debian's layout; scripts/test installs the
`postgresql` package there when it runs as root and finds none), else
`pg_config --bindir`, else `initdb` on PATH. PostgreSQL refuses to run as
root, so as root initdb and postgres run as an unprivileged user
(CORTEX_TEST_PG_USER, default `nobody`) that owns the temporary dir.

Without binaries the PostgreSQL tests fail, with what to do, when the CI
environment variable is set, and skip with the reason anywhere else.

To share the one server between several test modules, import the
fixtures in tests/conftest.py (`from tests.postgres import pg_server,
pg_url`); a module that imports them itself gets a server of its own.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

BINDIR_ENV = "CORTEX_TEST_PG_BINDIR"
USER_ENV = "CORTEX_TEST_PG_USER"
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
SUPERUSER = "cortex"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
LOG_TAIL_LINES = 30
# A test server: durability buys nothing here, and fsync is most of initdb's and every commit's time.
SERVER_SETTINGS = {
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "100",
    "listen_addresses": "127.0.0.1", "logging_collector": "off", "log_min_messages": "warning",
}


def in_ci(environ: Mapping[str, str]) -> bool:
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir(environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """(the dir with initdb and postgres, None) or (None, why there is none)."""
    def usable(path: Path) -> bool:
        return all(os.access(path / name, os.X_OK) for name in ("initdb", "postgres"))

    if environ.get(BINDIR_ENV):
        path = Path(environ[BINDIR_ENV])
        return (path, "") if usable(path) else (None, f"{BINDIR_ENV}={path} has no executable initdb and postgres")
    candidates = sorted(glob.glob(DEBIAN_BINDIRS), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and usable(Path(candidate)):
            return Path(candidate), ""
    return None, f"no PostgreSQL server binaries (initdb, postgres) in {DEBIAN_BINDIRS}, from pg_config, or on PATH"


def unavailable(reason: str, environ: Mapping[str, str]) -> NoReturn:
    """Fail loudly in CI, skip elsewhere; either way say what to do."""
    advice = (
        "scripts/test installs Debian's `postgresql` package when it runs as root (as CI does);"
        f" otherwise install PostgreSQL's server (e.g. `sudo apt-get install postgresql`) or set {BINDIR_ENV}"
        " to a dir holding initdb and postgres"
    )
    if in_ci(environ):
        pytest.fail(f"PostgreSQL is required in CI and is not available: {reason}. {advice}.", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason} ({advice})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError as exc:
        return f"({path}: {exc})"


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


@dataclass
class RunAs:
    """Who runs initdb and postgres: this process's user, or (as root) an unprivileged one."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_this_process(cls, environ: Mapping[str, str]) -> "RunAs":
        if os.geteuid() != 0:
            return cls()
        name = environ.get(USER_ENV, "nobody")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError(f"running as root, PostgreSQL needs an unprivileged user, and there is no {name!r}"
                               f" (set {USER_ENV})") from None
        return cls(entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict[str, Any]:
        return {} if self.uid is None else {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, *paths: Path) -> None:
        if self.uid is not None:
            for path in paths:
                os.chown(path, self.uid, self.gid)


@dataclass
class PgServer:
    bindir: Path
    base: Path
    run_as: RunAs
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def log_path(self) -> Path:
        return self.base / "postgres.log"

    @property
    def pgpass(self) -> Path:
        return self.base / "pgpass"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment to connect to `url()`: the password file."""
        return {"PGPASSFILE": str(self.pgpass)}

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    # --- life -------------------------------------------------------------------------

    @classmethod
    def start(cls, bindir: Path, environ: Mapping[str, str]) -> "PgServer":
        run_as = RunAs.for_this_process(environ)
        parent = Path(tempfile.gettempdir())
        if run_as.uid is not None and not _reachable_by_others(parent):
            parent = Path("/tmp")  # the server's user must be able to reach its dir
        server = cls(bindir, Path(tempfile.mkdtemp(prefix="cortex-pg-", dir=parent)), run_as)
        atexit.register(server.stop)  # should the session end without its fixture's teardown
        try:
            server._initdb()
            server._start()
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self) -> None:
        started = time.perf_counter()
        self.socket_dir.mkdir()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        self.run_as.own(self.base, self.socket_dir, pwfile)
        log = self.base / "initdb.log"
        argv = [
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
        ]
        with open(log, "wb") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=self._env(), timeout=120,
                                  **self.run_as.popen_kwargs())
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {done.returncode}); {log}:\n{_tail(log)}")
        self.timings_s["initdb"] = time.perf_counter() - started

    def _start(self) -> None:
        started = time.perf_counter()
        for attempt in range(START_ATTEMPTS):
            self.port = _free_port()
            settings = [arg for k, v in SERVER_SETTINGS.items() for arg in ("-c", f"{k}={v}")]
            argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.socket_dir),
                    *settings]
            with open(self.log_path, "ab") as out:
                # Its own session: a Ctrl-C meant for pytest does not stop it under the tests' feet.
                self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                                start_new_session=True, **self.run_as.popen_kwargs())
            if self._wait_ready():
                break
            if attempt == START_ATTEMPTS - 1 or "could not bind" not in _tail(self.log_path):
                raise RuntimeError(f"postgres did not start; {self.log_path}:\n{_tail(self.log_path)}")
        self.pgpass.write_text(f"127.0.0.1:{self.port}:*:{SUPERUSER}:{self.password}\n")
        self.pgpass.chmod(0o600)  # libpq ignores a password file others can read
        self.timings_s["start"] = time.perf_counter() - started

    def _wait_ready(self) -> bool:
        import psycopg

        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.admin().close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        return False

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after STOP_TIMEOUT_S; remove the dir. Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.base, ignore_errors=True)

    # --- use --------------------------------------------------------------------------

    def admin(self) -> Any:
        """A superuser connection over the Unix socket (trusted), in autocommit."""
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        from psycopg import sql

        name = f"test_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir, why = find_bindir(os.environ)
    if bindir is None:
        unavailable(why, os.environ)
    if importlib.util.find_spec("psycopg") is None:
        unavailable("the psycopg package is not installed (pip install 'psycopg[binary]')", os.environ)
    server = PgServer.start(bindir, os.environ)  # binaries that do not start are a failure anywhere
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty database; its password is in PGPASSFILE, as an operator's would be."""
    name = pg_server.create_database()
    monkeypatch.delenv("PGPASSWORD", raising=False)
    for key, value in pg_server.env.items():
        monkeypatch.setenv(key, value)
    return pg_server.url(name)


@pytest.fixture
def pg_ledger_url(pg_url: str) -> str:
    """A fresh database migrated to this cortex's schema."""
    from cortex.budget import pg_schema

    with pg_schema.connect(pg_url) as conn:
        pg_schema.migrate(conn)
    return pg_url
