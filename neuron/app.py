"""neuron's ASGI app: an OpenAI-compatible API in front of one engine.

Each generation runs inside a cancel scope watched by a disconnect
detector, so a client that goes away stops generation at once.

Two engines. The mock (neuron/engines/mock.py) is bounded twice: `slots`
generations run at a time and at most `queue_depth` wait; past that the
request is refused with 503 rather than queued without limit. The kernel
engine (neuron/engines/kernel_engine.py) batches each model's sequences
in one scheduler task (neuron/scheduler.py) under admission control
(neuron/admission.py): slots, a queue with a wait bound, and a KV budget.

Models have a lifecycle (neuron/lifecycle.py): `POST /models/load` and
`POST /models/unload`, `GET /models`. Only ready models are listed in
`/v1/models`; a request for a loading or unloading one is a 503.

A kernel model's entry advertises its tokenizer files, `tokenizer: {...,
"sha256", "url"}`, and `GET /v1/models/{id}/tokenizer` serves them as one
JSON document (common/chat_template.py `tokenizer_document`), whose sha256
that is: cortex, on this host or another, fetches it once per sha256 and
counts prompts exactly with the files the engine encodes with. The mock
advertises none; a model without one is a 404.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import time
import urllib.parse
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
from common.chat_template import LIMIT_DOCUMENT_BYTES, document_sha256
from neuron import admission
from neuron.deltas import deltas
from neuron.engines import kernel_engine
from neuron.engines.kernel_engine import KernelEngine, KernelModel
from neuron.engines.mock import MockEngine, Reply, choose_tool
from neuron.lifecycle import READY, Lifecycle, ModelRecord, Requests, check_name, insufficient_memory, too_many_models
from neuron.metrics import CONTENT_TYPE, Metrics
from neuron.scheduler import Admitted, Failed, Finished, Piece, Refused, Ticket

VERSION = "0.1.0"
DRAIN_TIMEOUT_S_MAX = 3600.0

_log = logging.getLogger("neuron")


@dataclass(frozen=True)
class TokenizerInfo:
    """What cortex needs to bound a prompt's tokens: see common/counting.py for the byte-level rules."""

    kind: str = "byte-level"
    message_overhead_tokens: int = counting.MESSAGE_OVERHEAD_TOKENS
    reply_primer_tokens: int = counting.REPLY_PRIMER_TOKENS
    completion_prefix_tokens: int = 0  # special tokens a completion prompt gains (a BOS)

    def entry(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message_overhead_tokens": self.message_overhead_tokens,
            "reply_primer_tokens": self.reply_primer_tokens,
            "completion_prefix_tokens": self.completion_prefix_tokens,
        }


TOKENIZER_PATH_PREFIX = "/v1/models/"
TOKENIZER_PATH_SUFFIX = "/tokenizer"


def tokenizer_path(name: str) -> str:
    """Where a model's tokenizer document is served (the name percent-encoded: any character may be in it)."""
    return TOKENIZER_PATH_PREFIX + urllib.parse.quote(name, safe="") + TOKENIZER_PATH_SUFFIX


@dataclass(frozen=True)
class TokenizerDocument:
    """A kernel model's tokenizer document, built once at load, and its sha256."""

    document: bytes = field(repr=False)
    sha256: str

    def __post_init__(self) -> None:
        assert len(self.document) <= LIMIT_DOCUMENT_BYTES and len(self.sha256) == 64


@dataclass(frozen=True)
class ModelSpec:
    name: str
    context_tokens: int = 32768
    output_tokens: int = 4096
    tokenizer: TokenizerInfo = TokenizerInfo()
    files: TokenizerDocument | None = field(default=None, compare=False)  # None: nothing to advertise (the mock)

    def catalogue_entry(self, created: int) -> dict[str, Any]:
        tokenizer = self.tokenizer.entry()
        if self.files is not None:
            tokenizer.update(sha256=self.files.sha256, url=tokenizer_path(self.name))
        return {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "neuron",
            "limit": {"context": self.context_tokens, "output": self.output_tokens},
            "tokenizer": tokenizer,
        }


def advertised_tokenizer(name: str, tokenizer: Any) -> TokenizerDocument | None:
    """The document to advertise for a kernel model, or None (no chat template, or over the bound)."""
    document = tokenizer.files_document()
    if document is None:
        return None
    if len(document) > LIMIT_DOCUMENT_BYTES:
        _log.warning("tokenizer not advertised", extra={"fields": {
            "event": "tokenizer_not_advertised", "model": name, "bytes": len(document),
            "limit_bytes": LIMIT_DOCUMENT_BYTES}})
        return None
    return TokenizerDocument(document, document_sha256(document))


