"""`cortex keys`, `cortex accounts`, `cortex usage`: administration of the data dir.

Each command is one admin API call (`call_for`, pure). While a cortex server
owns the data dir (it holds the lock), its in-memory ledger is
authoritative: the call goes to it over the data dir's admin socket
(cortex/admin_socket.py). With no server, the CLI takes the lock and runs
the same admin handlers in-process on the ledger files, through the same
`BudgetService`. Either way the answer, and so the output and the exit
code, is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import trio

from common.errors import ApiError
from cortex import admin_socket
from cortex.admin_socket import Call, Reply
from cortex.api.admin import (
    LIMIT_FIELDS, PERIOD_FIELDS, POLICY_FIELDS, RECENT_DEFAULT, USD_FIELDS, AdminApi, caps_from, data_dir_owner,
)
from cortex.budget import datadir
from cortex.budget.keys import NAME_RE
from cortex.budget.service import BudgetService
from cortex.budget.store import StoreError, SyncStore, connect, read_meta
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics

# A change that finds the data dir locked with no socket answering (a server
# starting or stopping, another offline CLI) tries again for this long.
BUSY_WAIT_S = 5.0
BUSY_POLL_S = 0.05


class CliError(Exception):
    pass


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    # Each dest is a field of LIMIT_FIELDS, USD_FIELDS or PERIOD_FIELDS: a new cap is a flag here and a field there.
    p.add_argument("--balance", type=int, dest="balance_tokens", metavar="TOKENS", help="hard lifetime balance in tokens")
    p.add_argument("--balance-usd", metavar="USD", help="hard lifetime balance in USD (at the catalogue's prices)")
    p.add_argument("--window-tokens", type=int, metavar="N", help="at most N tokens in any trailing window")
    p.add_argument("--window-usd", metavar="USD", help="at most this many USD in any trailing window")
    p.add_argument("--window-seconds", type=float, metavar="S", help="the window's length")
    p.add_argument("--period", choices=("daily", "weekly", "monthly"), help="a calendar period that resets at its boundary")
    p.add_argument("--period-tokens", type=int, metavar="N", help="at most N tokens per period")
    p.add_argument("--period-usd", metavar="USD", help="at most this many USD per period")
    p.add_argument("--period-timezone", metavar="ZONE", help="the period's zone (IANA name; default budget.period_timezone)")
    p.add_argument("--period-anchor-day", type=int, metavar="D",
                   help="monthly: the day of the month it starts (1-31, clamped to short months); weekly: ISO weekday (1=Monday)")
    p.add_argument("--max-concurrency", type=int, metavar="M", help="at most M requests in flight")
    p.add_argument("--output-holds", choices=("worst_case", "incremental"),
                   help="hold each request's whole output bound (worst_case), or a slice at a time (incremental);"
                   " default: the account's, else budget.output_holds")


def add_top_up_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("tokens", type=int, nargs="?", help="tokens to add to the token balance")
    p.add_argument("--usd", metavar="USD", help="USD to add to the USD balance")


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".cortex", help="the data dir (default .cortex)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--ledger", metavar="URL", default=os.environ.get("CORTEX_LEDGER") or None,
        help="a shared PostgreSQL ledger (or CORTEX_LEDGER): act on it directly; every replica sees the change within a second",
    )

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", parents=[common], help="create a key; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--account", help="the account it belongs to (created if new; default 'default')")
    add_limit_flags(create)
    keys.add_parser("list", parents=[common])
    for action in ("show", "revoke"):
        keys.add_parser(action, parents=[common]).add_argument("id")
    add_top_up_flags(keys.add_parser("topup", parents=[common], help="raise a key's balance (tokens, --usd, or both)"))
    limits = keys.add_parser("set-limits", parents=[common], help="replace a key's limits (unset flags: no cap)")
    limits.add_argument("id")
    add_limit_flags(limits)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    acreate = accounts.add_parser("create", parents=[common])
    acreate.add_argument("id")
    add_limit_flags(acreate)
    accounts.add_parser("list", parents=[common])
    accounts.add_parser("show", parents=[common]).add_argument("id")
    add_top_up_flags(accounts.add_parser("topup", parents=[common], help="raise an account's balance"))
    alimits = accounts.add_parser("set-limits", parents=[common])
    alimits.add_argument("id")
    add_limit_flags(alimits)

    usage = sub.add_parser(
        "usage", parents=[common], help="spent, held and remaining per cap; spend per period, model and day; recent requests"
    )
    usage.add_argument("id", nargs="?", help="a key id (default: every key)")


def limit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags as admin API fields, checked here with the server's own rules and messages."""
    fields = {name: getattr(args, name, None) for name in (*LIMIT_FIELDS, *USD_FIELDS, *PERIOD_FIELDS, *POLICY_FIELDS)}
    caps_from(fields)  # raises the ApiError the server would answer; NaN never reaches the JSON
    return fields


