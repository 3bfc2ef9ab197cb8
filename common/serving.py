"""Serve an ASGI app with Hypercorn's Trio worker; shared by cortex and neuron.

Connections are HTTP/1.1 only and close as soon as the peer closes them
(`common.server_fixes`). Accept errors, such as running out of file
descriptors, are logged as at most one JSON line per interval. The CLIs
raise the soft file-descriptor limit to the hard one at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
from hypercorn.trio import serve as hypercorn_serve

from common import server_fixes
from common.server_fixes import ServerConfig


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


UNIX_PREFIX = "unix:"  # `listen` as "unix:PATH": a Unix socket instead of HOST:PORT
UNIX_SOCKET_MODE = 0o600
DEFAULT_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75.0
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0


def hypercorn_config(
    listen: str,
    graceful_timeout_s: float = 5.0,
    backlog: int = DEFAULT_BACKLOG,
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
    write_timeout_s: float | None = None,
) -> ServerConfig:
    config = ServerConfig()
    if listen.startswith("fd://"):  # a socket bound by `bind_unix`
        config.bind = [listen]
    else:
        host, port = parse_listen(listen)
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # cortex writes its own structured request log
    config.alpn_protocols = ["http/1.1"]  # HTTP/1.1 only, should TLS ever be configured
    config.graceful_timeout = graceful_timeout_s
    config.backlog = backlog
    config.keep_alive_timeout = keep_alive_timeout_s
    config.write_timeout_s = write_timeout_s
    config.h11_max_incomplete_size = 64 * 1024
    return config


def bind_unix(path: str) -> socket.socket:
    """An AF_UNIX stream socket bound at `path`, mode 0600, not yet listening.

    A stale socket file at `path` is replaced, so the caller must know that
    no live server listens there. The mode is set before listen(), and a
    connect() to a socket that does not listen is refused: there is no
    moment when anyone but the owner could connect. (Hypercorn's own unix
    bind sets the process-wide umask instead, and leaves it set if bind fails.)
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound at (host, port) with SO_REUSEPORT, not yet listening: several
    processes bound so share the port, and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class JsonLines(logging.Formatter):
    """One JSON object per line, as cortex logs. Never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {"message": record.getMessage()}
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), **fields}
        return json.dumps(line, separators=(",", ":"), default=str)


class AcceptErrorLog(logging.Filter):
    """Pass at most one record per `interval_s`, as an `accept_failed` event.

    trio.serve_listeners logs every failed accept (EMFILE, ENFILE, ENOMEM,
    ENOBUFS) with a traceback and retries 0.1 s later: ten tracebacks a
    second while the process is out of file descriptors. A passed record
    counts the ones dropped since the previous record it passed.
    """

    def __init__(
        self, interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        assert interval_s > 0
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._dropped += 1
            return False
        self._last = now
        args = record.args if isinstance(record.args, tuple) else ()
        record.fields = {
            "event": "accept_failed",
            "error": args[0] if args else None,  # the errno name, e.g. EMFILE
            "message": record.getMessage(),
            "dropped": self._dropped,
            "next_log_after_s": self.interval_s,
        }
        self._dropped = 0
        return True


_ACCEPT_LOGGER = "trio.serve_listeners"


def install_accept_error_log(interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S) -> None:
    """Send trio's accept errors to stderr as rate-limited JSON lines. Idempotent."""
    logger = logging.getLogger(_ACCEPT_LOGGER)
    if any(isinstance(f, AcceptErrorLog) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(AcceptErrorLog(interval_s))
    logger.handlers[:] = [handler]
    logger.propagate = False  # no second copy, with its traceback, from the root logger


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) after.

    Each client connection holds a file descriptor, and the soft limit is
    often 1024. A limit the system will not grant is left as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. macOS, where the hard limit may be unlimited
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextmanager
def shutdown_signals() -> Iterator[Callable[[], Awaitable[None]]]:
    """A shutdown trigger that returns on SIGINT or SIGTERM.

    The receiver is open from the moment this block is entered, so a signal
    that arrives before the server's trigger task runs is queued, not lost
    to the default action.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def trigger() -> None:
            async for _ in signals:
                return

        yield trigger


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The real errors inside (possibly nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]
    return [exc]


def leaf_error(exc: BaseException, *kinds: type[BaseException]) -> BaseException:
    """The first leaf error of one of `kinds` (any kind if none given), else the first leaf."""
    leaves = leaf_errors(exc)
    for leaf in leaves:
        if not kinds or isinstance(leaf, kinds):
            return leaf
    return leaves[0]


async def serve(
    app: Any,
    listen: str,
    *,
    shutdown_trigger: Any = None,
    graceful_timeout_s: float = 5.0,
    backlog: int = DEFAULT_BACKLOG,
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
    write_timeout_s: float | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns; `started()` reports the bound URLs.

    `reuse_port`: bind HOST:PORT with SO_REUSEPORT, to share it with other
    processes (`cortex serve --workers N`).

    `listen` is HOST:PORT, or "unix:PATH" for a Unix socket (`bind_unix`:
    mode 0600, a stale one replaced). Every connection gets the fixes in
    `common.server_fixes`, whichever the listener.

    `write_timeout_s` limits how long one write to a client may block: one
    ASGI body message, such as an SSE event or a whole non-streamed body.
    When it runs out, the connection is dropped and the app receives
    http.disconnect. None means no limit, as in Hypercorn.
    """
    server_fixes.install()
    install_accept_error_log()
    if listen.startswith(UNIX_PREFIX):
        # Hypercorn wraps the descriptor in a socket of its own, so ours lets go of it.
        listen = f"fd://{bind_unix(listen[len(UNIX_PREFIX):]).detach()}"
    elif reuse_port:
        listen = f"fd://{bind_tcp_reuse_port(*parse_listen(listen)).detach()}"
    config = hypercorn_config(listen, graceful_timeout_s, backlog, keep_alive_timeout_s, write_timeout_s)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout, for supervisors and tests to read."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run_daemon(
    main: Callable[..., Awaitable[None]], *args: Any, prog: str, expected: tuple[type[BaseException], ...], prefix: str = ""
) -> int:
    """`trio.run(main, *args)` as a CLI: 0 on success or Ctrl+C; an expected
    start-up failure (however trio grouped it) is one line on stderr and 1.
    The soft file-descriptor limit is raised to the hard one first."""
    raise_fd_limit()
    try:
        trio.run(main, *args)
    except BaseException as exc:  # noqa: BLE001 - classified below, re-raised if unknown
        leaf = leaf_error(exc, *expected, KeyboardInterrupt)
        if isinstance(leaf, KeyboardInterrupt):
            return 0
        if isinstance(leaf, expected):
            print(f"{prog}: {prefix}{leaf}", file=sys.stderr)
            return 1
        raise
    return 0
