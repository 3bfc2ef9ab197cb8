"""llama.cpp's HTTP server (`llama-server`, tools/server/README.md).

* Health: `GET /health`: 200 `{"status": "ok"}` once the model is loaded;
  503 `{"error": {"code": 503, "message": "Loading model", "type":
  "unavailable_error"}}` while it loads, which is "not ready", not broken.
* Models: two requests.
  - `GET /v1/models` for the name: one entry, whose `id` is the model path
    or the `--alias`; its `meta.n_ctx_train` is the context the model was
    *trained* with, not the one the server runs, and is ignored.
  - `GET /props` for the limit: `default_generation_settings.n_ctx` is the
    context of one slot (`--ctx-size` divided among `--parallel` slots),
    which is what one request can use. `params.n_predict` (-1: unbounded)
    is taken as the output limit when positive.
  Router mode (several models behind one server) is not supported: the list
  must hold exactly one model.
* Errors: the nested form with an integer code, `{"error": {"code": 400,
  "message", "type"}}`. A prompt that does not fit is `type:
  "exceed_context_size_error"`, message "request (P tokens) exceeds the
  available context size (N tokens), try increasing it", with
  `n_prompt_tokens` and `n_ctx` beside it. A prompt that fits but whose
  `max_tokens` does not is *not* refused: generation stops at the context
  with `finish_reason: "length"`.
* Tokens: GGUF vocabularies (BPE or SentencePiece), so
  REAL_TOKENIZER_TOKEN_BYTES_MAX.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import Health, Kind, ModelEntry

MODELS_PATH = "/v1/models"
PROPS_PATH = "/props"
OVERFLOW_PHRASES = ("exceeds the available context size", "context size")


def judge_health(status: int, raw: bytes) -> Health:
    if status == 503 and "loading model" in (base.read_error(raw).message or "").lower():
        return Health("not_ready", "llama.cpp is loading the model")
    return base.judge_status_only(status, raw)


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    listed = base.model_list(base.body_at(bodies, MODELS_PATH), MODELS_PATH)
    if len(listed) != 1:
        raise ValueError(f"{MODELS_PATH} lists {len(listed)} models; llama.cpp serves one (router mode is not supported)")
    props = base.body_at(bodies, PROPS_PATH)
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"{PROPS_PATH} body has no 'default_generation_settings' object")
    context = base.required_limit(settings.get("n_ctx"), f"{PROPS_PATH}: default_generation_settings.n_ctx")
    params = settings.get("params")
    n_predict = params.get("n_predict") if isinstance(params, dict) else settings.get("n_predict")
    output = n_predict if isinstance(n_predict, int) and not isinstance(n_predict, bool) and n_predict > 0 else None
    output = base.limit_or_none(output, f"{PROPS_PATH}: n_predict")
    name = listed[0]["id"]
    return {name: ModelEntry(name, context, output)}


is_overflow = base.overflow_by(OVERFLOW_PHRASES)


KIND = Kind(
    name="llamacpp",
    label="llama.cpp",
    health_path="/health",
    model_paths=(MODELS_PATH, PROPS_PATH),
    token_bytes_max=base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
    reports_context=True,
    judge_health=judge_health,
    parse_models=parse_models,
    is_overflow=is_overflow,
)
