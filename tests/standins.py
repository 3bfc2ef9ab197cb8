"""Stand-in inference servers: small imitations of vLLM, SGLang, llama.cpp,
Ollama, TGI and OpenAI at the HTTP boundary, for tests and benchmarks.

Each serves real sockets on 127.0.0.1 (an ephemeral port), HTTP/1.1 with
keep-alive through h11, one thread per connection, and speaks its server's
documented wire format: the health probe, the model listing with the
server's own limit fields, `/v1/chat/completions` and `/v1/completions`
streamed (SSE, a usage frame when `stream_options.include_usage`, then
`data: [DONE]`) and not, and the server's own error shapes for a context
overflow, an overload (with Retry-After when asked for), an unknown model
and a refused key. Where each shape comes from is noted on its flavour;
"modelled" marks a detail the sources did not pin down. None imports
neuron or cortex: they are other servers, not neuron in disguise.

The stand-in tokenizer is not neuron's: a text costs one token per started
4 bytes, a chat message 3 tokens of template besides, the reply primer 2;
an output token is one word and a space. So tokens cover several bytes, as
real ones do, and the count stays below cortex's byte-level bound.

Faults, for the failover tests, are set on `StandIn.faults` in process, or
with `POST /_standin/faults` (a JSON object of Faults fields) on a
subprocess. `GET /_standin/requests` returns every request received, with
its headers (the proof that a client's key never reaches an upstream);
`GET /_standin/stats` the counts. Run one as a process with
`python -m tests.standins KIND --model NAME --context N ...`: it prints
`{"url": ..., "kind": ...}` on one line (what tests.conftest.Proc reads)
and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import h11

TOKEN_BYTES = 4
MESSAGE_OVERHEAD_TOKENS = 3
REPLY_PRIMER_TOKENS = 2
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
BODY_MAX_BYTES = 4 * 1024 * 1024
CREATED = 1735689600  # a fixed `created`, so replies are deterministic


def count_text(text: str) -> int:
    return -(-len(text.encode("utf-8")) // TOKEN_BYTES)


def message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_chat(messages: list[Any]) -> int:
    return REPLY_PRIMER_TOKENS + sum(MESSAGE_OVERHEAD_TOKENS + count_text(message_text(m)) for m in messages)


@dataclass
class Settings:
    model: str = "standin-model"
    context_tokens: int = 4096
    output_tokens: int | None = None  # llama.cpp's n_predict, when positive
    input_tokens: int | None = None  # TGI's max_input_tokens (default: context - 1)
    reply_tokens: int = 12  # how long a reply is when nothing cuts it shorter
    api_key: str | None = None  # when set, generation (and OpenAI's /v1/models) needs `Bearer <key>`
    flat_errors: bool = False  # vLLM: the flat `{"object": "error"}` form of vLLM before 0.10
    # Prefix-cache hits reported as `usage.prompt_tokens_details.cached_tokens` (vLLM with
    # --enable-prompt-tokens-details, SGLang, OpenAI): at most this many of the prompt's tokens.
    cached_tokens: int | None = None


@dataclass
class Faults:
    overload_next: int = 0  # refuse this many coming generation requests as an overload
    retry_after: str | None = None  # the Retry-After header sent with those refusals
    die_next: int = 0  # this many coming streams lose their connection part-way
    die_after_tokens: int = 2  # ... after this many content tokens
    unhealthy: bool = False  # the health probe fails in the kind's way (llama.cpp: "Loading model")
    token_interval_s: float = 0.0  # pacing between streamed tokens


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


@dataclass
class StreamReply:
    events: Iterator[bytes]
    die_after_events: int | None = None  # drop the connection after this many events
    interval_s: float = 0.0


def json_reply(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers or [])


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass
class Plan:
    """What a generation will be: the prompt as the server counts it, the tokens it writes."""

    prompt_tokens: int
    output_tokens: int
    finish_reason: str


# --- flavours: what differs between servers -----------------------------------------


class Flavour:
    """OpenAI-style defaults; each server overrides what it does differently."""

    name = ""
    owned_by = "standin"
    fingerprint: str | None = None
    health_paths: tuple[str, ...] = ("/health",)
    refuses_stream_options_without_stream = False
    checks_model = True
    in_band_stream_errors = False  # errors on a streamed request arrive as a 200 event (TGI)
    models_need_key = False  # the model list is behind the API key too (OpenAI)
    usage_null_until_frame = False  # every chunk carries `usage: null` when usage was asked for (OpenAI)

    def __init__(self, settings: Settings) -> None:
        self.s = settings

    # shapes
    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        return json_reply(status, {"error": {"message": message, "type": type_ or "invalid_request_error", "param": None, "code": None, **extra}})

    def health(self, faults: Faults) -> Reply:
        return Reply(503 if faults.unhealthy else 200, b"")

    def routes(self) -> dict[str, Any]:
        return {"/v1/models": self.models}

    def models(self) -> Reply:
        return json_reply(200, {"object": "list", "data": [self.model_card()]})

    def model_card(self) -> dict[str, Any]:
        return {"id": self.s.model, "object": "model", "created": CREATED, "owned_by": self.owned_by}

    def not_found(self, path: str) -> Reply:
        return self.error(404, f"Not Found: {path}")

    def unknown_model(self, model: str) -> Reply:
        return self.error(404, f"The model `{model}` does not exist.", "not_found_error")

    def unauthorized(self) -> Reply:
        return self.error(401, "Unauthorized", "authentication_error")

    def overloaded(self, faults: Faults) -> Reply:
        reply = self.error(503, "The server is overloaded.", "server_error")
        return self._with_retry_after(reply, faults)

    def unavailable(self, faults: Faults) -> Reply | None:
        """The refusal a generation gets while the health probe fails, if the server refuses then."""
        return None

    @staticmethod
    def _with_retry_after(reply: Reply, faults: Faults) -> Reply:
        if faults.retry_after is not None:
            reply.headers.append(("retry-after", faults.retry_after))
        return reply

    # context rules
    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        room = self.s.context_tokens - prompt
        budget = asked if asked is not None else room
        return self._plan(prompt, budget)

    def _plan(self, prompt: int, budget: int) -> Plan:
        out = max(0, min(budget, self.s.reply_tokens))
        return Plan(prompt, out, "length" if out == budget and out < self.s.reply_tokens else "stop")

    def asked_output(self, body: dict[str, Any]) -> int | None | Reply:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # chunk decorations
    def decorate(self, obj: dict[str, Any], plan: Plan, last: bool) -> dict[str, Any]:
        if self.fingerprint is not None:
            obj["system_fingerprint"] = self.fingerprint
        return obj

    def stream_error_event(self, reply: Reply) -> bytes:
        raise NotImplementedError


class VLLM(Flavour):
    """vLLM (vllm/entrypoints/openai/engine/protocol.py, serving code, docs).

    /health: 200 empty, 503 empty when the engine is dead. /v1/models:
    ModelCard with `max_model_len`, `root`, `parent`, `permission`. Errors:
    nested ErrorInfo (`code` is the HTTP status as an integer), or with
    `flat_errors` the older `{"object": "error", ...}`. Context: a prompt of
    the whole context is refused; a `max_tokens` that does not fit after it
    is refused with the "'max_tokens' or 'max_completion_tokens' is too
    large" message. `stream_options` without `stream` is a 400. Overload: 503
    "The request queue is full." (its type name is modelled).
    """

    name = "vllm"
    owned_by = "vllm"
    refuses_stream_options_without_stream = True
    _types = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 503: "ServiceUnavailableError"}

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        info = {"message": message, "type": type_ or self._types.get(status, "InternalServerError"), "param": None, "code": status}
        return json_reply(status, {"object": "error", **info} if self.s.flat_errors else {"error": info})

    def model_card(self) -> dict[str, Any]:
        return {
            **super().model_card(), "root": self.s.model, "parent": None, "max_model_len": self.s.context_tokens,
            "permission": [{"id": "modelperm-standin", "object": "model_permission", "created": CREATED,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}],
        }

    def not_found(self, path: str) -> Reply:
        return json_reply(404, {"detail": "Not Found"})  # FastAPI's own 404

    def unauthorized(self) -> Reply:
        return json_reply(401, {"error": "Unauthorized"})  # the --api-key middleware

    def overloaded(self, faults: Faults) -> Reply:
        return self._with_retry_after(self.error(503, "The request queue is full."), faults)

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        ctx = self.s.context_tokens
        if prompt >= ctx:
            return self.error(400, f"This model's maximum context length is {ctx} tokens. However, your request has "
                                   f"{prompt} input tokens. Please reduce the length of the input messages.")
        if asked is not None and prompt + asked > ctx:
            return self.error(400, f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's "
                                   f"maximum context length is {ctx} tokens and your request has {prompt} input "
                                   f"tokens ({asked} > {ctx} - {prompt}).")
        return self._plan(prompt, asked if asked is not None else ctx - prompt)

    def decorate(self, obj: dict[str, Any], plan: Plan, last: bool) -> dict[str, Any]:
        for choice in obj.get("choices", []):
            choice.setdefault("stop_reason", None)
        return obj


class SGLang(Flavour):
    """SGLang (sglang/srt/entrypoints/openai/protocol.py, TokenizerManager validation).

    /health: 200 empty, 503 when it cannot serve. /v1/models: ModelCard with
    `max_model_len`. Errors: the flat ErrorResponse. Context: "The input (P
    tokens) is longer than the model's context length (N tokens)." when
    P >= N, "Requested token count exceeds the model's maximum context length
    ..." when P + max_tokens >= N. Overload: 503 (message modelled).
    """

    name = "sglang"
    owned_by = "sglang"
    checks_model = False  # SGLang serves its model whatever the request names

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        type_ = type_ or {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
        return json_reply(status, {"object": "error", "message": message, "type": type_, "param": None, "code": status})

    def model_card(self) -> dict[str, Any]:
        return {**super().model_card(), "root": self.s.model, "max_model_len": self.s.context_tokens}

    def not_found(self, path: str) -> Reply:
        return json_reply(404, {"detail": "Not Found"})

    def overloaded(self, faults: Faults) -> Reply:
        return self._with_retry_after(self.error(503, "The request queue is full.", "ServiceUnavailableError"), faults)

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        ctx = self.s.context_tokens
        if prompt >= ctx:
            return self.error(400, f"The input ({prompt} tokens) is longer than the model's context length ({ctx} tokens).")
        if asked is not None and prompt + asked >= ctx:
            return self.error(
                400,
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
                f"total of {prompt + asked} tokens: {prompt} tokens from the input messages and {asked} tokens for "
                "the completion. Please reduce the number of tokens in the input messages or the completion to fit "
                "within the limit.",
            )
        return self._plan(prompt, asked if asked is not None else ctx - prompt - 1)


class LlamaCpp(Flavour):
    """llama.cpp's llama-server (tools/server/README.md, server-task.cpp).

    /health (and /v1/health): 200 `{"status": "ok"}`, 503 "Loading model"
    while loading (`unhealthy`), when generation is also refused with it.
    /v1/models: one entry, `owned_by: "llamacpp"`, `meta.n_ctx_train` (the
    training context, here 8x the served one so a reader that takes it is
    caught). /props: `default_generation_settings.n_ctx` and `params.n_predict`.
    Errors: nested with an integer `code`. Context: a prompt of the whole
    slot is `exceed_context_size_error` with `n_prompt_tokens` and `n_ctx`;
    a `max_tokens` past the context is not refused, generation stops there
    with "length". The final chunk carries `timings`. llama.cpp queues
    rather than refusing when its slots are busy, so its overload is the
    503 it sends while loading.
    """

    name = "llamacpp"
    owned_by = "llamacpp"
    health_paths = ("/health", "/v1/health")
    fingerprint = "b6000-standin"
    checks_model = False  # one model: the request's name is not checked

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        type_ = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                          503: "unavailable_error"}.get(status, "server_error")
        return json_reply(status, {"error": {"code": status, "message": message, "type": type_, **extra}})

    def loading(self) -> Reply:
        return self.error(503, "Loading model", "unavailable_error")

    def health(self, faults: Faults) -> Reply:
        return self.loading() if faults.unhealthy else json_reply(200, {"status": "ok"})

    def unavailable(self, faults: Faults) -> Reply | None:
        return self.loading() if faults.unhealthy else None

    def routes(self) -> dict[str, Any]:
        return {"/v1/models": self.models, "/models": self.models, "/props": self.props}

    def model_card(self) -> dict[str, Any]:
        meta = {"vocab_type": 2, "n_vocab": 128256, "n_ctx_train": self.s.context_tokens * 8, "n_embd": 4096,
                "n_params": 8030261312, "size": 4912898304}
        return {**super().model_card(), "meta": meta}

    def props(self) -> Reply:
        n_predict = self.s.output_tokens if self.s.output_tokens is not None else -1
        settings = {"id": 0, "id_task": -1, "n_ctx": self.s.context_tokens, "speculative": False, "is_processing": False,
                    "params": {"n_predict": n_predict, "seed": 4294967295, "temperature": 0.8, "top_k": 40,
                               "top_p": 0.95, "min_p": 0.05, "max_tokens": n_predict, "stream": True, "n_probs": 0},
                    "prompt": "", "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1,
                                                  "n_decoded": 0, "stopping_word": ""}}
        return json_reply(200, {"default_generation_settings": settings, "total_slots": 1,
                                "model_path": f"/models/{self.s.model}.gguf", "chat_template": "{{ messages }}",
                                "modalities": {"vision": False}, "build_info": self.fingerprint})

    def not_found(self, path: str) -> Reply:
        return self.error(404, "File Not Found", "not_found_error")

    def unauthorized(self) -> Reply:
        return self.error(401, "Invalid API Key", "authentication_error")

    def overloaded(self, faults: Faults) -> Reply:
        return self._with_retry_after(self.loading(), faults)

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        ctx = self.s.context_tokens
        if prompt >= ctx:
            return self.error(400, f"request ({prompt} tokens) exceeds the available context size ({ctx} tokens), try "
                                   "increasing it", "exceed_context_size_error", n_prompt_tokens=prompt, n_ctx=ctx)
        limits = [ctx - prompt] + [v for v in (asked, self.s.output_tokens) if v is not None and v > 0]
        return self._plan(prompt, min(limits))

    def decorate(self, obj: dict[str, Any], plan: Plan, last: bool) -> dict[str, Any]:
        super().decorate(obj, plan, last)
        if last:
            obj["timings"] = {"cache_n": 0, "prompt_n": plan.prompt_tokens, "prompt_ms": 1.0,
                              "predicted_n": plan.output_tokens, "predicted_ms": 1.0}
        return obj


class Ollama(Flavour):
    """Ollama (server/routes.go, openai/openai.go, middleware/openai.go, server/prompt.go).

    `GET /` (and HEAD): 200 "Ollama is running". /api/tags and /v1/models:
    names, no limits. Errors through /v1: nested with `type`
    invalid_request_error / not_found_error / api_error, `param` and `code`
    null; an unknown model is 404 'model "x" not found, try pulling it first';
    a full queue 503 "server busy, please try again.  maximum pending
    requests exceeded". Context: a prompt over `num_ctx` (context_tokens) is
    *truncated silently*, dropping the oldest non-system messages but always
    keeping the last, and usage counts what was kept; `max_tokens` is the
    only output field read. Chunks carry `system_fingerprint: "fp_ollama"`.
    """

    name = "ollama"
    owned_by = "library"
    fingerprint = "fp_ollama"
    health_paths = ("/",)

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        type_ = type_ or {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return json_reply(status, {"error": {"message": message, "type": type_, "param": None, "code": None}})

    def health(self, faults: Faults) -> Reply:
        if faults.unhealthy:
            return Reply(500, b"", content_type="text/plain; charset=utf-8")
        return Reply(200, b"Ollama is running", content_type="text/plain; charset=utf-8")

    def routes(self) -> dict[str, Any]:
        return {"/v1/models": self.models, "/api/tags": self.tags}

    def tags(self) -> Reply:
        details = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                   "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}
        return json_reply(200, {"models": [{"name": self.s.model, "model": self.s.model,
                                            "modified_at": "2025-01-01T00:00:00Z", "size": 4920753328,
                                            "digest": "0" * 64, "details": details}]})

    def not_found(self, path: str) -> Reply:
        return Reply(404, b"404 page not found", content_type="text/plain")

    def unknown_model(self, model: str) -> Reply:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def overloaded(self, faults: Faults) -> Reply:
        reply = self.error(503, "server busy, please try again.  maximum pending requests exceeded")
        return self._with_retry_after(reply, faults)

    def asked_output(self, body: dict[str, Any]) -> int | None | Reply:
        value = body.get("max_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        if prompt > self.s.context_tokens and messages:
            prompt = self._truncated(messages)
        prompt = min(prompt, self.s.context_tokens)  # a last message alone too long: the runner keeps its tail
        return self._plan(prompt, asked if asked is not None else self.s.reply_tokens)

    def _truncated(self, messages: list[Any]) -> int:
        system = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        for start in range(len(messages)):
            kept = [m for m in messages[:start] if m in system] + messages[start:]
            if count_chat(kept) <= self.s.context_tokens or start == len(messages) - 1:
                return count_chat(kept)
        return count_chat(messages[-1:])


class TGI(Flavour):
    """Text Generation Inference (router/src/server.rs, lib.rs, validation.rs, infer/mod.rs).

    /health: 200 empty, 503 `{"error": "unhealthy", "error_type":
    "healthcheck"}`. /info: `model_id`, `max_input_tokens`,
    `max_total_tokens`, ... /v1/models: the `model_id`, owned by itself.
    Errors: `{"error", "error_type"}`: validation 422, overload 429 "Model is
    overloaded". Context: `inputs` tokens + `max_new_tokens` over
    max_total_tokens, then inputs over max_input_tokens; an absent
    `max_tokens` means the context left. On a streamed request the error is
    a 200 with `data: {"error": {"message", "http_status_code"}}` then
    `data: [DONE]`. Sending both `max_tokens` and `max_completion_tokens` (a
    serde alias) is a duplicate-field 422 (axum's rejection text, modelled).
    Any `model` is accepted ("tgi" means the served one).
    """

    name = "tgi"
    fingerprint = "3.3.0-native"
    checks_model = False
    in_band_stream_errors = True

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        return json_reply(status, {"error": message, "error_type": type_ or "validation"})

    def health(self, faults: Faults) -> Reply:
        return self.error(503, "unhealthy", "healthcheck") if faults.unhealthy else Reply(200, b"")

    def routes(self) -> dict[str, Any]:
        return {"/v1/models": self.models, "/info": self.info}

    def max_input(self) -> int:
        return self.s.input_tokens if self.s.input_tokens is not None else self.s.context_tokens - 1

    def info(self) -> Reply:
        return json_reply(200, {
            "model_id": self.s.model, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
            "max_input_tokens": self.max_input(), "max_total_tokens": self.s.context_tokens,
            "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
            "version": "3.3.0", "sha": None, "docker_label": None,
        })

    def model_card(self) -> dict[str, Any]:
        return {"id": self.s.model, "object": "model", "created": 0, "owned_by": self.s.model}

    def not_found(self, path: str) -> Reply:
        return Reply(404, b"")

    def overloaded(self, faults: Faults) -> Reply:
        return self._with_retry_after(self.error(429, "Model is overloaded", "overloaded"), faults)

    def asked_output(self, body: dict[str, Any]) -> int | None | Reply:
        if "max_tokens" in body and "max_completion_tokens" in body:
            return Reply(422, b"Failed to deserialize the JSON body into the target type: duplicate field `max_tokens`",
                         content_type="text/plain; charset=utf-8")
        return super().asked_output(body)

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        total = self.s.context_tokens
        new = asked if asked is not None else max(total - prompt, 0)
        if prompt + new > total:
            return self.error(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {total}. "
                                   f"Given: {prompt} `inputs` tokens and {new} `max_new_tokens`")
        if prompt > self.max_input():
            return self.error(422, f"Input validation error: `inputs` must have less than {self.max_input()} tokens. "
                                   f"Given: {prompt}")
        return self._plan(prompt, new)

    def decorate(self, obj: dict[str, Any], plan: Plan, last: bool) -> dict[str, Any]:
        super().decorate(obj, plan, last)
        if obj.get("object") == "chat.completion.chunk":
            obj.setdefault("usage", None)
        return obj

    def stream_error_event(self, reply: Reply) -> bytes:
        said = json.loads(reply.body).get("error", "") if reply.content_type == "application/json" else reply.body.decode()
        return sse({"error": {"message": said, "http_status_code": 422}})  # 422 for every error, as TGI does


class OpenAI(Flavour):
    """OpenAI's API (its API reference and error codes guide).

    No /health (404). /v1/models: ids owned by "system", no limits; needs
    the key when one is configured, like everything else. Errors: nested
    with string `code`: context_length_exceeded, model_not_found,
    invalid_api_key, rate_limit_exceeded (429 with Retry-After when asked).
    Chunks carry `system_fingerprint`, `service_tier` and, when usage is
    asked for, `usage: null` until the usage frame. `stream_options` without
    `stream` is a 400.
    """

    name = "openai"
    owned_by = "system"
    fingerprint = "fp_standin"
    health_paths = ()
    refuses_stream_options_without_stream = True
    models_need_key = True
    usage_null_until_frame = True

    def error(self, status: int, message: str, type_: str | None = None, **extra: Any) -> Reply:
        return json_reply(status, {"error": {"message": message, "type": type_ or "invalid_request_error",
                                             "param": extra.get("param"), "code": extra.get("code")}})

    def not_found(self, path: str) -> Reply:
        return self.error(404, f"Invalid URL (GET {path})")

    def unknown_model(self, model: str) -> Reply:
        return self.error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          param="model", code="model_not_found")

    def unauthorized(self) -> Reply:
        return self.error(401, "Incorrect API key provided.", code="invalid_api_key")

    def overloaded(self, faults: Faults) -> Reply:
        reply = self.error(429, f"Rate limit reached for {self.s.model} on requests per min (RPM).", "requests",
                           code="rate_limit_exceeded")
        return self._with_retry_after(reply, faults)

    def plan(self, prompt: int, asked: int | None, messages: list[Any] | None) -> Plan | Reply:
        ctx = self.s.context_tokens
        if prompt + (asked or 0) > ctx:
            return self.error(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                   f"{prompt + (asked or 0)} tokens ({prompt} in the messages, {asked or 0} in the "
                                   "completion). Please reduce the length of the messages or completion.",
                              param="messages", code="context_length_exceeded")
        return self._plan(prompt, asked if asked is not None else ctx - prompt)

    def decorate(self, obj: dict[str, Any], plan: Plan, last: bool) -> dict[str, Any]:
        super().decorate(obj, plan, last)
        obj["service_tier"] = "default"
        return obj


FLAVOURS: dict[str, type[Flavour]] = {f.name: f for f in (VLLM, SGLang, LlamaCpp, Ollama, TGI, OpenAI)}


# --- the server --------------------------------------------------------------------------


class StandIn:
    """One stand-in server on 127.0.0.1, an ephemeral port, until `close()`."""

    def __init__(self, kind: str, settings: Settings | None = None, faults: Faults | None = None) -> None:
        self.kind = kind
        self.settings = settings or Settings()
        self.faults = faults or Faults()
        self.flavour = FLAVOURS[kind](self.settings)
        self.requests: list[dict[str, Any]] = []
        self.stats = {"requests_total": 0, "generations_total": 0, "refused_total": 0, "died_total": 0}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept_loop, name=f"standin-{kind}", daemon=True)
        self._thread.start()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and drop every open connection (a killed server, as a client sees it)."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _drop(conn)
        self._thread.join(5)

    # --- connections ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = _read_request(conn, sock)
                if request is None:
                    return
                head, body = request
                reply = self._dispatch(head, body)
                if not _send(conn, sock, reply, self, head_only=head.method == b"HEAD"):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            return
        finally:
            with self._lock:
                self._conns.discard(sock)
            _drop(sock)

    # --- routing ---------------------------------------------------------------------------

    def _dispatch(self, head: h11.Request, raw: bytes) -> Reply | StreamReply:
        method = head.method.decode()
        path = head.target.decode().split("?", 1)[0]
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
        body = _json_or_none(raw)
        with self._lock:
            self.stats["requests_total"] += 1
            if not path.startswith("/_standin/"):
                self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        if path.startswith("/_standin/"):
            return self._control(method, path, body)
        f = self.flavour
        if method in ("GET", "HEAD") and path in f.health_paths:
            return f.health(self.faults)
        routes = f.routes()
        if method == "GET" and path in routes:
            if f.models_need_key and not self._authorized(headers):
                return f.unauthorized()
            return routes[path]()
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            if not self._authorized(headers):
                return f.unauthorized()
            return self._generate(path == "/v1/chat/completions", body)
        return f.not_found(path)

    def _authorized(self, headers: dict[str, str]) -> bool:
        key = self.settings.api_key
        return key is None or headers.get("authorization") == f"Bearer {key}"

    def _control(self, method: str, path: str, body: Any) -> Reply:
        if path == "/_standin/faults" and method == "POST" and isinstance(body, dict):
            known = {f.name for f in fields(Faults)}
            for name, value in body.items():
                if name not in known:
                    return json_reply(400, {"error": f"unknown fault {name!r}"})
                setattr(self.faults, name, value)
            return json_reply(200, asdict(self.faults))
        if path == "/_standin/requests" and method == "GET":
            with self._lock:
                return json_reply(200, list(self.requests))
        if path == "/_standin/stats" and method == "GET":
            with self._lock:
                return json_reply(200, dict(self.stats))
        return json_reply(404, {"error": "unknown stand-in control"})

    # --- generation ------------------------------------------------------------------------

    def _generate(self, chat: bool, body: Any) -> Reply | StreamReply:
        f = self.flavour
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return f.error(400, "The request body must be a JSON object with a string `model`.")
        messages = body.get("messages") if chat else None
        if chat and not (isinstance(messages, list) and messages):
            return f.error(400, "`messages` must be a non-empty list.")
        if not chat and not isinstance(body.get("prompt"), str):
            return f.error(400, "`prompt` must be a string.")
        if f.checks_model and body["model"] != self.settings.model:
            return f.unknown_model(body["model"])
        stream = body.get("stream") is True
        options = body.get("stream_options")
        if options is not None and not stream and f.refuses_stream_options_without_stream:
            return f.error(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        asked = f.asked_output(body)
        if isinstance(asked, Reply):
            return self._refused(asked, stream)
        refusal = f.unavailable(self.faults)
        if refusal is not None:
            return self._refused(refusal, stream=False)
        if self._take_fault("overload_next"):
            return self._refused(f.overloaded(self.faults), stream)
        prompt = count_chat(messages) if chat else count_text(body["prompt"]) + 1
        plan = f.plan(prompt, asked, messages)
        if isinstance(plan, Reply):
            return self._refused(plan, stream)
        with self._lock:
            self.stats["generations_total"] += 1
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if stream:
            die = self.faults.die_after_tokens if self._take_fault("die_next") else None
            events_before = None if die is None else die + (1 if chat else 0)  # chat opens with a role chunk
            return StreamReply(self._events(chat, body["model"], plan, include_usage), events_before,
                               self.faults.token_interval_s)
        return json_reply(200, self._whole(chat, body["model"], plan))

    def _take_fault(self, name: str) -> bool:
        with self._lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False

    def _refused(self, reply: Reply, stream: bool) -> Reply | StreamReply:
        with self._lock:
            self.stats["refused_total"] += 1
        if stream and self.flavour.in_band_stream_errors:
            return StreamReply(iter([self.flavour.stream_error_event(reply), sse("[DONE]")]))
        return reply

    def _words(self, plan: Plan) -> list[str]:
        return [WORDS[i % len(WORDS)] + " " for i in range(plan.output_tokens)]

    def _usage(self, plan: Plan) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.output_tokens,
                                 "total_tokens": plan.prompt_tokens + plan.output_tokens}
        if self.settings.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(self.settings.cached_tokens, plan.prompt_tokens)}
        return usage

    def _whole(self, chat: bool, model: str, plan: Plan) -> dict[str, Any]:
        text = "".join(self._words(plan))
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": plan.finish_reason}
            obj = {"id": "chatcmpl-standin", "object": "chat.completion", "created": CREATED, "model": model,
                   "choices": [choice], "usage": self._usage(plan)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": plan.finish_reason}
            obj = {"id": "cmpl-standin", "object": "text_completion", "created": CREATED, "model": model,
                   "choices": [choice], "usage": self._usage(plan)}
        return self.flavour.decorate(obj, plan, last=True)

    def _events(self, chat: bool, model: str, plan: Plan, include_usage: bool) -> Iterator[bytes]:
        f = self.flavour
        kind = "chat.completion.chunk" if chat else "text_completion"
        ident = "chatcmpl-standin" if chat else "cmpl-standin"

        def chunk(choices: list[dict[str, Any]], last: bool = False, **extra: Any) -> bytes:
            obj = {"id": ident, "object": kind, "created": CREATED, "model": model, "choices": choices, **extra}
            if include_usage and f.usage_null_until_frame and "usage" not in extra:
                obj["usage"] = None
            return sse(f.decorate(obj, plan, last))

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if chat:
            yield chunk([choice("", None, role=True)])
        for word in self._words(plan):
            yield chunk([choice(word, None)])
        yield chunk([choice(None, plan.finish_reason)], last=not include_usage)
        if include_usage:
            yield chunk([], last=True, usage=self._usage(plan))
        yield sse("[DONE]")


# --- HTTP plumbing ---------------------------------------------------------------------------


def _read_request(conn: h11.Connection, sock: socket.socket) -> tuple[h11.Request, bytes] | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > BODY_MAX_BYTES:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _send(
    conn: h11.Connection, sock: socket.socket, reply: Reply | StreamReply, server: StandIn, head_only: bool = False
) -> bool:
    """Send one response; False when the connection is gone (or was dropped on purpose)."""
    if isinstance(reply, Reply):
        headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body))), *reply.headers]
        sock.sendall(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if reply.body and not head_only:
            sock.sendall(conn.send(h11.Data(data=reply.body)))
        sock.sendall(conn.send(h11.EndOfMessage()))
        return True
    headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
    sock.sendall(conn.send(h11.Response(status_code=200, headers=headers)))
    for sent, event in enumerate(reply.events):
        if reply.die_after_events is not None and sent >= reply.die_after_events:
            with server._lock:
                server.stats["died_total"] += 1
            _drop(sock, reset=True)
            return False
        sock.sendall(conn.send(h11.Data(data=event)))
        if reply.interval_s:
            time.sleep(reply.interval_s)
    sock.sendall(conn.send(h11.EndOfMessage()))
    return True


def _drop(sock: socket.socket, reset: bool = False) -> None:
    try:
        if reset:  # RST, as a process killed mid-write looks to its peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _json_or_none(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


@contextmanager
def standin(kind: str, faults: Faults | None = None, **settings: Any) -> Iterator[StandIn]:
    server = StandIn(kind, Settings(**settings), faults)
    try:
        yield server
    finally:
        server.close()


# --- as a process ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(FLAVOURS))
    parser.add_argument("--model", default=Settings.model)
    parser.add_argument("--context", type=int, default=Settings.context_tokens, dest="context_tokens")
    parser.add_argument("--output", type=int, default=None, dest="output_tokens")
    parser.add_argument("--input", type=int, default=None, dest="input_tokens")
    parser.add_argument("--reply-tokens", type=int, default=Settings.reply_tokens)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--flat-errors", action="store_true")
    parser.add_argument("--token-interval", type=float, default=0.0, dest="token_interval_s")
    args = vars(parser.parse_args(argv))
    kind = args.pop("kind")
    faults = Faults(token_interval_s=args.pop("token_interval_s"))
    server = StandIn(kind, Settings(**args), faults)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"url": server.url, "kind": kind, "model": server.settings.model}), flush=True)
    stop.wait()
    server.close()


if __name__ == "__main__":
    main(sys.argv[1:])