def kernel_spec(name: str, context_tokens: int, output_tokens: int, tokenizer: Any) -> ModelSpec:
    prefix = max(1, len(tokenizer.encode("", add_special_tokens=True))) if tokenizer.bos_token_id is not None else 0
    info = TokenizerInfo(tokenizer.kind, tokenizer.message_overhead_tokens, tokenizer.reply_primer_tokens, prefix)
    return ModelSpec(name, context_tokens, output_tokens, info, advertised_tokenizer(name, tokenizer))


@dataclass
class MockModel:
    """A loaded mock model: it takes only the memory it says it does."""

    spec: ModelSpec
    memory_bytes: int
    requests: Requests = field(default_factory=Requests)


@dataclass
class NeuronConfig:
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec("cortex-mock")])
    engine: MockEngine | KernelEngine = MockEngine()
    slots: int = 256
    queue_depth: int = 4096
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (then 408)
    chunk_tokens: int = 1  # tokens per SSE event; >1 trades smoothness for fewer writes
    memory_mb: float | None = None  # every loaded model together; None: no bound
    model_memory_mb: float = 1024.0  # mock: what each model pretends to take (a load may say otherwise)
    context_tokens: int = 32768  # mock: limits of models loaded through the API
    output_tokens: int = 4096
    drain_timeout_s: float = 30.0  # an unload waits this long for in-flight work, then cancels it
    load_s: float = 0.0  # mock: how long a load through the API takes (on the app's clock: virtual in the simulator)
    preloaded: list[KernelModel] = field(default_factory=list)  # kernel: loaded before serving (by the CLI)


@dataclass
class Counters:
    requests_total: int = 0  # generation requests admitted (past validation and the queue bound)
    rejected_total: int = 0  # refused before admission (bad input, context, overload)
    completed_total: int = 0
    cancelled_total: int = 0  # client went away mid-generation (or an unload cut it)
    in_flight: int = 0
    queued: int = 0
    tokens_generated_total: int = 0


