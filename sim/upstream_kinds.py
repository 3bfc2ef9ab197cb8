"""Upstreams of every kind cortex fronts, modelled as small in-memory ASGI apps.

neuron stays the real `NeuronApp` (world.py). The other kinds -- openai,
vllm, llamacpp, ollama, sglang, tgi -- are modelled here at the HTTP
boundary, as far as cortex's adapters (cortex/fleet/kinds/) read them:

* the health probe at the kind's own path, and its "not ready" answer while
  the model loads (llama.cpp's 503 "Loading model"; vLLM's, SGLang's and
  TGI's 503), when generation is refused too;
* the model listing with the kind's own limit fields: vLLM and SGLang
  `max_model_len`, llama.cpp `/props` `default_generation_settings.n_ctx`
  (and `n_predict`), TGI `/info` `max_total_tokens`; Ollama (`/api/tags`)
  and openai report none;
* `POST /v1/chat/completions`, streamed (SSE, a usage frame when
  `stream_options.include_usage`, then `[DONE]`) and not, paced in virtual
  time by the real mock engine's pacing;
* the kind's error shapes for an overload (its own status and words; a
  Retry-After only when the fault sets one) and a context overflow, and the
  request fields it refuses (vLLM's `stream_options` without `stream`,
  TGI's `max_tokens` beside `max_completion_tokens`). TGI answers a
  streamed request's error in-band: a 200 whose first event is the error.

The text is the real mock engine's, so runs are deterministic. The
tokenizer is not neuron's: a token is `token_bytes` bytes (4 unless the
scenario says otherwise), a message costs TEMPLATE_TOKENS of template and a
prompt PRIMER_TOKENS, so counts differ from cortex's byte-level bound as a
real server's do, and the checker converts what a client received into the
serving upstream's tokens. Where a detail of a server's shape is not what
cortex reads, it is left out.

`ServerFaults` is a server's own misbehaviour (the link's is
network.LinkFaults): an overload window in which generation requests are
refused in the kind's words. `NeuronGate` applies it in front of the real
NeuronApp, in neuron's own envelope.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from common import asgi, counting, errors
from neuron.engines.mock import MockEngine, Pacing
from sim.network import CONTROL_PATHS
from sim.scenario import LOADING_KINDS, UpstreamSpec

TEMPLATE_TOKENS = 3  # per message: below cortex's MESSAGE_OVERHEAD_TOKENS, as its estimate requires
PRIMER_TOKENS = 2
CHAT_PATH = "/v1/chat/completions"
BODY_MAX_BYTES = 4 * 1024 * 1024
TEXT_PLAIN = b"text/plain; charset=utf-8"


def tokens_of(text: str, token_bytes: int) -> int:
    return -(-len(text.encode("utf-8")) // token_bytes)


def prompt_tokens(messages: list[Any], token_bytes: int) -> int:
    """The prompt as this server's tokenizer counts it: never above cortex's byte-level bound."""
    return PRIMER_TOKENS + sum(TEMPLATE_TOKENS + tokens_of(counting.message_text(m), token_bytes) for m in messages)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"

    def with_retry_after(self, retry_after_s: float | None) -> Reply:
        if retry_after_s is None:
            return self
        value = f"{retry_after_s:g}".encode()
        return Reply(self.status, self.body, (*self.headers, (b"retry-after", value)), self.content_type)

    async def send(self, send: asgi.Send) -> None:
        await asgi.send_bytes(send, self.status, self.body, [(b"content-type", self.content_type), *self.headers])


def json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, asgi.encode_json(payload))


@dataclass(frozen=True)
class Fit:
    """A request that fits: the prompt as the server counts it and the most output it may write."""

    prompt_tokens: int
    output_tokens: int


# --- the kinds: what differs between servers --------------------------------------------


class Wire:
    """OpenAI-shaped defaults; each kind overrides what its server does differently."""

    kind = ""
    health_path = "/health"
    overload_status = 503
    overload_message = "The server is overloaded."
    overload_type = "server_error"
    checks_model = True  # refuses a model it does not serve (the one-model servers answer whatever is asked)
    in_band_stream_errors = False
    fingerprint: str | None = None

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.context = spec.context_tokens

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        body = {"message": message, "type": type_ or "invalid_request_error", "param": None, "code": None, **extra}
        return json_reply(status, {"error": body})

    def health(self, ready: bool) -> Reply:
        return Reply(200 if ready else 503)

    def documents(self) -> dict[str, Any]:
        """GET path -> JSON body: the model listing and whatever carries the limits."""
        return {"/v1/models": {"object": "list", "data": [self.card(name) for name in self.spec.models]}}

    def card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": self.kind}

    def not_found(self, path: str) -> Reply:
        return self.error(404, f"Not Found: {path}", "not_found_error")

    def unknown_model(self, model: str) -> Reply:
        return self.error(404, f"The model `{model}` does not exist.", "not_found_error")

    def overload(self, status: int) -> Reply:
        return self.error(status, self.overload_message, self.overload_type)

    def loading(self) -> Reply:
        """What generation gets while the model loads."""
        return self.overload(503)

    def refused_fields(self, body: dict[str, Any], stream: bool) -> Reply | None:
        return None

    def asked_output(self, body: dict[str, Any]) -> int | None:
        return _int_field(body, "max_completion_tokens", "max_tokens")

    def fit(self, prompt: int, asked: int | None) -> Fit | Reply:
        room = self.context - prompt
        if room <= 0 or (asked is not None and asked > room):
            return self.overflow(prompt, asked)
        return Fit(prompt, room if asked is None else asked)

    def overflow(self, prompt: int, asked: int | None) -> Reply:
        return self.error(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                               f"{prompt + (asked or 0)} tokens.", code="context_length_exceeded", param="messages")

    def stream_error_event(self, reply: Reply) -> bytes:
        raise NotImplementedError(f"{self.kind} reports errors with a status, not in-band")


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class OpenAIWire(Wire):
    """OpenAI: no health endpoint (the probe is the model list), no limits listed, string error codes."""

    kind = "openai"
    health_path = "/v1/models"
    overload_message = "The engine is currently overloaded, please try again later."
    fingerprint = "fp_sim"

    def refused_fields(self, body: dict[str, Any], stream: bool) -> Reply | None:
        if body.get("stream_options") is not None and not stream:
            return self.error(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options")
        return None


class VLLMWire(Wire):
    """vLLM: `max_model_len` per model card, nested ErrorInfo errors whose `code` is the status."""

    kind = "vllm"
    overload_message = "The request queue is full."
    prompt_too_long = ("This model's maximum context length is {ctx} tokens. However, your request has {prompt} input "
                       "tokens. Please reduce the length of the input messages.")
    output_too_long = ("'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum context "
                       "length is {ctx} tokens and your request has {prompt} input tokens ({asked} > {ctx} - {prompt}).")
    _types = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        info = {"message": message, "type": self._types.get(status, "InternalServerError"), "param": None, "code": status}
        return json_reply(status, {"error": info})

    def card(self, name: str) -> dict[str, Any]:
        return {**super().card(name), "root": name, "parent": None, "max_model_len": self.context}

    def refused_fields(self, body: dict[str, Any], stream: bool) -> Reply | None:
        if body.get("stream_options") is not None and not stream:
            return self.error(400, "Stream options can only be defined when `stream=True`.")
        return None

    def overflow(self, prompt: int, asked: int | None) -> Reply:
        template = self.prompt_too_long if prompt >= self.context else self.output_too_long
        return self.error(400, template.format(ctx=self.context, prompt=prompt, asked=asked, total=prompt + (asked or 0)))


class SGLangWire(VLLMWire):
    """SGLang: vLLM's model card, the flat error form, and one token less room (`>=`)."""

    kind = "sglang"
    checks_model = False
    prompt_too_long = "The input ({prompt} tokens) is longer than the model's context length ({ctx} tokens)."
    output_too_long = ("Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested "
                       "a total of {total} tokens: {prompt} tokens from the input messages and {asked} tokens for the "
                       "completion.")

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        name = self._types.get(status, "InternalServerError")
        return json_reply(status, {"object": "error", "message": message, "type": name, "param": None, "code": status})

    def fit(self, prompt: int, asked: int | None) -> Fit | Reply:
        room = self.context - prompt - 1
        if room < 0 or (asked is not None and asked > room):
            return self.overflow(prompt, asked)
        return Fit(prompt, room if asked is None else asked)


