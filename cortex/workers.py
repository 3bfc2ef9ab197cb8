"""`cortex serve --workers N`: N cortex processes on one port, sharing one ledger.

One Python process is one core. The supervisor (this module, in the parent)
reserves the port, starts N workers that each bind it with SO_REUSEPORT (the
kernel spreads new connections over them), and announces one URL once every
worker listens. Each worker is a whole replica: its own event loop, upstream
pools and hold expiry, and the shared ledger's cross-replica protocol for its
budgets (PostgreSQL with --ledger, else the data dir's SQLite file through
cortex/budget/sqlite_shared.py), so N workers keep the same promise as N hosts.

Data dirs: worker 0 uses the data dir itself (so `cortex keys ...` finds its
admin socket), worker i > 0 uses `DATA_DIR/workers/i`. The supervisor holds
the data dir's lock and every worker inherits it (datadir.LOCK_FD_ENV), so the
dir stays locked while any of them lives. A worker that dies is
started again, after a backoff that grows while it keeps dying; SIGTERM (or
SIGINT) is passed to every worker, and the supervisor waits for them to drain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from common.serving import announce, bind_tcp_reuse_port, parse_listen
from cortex.budget import datadir

log = logging.getLogger("cortex")

ORPHAN_POLL_S = 0.5  # how often a worker looks whether its supervisor is still there
RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before starting a dead worker again
HEALTHY_AFTER_S = 60.0  # a worker up this long resets the backoff
STOP_TIMEOUT_S = 120.0  # after the signal, for the workers' own graceful drain: then they are killed
STARTUP_TIMEOUT_S = 120.0  # a worker's first start must listen within this (a cold catalogue, a migration lock)


class WorkerFailed(Exception):
    pass


def worker_data_dir(data_dir: str, index: int) -> str:
    return data_dir if index == 0 else str(Path(data_dir) / "workers" / str(index))


def worker_argv(argv: list[str], index: int, listen: str, data_dir: str, ledger: str) -> list[str]:
    """The worker's command line: the supervisor's, with its own port, data dir, the shared ledger and no --workers."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--listen", "--data-dir", "--ledger"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return [sys.executable, "-m", "cortex", *out, "--listen", listen, "--data-dir", worker_data_dir(data_dir, index),
            "--ledger", ledger, "--reuse-port"]


class Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str] | None = None, lock_fd: int | None = None) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.lock_fd = lock_fd
        self.process: trio.Process | None = None
        self.announcement: dict[str, Any] | None = None
        self.starts = 0


async def supervise(argv: list[str], workers: int, listen: str, data_dir: str, ledger: str) -> None:
    """Run `workers` workers until SIGTERM/SIGINT; announce once all of them listen."""
    host, port = parse_listen(listen)
    # The data dir's lock, for the supervisor's life and inherited by every worker: while any of them
    # lives (worker 0 restarting, or workers outliving a killed supervisor by a moment), no offline CLI,
    # import or second server can take the dir and recover, or judge, a ledger the workers are using.
    with datadir.lock(data_dir) as held:
        env = {**os.environ, datadir.LOCK_FD_ENV: str(held.fileno())}
        # Held (bound, never listening) for the supervisor's life: the port stays ours between worker restarts,
        # and an ephemeral port (0) is chosen once for all of them.
        reserve = bind_tcp_reuse_port(host, port)
        try:
            port = reserve.getsockname()[1]
            shared_listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            pool = [Worker(i, worker_argv(argv, i, shared_listen, data_dir, ledger), env, held.fileno())
                    for i in range(workers)]
            stopping = trio.Event()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    ready = [trio.Event() for _ in pool]
                    running = [trio.Event() for _ in pool]  # set once each worker's keeper has returned
                    for worker, event, done in zip(pool, ready, running):
                        nursery.start_soon(_keep_running, worker, event, stopping, done)
                    nursery.start_soon(_stop_on_signal, signals, pool, stopping, running)
                    for event in ready:
                        await event.wait()
                    if not stopping.is_set():
                        first = pool[0].announcement or {}
                        announce(
                            "listening", service="cortex", url=f"http://{shared_listen}", workers=workers,
                            worker_pids=[w.process.pid for w in pool if w.process is not None],
                            **{k: v for k, v in first.items() if k not in ("event", "service", "url")},
                        )
        finally:
            reserve.close()


