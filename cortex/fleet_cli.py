"""`cortex fleet ...`: operations on a running gateway, through its admin API.

Unlike `cortex keys` there is no offline mode: the fleet lives in the
server's memory. A server that owns `--data-dir` is asked over its admin
socket (file permissions are the authentication there); otherwise the one
at `--url`, with the admin token from `--admin-token` or
CORTEX_ADMIN_TOKEN, never from a file in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx
import trio

from cortex import admin_socket
from cortex.admin_socket import Call, Reply
from cortex.budget import datadir

DEFAULT_URL = "http://127.0.0.1:8080"
PATHS = {"reload": "fleet/reload"}


class NeedsToken(Exception):
    pass


class Unreachable(Exception):
    pass


def add_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".cortex",
                        help="ask the cortex that owns this data dir over its admin socket, if one runs (default .cortex)")
    common.add_argument("--url", default=os.environ.get("CORTEX_URL", DEFAULT_URL),
                        help=f"otherwise, the gateway's base URL (or CORTEX_URL; default {DEFAULT_URL})")
    common.add_argument("--admin-token", help="the admin token for --url (or CORTEX_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    fleet = sub.add_parser("fleet", help="operate a running gateway's fleet").add_subparsers(dest="action", required=True)
    fleet.add_parser("reload", parents=[common], help="reload the model catalogue (like SIGHUP); a bad one is refused")


def run(args: argparse.Namespace) -> int:
    request = Call("POST", PATHS[args.action])
    try:
        reply = trio.run(ask, args, request)
    except NeedsToken:
        print("cortex: an admin token is needed: --admin-token or CORTEX_ADMIN_TOKEN", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"cortex: {args.action} refused ({reply.status}): {reply.error_message()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply.body, indent=2, sort_keys=True))
    else:
        print(_summary(args.action, reply.body))
    return 0


async def ask(args: argparse.Namespace, request: Call) -> Reply:
    """Over the data dir's socket when a server listens there, else over TCP with the token."""
    socket = datadir.socket_path(args.data_dir)
    if socket.is_socket():
        try:
            return await admin_socket.call(admin_socket.socket_transport(socket), request)
        except admin_socket.NoServer:
            pass  # stale: the server that made it is gone
        except admin_socket.NoAnswer as exc:
            raise Unreachable(f"the cortex on {socket} did not answer: {exc}") from None
    token = args.admin_token or os.environ.get("CORTEX_ADMIN_TOKEN")
    if not token:
        raise NeedsToken()
    headers = {"authorization": f"Bearer {token}"}
    try:
        return await admin_socket.call(httpx.AsyncHTTPTransport(), request, base_url=args.url, headers=headers)
    except (admin_socket.NoServer, admin_socket.NoAnswer) as exc:
        raise Unreachable(f"cannot reach {args.url}: {exc}") from None


def _summary(action: str, body: dict[str, Any]) -> str:
    assert action == "reload"
    aliases = ", ".join(f"{k} -> {v}" for k, v in body.get("aliases", {}).items()) or "none"
    return f"catalogue reloaded: {len(body.get('models', []))} models ({', '.join(body.get('models', []))}); aliases: {aliases}"
