"""A plain OpenAI-compatible server (OpenAI itself, or any server speaking its API).

* Health: there is no health endpoint in the OpenAI API, so the probe is
  `GET /v1/models`: 200 is healthy; 401/403 means the configured key is
  refused; 429 means alive but rate-limited (not ready).
* Models: `GET /v1/models`, `{"object": "list", "data": [{"id", "object",
  "created", "owned_by"}]}`, with no limits: they come from the catalogue or
  a configured default.
* Errors: `{"error": {"message", "type", "param", "code"}}`; a context
  overflow has code `context_length_exceeded` and the message "This model's
  maximum context length is N tokens...". Rate limits are 429
  (`rate_limit_exceeded`, with Retry-After), overload 503.
* Requests: chat sends the bound as `max_completion_tokens` only, since
  OpenAI's reasoning models refuse `max_tokens` (and both together);
  legacy completions send `max_tokens`.
* Tokens: tiktoken's byte-level BPE, so REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import Health, Kind, ModelEntry

MODELS_PATH = "/v1/models"
OVERFLOW_PHRASES = ("maximum context length", "context length exceeded", "context window")


def judge_health(status: int, raw: bytes) -> Health:
    if status in (401, 403):
        return Health("unhealthy", f"GET {MODELS_PATH} answered HTTP {status}: the upstream refused cortex's key")
    if status == 429:
        return Health("not_ready", f"GET {MODELS_PATH} answered HTTP 429: rate-limited")
    return base.judge_status_only(status, raw)


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    entries = base.model_list(base.body_at(bodies, MODELS_PATH), MODELS_PATH)
    return base.entries_by_name([ModelEntry(e["id"], None, None) for e in entries])


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="openai",
    label="OpenAI-compatible",
    health_path=MODELS_PATH,
    model_paths=(MODELS_PATH,),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=False,
    judge_health=judge_health,
    parse_models=parse_models,
    is_overflow=is_overflow,
    chat_output_field="max_completion_tokens",
    mirror_output_field=False,
)
