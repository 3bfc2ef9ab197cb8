"""The admin API on a Unix socket in the data dir, for the CLI while cortex runs.

While `cortex serve` (or `up`) owns a data dir, it serves the admin handlers
(`cortex.api.admin`) on `<data_dir>/admin.sock` as well. The socket is mode
0600, so file permissions are the authentication: requests on it carry no
admin token, and it works when the server has none. It serves the admin API
only, never /v1/*.

Both halves live here. `AdminOnlyApp` is the ASGI app behind the socket,
`AdminSocket` its listener's lifetime beside the gateway's, and `call` the
client: one admin request over any httpx transport. That is the socket,
TCP (`cortex fleet` with a URL) or the app itself in-process (the offline
CLI on the ledger files), so every way the CLI works gives the same answer.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from common import asgi, errors
from common.errors import ApiError
from common.serving import UNIX_PREFIX, UNIX_SOCKET_MODE, serve
from cortex import logs
from cortex.api.admin import PREFIX, AdminApi
from cortex.api.surfaces import OPENAI
from cortex.budget import datadir
from cortex.budget.store import StoreError

SOCKET_GRACEFUL_S = 5.0  # admin requests in flight at shutdown finish within this, or are cut off
SUN_PATH_MAX_BYTES = 104 if sys.platform == "darwin" else 108  # sockaddr_un.sun_path, its NUL included
REQUEST_TIMEOUT_S = 30.0
BASE_URL = "http://cortex"  # a Unix socket has no host; HTTP/1.1 still wants one


# --- the server half ---------------------------------------------------------------


class AdminOnlyApp:
    """ASGI: /admin/v1/ through one `AdminApi`, anything else 404, errors in the OpenAI envelope."""

    def __init__(self, admin: AdminApi, listener: str = "admin_socket") -> None:
        self.admin = admin
        self.listener = listener  # named in the request log, beside the TCP listener's lines

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.serve_lifespan(receive, send, _nothing_to_run)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await asgi.refuse_websocket(receive, send, errors.websocket_refused().openai_bytes())

    async def _http(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        started = time.monotonic()
        response: dict[str, int] = {}

        async def send_noting_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            await send(message)

        request = asgi.Request.from_scope(scope, receive, send_noting_status)
        request.request_id = uuid.uuid4().hex
        try:
            if not request.path.startswith(PREFIX):
                raise errors.not_found(request.path)  # the socket serves administration only
            await self.admin.handle(request)
        except ApiError as err:
            await _send_error(request, response, err)
        except StoreError as exc:
            logs.event("ledger_write_failed", logging.ERROR, request_id=request.request_id, error=str(exc))
            err = errors.service_unavailable("The budget ledger is unavailable; try again shortly.", 1)
            await _send_error(request, response, err)
        except asgi.ClientGone:
            request.log["outcome"] = "client_disconnected"
        except Exception as exc:  # a bug must still answer in the API's shape
            logs.event("unhandled_error", logging.ERROR, request_id=request.request_id, error=repr(exc))
            err = ApiError(500, "Internal error in cortex.", type="server_error", code="internal_error")
            await _send_error(request, response, err)
        finally:
            logs.event(
                "request", request_id=request.request_id, listener=self.listener, method=request.method,
                path=request.path, status=response.get("status"),
                latency_ms=round((time.monotonic() - started) * 1000, 2), **request.log,
            )


async def _send_error(request: asgi.Request, response: dict[str, int], err: ApiError) -> None:
    request.log.setdefault("outcome", err.code or err.type)
    if "status" in response:
        return  # the answer has begun; nothing sound can follow it
    status, body, headers = OPENAI.error_response(err, request.request_id)
    await asgi.send_bytes(request.send, status, body, headers)


async def _nothing_to_run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    # Nothing to start or stop: the ledger belongs to the gateway's own lifespan.
    task_status.started()
    await trio.sleep_forever()


class AdminSocket:
    """The data dir's admin socket, for as long as the gateway beside it.

    `serve` runs in the gateway's nursery once its app has started: the app
    then holds the data dir's lock, so a socket file already there was left
    by a server that died (kill -9) and is replaced. `close` stops the
    listener and waits until the file is gone; the gateway calls it before
    its own listener shuts down, since the lifespan that ends after that
    closes the ledger these handlers use.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = datadir.socket_path(data_dir)
        self._stop = trio.Event()
        self._closed = trio.Event()
        self._running = False

    async def serve(
        self, admin: AdminApi, write_timeout_s: float | None = None,
        task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `close`; `started()` reports the socket's path, or None if it cannot be served."""
        try:
            reason = unusable(self.path)
            if reason is not None or self._stop.is_set():
                if reason is not None:
                    logs.event("admin_socket_off", logging.WARNING, path=str(self.path), reason=reason)
                task_status.started(None)
                return
            self._running = True
            identity = None
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(
                        serve, AdminOnlyApp(admin), UNIX_PREFIX + str(self.path), shutdown_trigger=self._stop.wait,
                        graceful_timeout_s=SOCKET_GRACEFUL_S, write_timeout_s=write_timeout_s,
                    ))
                    st = os.lstat(self.path)
                    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == UNIX_SOCKET_MODE, oct(st.st_mode)
                    identity = (st.st_dev, st.st_ino)
                    task_status.started(str(self.path))
            finally:
                if identity is not None:
                    _remove_if_same(self.path, identity)
        finally:
            self._closed.set()

    async def close(self) -> None:
        self._stop.set()
        if self._running:
            await self._closed.wait()


def unusable(path: Path) -> str | None:
    """Why no socket can be bound at `path` (None: it can); raises if something else sits there."""
    if len(os.fsencode(path)) >= SUN_PATH_MAX_BYTES:
        return f"the path is longer than a Unix socket's {SUN_PATH_MAX_BYTES - 1} bytes; use a shorter --data-dir"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} is in the way of the admin socket: it is not a socket; remove it")
    return None


def _remove_if_same(path: Path, identity: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        path.unlink()


# --- the client half -----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One admin API request, the same over every transport."""

    method: str
    path: str  # below /admin/v1/, with any query
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_message(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else f"HTTP {self.status}: {str(self.body)[:500]}"


class NoServer(Exception):
    """Nothing took the connection: no socket file, or a stale one (or no server at the URL)."""


class NoAnswer(Exception):
    """The request may have reached the server, but no answer came back."""


def socket_transport(path: str | Path) -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport(uds=str(path))


def local_transport(admin: AdminApi) -> httpx.AsyncBaseTransport:
    """The admin handlers in this process, as the offline CLI runs them on the ledger files."""
    return httpx.ASGITransport(app=AdminOnlyApp(admin, listener="cli"))


async def call(
    transport: httpx.AsyncBaseTransport, request: Call, base_url: str = BASE_URL,
    headers: dict[str, str] | None = None, timeout_s: float = REQUEST_TIMEOUT_S,
) -> Reply:
    async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=timeout_s) as client:
        try:
            response = await client.request(request.method, PREFIX + request.path, json=request.body, headers=headers)
        except (httpx.ConnectError, httpx.InvalidURL) as exc:
            raise NoServer(str(exc) or type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise NoAnswer(str(exc) or type(exc).__name__) from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:500]}}
    return Reply(response.status_code, body)
