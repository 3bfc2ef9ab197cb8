"""cortex's one typed configuration, read from TOML and overridden by flags.

Every value is validated at start-up; an error names the bad key
(`fleet.poll_interval_s`), says what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import tomlfile
from common.serving import parse_listen
from cortex.fleet.kinds import KINDS


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 4 * 1024 * 1024
    graceful_timeout_s: float = 30.0
    # The kernel caps it at net.core.somaxconn; a burst past it is reset or SYN-retried.
    backlog: int = 4096
    # Longer than client pools keep idle connections (httpx 5 s, undici 4 s,
    # aiohttp 15 s), so the client closes first and never reuses a dying one.
    keep_alive_timeout_s: float = 75.0
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (then 408)
    body_buffer_max_bytes: int = 128 * 1024 * 1024  # request bodies buffered at once, all requests; past it, 503
    client_write_timeout_s: float = 30.0  # longest a response write may block on a client that does not read
    # Anthropic streams: a ping after this much silence (Claude Code gives up after 300 s without a byte).
    stream_ping_interval_s: float = 10.0
    reuse_port: bool = False  # share `listen` with other processes (SO_REUSEPORT): set by `--workers N`


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout_s: float = 5.0
    # Until the neuron's response headers arrive; for a non-streaming
    # request that is the whole generation, so it is generous.
    first_byte_timeout_s: float = 600.0
    # Longest silence between two body chunks. Not a total deadline:
    # long streams are legitimate.
    idle_timeout_s: float = 60.0
    max_idle_connections_per_neuron: int = 1024
    max_response_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream server: where, what kind, its own key (by env var name) and its models."""

    url: str
    kind: str = "neuron"
    api_key_env: str | None = None  # the variable holding the upstream's key; the key itself is never in config
    models: tuple[str, ...] | None = None  # serve only these of what it lists; None: all


@dataclass(frozen=True)
class FleetConfig:
    neurons: tuple[str, ...] = ()  # shorthand for upstreams of kind "neuron"
    upstreams: tuple[UpstreamSpec, ...] = ()
    poll_interval_s: float = 2.0
    poll_timeout_s: float = 2.0
    unhealthy_after_failures: int = 2
    # Limits for models whose server reports none (Ollama, plain OpenAI-compatible ones).
    default_context_tokens: int = 8192
    default_output_tokens: int = 4096
    # Requests one key may have in flight on one model at once, so one agent's
    # fan-out cannot take every slot of a replica; 0: no limit.
    max_in_flight_per_key: int = 0
    models_file: str = ""  # the model catalogue (models.toml): limits, prices, aliases; empty: none
    # Cold loads (catalogue models with memory_mb, on neurons): a load's deadline, and how long an
    # eviction lets the victim's in-flight requests (other replicas') drain before it cuts them.
    load_timeout_s: float = 600.0
    unload_drain_s: float = 30.0

    def all_upstreams(self) -> tuple[UpstreamSpec, ...]:
        return tuple(UpstreamSpec(url) for url in self.neurons) + self.upstreams