class _HeadWatch:
    """Knows whether the response head went out: after it, a refusal can no longer be a status."""

    def __init__(self, request: asgi.Request) -> None:
        self.started = False
        self._send = request.send
        request.send = self._wrapped

    async def _wrapped(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class NeuronApp:
    def __init__(self, config: NeuronConfig, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.counters = Counters()
        self.metrics = Metrics()
        self.rejections: dict[str, dict[str, int]] = {}  # model -> reason -> refusals
        self.started_at = wall_clock()
        self._wall_clock = wall_clock
        assert config.slots >= 1 and config.queue_depth >= 0 and config.chunk_tokens >= 1
        assert config.drain_timeout_s >= 0
        self._slots = trio.CapacityLimiter(config.slots)
        budget = math.inf if config.memory_mb is None else config.memory_mb * 2**20
        self.lifecycle = Lifecycle(budget)
        self._loads: dict[str, trio.Event] = {}  # a load in progress: joiners wait on it
        self.load_waiters: dict[str, int] = {}  # requests waiting on another's load of that model
        self._load_errors: dict[str, ApiError] = {}
        self._unloads: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None  # the lifespan's: loads, unloads and schedulers live there
        self._register_startup_models()
        self.router = asgi.Router(self._not_found, self._method_not_allowed)
        self.router.add("POST", "/v1/chat/completions", self._chat)
        self.router.add("POST", "/v1/completions", self._completion)
        self.router.add("GET", "/v1/models", self._list_models)
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/discovery", self._discovery)
        self.router.add("GET", "/metrics", self._metrics)
        self.router.add("GET", "/models", self._models)
        self.router.add("POST", "/models/load", self._load)
        self.router.add("POST", "/models/unload", self._unload)
        self.router.add_prefix(TOKENIZER_PATH_PREFIX, self._model_tokenizer)

    @property
    def kernel(self) -> bool:
        return isinstance(self.config.engine, KernelEngine)

    @property
    def models(self) -> dict[str, ModelSpec]:
        """The ready models' catalogue entries, in load order."""
        return {r.name: r.served.spec for r in self.lifecycle.ready()}

    def _register_startup_models(self) -> None:
        now = self._wall_clock()
        served: list[MockModel | KernelModel] = list(self.config.preloaded)
        if not self.kernel:
            memory = int(self.config.model_memory_mb * 2**20)
            served += [MockModel(spec, memory) for spec in dict((m.name, m) for m in self.config.models).values()]
        for model in served:
            name = model.spec.name
            if self.lifecycle.begin_load(name, model.memory_bytes, _device(model)) != "start":
                raise ValueError(f"model {name}: a second copy, or over the memory budget of {self.config.memory_mb} MiB")
            self.lifecycle.load_done(name, model, now, device=_device(model), backend=_backend(model))
            self._watch(model)

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.serve_lifespan(receive, send, self._lifespan)
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
            _log.error("internal error", extra={"fields": {"event": "internal_error", "error": repr(exc)}})
            err = ApiError(500, f"Internal error in neuron: {type(exc).__name__}.", type="server_error", code="internal_error")
            await asgi.send_bytes(send, err.status, err.openai_bytes(), asgi.JSON_HEADERS)

    async def _lifespan(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background nursery: each kernel model's scheduler, and loads and unloads."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for record in self.lifecycle.ready():
                    if isinstance(record.served, KernelModel):
                        await nursery.start(record.served.scheduler.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for record in list(self.lifecycle.records.values()):
                if isinstance(record.served, KernelModel):
                    record.served.runner.close()

    # --- generation -------------------------------------------------------

    async def _chat(self, request: asgi.Request) -> None:
        gen = chat_request(await self._body(request))
        served = self._served(gen.model)
        if isinstance(served, KernelModel):
            await self._kernel_generate(request, gen, served)
            return
        prompt_tokens = counting.count_chat(gen.messages)
        await self._generate(request, gen, counting.render_chat(gen.messages), prompt_tokens, served)

    async def _completion(self, request: asgi.Request) -> None:
        gen = completion_request(await self._body(request))
        served = self._served(gen.model)
        if isinstance(served, KernelModel):
            await self._kernel_generate(request, gen, served)
            return
        await self._generate(request, gen, gen.prompt, counting.count_text(gen.prompt), served)

    async def _body(self, request: asgi.Request) -> dict[str, Any]:
        try:
            return parse_json_object(await request.body(self.config.max_body_bytes, self.config.body_timeout_s))
        except asgi.BodyTooLarge as exc:
            raise errors.payload_too_large(exc.limit_bytes) from None
        except asgi.BodyTimeout:
            raise errors.body_timeout(self.config.body_timeout_s) from None

    def _served(self, name: str) -> MockModel | KernelModel:
        """The ready model `name`: 404 when unknown, 503 while it loads or unloads."""
        record = self.lifecycle.get(name)
        if record is None:
            raise errors.model_not_found(name)
        if record.status != READY:
            self._reject(name, admission.NOT_READY)
            raise admission.not_ready(name, record.status)
        return record.served

    def _reject(self, model: str, reason: str) -> None:
        by_reason = self.rejections.setdefault(model, dict.fromkeys(admission.REASONS, 0))
        by_reason[reason] += 1
        self.metrics.inc("neuron_admission_rejections_total", (("model", model), ("reason", reason)))

    def _limit_tokens(self, gen: GenerationRequest, prompt_tokens: int, spec: ModelSpec, room: int | None = None) -> int:
        """The tokens this request may generate. `room`: the most the model's KV budget can ever
        hold for this prompt (kernel models); a limit the client did not set stays within it."""
        if gen.max_tokens_defaulted:  # the legacy default of 16, not the client's ask
            if prompt_tokens >= spec.context_tokens:
                raise errors.context_length_exceeded(prompt_tokens, 0, spec.context_tokens)
            limit = min(gen.max_output_tokens or 0, spec.output_tokens, spec.context_tokens - prompt_tokens)
            return min(limit, room) if room else limit  # room 0: the prompt alone is over; the scheduler's 413
        if gen.max_output_tokens is not None and gen.max_output_tokens > spec.output_tokens:
            raise errors.invalid_request(
                f"'max_tokens' is too large: {gen.max_output_tokens}. This model supports at most "
                f"{spec.output_tokens} completion tokens.",
                param="max_tokens",
            )
        if gen.max_output_tokens is None:
            if prompt_tokens >= spec.context_tokens:
                raise errors.context_length_exceeded(prompt_tokens, 0, spec.context_tokens)
            limit = min(spec.output_tokens, spec.context_tokens - prompt_tokens)
            return min(limit, room) if room else limit
        if prompt_tokens + gen.max_output_tokens > spec.context_tokens:
            raise errors.context_length_exceeded(prompt_tokens, gen.max_output_tokens, spec.context_tokens)
        return gen.max_output_tokens

    async def _generate(
        self, request: asgi.Request, gen: GenerationRequest, prompt: str, prompt_tokens: int, served: MockModel
    ) -> None:
        limit = self._limit_tokens(gen, prompt_tokens, served.spec)
        if self._slots.available_tokens == 0 and self.counters.queued >= self.config.queue_depth:
            self._reject(gen.model, admission.QUEUE_FULL)
            raise errors.server_overloaded("neuron queue is full; retry shortly.", retry_after_s=1)
        tool = choose_tool(gen.tools, gen.tool_choice, gen.messages)
        reply = self.config.engine.plan(gen.body.get("seed"), prompt, limit, gen.stop, tool, gen.reasoning_effort)
        self.counters.requests_total += 1
        arrived = trio.current_time()
        completion_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        head = _HeadWatch(request)
        async with asgi.disconnect_watch(request.receive) as watch:
            with served.requests.track() as cut:
                async with self._slot():
                    self.counters.in_flight += 1
                    try:
                        await self._respond(request, gen, reply, prompt_tokens, completion_id, watch)
                    finally:
                        self.counters.in_flight -= 1
        outcome = "cancelled" if cut.cancelled_caught or watch.disconnected else "completed"
        labels = (("model", gen.model),)
        self.metrics.inc("neuron_requests_total", (*labels, ("outcome", outcome)))
        if outcome == "completed":
            self.counters.completed_total += 1
            self.metrics.inc("neuron_prompt_tokens_total", labels, prompt_tokens)
            self.metrics.inc("neuron_generation_tokens_total", labels, reply.tokens)
        else:
            self.counters.cancelled_total += 1
        if _log.isEnabledFor(logging.INFO):  # the mock paces by plan: its TTFT is configured, not measured
            _log.info("generation", extra={"fields": {
                "event": "generation", "request_id": completion_id, "model": gen.model, "outcome": outcome,
                "stream": gen.stream, "prompt_tokens": prompt_tokens,
                "completion_tokens": reply.tokens if outcome == "completed" else None, "max_tokens": limit,
                "duration_s": round(trio.current_time() - arrived, 6),
            }})
        if cut.cancelled_caught:
            await self._after_cut(request, head, gen.model)

    async def _after_cut(self, request: asgi.Request, head: _HeadWatch, model: str, counted: bool = True) -> None:
        """An unload cut this request: a status if nothing went out yet (a refusal, then, not an
        admission: `counted` takes back its count as a cancelled request), else the stream ends
        without [DONE]."""
        if not head.started:
            if counted:
                self.counters.requests_total -= 1
                self.counters.cancelled_total -= 1
            self._reject(model, admission.NOT_READY)
            raise admission.not_ready(model, "unloading")
        try:
            await asgi.end_stream(request.send)
        except OSError:
            pass  # the client went too

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
        assert isinstance(engine, MockEngine)
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

    # --- the kernel engine ------------------------------------------------

    async def _kernel_generate(self, request: asgi.Request, gen: GenerationRequest, served: KernelModel) -> None:
        from neuron.engines.kernel.sampling import Sampler, SamplingParams  # noqa: PLC0415 - numpy, kernel only

        arrived = trio.current_time()
        head = _HeadWatch(request)
        # Tracked from here, before the first await: an unload drains or cuts the encode too, so
        # it never finds the model idle while a request is still on its way to the scheduler.
        with served.requests.track() as cut:
            if len(gen.prompt) + sum(len(counting.message_text(m)) for m in gen.messages) > kernel_engine.ENCODE_IN_THREAD_CHARS:
                ids = await trio.to_thread.run_sync(served.encode_sync, gen)
            else:
                ids = served.encode_sync(gen)
            prompt_tokens = len(ids)
            room = admission.max_tokens_that_fit(prompt_tokens, served.scheduler.limits)
            limit = self._limit_tokens(gen, prompt_tokens, served.spec, room)
            try:
                sampler = Sampler(SamplingParams(**kernel_engine.sampling_fields(gen)), served.fallback_seed())
            except ValueError as exc:
                raise errors.invalid_request(f"Bad sampling parameters: {exc}.") from None
            completion_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            shape = _Shape(gen, completion_id, int(self._wall_clock()), f"neuron-kernel-{served.runner.backend}")
            if limit < 1:  # no room to generate: never a request the scheduler cannot take
                raise errors.context_length_exceeded(prompt_tokens, 1, served.spec.context_tokens)
            ticket = served.scheduler.submit(ids, limit, sampler, served.output(gen.stop))
            self.counters.requests_total += 1
            outcome = "cancelled"
            try:
                async with asgi.disconnect_watch(request.receive) as watch:
                    outcome = await self._kernel_respond(request, gen, ticket, shape, completion_id, watch)
            except ApiError as err:
                outcome = "failed" if err.status == 500 else "refused"
                raise
            finally:
                served.scheduler.cancel(ticket)  # a no-op once finished; else its slot and KV go now
                if cut.cancel_called and not head.started:
                    outcome = "refused"  # the unload's 503 below, not an admission
                self._kernel_done(gen, ticket, arrived, outcome, completion_id)
        if cut.cancelled_caught:  # _kernel_done counted a refusal already when nothing went out
            await self._after_cut(request, head, gen.model, counted=False)

    async def _kernel_respond(
        self, request: asgi.Request, gen: GenerationRequest, ticket: Ticket, shape: _Shape, completion_id: str,
        watch: asgi.Disconnect,
    ) -> str:
        """Wait for admission, then relay the sequence's text. The outcome: completed, failed."""
        first = await ticket.events.receive()
        if isinstance(first, Refused):
            raise first.error
        if isinstance(first, Failed):  # the model stopped before this one was admitted
            raise admission.not_ready(gen.model, "stopping")
        assert isinstance(first, Admitted)
        headers = [(b"x-request-id", completion_id.encode())]
        if not gen.stream:
            pieces: list[str] = []
            async for event in ticket.events:
                if isinstance(event, Piece):
                    pieces.append(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(500, f"Generation failed in neuron: {event.message}.", type="server_error",
                                   code="generation_failed")
                elif isinstance(event, Finished):
                    reply = Reply("".join(pieces), event.finish_reason)
                    body = shape.whole(reply, ticket.prompt_tokens, event.completion_tokens)
                    watch.closing()
                    await asgi.send_json(request.send, 200, body, headers)
                    return "completed"
            raise AssertionError("a sequence's events ended without a finish")
        await asgi.start_stream(request.send, headers)
        if gen.kind == "chat":
            await asgi.send_chunk(request.send, asgi.sse_data(shape.chunk({"role": "assistant", "content": ""}, None)))
        async for event in ticket.events:
            if isinstance(event, Piece):
                await asgi.send_chunk(request.send, asgi.sse_data(shape.delta_chunk({"content": event.text})))
            elif isinstance(event, Failed):
                await asgi.end_stream(request.send)  # no [DONE]: the client sees a broken stream
                return "failed"
            elif isinstance(event, Finished):
                await asgi.send_chunk(request.send, asgi.sse_data(shape.finish_chunk(event.finish_reason)))
                if gen.include_usage:
                    reply = Reply("", event.finish_reason)
                    await asgi.send_chunk(request.send, asgi.sse_data(
                        shape.usage_chunk(ticket.prompt_tokens, reply, event.completion_tokens)))
                watch.closing()
                await asgi.send_chunk(request.send, asgi.SSE_DONE)
                await asgi.end_stream(request.send)
                return "completed"
        raise AssertionError("a sequence's events ended without a finish")

    def _kernel_done(self, gen: GenerationRequest, ticket: Ticket, arrived: float, outcome: str,
                     completion_id: str) -> None:
        """Count and log one generation that reached the scheduler, however it ended.

        A refusal after submission (the queue wait ran out) is counted as refused, not admitted,
        so requests_total + rejected_total still counts each request once."""
        c = self.counters
        if outcome == "completed":
            c.completed_total += 1
        elif outcome == "cancelled":
            c.cancelled_total += 1
        elif outcome == "refused":
            c.requests_total -= 1
        c.tokens_generated_total += ticket.completion_tokens
        labels = (("model", gen.model),)
        if ticket.first_token_at is not None:  # the whole prompt was prefilled: a token was sampled after it
            self.metrics.inc("neuron_prompt_tokens_total", labels, ticket.prompt_tokens)
        self.metrics.inc("neuron_generation_tokens_total", labels, ticket.completion_tokens)
        self.metrics.inc("neuron_requests_total", (*labels, ("outcome", outcome)))
        ttft_s = None if ticket.first_token_at is None else ticket.first_token_at - arrived
        if ttft_s is not None:
            self.metrics.observe("neuron_time_to_first_token_seconds", labels, ttft_s)
        if not _log.isEnabledFor(logging.INFO):
            return
        now = trio.current_time()
        rate = None
        if ticket.first_token_at is not None and ticket.completion_tokens >= 2:
            spent_s = (ticket.finished_at or now) - ticket.first_token_at
            rate = round((ticket.completion_tokens - 1) / spent_s, 3) if spent_s > 0 else None
        queued_s = None if ticket.admitted_at is None else ticket.admitted_at - ticket.created_at
        _log.info("generation", extra={"fields": {
            "event": "generation", "request_id": completion_id, "model": gen.model, "outcome": outcome,
            "stream": gen.stream, "prompt_tokens": ticket.prompt_tokens, "completion_tokens": ticket.completion_tokens,
            "max_tokens": ticket.max_tokens, "ttft_s": None if ttft_s is None else round(ttft_s, 6),
            "tokens_per_s": rate, "queue_s": None if queued_s is None else round(queued_s, 6),
            "duration_s": round(now - arrived, 6),
        }})

    # --- lifecycle --------------------------------------------------------

    def _watch(self, model: MockModel | KernelModel) -> None:
        """Hook a ready model's scheduler up to the metrics and the refusal counts."""
        if isinstance(model, KernelModel):
            name = model.spec.name
            labels = (("model", name),)
            model.scheduler.on_step = lambda n: self.metrics.observe("neuron_batch_size", labels, n)
            model.scheduler.on_reject = lambda reason: self._reject(name, reason)

    async def _models(self, request: asgi.Request) -> None:
        lc = self.lifecycle
        await asgi.send_json(request.send, 200, {
            "object": "list",
            "data": [_record_entry(r) for r in lc.records.values()],
            "memory_budget_bytes": None if math.isinf(lc.memory_budget_bytes) else int(lc.memory_budget_bytes),
            "memory_reserved_bytes": lc.memory_reserved_bytes,
        })

    async def _load(self, request: asgi.Request) -> None:
        body = await self._body(request)
        spec = self._load_spec(body)
        name = spec.name
        how = "already_loaded"
        while True:
            record = self.lifecycle.get(name)
            if record is not None and record.status == READY:
                break
            if record is not None and record.status != READY and name in self._loads:
                how = "joined"
                self.load_waiters[name] = self.load_waiters.get(name, 0) + 1
                try:
                    await self._loads[name].wait()
                finally:
                    self.load_waiters[name] -= 1
                if name in self._load_errors and self.lifecycle.get(name) is None:
                    raise self._load_errors[name]
                continue
            if record is not None:  # unloading
                raise admission.not_ready(name, record.status)
            need = await self._estimate(spec)
            begun = self.lifecycle.begin_load(name, need, getattr(spec, "device", "cpu"))
            if begun == "no_memory":
                lc = self.lifecycle
                raise insufficient_memory(name, need, lc.memory_reserved_bytes, lc.memory_budget_bytes)
            if begun == "too_many":
                raise too_many_models(name, self.lifecycle.models_max)
            if begun != "start":
                continue  # another request began it while we estimated: join it, or see it ready
            how = "loaded"
            self.metrics.inc("neuron_model_loads_total", (("model", name),))
            done = self._loads[name] = trio.Event()
            self._load_errors.pop(name, None)
            await self._background(self._run_load, spec, done)
            await done.wait()
            if self.lifecycle.get(name) is None:
                raise self._load_errors[name]
        record = self.lifecycle.get(name)
        assert record is not None
        await asgi.send_json(request.send, 200, {**_record_entry(record), "load": how})

    def _load_spec(self, body: dict[str, Any]) -> Any:
        engine = self.config.engine
        if isinstance(engine, KernelEngine):
            return kernel_engine.load_spec(body, engine)
        name = check_name(body.get("model"))
        memory_mb = body.get("memory_mb", self.config.model_memory_mb)
        if not isinstance(memory_mb, (int, float)) or isinstance(memory_mb, bool) or not 0 <= memory_mb <= 2**40:
            raise errors.invalid_request("'memory_mb' must be a number from 0 to 2**40.", param="memory_mb")
        return _MockLoad(name, int(memory_mb * 2**20))

    async def _estimate(self, spec: Any) -> int:
        if isinstance(spec, _MockLoad):
            return spec.memory_bytes
        engine = self.config.engine
        assert isinstance(engine, KernelEngine)
        from neuron.engines.kernel.runner import KernelConfigError  # noqa: PLC0415

        try:
            return await trio.to_thread.run_sync(kernel_engine.estimate_bytes, spec, engine)
        except KernelConfigError as exc:
            raise _load_failed(spec.name, exc) from None

    async def _background(self, task: Callable[..., Any], *args: Any) -> None:
        """Run in the lifespan's nursery, so the client leaving does not abandon the work for
        those who joined it; without a lifespan (in-process use), in the caller, shielded."""
        if self._nursery is not None:
            self._nursery.start_soon(task, *args)
            return
        with trio.CancelScope(shield=True):
            await task(*args)

    async def _run_load(self, spec: Any, done: trio.Event) -> None:
        name = spec.name
        try:
            served = await self._load_model(spec)
        except ApiError as err:
            self._load_errors[name] = err
            self.lifecycle.load_failed(name)
        except Exception as exc:  # noqa: BLE001 - any load failure is the caller's answer, not a crash
            self._load_errors[name] = _load_failed(name, exc)
            self.lifecycle.load_failed(name)
        else:
            self.lifecycle.load_done(name, served, self._wall_clock(), device=_device(served),
                                     backend=_backend(served), memory_bytes=served.memory_bytes)
            self._watch(served)
            if isinstance(served, KernelModel) and self._nursery is not None:
                await self._nursery.start(served.scheduler.run)
        finally:
            del self._loads[name]
            done.set()

    async def _load_model(self, spec: Any) -> MockModel | KernelModel:
        if isinstance(spec, _MockLoad):
            await trio.sleep(self.config.load_s)  # the mock's pretend weight loading
            return MockModel(ModelSpec(spec.name, self.config.context_tokens, self.config.output_tokens),
                             spec.memory_bytes)
        engine = self.config.engine
        assert isinstance(engine, KernelEngine)
        from neuron.engines.kernel.runner import KernelConfigError  # noqa: PLC0415

        try:
            return await trio.to_thread.run_sync(kernel_engine.load_sync, spec, engine, kernel_spec)
        except KernelConfigError as exc:
            raise _load_failed(spec.name, exc) from None

    async def _unload(self, request: asgi.Request) -> None:
        body = await self._body(request)
        name = check_name(body.get("model"))
        drain_s = body.get("drain_timeout_s", self.config.drain_timeout_s)
        if not isinstance(drain_s, (int, float)) or isinstance(drain_s, bool) or not 0 <= drain_s <= DRAIN_TIMEOUT_S_MAX:
            raise errors.invalid_request(
                f"'drain_timeout_s' must be a number from 0 to {DRAIN_TIMEOUT_S_MAX:g}.", param="drain_timeout_s"
            )
        begun = self.lifecycle.begin_unload(name)
        if begun == "absent":
            raise errors.model_not_found(name)
        if begun == "loading":
            raise admission.not_ready(name, "loading")
        record = self.lifecycle.get(name)
        assert record is not None
        in_flight = len(record.served.requests)
        if begun == "start":
            self._unloads[name] = trio.Event()
        done = self._unloads[name]  # taken first: without a lifespan the unload runs inline and pops it
        if begun == "start":
            await self._background(self._run_unload, record, float(drain_s))
        await done.wait()
        await asgi.send_json(request.send, 200, {
            "model": name, "status": "unloaded", "in_flight_at_unload": in_flight,
            "cancelled": record.served.requests.cut_total, "unload": "unloaded" if begun == "start" else "joined",
        })

    async def _run_unload(self, record: ModelRecord, drain_s: float) -> None:
        """Drain (bounded), cut what is left, wait for it to leave, then free."""
        served = record.served
        try:
            if not await served.requests.drain(drain_s):
                served.requests.cut()
                await served.requests.wait_empty()  # cut requests leave at their next checkpoint
            if isinstance(served, KernelModel):
                await served.scheduler.wait_idle()  # cancelled sequences are reaped after the step in flight
                await served.scheduler.shutdown()
                await trio.to_thread.run_sync(served.runner.close)
        finally:
            self.lifecycle.unload_done(record.name)
            self._unloads.pop(record.name).set()

    # --- catalogue and health --------------------------------------------

    async def _list_models(self, request: asgi.Request) -> None:
        created = int(self.started_at)
        await asgi.send_json(
            request.send, 200, {"object": "list", "data": [m.catalogue_entry(created) for m in self.models.values()]}
        )

    async def _model_tokenizer(self, request: asgi.Request) -> None:
        """`GET /v1/models/{id}/tokenizer`: a ready model's tokenizer document, as advertised."""
        path = request.path
        if not path.endswith(TOKENIZER_PATH_SUFFIX) or len(path) <= len(TOKENIZER_PATH_PREFIX + TOKENIZER_PATH_SUFFIX):
            raise errors.not_found(path)
        if request.method != "GET":
            raise errors.method_not_allowed(request.method, path, ["GET"])
        name = path[len(TOKENIZER_PATH_PREFIX):-len(TOKENIZER_PATH_SUFFIX)]
        spec = self.models.get(name)
        if spec is None:
            raise errors.model_not_found(name)
        if spec.files is None:
            raise ApiError(404, f"The model `{name}` has no tokenizer files to serve (the kernel engine's models "
                                "with a chat template have).", param="model", code="tokenizer_not_found")
        headers = asgi.JSON_HEADERS + [(b"etag", f'"{spec.files.sha256}"'.encode())]
        await asgi.send_bytes(request.send, 200, spec.files.document, headers)

    def _model_health(self, record: ModelRecord) -> dict[str, Any]:
        entry: dict[str, Any] = {"status": record.status}
        served = record.served
        if served is not None:
            entry["in_flight"] = len(served.requests)
        if isinstance(served, KernelModel):
            core = served.scheduler.core
            limits = core.limits
            kv_per_token = served.runner.kv_bytes_per_token
            used = served.runner.kv_tokens_used()
            entry.update({
                "in_flight": len(core.running),
                "queued": len(core.queue),
                "max_in_flight": limits.max_in_flight,
                "max_queue_depth": limits.max_queue_depth,
                "queue_wait_s": limits.queue_wait_s,
                "kv_tokens_used": used,
                "kv_tokens_reserved": core.kv_reserved_tokens,
                "kv_budget_tokens": limits.kv_budget_tokens,
                "kv_bytes_used": used * kv_per_token,
                "kv_budget_bytes": limits.kv_budget_tokens * kv_per_token,
                "kv_usage_ratio": round(admission.ratio(used, limits.kv_budget_tokens), 6),
                "step_in_progress": served.scheduler.stepping,
                "steps_total": core.tally.steps,
                "sequences": {
                    "admitted": core.tally.admitted, "finished": core.tally.finished, "failed": core.tally.failed,
                    "cancelled_running": core.tally.cancelled_running, "cancelled_queued": core.tally.cancelled_queued,
                    "expired": core.tally.expired,
                },
            })
        entry["rejections"] = self.rejections.get(record.name, dict.fromkeys(admission.REASONS, 0))
        return entry

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
                "in_flight": c.in_flight + sum(len(m.scheduler.core.running) for m in self._kernel_models()),
                "queued": c.queued + sum(len(m.scheduler.core.queue) for m in self._kernel_models()),
                "tokens_generated_total": c.tokens_generated_total,
                **self._mock_limits(),
                "model_loads_total": self.lifecycle.loads_total,
                "per_model": {r.name: self._model_health(r) for r in self.lifecycle.records.values()},
            },
        )

    def _kernel_models(self) -> list[KernelModel]:
        return [r.served for r in self.lifecycle.ready() if isinstance(r.served, KernelModel)]

    async def _metrics(self, request: asgi.Request) -> None:
        gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for record in self.lifecycle.ready():
            labels = (("model", record.name),)
            served = record.served
            gauges[("neuron_in_flight", labels)] = len(served.requests)
            if isinstance(served, KernelModel):
                core = served.scheduler.core
                budget = core.limits.kv_budget_tokens
                gauges[("neuron_in_flight", labels)] = len(core.running)
                gauges[("neuron_queue_depth", labels)] = len(core.queue)
                gauges[("neuron_kv_cache_usage_ratio", labels)] = admission.ratio(served.runner.kv_tokens_used(), budget)
                gauges[("neuron_kv_cache_reserved_ratio", labels)] = admission.ratio(core.kv_reserved_tokens, budget)
        body = self.metrics.render(gauges)
        await asgi.send_bytes(request.send, 200, body, [(b"content-type", CONTENT_TYPE)])

    async def _discovery(self, request: asgi.Request) -> None:
        total, available = kernel_engine.host_memory_bytes()
        cpu = {"kind": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "memory_total_bytes": total, "memory_available_bytes": available}
        # cupy is slow to import: off the event loop, and only where it is installed (no thread otherwise).
        gpus = await trio.to_thread.run_sync(kernel_engine.gpus) if kernel_engine.cupy_installed() else []
        await asgi.send_json(
            request.send,
            200,
            {
                "neuron_version": VERSION,
                "host": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "engine": self.config.engine.name,
                "devices": [cpu, *gpus],
                "models": [m.catalogue_entry(int(self.started_at)) for m in self.models.values()],
                **self._mock_limits(),
            },
        )

    def _mock_limits(self) -> dict[str, int]:
        """The mock's admission bounds (the kernel engine's are per model, under per_model)."""
        return {} if self.kernel else {"slots": self.config.slots, "queue_depth": self.config.queue_depth}

    async def _not_found(self, request: asgi.Request) -> None:
        raise errors.not_found(request.path)

    async def _method_not_allowed(self, request: asgi.Request, allowed: list[str]) -> None:
        raise errors.method_not_allowed(request.method, request.path, allowed)


@dataclass(frozen=True)
class _MockLoad:
    name: str
    memory_bytes: int
    device: str = "cpu"


def _device(model: MockModel | KernelModel) -> str:
    return model.runner.device if isinstance(model, KernelModel) else "cpu"


def _backend(model: MockModel | KernelModel) -> str:
    return model.runner.backend if isinstance(model, KernelModel) else "mock"


def _record_entry(record: ModelRecord) -> dict[str, Any]:
    return {
        "id": record.name,
        "status": record.status,
        "device": record.device,
        "backend": record.backend,
        "memory_bytes": record.memory_bytes,
        "loaded_at": record.loaded_at,
    }


def _load_failed(name: str, exc: BaseException) -> ApiError:
    return ApiError(400, f"Cannot load `{name}`: {exc}", param="model", code="model_load_failed")


class _Shape:
    """Builds the OpenAI response objects for one generation."""

    def __init__(self, gen: GenerationRequest, completion_id: str, created: int, fingerprint: str = "neuron-mock") -> None:
        self.chat = gen.kind == "chat"
        self.base = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + completion_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": gen.model,
            "system_fingerprint": fingerprint,
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

    def usage_chunk(self, prompt_tokens: int, reply: Reply, completion_tokens: int | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": _usage(prompt_tokens, reply, completion_tokens)}

    def whole(self, reply: Reply, prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, Any]:
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
        usage = _usage(prompt_tokens, reply, completion_tokens)
        return {**self.base, "object": obj, "choices": [choice], "usage": usage}


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


def _usage(prompt_tokens: int, reply: Reply, completion_tokens: int | None = None) -> dict[str, Any]:
    """Exact usage: the mock's reply is its own count; the kernel engine passes the tokens it generated."""
    completion = reply.tokens if completion_tokens is None else completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if reply.reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
    return usage
