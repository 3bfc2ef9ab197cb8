"""Hugging Face Text Generation Inference (`text-generation-launcher`).

* Health: `GET /health`, 200 with an empty body; 503 `{"error":
  "unhealthy", "error_type": "healthcheck"}` (router/src/server.rs).
* Models: `GET /info` (router/src/lib.rs `Info`): `model_id`,
  `max_total_tokens` (prompt plus output: the context), `max_input_tokens`
  (`max_input_length` before TGI 2.0: a prompt bound below the context).
  TGI serves one model, and has no separate output limit. Its `/v1/models`
  lists the same `model_id` without limits.
* Errors: `{"error": "...", "error_type": "..."}`; validation errors are 422
  with `error_type: "validation"`, an overload 429 "Model is overloaded"
  (`error_type: "overloaded"`, no Retry-After), a generation failure 424.
  A context overflow is a validation error: "Input validation error:
  `inputs` tokens + `max_new_tokens` must be <= N. Given: P `inputs` tokens
  and M `max_new_tokens`" or "... `inputs` must have less than N tokens.
  Given: P". On a *streamed* chat request TGI answers 200 and sends the
  error as an event, `data: {"error": {"message", "http_status_code": 422}}`
  (InferError::into_openai_event), then `data: [DONE]`: see
  `Kind.stream_error`. That 422 is hard-coded for every error, an overload
  included, so the status is read back from the message, whose prefix is
  InferError's Display ("Model is overloaded", "Request failed during
  generation: ...", "Input validation error: ...").
* Requests: `max_completion_tokens` is a serde alias of `max_tokens`, so
  sending both is a duplicate-field error: only `max_tokens` is sent.
* Tokens: Hugging Face tokenizers, so REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import ErrorFields, Kind, ModelEntry

INFO_PATH = "/info"
OVERFLOW_PHRASES = ("`inputs` tokens + `max_new_tokens` must be <=", "`inputs` must have less than")


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    info = base.body_at(bodies, INFO_PATH)
    if not isinstance(info, dict):
        raise ValueError(f"{INFO_PATH} body is not an object")
    name = info.get("model_id")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{INFO_PATH} body has no 'model_id'")
    context = base.required_limit(info.get("max_total_tokens"), f"{INFO_PATH}: max_total_tokens")
    key = "max_input_tokens" if "max_input_tokens" in info else "max_input_length"
    prompt = base.limit_or_none(info.get(key), f"{INFO_PATH}: {key}")
    return {name: ModelEntry(name, context, None, prompt)}


# InferError's Display prefixes -> the status TGI gives the same error on a non-streamed request.
MESSAGE_STATUSES = (
    ("Model is overloaded", 429),
    ("Request failed during generation", 424),
    ("Incomplete generation", 500),
    ("Stream event serialization error", 500),
)


def refine_status(status: int, fields: ErrorFields) -> int:
    message = fields.message or ""
    if fields.type == "overloaded":
        return 429
    for prefix, real in MESSAGE_STATUSES:
        if message.startswith(prefix):
            return real
    return status


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="tgi",
    label="TGI",
    health_path="/health",
    model_paths=(INFO_PATH,),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=True,
    judge_health=base.judge_status_only,
    parse_models=parse_models,
    is_overflow=is_overflow,
    mirror_output_field=False,
    refine_status=refine_status,
)
