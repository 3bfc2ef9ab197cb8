"""Admission arithmetic for one loaded model: pure, no clock, no I/O.

A sequence is admitted into the batch when a slot is free (`max_in_flight`)
and the KV cache can hold its whole life: it reserves prompt + max_tokens - 1
tokens of KV at admission (the last token ends the sequence and is never fed
back), so admitted work can always finish and no step ever runs out of cache. Otherwise it waits in a FIFO queue of at most
`max_queue_depth`, for at most `queue_wait_s`; nobody jumps the queue, so a
large request at the head is not starved by small ones behind it. A
request whose reservation exceeds the whole budget can never run: 413.

Every refusal has a reason, and the scheduler counts each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from common.errors import ApiError, service_unavailable

Verdict = Literal["admit", "queue", "refuse"]

# Why a request was refused (the label of neuron_admission_rejections_total).
QUEUE_FULL = "queue_full"  # no slot or KV now, and the queue is at max_queue_depth
QUEUE_WAIT = "queue_wait"  # waited in the queue past queue_wait_s
TOO_LARGE = "too_large"  # the reservation exceeds the whole KV budget (413)
NOT_READY = "not_ready"  # the model is loading or unloading
REASONS = (QUEUE_FULL, QUEUE_WAIT, TOO_LARGE, NOT_READY)

RETRY_AFTER_S = 1.0  # a full batch frees a slot within a few steps


@dataclass(frozen=True)
class AdmissionLimits:
    max_in_flight: int  # sequences in the batch at once
    max_queue_depth: int  # sequences waiting for a slot or KV
    queue_wait_s: float  # a queued sequence waiting longer is refused with 503
    kv_budget_tokens: int  # KV tokens all admitted sequences may reserve together

    def __post_init__(self) -> None:
        assert self.max_in_flight >= 1 and self.max_queue_depth >= 0
        assert self.queue_wait_s > 0 and self.kv_budget_tokens >= 1


@dataclass(frozen=True)
class Load:
    """What a model's batch holds right now."""

    in_flight: int
    queued: int
    kv_reserved_tokens: int


def kv_budget_tokens(kv_budget_bytes: int, kv_bytes_per_token: int) -> int:
    assert kv_budget_bytes >= 0 and kv_bytes_per_token >= 1
    return kv_budget_bytes // kv_bytes_per_token


def kv_tokens_needed(prompt_tokens: int, max_tokens: int) -> int:
    """The reservation: the KV of the prompt and of every token it may generate but the last,
    which ends the sequence without being fed back: exactly the most tokens it can hold. (The
    budget counts tokens; a backend's storage may grow past them by doubling, within the context.)"""
    assert prompt_tokens >= 1 and max_tokens >= 1
    return prompt_tokens + max_tokens - 1


def max_tokens_that_fit(prompt_tokens: int, limits: AdmissionLimits) -> int:
    """The most tokens a prompt may generate within the whole KV budget; 0 when the prompt alone is over it."""
    return max(0, limits.kv_budget_tokens - prompt_tokens + 1)


def never_fits(need_tokens: int, limits: AdmissionLimits) -> bool:
    return need_tokens > limits.kv_budget_tokens


def can_start(load: Load, need_tokens: int, limits: AdmissionLimits) -> bool:
    """A slot is free and the reservation fits beside what is already reserved."""
    return load.in_flight < limits.max_in_flight and load.kv_reserved_tokens + need_tokens <= limits.kv_budget_tokens


def verdict(load: Load, need_tokens: int, limits: AdmissionLimits) -> Verdict:
    assert not never_fits(need_tokens, limits)
    if load.queued == 0 and can_start(load, need_tokens, limits):
        return "admit"
    if load.queued < limits.max_queue_depth:
        return "queue"
    return "refuse"


def wait_expired(enqueued_at: float, now: float, limits: AdmissionLimits) -> bool:
    return now - enqueued_at >= limits.queue_wait_s


def too_large(model: str, need_tokens: int, limits: AdmissionLimits, kv_bytes_per_token: int) -> ApiError:
    budget_mb = limits.kv_budget_tokens * kv_bytes_per_token / 2**20
    return ApiError(
        413,
        f"This request needs {need_tokens} tokens of KV cache (the prompt plus max_tokens, less one), more than the whole "
        f"KV budget of `{model}` on this neuron: {limits.kv_budget_tokens} tokens ({budget_mb:.1f} MiB). "
        "Shorten the prompt or lower max_tokens.",
        param="max_tokens",
        code="kv_budget_exceeded",
    )


def queue_full(model: str, limits: AdmissionLimits) -> ApiError:
    return service_unavailable(
        f"`{model}` is at capacity on this neuron ({limits.max_in_flight} in flight, "
        f"{limits.max_queue_depth} queued); retry shortly.",
        RETRY_AFTER_S,
    )


def queue_wait(model: str, limits: AdmissionLimits) -> ApiError:
    return service_unavailable(
        f"`{model}` did not have room for this request within the queue wait of {limits.queue_wait_s:g} s; "
        "retry shortly.",
        RETRY_AFTER_S,
    )


def not_ready(model: str, status: str, retry_after_s: float = RETRY_AFTER_S) -> ApiError:
    return service_unavailable(f"The model `{model}` is {status} on this neuron; retry shortly.", retry_after_s)


def ratio(used: int, budget: int) -> float:
    return used / budget if budget > 0 else math.nan
