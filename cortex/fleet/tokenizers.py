"""The tokenizers neurons advertise: which to fetch, which cortex holds. Pure state, no I/O, no clock.

A neuron's kernel model advertises its tokenizer files in `/v1/models`
(`tokenizer: {..., "sha256", "url"}`, cortex/fleet/kinds/neuron.py). The
poller (cortex/fleet/health.py) asks this store, after each poll, which
advertised sha256s to fetch now, fetches each in the background (bounded
in size and time), checks the bytes against the sha256, loads them
(common/chat_template.py `files_from_document`) and builds the model's
exact counter (cortex/budget/exact_count.py) in a worker thread, then hands
the counter here. A request never waits on any of it: until the counter is
held, the byte bound holds.

Rules:

* **Once per sha256.** A held sha256 is never fetched again, whichever
  neurons or models advertise it; at most FETCHES_AT_ONCE fetches run at
  once, one per sha256.
* **Failures back off**: a failed fetch (no answer, a wrong sha256, files
  that do not load) is retried after RETRY_S_MIN, doubling to RETRY_S_MAX.
* **Bounded**: at most HELD_MAX tokenizers held or being fetched; a sha256
  no node advertises any more is dropped at the next poll.
* **Agreement** (Fleet.tokenizer_sha256): a model is counted exactly only
  when every node its limits come from advertises the same sha256; two that
  differ (or one that advertises none) fall back to the byte bound, and the
  poller logs the disagreement once, when it begins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HELD_MAX = 32
FETCHES_AT_ONCE = 2
FETCH_TIMEOUT_S = 60.0  # the whole document, up to common/chat_template.py LIMIT_DOCUMENT_BYTES
RETRY_S_MIN = 30.0
RETRY_S_MAX = 3600.0
ERROR_CHARS_MAX = 500


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float


class TokenizerStore:
    """sha256 -> the exact counter built from that document; and what is being fetched or waits to retry."""

    def __init__(self, held_max: int = HELD_MAX, fetches_at_once: int = FETCHES_AT_ONCE) -> None:
        assert held_max >= 1 and fetches_at_once >= 1
        self.held_max = held_max
        self.fetches_at_once = fetches_at_once
        self._held: dict[str, Any] = {}
        self._fetching: set[str] = set()
        self._failed: dict[str, _Failure] = {}
        self._conflicts: dict[str, tuple[str | None, ...]] = {}  # model -> the sha256s last reported

    def held(self, sha256: str | None) -> Any | None:
        return self._held.get(sha256) if sha256 is not None else None

    def state(self, sha256: str) -> str:
        """held | fetching | failed | wanted."""
        if sha256 in self._held:
            return "held"
        if sha256 in self._fetching:
            return "fetching"
        return "failed" if sha256 in self._failed else "wanted"

    def last_error(self, sha256: str) -> str | None:
        failure = self._failed.get(sha256)
        return failure.error if failure is not None else None

    # --- the fetch cycle -------------------------------------------------------------

    def due(self, advertised: Iterable[str], now: float) -> list[str]:
        """Of the advertised sha256s, those to fetch now, each marked as being fetched: not held,
        not in flight, not waiting out a retry, within FETCHES_AT_ONCE and HELD_MAX."""
        due = []
        for sha256 in sorted(set(advertised)):
            if len(self._fetching) >= self.fetches_at_once or len(self._held) + len(self._fetching) >= self.held_max:
                break
            failure = self._failed.get(sha256)
            if sha256 in self._held or sha256 in self._fetching or (failure is not None and now < failure.retry_at):
                continue
            self._fetching.add(sha256)
            due.append(sha256)
        return due

    def fetched(self, sha256: str, counter: Any) -> None:
        assert sha256 in self._fetching and sha256 not in self._held and counter is not None
        self._fetching.discard(sha256)
        self._failed.pop(sha256, None)
        self._held[sha256] = counter

    def fetch_failed(self, sha256: str, error: str, now: float) -> float:
        """Record a failed fetch; the seconds until it is tried again."""
        assert sha256 in self._fetching
        self._fetching.discard(sha256)
        attempts = self._failed[sha256].attempts + 1 if sha256 in self._failed else 1
        delay_s = min(RETRY_S_MAX, RETRY_S_MIN * 2 ** min(attempts - 1, 32))
        self._failed[sha256] = _Failure(error[:ERROR_CHARS_MAX], attempts, now + delay_s)
        return delay_s

    def abandoned(self, sha256: str) -> None:
        """A fetch cancelled before it finished (shutdown): neither held nor failed."""
        self._fetching.discard(sha256)

    def retain(self, advertised: Iterable[str]) -> list[str]:
        """Drop what no node advertises any more; the held sha256s dropped."""
        keep = set(advertised)
        dropped = [s for s in self._held if s not in keep]
        for sha256 in dropped:
            del self._held[sha256]
        for sha256 in [s for s in self._failed if s not in keep]:
            del self._failed[sha256]
        return dropped

    # --- disagreement ----------------------------------------------------------------

    def conflicts_changed(self, conflicts: Mapping[str, tuple[str | None, ...]]) -> tuple[dict[str, tuple[str | None, ...]], list[str]]:
        """(conflicts new or changed since the last call, models whose conflict ended): each logged once."""
        new = {m: shas for m, shas in conflicts.items() if self._conflicts.get(m) != shas}
        ended = sorted(m for m in self._conflicts if m not in conflicts)
        self._conflicts = dict(conflicts)
        return new, ended
