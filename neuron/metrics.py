"""neuron's `/metrics`: Prometheus text format 0.0.4, pure.

Counters and histograms are recorded on the Trio thread as requests finish
and steps end; gauges (in flight, KV use) are read from the schedulers when
a scrape renders. Every series carries a `model` label; label values come
from the served model ids and a fixed set of reasons, so they are bounded.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# name -> (type, help)
FAMILIES: dict[str, tuple[str, str]] = {
    "neuron_time_to_first_token_seconds": ("histogram", "Time from a request's arrival to its first generated token."),
    "neuron_generation_tokens_total": ("counter", "Completion tokens generated."),
    "neuron_prompt_tokens_total": ("counter", "Prompt tokens of generations admitted."),
    "neuron_requests_total": ("counter", "Generations ended, by outcome (completed, cancelled, failed)."),
    "neuron_admission_rejections_total": ("counter", "Generations refused by admission control, by reason."),
    "neuron_batch_size": ("histogram", "Sequences in each batched step."),
    "neuron_in_flight": ("gauge", "Sequences in the batch (mock: generations running)."),
    "neuron_queue_depth": ("gauge", "Sequences waiting for admission."),
    "neuron_kv_cache_usage_ratio": ("gauge", "KV cache tokens held over the KV budget."),
    "neuron_kv_cache_reserved_ratio": ("gauge", "KV cache tokens reserved by admitted sequences over the KV budget."),
    "neuron_model_loads_total": ("counter", "Model loads begun (a joined concurrent load is not counted twice)."),
}


def _value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


Labels = tuple[tuple[str, str], ...]


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[tuple[str, Labels], float] = {}
        self.histograms: dict[tuple[str, Labels], Histogram] = {}

    def inc(self, name: str, labels: Labels, value: float = 1) -> None:
        assert FAMILIES[name][0] == "counter" and value >= 0
        key = (name, labels)
        self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name: str, labels: Labels, value: float) -> None:
        assert FAMILIES[name][0] == "histogram"
        key = (name, labels)
        hist = self.histograms.get(key)
        if hist is None:
            bounds = TTFT_BUCKETS_S if name.endswith("_seconds") else BATCH_BUCKETS
            hist = self.histograms[key] = Histogram(tuple(float(b) for b in bounds))
        hist.observe(value)

    def render(self, gauges: dict[tuple[str, Labels], float]) -> bytes:
        lines: list[str] = []
        for name, (kind, help_text) in FAMILIES.items():
            if kind == "counter":
                series = [(labels, v) for (n, labels), v in self.counters.items() if n == name]
            elif kind == "gauge":
                series = [(labels, v) for (n, labels), v in gauges.items() if n == name]
            else:
                series = []
            hists = [(labels, h) for (n, labels), h in self.histograms.items() if n == name]
            if not series and not hists:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(labels)} {_value(v)}" for labels, v in sorted(series)]
            for labels, hist in sorted(hists, key=lambda item: item[0]):
                cumulative = 0
                for bound, count in zip((*hist.bounds, math.inf), hist.counts):
                    cumulative += count
                    lines.append(f"{name}_bucket{_labels((*labels, ('le', _value(bound))))} {cumulative}")
                lines.append(f"{name}_sum{_labels(labels)} {_value(hist.total)}")
                lines.append(f"{name}_count{_labels(labels)} {hist.n}")
        return ("\n".join(lines) + "\n").encode()
