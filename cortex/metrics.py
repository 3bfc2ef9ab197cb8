"""Prometheus metrics: a pure registry and text exposition format 0.0.4.

No I/O, no clock reads, no threads, no dependencies. Every call happens on the
Trio thread, so there is no locking. `inc`/`observe` sit on the per-request
hot path: they cost a kwargs-to-key cache lookup, a dict lookup and an add.
Rendering is the slow path (once per scrape) and does all the formatting.

Callback gauges (`Gauge.set_function`) report values owned elsewhere (for
example tokens held in the ledger); they are evaluated only inside `render`.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Union

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# A family past this many series almost certainly has an unbounded label
# value (a request id, a key); failing loudly beats an ever-growing scrape.
SERIES_MAX = 10_000

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelKey = tuple[str, ...]
GaugeCallback = Callable[[], Union[float, Mapping[LabelKey, float]]]


def format_value(value: float) -> str:
    """Go-style sample value: integral values without `.0`, others at full precision."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # Beyond 2**53 floats are no longer exact integers; repr keeps them honest.
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    # HELP text escapes only backslash and newline; quotes stay as they are.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: tuple[str, ...], values: LabelKey) -> str:
    if not names:
        return ""
    pairs = (f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values))
    return "{" + ",".join(pairs) + "}"


def _check_label_names(names: tuple[str, ...], reserved: frozenset[str]) -> None:
    if not isinstance(names, tuple):
        raise ValueError(f"label names must be a tuple of str, got {type(names).__name__}")
    for name in names:
        if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
            raise ValueError(f"invalid label name {name!r}: must match [a-zA-Z_][a-zA-Z0-9_]*")
        if name.startswith("__"):
            raise ValueError(f"invalid label name {name!r}: names starting with '__' are reserved")
        if name in reserved:
            raise ValueError(f"invalid label name {name!r}: reserved for this metric type")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names!r}")


class _Family:
    """Shared shape of a metric family: name, help, label names, series by key."""

    type_name = ""
    _reserved_labels: frozenset[str] = frozenset()

    def __init__(self, name: str, help: str, label_names: tuple[str, ...]) -> None:
        _check_label_names(label_names, self._reserved_labels)
        self.name = name
        self.help = help
        self.label_names = label_names
        self._label_set = frozenset(label_names)
        # Maps kwargs items, in the caller's order, to the canonical key, so
        # the hot path never re-validates or re-orders a label set it has seen.
        self._keys: dict[tuple[tuple[str, object], ...], LabelKey] = {}
        self._values: dict = {}
        if not label_names:
            # An unlabelled family has exactly one series; show it from the start.
            self._key({})

    def sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _new_value(self):
        raise NotImplementedError

    def _key(self, labels: dict[str, object]) -> LabelKey:
        raw = tuple(labels.items())
        key = self._keys.get(raw)
        if key is None:
            key = self._add_key(labels, raw)
        return key

    def _add_key(self, labels: dict[str, object], raw: tuple) -> LabelKey:
        key = self._canonical_key(labels)
        if key not in self._values:
            if len(self._values) >= SERIES_MAX:
                raise ValueError(f"{self.name}: more than {SERIES_MAX} series; is a label value unbounded?")
            self._values[key] = self._new_value()
        self._keys[raw] = key
        return key

    def _canonical_key(self, labels: Mapping[str, object]) -> LabelKey:
        given = frozenset(labels)
        if given != self._label_set:
            missing = sorted(self._label_set - given)
            extra = sorted(given - self._label_set)
            raise ValueError(f"{self.name}: label names mismatch: missing {missing}, unexpected {extra}")
        return tuple(str(labels[n]) for n in self.label_names)

    def render_lines(self) -> list[str]:
        header = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type_name}"]
        return header + self._sample_lines()

    def _sample_lines(self) -> list[str]:
        items = sorted(self._values.items(), key=lambda item: item[0])
        return [f"{self.name}{_label_text(self.label_names, k)} {format_value(v)}" for k, v in items]


class Counter(_Family):
    type_name = "counter"

    def _new_value(self) -> float:
        return 0.0

    def inc(self, amount: float = 1, **labels: object) -> None:
        # `not >=` also rejects NaN, which would poison the counter forever.
        if not amount >= 0:
            raise ValueError(f"{self.name}: counter increment must be >= 0, got {amount!r}")
        self._values[self._key(labels)] += amount


