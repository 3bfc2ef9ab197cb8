"""Ollama (`ollama serve`, docs/api and its OpenAI compatibility layer).

* Health: `GET /` answers 200 "Ollama is running" (text/plain); Ollama has
  no `/health`.
* Models: `GET /api/tags`, `{"models": [{"name", "model", "modified_at",
  "size", "digest", "details"}]}`; the OpenAI list at `/v1/models` names the
  same models (`model`, else `name`). Ollama reports no limit a request can
  rely on: its context is `num_ctx` (OLLAMA_CONTEXT_LENGTH, or the model's
  Modelfile), visible only for a loaded model in `/api/ps`. Limits come
  from the catalogue or a configured default.
* Prompts: Ollama *silently truncates* a prompt over its context, dropping
  the oldest messages but the system ones (server/prompt.go), and its usage
  then counts only what it kept. `truncates_prompts` tells the proxy to
  compare the reported prompt tokens with its bound
  (`base.prompt_truncation_suspected`) and count what it finds.
* Errors: through `/v1`, the nested form with `type` "invalid_request_error"
  (400), "not_found_error" (404) or "api_error", and `param`, `code` null
  (openai/openai.go NewError); the native API's `{"error": "..."}`. A full
  queue is 503 "server busy, please try again.  maximum pending requests
  exceeded", with no Retry-After.
* Requests: the OpenAI layer reads `max_tokens` only (its request struct has
  no `max_completion_tokens`), and honours `stream_options.include_usage`.
* Tokens: GGUF vocabularies, so REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import Kind, ModelEntry

TAGS_PATH = "/api/tags"
OVERFLOW_PHRASES = ("context length", "exceeds the context")


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    """`/api/tags` (the default) or `/v1/models`, whichever was asked."""
    if TAGS_PATH in bodies:
        return _parse_tags(bodies[TAGS_PATH])
    entries = base.model_list(base.body_at(bodies, "/v1/models"))
    return base.entries_by_name([ModelEntry(e["id"], None, None) for e in entries])


def _parse_tags(payload: Any) -> dict[str, ModelEntry]:
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list):
        raise ValueError(f"{TAGS_PATH} body has no 'models' list")
    entries = []
    for entry in payload["models"]:
        name = (entry.get("model") or entry.get("name")) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"malformed model entry in {TAGS_PATH}: {str(entry)[:200]}")
        entries.append(ModelEntry(name, None, None))
    return base.entries_by_name(entries)


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="ollama",
    label="Ollama",
    health_path="/",
    model_paths=(TAGS_PATH,),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=False,
    judge_health=base.judge_status_only,
    parse_models=parse_models,
    is_overflow=is_overflow,
    mirror_output_field=False,
    truncates_prompts=True,
)
