"""API keys: generated once, stored only as a hash.

Lookup is by the SHA-256 of the presented key. The time a lookup takes
depends on that digest, never on how many leading characters of a real
key were guessed right, so it leaks nothing useful; the final comparison
is `hmac.compare_digest` all the same.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk-cx-"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_prefix(key: str) -> str:
    """The part safe to show again: enough to recognise a key, useless to use it."""
    return key[: len(KEY_PREFIX) + 4] + "…"


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def presented_key(headers: dict[str, str]) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI SDK) or `x-api-key: <key>` (Anthropic SDK)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None
