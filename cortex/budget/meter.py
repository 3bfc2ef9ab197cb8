"""What a request actually used, and how its hold must be resolved. Pure.

The rule: charge observed usage whenever it can be observed, capped at the
hold by the ledger. Two counts are observed: the upstream's own `usage`
(which may be missing, malformed, or simply wrong) and cortex's count of
the output it relayed to the client (a lower bound on output tokens). The
charge is the larger of the two, so a client is never charged less than
what it received, whatever the upstream claims.

Release when the upstream never produced anything for the client (it was
never reached, refused, or failed before any token). Charge the whole hold
only when usage happened but cannot be observed (a non-streamed request
whose client left: the upstream was working and its count never reached us).

`settlement()` never raises, whatever `usage` holds: it is called on the
way out of every request, including the broken ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Action = Literal["settle", "release", "charge_hold"]
# Why the upstream's count was not taken as it stood (cortex_usage_disagreements_total).
Disagreement = Literal["missing", "malformed", "below_relayed"]


COUNT_MAX = 10**12  # a larger count is the upstream's bug: no request is that big, and SQLite stops at 2**63


def usage_counts(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI usage object, if well-formed.

    Well-formed means a JSON object with integer counts in [0, COUNT_MAX];
    a float, a string, a bool, a list or an absurd number is the upstream's
    bug, not a count.
    """
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    for value in (prompt, completion):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= COUNT_MAX:
            return None
    return prompt, completion


def cached_prompt_tokens(usage: Any, prompt_tokens: int) -> int:
    """Prompt tokens the upstream read from its cache (`prompt_tokens_details.cached_tokens`), if well-formed.

    Anything else is 0: those tokens are then charged at the full input price, never below it.
    """
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not isinstance(cached, int) or isinstance(cached, bool) or not 0 <= cached <= prompt_tokens:
        return 0
    return cached


@dataclass(frozen=True)
class Settlement:
    action: Action
    tokens: int
    disagreement: Disagreement | None = None
    # The charge's parts, for its price: tokens == prompt_tokens + output_tokens.
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens

    def usd(self, prices: Any) -> int:
        """Micro-USD at `prices` (cortex.budget.pricing.Prices), or 0 unpriced."""
        if prices is None or self.action != "settle":
            return 0
        return prices.charge_usd(self.prompt_tokens, self.cached_tokens, self.output_tokens)


@dataclass
class Meter:
    stream: bool
    prompt_tokens_estimate: int  # the hold's prompt part: an upper bound
    usage: Any = None  # the upstream's own count, as it arrived (any JSON value)
    # UTF-8 bytes of the output the client received: an upper bound on its
    # tokens (each covers at least a byte), and divided by `token_bytes_max`
    # (the most bytes one token of this upstream's tokenizer covers) a lower one.
    relayed_output_tokens: int = 0
    token_bytes_max: int = 1
    # UTF-8 bytes of the prompt's text: the prompt has at least this / token_bytes_max tokens.
    prompt_tokens_floor: int = 0
    dispatched: bool = False  # handed to an upstream, which may be working on it
    responded: bool = False  # the upstream answered 200 and its output reached us
    completed: bool = False  # the upstream's response ended normally
    client_gone: bool = False
    # A reply cortex cut (incremental holds) whose output it counted with the model's own tokenizer:
    # charged that, not the relayed bytes (an upper bound on a tokenizer whose tokens are many bytes).
    exact_output_tokens: int | None = None

    def settlement(self) -> Settlement:
        if not self.dispatched:
            return Settlement("release", 0)
        counts = usage_counts(self.usage)
        if counts is not None:
            prompt, completion = counts
            prompt_floor = -(-self.prompt_tokens_floor // self.token_bytes_max)
            output_floor = -(-self.relayed_output_tokens // self.token_bytes_max)
            if completion < output_floor or prompt < prompt_floor:
                # The cached count is the upstream's too: not trusted once its counts are not.
                charged_prompt, charged_output = max(prompt, prompt_floor), max(completion, output_floor)
                return Settlement(
                    "settle", charged_prompt + charged_output, "below_relayed", charged_prompt, charged_output
                )
            cached = cached_prompt_tokens(self.usage, prompt)
            return Settlement("settle", prompt + completion, None, prompt, completion, cached)
        disagreement: Disagreement | None = None
        if self.usage is not None:
            disagreement = "malformed"
        elif self.completed:
            disagreement = "missing"
        output = self.relayed_output_tokens if self.exact_output_tokens is None else self.exact_output_tokens
        own = self.prompt_tokens_estimate + output  # upper bounds both (or exact): never undercharged
        parts = (self.prompt_tokens_estimate, output)
        if self.relayed_output_tokens or self.responded:
            # The prompt was processed and this much output reached the client.
            return Settlement("settle", own, disagreement, *parts)
        if self.client_gone:
            # Streams: the upstream saw the prompt before the client left.
            # Non-streamed: it was generating and its count never reached us.
            if self.stream:
                return Settlement("settle", own, disagreement, *parts)
            return Settlement("charge_hold", 0, disagreement)
        return Settlement("release", 0, disagreement)  # the upstream failed before any output
