"""Budget alerts, the pure core: rules, threshold crossing, event payloads, signatures.

No I/O and no clock: every function that needs the time takes `now` (POSIX
seconds). The Trio shell (`cortex.budget.alert_delivery`) makes the
decisions durable and delivers the events.

Rules come from `[[alerts]]` in the config (`parse_alert_rules`). For one
principal (a key or an account) at `now`, the caller lists a `CapLevel` per
cap that has a limit; `evaluate` compares them with what has already fired
and returns `Fire` and `Rearm` decisions. With `fraction = spent / limit`,
a key `(rule, principal kind, principal id, cap, threshold)` is *fired* when
`fired` maps it to the level's current epoch, and:

- period caps (`period_*`): fire when `fraction >= t` and the key has not
  fired in this epoch (the period id). A stored epoch from another period is
  a past period: the key is re-armed implicitly, and the `Fire` overwrites
  it. So: at most once per threshold per calendar period.
- balance caps (`balance_*`): the epoch is the balance's limit, so each
  level of the balance (a top-up, a raised limit) is an epoch of its own:
  fire when `fraction >= t` and not fired at this limit.
- window caps (`window_*`, sliding): fire when `fraction >= t` and not
  fired; `Rearm` when fired and `fraction < t / 2`. The hysteresis gives one
  alert per window fill, with no flapping around the threshold.

Several thresholds crossed by one charge each fire, one event each, lowest
first. Decisions come out in rule order, then level order, then threshold
order. The caller must record its decisions in its `fired` map
(`record_fired`) before it awaits anything, so that two evaluations racing
for the same principal cannot both fire.

The event (a JSON-serialisable dict) carries money both as USD (a JSON
number, for people) and as exact integer micro-USD (for programs).

`sign` and `verify` implement the `x-cortex-signature` header:
`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`. Receivers
can copy `verify`; it compares in constant time and refuses timestamps more
than `tolerance_s` away from its `now`.

`backoff_s` is deterministic (1, 2, 4, ... capped at 300 s) with no jitter:
an outbox holds few events per receiver, and a deterministic schedule is
what the tests and the simulator can reason about.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

THRESHOLDS_DEFAULT = (0.5, 0.8, 0.95, 1.0)
CAPS = ("balance_tokens", "balance_usd", "window_tokens", "window_usd", "period_tokens", "period_usd")
PRINCIPAL_KINDS = ("key", "account")
EVENT_TYPE = "budget.threshold_crossed"
SIGNATURE_HEADER = "x-cortex-signature"
SIGNATURE_TOLERANCE_S = 300
BACKOFF_MAX_S = 300.0
RULES_MAX = 64
THRESHOLDS_MAX = 16
PRINCIPALS_MAX = 10_000
URL_LENGTH_MAX = 2048
SECRET_LENGTH_MAX = 4096

_RULE_KEYS = frozenset({"name", "url", "thresholds", "principals", "caps", "secret", "secret_env"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MICRO_PER_USD = 1_000_000

FiredKey = tuple[str, str, str, str, float]  # (rule_id, principal_kind, principal_id, cap, threshold)


class AlertConfigError(ValueError):
    """A bad `[[alerts]]` table; the message names the key, e.g. 'alerts[1].thresholds'."""


# --- rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRule:
    id: str
    url: str
    thresholds: tuple[float, ...] = THRESHOLDS_DEFAULT
    principals: frozenset[str] | None = None  # "key:<id>" / "account:<id>"; None: all
    caps: frozenset[str] | None = None  # None: all
    secret: str | None = None

    def __post_init__(self) -> None:
        assert self.thresholds and list(self.thresholds) == sorted(set(self.thresholds))
        assert all(0 < t <= 1 for t in self.thresholds)
        assert self.caps is None or self.caps <= frozenset(CAPS)

    def applies(self, kind: str, principal_id: str, cap: str) -> bool:
        if self.caps is not None and cap not in self.caps:
            return False
        return self.principals is None or f"{kind}:{principal_id}" in self.principals

    def __repr__(self) -> str:  # never show the secret
        secret = "set" if self.secret else None
        return f"AlertRule(id={self.id!r}, url={self.url!r}, thresholds={self.thresholds!r}, secret={secret})"


def parse_alert_rules(raw: Any, environ: Mapping[str, str]) -> tuple[AlertRule, ...]:
    """The rules of `[[alerts]]` (a list of tables, or None for none)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise AlertConfigError(f"'alerts' must be a list of tables ([[alerts]]), got {raw!r}")
    if len(raw) > RULES_MAX:
        raise AlertConfigError(f"'alerts' has {len(raw)} rules; at most {RULES_MAX}")
    rules: list[AlertRule] = []
    for index, entry in enumerate(raw):
        rule = _parse_rule(f"alerts[{index}]", index, entry, environ)
        if any(r.id == rule.id for r in rules):
            raise AlertConfigError(
                f"'alerts[{index}].name': {rule.id!r} is used by an earlier rule"
                + (" (two unnamed rules with one url: give them names)" if entry.get("name") is None else "")
            )
        rules.append(rule)
    return tuple(rules)


