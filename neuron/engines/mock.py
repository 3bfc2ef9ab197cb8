"""The deterministic mock engine.

The reply is a pure function of (engine seed, request seed, rendered
prompt, token limit, stop sequences): the same request always gets the
same text. Each token is one ASCII byte, which keeps the byte-level
tokenizer exact in both directions. Pacing (time to first token, then a
fixed interval per token) is separate from the text, so the simulator can
run the same engine in virtual time.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import trio

WORDS = (
    "the", "quick", "model", "serves", "tokens", "under", "a", "hard", "budget", "and",
    "every", "request", "settles", "exactly", "once", "while", "neurons", "stream", "text",
    "to", "clients", "over", "trio", "nurseries", "with", "no", "orphan", "tasks", "so",
    "spend", "never", "passes", "its", "cap", "even", "when", "hosts", "fail", "or",
    "agents", "fan", "out", "thousands", "of", "calls", "at", "once", "gateway", "ledger",
)


@dataclass(frozen=True)
class Pacing:
    ttft_s: float = 0.0
    token_interval_s: float = 0.0

    def token_due(self, start: float, index: int) -> float:
        """When token `index` (0-based) may be emitted, on the same clock as `start`."""
        return start + self.ttft_s + index * self.token_interval_s


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" or "length"

    @property
    def tokens(self) -> int:
        return len(self.text)  # ASCII only: one byte, one token


def _rng(engine_seed: int, request_seed: int | None, prompt: str) -> random.Random:
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=16)
    digest.update(engine_seed.to_bytes(8, "little", signed=True))
    digest.update((request_seed or 0).to_bytes(8, "little", signed=True))
    return random.Random(int.from_bytes(digest.digest(), "little"))


def reply_text(engine_seed: int, request_seed: int | None, prompt: str, length: int) -> str:
    rng = _rng(engine_seed, request_seed, prompt)
    words: list[str] = []
    size = -1  # the first word has no separating space
    while size < length:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    text = " ".join(words)
    assert len(text) >= length
    return text[:length].capitalize()


def plan_reply(
    engine_seed: int,
    request_seed: int | None,
    prompt: str,
    natural_tokens: int,
    limit_tokens: int,
    stop: list[str],
) -> Reply:
    """The whole reply: a natural length cut by the token limit, then by `stop`."""
    assert natural_tokens >= 0 and limit_tokens >= 0
    length = min(natural_tokens, limit_tokens)
    text = reply_text(engine_seed, request_seed, prompt, length)
    finish = "length" if limit_tokens < natural_tokens else "stop"
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    return Reply(text, finish)


@dataclass(frozen=True)
class MockEngine:
    seed: int = 0
    reply_tokens: int = 256
    pacing: Pacing = Pacing()

    name = "mock"

    def plan(self, request_seed: int | None, prompt: str, limit_tokens: int, stop: list[str]) -> Reply:
        return plan_reply(self.seed, request_seed, prompt, self.reply_tokens, limit_tokens, stop)

    async def wait_for_token(self, start: float, index: int) -> None:
        """Pace token `index`; always a checkpoint, so cancellation lands at once."""
        due = self.pacing.token_due(start, index)
        if due > trio.current_time():
            await trio.sleep_until(due)
        else:
            await trio.lowlevel.checkpoint()