@dataclass(frozen=True)
class BudgetConfig:
    data_dir: str = ".cortex"
    auth_required: bool = True
    hold_ttl_s: float = 600.0  # a hold older than this is resolved by expiry
    expiry_interval_s: float = 5.0
    fallback_output_tokens: int = 4096  # when a model's limits are unknown
    # SQLite durability in WAL mode: "normal" survives a process crash (kill -9),
    # "full" a power cut too, at about +0.25 ms per request (docs/BENCHMARKS.md).
    synchronous: str = "normal"
    ledger_timeout_s: float = 5.0  # bound on each ledger write a request waits for (its hold; its settlement)
    retry_hint_s: float = 1.0  # Retry-After when in-flight requests, not window usage, are in the way
    # A key with a money cap asking for a model with no price: "refuse" (403) or "free" (no money cost).
    unpriced: str = "refuse"
    period_timezone: str = "UTC"  # calendar periods' zone when a cap does not name one
    alert_timeout_s: float = 10.0  # one webhook delivery attempt
    alert_retry_for_s: float = 86400.0  # an alert undelivered this long is given up (counted)
    alert_outbox_max: int = 10000  # undelivered alerts kept; past it the oldest are dropped (counted)
    # The shared ledger of many replicas: a postgresql:// URL (the password in PGPASSWORD or .pgpass,
    # never in the URL), or "sqlite:PATH" for the workers of one host (what --workers N uses without
    # a URL). Empty: the data dir's SQLite, judged in one process's memory.
    # Output holds: "worst_case" holds a request's whole output bound before dispatch; "incremental"
    # holds the prompt and a first slice, then extends the hold a slice at a time as tokens stream, and
    # ends the reply early (finish_reason "length") when a cap refuses the next slice. Keys and
    # accounts may choose their own (their limits' output_holds).
    output_holds: str = "worst_case"
    output_slice_tokens: int = 1024
    ledger: str = ""
    replica_id: str = ""  # this replica's name in a shared ledger (default: the host's); the pid and a random part are added
    lease_s: float = 30.0  # a dead replica's holds are reaped this long after its last heartbeat


@dataclass(frozen=True)
class AdminConfig:
    token: str = ""  # empty: the admin API is off


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    alerts: tuple[Any, ...] = ()  # [[alerts]]: cortex.budget.alerts.AlertRule


LOG_LEVELS = ("debug", "info", "warning", "error")
OUTPUT_HOLDS = ("worst_case", "incremental")
SQLITE_LEDGER = "sqlite:"  # budget.ledger = "sqlite:PATH": a SQLite file shared by the workers of one host
INT_MAX = 2**40  # far above any sane size or count
SECONDS_MAX = 7 * 24 * 3600.0  # also refuses nan and inf


def _check_value(key: str, value: Any, default: Any) -> Any:
    """Coerce and check `value` against the type of its default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= INT_MAX:
            raise ConfigError(f"'{key}' must be an integer from 1 to {INT_MAX}, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= SECONDS_MAX:
            raise ConfigError(f"'{key}' must be a number of seconds in (0, {SECONDS_MAX:g}], got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"'{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def _upstreams(key: str, value: Any) -> tuple[UpstreamSpec, ...]:
    """`[[fleet.upstreams]]`: tables of url, kind, api_key_env, models."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'{key}' must be a list of tables ([[{key}]]), got {value!r}")
    specs = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(entry, UpstreamSpec):
            specs.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"'{where}' must be a table, got {entry!r}")
        known = {f.name for f in dataclasses.fields(UpstreamSpec)}
        for name in entry:
            if name not in known:
                raise ConfigError(f"unknown key '{where}.{name}' (known: {', '.join(sorted(known))})")
        url, kind = entry.get("url"), entry.get("kind", "neuron")
        if not isinstance(url, str):
            raise ConfigError(f"'{where}.url' is required and must be a string")
        if kind not in KINDS:
            raise ConfigError(f"'{where}.kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        env = entry.get("api_key_env")
        if env is not None and (not isinstance(env, str) or not env.isidentifier()):
            raise ConfigError(f"'{where}.api_key_env' must be an environment variable name, got {env!r}")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
            raise ConfigError(f"'{where}.models' must be a list of model names, got {models!r}")
        specs.append(UpstreamSpec(url, kind, env, tuple(models) if models is not None else None))
    return tuple(specs)


def _section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"'{name}' must be a table, got {values!r}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key '{name}.{key}' (known: {', '.join(sorted(known))})")
        if (name, key) == ("fleet", "upstreams"):
            checked[key] = _upstreams(f"{name}.{key}", value)
        else:
            checked[key] = _check_value(f"{name}.{key}", value, getattr(defaults, key))
    return dataclasses.replace(defaults, **checked)


SECTIONS = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "fleet": FleetConfig,
    "budget": BudgetConfig,
    "admin": AdminConfig,
    "log": LogConfig,
}