def top_up_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.tokens is None and args.usd is None:
        raise CliError("a top-up needs TOKENS, --usd, or both")
    return {k: v for k, v in (("tokens", args.tokens), ("usd", args.usd)) if v is not None}


def _path_id(kind: str, value: str) -> str:
    # Every key id and account name matches NAME_RE, so nothing else exists to find,
    # and nothing that needs quoting goes into the URL.
    if not NAME_RE.fullmatch(value):
        raise ApiError(404, f"No {kind} {value!r}.", code="not_found")
    return value


def call_for(args: argparse.Namespace) -> Call:
    """The admin API request that does this command."""
    group, action = args.command, getattr(args, "action", None)
    if group == "usage":
        if args.id is None:
            return Call("GET", f"usage?recent={RECENT_DEFAULT}")
        return Call("GET", f"usage/{_path_id('key', args.id)}")
    kind, base = ("key", "keys") if group == "keys" else ("account", "accounts")
    if action == "list":
        return Call("GET", base)
    if action == "create":
        if group == "keys":
            return Call("POST", "keys", {"name": args.name, "account": args.account, **limit_fields(args)})
        return Call("POST", "accounts", {"id": args.id, **limit_fields(args)})
    path = f"{base}/{_path_id(kind, args.id)}"
    if action == "show":
        return Call("GET", path)
    if action == "topup":
        return Call("POST", f"{path}/topup", top_up_fields(args))
    if action == "set-limits":
        return Call("POST", f"{path}/limits", limit_fields(args))
    assert action == "revoke" and kind == "key", (group, action)
    return Call("POST", f"{path}/revoke")


def result_of(args: argparse.Namespace, body: Any) -> Any:
    """What the CLI prints, from the API's answer: `usage ID` is a list of one, as `usage` is."""
    if args.command == "usage" and args.id is not None:
        return {"data": [body]}
    return body


def run(args: argparse.Namespace) -> int:
    try:
        request = call_for(args)
        if args.ledger:
            reply = trio.run(perform_shared, args.ledger, request)
        else:
            reply = trio.run(perform, args.data_dir, request)
    except ApiError as exc:  # refused before any I/O: the arguments themselves
        return _fail(exc.message)
    except CliError as exc:
        return _fail(str(exc))
    if not reply.ok:
        return _fail(reply.error_message())
    result = result_of(args, reply.body)
    print(json.dumps(result, indent=2) if args.json else render(args, result))
    return 0


def _fail(message: str) -> int:
    # "cortex: no key 'x'.": a CLI message goes on in lower case, as the API's sentence would not.
    if len(message) > 1 and message[0].isupper() and message[1].islower():
        message = message[0].lower() + message[1:]
    print(f"cortex: {message}", file=sys.stderr)
    return 1


async def perform(data_dir: str, request: Call) -> Reply:
    """Ask the server that owns the data dir, or, with none, the ledger files."""
    change = request.method != "GET"
    socket = datadir.socket_path(data_dir)
    deadline = trio.current_time() + BUSY_WAIT_S
    while True:
        try:
            lock = datadir.lock(data_dir)
        except datadir.DataDirBusy as busy:
            try:
                return await admin_socket.call(admin_socket.socket_transport(socket), request)
            except admin_socket.NoServer:
                pass  # none yet or none any more, or a server without the socket (an older cortex)
            except admin_socket.NoAnswer as exc:
                raise CliError(
                    f"the cortex serving {data_dir} did not answer on {socket} ({exc})"
                    + ("; the change may or may not have been made" if change else "")
                ) from None
            if not change:
                return await offline(data_dir, request, writable=False)  # what the files say, as of now
            if trio.current_time() >= deadline:
                raise CliError(f"{busy}, and it does not answer on {socket}; stop it, or use the admin API (/admin/v1/)") from None
            await trio.sleep(BUSY_POLL_S)
            continue
        try:
            return await offline(data_dir, request, writable=True)
        finally:
            lock.close()


async def offline(data_dir: str, request: Call, writable: bool) -> Reply:
    """The admin handlers in this process, on the ledger files; `writable` only under the lock."""
    conn = connect(datadir.ledger_path(data_dir))
    try:
        store = SyncStore(conn, recover=writable)
        # The server's defaults, as it last wrote them: offline and online answer alike.
        config = BudgetConfig(data_dir=data_dir, period_timezone=read_meta(conn, "period_timezone") or "UTC")
        service = await BudgetService.load(store, time.time, config, GatewayMetrics())
        admin = AdminApi(service, None, authorize=data_dir_owner)
        return await admin_socket.call(admin_socket.local_transport(admin), request)
    finally:
        conn.close()


