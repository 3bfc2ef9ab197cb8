"""Shared pieces for the budget end-to-end tests."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from common import counting
from cortex.fleet.transport import H11Transport
from tests.conftest import Proc, Stack

ADMIN_TOKEN = "test-admin-token-0123456789"
MODEL = "cortex-mock"
HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = counting.count_chat(HI)  # exact: byte-level


def budget_cortex(stack: Stack, *neurons: Proc, config: str = "", args_extra: tuple[str, ...] = (), **kwargs: Any) -> Proc:
    args = ["--admin-token", ADMIN_TOKEN, *args_extra]
    if config:
        path = stack.tmp_path / f"cortex-{len(stack.procs)}.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    return stack.cortex(*neurons, args=tuple(args), auth=True, **kwargs)


def admin(cortex: Proc, method: str, path: str, json: Any = None, token: str = ADMIN_TOKEN) -> httpx.Response:
    """An admin call; `json` may be raw bytes, for bodies httpx would refuse to encode."""
    body = {"content": json} if isinstance(json, bytes) else {"json": json}
    return httpx.request(
        method, cortex.url + "/admin/v1/" + path, headers={"authorization": f"Bearer {token}"}, timeout=30, **body
    )


def create_key(cortex: Proc, name: str = "agent", **limits: Any) -> tuple[str, str]:
    r = admin(cortex, "POST", "keys", {"name": name, **limits})
    assert r.status_code == 201, r.text
    body = r.json()
    return body["id"], body["key"]


def usage(cortex: Proc, key_id: str) -> dict[str, Any]:
    r = admin(cortex, "GET", f"keys/{key_id}")
    assert r.status_code == 200, r.text
    return r.json()


def chat(cortex: Proc, key: str, max_tokens: int = 10, stream: bool = False, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": max_tokens, "stream": stream, **extra}
    return httpx.post(cortex.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


async def fan_out(url: str, key: str, n: int, stream: bool, **extra: Any) -> list[tuple[int, dict, bytes]]:
    """n concurrent requests on one key; (status, headers, body) each. `extra` joins (or replaces) body fields."""
    results: list[tuple[int, dict, bytes]] = []
    body = {"model": MODEL, "messages": HI, "max_tokens": 10, "stream": stream, **extra}

    async def one(client: httpx.AsyncClient) -> None:
        r = await client.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        results.append((r.status_code, dict(r.headers), r.content))

    async with httpx.AsyncClient(transport=H11Transport(), timeout=60) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one, client)
    return results
