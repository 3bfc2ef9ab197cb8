"""What every upstream kind's adapter is, and the pure helpers the adapters share.

An adapter is data plus pure functions, in the spirit of h11: which paths to
GET, how to judge and read what comes back, how to rewrite the request body,
and how to turn the server's error into the client's. No I/O and no clock:
the poller and the proxy do the requests and hand the bytes over, so every
rule here is tested without a socket and the simulator can run the same code.

Shared rules (each kind module adds only what differs):

* **Context overflow**, in whatever words the server uses, becomes 400
  `context_length_exceeded` (OpenAI's own code), so a client can shorten and
  retry. Each kind supplies the predicate that recognises its words.
* **Overload** (429, 503 or 529 from the server) becomes 503 `overloaded`
  with a Retry-After: the server's own, clamped to [1, 3600] s, else 1 s.
  It is the upstream that is busy, not the client's key that is over a limit.
* **The upstream refusing cortex's credentials** (401, 403) is cortex's
  misconfiguration, never the client's: 502, so no client thinks its own key
  is bad.
* **Other client errors** keep their status (422 becomes 400, which is what
  OpenAI sends for the same validation errors); anything else is a 502.
* Messages are the server's own words, bounded to MESSAGE_MAX_CHARS.

Error bodies come in several shapes, read by one tolerant reader
(`read_error`), since a server's shape changes between its versions (vLLM
moved from the flat form to the nested one):

* nested, OpenAI's: `{"error": {"message", "type", "param", "code"}}`
  (OpenAI; vLLM >= 0.10; llama.cpp, which adds `n_prompt_tokens`, `n_ctx`;
  Ollama's OpenAI-compatible layer);
* flat: `{"object": "error", "message", "type", "param", "code"}`
  (vLLM before the nested form; SGLang);
* string: `{"error": "...", "error_type": "..."}` (TGI; Ollama's native API);
* anything else (FastAPI's `{"detail": ...}`, plain text, HTML from a proxy):
  its first bytes as the message.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

HealthState = Literal["healthy", "not_ready", "unhealthy"]

LIMIT_TOKENS_MAX = 2**40  # a larger "limit" is a bug in the server, not a model
TEMPLATE_TOKENS_MAX = 4096  # a chat template's tokens per message, or for the reply primer
MESSAGE_MAX_CHARS = 500
ERROR_BODY_PEEK_BYTES = 200  # of a body that is not JSON, the part quoted in the message
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 3600.0
RETRY_AFTER_DEFAULT_S = 1.0
OVERLOAD_STATUSES = frozenset({429, 503, 529})
CREDENTIAL_STATUSES = frozenset({401, 403, 407})
CLIENT_STATUSES = frozenset({400, 404, 405, 409, 413, 415, 422})

# How many UTF-8 bytes one token of a real (non-byte) tokenizer can cover, an
# upper bound over the vocabularies these servers load. Byte-level BPE
# (GPT-2, tiktoken's cl100k/o200k, Llama 3, Qwen 2) and SentencePiece with
# byte fallback have no token longer than a run of whitespace or punctuation
# of a few dozen bytes, and a CJK entry of a few characters at 3 bytes each;
# special tokens rendered as text (`<|im_end|>`) are under 32 bytes, and a
# tool parser that re-encodes arguments with `\uXXXX` escapes at most doubles
# a token's bytes. 256 covers all of these with room to spare. It bounds the
# relayed output from above (the relay's guard: bytes <= tokens * this) and
# the charged tokens from below (tokens >= ceil(bytes / this)).
REAL_TOKENIZER_TOKEN_BYTES_MAX = 256

CONTEXT_CODE = "context_length_exceeded"
# Other servers' own names for the same refusal, compared in lower case.
OVERFLOW_CODES = frozenset({CONTEXT_CODE, "exceed_context_size_error", "context_window_exceeded"})


@dataclass(frozen=True)
class Health:
    """One health probe's verdict: only `healthy` takes traffic."""

    state: HealthState
    reason: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"


