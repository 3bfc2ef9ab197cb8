"""Scenario files: TOML in, a validated `Scenario` out. Pure.

Every error names the offending key (`workload[1].rate_per_s`). The
format is documented in docs/SIMULATOR.md; the bundled scenarios live in
sim/scenarios/.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common import tomlfile
from cortex.budget.ledger import Caps
from cortex.budget.periods import PeriodError, parse_period_spec
from cortex.budget.pricing import usd_to_micro
from cortex.config import OUTPUT_HOLDS
from cortex.fleet.catalogue import COST_MAX_USD_PER_M
from cortex.fleet.kinds import KINDS

REQUESTS_MAX = 200_000  # a bound on scenario size: the workloads' expected request count
PROMPT_BYTES_MAX = 1_000_000
TOKENS_MAX = 1_000_000
HORIZON_MAX_S = 7 * 24 * 3600.0
WORKLOAD_KINDS = ("burst", "open", "closed")
FAULT_KINDS = ("delay", "drop", "partition", "crash", "cortex_restart", "overload", "reset")
# What each upstream kind reports or does, as far as a scenario may configure it (sim/upstream_kinds.py).
UPSTREAM_KINDS = tuple(KINDS)
ONE_MODEL_KINDS = ("llamacpp", "tgi")  # each server serves exactly one model
OUTPUT_LIMIT_KINDS = ("neuron", "llamacpp")  # report an output limit (limit.output, n_predict); the rest write to the context
LOADING_KINDS = ("vllm", "sglang", "llamacpp", "tgi")  # their health probe says "not ready" while the model loads
TOKEN_BYTES_MAX = 16  # a modelled tokenizer's bytes per token (cortex's bound for real tokenizers is 256)
DEFAULT_TOKEN_BYTES = 4  # non-neuron kinds; neuron's tokenizer is byte-level
OVERLOAD_STATUSES = (429, 503, 529)
NEURON_OUTPUT_TOKENS = 1024  # a neuron's limit.output when the scenario names none
REFUSAL_REASONS = ("insufficient_quota", "rate_limit_exceeded", "invalid_api_key", "context_length_exceeded",
                   "model_not_priced")
# The ledger's refusals by cap, as cortex's metrics name them: the reason, `_usd` when money was short.
CAP_REFUSALS = ("balance", "balance_usd", "window", "window_usd", "period", "period_usd", "concurrency")
USD_CAP_MAX = 10**6  # USD: a scenario's money caps stay far below the ledger's bound
# The virtual clock's start: POSIX seconds from 1970 (the MockClock only runs forwards from 0) to 2999,
# inside what cortex's calendar periods accept with a week of horizon to spare.
START_MAX = datetime(2999, 12, 24, tzinfo=timezone.utc)
CATALOGUE_MODELS_MAX = 1_000  # [[models]] entries: each becomes a catalogue model cortex may load
WORKLOAD_MODELS_MAX = 1_000  # models one workload's demand spreads over
REPLICAS_MAX = 16  # cortex replicas on one shared ledger
REPLY_SIGMA_MAX = 4.0  # a log-normal reply length's spread: beyond it the tail is the clamp, not the distribution


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """A uniform distribution over [low, high] (a constant when equal)."""

    low: float
    high: float
    integer: bool = True

    def sample(self, rng: random.Random) -> float:
        if self.low == self.high:
            return self.low
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        return rng.uniform(self.low, self.high)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class LogNormal:
    """A long-tailed token count: log-normal with this median and sigma (of the log), clamped to
    [low, high]. A mock neuron draws each reply's natural length from it (sim/world.py)."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return min(self.high, max(self.low, round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))))


@dataclass(frozen=True)
class AccountSpec:
    id: str
    caps: Caps