class LlamaCppWire(Wire):
    """llama.cpp: one model; its limit in `/props`; 503 "Loading model" while loading; an output bound
    that does not fit is not refused, generation stops at the context."""

    kind = "llamacpp"
    checks_model = False
    fingerprint = "b6000-sim"

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        return json_reply(status, {"error": {"code": status, "message": message, "type": type_ or "server_error", **extra}})

    def health(self, ready: bool) -> Reply:
        return json_reply(200, {"status": "ok"}) if ready else self.loading()

    def loading(self) -> Reply:
        return self.error(503, "Loading model", "unavailable_error")

    def overload(self, status: int) -> Reply:
        return self.error(status, "Loading model" if status == 503 else "server busy", "unavailable_error")

    def documents(self) -> dict[str, Any]:
        n_predict = self.spec.output_tokens or -1  # -1: unbounded, llama.cpp's default
        settings = {"n_ctx": self.context, "params": {"n_predict": n_predict}}
        return {
            "/v1/models": {"object": "list", "data": [{**self.card(self.spec.models[0]), "meta": {"n_ctx_train": self.context * 8}}]},
            "/props": {"default_generation_settings": settings, "total_slots": self.spec.slots},
        }

    def fit(self, prompt: int, asked: int | None) -> Fit | Reply:
        if prompt >= self.context:
            return self.overflow(prompt, asked)
        limits = [v for v in (self.context - prompt, self.spec.output_tokens, asked) if v is not None]
        return Fit(prompt, min(limits))

    def overflow(self, prompt: int, asked: int | None) -> Reply:
        return self.error(400, f"request ({prompt} tokens) exceeds the available context size ({self.context} tokens), "
                               "try increasing it", "exceed_context_size_error", n_prompt_tokens=prompt, n_ctx=self.context)


