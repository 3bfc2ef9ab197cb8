"""The reservation estimate: a true upper bound on a request's token cost.

Prompt: neuron's tokenizer is byte-level, so the rendered-prompt count from
`common.counting` is exact. For any other tokenizer whose tokens each
cover at least one byte (byte-level BPE as in GPT-2, Llama 3 and tiktoken;
SentencePiece with byte fallback), the same count is still an upper bound,
provided the template overhead per message is no larger than ours. Fields
an engine may render into the prompt (tools, response formats) and
non-text content parts are added at their JSON byte size. A neuron whose
engine renders another template (the kernel engine renders the
checkpoint's) advertises its per-message and reply-primer costs, and the
bound uses those. Where the catalogue names the model's tokenizer, the
caller counts the prompt exactly (cortex/budget/exact_count.py) and passes
that count in: it replaces the bound.

Output: `max_completion_tokens`, else `max_tokens`, else what the model
could still write (its `limit.output`, but no more than the context left
after the prompt), else a configured fallback when the model's limits are
unknown. A request that cannot fit the context is refused here, before any
hold, when the prompt count is exact (the model's own tokenizer, or a
byte-level neuron); over an unknown tokenizer a request with its own
`max_tokens` goes to the upstream, which decides (its refusal is mapped and
the hold released), since the byte bound alone would refuse prompts that
fit. Without `max_tokens`, the output bound is the context left after the
bound, so the request is valid on any upstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common import errors
from common.openai_schema import GenerationRequest
from cortex.fleet.registry import ModelInfo
from common import counting

FALLBACK_OUTPUT_TOKENS = 4096
PROMPT_SIDE_FIELDS = ("tools", "functions", "tool_choice", "response_format")


@dataclass(frozen=True)
class Estimate:
    prompt_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def prompt_tokens_bound(gen: GenerationRequest, model: ModelInfo | None = None) -> int:
    """The prompt's tokens at most, on `model`'s chat template where its upstream advertised one."""
    if gen.kind == "completion":
        return counting.count_text(gen.prompt) + (model.completion_prefix_tokens if model is not None else 0)
    if model is None:
        total = counting.count_chat(gen.messages)
    else:
        total = counting.count_chat(gen.messages, model.message_overhead_tokens, model.reply_primer_tokens)
    for message in gen.messages:
        content = message.get("content")
        if isinstance(content, list):
            total += sum(_json_bytes(p) for p in content if p.get("type") != "text")
        if message.get("tool_calls"):
            total += _json_bytes(message["tool_calls"])
    return total + sum(_json_bytes(gen.body[f]) for f in PROMPT_SIDE_FIELDS if gen.body.get(f) is not None)


def prompt_tokens_floor(gen: GenerationRequest, model: ModelInfo | None = None) -> int:
    """UTF-8 bytes of the prompt's text and template: for any tokenizer at most
    `token_bytes_max` times the tokens the prompt costs. The template counts only where its
    costs are exact (common/counting's own); an advertised one's are upper bounds, so then
    only the text, which every template carries verbatim, does."""
    if gen.kind == "completion":
        return counting.count_text(gen.prompt)
    if model is not None and not model.template_exact:
        return counting.count_chat(gen.messages, 0, 0)
    return counting.count_chat(gen.messages)


def estimate(gen: GenerationRequest, model: ModelInfo | None, fallback_output_tokens: int = FALLBACK_OUTPUT_TOKENS,
             exact_prompt_tokens: int | None = None) -> Estimate:
    """The worst-case cost of `gen`, or 400 context_length_exceeded. `exact_prompt_tokens`: the
    prompt counted on the model's own tokenizer and template, held instead of the byte bound."""
    assert exact_prompt_tokens is None or exact_prompt_tokens >= 1
    prompt = exact_prompt_tokens if exact_prompt_tokens is not None else prompt_tokens_bound(gen, model)
    asked = gen.max_output_tokens
    if model is None:
        return Estimate(prompt, asked if asked is not None else fallback_output_tokens)
    if asked is not None and gen.max_tokens_defaulted:
        asked = min(asked, model.output_tokens)  # the neuron clamps a default it was not asked for
    elif asked is not None and model.limits_reported and asked > model.output_tokens:
        # The same answer whichever upstream the request would be routed to.
        raise errors.invalid_request(
            f"'max_tokens' is too large: {asked}. This model supports at most {model.output_tokens} completion tokens.",
            param="max_completion_tokens" if gen.body.get("max_completion_tokens") is not None else "max_tokens",
        )
    if asked is not None:
        # Only an exact count may refuse a context overflow here. A byte bound over an unknown
        # tokenizer is often several times the real count: the upstream decides, its refusal is
        # mapped to context_length_exceeded and the hold released.
        exact = exact_prompt_tokens is not None or model.bound_exact
        if exact and prompt + asked > model.context_tokens:
            raise errors.context_length_exceeded(prompt, asked, model.context_tokens)
        return Estimate(prompt, asked)
    if prompt >= model.context_tokens:
        raise errors.context_length_exceeded(prompt, 0, model.context_tokens)
    return Estimate(prompt, min(model.output_tokens, model.context_tokens - prompt))