@dataclass(frozen=True)
class ModelEntry:
    """One model an upstream serves, with the limits it reports (None: it reports none)."""

    name: str
    context_tokens: int | None
    output_tokens: int | None
    input_tokens: int | None = None  # a prompt bound below the context (TGI's max_input_tokens)
    # What its chat template costs in tokens, where the server says (neuron's `tokenizer`); None: unknown.
    message_overhead_tokens: int | None = None
    reply_primer_tokens: int | None = None
    token_bytes_max: int | None = None  # this model's tokenizer, where it differs from the kind's
    completion_prefix_tokens: int | None = None  # special tokens a completion prompt gains (a BOS)
    # The model's tokenizer files, where the server serves them (neuron's kernel engine): the
    # document's sha256 and its path on the server (cortex/fleet/tokenizers.py fetches it).
    tokenizer_sha256: str | None = None
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        assert isinstance(self.name, str) and self.name
        assert (self.tokenizer_sha256 is None) == (self.tokenizer_path is None)
        assert self.tokenizer_sha256 is None or is_sha256(self.tokenizer_sha256)
        assert self.tokenizer_path is None or is_server_path(self.tokenizer_path)
        for value in (self.context_tokens, self.output_tokens, self.input_tokens):
            assert value is None or _is_limit(value)
        for value in (self.message_overhead_tokens, self.reply_primer_tokens, self.completion_prefix_tokens):
            assert value is None or (_is_int(value) and 0 <= value <= TEMPLATE_TOKENS_MAX)


@dataclass(frozen=True)
class Residency:
    """What a server with a model lifecycle (neuron) holds: its memory and each model's state."""

    memory_total_bytes: int  # what its models may use together
    memory_free_bytes: int
    models: dict[str, tuple[str, int]]  # model -> (status: loading | ready | unloading, memory bytes)

    def __post_init__(self) -> None:
        assert 0 <= self.memory_free_bytes <= self.memory_total_bytes
        assert all(s in ("loading", "ready", "unloading") and b >= 0 for s, b in self.models.values())


ResidencyParser = Callable[[Any], Residency]