def from_mapping(data: dict[str, Any]) -> Config:
    """Build a validated Config from a TOML-shaped mapping."""
    for name in data:
        if name not in SECTIONS and name != "alerts":
            raise ConfigError(f"unknown section '{name}' (known: {', '.join(SECTIONS)}, alerts)")
    config = Config(
        **{name: _section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()},
        alerts=_alerts(data.get("alerts")),
    )
    validate(config)
    return config


def _alerts(raw: Any) -> tuple[Any, ...]:
    from cortex.budget.alerts import AlertConfigError, parse_alert_rules

    if raw is None:
        return ()
    if isinstance(raw, tuple):  # already parsed (a Config being rebuilt)
        return raw
    try:
        return parse_alert_rules(raw, os.environ)
    except AlertConfigError as exc:
        raise ConfigError(str(exc)) from None


def validate(config: Config) -> None:
    try:
        parse_listen(config.server.listen)
    except ValueError as exc:
        raise ConfigError(f"'server.listen': {exc}") from None
    seen: set[str] = set()
    where = [("fleet.neurons", UpstreamSpec(url)) for url in config.fleet.neurons]
    where += [(f"fleet.upstreams[{i}].url", spec) for i, spec in enumerate(config.fleet.upstreams)]
    for key, spec in where:
        url = spec.url
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or any(c.isspace() for c in url):
            raise ConfigError(f"'{key}': {url!r} must be an http:// or https:// URL with a host")
        if spec.api_key_env is not None and not os.environ.get(spec.api_key_env):
            raise ConfigError(f"'{key}': the key for {url} is read from ${spec.api_key_env}, which is not set")
        if url.rstrip("/") in seen:
            raise ConfigError(f"'{key}': {url!r} is listed twice")
        seen.add(url.rstrip("/"))
    if config.fleet.models_file:
        from cortex.fleet.catalogue import CatalogueError, load

        try:
            load(config.fleet.models_file)
        except CatalogueError as exc:
            raise ConfigError(f"'fleet.models_file': {exc}") from None
    if not config.admin.token.isascii():
        raise ConfigError("'admin.token' must be ASCII")
    if any(c.isspace() or not c.isprintable() for c in config.admin.token):
        raise ConfigError("'admin.token' must not contain whitespace or control characters")
    if config.budget.unpriced not in ("refuse", "free"):
        raise ConfigError(f"'budget.unpriced' must be refuse or free, got {config.budget.unpriced!r}")
    from cortex.budget.periods import PeriodError, parse_period_spec

    try:
        parse_period_spec("daily", config.budget.period_timezone)
    except PeriodError as exc:
        raise ConfigError(f"'budget.period_timezone': {exc}") from None
    if config.budget.ledger.startswith(SQLITE_LEDGER):
        if not config.budget.ledger[len(SQLITE_LEDGER):]:
            raise ConfigError("'budget.ledger': sqlite: needs the ledger file's path, as sqlite:/path/ledger.db")
    elif config.budget.ledger:
        from cortex.budget.pg_schema import LedgerUrlError, ledger_url

        try:
            ledger_url(config.budget.ledger)
        except LedgerUrlError as exc:
            raise ConfigError(f"'budget.ledger': {exc}") from None
    if config.budget.output_holds not in OUTPUT_HOLDS:
        raise ConfigError(f"'budget.output_holds' must be one of {', '.join(OUTPUT_HOLDS)}, got {config.budget.output_holds!r}")
    if config.budget.synchronous not in ("normal", "full", "extra"):
        raise ConfigError(f"'budget.synchronous' must be normal, full or extra, got {config.budget.synchronous!r}")
    if config.admin.token and len(config.admin.token) < 16:
        raise ConfigError("'admin.token' must be at least 16 characters")
    if config.log.level not in LOG_LEVELS:
        raise ConfigError(f"'log.level' must be one of {', '.join(LOG_LEVELS)}, got {config.log.level!r}")


def load(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read `path` (if any), then apply flag overrides, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = tomlfile.read(path, "config file", ConfigError)
    for section, values in (overrides or {}).items():
        current = data.get(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"'{section}' must be a table, got {current!r}")
        merged = dict(current)
        merged.update({k: v for k, v in values.items() if v is not None})
        data[section] = merged
    return from_mapping(data)