async def perform_shared(url: str, request: Call) -> Reply:
    """The admin handlers in this process, on the shared ledger: no replica is registered, nothing is admitted;
    the change is one transaction that every replica hears of (LISTEN/NOTIFY)."""
    from cortex.budget.pg_shared import PgShared
    from cortex.budget.shared_service import SharedBudgetService

    try:
        async with PgShared.open(url, admission=False) as shared:
            config = BudgetConfig(period_timezone=await shared.read_meta("period_timezone") or "UTC")
            service = await SharedBudgetService.load(shared, time.time, config, GatewayMetrics())
            admin = AdminApi(service, None, authorize=data_dir_owner)
            return await admin_socket.call(admin_socket.local_transport(admin), request)
    except StoreError as exc:
        raise CliError(f"the ledger: {exc}") from None


# --- human output -------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _usd(value: float) -> str:
    """$1.50, $0.000123: six decimals at most, two at least."""
    whole, _, frac = f"{abs(value):,.6f}".partition(".")
    return f"{'-' if value < 0 else ''}${whole}.{frac.rstrip('0').ljust(2, '0')}"


def _limits_line(limits: dict[str, Any]) -> str:
    parts = []
    if limits["balance_tokens"] is not None:
        parts.append(f"balance {limits['balance_tokens']}")
    if limits.get("balance_usd") is not None:
        parts.append(f"balance {_usd(limits['balance_usd'])}")
    window = [f"{limits['window_tokens']}" if limits["window_tokens"] is not None else None,
              _usd(limits["window_usd"]) if limits.get("window_usd") is not None else None]
    if any(window):
        parts.append(f"{' and '.join(w for w in window if w)} per {limits['window_seconds']:g}s")
    if limits.get("period") is not None:
        amounts = [f"{limits['period_tokens']}" if limits["period_tokens"] is not None else None,
                   _usd(limits["period_usd"]) if limits["period_usd"] is not None else None]
        parts.append(f"{' and '.join(a for a in amounts if a)} {limits['period']} ({limits['period_timezone']})")
    if limits["max_concurrency"] is not None:
        parts.append(f"concurrency {limits['max_concurrency']}")
    line = ", ".join(parts) or "no caps"
    if limits.get("output_holds") is not None:
        line += f"; output holds {limits['output_holds'].replace('_', ' ')}"
    return line


def _remaining(name: str, value: int) -> str:
    if name.endswith("_micro_usd"):
        return f"{name.removesuffix('_micro_usd')} {_usd(value / 10**6)}"
    return f"{name} {value}"


def _usage_lines(usage: dict[str, Any]) -> list[str]:
    remaining = ", ".join(_remaining(k, v) for k, v in usage["remaining"].items()) or "unlimited"
    money = f" ({_usd(usage['spent_usd'])})" if usage.get("spent_micro_usd") else ""
    lines = [
        f"  {usage['kind']} {usage['id']}: {_limits_line(usage['limits'])}",
        f"    spent {usage['spent_tokens']}{money}, held {usage['held_tokens']}, in flight {usage['in_flight']};"
        f" remaining: {remaining}",
    ]
    period = usage.get("period")
    if period is not None:
        lines.append(
            f"    this {period['kind']} period ({period['start']} to {period['end']}): {period['used_tokens']} tokens,"
            f" {_usd(period['used_micro_usd'] / 10**6)}"
        )
    spend = usage.get("spend")
    if spend:
        for row in spend["by_model"]:
            lines.append(f"    model {row['model'] or '-'}: {row['requests']} requests, {row['tokens']} tokens, {_usd(row['usd'])}")
        for row in spend["by_day"][-7:]:
            lines.append(f"    day {row['day']}: {row['requests']} requests, {row['tokens']} tokens, {_usd(row['usd'])}")
    return lines


def render(args: argparse.Namespace, result: Any) -> str:
    if args.command == "keys" and args.action == "create":
        return (
            f"Created key {result['id']} ({result['name']}, account {result['account']}).\n"
            f"  {result['key']}\nStore it now: it is shown only once."
        )
    rows = result["data"] if isinstance(result, dict) and "data" in result else [result]
    lines: list[str] = []
    for row in rows:
        if "prefix" in row:
            state = "revoked" if row["revoked"] else "active"
            lines.append(f"{row['id']}  {row['name']}  account={row['account']}  {row['prefix']}  {state}")
            lines += _usage_lines(row["usage"])
            if "account_usage" in row:
                lines += _usage_lines(row["account_usage"])
            for r in row.get("recent", [])[:10]:
                lines.append(
                    f"    {r['request_id'] or '-'}  {_fmt(r['model'])}  held {r['held_tokens']}"
                    f"  charged {r['charged_tokens']}  {r['state']}"
                )
        else:
            lines += _usage_lines(row)
    return "\n".join(lines) if lines else "(none)"

