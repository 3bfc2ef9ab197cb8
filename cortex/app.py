"""cortex's ASGI app: lifespan, routes, request ids, the request log and metrics."""

from __future__ import annotations

import dataclasses

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from cortex import logs
from common import asgi
from common import errors
from cortex.api.admin import PREFIX as ADMIN_PREFIX
from cortex.api import anthropic
from cortex.api.admin import AdminApi
from cortex.api.surfaces import OPENAI, AnthropicSurface
from common.errors import ApiError
from common.openai_schema import chat_request, completion_request, parse_json_object
from cortex.budget import datadir
from cortex.budget.estimate import prompt_tokens_bound
from cortex.budget.ledger import Ledger
from cortex.budget.service import BudgetService, KeyRecord
from cortex.budget.shared_service import SharedBudgetService, replica_life_id
from cortex.budget.store import PutMeta, ThreadedStore
from cortex.config import SQLITE_LEDGER, Config
from cortex.fleet.health import poll_forever
from cortex.fleet import catalogue
from cortex.fleet.lifecycle import Lifecycle
from cortex.fleet.registry import Fleet
from cortex.fleet.upstream import TransportFactory, Upstream
from cortex.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cortex.metrics import GatewayMetrics
from cortex.proxy import Proxy

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SHUTDOWN_WRITE_TIMEOUT_S = 1.0  # the last words to a client at shutdown may not block it

# Opens the ledger store for the app's lifetime; the simulator passes an in-memory one.
StoreFactory = Callable[[Config, GatewayMetrics], Any]


@asynccontextmanager
async def durable_store(config: Config, metrics: GatewayMetrics) -> AsyncIterator[Any]:
    """The production store: the data dir's lock, then SQLite behind the writer thread;
    or, with `budget.ledger`, this replica's handle on the shared PostgreSQL ledger."""
    lock = datadir.lock(config.budget.data_dir)  # on PostgreSQL too: the admin socket and fleet state live there
    try:
        if config.budget.ledger.startswith(SQLITE_LEDGER):
            from cortex.budget.sqlite_shared import SqliteShared

            budget = config.budget
            async with SqliteShared.open(
                budget.ledger[len(SQLITE_LEDGER):], replica_life_id(budget.replica_id), budget.lease_s, budget.synchronous,
                metrics.observe_commit,
            ) as shared:
                yield shared
            return
        if config.budget.ledger:
            from cortex.budget.pg_shared import PgShared

            budget = config.budget
            async with PgShared.open(
                budget.ledger, replica_life_id(budget.replica_id), budget.lease_s, on_commit=metrics.observe_commit
            ) as shared:
                yield shared
            return
        path = datadir.ledger_path(config.budget.data_dir)
        async with ThreadedStore.open(path, config.budget.synchronous, metrics.observe_commit) as store:
            yield store
    finally:
        lock.close()


