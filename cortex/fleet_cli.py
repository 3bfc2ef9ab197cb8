"""`cortex fleet ...`: operations on a running gateway, through its admin API.

Unlike `cortex keys` (which works on the data dir), these ask the server:
the fleet lives in its memory. The admin token comes from `--admin-token`
or CORTEX_ADMIN_TOKEN, never from a file in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
REQUEST_TIMEOUT_S = 30.0


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("CORTEX_URL", DEFAULT_URL),
                        help=f"the gateway's base URL (or CORTEX_URL; default {DEFAULT_URL})")
    common.add_argument("--admin-token", help="the admin token (or CORTEX_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    fleet = sub.add_parser("fleet", help="operate a running gateway's fleet").add_subparsers(dest="action", required=True)
    fleet.add_parser("reload", parents=[common], help="reload the model catalogue (like SIGHUP); a bad one is refused")


def run(args: argparse.Namespace) -> int:
    token = args.admin_token or os.environ.get("CORTEX_ADMIN_TOKEN")
    if not token:
        print("cortex: an admin token is needed: --admin-token or CORTEX_ADMIN_TOKEN", file=sys.stderr)
        return 2
    path = {"reload": "fleet/reload"}[args.action]
    try:
        response = httpx.post(
            f"{args.url.rstrip('/')}/admin/v1/{path}", headers={"authorization": f"Bearer {token}"},
            timeout=REQUEST_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        print(f"cortex: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:500]}}
    if response.status_code != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        print(f"cortex: {args.action} refused ({response.status_code}): {message or body}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        print(_summary(args.action, body))
    return 0


def _summary(action: str, body: dict[str, Any]) -> str:
    assert action == "reload"
    aliases = ", ".join(f"{k} -> {v}" for k, v in body.get("aliases", {}).items()) or "none"
    return f"catalogue reloaded: {len(body.get('models', []))} models ({', '.join(body.get('models', []))}); aliases: {aliases}"