class OllamaWire(Wire):
    """Ollama: `GET /` for health, `/api/tags` for models (no limits), and a prompt over its context
    cut silently (the usage then counts what it kept)."""

    kind = "ollama"
    health_path = "/"
    overload_message = "server busy, please try again.  maximum pending requests exceeded"
    overload_type = "api_error"
    fingerprint = "fp_ollama"

    def health(self, ready: bool) -> Reply:
        return Reply(200, b"Ollama is running", content_type=TEXT_PLAIN)

    def documents(self) -> dict[str, Any]:
        tags = [{"name": name, "model": name, "size": 0, "digest": "0" * 64} for name in self.spec.models]
        return {**super().documents(), "/api/tags": {"models": tags}}

    def unknown_model(self, model: str) -> Reply:
        return self.error(404, f'model "{model}" not found, try pulling it first', "not_found_error")

    def asked_output(self, body: dict[str, Any]) -> int | None:
        return _int_field(body, "max_tokens")  # its OpenAI layer reads no other

    def fit(self, prompt: int, asked: int | None) -> Fit | Reply:
        kept = min(prompt, self.context)
        return Fit(kept, asked if asked is not None else max(self.context - kept, 0))


class TGIWire(Wire):
    """TGI: `/info` max_total_tokens, `{"error", "error_type"}` errors (validation 422, overload 429),
    and errors on a streamed request sent in-band after a 200."""

    kind = "tgi"
    overload_status = 429
    checks_model = False
    in_band_stream_errors = True
    fingerprint = "3.3.0-native"

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        return json_reply(status, {"error": message, "error_type": type_ or "validation"})

    def health(self, ready: bool) -> Reply:
        return Reply(200) if ready else self.error(503, "unhealthy", "healthcheck")

    def overload(self, status: int) -> Reply:
        return self.error(status, "Model is overloaded", "overloaded")

    def documents(self) -> dict[str, Any]:
        model = self.spec.models[0]
        info = {"model_id": model, "max_input_tokens": self.context - 1, "max_total_tokens": self.context, "version": "3.3.0"}
        return {**super().documents(), "/info": info}

    def card(self, name: str) -> dict[str, Any]:
        return {**super().card(name), "owned_by": name}

    def refused_fields(self, body: dict[str, Any], stream: bool) -> Reply | None:
        if "max_tokens" in body and "max_completion_tokens" in body:  # a serde alias: a duplicate field
            return Reply(422, b"Failed to deserialize the JSON body into the target type: duplicate field `max_tokens`",
                         content_type=TEXT_PLAIN)
        return None

    def asked_output(self, body: dict[str, Any]) -> int | None:
        return _int_field(body, "max_tokens", "max_completion_tokens")

    def fit(self, prompt: int, asked: int | None) -> Fit | Reply:
        new = asked if asked is not None else max(self.context - prompt, 0)
        if prompt + new > self.context or prompt > self.context - 1:
            return self.overflow(prompt, new)
        return Fit(prompt, new)

    def overflow(self, prompt: int, asked: int | None) -> Reply:
        if prompt > self.context - 1:
            return self.error(422, f"Input validation error: `inputs` must have less than {self.context - 1} tokens. "
                                   f"Given: {prompt}")
        return self.error(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {self.context}. "
                               f"Given: {prompt} `inputs` tokens and {asked} `max_new_tokens`")

    def stream_error_event(self, reply: Reply) -> bytes:
        try:
            said = json.loads(reply.body).get("error", "")
        except ValueError:
            said = reply.body.decode("utf-8", "replace")
        return asgi.sse_data({"error": {"message": said, "http_status_code": 422}})  # 422 for every error, as TGI does


