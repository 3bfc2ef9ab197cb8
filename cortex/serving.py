"""Serve an ASGI app with Hypercorn's Trio worker; shared by cortex and neuron."""

from __future__ import annotations

import json
import signal
import sys
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


def hypercorn_config(listen: str, graceful_timeout_s: float = 5.0) -> HypercornConfig:
    host, port = parse_listen(listen)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # cortex writes its own structured request log
    config.graceful_timeout = graceful_timeout_s
    config.keep_alive_timeout = 75  # longer than common client pool idle times
    config.h11_max_incomplete_size = 64 * 1024
    return config


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM: the trigger for a graceful shutdown."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def serve(
    app: Any,
    listen: str,
    *,
    shutdown_trigger: Any = None,
    graceful_timeout_s: float = 5.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns; `started()` reports the bound URLs."""
    config = hypercorn_config(listen, graceful_timeout_s)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout, for supervisors and tests to read."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()
