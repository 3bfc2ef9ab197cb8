"""cortex's ASGI app: lifespan, routes, request ids and the request log."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import trio

from cortex import logs, web
from cortex.api import errors
from cortex.api.errors import ApiError
from cortex.api.validate import chat_request, completion_request, parse_json_object
from cortex.config import Config
from cortex.fleet.health import poll_forever
from cortex.fleet.registry import Fleet
from cortex.fleet.upstream import TransportFactory, Upstream
from cortex.proxy import Proxy

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class CortexApp:
    def __init__(self, config: Config, transport_factory: TransportFactory | None = None) -> None:
        self.config = config
        self.fleet = Fleet(config.fleet.neurons, config.fleet.unhealthy_after_failures)
        self.upstream = Upstream(config.upstream, transport_factory)
        self.proxy = Proxy(config, self.fleet, self.upstream)
        self.router = web.Router(self._not_found, self._method_not_allowed)
        self.router.add("POST", "/v1/chat/completions", self._chat)
        self.router.add("POST", "/v1/completions", self._completion)
        self.router.add("GET", "/v1/models", self._models)
        self.router.add("GET", "/health", self._health)

    async def __call__(self, scope: web.Scope, receive: web.Receive, send: web.Send) -> None:
        if scope["type"] == "lifespan":
            await web.serve_lifespan(receive, send, self.run_background)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Everything that outlives a request, owned by the lifespan."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(poll_forever, self.fleet, self.upstream, self.config.fleet)
                task_status.started()
        finally:
            await self.upstream.aclose()

    async def _http(self, scope: web.Scope, receive: web.Receive, send: web.Send) -> None:
        started = trio.current_time()
        response: dict[str, Any] = {}
        offered = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
                response["status"] = message["status"]
            await send(message)

        request = web.Request.from_scope(scope, receive, send_with_id)
        request.request_id = request_id
        request.started = started
        try:
            await self.router.dispatch(request)
        except ApiError as err:
            await self._send_error(request, response, err)
        except web.ClientGone:
            request.log["outcome"] = "client_disconnected"
        except Exception as exc:  # a bug must still answer in the API's shape
            logs.event("unhandled_error", logging.ERROR, request_id=request_id, error=repr(exc))
            await self._send_error(request, response, ApiError(500, "Internal error in cortex.", type="server_error", code="internal_error"))
        finally:
            if request.path.startswith("/v1/"):
                logs.event(
                    "request",
                    request_id=request_id,
                    method=request.method,
                    path=request.path,
                    status=response.get("status"),
                    latency_ms=round((trio.current_time() - started) * 1000, 2),
                    **request.log,
                )

    @staticmethod
    async def _send_error(request: web.Request, response: dict[str, Any], err: ApiError) -> None:
        request.log.setdefault("outcome", err.code or err.type)
        if "status" in response:
            return  # headers already sent; the stream path reports its own errors
        await web.send_bytes(request.send, err.status, err.openai_bytes(), web.JSON_HEADERS + err.headers)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.body(self.config.server.max_body_bytes)
        except web.BodyTooLarge as exc:
            raise errors.payload_too_large(exc.limit_bytes) from None
        return parse_json_object(raw)

    async def _chat(self, request: web.Request) -> None:
        gen = chat_request(await self._body(request))
        await self.proxy.generate(request, gen, "/v1/chat/completions")

    async def _completion(self, request: web.Request) -> None:
        gen = completion_request(await self._body(request))
        await self.proxy.generate(request, gen, "/v1/completions")

    async def _models(self, request: web.Request) -> None:
        await web.send_json(request.send, 200, {"object": "list", "data": self.fleet.catalogue()})

    async def _health(self, request: web.Request) -> None:
        status = self.fleet.status()
        await web.send_json(request.send, 503 if status["status"] == "down" else 200, status)

    async def _not_found(self, request: web.Request) -> None:
        raise errors.not_found(request.path)

    async def _method_not_allowed(self, request: web.Request, allowed: list[str]) -> None:
        raise errors.method_not_allowed(request.method, request.path, allowed)