def _parse_rule(where: str, index: int, entry: dict[str, Any], environ: Mapping[str, str]) -> AlertRule:
    for name in entry:
        if name not in _RULE_KEYS:
            raise AlertConfigError(f"unknown key '{where}.{name}' (known: {', '.join(sorted(_RULE_KEYS))})")
    url = _parse_url(where, entry.get("url"))
    return AlertRule(
        id=_parse_name(where, entry.get("name"), url),
        url=url,
        thresholds=_parse_thresholds(where, entry.get("thresholds")),
        principals=_parse_principals(where, entry.get("principals")),
        caps=_parse_caps(where, entry.get("caps")),
        secret=_parse_secret(where, entry.get("secret"), entry.get("secret_env"), environ),
    )


def _parse_name(where: str, name: Any, url: str) -> str:
    if name is None:
        # Stable under edits to the list: fired state and queued events follow the rule, not its position.
        return f"alert-{hashlib.sha256(url.encode()).hexdigest()[:10]}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AlertConfigError(
            f"'{where}.name' must be 1 to 64 letters, digits, '_', '.' or '-' (starting with a letter or digit),"
            f" got {name!r}"
        )
    return name


def _parse_url(where: str, url: Any) -> str:
    if not isinstance(url, str):
        raise AlertConfigError(f"'{where}.url' is required and must be a string, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # raises on a bad port
    except ValueError:
        parts = None
    if (
        parts is None or parts.scheme not in ("http", "https") or not parts.hostname
        or len(url) > URL_LENGTH_MAX or any(c.isspace() or ord(c) < 32 for c in url)
    ):
        raise AlertConfigError(f"'{where}.url': {url!r} must be an http:// or https:// URL with a host")
    return url


def _parse_thresholds(where: str, value: Any) -> tuple[float, ...]:
    if value is None:
        return THRESHOLDS_DEFAULT
    key = f"{where}.thresholds"
    if not isinstance(value, list) or not value or len(value) > THRESHOLDS_MAX:
        raise AlertConfigError(f"'{key}' must be a list of 1 to {THRESHOLDS_MAX} fractions, got {value!r}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
            raise AlertConfigError(f"'{key}': each threshold must be a fraction of the cap in (0, 1], got {t!r}")
    thresholds = tuple(sorted(float(t) for t in value))
    if len(set(thresholds)) != len(thresholds):
        raise AlertConfigError(f"'{key}' lists a threshold twice: {value!r}")
    return thresholds


def _parse_principals(where: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    key = f"{where}.principals"
    if not isinstance(value, list) or len(value) > PRINCIPALS_MAX:
        raise AlertConfigError(f"'{key}' must be a list of \"key:<id>\" or \"account:<id>\", got {value!r}")
    for p in value:
        kind, sep, principal_id = p.partition(":") if isinstance(p, str) else ("", "", "")
        if not sep or kind not in PRINCIPAL_KINDS or not principal_id:
            raise AlertConfigError(f"'{key}': {p!r} must be \"key:<id>\" or \"account:<id>\"")
    return frozenset(value)


def _parse_caps(where: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    key = f"{where}.caps"
    if not isinstance(value, list) or not value:
        raise AlertConfigError(f"'{key}' must be a non-empty list of cap names ({', '.join(CAPS)}), got {value!r}")
    for cap in value:
        if cap not in CAPS:
            raise AlertConfigError(f"'{key}': {cap!r} is not a cap (known: {', '.join(CAPS)})")
    return frozenset(value)


def _parse_secret(where: str, secret: Any, secret_env: Any, environ: Mapping[str, str]) -> str | None:
    if secret is not None and secret_env is not None:
        raise AlertConfigError(f"'{where}': set 'secret' or 'secret_env', not both")
    if secret_env is not None:
        if not isinstance(secret_env, str) or not _ENV_NAME.fullmatch(secret_env):
            raise AlertConfigError(f"'{where}.secret_env' must be an environment variable name, got {secret_env!r}")
        if secret_env not in environ:
            raise AlertConfigError(f"'{where}.secret_env': the secret is read from ${secret_env}, which is not set")
        secret, key = environ[secret_env], f"{where}.secret_env"
    else:
        key = f"{where}.secret"
    if secret is None:
        return None
    if not isinstance(secret, str) or not secret or len(secret) > SECRET_LENGTH_MAX:
        # Never echo the value: it is a secret.
        raise AlertConfigError(f"'{key}' must be a non-empty string of at most {SECRET_LENGTH_MAX} characters")
    return secret


# --- evaluation -------------------------------------------------------------------------


@dataclass(frozen=True)
class CapLevel:
    cap: str  # one of CAPS
    spent: int  # tokens, or micro-USD for *_usd caps
    limit: int  # > 0
    epoch: str  # period caps: the period id (e.g. "monthly:2026-12-01@UTC"); balance caps: the limit; windows ""
    period: dict | None = None  # period caps: {"kind", "timezone", "start", "end", "id"} for the event
    window_s: float | None = None  # window caps
    # The cap refused a request in this epoch: it is spent for all practical purposes, though
    # charged spend may stay below the limit by up to one hold. Counts as a fraction of 1.
    exhausted: bool = False

    def __post_init__(self) -> None:
        assert self.cap in CAPS, self.cap
        assert self.limit > 0 and self.spent >= 0, (self.limit, self.spent)
        assert bool(self.epoch) != self.cap.startswith("window_"), (self.cap, self.epoch)
        assert self.window_s is None or self.cap.startswith("window_")

    @property
    def fraction(self) -> float:
        return 1.0 if self.exhausted else self.spent / self.limit


@dataclass(frozen=True)
class Fire:
    key: FiredKey
    epoch: str
    event: dict  # the JSON payload; has "id"


@dataclass(frozen=True)
class Rearm:
    key: FiredKey


Decision = Fire | Rearm


def evaluate(
    rules: Sequence[AlertRule],
    kind: str,
    principal_id: str,
    levels: Sequence[CapLevel],
    fired: Mapping[FiredKey, str],
    now: float,
    new_event_id: Callable[[], str],
) -> list[Decision]:
    """What to fire and re-arm for one principal at `now` (see the module docstring)."""
    assert kind in PRINCIPAL_KINDS, kind
    decisions: list[Decision] = []
    for rule in rules:
        for level in levels:
            if rule.applies(kind, principal_id, level.cap):
                decisions.extend(_decide(rule, kind, principal_id, level, fired, now, new_event_id))
    return decisions


def _decide(
    rule: AlertRule, kind: str, principal_id: str, level: CapLevel, fired: Mapping[FiredKey, str], now: float,
    new_event_id: Callable[[], str],
) -> list[Decision]:
    decisions: list[Decision] = []
    fraction = level.fraction
    for threshold in rule.thresholds:  # ascending: lowest first
        key: FiredKey = (rule.id, kind, principal_id, level.cap, threshold)
        stored = fired.get(key)
        if fraction >= threshold:
            if stored != level.epoch:
                event = alert_event(rule.id, kind, principal_id, level, threshold, now, new_event_id())
                decisions.append(Fire(key, level.epoch, event))
        elif stored is not None and level.cap.startswith("window_") and fraction < threshold / 2:
            decisions.append(Rearm(key))
    return decisions


def record_fired(fired: MutableMapping[FiredKey, str], decisions: Sequence[Decision]) -> None:
    """Apply `decisions` to the caller's in-memory fired map."""
    for decision in decisions:
        if isinstance(decision, Fire):
            fired[decision.key] = decision.epoch
        else:
            fired.pop(decision.key, None)


def alert_event(
    rule_id: str, kind: str, principal_id: str, level: CapLevel, threshold: float, now: float, event_id: str
) -> dict[str, Any]:
    assert event_id
    usd = level.cap.endswith("_usd")
    event: dict[str, Any] = {
        "id": event_id,
        "type": EVENT_TYPE,
        "alert": rule_id,
        "principal": {"kind": kind, "id": principal_id},
        "cap": level.cap,
        "threshold": threshold,
        "unit": "usd" if usd else "tokens",
        "spent": level.spent / _MICRO_PER_USD if usd else level.spent,
        "limit": level.limit / _MICRO_PER_USD if usd else level.limit,
        "fraction": round(level.fraction, 6),
        "exhausted": level.exhausted,
        "period": dict(level.period) if level.period is not None else None,
        "window_seconds": float(level.window_s) if level.window_s is not None else None,
        "time": iso_utc(now),
    }
    if usd:
        event["spent_micro_usd"] = level.spent
        event["limit_micro_usd"] = level.limit
    return event


def iso_utc(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- signatures and retries -------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `x-cortex-signature` header value for `body` sent at `timestamp`."""
    assert secret and isinstance(timestamp, int)
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S) -> bool:
    """True when `header` signs `body` with `secret` at a time within `tolerance_s` of `now`."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode()
    # Check every candidate: the time taken does not depend on which matched.
    matches = [hmac.compare_digest(expected, c.encode("utf-8", "replace")) for c in candidates]
    return any(matches)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def backoff_s(attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt: 1, 2, 4, ... s, at most BACKOFF_MAX_S."""
    assert attempts >= 1, attempts
    return min(BACKOFF_MAX_S, 2.0 ** min(attempts - 1, 16))
