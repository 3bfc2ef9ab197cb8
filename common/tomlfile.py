"""Reading a TOML file, with errors a person can act on (shared by config, catalogue and scenarios)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file, or `error` saying which `what` could not be read and why."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None
