"""The metrics registry: values, label handling, errors and exposition text."""

from __future__ import annotations

import math
import re

import pytest

from cortex.metrics import (
    BATCH_SIZE_BUCKETS,
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS_S,
    SERIES_MAX,
    Registry,
)

# Exposition format 0.0.4, sample lines only: name, optional {labels}, value.
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL_PAIR = rf"[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
_VALUE = r"(?:NaN|[+-]Inf|[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
SAMPLE_LINE = re.compile(rf"[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{{{_LABEL_PAIR}(?:,{_LABEL_PAIR})*\}})? {_VALUE}")
COMMENT_LINE = re.compile(r"# (?:HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (?:counter|gauge|histogram))")


def lines(registry: Registry) -> list[str]:
    text = registry.render().decode("utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def test_content_type_is_text_format_0_0_4():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_unlabelled_counter_renders_zero_before_any_increment():
    registry = Registry()
    registry.counter("cortex_requests_total", "Requests received.")
    assert lines(registry) == [
        "# HELP cortex_requests_total Requests received.",
        "# TYPE cortex_requests_total counter",
        "cortex_requests_total 0",
    ]


def test_counter_inc_with_labels_renders_one_sorted_line_per_label_set():
    registry = Registry()
    requests = registry.counter("cortex_requests_total", "Requests by route.", labels=("route", "status"))
    requests.inc(route="/v1/chat", status="200")
    requests.inc(2, status="200", route="/v1/chat")  # kwargs order must not matter
    requests.inc(route="/v1/chat", status=429)  # non-str label values are stringified
    requests.inc(route="/v1/messages", status="200")
    assert lines(registry)[2:] == [
        'cortex_requests_total{route="/v1/chat",status="200"} 3',
        'cortex_requests_total{route="/v1/chat",status="429"} 1',
        'cortex_requests_total{route="/v1/messages",status="200"} 1',
    ]


def test_labelled_family_without_samples_renders_only_help_and_type():
    registry = Registry()
    registry.counter("cortex_errors_total", "Errors.", labels=("kind",))
    registry.gauge("cortex_inflight", "In flight.", labels=("neuron",))
    registry.histogram("cortex_latency_seconds", "Latency.", buckets=(1,), labels=("route",))
    assert lines(registry) == [
        "# HELP cortex_errors_total Errors.",
        "# TYPE cortex_errors_total counter",
        "# HELP cortex_inflight In flight.",
        "# TYPE cortex_inflight gauge",
        "# HELP cortex_latency_seconds Latency.",
        "# TYPE cortex_latency_seconds histogram",
    ]


def test_families_render_in_registration_order():
    registry = Registry()
    registry.gauge("zeta", "Z.")
    registry.counter("alpha_total", "A.")
    names = [line.split()[2] for line in lines(registry) if line.startswith("# TYPE")]
    assert names == ["zeta", "alpha_total"]


def test_label_values_escape_backslash_quote_and_newline():
    registry = Registry()
    counter = registry.counter("c_total", "C.", labels=("model",))
    counter.inc(model='a\\b"c\nd')
    assert lines(registry)[2] == 'c_total{model="a\\\\b\\"c\\nd"} 1'


def test_help_text_escapes_backslash_and_newline():
    registry = Registry()
    registry.gauge("g", 'path C:\\x\nsecond "line"')
    assert lines(registry)[0] == '# HELP g path C:\\\\x\\nsecond "line"'


def test_float_values_render_at_full_precision_and_integral_values_without_point():
    registry = Registry()
    counter = registry.counter("c_total", "C.")
    counter.inc(0.1)
    counter.inc(0.2)
    gauge = registry.gauge("g", "G.", labels=("k",))
    gauge.set(3.0, k="integral")
    gauge.set(math.inf, k="inf")
    gauge.set(-math.inf, k="neg_inf")
    gauge.set(1e20, k="huge")
    assert lines(registry)[2] == "c_total 0.30000000000000004"
    assert lines(registry)[5:] == [
        'g{k="huge"} 1e+20',
        'g{k="inf"} +Inf',
        'g{k="integral"} 3',
        'g{k="neg_inf"} -Inf',
    ]


def test_histogram_buckets_are_cumulative_with_exact_sum_and_count():
    registry = Registry()
    latency = registry.histogram("lat_seconds", "Latency.", buckets=(1, 2.5, 5))
    for value in (0.5, 1, 3, 7):  # 1 sits exactly on a bound: le is inclusive
        latency.observe(value)
    assert lines(registry)[2:] == [
        'lat_seconds_bucket{le="1"} 2',
        'lat_seconds_bucket{le="2.5"} 2',
        'lat_seconds_bucket{le="5"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 11.5",
        "lat_seconds_count 4",
    ]


def test_unlabelled_histogram_renders_zeroed_series_before_any_observation():
    registry = Registry()
    registry.histogram("h", "H.", buckets=(1,))
    assert lines(registry)[2:] == ['h_bucket{le="1"} 0', 'h_bucket{le="+Inf"} 0', "h_sum 0", "h_count 0"]


def test_labelled_histogram_puts_le_after_the_family_labels():
    registry = Registry()
    batch = registry.histogram("batch_size", "Batch size.", buckets=(1, 2), labels=("neuron",))
    batch.observe(2, neuron="n1")
    assert lines(registry)[2:] == [
        'batch_size_bucket{neuron="n1",le="1"} 0',
        'batch_size_bucket{neuron="n1",le="2"} 1',
        'batch_size_bucket{neuron="n1",le="+Inf"} 1',
        'batch_size_sum{neuron="n1"} 2',
        'batch_size_count{neuron="n1"} 1',
    ]


def test_histogram_accepts_a_trailing_inf_bound_without_doubling_it():
    registry = Registry()
    registry.histogram("h", "H.", buckets=(1, math.inf))
    assert lines(registry)[2:4] == ['h_bucket{le="1"} 0', 'h_bucket{le="+Inf"} 0']


@pytest.mark.parametrize("buckets", [(), (2, 1), (1, 1), (math.nan,), (math.inf,)])
def test_histogram_rejects_bad_bucket_bounds(buckets):
    with pytest.raises(ValueError, match="bucket"):
        Registry().histogram("h", "H.", buckets=buckets)


def test_histogram_rejects_nan_observation():
    histogram = Registry().histogram("h", "H.", buckets=(1,))
    with pytest.raises(ValueError, match="NaN"):
        histogram.observe(math.nan)


def test_gauge_set_inc_dec():
    registry = Registry()
    gauge = registry.gauge("g", "G.", labels=("k",))
    gauge.set(10, k="a")
    gauge.inc(k="a")
    gauge.inc(2.5, k="a")
    gauge.dec(k="a")
    gauge.dec(3, k="b")
    assert lines(registry)[2:] == ['g{k="a"} 12.5', 'g{k="b"} -3']


def test_unlabelled_gauge_callback_is_read_at_render_time():
    registry = Registry()
    held = {"tokens": 5}
    gauge = registry.gauge("held_tokens", "Held.")
    gauge.set_function(lambda: held["tokens"])
    assert lines(registry)[2] == "held_tokens 5"
    held["tokens"] = 7
    assert lines(registry)[2] == "held_tokens 7"


def test_labelled_gauge_callback_renders_each_returned_label_set():
    registry = Registry()
    gauge = registry.gauge("held_tokens", "Held.", labels=("key", "window"))
    gauge.set_function(lambda: {("k2", "day"): 1.5, ("k1", "minute"): 40})
    assert lines(registry)[2:] == [
        'held_tokens{key="k1",window="minute"} 40',
        'held_tokens{key="k2",window="day"} 1.5',
    ]


def test_labelled_gauge_callback_with_wrong_key_shape_fails_at_render():
    registry = Registry()
    gauge = registry.gauge("g", "G.", labels=("a", "b"))
    gauge.set_function(lambda: {("only-one",): 1})
    with pytest.raises(ValueError, match="tuple of 2"):
        registry.render()


def test_callback_gauge_rejects_direct_updates_and_a_second_function():
    gauge = Registry().gauge("g", "G.")
    gauge.set_function(lambda: 1)
    with pytest.raises(ValueError, match="driven by a function"):
        gauge.set(2)
    with pytest.raises(ValueError, match="driven by a function"):
        gauge.inc()
    with pytest.raises(ValueError, match="already has a function"):
        gauge.set_function(lambda: 2)


def test_missing_and_extra_label_names_raise_naming_them():
    counter = Registry().counter("c_total", "C.", labels=("route", "status"))
    with pytest.raises(ValueError, match=r"missing \['status'\], unexpected \['method'\]"):
        counter.inc(route="/", method="GET")
    with pytest.raises(ValueError, match=r"missing \['route', 'status'\]"):
        counter.inc()


def test_unlabelled_family_rejects_labels():
    gauge = Registry().gauge("g", "G.")
    with pytest.raises(ValueError, match=r"unexpected \['x'\]"):
        gauge.set(1, x="y")


@pytest.mark.parametrize("labels", [("bad-name",), ("1x",), ("__reserved",), ("a", "a")])
def test_bad_label_names_are_rejected_at_registration(labels):
    with pytest.raises(ValueError, match="label name"):
        Registry().gauge("g", "G.", labels=labels)


def test_histogram_rejects_le_as_a_label_name():
    with pytest.raises(ValueError, match="'le'"):
        Registry().histogram("h", "H.", buckets=(1,), labels=("le",))


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "has space", "ünicode"])
def test_bad_metric_names_are_rejected(name):
    with pytest.raises(ValueError, match="invalid metric name"):
        Registry().gauge(name, "G.")


