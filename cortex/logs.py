"""Structured logs: one JSON object per line on stderr.

Request lines carry the request id that is also returned to the client in
`x-request-id`. Keys and tokens are never passed to these functions.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_logger = logging.getLogger("cortex")


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {"message": record.getMessage()}
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), **fields}
        return json.dumps(line, separators=(",", ":"), default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    if _logger.isEnabledFor(level):
        _logger.log(level, name, extra={"fields": {"event": name, **fields}})

