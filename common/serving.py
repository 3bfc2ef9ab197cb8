"""Serve an ASGI app with Hypercorn's Trio worker; shared by cortex and neuron."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


DEFAULT_BACKLOG = 4096
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75.0


def hypercorn_config(
    listen: str,
    graceful_timeout_s: float = 5.0,
    backlog: int = DEFAULT_BACKLOG,
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
) -> HypercornConfig:
    host, port = parse_listen(listen)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # cortex writes its own structured request log
    config.graceful_timeout = graceful_timeout_s
    config.backlog = backlog
    config.keep_alive_timeout = keep_alive_timeout_s
    config.h11_max_incomplete_size = 64 * 1024
    return config


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
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns; `started()` reports the bound URLs."""
    config = hypercorn_config(listen, graceful_timeout_s, backlog, keep_alive_timeout_s)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout, for supervisors and tests to read."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run_daemon(
    main: Callable[..., Awaitable[None]], *args: Any, prog: str, expected: tuple[type[BaseException], ...], prefix: str = ""
) -> int:
    """`trio.run(main, *args)` as a CLI: 0 on success or Ctrl+C; an expected
    start-up failure (however trio grouped it) is one line on stderr and 1."""
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