def _signal_all(pool: list[Worker], sig: int) -> None:
    for worker in pool:
        if worker.process is not None and worker.process.returncode is None:
            worker.process.send_signal(sig)


async def _stop_on_signal(signals: Any, pool: list[Worker], stopping: trio.Event, running: list[trio.Event]) -> None:
    """The first signal drains every worker (SIGTERM); a second one, or STOP_TIMEOUT_S, kills what is left."""
    async for _ in signals:
        break
    stopping.set()
    _signal_all(pool, signal.SIGTERM)

    async def all_stopped() -> None:
        for done in running:
            await done.wait()

    async with trio.open_nursery() as nursery:
        async def second_signal() -> None:
            async for _ in signals:
                log.warning("a second signal: killing the workers")
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(second_signal)
        with trio.move_on_after(STOP_TIMEOUT_S):
            await all_stopped()
            nursery.cancel_scope.cancel()
            return
        log.error("workers did not stop within %.0f s: killing them", STOP_TIMEOUT_S)
        nursery.cancel_scope.cancel()
    _signal_all(pool, signal.SIGKILL)


async def _keep_running(worker: Worker, ready: trio.Event, stopping: trio.Event, done: trio.Event) -> None:
    try:
        await _run_worker(worker, ready, stopping)
    finally:
        done.set()


async def _run_worker(worker: Worker, ready: trio.Event, stopping: trio.Event) -> None:
    backoff_s = RESTART_BACKOFF_S[0]
    while not stopping.is_set():
        worker.starts += 1
        started_at = trio.current_time()
        process = await trio.lowlevel.open_process(  # -1: subprocess.PIPE
            worker.argv, stdout=-1, stdin=None, env=worker.env, pass_fds=() if worker.lock_fd is None else (worker.lock_fd,))
        worker.process = process
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_announcement, worker, process, ready)
                if worker.starts == 1:
                    nursery.start_soon(_kill_unless_announced, worker, process)
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:  # the supervisor is being cancelled: do not leave an orphan
                process.kill()
                with trio.move_on_after(5, shield=True):
                    await process.wait()
        if stopping.is_set():
            return
        if worker.announcement is None and worker.starts == 1:
            ready.set()  # never started: the supervisor fails rather than waits
            raise WorkerFailed(f"worker {worker.index} exited with status {process.returncode} before it listened")
        if trio.current_time() - started_at > HEALTHY_AFTER_S:
            backoff_s = RESTART_BACKOFF_S[0]
        log.error("worker %d (pid %d) exited with status %s; starting it again in %.1f s",
                  worker.index, process.pid, process.returncode, backoff_s)
        await trio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, RESTART_BACKOFF_S[1])


async def orphan_watch(parent_pid: int, interval_s: float = ORPHAN_POLL_S) -> None:
    """In a worker: return once its supervisor is gone (it was reparented), even after a SIGKILL of it,
    so that no worker outlives its supervisor holding the port. (PR_SET_PDEATHSIG would follow the
    thread that started the worker, which Trio's thread cache retires, not the supervisor.)"""
    while os.getppid() == parent_pid:
        await trio.sleep(interval_s)


async def _kill_unless_announced(worker: Worker, process: trio.Process) -> None:
    """A first start that neither listens nor exits within STARTUP_TIMEOUT_S is a failed start."""
    await trio.sleep(STARTUP_TIMEOUT_S)
    if worker.announcement is None and process.returncode is None:
        log.error("worker %d did not start listening within %.0f s", worker.index, STARTUP_TIMEOUT_S)
        process.kill()


async def _read_announcement(worker: Worker, process: trio.Process, ready: trio.Event) -> None:
    """The worker's first stdout line is its announcement; the rest is passed through."""
    assert process.stdout is not None
    buffer = b""
    async for chunk in process.stdout:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if worker.announcement is None:
                try:
                    worker.announcement = json.loads(line)
                except ValueError:
                    worker.announcement = {}
                ready.set()
            else:
                sys.stdout.buffer.write(line + b"\n")
                sys.stdout.flush()
