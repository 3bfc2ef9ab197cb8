"""The run's trace: one JSON object per event, hashed with SHA-256.

Only deterministic facts go in (virtual times, the simulator's own request
ids, amounts), never cortex's random hold ids or wall-clock times, so the
same scenario and seed give a byte-identical trace in any process.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trio

RECENT_EVENTS = 40  # shown when an invariant breaks


class Trace:
    """`t` is virtual seconds since `origin`, the run's start (a scenario's `start`, POSIX seconds)."""

    def __init__(self, origin: float = 0.0) -> None:
        self.origin = origin
        self._hash = hashlib.sha256()
        self.lines: list[str] = []
        self.recent: deque[str] = deque(maxlen=RECENT_EVENTS)
        self.count = 0

    def event(self, ev: str, **fields: Any) -> None:
        line = json.dumps({"t": round(self.now(), 6), "ev": ev, **fields}, separators=(",", ":"), sort_keys=True)
        self._hash.update(line.encode() + b"\n")
        self.lines.append(line)
        self.recent.append(line)
        self.count += 1

    def now(self) -> float:
        """Virtual seconds since the run's start."""
        return trio.current_time() - self.origin

    def at(self, t: float) -> str:
        """Run time `t` as the instant it is on the virtual clock, ISO 8601 UTC to the millisecond."""
        instant = datetime.fromtimestamp(self.origin + t, timezone.utc)
        return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, path: Path) -> None:
        path.write_text("".join(line + "\n" for line in self.lines))
