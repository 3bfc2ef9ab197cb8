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
PATHS = {"reload": ("POST", "fleet/reload"), "status": ("GET", "fleet"), "load": ("POST", "fleet/load"),
         "unload": ("POST", "fleet/unload")}


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
    fleet.add_parser("status", parents=[common], help="per neuron: its models, memory used and free, requests in flight")
    for action, what in (("load", "load a model (where placement says, or on --neuron)"),
                         ("unload", "unload a model (from every neuron holding it, or from --neuron)")):
        p = fleet.add_parser(action, parents=[common], help=what)
        p.add_argument("model")
        p.add_argument("--neuron", metavar="URL", help="the neuron's URL, as configured")


def run(args: argparse.Namespace) -> int:
    method, path = PATHS[args.action]
    body = {"model": args.model, **({"neuron": args.neuron} if args.neuron else {})} if args.action in ("load", "unload") else None
    request = Call(method, path, body) if body is not None else Call(method, path)
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
    if action != "reload":
        return _status_table(body)
    aliases = ", ".join(f"{k} -> {v}" for k, v in body.get("aliases", {}).items()) or "none"
    return f"catalogue reloaded: {len(body.get('models', []))} models ({', '.join(body.get('models', []))}); aliases: {aliases}"


def _status_table(body: dict[str, Any]) -> str:
    lines = []
    for n in body.get("neurons", []):
        total, free = n.get("memory_total_bytes"), n.get("memory_free_bytes")
        memory = f"{(total - free) // 2**20} MiB used, {free // 2**20} MiB free" if total is not None else "no lifecycle"
        lines.append(f"{n['url']} ({n['kind']}, {'healthy' if n['healthy'] else 'UNHEALTHY'}): {memory}, "
                     f"{n['in_flight']} in flight")
        for name, m in n.get("models", {}).items():
            size = f", {m['memory_bytes'] // 2**20} MiB" if "memory_bytes" in m else ""
            lines.append(f"  {name}: {m['status']}{size}, {m['in_flight']} in flight")
    return "\n".join(lines) or "no neurons"
