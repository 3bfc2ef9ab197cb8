"""What a request actually used, and how its hold must be resolved. Pure.

The rule: charge observed usage whenever it can be observed, capped at the
hold by the ledger. Release when the neuron never produced anything for
the client (it was never reached, refused, or failed before any token).
Charge the whole hold only when usage happened but cannot be observed (a
non-streamed request whose client left: the neuron was working and its
count never reached us).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Action = Literal["settle", "release", "charge_hold"]


def usage_total(usage: dict[str, Any]) -> int | None:
    """prompt + completion tokens from an OpenAI usage object, if well-formed."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        return prompt + completion
    return None


@dataclass
class Meter:
    stream: bool
    prompt_tokens_estimate: int
    usage: dict[str, Any] | None = None  # the neuron's own count, when it arrived
    streamed_tokens: int = 0  # output tokens relayed to the client (stream)
    dispatched: bool = False  # handed to a neuron, which may be working on it
    client_gone: bool = False

    def settlement(self) -> tuple[Action, int]:
        if self.usage is not None:
            total = usage_total(self.usage)
            if total is not None:
                return "settle", total
        if not self.dispatched:
            return "release", 0
        if self.stream:
            if self.streamed_tokens or self.client_gone:
                # The prompt was processed and these tokens were produced.
                return "settle", self.prompt_tokens_estimate + self.streamed_tokens
            return "release", 0  # the upstream failed before any token
        return ("charge_hold", 0) if self.client_gone else ("release", 0)
