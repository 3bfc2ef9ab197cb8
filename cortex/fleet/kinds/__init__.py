"""Upstream kinds: one pure adapter module per kind of inference server.

Each module defines `KIND`, a `base.Kind`: the health probe and how to judge
it, the model-list requests and their parser, error normalisation, request
rewrites and the token-byte bound. Nothing here does I/O; the poller and the
proxy look a node's kind up in `KINDS` and call it, so no `if kind == ...`
appears on the request path.
"""

from __future__ import annotations

from cortex.fleet.kinds import llamacpp, neuron, ollama, openai, sglang, tgi, vllm
from cortex.fleet.kinds.base import Health, Kind, ModelEntry, NormalisedError, Residency

KINDS: dict[str, Kind] = {
    m.KIND.name: m.KIND for m in (neuron, openai, vllm, llamacpp, ollama, sglang, tgi)
}


def kind(name: str) -> Kind:
    """The adapter for `name`; ValueError naming the known kinds otherwise (for config validation)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown upstream kind {name!r}; known kinds: {', '.join(KINDS)}") from None


__all__ = ["KINDS", "Health", "Kind", "ModelEntry", "NormalisedError", "Residency", "kind"]