def test_counter_name_must_end_in_total():
    with pytest.raises(ValueError, match="_total"):
        Registry().counter("cortex_requests", "Requests.")


def test_empty_help_is_rejected():
    with pytest.raises(ValueError, match="help"):
        Registry().gauge("g", " ")


def test_registering_the_same_name_twice_raises():
    registry = Registry()
    registry.gauge("g", "G.")
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("g", "G again.")
    with pytest.raises(ValueError, match="already registered"):
        registry.histogram("g", "G as a histogram.", buckets=(1,))


def test_registering_a_name_that_clashes_with_histogram_samples_raises():
    registry = Registry()
    registry.histogram("lat", "Latency.", buckets=(1,))
    with pytest.raises(ValueError, match="lat_count"):
        registry.gauge("lat_count", "Clash.")


@pytest.mark.parametrize("amount", [-1, -0.5, math.nan])
def test_counter_rejects_negative_or_nan_increment(amount):
    counter = Registry().counter("c_total", "C.")
    with pytest.raises(ValueError, match=">= 0"):
        counter.inc(amount)


def test_series_count_per_family_is_capped():
    counter = Registry().counter("c_total", "C.", labels=("id",))
    for i in range(SERIES_MAX):
        counter.inc(id=i)
    with pytest.raises(ValueError, match="unbounded"):
        counter.inc(id="one-too-many")