class Gauge(_Family):
    type_name = "gauge"

    def __init__(self, name: str, help: str, label_names: tuple[str, ...]) -> None:
        super().__init__(name, help, label_names)
        self._fn: GaugeCallback | None = None

    def _new_value(self) -> float:
        return 0.0

    def set(self, value: float, **labels: object) -> None:
        self._check_no_function()
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: object) -> None:
        self._check_no_function()
        self._values[self._key(labels)] += amount

    def dec(self, amount: float = 1, **labels: object) -> None:
        self._check_no_function()
        self._values[self._key(labels)] -= amount

    def set_function(self, fn: GaugeCallback) -> None:
        """Read the value(s) from `fn` at render time instead of storing them.

        Unlabelled: `fn() -> float`. Labelled: `fn() -> {label values tuple: float}`,
        tuples in label-name order. The value then has one owner, so set/inc/dec
        on this gauge become errors.
        """
        if not callable(fn):
            raise ValueError(f"{self.name}: set_function needs a callable, got {type(fn).__name__}")
        if self._fn is not None:
            raise ValueError(f"{self.name}: gauge already has a function")
        self._fn = fn

    def _check_no_function(self) -> None:
        if self._fn is not None:
            raise ValueError(f"{self.name}: gauge is driven by a function; it cannot be set directly")

    def _sample_lines(self) -> list[str]:
        if self._fn is None:
            return super()._sample_lines()
        if not self.label_names:
            return [f"{self.name} {format_value(float(self._fn()))}"]
        values = self._fn()
        items = sorted((self._callback_key(k), float(v)) for k, v in values.items())
        return [f"{self.name}{_label_text(self.label_names, k)} {format_value(v)}" for k, v in items]

    def _callback_key(self, key: object) -> LabelKey:
        if not isinstance(key, tuple) or len(key) != len(self.label_names):
            raise ValueError(
                f"{self.name}: callback key {key!r} must be a tuple of {len(self.label_names)} "
                f"label values for {self.label_names}"
            )
        return tuple(str(v) for v in key)


class _HistogramSeries:
    __slots__ = ("bucket_counts", "sum")

    def __init__(self, bucket_count: int) -> None:
        # Per-bucket (not cumulative) counts; the last slot is the +Inf bucket.
        self.bucket_counts = [0] * bucket_count
        self.sum = 0.0


class Histogram(_Family):
    type_name = "histogram"
    _reserved_labels = frozenset({"le"})

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], label_names: tuple[str, ...]) -> None:
        self.bounds = _check_buckets(name, buckets)
        super().__init__(name, help, label_names)

    def sample_names(self) -> tuple[str, ...]:
        return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def _new_value(self) -> _HistogramSeries:
        return _HistogramSeries(len(self.bounds) + 1)

    def observe(self, value: float, **labels: object) -> None:
        if value != value:
            raise ValueError(f"{self.name}: cannot observe NaN")
        series = self._values[self._key(labels)]
        # bisect_left puts a value equal to a bound in that bound's bucket (le is <=).
        series.bucket_counts[bisect_left(self.bounds, value)] += 1
        series.sum += value

    def _sample_lines(self) -> list[str]:
        lines: list[str] = []
        for key, series in sorted(self._values.items(), key=lambda item: item[0]):
            lines.extend(self._series_lines(key, series))
        return lines

    def _series_lines(self, key: LabelKey, series: _HistogramSeries) -> list[str]:
        names = self.label_names + ("le",)
        uppers = [format_value(b) for b in self.bounds] + ["+Inf"]
        lines, cumulative = [], 0
        for upper, count in zip(uppers, series.bucket_counts):
            cumulative += count
            lines.append(f"{self.name}_bucket{_label_text(names, key + (upper,))} {cumulative}")
        labels = _label_text(self.label_names, key)
        lines.append(f"{self.name}_sum{labels} {format_value(series.sum)}")
        lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


def _check_buckets(name: str, buckets: tuple[float, ...]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    # +Inf is always emitted; accept it as the last bound rather than doubling it.
    if bounds and bounds[-1] == math.inf:
        bounds = bounds[:-1]
    if not bounds:
        raise ValueError(f"{name}: histogram needs at least one finite bucket bound")
    if any(not math.isfinite(b) for b in bounds):
        raise ValueError(f"{name}: bucket bounds must be finite (except a trailing +Inf), got {buckets!r}")
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name}: bucket bounds must be strictly increasing, got {buckets!r}")
    return bounds


