"""SGLang's OpenAI-compatible server (`python -m sglang.launch_server`).

* Health: `GET /health`, 200 when the server can take requests, 503 when
  it cannot.
* Models: `GET /v1/models`, ModelCard entries (sglang/srt/entrypoints/
  openai/protocol.py): `id`, `owned_by: "sglang"`, `root`, `max_model_len`
  (the effective context, from the model config). No output limit.
* Errors: the flat ErrorResponse, `{"object": "error", "message", "type":
  "BadRequestError", "param", "code": 400}`. A context overflow is a 400
  from TokenizerManager's validation: "The input (P tokens) is longer than
  the model's context length (N tokens)." or "Requested token count exceeds
  the model's maximum context length of N tokens. You requested a total of
  T tokens: ...". Note SGLang refuses `prompt + max_tokens >= N`, one token
  earlier than vLLM.
* Tokens: Hugging Face tokenizers, so REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import Kind, ModelEntry

MODELS_PATH = "/v1/models"
OVERFLOW_PHRASES = ("context length", "maximum context length")


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    return base.models_with_context_field(bodies, MODELS_PATH, "max_model_len")


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="sglang",
    label="SGLang",
    health_path="/health",
    model_paths=(MODELS_PATH,),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=True,
    judge_health=base.judge_status_only,
    parse_models=parse_models,
    is_overflow=is_overflow,
)
