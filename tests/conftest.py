"""Fixtures that run real neuron and cortex processes on loopback ports."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

STARTUP_TIMEOUT_S = 30.0


class Proc:
    """A daemon subprocess that announces its URL as a JSON line on stdout."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, cwd=cwd, env=env, start_new_session=True
        )
        self.url = ""
        self.announcement: dict[str, Any] = {}
        self.data_dir: Path | None = None

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> "Proc":
        line = self.read_line(timeout_s)
        self.announcement = json.loads(line)
        self.url = self.announcement["url"]
        return self

    def read_line(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout_s
        buffer = b""
        while not buffer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.popen.poll() is not None and not select.select([self.popen.stdout], [], [], 0)[0]:
                raise RuntimeError(f"{self.argv} did not print a line; log:\n{self.logs()}")
            ready, _, _ = select.select([self.popen.stdout], [], [], min(remaining, 0.2))
            if ready:
                byte = os.read(self.popen.stdout.fileno(), 1)
                if not byte:
                    raise RuntimeError(f"{self.argv} closed stdout; log:\n{self.logs()}")
                buffer += byte
        return buffer.decode()

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()

    def get_json(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=10).json()


class Stack:
    """Starts daemons for one test (or module) and always tears them down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def _start(self, module: str, args: list[str]) -> Proc:
        name = f"{module}-{len(self.procs)}"
        proc = Proc([sys.executable, "-m", module, *args], self.tmp_path / f"{name}.log")
        self.procs.append(proc)
        return proc.wait_ready()

    def neuron(self, *args: str) -> Proc:
        return self._start("neuron", ["serve", "--listen", "127.0.0.1:0", *args])

    def cortex(
        self, *neurons: Any, args: tuple[str, ...] = (), auth: bool = False, data_dir: Path | None = None
    ) -> Proc:
        """cortex serve; without `auth`, unbudgeted (--no-auth) for pure proxy tests."""
        data_dir = data_dir or self.tmp_path / f"data-{len(self.procs)}"
        argv = ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
        if not auth:
            argv.append("--no-auth")
        for n in neurons:
            argv += ["--neuron", getattr(n, "url", n)]
        proc = self._start("cortex", [*argv, *args])
        proc.data_dir = data_dir
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.close()


def wait_until(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll `predicate` until it returns a truthy value; fail after `timeout_s`.

    A bounded wait for an asynchronous effect, not a timing assertion.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


# One PostgreSQL server for the whole run (started on first use), shared by every module that needs it.
from tests.postgres import pg_ledger_url, pg_server, pg_url  # noqa: E402,F401 (fixtures)
