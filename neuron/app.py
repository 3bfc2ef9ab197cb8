"""neuron's ASGI app: an OpenAI-compatible API in front of one engine.

Each generation runs inside a cancel scope watched by a disconnect
detector, so a client that goes away stops generation at once. Admission
is bounded twice: `slots` generations run at a time and at most
`queue_depth` wait; past that the request is refused with 503 rather than
queued without limit.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from common import asgi
from common import errors
from common.errors import ApiError
from common.openai_schema import GenerationRequest, chat_request, completion_request, parse_json_object
from common import counting
from neuron.deltas import deltas
from neuron.engines.mock import MockEngine, Reply, choose_tool

VERSION = "0.1.0"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    context_tokens: int = 32768
    output_tokens: int = 4096

    def catalogue_entry(self, created: int) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "neuron",
            "limit": {"context": self.context_tokens, "output": self.output_tokens},
        }


@dataclass
class NeuronConfig:
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec("cortex-mock")])
    engine: MockEngine = MockEngine()
    slots: int = 256
    queue_depth: int = 4096
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (then 408)
    chunk_tokens: int = 1  # tokens per SSE event; >1 trades smoothness for fewer writes


@dataclass
class Counters:
    requests_total: int = 0  # generation requests admitted (past validation and the queue bound)
    rejected_total: int = 0  # refused before admission (bad input, context, overload)
    completed_total: int = 0
    cancelled_total: int = 0  # client went away mid-generation
    in_flight: int = 0
    queued: int = 0
    tokens_generated_total: int = 0


class NeuronApp:
    def __init__(self, config: NeuronConfig, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.models = {m.name: m for m in config.models}
        self.counters = Counters()
        self.started_at = wall_clock()
        self._wall_clock = wall_clock
        assert config.slots >= 1 and config.queue_depth >= 0 and config.chunk_tokens >= 1
        self._slots = trio.CapacityLimiter(config.slots)
        self.router = asgi.Router(self._not_found, self._method_not_allowed)
        self.router.add("POST", "/v1/chat/completions", self._chat)
        self.router.add("POST", "/v1/completions", self._completion)
        self.router.add("GET", "/v1/models", self._list_models)
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/discovery", self._discovery)

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.serve_lifespan(receive, send, _ready)
            return
        if scope["type"] == "websocket":
            await asgi.refuse_websocket(receive, send, errors.websocket_refused().openai_bytes())
        if scope["type"] != "http":
            return
        request = asgi.Request.from_scope(scope, receive, send)
        try:
            await self.router.dispatch(request)
        except ApiError as err:
            self.counters.rejected_total += 1
            await asgi.send_bytes(send, err.status, err.openai_bytes(), asgi.JSON_HEADERS + err.headers)
        except asgi.ClientGone:
            pass  # left before its body was complete: nothing to answer
        except Exception as exc:  # a bug must still answer in the API's shape
            self.counters.rejected_total += 1
            err = ApiError(500, f"Internal error in neuron: {type(exc).__name__}.", type="server_error", code="internal_error")
            await asgi.send_bytes(send, err.status, err.openai_bytes(), asgi.JSON_HEADERS)

    # --- generation -------------------------------------------------------

    async def _chat(self, request: asgi.Request) -> None:
        gen = chat_request(await self._body(request))
        prompt_tokens = counting.count_chat(gen.messages)
        await self._generate(request, gen, counting.render_chat(gen.messages), prompt_tokens)

    async def _completion(self, request: asgi.Request) -> None:
        gen = completion_request(await self._body(request))
        await self._generate(request, gen, gen.prompt, counting.count_text(gen.prompt))

    async def _body(self, request: asgi.Request) -> dict[str, Any]:
        try:
            return parse_json_object(await request.body(self.config.max_body_bytes, self.config.body_timeout_s))
        except asgi.BodyTooLarge as exc:
            raise errors.payload_too_large(exc.limit_bytes) from None
        except asgi.BodyTimeout:
            raise errors.body_timeout(self.config.body_timeout_s) from None

    def _limit_tokens(self, gen: GenerationRequest, prompt_tokens: int) -> int:
        spec = self.models.get(gen.model)
        if spec is None:
            raise errors.model_not_found(gen.model)
        if gen.max_tokens_defaulted:  # the legacy default of 16, not the client's ask
            return min(gen.max_output_tokens or 0, spec.output_tokens, max(0, spec.context_tokens - prompt_tokens))
        if gen.max_output_tokens is not None and gen.max_output_tokens > spec.output_tokens:
            raise errors.invalid_request(
                f"'max_tokens' is too large: {gen.max_output_tokens}. This model supports at most "
                f"{spec.output_tokens} completion tokens.",
                param="max_tokens",
            )
        if gen.max_output_tokens is None:
            if prompt_tokens >= spec.context_tokens:
                raise errors.context_length_exceeded(prompt_tokens, 0, spec.context_tokens)
            return min(spec.output_tokens, spec.context_tokens - prompt_tokens)
        if prompt_tokens + gen.max_output_tokens > spec.context_tokens:
            raise errors.context_length_exceeded(prompt_tokens, gen.max_output_tokens, spec.context_tokens)
        return gen.max_output_tokens

    async def _generate(self, request: asgi.Request, gen: GenerationRequest, prompt: str, prompt_tokens: int) -> None:
        limit = self._limit_tokens(gen, prompt_tokens)
        if self._slots.available_tokens == 0 and self.counters.queued >= self.config.queue_depth:
            raise errors.server_overloaded("neuron queue is full; retry shortly.", retry_after_s=1)
        tool = choose_tool(gen.tools, gen.tool_choice, gen.messages)
        reply = self.config.engine.plan(gen.body.get("seed"), prompt, limit, gen.stop, tool, gen.reasoning_effort)
        self.counters.requests_total += 1
        completion_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        async with asgi.disconnect_watch(request.receive) as watch:
            async with self._slot():
                self.counters.in_flight += 1
                try:
                    await self._respond(request, gen, reply, prompt_tokens, completion_id, watch)
                finally:
                    self.counters.in_flight -= 1
        if watch.disconnected:
            self.counters.cancelled_total += 1
        else:
            self.counters.completed_total += 1

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one generation slot; the wait for it is counted in `queued`."""
        self.counters.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.counters.queued -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def _respond(
        self,
        request: asgi.Request,
        gen: GenerationRequest,
        reply: Reply,
        prompt_tokens: int,
        completion_id: str,
        watch: asgi.Disconnect,
    ) -> None:
        engine = self.config.engine
        start = trio.current_time()
        shape = _Shape(gen, completion_id, int(self._wall_clock()))
        if not gen.stream:
            if reply.tokens:
                await engine.wait_for_token(start, reply.tokens - 1)
            self.counters.tokens_generated_total += reply.tokens
            body = shape.whole(reply, prompt_tokens)
            watch.closing()
            await asgi.send_json(request.send, 200, body, [(b"x-request-id", completion_id.encode())])
            return
        await asgi.start_stream(request.send, [(b"x-request-id", completion_id.encode())])
        if gen.kind == "chat":
            await asgi.send_chunk(request.send, asgi.sse_data(shape.chunk({"role": "assistant", "content": ""}, None)))
        for delta in deltas(reply, self.config.chunk_tokens):
            await engine.wait_for_token(start, delta.last_token)
            self.counters.tokens_generated_total += delta.tokens
            await asgi.send_chunk(request.send, asgi.sse_data(shape.delta_chunk(delta.fields)))
        await asgi.send_chunk(request.send, asgi.sse_data(shape.finish_chunk(reply.finish_reason)))
        if gen.include_usage:
            await asgi.send_chunk(request.send, asgi.sse_data(shape.usage_chunk(prompt_tokens, reply)))
        watch.closing()
        await asgi.send_chunk(request.send, asgi.SSE_DONE)
        await asgi.end_stream(request.send)

    # --- catalogue and health --------------------------------------------

    async def _list_models(self, request: asgi.Request) -> None:
        created = int(self.started_at)
        await asgi.send_json(
            request.send, 200, {"object": "list", "data": [m.catalogue_entry(created) for m in self.models.values()]}
        )

    async def _health(self, request: asgi.Request) -> None:
        c = self.counters
        await asgi.send_json(
            request.send,
            200,
            {
                "status": "ok",
                "engine": self.config.engine.name,
                "models": sorted(self.models),
                "uptime_s": round(self._wall_clock() - self.started_at, 3),
                "requests_total": c.requests_total,
                "rejected_total": c.rejected_total,
                "completed_total": c.completed_total,
                "cancelled_total": c.cancelled_total,
                "in_flight": c.in_flight,
                "queued": c.queued,
                "tokens_generated_total": c.tokens_generated_total,
                "slots": self.config.slots,
                "queue_depth": self.config.queue_depth,
            },
        )

    async def _discovery(self, request: asgi.Request) -> None:
        await asgi.send_json(
            request.send,
            200,
            {
                "neuron_version": VERSION,
                "host": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "engine": self.config.engine.name,
                "devices": [{"kind": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}],
                "models": [m.catalogue_entry(int(self.started_at)) for m in self.models.values()],
                "slots": self.config.slots,
                "queue_depth": self.config.queue_depth,
            },
        )

    async def _not_found(self, request: asgi.Request) -> None:
        raise errors.not_found(request.path)

    async def _method_not_allowed(self, request: asgi.Request, allowed: list[str]) -> None:
        raise errors.method_not_allowed(request.method, request.path, allowed)