WIRES: dict[str, type[Wire]] = {w.kind: w for w in (OpenAIWire, VLLMWire, SGLangWire, LlamaCppWire, OllamaWire, TGIWire)}
assert set(LOADING_KINDS) <= set(WIRES)


# --- faults in a server's own behaviour ------------------------------------------------------


@dataclass
class ServerFaults:
    """A server's own faults; they outlive its restarts, like the link's."""

    rng: random.Random
    overload_until: float = -1.0
    overload_share: float = 1.0
    overload_status: int | None = None  # None: the kind's own
    retry_after_s: float | None = None  # None: the kind's own habit (neuron always sends one)
    refused_total: int = 0  # generation requests refused by the overload window

    def refuse_now(self, now: float) -> bool:
        """Whether this generation request falls in an overload window; if so it is counted as refused."""
        if now >= self.overload_until:
            return False
        if self.overload_share < 1.0 and self.rng.random() >= self.overload_share:
            return False
        self.refused_total += 1
        return True


class NeuronGate:
    """The real NeuronApp behind an overload fault, refusing in neuron's own envelope. Lifecycle
    requests pass untouched (an overload is of generations); the gate counts the neuron's refusals
    of them, which the neuron counts with its refused generations."""

    def __init__(self, app: Any, faults: ServerFaults) -> None:
        self.app = app
        self.faults = faults
        self.control_refused_total = 0

    async def __call__(self, scope: dict[str, Any], receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in CONTROL_PATHS:
            await self.app(scope, receive, partial(self._control_send, send))
            return
        if scope["type"] == "http" and scope["method"] == "POST" and self.faults.refuse_now(trio.current_time()):
            f = self.faults
            err = errors.server_overloaded("neuron queue is full; retry shortly.", f.retry_after_s or 1.0)
            await asgi.send_bytes(send, f.overload_status or err.status, err.openai_bytes(), asgi.JSON_HEADERS + err.headers)
            return
        await self.app(scope, receive, send)

    async def _control_send(self, send: asgi.Send, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            self.control_refused_total += 1
        await send(message)


# --- the server -------------------------------------------------------------------------------


@dataclass
class Counters:
    requests_total: int = 0  # generations admitted
    rejected_total: int = 0  # refused by the server itself (bad input, loading, a full queue, the context)
    completed_total: int = 0
    cancelled_total: int = 0  # the client (cortex) went away mid-generation
    tokens_generated_total: int = 0


@dataclass
class _Generation:
    model: str
    stream: bool
    include_usage: bool
    fit: Fit
    text: str
    finish_reason: str
    request_id: str = ""


class KindApp:
    """One upstream server of a non-neuron kind, in virtual time."""

    def __init__(self, spec: UpstreamSpec, seed: int, faults: ServerFaults, ready_at: float) -> None:
        assert spec.kind in WIRES and spec.slots >= 1 and spec.token_bytes >= 1
        self.spec = spec
        self.wire = WIRES[spec.kind](spec)
        self.faults = faults
        self.ready_at = ready_at  # the model is loaded from then on
        # The engine writes bytes; a token of this server is token_bytes of them.
        self.engine = MockEngine(seed=seed, reply_tokens=spec.reply_tokens * spec.token_bytes,
                                 pacing=Pacing(spec.ttft_s, 1 / spec.tokens_per_s))
        self.counters = Counters()
        self._slots = trio.CapacityLimiter(spec.slots)
        self._waiting = 0
        self._documents = self.wire.documents()

    @property
    def ready(self) -> bool:
        return trio.current_time() >= self.ready_at

    async def __call__(self, scope: dict[str, Any], receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == CHAT_PATH:
            await self._chat(asgi.Request.from_scope(scope, receive, send))
        elif method == "GET" and path in self._documents:
            await json_reply(200, self._documents[path]).send(send)
        elif method == "GET" and path == self.wire.health_path:
            await self.wire.health(self.ready).send(send)
        else:
            await self.wire.not_found(path).send(send)

    # --- admission ------------------------------------------------------------------------

    async def _chat(self, request: asgi.Request) -> None:
        # Nothing before the admission count may checkpoint: a crash must not lose a delivered request.
        try:
            body = json.loads(await request.body(BODY_MAX_BYTES))
        except asgi.ClientGone:
            return
        except (ValueError, asgi.BodyTooLarge):
            body = None
        stream = isinstance(body, dict) and body.get("stream") is True
        if self.faults.refuse_now(trio.current_time()):
            status = self.faults.overload_status or self.wire.overload_status
            await self._refuse(request, self.wire.overload(status).with_retry_after(self.faults.retry_after_s), stream)
            return
        gen = self._admit(body, stream)
        if isinstance(gen, Reply):
            self.counters.rejected_total += 1
            await self._refuse(request, gen, stream)
            return
        self.counters.requests_total += 1
        gen.request_id = request.headers.get("x-request-id", "sim")
        async with asgi.disconnect_watch(request.receive) as watch:
            async with self._slot():
                await (self._stream(request, gen, watch) if gen.stream else self._whole(request, gen, watch))
        if watch.disconnected:
            self.counters.cancelled_total += 1
        else:
            self.counters.completed_total += 1

    def _admit(self, body: Any, stream: bool) -> _Generation | Reply:
        w = self.wire
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(body.get("model"), str):
            return w.error(400, "The body must be a JSON object with a string `model` and a non-empty `messages` list.")
        if not all(isinstance(m, dict) for m in messages):
            return w.error(400, "Each message must be an object.")
        if w.checks_model and body["model"] not in self.spec.models:
            return w.unknown_model(body["model"])
        refused = w.refused_fields(body, stream)
        if refused is not None:
            return refused
        if not self.ready:
            return w.loading()
        if self._slots.available_tokens == 0 and self._waiting >= self.spec.queue_depth:
            return w.overload(w.overload_status)
        fit = w.fit(prompt_tokens(messages, self.spec.token_bytes), w.asked_output(body))
        if isinstance(fit, Reply):
            return fit
        seed = body.get("seed") if isinstance(body.get("seed"), int) else None
        tb = self.spec.token_bytes
        reply = self.engine.plan(seed, counting.render_chat(messages), fit.output_tokens * tb, [])
        assert len(reply.text) % tb == 0  # ASCII, cut at a multiple of the token size
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        finish = "length" if reply.finish_reason == "length" else "stop"
        return _Generation(body["model"], stream, include_usage, fit, reply.text, finish)

    async def _refuse(self, request: asgi.Request, reply: Reply, stream: bool) -> None:
        if stream and self.wire.in_band_stream_errors:
            await asgi.start_stream(request.send, [])
            await asgi.send_chunk(request.send, self.wire.stream_error_event(reply))
            await asgi.send_chunk(request.send, asgi.SSE_DONE)
            await asgi.end_stream(request.send)
            return
        await reply.send(request.send)

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    # --- generation ---------------------------------------------------------------------

    def _base(self, gen: _Generation, obj: str) -> dict[str, Any]:
        base = {"id": f"chatcmpl-{gen.request_id}", "object": obj, "created": 0, "model": gen.model}
        if self.wire.fingerprint is not None:
            base["system_fingerprint"] = self.wire.fingerprint
        return base

    def _usage(self, gen: _Generation, tokens: int) -> dict[str, int]:
        prompt = gen.fit.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}

    async def _whole(self, request: asgi.Request, gen: _Generation, watch: asgi.Disconnect) -> None:
        tokens = len(gen.text) // self.spec.token_bytes
        start = trio.current_time()
        if tokens:
            await self.engine.wait_for_token(start, tokens - 1)
        self.counters.tokens_generated_total += tokens
        message = {"role": "assistant", "content": gen.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}
        body = {**self._base(gen, "chat.completion"), "choices": [choice], "usage": self._usage(gen, tokens)}
        watch.closing()
        await json_reply(200, body).send(request.send)

    async def _stream(self, request: asgi.Request, gen: _Generation, watch: asgi.Disconnect) -> None:
        tb, per_chunk = self.spec.token_bytes, self.spec.chunk_tokens
        tokens = len(gen.text) // tb
        base = self._base(gen, "chat.completion.chunk")
        start = trio.current_time()

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return asgi.sse_data({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        await asgi.start_stream(request.send, [])
        await asgi.send_chunk(request.send, chunk({"role": "assistant", "content": ""}, None))
        for first in range(0, tokens, per_chunk):
            last = min(first + per_chunk, tokens)
            await self.engine.wait_for_token(start, last - 1)
            self.counters.tokens_generated_total += last - first
            await asgi.send_chunk(request.send, chunk({"content": gen.text[first * tb : last * tb]}, None))
        await asgi.send_chunk(request.send, chunk({}, gen.finish_reason))
        if gen.include_usage:
            frame = {**base, "choices": [], "usage": self._usage(gen, tokens)}
            await asgi.send_chunk(request.send, asgi.sse_data(frame))
        watch.closing()
        await asgi.send_chunk(request.send, asgi.SSE_DONE)
        await asgi.end_stream(request.send)
