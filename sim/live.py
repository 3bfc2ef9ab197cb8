"""Live mode: the same workload in wall time against a real, running cortex.

Keys and accounts are created through the admin API (with a run suffix so
runs never collide); faults are not injected (the fleet is real). The
invariants are checked from the outside: from what each client received,
and from the admin usage API — caps never passed (every cap kind, tokens and
micro-USD), no hold left open, and every request charged between what its
client received and its hold. The scenario's `start` and model prices do not
apply: the real cortex has its own clock and catalogue.
"""

from __future__ import annotations

import secrets
import time
from decimal import Decimal
from typing import Any

import httpx
import trio

from cortex.budget.ledger import Caps
from cortex.fleet.transport import H11Transport
from sim.scenario import Scenario
from sim.world import World

SETTLE_WAIT_S = 30.0


class LiveError(Exception):
    pass


def admin_caps(caps: Caps) -> dict[str, Any]:
    """The admin API's limit fields for `caps` (only those set): USD as exact decimal strings."""
    spec = caps.period
    body: dict[str, Any] = {
        "balance_tokens": caps.balance_tokens, "window_tokens": caps.window_tokens, "window_seconds": caps.window_s,
        "max_concurrency": caps.max_concurrency, "period_tokens": caps.period_tokens,
        "balance_usd": _usd(caps.balance_usd), "window_usd": _usd(caps.window_usd), "period_usd": _usd(caps.period_usd),
        "period": spec.kind if spec else None, "period_timezone": spec.timezone if spec else None,
        "period_anchor_day": spec.anchor_day if spec else None,
    }
    return {name: value for name, value in body.items() if value is not None}


def _usd(micro: int | None) -> str | None:
    return str(Decimal(micro).scaleb(-6)) if micro is not None else None


async def _admin(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> Any:
    r = await client.request(method, "/admin/v1/" + path, json=body)
    if r.status_code >= 300:
        raise LiveError(f"admin {method} {path}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


async def _main(world: World, cortex_url: str, admin_token: str) -> None:
    scenario = world.scenario
    suffix = secrets.token_hex(3)
    headers = {"authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=cortex_url, headers=headers, timeout=30, transport=H11Transport()) as admin:
        account_ids = {a.id: f"{a.id}-{suffix}" for a in scenario.accounts}
        for account in scenario.accounts:
            await _admin(admin, "POST", "accounts", {"id": account_ids[account.id], **admin_caps(account.caps)})
        for key in scenario.keys:
            account = account_ids.get(key.account, f"{key.account}-{suffix}")
            body = await _admin(admin, "POST", "keys", {"name": f"{key.name}-{suffix}", "account": account, **admin_caps(key.caps)})
            world.keys[key.name], world.key_ids[key.name] = body["key"], body["id"]
        world.t0 = trio.current_time()
        with trio.move_on_after(scenario.horizon_s) as horizon:
            async with trio.open_nursery() as work:
                for index, workload in enumerate(scenario.workloads):
                    work.start_soon(world.run_workload, index, workload)
        if horizon.cancelled_caught:
            world.checker.fail(f"the workload did not finish within {scenario.horizon_s:g} s")
        await _check(world, admin)


async def _check(world: World, admin: httpx.AsyncClient) -> None:
    checker = world.checker
    deadline = trio.current_time() + SETTLE_WAIT_S
    details: dict[str, Any] = {}
    for name, key_id in world.key_ids.items():
        while True:
            detail = await _admin(admin, "GET", f"keys/{key_id}?recent=10000")
            if detail["usage"]["held_tokens"] == 0 or trio.current_time() > deadline:
                break
            await trio.sleep(0.2)
        details[name] = detail
    for detail in details.values():
        for usage in (detail["usage"], detail["account_usage"]):
            who = f"{usage['kind']} {usage['id']}"
            if usage["held_tokens"] or usage["in_flight"]:
                checker.fail(f"{who}: {usage['held_tokens']} tokens still held after the workload")
            balance = usage["limits"]["balance_tokens"]
            if balance is not None and usage["spent_tokens"] > balance:
                checker.fail(f"{who}: spent {usage['spent_tokens']} > balance {balance}")
            window = usage["limits"]["window_tokens"]
            if window is not None and usage.get("window_used_tokens", 0) > window:
                checker.fail(f"{who}: window usage {usage['window_used_tokens']} > {window}")
            for cap, left in usage.get("remaining", {}).items():  # cap - used - held, money in micro-USD
                if cap != "concurrency" and left < 0:
                    checker.fail(f"{who}: {cap} passed by {-left}")
        for hold in detail["recent"]:
            record = checker.requests.get(hold.get("client_request_id") or hold["request_id"] or "")
            if record is None:
                continue
            record.hold_amount, record.charged, record.hold_state = hold["held_tokens"], hold["charged_tokens"], hold["state"]
            if hold["state"] == "open":
                checker.fail(f"{record.id}: hold still open")
            elif not record.received_bytes <= hold["charged_tokens"] <= hold["held_tokens"]:
                checker.fail(
                    f"{record.id}: charged {hold['charged_tokens']} outside [received {record.received_bytes}, hold {hold['held_tokens']}]"
                )
    for record in checker.requests.values():
        if record.outcome == "refused" and record.hold_amount is not None:
            checker.fail(f"{record.id} was refused yet holds a hold")


def run_live(scenario: Scenario, seed: int, cortex_url: str, admin_token: str) -> tuple[World, float]:
    world = World(scenario, seed)
    world.client = H11Transport()
    world.base_url = cortex_url.rstrip("/")
    started = time.perf_counter()
    trio.run(_main, world, cortex_url.rstrip("/"), admin_token)
    return world, time.perf_counter() - started