class _Shape:
    """Builds the OpenAI response objects for one generation."""

    def __init__(self, gen: GenerationRequest, completion_id: str, created: int) -> None:
        self.chat = gen.kind == "chat"
        self.base = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + completion_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": gen.model,
            "system_fingerprint": "neuron-mock",
        }
        self.usage_field = {"usage": None} if gen.include_usage else {}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.base, "choices": [choice], **self.usage_field}

    def delta_chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            return self.chunk(delta, None)
        assert list(delta) == ["content"]  # completions stream text only
        choice = {"index": 0, "text": delta["content"], "logprobs": None, "finish_reason": None}
        return {**self.base, "choices": [choice], **self.usage_field}

    def finish_chunk(self, finish_reason: str) -> dict[str, Any]:
        if self.chat:
            return self.chunk({}, finish_reason)
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.base, "choices": [choice], **self.usage_field}

    def usage_chunk(self, prompt_tokens: int, reply: Reply) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": _usage(prompt_tokens, reply)}

    def whole(self, reply: Reply, prompt_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": _message(reply),
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": reply.finish_reason}
            obj = "text_completion"
        return {**self.base, "object": obj, "choices": [choice], "usage": _usage(prompt_tokens, reply)}


def _message(reply: Reply) -> dict[str, Any]:
    """The assistant message: content null when it calls a tool; reasoning only when asked for."""
    call = reply.tool_call
    message: dict[str, Any] = {"role": "assistant", "content": None if call else reply.text, "refusal": None}
    if call:
        function = {"name": call.name, "arguments": call.arguments}
        message["tool_calls"] = [{"id": call.id, "type": "function", "function": function}]
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return message


def _usage(prompt_tokens: int, reply: Reply) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": reply.tokens,
        "total_tokens": prompt_tokens + reply.tokens,
    }
    if reply.reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
    return usage


async def _ready(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    await trio.sleep_forever()
