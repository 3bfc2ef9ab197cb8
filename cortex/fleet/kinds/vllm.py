"""vLLM's OpenAI-compatible server (`vllm serve`).

* Health: `GET /health`, 200 with an empty body; 503 once the engine has
  died (vllm/entrypoints/openai/api_server.py).
* Models: `GET /v1/models`, ModelCard entries (vllm/entrypoints/openai/
  engine/protocol.py): `id`, `owned_by: "vllm"`, `root`, `parent` (set for
  a LoRA adapter), `max_model_len` (prompt plus output). No output limit:
  vLLM will write up to the context left after the prompt.
* Errors: nested `{"error": {"message", "type": "BadRequestError", "param",
  "code": 400}}` since 0.10 (ErrorInfo), flat `{"object": "error", "message",
  "type", "param", "code"}` before. A context overflow is a 400 whose
  message says, by version, "This model's maximum context length is N
  tokens. However, you requested ...", "'max_tokens' or
  'max_completion_tokens' is too large: M. This model's maximum context
  length is N tokens and your request has P input tokens (...)", or "The
  decoder prompt (length P) is longer than the maximum model length of N".
  An overload ("The request queue is full.") is a 503.
* Requests: both `max_tokens` and `max_completion_tokens` are understood
  (the latter wins); `stream_options` is refused unless streaming.
* Tokens: Hugging Face tokenizers, so REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import Kind, ModelEntry

MODELS_PATH = "/v1/models"
OVERFLOW_PHRASES = ("maximum context length", "maximum model length", "context length", "exceeds limit of")


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    return base.models_with_context_field(bodies, MODELS_PATH, "max_model_len")


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="vllm",
    label="vLLM",
    health_path="/health",
    model_paths=(MODELS_PATH,),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=True,
    judge_health=base.judge_status_only,
    parse_models=parse_models,
    is_overflow=is_overflow,
)