@dataclass(frozen=True)
class KeySpec:
    name: str
    account: str
    caps: Caps


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream server: the real NeuronApp (kind neuron) or a modelled server of another kind."""

    name: str
    kind: str = "neuron"
    models: tuple[str, ...] = ("cortex-mock",)
    ttft_s: float = 0.05
    tokens_per_s: float = 100.0
    slots: int = 64
    queue_depth: int = 1024
    context_tokens: int = 8192
    output_tokens: int | None = None  # limit.output (neuron: NEURON_OUTPUT_TOKENS when None), n_predict (llama.cpp)
    reply_tokens: int | LogNormal = 256  # the mock's natural reply length; a LogNormal: drawn per request (neuron)
    chunk_tokens: int = 8
    token_bytes: int = 1  # bytes per token of its tokenizer: 1 for neuron, DEFAULT_TOKEN_BYTES for the others
    load_s: float = 0.0  # vllm, sglang, llamacpp, tgi: not ready this long after a start; neuron: one API load's time
    memory_mb: float | None = None  # neuron: every loaded (and loading) model together; None: no bound
    model_memory_mb: float = 1024.0  # neuron: what each initially loaded model takes


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    keys: tuple[str, ...]
    at_s: float = 0.0
    count: int = 0  # burst
    rate_per_s: float = 0.0  # open loop
    duration_s: float = 0.0  # open and closed loop
    clients: int = 0  # closed loop
    think_s: Range = Range(0.0, 0.0, False)
    model: str = "cortex-mock"
    models: tuple[str, ...] = ()  # if set: each request asks for one of these, Zipf-distributed (first most)
    zipf_s: float = 1.0  # the Zipf exponent: P(models[k]) ∝ 1 / (k + 1) ** zipf_s
    prompt_bytes: Range = Range(16, 256)
    max_tokens: Range | None = Range(16, 128)
    stream_share: float = 0.5
    cancel_share: float = 0.0
    cancel_after_tokens: Range | None = None
    cancel_after_s: Range | None = None
    honor_retry_after: bool = False
    max_retries: int = 0

    def pick_model(self, rng: random.Random) -> str:
        """The model one request asks for; draws from `rng` only when the demand spreads over models."""
        if not self.models:
            return self.model
        return rng.choices(self.models, cum_weights=_zipf_cum_weights(len(self.models), self.zipf_s))[0]

    def expected_requests(self) -> float:
        if self.kind == "burst":
            return self.count * (1 + self.max_retries)
        if self.kind == "open":
            return self.rate_per_s * self.duration_s * (1 + self.max_retries)
        # Every client sends at least once, however short the run.
        return self.clients * max(1.0, self.duration_s / max(self.think_s.low + 0.01, 0.01))


@functools.lru_cache(maxsize=64)
def _zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1 / (k + 1) ** s for k in range(n)))


@dataclass(frozen=True)
class ModelSpec:
    """A catalogue model (cortex's `[[models]]`): what it takes, how much it is worth keeping, where it is
    pinned, what it costs. Without `memory_mb` it is only priced: cortex never loads or evicts it."""

    id: str
    memory_mb: int | None = None
    residency_priority: int = 100
    pinned_on: tuple[str, ...] = ()  # upstream names
    cost: dict[str, float] | None = None  # USD per 1M tokens: input, output, cached_input (None: unpriced)

    def catalogue_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id}
        if self.memory_mb is not None:
            entry.update(memory_mb=self.memory_mb, residency_priority=self.residency_priority,
                         pinned_on=[f"http://{name}" for name in self.pinned_on])
        if self.cost is not None:
            entry["cost"] = dict(self.cost)
        return entry


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    target: str = ""  # an upstream's name; empty for cortex_restart
    at_s: float = 0.0
    for_s: float = 0.0  # window length (0 for drop and reset: to the end); down time for crash and cortex_restart
    delay_ms: float = 0.0
    at_chunk: int = 0
    share: float = 1.0
    between_requests: bool = False  # crash: wait until the target serves no generation, then kill it
    retry_after_s: float | None = None  # overload: the Retry-After sent (None: the kind's own habit)
    status: int | None = None  # overload: 429, 503 or 529 (None: the kind's own)


@dataclass(frozen=True)
class CortexSpec:
    poll_interval_s: float = 1.0
    unhealthy_after_failures: int = 2
    hold_ttl_s: float = 600.0
    expiry_interval_s: float = 5.0
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 120.0
    idle_timeout_s: float = 30.0
    default_context_tokens: int = 8192  # for kinds that report no limits (ollama, openai)
    default_output_tokens: int = 4096
    load_timeout_s: float = 600.0  # a cold load's deadline
    unload_drain_s: float = 30.0  # an eviction lets other replicas' requests drain this long
    unpriced: str = "refuse"  # a money-capped key on an unpriced model: refused (403 model_not_priced) or free
    replicas: int = 1  # more than one: that many cortexes on one shared ledger (sim/shared_ledger.py)
    output_holds: str = "worst_case"  # cortex's budget.output_holds: "worst_case" or "incremental"
    output_slice_tokens: int = 1024  # cortex's budget.output_slice_tokens (incremental holds)


@dataclass(frozen=True)
class SharedLedgerSpec:
    """`[shared_ledger]`: the replicas' database, as sim/shared_ledger.py models it."""

    round_trip_ms: float = 1.0  # one statement's round trip between a replica and the database
    notice_delay_ms: float = 1.0  # from a directory change's commit to the other replicas' notice
    lease_s: float = 30.0  # a dead replica's holds are reaped this long after its last heartbeat
    batch_window_ms: float = 0.0  # a replica's writer waits this long after the first reserve before sending
    batch_max: int = 512  # reserves (and resolutions) per batch


@dataclass(frozen=True)
class Expectations:
    served: Range | None = None
    refused: dict[str, Range] = field(default_factory=dict)
    failed: Range | None = None
    cancelled: Range | None = None
    charged_tokens: Range | None = None
    admitted_on_retry: Range | None = None  # rolling-window retries admitted at the predicted instant
    failovers: Range | None = None  # requests cortex sent to more than one upstream
    failed_before_first_byte: Range | None = None  # answered with an HTTP error (5xx), not a refusal
    stream_errors: Range | None = None  # streams that ended in an SSE error event after the 200
    partial_charges: Range | None = None  # those cut streams charged more than nothing and less than their hold
    loads: Range | None = None  # load requests cortex sent the neurons
    load_refusals: Range | None = None  # of those, answered with an error (507: no memory; 503: unloading)
    evictions: Range | None = None  # unload requests cortex sent the neurons
    cold_waits: Range | None = None  # client requests that waited on a cold load
    hit_rate: Range | None = None  # the share of client requests that did not
    refused_by_cap: dict[str, Range] = field(default_factory=dict)  # the ledger's refusals, by CAP_REFUSALS
    charged_usd: Range | None = None  # USD charged over the run
    # With `policies`: useful output tokens under incremental holds over those under worst_case, same cap.
    useful_ratio: Range | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    horizon_s: float
    latency_ms: float
    jitter_ms: float
    accounts: tuple[AccountSpec, ...]
    keys: tuple[KeySpec, ...]
    upstreams: tuple[UpstreamSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    faults: tuple[FaultSpec, ...]
    cortex: CortexSpec
    expect: Expectations
    models: tuple[ModelSpec, ...] = ()  # the catalogue: prices, and the models cortex loads on demand
    start_s: float = 0.0  # the virtual clock's start, POSIX seconds (0: 1970-01-01T00:00:00Z)
    source: str = ""
    shared_ledger: SharedLedgerSpec | None = None  # None: one cortex on its SQLite ledger, as ever
    # cortex's output-hold policies to run the world under, once each (sim/runner.py run_policies);
    # empty: one run, under `cortex.output_holds`.
    policies: tuple[str, ...] = ()

    @property
    def replica_names(self) -> tuple[str, ...]:
        """The cortex hosts: `cortex` alone, or `cortex-1` .. `cortex-N` on a shared ledger."""
        if self.shared_ledger is None:
            return ("cortex",)
        return tuple(f"cortex-{i + 1}" for i in range(self.cortex.replicas))

    def catalogue(self) -> dict[str, Any]:
        """cortex's catalogue, TOML-shaped (`cortex.fleet.catalogue.parse` checks it like a models.toml)."""
        return {"models": [m.catalogue_entry() for m in self.models]}


# --- field parsers --------------------------------------------------------------------


def _number(low: float = 0.0, strict: bool = False) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        bad_type = not isinstance(value, (int, float)) or isinstance(value, bool)
        if bad_type or not math.isfinite(value) or value < low or (strict and value == low):
            raise ScenarioError(f"'{key}' must be a number {'>' if strict else '>='} {low:g}, got {value!r}")
        return float(value)

    return parse


def _integer(low: int = 0, high: int = 10**15) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ScenarioError(f"'{key}' must be an integer from {low} to {high}, got {value!r}")
        return value

    return parse


def _share(key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:  # nan fails too
        raise ScenarioError(f"'{key}' must be a share between 0 and 1, got {value!r}")
    return float(value)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"'{key}' must be true or false, got {value!r}")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ScenarioError(f"'{key}' must be a string or a non-empty list of strings, got {value!r}")
    return tuple(value)


def _range(
    integer: bool = True, low: float = 0.0, high: float = 1e9, open_ended: bool = False
) -> Callable[[str, Any], Range]:
    """A constant or {min, max}. Only expectations may leave a bound out (open-ended)."""

    def parse(key: str, value: Any) -> Range:
        if isinstance(value, dict):
            extra = set(value) - {"min", "max"}
            needed = set() if open_ended else {"min", "max"}
            if extra or not value or needed - set(value):
                form = "{min = ..., max = ...}" + (" (either may be left out)" if open_ended else "")
                raise ScenarioError(f"'{key}' must be a number or {form}, got {value!r}")
            lo, hi = value.get("min", low), value.get("max", float("inf"))
        else:
            lo = hi = value
        for bound in (lo, hi):
            if bound == float("inf") and open_ended:
                continue
            if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not low <= bound <= high:
                raise ScenarioError(f"'{key}' bounds must be numbers from {low:g} to {high:g}, got {value!r}")
            if integer and not isinstance(bound, int):
                raise ScenarioError(f"'{key}' bounds must be integers, got {value!r}")
        if lo > hi:
            raise ScenarioError(f"'{key}': min {lo} is above max {hi}")
        return Range(lo, hi, integer)

    return parse


def _table(key: str, data: Any, fields: dict[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ScenarioError(f"'{key}' must be a table, got {data!r}")
    out = {}
    for name, value in data.items():
        parser = fields.get(name)
        if parser is None:
            raise ScenarioError(f"unknown key '{key}.{name}' (known: {', '.join(sorted(fields))})")
        out[name] = parser(f"{key}.{name}", value)
    return out


def _array(key: str, data: Any) -> list[Any]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise ScenarioError(f"'{key}' must be an array of tables ([[{key}]])")
    return data


def _usd(key: str, value: Any) -> int:
    """A USD amount (a number, or a decimal string for exactness) as integer micro-USD."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ScenarioError(f"'{key}' must be an amount in USD (e.g. 2.5), got {value!r}")
    try:
        micro = usd_to_micro(value, key)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    if micro > USD_CAP_MAX * 10**6:
        raise ScenarioError(f"'{key}' must be at most {USD_CAP_MAX:,} USD, got {value!r}")
    return micro


CAP_FIELDS = {
    "balance_tokens": _integer(),
    "window_tokens": _integer(),
    "window_seconds": _number(strict=True),
    "max_concurrency": _integer(),
    "balance_usd": _usd,
    "window_usd": _usd,
    "period": _string,
    "period_tokens": _integer(),
    "period_usd": _usd,
    "period_timezone": _string,
    "period_anchor_day": _integer(1, 31),
}
PERIOD_DETAILS = ("period_timezone", "period_anchor_day")  # refine a `period`; nothing without one


def _caps(key: str, values: dict[str, Any]) -> Caps:
    has_window = "window_tokens" in values or "window_usd" in values
    if has_window != ("window_seconds" in values):
        raise ScenarioError(f"'{key}': window_seconds goes with window_tokens or window_usd (or both)")
    has_period = "period_tokens" in values or "period_usd" in values
    if has_period != ("period" in values):
        raise ScenarioError(f"'{key}': period (daily, weekly or monthly) goes with period_tokens or period_usd (or both)")
    for name in PERIOD_DETAILS:
        if name in values and "period" not in values:
            raise ScenarioError(f"'{key}.{name}' needs a period")
    spec = None
    if "period" in values:
        try:
            spec = parse_period_spec(values["period"], values.get("period_timezone", "UTC"), values.get("period_anchor_day"))
        except PeriodError as exc:  # its message begins with the field: period, period_timezone or period_anchor_day
            name = next((n for n in PERIOD_DETAILS if str(exc).startswith(n)), "period")
            raise ScenarioError(f"'{key}.{name}': {exc}") from None
    return Caps(
        values.get("balance_tokens"), values.get("window_tokens"), values.get("window_seconds"), values.get("max_concurrency"),
        values.get("balance_usd"), values.get("window_usd"), spec, values.get("period_tokens"), values.get("period_usd"),
    )


# --- sections -------------------------------------------------------------------------


def _accounts(data: Any) -> tuple[AccountSpec, ...]:
    out = []
    for i, raw in enumerate(_array("accounts", data)):
        key = f"accounts[{i}]"
        values = _table(key, raw, {"id": _string, **CAP_FIELDS})
        if "id" not in values:
            raise ScenarioError(f"'{key}.id' is required")
        out.append(AccountSpec(values["id"], _caps(key, values)))
    return tuple(out)


def _keys(data: Any, accounts: tuple[AccountSpec, ...]) -> tuple[KeySpec, ...]:
    out = []
    known_accounts = {a.id for a in accounts}
    for i, raw in enumerate(_array("keys", data)):
        key = f"keys[{i}]"
        values = _table(key, raw, {"name": _string, "account": _string, **CAP_FIELDS})
        if "name" not in values:
            raise ScenarioError(f"'{key}.name' is required")
        account = values.get("account", "default")
        if account != "default" and account not in known_accounts:
            raise ScenarioError(f"'{key}.account': no account {account!r} in [[accounts]]")
        out.append(KeySpec(values["name"], account, _caps(key, values)))
    names = [k.name for k in out]
    if len(set(names)) != len(names):
        raise ScenarioError("'keys': names must be unique")
    return tuple(out)


UPSTREAM_FIELDS = {
    "name": _string,
    "kind": _string,
    "models": _strings,
    "ttft_ms": _number(),
    "tokens_per_s": _number(strict=True),
    "slots": _integer(1),
    "queue_depth": _integer(),
    "context_tokens": _integer(1),
    "output_tokens": _integer(1),
    "reply_tokens": lambda k, v: _log_normal(k, v) if isinstance(v, dict) else _integer()(k, v),
    "chunk_tokens": _integer(1),
    "token_bytes": _integer(1, TOKEN_BYTES_MAX),
    "load_s": _number(),
    "memory_mb": _number(strict=True),
    "model_memory_mb": _number(),
}
NEURON_ONLY_FIELDS = ("memory_mb", "model_memory_mb")  # the mock engine's pretend memory


def _log_normal(key: str, value: dict[str, Any]) -> LogNormal:
    """`{ median = M, sigma = S, min = A, max = B }`: a long-tailed count, log-normal, clamped to [A, B]."""
    fields = _table(key, value, {"median": _number(strict=True), "sigma": _number(strict=True),
                                 "min": _integer(0, TOKENS_MAX), "max": _integer(1, TOKENS_MAX)})
    missing = [name for name in ("median", "sigma", "min", "max") if name not in fields]
    if missing:
        raise ScenarioError(f"'{key}.{missing[0]}' is required (a long-tailed length: median, sigma, min, max)")
    if not fields["min"] <= fields["median"] <= fields["max"]:
        raise ScenarioError(f"'{key}': the median {fields['median']:g} must lie in [min {fields['min']}, max {fields['max']}]")
    if fields["sigma"] > REPLY_SIGMA_MAX:
        raise ScenarioError(f"'{key}.sigma' must be at most {REPLY_SIGMA_MAX:g}, got {fields['sigma']:g}")
    return LogNormal(fields["median"], fields["sigma"], fields["min"], fields["max"])


def _upstream(key: str, raw: Any) -> UpstreamSpec:
    if isinstance(raw, dict) and raw.get("models") == [] and raw.get("kind", "neuron") == "neuron":
        raw = {**raw, "models": ()}  # a neuron may start empty: cortex loads what it needs
    values = _table(key, raw, {**UPSTREAM_FIELDS, "models": lambda k, v: v if v == () else _strings(k, v)})
    if "name" not in values:
        raise ScenarioError(f"'{key}.name' is required")
    kind = values.setdefault("kind", "neuron")
    if kind not in UPSTREAM_KINDS:
        raise ScenarioError(f"'{key}.kind' must be one of {', '.join(UPSTREAM_KINDS)}, got {kind!r}")
    if kind == "neuron" and values.get("token_bytes", 1) != 1:
        raise ScenarioError(f"'{key}.token_bytes': neuron's tokenizer is byte-level (1)")
    values.setdefault("token_bytes", 1 if kind == "neuron" else DEFAULT_TOKEN_BYTES)
    if "output_tokens" in values and kind not in OUTPUT_LIMIT_KINDS:
        raise ScenarioError(f"'{key}.output_tokens': a {kind} server reports no output limit (it writes to the context)")
    if values.get("load_s") and kind not in (*LOADING_KINDS, "neuron"):
        raise ScenarioError(f"'{key}.load_s': a {kind} server has no loading state (kinds with one: {', '.join(LOADING_KINDS)}, neuron)")
    for name in NEURON_ONLY_FIELDS:
        if name in values and kind != "neuron":
            raise ScenarioError(f"'{key}.{name}': only a neuron has a memory budget")
    memory_mb = values.get("memory_mb")
    initial_mb = len(values.get("models", UpstreamSpec.models)) * values.get("model_memory_mb", UpstreamSpec.model_memory_mb)
    if memory_mb is not None and initial_mb > memory_mb:
        raise ScenarioError(f"'{key}.models': {initial_mb:g} MiB of initially loaded models exceed memory_mb {memory_mb:g}")
    if not values.get("models", True) and memory_mb is None:
        raise ScenarioError(f"'{key}.models': only a neuron with memory_mb may start with no model")
    if isinstance(values.get("reply_tokens"), LogNormal) and kind != "neuron":
        raise ScenarioError(f"'{key}.reply_tokens': a long-tailed reply length is modelled for a neuron only")
    if kind in ONE_MODEL_KINDS and len(values.get("models", UpstreamSpec.models)) != 1:
        raise ScenarioError(f"'{key}.models': a {kind} server serves exactly one model")
    if "ttft_ms" in values:
        values["ttft_s"] = values.pop("ttft_ms") / 1000
    return UpstreamSpec(**values)


def _upstreams(top: dict[str, Any]) -> tuple[UpstreamSpec, ...]:
    """`[[upstreams]]`, or `[[neurons]]` (the older name, same fields)."""
    if "upstreams" in top and "neurons" in top:
        raise ScenarioError("'upstreams' and 'neurons' are the same list: use one of them")
    section = "neurons" if "neurons" in top else "upstreams"
    out = [_upstream(f"{section}[{i}]", raw) for i, raw in enumerate(_array(section, top.get(section)))]
    if not out:
        raise ScenarioError(f"'{section}': a scenario needs at least one [[upstreams]] (or [[neurons]])")
    if len({n.name for n in out}) != len(out):
        raise ScenarioError(f"'{section}': names must be unique")
    if "cortex" in {n.name for n in out}:
        raise ScenarioError(f"'{section}': the name 'cortex' is taken by cortex itself")
    return tuple(out)


WORKLOAD_FIELDS = {
    "kind": _string,
    "key": _strings,
    "at_s": _number(),
    "count": _integer(1),
    "rate_per_s": _number(strict=True),
    "duration_s": _number(strict=True),
    "clients": _integer(1),
    "think_s": _range(integer=False, high=HORIZON_MAX_S),
    "model": _string,
    "prompt_bytes": _range(high=PROMPT_BYTES_MAX),
    "max_tokens": lambda k, v: None if v == "none" else _range(low=1, high=TOKENS_MAX)(k, v),
    "stream_share": _share,
    "cancel_share": _share,
    "cancel_after_tokens": _range(high=TOKENS_MAX),
    "cancel_after_s": _range(integer=False, high=HORIZON_MAX_S),
    "honor_retry_after": _bool,
    "max_retries": _integer(),
    "models": _strings,
    "zipf_s": _number(),
}
WORKLOAD_NEEDS = {"burst": ("count",), "open": ("rate_per_s", "duration_s"), "closed": ("clients", "duration_s")}


def _workloads(data: Any, keys: tuple[KeySpec, ...]) -> tuple[WorkloadSpec, ...]:
    out = []
    known_keys = {k.name for k in keys}
    for i, raw in enumerate(_array("workload", data)):
        key = f"workload[{i}]"
        values = _table(key, raw, WORKLOAD_FIELDS)
        kind = values.get("kind")
        if kind not in WORKLOAD_KINDS:
            raise ScenarioError(f"'{key}.kind' must be one of {', '.join(WORKLOAD_KINDS)}, got {kind!r}")
        for needed in WORKLOAD_NEEDS[kind]:
            if needed not in values:
                raise ScenarioError(f"'{key}.{needed}' is required for a {kind} workload")
        if "key" not in values:
            raise ScenarioError(f"'{key}.key' is required")
        for name in values["key"]:
            if name not in known_keys and not name.startswith("invalid"):
                raise ScenarioError(f"'{key}.key': no key {name!r} in [[keys]]")
        values["keys"] = values.pop("key")
        if "models" in values and "model" in values:
            raise ScenarioError(f"'{key}': give 'model' or 'models', not both")
        if len(values.get("models", ())) > WORKLOAD_MODELS_MAX:
            raise ScenarioError(f"'{key}.models': at most {WORKLOAD_MODELS_MAX} models")
        if "zipf_s" in values and "models" not in values:
            raise ScenarioError(f"'{key}.zipf_s' needs 'models' (the demand it spreads)")
        if values.get("cancel_share") and not ("cancel_after_tokens" in values or "cancel_after_s" in values):
            raise ScenarioError(f"'{key}.cancel_share' needs cancel_after_tokens or cancel_after_s")
        out.append(WorkloadSpec(**values))
    if not out:
        raise ScenarioError("'workload': a scenario needs at least one [[workload]]")
    return tuple(out)


FAULT_FIELDS = {
    "kind": _string,
    "target": _string,
    "at_s": _number(),
    "for_s": _number(),
    "delay_ms": _number(),
    "at_chunk": _integer(),
    "share": _share,
    "between_requests": _bool,
    "retry_after_s": _number(),
    "status": _integer(400, 599),
}
# Fields that mean something only for some kinds of fault.
FAULT_ONLY = {
    "delay_ms": ("delay",), "at_chunk": ("drop",), "share": ("drop", "overload", "reset"),
    "between_requests": ("crash",), "retry_after_s": ("overload",), "status": ("overload",),
}


def _faults(data: Any, upstreams: tuple[UpstreamSpec, ...], replicas: tuple[str, ...] = ()) -> tuple[FaultSpec, ...]:
    """`replicas`: the cortex replicas' names on a shared ledger, which a cortex_restart must target (none: one cortex)."""
    out = []
    names = {n.name for n in upstreams}
    for i, raw in enumerate(_array("faults", data)):
        key = f"faults[{i}]"
        values = _table(key, raw, FAULT_FIELDS)
        kind = values.get("kind")
        if kind not in FAULT_KINDS:
            raise ScenarioError(f"'{key}.kind' must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        if kind == "cortex_restart" and replicas and values.get("target") not in replicas:
            raise ScenarioError(f"'{key}.target' must name the cortex replica to kill ({', '.join(replicas)})")
        if kind == "cortex_restart" and not replicas and "target" in values:
            raise ScenarioError(f"'{key}.target': one cortex, no replicas to choose from (set [cortex] replicas)")
        if kind != "cortex_restart" and values.get("target") not in names:
            raise ScenarioError(f"'{key}.target' must name an upstream ({', '.join(sorted(names))})")
        if kind in ("partition", "delay", "overload") and not values.get("for_s"):
            raise ScenarioError(f"'{key}.for_s' is required for a {kind} fault")
        for name, kinds in FAULT_ONLY.items():
            if name in values and kind not in kinds:
                raise ScenarioError(f"'{key}.{name}' applies only to {' and '.join(kinds)} faults")
        if values.get("status") is not None and values["status"] not in OVERLOAD_STATUSES:
            raise ScenarioError(f"'{key}.status' must be one of {', '.join(map(str, OVERLOAD_STATUSES))}")
        out.append(FaultSpec(**values))
    return tuple(out)


CORTEX_FIELDS = {
    "poll_interval_s": _number(strict=True),
    "unhealthy_after_failures": _integer(1),
    "hold_ttl_s": _number(strict=True),
    "expiry_interval_s": _number(strict=True),
    "connect_timeout_s": _number(strict=True),
    "first_byte_timeout_s": _number(strict=True),
    "idle_timeout_s": _number(strict=True),
    "default_context_tokens": _integer(1),
    "default_output_tokens": _integer(1),
    "load_timeout_s": _number(strict=True),
    "unload_drain_s": _number(),
    "unpriced": lambda k, v: _choice(k, v, ("refuse", "free")),
    "replicas": _integer(1, REPLICAS_MAX),
    "output_holds": lambda k, v: _choice(k, v, OUTPUT_HOLDS),
    "output_slice_tokens": _integer(1, TOKENS_MAX),
}
SHARED_LEDGER_FIELDS = {
    "round_trip_ms": _number(),
    "notice_delay_ms": _number(),
    "lease_s": _number(strict=True),
    "batch_window_ms": _number(),
    "batch_max": _integer(1, 4096),
}


def _shared_ledger(top: dict[str, Any], cortex: CortexSpec) -> SharedLedgerSpec | None:
    """`[shared_ledger]`, or its defaults when `[cortex] replicas` asks for more than one cortex."""
    if "shared_ledger" not in top:
        return SharedLedgerSpec() if cortex.replicas > 1 else None
    return SharedLedgerSpec(**_table("shared_ledger", top["shared_ledger"], SHARED_LEDGER_FIELDS))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ScenarioError(f"'{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _price(key: str, value: Any) -> float:
    bad_type = not isinstance(value, (int, float)) or isinstance(value, bool)
    if bad_type or not 0 <= value <= COST_MAX_USD_PER_M:  # nan fails too
        raise ScenarioError(f"'{key}' must be a price in USD per 1M tokens from 0 to {COST_MAX_USD_PER_M:g}, got {value!r}")
    return float(value)


def _cost(key: str, value: Any) -> dict[str, float]:
    prices = _table(key, value, {"input": _price, "output": _price, "cached_input": _price})
    for needed in ("input", "output"):
        if needed not in prices:
            raise ScenarioError(f"'{key}.{needed}' is required (USD per 1M tokens)")
    return prices


def _models(data: Any, upstreams: tuple[UpstreamSpec, ...]) -> tuple[ModelSpec, ...]:
    out = []
    neurons = {u.name for u in upstreams if u.kind == "neuron"}
    for i, raw in enumerate(_array("models", data)):
        key = f"models[{i}]"
        values = _table(key, raw, {
            "id": _string, "memory_mb": _integer(1, 2**40), "residency_priority": _integer(0, 10_000),
            "pinned_on": _strings, "cost": _cost,
        })
        if "id" not in values:
            raise ScenarioError(f"'{key}.id' is required")
        if "memory_mb" not in values:
            if "cost" not in values:
                raise ScenarioError(f"'{key}.memory_mb' is required (or give only a cost: a priced model cortex never loads)")
            for name in ("residency_priority", "pinned_on"):
                if name in values:
                    raise ScenarioError(f"'{key}.{name}' needs memory_mb: only a model cortex loads has a residency")
        for name in values.get("pinned_on", ()):
            if name not in neurons:
                raise ScenarioError(f"'{key}.pinned_on': no neuron {name!r} in [[upstreams]]")
        out.append(ModelSpec(**values))
    if len({m.id for m in out}) != len(out):
        raise ScenarioError("'models': ids must be unique")
    if len(out) > CATALOGUE_MODELS_MAX:
        raise ScenarioError(f"'models': at most {CATALOGUE_MODELS_MAX}")
    return tuple(out)


def _expect(data: Any) -> Expectations:
    if data is None:
        return Expectations()
    values = _table(
        "expect", data,
        {
            "served": _range(open_ended=True), "failed": _range(open_ended=True),
            "cancelled": _range(open_ended=True), "charged_tokens": _range(high=1e18, open_ended=True),
            "admitted_on_retry": _range(open_ended=True), "failovers": _range(open_ended=True),
            "failed_before_first_byte": _range(open_ended=True), "stream_errors": _range(open_ended=True),
            "partial_charges": _range(open_ended=True),
            "loads": _range(open_ended=True), "load_refusals": _range(open_ended=True),
            "evictions": _range(open_ended=True), "cold_waits": _range(open_ended=True),
            "hit_rate": _range(integer=False, high=1.0, open_ended=True),
            "refused": lambda k, v: _table(k, v, {r: _range(open_ended=True) for r in REFUSAL_REASONS}),
            "refused_by_cap": lambda k, v: _table(k, v, {r: _range(open_ended=True) for r in CAP_REFUSALS}),
            "charged_usd": _range(integer=False, high=USD_CAP_MAX, open_ended=True),
            "useful_ratio": _range(integer=False, high=1e6, open_ended=True),
        },
    )
    return Expectations(**values)


def _policies(key: str, value: Any) -> tuple[str, ...]:
    """`policies = ["worst_case", "incremental"]`: cortex's output-hold policies, each run once, in this order."""
    if not isinstance(value, list) or not value or any(v not in OUTPUT_HOLDS for v in value) or len(set(value)) != len(value):
        raise ScenarioError(f"'{key}' must be a list of distinct output-hold policies ({', '.join(OUTPUT_HOLDS)}), got {value!r}")
    return tuple(value)


def _start(key: str, value: Any) -> float:
    """An ISO 8601 UTC instant, "2026-12-31T23:58:00Z" (a TOML offset date-time with offset 0 too): POSIX seconds."""
    instant = value
    if isinstance(value, str):
        try:
            instant = datetime.fromisoformat(value)
        except ValueError:
            instant = None
    if not isinstance(instant, datetime) or instant.utcoffset() != timedelta(0):
        raise ScenarioError(f"'{key}' must be an ISO 8601 UTC instant such as \"2026-12-31T23:58:00Z\", got {value!r}")
    if not datetime(1970, 1, 1, tzinfo=timezone.utc) <= instant <= START_MAX:
        raise ScenarioError(f"'{key}' must lie from 1970-01-01T00:00:00Z to {START_MAX:%Y-%m-%dT%H:%M:%SZ}, got {value!r}")
    return instant.timestamp()


def parse(data: dict[str, Any], source: str = "") -> Scenario:
    top = _table("scenario", data, {
        "name": _string, "description": _string, "horizon_s": _number(strict=True),
        "accounts": lambda k, v: v, "keys": lambda k, v: v, "neurons": lambda k, v: v, "upstreams": lambda k, v: v, "workload": lambda k, v: v,
        "faults": lambda k, v: v, "cortex": lambda k, v: v, "network": lambda k, v: v, "expect": lambda k, v: v,
        "models": lambda k, v: v, "start": _start, "shared_ledger": lambda k, v: v, "policies": _policies,
    })
    for required in ("name", "description"):
        if required not in top:
            raise ScenarioError(f"'{required}' is required")
    network = _table("network", top.get("network", {}), {"latency_ms": _number(), "jitter_ms": _number()})
    accounts = _accounts(top.get("accounts"))
    keys = _keys(top.get("keys"), accounts)
    upstreams = _upstreams(top)
    workloads = _workloads(top.get("workload"), keys)
    cortex = CortexSpec(**_table("cortex", top.get("cortex", {}), CORTEX_FIELDS))
    policies = top.get("policies", ())
    if policies and "output_holds" in top.get("cortex", {}):
        raise ScenarioError("'policies' runs the world under each output-hold policy: give it or [cortex] output_holds, not both")
    if policies:
        cortex = dataclasses.replace(cortex, output_holds=policies[0])
    shared = _shared_ledger(top, cortex)
    if shared is not None and "incremental" in (*policies, cortex.output_holds):
        raise ScenarioError("incremental output holds are not modelled on the simulated shared ledger (its handles cannot "
                            "extend a hold): run them on one cortex")
    replicas = tuple(f"cortex-{i + 1}" for i in range(cortex.replicas)) if shared is not None else ()
    taken = set(replicas) & {u.name for u in upstreams}
    if taken:
        raise ScenarioError(f"'upstreams': the name {sorted(taken)[0]!r} is taken by a cortex replica")
    scenario = Scenario(
        name=top["name"],
        description=top["description"],
        horizon_s=top.get("horizon_s", 3600.0),
        latency_ms=network.get("latency_ms", 1.0),
        jitter_ms=network.get("jitter_ms", 0.5),
        accounts=accounts,
        keys=keys,
        upstreams=upstreams,
        workloads=workloads,
        faults=_faults(top.get("faults"), upstreams, replicas),
        cortex=cortex,
        expect=_expect(top.get("expect")),
        models=_models(top.get("models"), upstreams),
        start_s=top.get("start", 0.0),
        source=source,
        shared_ledger=shared,
        policies=policies,
    )
    if scenario.expect.useful_ratio is not None and set(policies) != set(OUTPUT_HOLDS):
        raise ScenarioError(f"'expect.useful_ratio' compares the output-hold policies: it needs policies = "
                            f"[{', '.join(repr(p) for p in OUTPUT_HOLDS)}]")
    if cortex.replicas > 1 and any(m.memory_mb is not None for m in scenario.models):
        raise ScenarioError("'models': the fleet lifecycle across cortex replicas is not modelled: with [cortex] replicas > 1,"
                            " give models a cost only (no memory_mb)")
    if scenario.horizon_s > HORIZON_MAX_S:
        raise ScenarioError(f"'horizon_s' must be at most {HORIZON_MAX_S:g}")
    expected = sum(w.expected_requests() for w in workloads)
    if expected > REQUESTS_MAX:
        raise ScenarioError(f"the workloads would send about {expected:,.0f} requests; the limit is {REQUESTS_MAX:,}")
    return scenario


def load(path: str | Path) -> Scenario:
    path = Path(path)
    return parse(tomlfile.read(path, "scenario", ScenarioError), str(path))