@dataclass(frozen=True)
class NormalisedError:
    """An upstream's error as the client will see it (surface-neutral, like common.errors.ApiError)."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None  # set exactly when the error is an overload
    upstream_status: int | None = None  # what the server itself answered, for logs and failover

    def __post_init__(self) -> None:
        assert 400 <= self.status <= 599
        assert (self.retry_after_s is None) == (self.code != "overloaded")
        if self.retry_after_s is not None:
            assert RETRY_AFTER_MIN_S <= self.retry_after_s <= RETRY_AFTER_MAX_S

    @property
    def context_overflow(self) -> bool:
        return self.code == CONTEXT_CODE

    @property
    def overloaded(self) -> bool:
        """The upstream is busy: another replica may take the request (before the first byte)."""
        return self.code == "overloaded"


@dataclass(frozen=True)
class ErrorFields:
    """What an error body said, whatever its shape; every field may be missing."""

    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None
    status: int | None = None  # a status the body itself states (TGI's http_status_code, vLLM's int code)
    extra: Mapping[str, Any] = field(default_factory=dict)  # the rest of the error object


OverflowPredicate = Callable[[int, ErrorFields], bool]
StatusRefiner = Callable[[int, ErrorFields], int]
HealthJudge = Callable[[int, bytes], Health]
ModelsParser = Callable[[Mapping[str, Any]], dict[str, ModelEntry]]
OutputField = Literal["max_tokens", "max_completion_tokens"]


@dataclass(frozen=True)
class Kind:
    """One kind of upstream server. Every field is data or a pure function.

    `model_paths` are GET in order and their parsed JSON bodies handed to
    `parse_models` keyed by path; it raises ValueError when they are
    malformed (the poller then marks the node malformed and lives on).
    """

    name: str
    label: str  # what a person calls it, for messages
    health_path: str
    model_paths: tuple[str, ...]
    token_bytes_max: int
    reports_context: bool  # False: limits come from the catalogue or a configured default
    judge_health: HealthJudge
    parse_models: ModelsParser
    is_overflow: OverflowPredicate
    # Which field carries the output bound on a chat request, and whether the other may ride along.
    chat_output_field: OutputField = "max_tokens"
    mirror_output_field: bool = True
    truncates_prompts: bool = False  # cuts an oversized prompt silently instead of refusing it
    # The status an error really has, when the server's own is misleading (TGI's stream errors are all "422").
    refine_status: StatusRefiner | None = None
    # A model lifecycle (load, unload, residency), where the server has one: neuron's. Others
    # are routed to for what they serve, and never asked to load or unload.
    lifecycle_path: str | None = None
    parse_residency: ResidencyParser | None = None

    def __post_init__(self) -> None:
        assert (self.lifecycle_path is None) == (self.parse_residency is None)
        assert self.name and self.health_path.startswith("/") and self.model_paths
        assert all(p.startswith("/") for p in self.model_paths)
        assert 1 <= self.token_bytes_max <= 4096

    # --- errors --------------------------------------------------------------

    def normalise_error(
        self, status: int, raw: bytes, retry_after: str | None = None, *, now_epoch_s: float | None = None
    ) -> NormalisedError:
        """The server's error response -> the client's error. Never raises."""
        return normalise(self, status, read_error(raw), retry_after, now_epoch_s)

    def stream_error(self, frame: Any) -> NormalisedError | None:
        """An error event inside a 200 stream (`data: {"error": ...}`), or None if `frame` is not one.

        TGI reports even validation errors this way on a streamed request;
        vLLM, SGLang and llama.cpp do when generation fails part-way.
        """
        fields = error_fields(frame)
        if fields is None:
            return None
        status = fields.status if fields.status is not None else 500
        return normalise(self, status, fields, None, None)

    # --- requests ------------------------------------------------------------

    def prepare_body(
        self, body: Mapping[str, Any], *, output_tokens_max: int, stream: bool, chat: bool = True
    ) -> dict[str, Any]:
        """The body sent upstream: the client's, with the output bound its hold covers,
        a usage frame asked for when streaming, and no `stream_options` otherwise
        (vLLM and OpenAI refuse `stream_options` on a request that does not stream)."""
        assert output_tokens_max >= 0
        out = {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens", "stream_options")}
        field_ = self.chat_output_field if chat else "max_tokens"
        out[field_] = output_tokens_max
        if self.mirror_output_field and chat and "max_completion_tokens" in body:
            out["max_tokens" if field_ == "max_completion_tokens" else "max_completion_tokens"] = output_tokens_max
        if stream:
            out["stream"] = True  # also when cortex streams a non-streamed request (incremental holds)
            options = body.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return out

    # --- token bounds ----------------------------------------------------------

    def output_bytes_max(self, output_tokens: int) -> int:
        """The most output bytes `output_tokens` tokens of this kind can carry (the relay's guard)."""
        assert output_tokens >= 0
        return output_tokens * self.token_bytes_max

    def output_tokens_floor(self, relayed_bytes: int) -> int:
        """The fewest tokens that can have carried `relayed_bytes` output bytes (the meter's lower bound)."""
        assert relayed_bytes >= 0
        return -(-relayed_bytes // self.token_bytes_max)


# --- reading error bodies ------------------------------------------------------


def read_error(raw: bytes) -> ErrorFields:
    """Any error body -> its fields (see the module docstring for the shapes)."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        payload = None
    fields = error_fields(payload)
    if fields is not None:
        return fields
    if isinstance(payload, dict):
        for key in ("detail", "message", "msg"):
            if isinstance(payload.get(key), str):
                return ErrorFields(message=payload[key])
    text = raw[:ERROR_BODY_PEEK_BYTES].decode("utf-8", "replace").strip()
    return ErrorFields(message=text or None)


def error_fields(payload: Any) -> ErrorFields | None:
    """The fields of a parsed error object, or None when `payload` is not an error object."""
    if not isinstance(payload, dict):
        return None
    inner = payload.get("error")
    if isinstance(inner, dict):
        return _fields_of(inner)
    if isinstance(inner, str):
        error_type = payload.get("error_type")
        return ErrorFields(message=inner, type=error_type if isinstance(error_type, str) else None)
    if payload.get("object") == "error":
        return _fields_of(payload)
    return None


def _fields_of(obj: Mapping[str, Any]) -> ErrorFields:
    message, type_, code, param = obj.get("message"), obj.get("type"), obj.get("code"), obj.get("param")
    stated = obj.get("http_status_code", code)
    status = stated if _is_int(stated) and 400 <= stated <= 599 else None
    return ErrorFields(
        message=message if isinstance(message, str) else None,
        type=type_ if isinstance(type_, str) else None,
        code=code if isinstance(code, str) or _is_int(code) else None,
        param=param if isinstance(param, str) else None,
        status=status,
        extra={k: v for k, v in obj.items() if k not in ("message", "type", "code", "param")},
    )


# --- the shared mapping ----------------------------------------------------------


def normalise(
    kind: Kind, status: int, fields: ErrorFields, retry_after: str | None, now_epoch_s: float | None
) -> NormalisedError:
    if kind.refine_status is not None:
        status = kind.refine_status(status, fields)
    said = _bounded(fields.message) or f"HTTP {status}"
    if kind.is_overflow(status, fields):
        return NormalisedError(400, said, "invalid_request_error", CONTEXT_CODE, "messages", None, status)
    if status in OVERLOAD_STATUSES:
        return NormalisedError(
            503,
            f"The {kind.label} upstream serving this model is overloaded: {said}",
            "server_error",
            "overloaded",
            None,
            retry_after_s(retry_after, now_epoch_s),
            status,
        )
    if status in CREDENTIAL_STATUSES:
        return NormalisedError(
            502,
            f"The {kind.label} upstream refused cortex's credentials (HTTP {status}): {said}. "
            "Check the upstream's api_key_env.",
            "upstream_error",
            "upstream_error",
            None,
            None,
            status,
        )
    if status in CLIENT_STATUSES:
        client_status = 400 if status == 422 else status
        type_ = fields.type if fields.type in ("invalid_request_error", "not_found_error") else "invalid_request_error"
        # An upstream's own code passes, but never one that would claim a different verdict than ours.
        code = fields.code if isinstance(fields.code, str) and fields.code not in ("overloaded", CONTEXT_CODE) else None
        if code is None and status == 404 and "model" in said.lower():
            code = "model_not_found"
        return NormalisedError(client_status, said, type_, code, fields.param, None, status)
    return NormalisedError(
        502,
        f"The {kind.label} upstream failed with HTTP {status}: {said}",
        "upstream_error",
        "upstream_error",
        None,
        None,
        status,
    )


def retry_after_s(value: str | None, now_epoch_s: float | None = None) -> float:
    """A Retry-After header in seconds, within [1, 3600]; 1 when absent or unreadable.

    Delta-seconds are read directly; an HTTP-date only when the caller
    passes the wall clock (this module reads none).
    """
    seconds: float | None = None
    if value is not None and value.isascii():
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            seconds = _http_date_delta_s(value, now_epoch_s)
    if seconds is None or not math.isfinite(seconds):
        return RETRY_AFTER_DEFAULT_S
    return min(max(seconds, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


def _http_date_delta_s(value: str, now_epoch_s: float | None) -> float | None:
    if now_epoch_s is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return when.timestamp() - now_epoch_s


def message_says(fields: ErrorFields, *phrases: str) -> bool:
    """The message contains any of `phrases` (compared in lower case)."""
    text = (fields.message or "").lower()
    return any(p in text for p in phrases)


def overflow_by(phrases: tuple[str, ...]) -> OverflowPredicate:
    """The usual overflow test: a client error whose code, or whose message, says so."""

    def is_overflow(status: int, fields: ErrorFields) -> bool:
        return 400 <= status < 500 and (code_says_overflow(fields) or message_says(fields, *phrases))

    return is_overflow


def code_says_overflow(fields: ErrorFields) -> bool:
    """The error's own code or type names a context overflow."""
    return any(isinstance(v, str) and v.lower() in OVERFLOW_CODES for v in (fields.code, fields.type))


def _bounded(message: str | None) -> str:
    if not message:
        return ""
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"


# --- health helpers -----------------------------------------------------------------


def judge_status_only(status: int, raw: bytes) -> Health:
    """A health endpoint whose status says everything (vLLM, SGLang, TGI, neuron)."""
    if status == 200:
        return Health("healthy")
    detail = read_error(raw).message if raw else None
    reason = f"health check answered HTTP {status}" + (f": {_bounded(detail)}" if detail else "")
    return Health("not_ready" if status == 503 else "unhealthy", reason)


# --- model-list helpers ---------------------------------------------------------------


def body_at(bodies: Mapping[str, Any], path: str) -> Any:
    if path not in bodies:
        raise ValueError(f"no body for GET {path}")
    return bodies[path]


def model_list(payload: Any, path: str = "/v1/models") -> list[dict[str, Any]]:
    """The `data` entries of an OpenAI model list, each with a non-empty string `id`."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(f"{path} body has no 'data' list")
    entries = []
    for entry in payload["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise ValueError(f"malformed model entry in {path}: {str(entry)[:200]}")
        entries.append(entry)
    return entries


def limit_or_none(value: Any, what: str) -> int | None:
    """An optional token limit: None stays None, a positive integer passes, anything else is malformed."""
    if value is None:
        return None
    if not _is_limit(value):
        raise ValueError(f"{what} is not a positive integer: {str(value)[:100]}")
    return value


def required_limit(value: Any, what: str) -> int:
    if value is None:
        raise ValueError(f"{what} is missing")
    limit = limit_or_none(value, what)
    assert limit is not None
    return limit


def entries_by_name(entries: list[ModelEntry]) -> dict[str, ModelEntry]:
    models: dict[str, ModelEntry] = {}
    for entry in entries:
        if entry.name in models:
            raise ValueError(f"model {entry.name!r} is listed twice")
        models[entry.name] = entry
    return models


def models_with_context_field(bodies: Mapping[str, Any], path: str, context_field: str) -> dict[str, ModelEntry]:
    """An OpenAI model list whose entries may carry their context in `context_field` (vLLM, SGLang)."""
    entries = []
    for entry in model_list(body_at(bodies, path), path):
        context = limit_or_none(entry.get(context_field), f"{entry['id']}: {context_field}")
        entries.append(ModelEntry(entry["id"], context, None))
    return entries_by_name(entries)


def template_tokens(value: Any, what: str) -> int | None:
    """A template cost a server advertises (None when it does not); ValueError when malformed."""
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= TEMPLATE_TOKENS_MAX:
        raise ValueError(f"{what} must be an integer from 0 to {TEMPLATE_TOKENS_MAX}, got {str(value)[:50]}")
    return value


SERVER_PATH_CHARS_MAX = 2048


def is_sha256(value: Any) -> bool:
    """64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def is_server_path(value: Any) -> bool:
    """A path on the server itself ("/..."; printable ASCII, no scheme, no host): cortex GETs it
    from the node's own URL, never from wherever an advertisement points."""
    return (isinstance(value, str) and 1 <= len(value) <= SERVER_PATH_CHARS_MAX and value.startswith("/")
            and not value.startswith("//") and all("!" <= c <= "~" for c in value) and "#" not in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_limit(value: Any) -> bool:
    return _is_int(value) and 0 < value < LIMIT_TOKENS_MAX


# --- usage ---------------------------------------------------------------------------

# A prompt of B bytes is far more than B / 16 tokens for any text a real
# tokenizer sees (prose and code run at 3 to 5 bytes a token, CJK at 2 to 6),
# so a reported count below that is a prompt the server cut.
TRUNCATION_BYTES_PER_TOKEN = 16


def prompt_truncation_suspected(prompt_tokens_reported: int, prompt_tokens_bound: int) -> bool:
    """The server's prompt count is far below cortex's upper bound (UTF-8 bytes plus
    template overhead): it probably cut the prompt (Ollama does, silently)."""
    assert prompt_tokens_reported >= 0 and prompt_tokens_bound >= 0
    return prompt_tokens_reported * TRUNCATION_BYTES_PER_TOKEN < prompt_tokens_bound

