"""The `cortex` command: `serve` the gateway, bring `up` the embedded default, administer keys.

`serve` and `up` also serve the admin API on the data dir's Unix socket
(cortex/admin_socket.py), which `cortex keys|accounts|usage|fleet` use
while a server runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cortex import admin_cli, db_cli, fleet_cli, logs
from cortex import config as config_mod
from cortex.admin_socket import AdminSocket
from cortex.api.admin import AdminApi, data_dir_owner
from cortex.app import CortexApp
from cortex.budget import datadir
from cortex.budget.datadir import DataDirBusy
from cortex.budget.ledger import Caps
from cortex.budget.store import StoreError
from cortex.workers import WorkerFailed, orphan_watch, supervise
from cortex.config import SQLITE_LEDGER, Config, ConfigError
from cortex.fleet.catalogue import CatalogueError
from cortex.fleet.kinds import KINDS
from common.serving import announce, leaf_error, run_daemon, serve, shutdown_signals

DEFAULT_UP_LISTEN = "127.0.0.1:8080"
DEMO_BALANCE_TOKENS = 1_000_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cortex", description="cortex: a Trio-native LLM gateway with hard budgets")
    sub = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: `--work 2` would reach the workers, whose command line drops only `--workers`.
    s = sub.add_parser("serve", help="run the gateway in front of neurons", allow_abbrev=False)
    s.add_argument("--listen", help="HOST:PORT to listen on (server.listen; default 127.0.0.1:8080)")
    s.add_argument("--neuron", action="append", dest="neurons", metavar="URL", help="neuron base URL (repeatable; fleet.neurons)")
    s.add_argument(
        "--upstream", action="append", dest="upstreams", metavar="KIND=URL", type=_upstream_flag,
        help=f"an upstream server of a kind ({', '.join(KINDS)}); repeatable; replaces fleet.upstreams",
    )
    s.add_argument("--config", type=Path, help="TOML config file; flags override it")
    s.add_argument("--models", metavar="FILE", help="the model catalogue, models.toml (fleet.models_file)")
    s.add_argument("--data-dir", help="where the ledger lives (budget.data_dir; default .cortex)")
    s.add_argument(
        "--ledger", metavar="URL",
        help="a shared PostgreSQL ledger, postgresql://USER@HOST/DB, for many replicas (budget.ledger); the password"
        " from PGPASSWORD or .pgpass, never in the URL",
    )
    s.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="run N cortex processes on the port (SO_REUSEPORT), one core each, sharing the --ledger",
    )
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    s.add_argument("--admin-token", help="enables /admin/v1/ (admin.token; or CORTEX_ADMIN_TOKEN)")
    s.add_argument("--no-auth", action="store_true", help="serve requests without a key, unbudgeted (development only)")
    s.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="log.level")

    u = sub.add_parser("up", help="run the embedded default: cortex plus a mock neuron (a child process)")
    u.add_argument("--listen", default=DEFAULT_UP_LISTEN, help=f"HOST:PORT (default {DEFAULT_UP_LISTEN})")
    u.add_argument("--data-dir", default=".cortex", help="where the ledger lives (default .cortex)")
    u.add_argument("--log-level", choices=config_mod.LOG_LEVELS, default="info")

    admin_cli.add_commands(sub)
    fleet_cli.add_commands(sub)
    db_cli.add_commands(sub)
    return parser


def _upstream_flag(value: str) -> dict[str, str]:
    kind, sep, url = value.partition("=")
    if not sep or kind not in KINDS or not url:
        raise argparse.ArgumentTypeError(f"expected KIND=URL with KIND one of {', '.join(KINDS)}, got {value!r}")
    return {"kind": kind, "url": url}


def serve_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {"listen": args.listen, "reuse_port": True if args.reuse_port else None},
        "fleet": {"neurons": args.neurons, "upstreams": args.upstreams, "models_file": args.models},
        "budget": {
            "data_dir": args.data_dir, "auth_required": False if args.no_auth else None, "ledger": args.ledger,
        },
        "admin": {"token": args.admin_token or os.environ.get("CORTEX_ADMIN_TOKEN") or None},
        "log": {"level": args.log_level},
    }
    return config_mod.load(args.config, overrides)


class StartupFailed(Exception):
    pass


def _check_started(app: CortexApp) -> None:
    # Hypercorn reports its binds even when the lifespan failed; never announce then.
    if app.startup_error is not None:
        raise StartupFailed(str(leaf_error(app.startup_error, DataDirBusy, StoreError, OSError))) from None
    if app.budget is None:
        raise StartupFailed("the app did not start")


def socket_admin(app: CortexApp) -> AdminApi:
    """The admin handlers for the data dir's socket: the app's ledger, no token (the file's mode is the check)."""
    assert app.budget is not None
    return AdminApi(
        app.budget, None, app.config.server.body_timeout_s, app.reload_catalogue, authorize=data_dir_owner,
        fleet=app.lifecycle,
    )


DRAIN_MARGIN_S = 2.0  # after cortex ends its own requests, before Hypercorn cancels connections


async def run_gateway(config: Config) -> None:
    app = CortexApp(config)
    graceful_s = config.server.graceful_timeout_s
    admin_socket = AdminSocket(config.budget.data_dir)
    with shutdown_signals() as signalled:
        async with trio.open_nursery() as nursery:

            async def trigger() -> None:
                await signalled()
                nursery.start_soon(app.drain, graceful_s)  # ends stragglers cleanly, before Hypercorn does
                # The socket's handlers use the ledger, which the lifespan closes once the TCP side is done.
                await admin_socket.close()

            async def serve_until_done(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(
                    app,
                    config.server.listen,
                    shutdown_trigger=trigger,
                    graceful_timeout_s=graceful_s + DRAIN_MARGIN_S,
                    backlog=config.server.backlog,
                    keep_alive_timeout_s=config.server.keep_alive_timeout_s,
                    write_timeout_s=config.server.client_write_timeout_s,
                    reuse_port=config.server.reuse_port,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # served out: the drain timer has nothing left to do

            binds = await nursery.start(serve_until_done)
            _check_started(app)
            # Only now: the app holds the data dir's lock, so a socket file there is stale.
            socket_path = await nursery.start(
                partial(admin_socket.serve, socket_admin(app), config.server.client_write_timeout_s)
            )
            await nursery.start(reload_on_sighup, app)
            if config.server.reuse_port:  # a worker of --workers: it goes when its supervisor goes
                parent = os.getppid()

                async def stop_when_orphaned() -> None:
                    await orphan_watch(parent)
                    os.kill(os.getpid(), signal.SIGTERM)  # the usual graceful stop

                nursery.start_soon(stop_when_orphaned)
            announce(
                "listening", service="cortex", url=binds[0], neurons=[u.url for u in config.fleet.all_upstreams()],
                data_dir=config.budget.data_dir, admin=bool(config.admin.token), admin_socket=socket_path,
            )


async def reload_on_sighup(app: CortexApp, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGHUP reloads the model catalogue; a bad file is logged and the old one stays."""
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        task_status.started()
        async for _ in hangups:
            try:
                app.reload_catalogue()
            except CatalogueError:
                pass  # logged (catalogue_reload_refused) and counted by the app


NEURON_START_TIMEOUT_S = 30.0


@asynccontextmanager
async def mock_neuron() -> AsyncIterator[str]:
    """A mock neuron as a child process (cortex never imports neuron); yields its URL."""
    argv = [sys.executable, "-m", "neuron", "serve", "--listen", "127.0.0.1:0"]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(NEURON_START_TIMEOUT_S):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise StartupFailed("the mock neuron exited before it was ready")
                line += chunk
        yield json.loads(line)["url"]
    finally:
        with trio.move_on_after(5, shield=True):
            process.terminate()
            await process.wait()
        if process.returncode is None:
            process.kill()


async def run_up(listen: str, data_dir: str) -> None:
    """cortex on `listen` in front of a mock neuron (a child process) on an ephemeral port."""
    admin_token = secrets.token_urlsafe(24)
    with shutdown_signals() as trigger:
        async with mock_neuron() as neuron_url, trio.open_nursery() as nursery:
            config = config_mod.from_mapping({
                "server": {"listen": listen},
                "fleet": {"neurons": [neuron_url]},
                "budget": {"data_dir": data_dir},
                "admin": {"token": admin_token},
            })
            app = CortexApp(config)
            server = config.server
            admin_socket = AdminSocket(data_dir)
            binds = await nursery.start(partial(serve, app, listen, write_timeout_s=server.client_write_timeout_s))
            _check_started(app)
            assert app.budget is not None
            await nursery.start(partial(admin_socket.serve, socket_admin(app), server.client_write_timeout_s))
            _, key = await app.budget.create_key("demo", "demo", Caps(balance_tokens=DEMO_BALANCE_TOKENS))
            print(_welcome(binds[0], neuron_url, key, admin_token), flush=True)
            await trigger()
            await admin_socket.close()  # before the ledger it serves closes
            nursery.cancel_scope.cancel()


def _welcome(url: str, neuron_url: str, key: str, admin_token: str) -> str:
    return f"""
cortex is up at {url}  (mock neuron at {neuron_url}, model `cortex-mock`)
demo key (balance {DEMO_BALANCE_TOKENS:,} tokens): {key}
admin token for {url}/admin/v1/: {admin_token}

  curl {url}/v1/chat/completions -H 'authorization: Bearer {key}' -H 'content-type: application/json' \\
    -d '{{"model": "cortex-mock", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='cortex-mock', messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

Press Ctrl+C to stop.
"""


WORKERS_MAX = 256


def serve_workers(args: argparse.Namespace, config: Config, argv: list[str], expected: tuple[type[BaseException], ...]) -> int:
    if not 1 <= args.workers <= WORKERS_MAX:
        raise ConfigError(f"--workers must be from 1 to {WORKERS_MAX}, got {args.workers}")
    ledger = config.budget.ledger
    if not ledger:
        # One process's ledger judges in its memory; workers share the data dir's file through the
        # cross-replica protocol instead (cortex/budget/sqlite_shared.py).
        ledger = SQLITE_LEDGER + str((Path(config.budget.data_dir) / datadir.LEDGER_FILE).resolve())
    return run_daemon(
        supervise, argv, args.workers, config.server.listen, config.budget.data_dir, ledger,
        prog="cortex", expected=(*expected, WorkerFailed),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("keys", "accounts", "usage"):
        return admin_cli.run(args)
    if args.command == "fleet":
        return fleet_cli.run(args)
    if args.command == "db":
        return db_cli.run(args)
    expected = (StartupFailed, OSError, DataDirBusy, StoreError)
    try:
        if args.command == "serve":
            config = serve_config(args)
            logs.configure(config.log.level)
            if args.workers != 1:
                return serve_workers(args, config, argv if argv is not None else sys.argv[1:], expected)
            return run_daemon(run_gateway, config, prog="cortex", expected=expected)
        config_mod.from_mapping({"server": {"listen": args.listen}})  # validate early
        logs.configure(args.log_level)
        return run_daemon(run_up, args.listen, args.data_dir, prog="cortex", expected=expected)
    except ConfigError as exc:
        print(f"cortex: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
