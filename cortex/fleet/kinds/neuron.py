"""neuron, cortex's own data-plane daemon.

* Health: `GET /health`, 200 with a JSON status document.
* Models: `GET /v1/models`, an OpenAI list whose entries carry
  `limit: {"context": N, "output": M}` (neuron/app.py). Both limits are
  required: neuron always knows them.
* Errors: cortex's own envelope (common/errors.py); a context overflow has
  code `context_length_exceeded`, an overload is 503 `overloaded` with
  Retry-After.
* Lifecycle: `GET /models` (each model's status and memory, and the
  memory budget), `POST /models/load`, `POST /models/unload` (drains, then
  frees): cortex loads cold models on demand and evicts to make room.
* Tokens: one per UTF-8 byte (common/counting.py), so `token_bytes_max` is 1
  and the relay's byte count is exact. An entry may carry `tokenizer:
  {"kind", "message_overhead_tokens", "reply_primer_tokens",
  "completion_prefix_tokens"}`: what its chat template (and a completion
  prompt's BOS) costs (the kernel engine renders the checkpoint's own), which the
  estimate then uses in place of common/counting's template.
* Tokenizer files: a kernel model's `tokenizer` also carries `"sha256"` and
  `"url"`, a path on the neuron (`/v1/models/{id}/tokenizer`) that serves
  the model's tokenizer.json and tokenizer_config.json as one JSON document
  whose sha256 that is (common/chat_template.py). cortex fetches it once per
  sha256, off the request path (cortex/fleet/tokenizers.py), and then counts
  the model's prompts exactly. Both or neither; a malformed one makes the
  model list malformed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.fleet.kinds import base
from cortex.fleet.kinds.base import ErrorFields, Kind, ModelEntry, Residency

MODELS_PATH = "/v1/models"


def parse_models(bodies: Mapping[str, Any]) -> dict[str, ModelEntry]:
    entries = []
    for entry in base.model_list(base.body_at(bodies, MODELS_PATH), MODELS_PATH):
        limit = entry.get("limit")
        if not isinstance(limit, dict):
            raise ValueError(f"malformed model entry {str(entry)[:200]}: no 'limit' object")
        name = entry["id"]
        context = base.required_limit(limit.get("context"), f"{name}: limit.context")
        output = base.required_limit(limit.get("output"), f"{name}: limit.output")
        tokenizer = entry.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, dict):
            raise ValueError(f"malformed model entry {str(entry)[:200]}: 'tokenizer' is not an object")
        tokenizer = tokenizer or {}
        # A checkpoint's own tokenizer (BPE, SentencePiece) covers several bytes a token: the
        # byte count stays an upper bound, and the floors divide by what a real token can cover.
        byte_level = tokenizer.get("kind") in (None, "byte-level")
        overhead = base.template_tokens(tokenizer.get("message_overhead_tokens"), f"{name}: tokenizer.message_overhead_tokens")
        primer = base.template_tokens(tokenizer.get("reply_primer_tokens"), f"{name}: tokenizer.reply_primer_tokens")
        prefix = base.template_tokens(tokenizer.get("completion_prefix_tokens"), f"{name}: tokenizer.completion_prefix_tokens")
        sha256, path = tokenizer_advert(tokenizer, name)
        entries.append(ModelEntry(
            name, context, output, message_overhead_tokens=overhead, reply_primer_tokens=primer,
            token_bytes_max=None if byte_level else base.REAL_TOKENIZER_TOKEN_BYTES_MAX,
            completion_prefix_tokens=prefix, tokenizer_sha256=sha256, tokenizer_path=path,
        ))
    return base.entries_by_name(entries)


def tokenizer_advert(tokenizer: Mapping[str, Any], name: str) -> tuple[str | None, str | None]:
    """(sha256, path) of the tokenizer document an entry advertises; (None, None) if none."""
    sha256, url = tokenizer.get("sha256"), tokenizer.get("url")
    if sha256 is None and url is None:
        return None, None
    if not base.is_sha256(sha256):
        raise ValueError(f"{name}: tokenizer.sha256 must be 64 lower-case hex digits, got {str(sha256)[:80]!r}")
    if not base.is_server_path(url):
        raise ValueError(f"{name}: tokenizer.url must be a path on the neuron ('/...', printable ASCII, at most "
                         f"{base.SERVER_PATH_CHARS_MAX} characters), got {str(url)[:80]!r}")
    return sha256, url


LIFECYCLE_PATH = "/models"
UNBOUNDED_MEMORY_BYTES = 2**62  # a neuron with no memory budget: anything fits


def parse_residency(body: Any) -> Residency:
    """`GET /models`: `data[]` of `{id, status, memory_bytes}`, `memory_budget_bytes` (null: no
    bound) and `memory_reserved_bytes` (loaded and loading models together)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError(f"GET {LIFECYCLE_PATH}: not a model list")
    models: dict[str, tuple[str, int]] = {}
    for entry in body["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise ValueError(f"GET {LIFECYCLE_PATH}: malformed entry {str(entry)[:200]}")
        status, memory = entry.get("status"), entry.get("memory_bytes")
        if status not in ("loading", "ready", "unloading"):
            raise ValueError(f"GET {LIFECYCLE_PATH}: {entry['id']}: unknown status {str(status)[:50]!r}")
        if not isinstance(memory, int) or isinstance(memory, bool) or not 0 <= memory < UNBOUNDED_MEMORY_BYTES:
            raise ValueError(f"GET {LIFECYCLE_PATH}: {entry['id']}: memory_bytes must be a byte count")
        models[entry["id"]] = (status, memory)
    budget, reserved = body.get("memory_budget_bytes"), body.get("memory_reserved_bytes", 0)
    for name, value in (("memory_budget_bytes", budget), ("memory_reserved_bytes", reserved)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < UNBOUNDED_MEMORY_BYTES):
            raise ValueError(f"GET {LIFECYCLE_PATH}: {name} must be a byte count")
    total = UNBOUNDED_MEMORY_BYTES if budget is None else budget
    return Residency(total, max(0, total - (reserved or 0)), models)


def is_overflow(status: int, fields: ErrorFields) -> bool:
    return 400 <= status < 500 and fields.code == base.CONTEXT_CODE


KIND = Kind(
    name="neuron",
    label="neuron",
    health_path="/health",
    model_paths=(MODELS_PATH,),
    token_bytes_max=1,
    reports_context=True,
    judge_health=base.judge_status_only,
    parse_models=parse_models,
    is_overflow=is_overflow,
    lifecycle_path=LIFECYCLE_PATH,
    parse_residency=parse_residency,
)