class CortexApp:
    def __init__(
        self,
        config: Config,
        transport_factory: TransportFactory | None = None,
        store_factory: StoreFactory = durable_store,
        clock: Callable[[], float] = time.time,
        ledger_factory: Callable[[], Ledger] = Ledger,
        request_ids: Callable[[str | None], str] = lambda offered: uuid.uuid4().hex,
    ) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.fleet = Fleet(config.fleet.all_upstreams(), config.fleet.unhealthy_after_failures)
        self.upstream = Upstream(config.upstream, transport_factory)
        self.budget: BudgetService | None = None
        self.catalogue = catalogue.load(config.fleet.models_file) if config.fleet.models_file else catalogue.Catalogue()
        self.proxy = Proxy(config, self.fleet, self.upstream, None, self.catalogue)
        durable = store_factory is durable_store  # the simulator's store has no data dir to write
        self.lifecycle = Lifecycle(self.fleet, self.upstream, config.fleet, lambda: self.catalogue, self.metrics,
                                   config.budget.data_dir if durable else None, clock)
        self.proxy.lifecycle = self.lifecycle
        self._store_factory = store_factory
        self._clock = clock
        self._ledger_factory = ledger_factory
        self._request_ids = request_ids  # cortex's own id per request; the simulator's is deterministic
        self._admin: AdminApi | None = None
        self.body_budget = asgi.BodyBudget(config.server.body_buffer_max_bytes)
        self._in_flight: dict[str, asgi.Request] = {}
        self.startup_error: BaseException | None = None
        self.router = asgi.Router(self._not_found, self._method_not_allowed)
        self.router.add("POST", "/v1/chat/completions", self._chat)
        self.router.add("POST", "/v1/completions", self._completion)
        self.router.add("POST", "/v1/messages", self._messages)
        self.router.add("POST", "/v1/messages/count_tokens", self._count_tokens)
        self.router.add("GET", "/v1/models", self._models)
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/metrics", self._metrics)
        self.router.add_prefix(ADMIN_PREFIX, self._admin_api)
        self.metrics.neurons_total.set_function(lambda: len(self.fleet.nodes))
        self.metrics.neurons_healthy.set_function(lambda: sum(n.healthy for n in self.fleet.nodes))

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.serve_lifespan(receive, send, self.run_background)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await asgi.refuse_websocket(receive, send, errors.websocket_refused().openai_bytes())

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Everything that outlives a request, owned by the lifespan."""
        started = False

        def ready() -> None:
            nonlocal started
            started = True
            task_status.started()

        try:
            async with self._store_factory(self.config, self.metrics) as store:
                service = SharedBudgetService if getattr(store, "shared", False) else BudgetService
                self.budget = await service.load(
                    store, self._clock, self.config.budget, self.metrics, self._ledger_factory()
                )
                self.proxy.budget = self.budget
                # The offline CLI reads the default period zone from the ledger, so both agree.
                if getattr(store, "shared", False):
                    await store.put_meta("period_timezone", self.config.budget.period_timezone)
                else:
                    await store.commit([PutMeta("period_timezone", self.config.budget.period_timezone)])
                if self.config.admin.token:
                    self._admin = AdminApi(
                        self.budget, self.config.admin.token, self.config.server.body_timeout_s, self.reload_catalogue,
                        fleet=self.lifecycle,
                    )
                async with trio.open_nursery() as nursery:
                    await nursery.start(poll_forever, self.fleet, self.upstream, self.config.fleet)
                    await nursery.start(self.lifecycle.run)
                    await nursery.start(self.budget.run_background)
                    if self.config.alerts:
                        budget = self.config.budget
                        sender = await self.budget.start_alerts(
                            self.config.alerts, timeout_s=budget.alert_timeout_s, retry_for_s=budget.alert_retry_for_s,
                            outbox_max=budget.alert_outbox_max,
                        )
                        await nursery.start(sender.run)
                        await nursery.start(self.budget.evaluate_alerts_forever)
                    ready()
        except BaseException as exc:
            if not started:
                self.startup_error = exc  # Hypercorn only logs it; the CLI reports it
            raise
        finally:
            await self.upstream.aclose()

    def reload_catalogue(self) -> catalogue.Catalogue:
        """Read the catalogue file again and put it in force; a bad one raises CatalogueError
        and the one in force stays. Requests already admitted keep the model they resolved."""
        path = self.config.fleet.models_file
        try:
            if not path:
                raise catalogue.CatalogueError("no catalogue file is configured (fleet.models_file or --models)")
            fresh = catalogue.load(path)
        except catalogue.CatalogueError as exc:
            self.metrics.catalogue_reloads.inc(result="refused")
            logs.event("catalogue_reload_refused", logging.WARNING, path=path, error=str(exc))
            raise
        self.catalogue = self.proxy.catalogue = fresh
        self.metrics.catalogue_reloads.inc(result="ok")
        logs.event("catalogue_reloaded", path=path, models=len(fresh.models), aliases=len(fresh.aliases))
        return fresh

    async def _http(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        started = trio.current_time()
        response: dict[str, Any] = {}
        request: asgi.Request

        async def send_with_id(message: dict[str, Any]) -> None:
            # How long a write may block is bounded in the server layer
            # (server.client_write_timeout_s): Hypercorn shields its socket writes.
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *request.response_headers, id_header]}
                response["status"] = message["status"]
                response["stream"] = asgi.is_event_stream(message["headers"])
            await send(message)

        request = asgi.Request.from_scope(scope, receive, send_with_id)
        # The ledger and the upstream see cortex's own id; the client's (first
        # header wins, as everywhere) is echoed back and logged beside it.
        offered: str | None = request.headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(offered or ""):
            offered = None
        request.request_id = self._request_ids(offered)
        if offered is not None:
            request.log["client_request_id"] = offered
        id_header = (b"x-request-id", (offered or request.request_id).encode())
        request.started = started
        request.surface = OPENAI
        self._in_flight[request.request_id] = request
        try:
            with trio.CancelScope() as request.cancel_scope:
                await self._dispatch(request, response)
            if request.shutting_down:
                await self._send_shutdown(request, response)
        finally:
            del self._in_flight[request.request_id]
            if request.path.startswith(("/v1/", ADMIN_PREFIX)):
                self._observe(request, response.get("status"), trio.current_time() - started)

    async def _dispatch(self, request: asgi.Request, response: dict[str, Any]) -> None:
        try:
            await self.router.dispatch(request)
        except ApiError as err:
            await self._send_error(request, response, err)
        except asgi.ClientGone:
            request.log["outcome"] = "client_disconnected"
        except Exception as exc:  # a bug must still answer in the API's shape
            logs.event("unhandled_error", logging.ERROR, request_id=request.request_id, error=repr(exc))
            await self._send_error(request, response, ApiError(500, "Internal error in cortex.", type="server_error", code="internal_error"))

    async def drain(self, graceful_timeout_s: float) -> None:
        """After SIGTERM: let requests finish for `graceful_timeout_s`, then end the rest cleanly.

        Each one is cancelled in its own scope, settles as a cancelled
        request does, and then answers: a stream gets a final error event
        (the SDKs raise it) instead of a truncated body.
        """
        await trio.sleep(graceful_timeout_s)
        for request in list(self._in_flight.values()):
            if request.cancel_scope is not None:
                request.shutting_down = True
                request.cancel_scope.cancel()

    async def _send_shutdown(self, request: asgi.Request, response: dict[str, Any]) -> None:
        request.log["outcome"] = "shutdown"
        err = errors.service_unavailable("cortex is shutting down; retry on another replica or shortly.", 1)
        with trio.move_on_after(SHUTDOWN_WRITE_TIMEOUT_S):
            if "status" not in response:
                await self._send_error(request, response, err)
            elif response.get("stream"):
                await asgi.send_chunk(request.send, request.surface.stream().error(err))
                await asgi.end_stream(request.send)

    def _observe(self, request: asgi.Request, status: int | None, latency_s: float) -> None:
        model = request.log.get("model", "")
        if request.path.startswith("/v1/"):
            self.metrics.requests.inc(status=status or 499, model=model)
        if model:
            self.metrics.latency_s.observe(latency_s, model=model)
            if "ttft_ms" in request.log:
                self.metrics.ttft_s.observe(request.log["ttft_ms"] / 1000, model=model)
            for direction, field in (("in", "prompt_tokens"), ("out", "completion_tokens")):
                if isinstance(request.log.get(field), int):
                    self.metrics.tokens.inc(request.log[field], direction=direction, model=model)
        logs.event(
            "request",
            request_id=request.request_id,
            method=request.method,
            path=request.path,
            status=status,
            latency_ms=round(latency_s * 1000, 2),
            **request.log,
        )

    @staticmethod
    async def _send_error(request: asgi.Request, response: dict[str, Any], err: ApiError) -> None:
        request.log.setdefault("outcome", err.code or err.type)
        if "status" in response:
            return  # headers already sent; the stream path reports its own errors
        status, body, headers = request.surface.error_response(err, request.request_id)
        await asgi.send_bytes(request.send, status, body, headers)

    # --- generation ---------------------------------------------------------------

    async def _authenticate(self, request: asgi.Request) -> KeyRecord | None:
        if self.budget is None:
            raise errors.service_unavailable("cortex is starting; try again shortly.", 1)
        try:
            return await self.budget.authenticate_async(request.headers)
        except ApiError:
            if self.config.budget.auth_required:
                raise
            # Auth off (development): SDKs always send some key; unknown ones run unbudgeted.
            return None

    async def _body(self, request: asgi.Request) -> dict[str, Any]:
        server = self.config.server
        try:
            raw = await request.body(server.max_body_bytes, server.body_timeout_s, self.body_budget)
        except asgi.BodyTooLarge as exc:
            raise errors.payload_too_large(exc.limit_bytes) from None
        except asgi.BodyTimeout:
            raise errors.body_timeout(server.body_timeout_s) from None
        except asgi.BodyBufferFull:
            raise errors.body_buffer_full() from None
        return parse_json_object(raw)

    async def _chat(self, request: asgi.Request) -> None:
        key = await self._authenticate(request)
        gen = chat_request(await self._body(request))
        await self.proxy.generate(request, gen, "/v1/chat/completions", key)

    async def _completion(self, request: asgi.Request) -> None:
        key = await self._authenticate(request)
        gen = completion_request(await self._body(request))
        await self.proxy.generate(request, gen, "/v1/completions", key)

    def _anthropic(self, request: asgi.Request) -> AnthropicSurface:
        """Everything on this route answers in Anthropic's shape, errors included."""
        surface = AnthropicSurface(None, request.request_id, self.config.server.stream_ping_interval_s)
        request.surface = surface
        request.response_headers.append((b"request-id", request.request_id.encode()))
        return surface

    async def _messages(self, request: asgi.Request) -> None:
        surface = self._anthropic(request)
        key = await self._authenticate(request)
        surface.request = anthropic.to_openai(await self._body(request))
        gen = surface.request.gen
        surface.input_tokens = prompt_tokens_bound(gen, self.proxy.model_info(gen.model))
        await self.proxy.generate(request, gen, "/v1/chat/completions", key)

    async def _count_tokens(self, request: asgi.Request) -> None:
        self._anthropic(request)
        await self._authenticate(request)
        counted = anthropic.count_tokens_request(await self._body(request))
        if not self.fleet.knows(self.catalogue.resolve(counted.gen.model)):
            raise errors.model_not_found(counted.gen.model)
        model = self.proxy.model_info(counted.gen.model)
        served = dataclasses.replace(counted.gen, model=self.catalogue.resolve(counted.gen.model))
        exact = await self.proxy.exact_prompt_tokens(served)
        await asgi.send_json(request.send, 200, anthropic.count_tokens_body(counted, model, exact))

    # --- everything else -------------------------------------------------------------

    async def _models(self, request: asgi.Request) -> None:
        listing = {"object": "list", "data": self._listing()}
        if "anthropic-version" in request.headers:  # the Anthropic SDKs always send it
            self._anthropic(request)
            listing = anthropic.models_list(listing)
        await asgi.send_json(request.send, 200, listing)

    def _listing(self) -> list[dict[str, Any]]:
        """Served models and aliases; with neurons that load on demand, every loadable catalogue
        model too, each with where it is (`loaded`, `locations`) and could be (`feasible_on`)."""
        entries = catalogue.listing(self.fleet.catalogue(), self.catalogue)
        loadable = [m for m in self.catalogue.models.values() if m.memory_mb is not None and self.lifecycle.loadable(m.id)]
        if not loadable:
            return entries
        listed = {e["id"] for e in entries}
        for entry in entries:
            if "alias_of" not in entry and self.lifecycle.loadable(entry["id"]):
                entry.update(self.lifecycle.state(entry["id"]))
        for model in loadable:
            if model.id not in listed:
                info = self.proxy.model_info(model.id)
                limit = {"context": info.context_tokens, "output": info.output_tokens} if info else None
                entry = {"id": model.id, "object": "model", "created": 0, "owned_by": "cortex", "limit": limit}
                if model.display_name:
                    entry["display_name"] = model.display_name
                if model.cost is not None:
                    entry["cost"] = model.cost.view()
                entries.append({**entry, **self.lifecycle.state(model.id)})
        return entries

    async def _health(self, request: asgi.Request) -> None:
        status = self.fleet.status()
        unservable = self.lifecycle.unservable()
        if unservable:
            status["unservable_models"] = unservable
        await asgi.send_json(request.send, 503 if status["status"] == "down" else 200, status)

    async def _metrics(self, request: asgi.Request) -> None:
        body = self.metrics.registry.render()
        await asgi.send_bytes(request.send, 200, body, [(b"content-type", METRICS_CONTENT_TYPE.encode())])

    async def _admin_api(self, request: asgi.Request) -> None:
        if self._admin is None:
            raise ApiError(404, "The admin API is off: start cortex with --admin-token or CORTEX_ADMIN_TOKEN.", code="admin_disabled")
        await self._admin.handle(request)

    async def _not_found(self, request: asgi.Request) -> None:
        raise errors.not_found(request.path)

    async def _method_not_allowed(self, request: asgi.Request, allowed: list[str]) -> None:
        raise errors.method_not_allowed(request.method, request.path, allowed)