def test_empty_registry_renders_nothing():
    assert Registry().render() == b""


def test_default_bucket_helpers_are_valid_histogram_bounds():
    registry = Registry()
    registry.histogram("lat_seconds", "Latency.", buckets=DEFAULT_LATENCY_BUCKETS_S)
    registry.histogram("batch", "Batch.", buckets=BATCH_SIZE_BUCKETS)
    assert sum(line.startswith("lat_seconds_bucket") for line in lines(registry)) == 16
    assert sum(line.startswith("batch_bucket") for line in lines(registry)) == 12


def test_every_rendered_line_matches_the_exposition_grammar():
    registry = Registry()
    counter = registry.counter("cortex_requests_total", "Requests.\nBy route.", labels=("route",))
    counter.inc(route='we"ird\\ro\nute')
    counter.inc(0.1, route="/v1/chat")
    gauge = registry.gauge("cortex:held_tokens", "Held.", labels=("key",))
    gauge.set_function(lambda: {("k1",): math.nan, ("k2",): -math.inf, ("k3",): 1e-7})
    registry.gauge("up", "Up.").set(1)
    latency = registry.histogram("lat_seconds", "Latency.", DEFAULT_LATENCY_BUCKETS_S, labels=("route",))
    for value in (0.001, 0.3, 1000, -2):
        latency.observe(value, route="/v1/chat")
    rendered = lines(registry)
    assert len(rendered) == 2 * 4 + 2 + 3 + 1 + 16 + 2
    for line in rendered:
        pattern = COMMENT_LINE if line.startswith("#") else SAMPLE_LINE
        assert pattern.fullmatch(line), line


def test_grammar_regex_rejects_malformed_lines():
    # Guards the parse-back test against a regex that accepts anything.
    for bad in ['m{a="x} 1', "m 1 2", 'm{a="x",} 1', "m{a=x} 1", "m", 'm{a="x"}1', "m one"]:
        assert not SAMPLE_LINE.fullmatch(bad), bad
