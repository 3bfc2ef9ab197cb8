"""`cortex keys`, `cortex accounts`, `cortex usage`: administration on the data dir.

These work offline, straight on the ledger database, through the same
`BudgetService` the server uses. While a cortex server owns the data dir
(it holds the lock) its in-memory ledger is authoritative: reading is
still fine, but changes must go through the admin API.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from cortex.api.admin import caps_from
from common.errors import ApiError
from cortex.budget import datadir
from cortex.budget.service import BudgetService
from cortex.budget.store import SyncStore, connect
from cortex.config import BudgetConfig
from cortex.metrics import GatewayMetrics

MUTATING = {("keys", "create"), ("keys", "topup"), ("keys", "set-limits"), ("keys", "revoke"),
            ("accounts", "create"), ("accounts", "topup"), ("accounts", "set-limits")}


class CliError(Exception):
    pass


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--balance", type=int, dest="balance_tokens", metavar="TOKENS", help="hard lifetime balance")
    p.add_argument("--window-tokens", type=int, metavar="N", help="at most N tokens in any trailing window")
    p.add_argument("--window-seconds", type=float, metavar="S", help="the window's length")
    p.add_argument("--max-concurrency", type=int, metavar="M", help="at most M requests in flight")


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".cortex", help="the data dir (default .cortex)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", parents=[common], help="create a key; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--account", help="the account it belongs to (created if new; default 'default')")
    add_limit_flags(create)
    keys.add_parser("list", parents=[common])
    for action in ("show", "revoke"):
        keys.add_parser(action, parents=[common]).add_argument("id")
    topup = keys.add_parser("topup", parents=[common], help="raise a key's balance")
    topup.add_argument("id")
    topup.add_argument("tokens", type=int)
    limits = keys.add_parser("set-limits", parents=[common], help="replace a key's limits (unset flags: no cap)")
    limits.add_argument("id")
    add_limit_flags(limits)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    acreate = accounts.add_parser("create", parents=[common])
    acreate.add_argument("id")
    add_limit_flags(acreate)
    accounts.add_parser("list", parents=[common])
    accounts.add_parser("show", parents=[common]).add_argument("id")
    atopup = accounts.add_parser("topup", parents=[common])
    atopup.add_argument("id")
    atopup.add_argument("tokens", type=int)
    alimits = accounts.add_parser("set-limits", parents=[common])
    alimits.add_argument("id")
    add_limit_flags(alimits)

    usage = sub.add_parser("usage", parents=[common], help="spent, held and remaining per cap, and recent requests")
    usage.add_argument("id", nargs="?", help="a key id (default: every key)")


def _caps(args: argparse.Namespace) -> Any:
    return caps_from({
        "balance_tokens": args.balance_tokens,
        "window_tokens": args.window_tokens,
        "window_seconds": args.window_seconds,
        "max_concurrency": args.max_concurrency,
    })


async def _open_service(data_dir: str, writable: bool) -> tuple[BudgetService, Any]:
    conn = connect(datadir.ledger_path(data_dir))
    store = SyncStore(conn, recover=writable)
    return await BudgetService.load(store, time.time, BudgetConfig(data_dir=data_dir), GatewayMetrics()), conn


async def _key_detail(service: BudgetService, key_id: str) -> dict[str, Any]:
    if key_id not in service.keys:
        raise CliError(f"no key {key_id!r}")
    record = service.keys[key_id]
    return {
        **record.view(),
        "usage": service.usage("key", key_id),
        "account_usage": service.usage("account", record.account_id),
        "recent": await service.recent(key_id),
    }


async def _execute(args: argparse.Namespace, service: BudgetService) -> Any:
    group, action = args.command, getattr(args, "action", None)
    kind = "key" if group == "keys" else "account"
    if group == "usage":
        ids = [args.id] if args.id else list(service.keys)
        return {"data": [await _key_detail(service, i) for i in ids]}
    if action == "create" and group == "keys":
        record, plaintext = await service.create_key(args.name, args.account, _caps(args))
        return {"id": record.id, "key": plaintext, "name": record.name, "account": record.account_id}
    if action == "create":
        await service.create_account(args.id, _caps(args))
        return service.usage("account", args.id)
    if action == "list":
        if group == "keys":
            return {"data": [{**k.view(), "usage": service.usage("key", k.id)} for k in service.keys.values()]}
        ids = sorted(pid for k, pid in service.ledger.principals if k == "account")
        return {"data": [service.usage("account", i) for i in ids]}
    if action == "topup":
        await service.top_up(kind, args.id, args.tokens)
    elif action == "set-limits":
        await service.set_caps(kind, args.id, _caps(args))
    elif action == "revoke":
        await service.revoke(args.id)
    return await _key_detail(service, args.id) if kind == "key" else service.usage("account", args.id)


def run(args: argparse.Namespace) -> int:
    writable = (args.command, getattr(args, "action", None)) in MUTATING
    try:
        lock = datadir.lock(args.data_dir)
    except datadir.DataDirBusy as exc:
        if writable:
            print(f"cortex: {exc}; change it through the admin API (/admin/v1/) or stop cortex first", file=sys.stderr)
            return 1
        lock = None
    try:
        result = trio.run(_run_async, args, writable or lock is not None)
    except (CliError, ApiError) as exc:
        print(f"cortex: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.close()
    print(json.dumps(result, indent=2) if args.json else render(args, result))
    return 0


async def _run_async(args: argparse.Namespace, writable: bool) -> Any:
    service, conn = await _open_service(args.data_dir, writable)
    try:
        return await _execute(args, service)
    finally:
        conn.close()


# --- human output -------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _limits_line(limits: dict[str, Any]) -> str:
    parts = []
    if limits["balance_tokens"] is not None:
        parts.append(f"balance {limits['balance_tokens']}")
    if limits["window_tokens"] is not None:
        parts.append(f"{limits['window_tokens']} per {limits['window_seconds']:g}s")
    if limits["max_concurrency"] is not None:
        parts.append(f"concurrency {limits['max_concurrency']}")
    return ", ".join(parts) or "no caps"


def _usage_lines(usage: dict[str, Any]) -> list[str]:
    remaining = ", ".join(f"{k} {v}" for k, v in usage["remaining"].items()) or "unlimited"
    return [
        f"  {usage['kind']} {usage['id']}: {_limits_line(usage['limits'])}",
        f"    spent {usage['spent_tokens']}, held {usage['held_tokens']}, in flight {usage['in_flight']}; remaining: {remaining}",
    ]


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