class Registry:
    """Metric families in registration order, rendered as exposition text."""

    def __init__(self) -> None:
        self._families: list[_Family] = []
        self._sample_names: set[str] = set()

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        _check_metric_name(name)
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in '_total'")
        return self._register(Counter(name, _checked_help(name, help), labels))

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
        _check_metric_name(name)
        return self._register(Gauge(name, _checked_help(name, help), labels))

    def histogram(
        self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Histogram:
        _check_metric_name(name)
        return self._register(Histogram(name, _checked_help(name, help), buckets, labels))

    def render(self) -> bytes:
        lines: list[str] = []
        for family in self._families:
            lines.extend(family.render_lines())
        # The format requires every line, the last included, to end in '\n'.
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""

    def _register(self, family: _Family):
        names = {family.name, *family.sample_names()}
        clash = sorted(names & self._sample_names)
        if clash:
            raise ValueError(f"metric {family.name!r} already registered (clashes with {clash})")
        self._sample_names |= names
        self._families.append(family)
        return family


def _check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")


def _checked_help(name: str, help: str) -> str:
    if not isinstance(help, str) or not help.strip():
        raise ValueError(f"metric {name!r} needs a non-empty help string")
    return help


class GatewayMetrics:
    """cortex's metric families, registered once per app."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("cortex_requests_total", "Requests answered, by status and model.", ("status", "model"))
        self.tokens = r.counter("cortex_tokens_total", "Tokens charged, by direction (in, out) and model.", ("direction", "model"))
        self.ttft_s = r.histogram(
            "cortex_time_to_first_token_seconds", "Time to the first streamed token.", DEFAULT_LATENCY_BUCKETS_S, ("model",)
        )
        self.latency_s = r.histogram(
            "cortex_request_duration_seconds", "Whole request latency.", DEFAULT_LATENCY_BUCKETS_S, ("model",)
        )
        self.refusals = r.counter("cortex_budget_refusals_total", "Budget refusals, by reason.", ("reason",))
        self.holds_outstanding = r.gauge("cortex_holds_outstanding", "Holds placed and not yet resolved.")
        self.held_tokens = r.gauge("cortex_held_tokens", "Tokens held by open holds.")
        self.holds_resolved = r.counter("cortex_holds_resolved_total", "Holds resolved, by how.", ("state",))
        self.overruns = r.counter("cortex_settle_overruns_total", "Settlements whose actual usage exceeded the hold.")
        self.extensions = r.counter(
            "cortex_hold_extensions_total", "Incremental output holds' extensions, by result (granted, refused, unavailable).",
            ("result",),
        )
        self.budget_truncations = r.counter(
            "cortex_budget_truncations_total", "Responses ended early because an output hold could not be extended."
        )
        self.truncation_waste_tokens = r.counter(
            "cortex_budget_truncation_waste_tokens_total",
            "Output the upstream generated past a refused extension: cut in transit, neither forwarded nor charged.",
        )
        self.usage_disagreements = r.counter(
            "cortex_usage_disagreements_total",
            "Settlements where the upstream's usage was missing, malformed or below what cortex relayed, by reason.",
            ("reason",),
        )
        self.upstream_truncations = r.counter(
            "cortex_upstream_truncations_total",
            "Requests whose upstream reported far fewer prompt tokens than were sent: it cut the prompt.",
            ("upstream",),
        )
        self.catalogue_reloads = r.counter(
            "cortex_catalogue_reloads_total", "Model catalogue reloads (SIGHUP or the admin API), by result.", ("result",)
        )
        self.model_loads = r.counter(
            "cortex_model_loads_total", "Cold loads cortex asked a neuron for, by model and outcome.", ("model", "outcome")
        )
        self.model_load_s = r.histogram(
            "cortex_model_load_seconds", "Cold load time: the plan, evictions, the load, the refresh.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.evictions = r.counter("cortex_evictions_total", "Models cortex unloaded, by model and reason.", ("model", "reason"))
        self.cold_start_wait_s = r.histogram(
            "cortex_cold_start_wait_seconds", "How long requests waited for a cold load.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.overrun_tokens = r.counter("cortex_settle_overrun_tokens_total", "Tokens above the hold (not charged).")
        self.commit_batch = r.histogram(
            "cortex_ledger_commit_batch_size", "Jobs per ledger group commit.", BATCH_SIZE_BUCKETS
        )
        self.commit_s = r.histogram(
            "cortex_ledger_commit_seconds",
            "Ledger group commit latency.",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.alerts_sent = r.counter("cortex_alerts_sent_total", "Budget alert events delivered (2xx), by alert.", ("alert",))
        self.alerts_failed = r.counter(
            "cortex_alerts_failed_total",
            "Budget alert delivery failures, by reason: each failed attempt (connect, timeout, status), and events"
            " given up (expired) or dropped from a full outbox (outbox_full).",
            ("reason",),
        )
        self.alerts_outbox = r.gauge("cortex_alerts_outbox", "Alert events waiting for delivery.")
        self.neurons_healthy = r.gauge("cortex_neurons_healthy", "Neurons passing health checks.")
        self.neurons_total = r.gauge("cortex_neurons", "Neurons configured.")

    def observe_commit(self, batch_size: int, seconds: float) -> None:
        self.commit_batch.observe(batch_size)
        self.commit_s.observe(seconds)
