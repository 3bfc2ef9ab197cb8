"""Budget alerts: the pure rules and evaluation, and the outbox delivered to a real local receiver."""

from __future__ import annotations

import functools
import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from cortex.budget import alerts
from cortex.budget.alert_delivery import (
    ALERTS_SCHEMA,
    AlertDelivery,
    FireAlert,
    new_event_id,
    RearmAlert,
    fire_ops,
    load_fired,
    outbox_depth,
)
from cortex.budget.alerts import AlertConfigError, AlertRule, CapLevel, Fire, Rearm, evaluate, record_fired
from cortex.budget.store import SyncStore, connect
from cortex.metrics import GatewayMetrics

NOW = 1_796_126_400.0  # 2026-12-01T12:00:00Z
URL = "http://127.0.0.1:9/hook"


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"evt_{next(counter)}"


def rule(**overrides: Any) -> AlertRule:
    return AlertRule(**{"id": "ops", "url": URL, **overrides})


def balance(spent: int, limit: int = 100, exhausted: bool = False) -> CapLevel:
    return CapLevel("balance_tokens", spent, limit, str(limit), exhausted=exhausted)


def thresholds_of(decisions: list[Any], kind: type = Fire) -> list[float]:
    return [d.key[4] for d in decisions if isinstance(d, kind)]


class Principal:
    """One principal's in-memory fired map, as the budget service keeps it."""

    def __init__(self, rules: tuple[AlertRule, ...], kind: str = "key", principal_id: str = "key_a") -> None:
        self.rules, self.kind, self.id = rules, kind, principal_id
        self.fired: dict[alerts.FiredKey, str] = {}
        self.new_id = ids()

    def step(self, *levels: CapLevel, now: float = NOW) -> list[Any]:
        decisions = evaluate(self.rules, self.kind, self.id, levels, self.fired, now, self.new_id)
        record_fired(self.fired, decisions)
        return decisions


# --- parsing ------------------------------------------------------------------------------


def test_a_rule_with_only_a_url_gets_the_defaults():
    (parsed,) = alerts.parse_alert_rules([{"url": "https://hooks.example/x"}], {})
    assert parsed.id.startswith("alert-") and len(parsed.id) == 16  # from the url: stable under list edits
    (again,) = alerts.parse_alert_rules([{"url": "https://hooks.example/y"}, {"url": "https://hooks.example/x"}][1:], {})
    assert again.id == parsed.id
    assert parsed.thresholds == alerts.THRESHOLDS_DEFAULT
    assert parsed.principals is None and parsed.caps is None and parsed.secret is None


def test_no_alerts_table_means_no_rules():
    assert alerts.parse_alert_rules(None, {}) == ()


def test_parsing_sorts_thresholds_and_reads_the_secret_from_the_environment():
    (parsed,) = alerts.parse_alert_rules(
        [{"url": URL, "name": "team", "thresholds": [1, 0.25], "secret_env": "HOOK_SECRET",
          "principals": ["account:team-a"], "caps": ["period_usd"]}],
        {"HOOK_SECRET": "s3cret"},
    )
    assert parsed.thresholds == (0.25, 1.0)
    assert parsed.secret == "s3cret" and "s3cret" not in repr(parsed)
    assert parsed.principals == {"account:team-a"} and parsed.caps == {"period_usd"}


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"thresholds": [0.5, 0]}, "alerts[1].thresholds"),
        ({"thresholds": [0.5, 1.5]}, "alerts[1].thresholds"),
        ({"thresholds": [0.5, 0.5]}, "alerts[1].thresholds"),
        ({"thresholds": []}, "alerts[1].thresholds"),
        ({"thresholds": [True]}, "alerts[1].thresholds"),
        ({"url": "ftp://example.com/x"}, "alerts[1].url"),
        ({"url": None}, "alerts[1].url"),
        ({"colour": "red"}, "alerts[1].colour"),
        ({"secret_env": "NOT_SET_ANYWHERE"}, "alerts[1].secret_env"),
        ({"secret": "a", "secret_env": "HOOK_SECRET"}, "alerts[1]"),
        ({"secret": ""}, "alerts[1].secret"),
        ({"caps": ["balance_tokens", "weekly_bananas"]}, "alerts[1].caps"),
        ({"principals": ["team-a"]}, "alerts[1].principals"),
        ({"principals": ["user:bob"]}, "alerts[1].principals"),
        ({"name": "first"}, "alerts[1].name"),  # a duplicate of alerts[0]'s
        ({"name": "has space"}, "alerts[1].name"),
    ],
)
def test_a_bad_rule_is_refused_with_its_key_named(bad, key):
    entry = {"url": URL, **bad}
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(AlertConfigError) as info:
        alerts.parse_alert_rules([{"url": URL, "name": "first"}, entry], {"HOOK_SECRET": "x"})
    assert f"'{key}" in str(info.value)


def test_a_refused_secret_is_not_echoed():
    with pytest.raises(AlertConfigError) as info:
        alerts.parse_alert_rules([{"url": URL, "secret": "x" * 5000}], {})
    assert "xxxx" not in str(info.value)


# --- evaluation ---------------------------------------------------------------------------


def test_a_threshold_fires_once_when_crossed():
    p = Principal((rule(thresholds=(0.5,)),))
    assert p.step(balance(40)) == []
    (fire,) = p.step(balance(55))
    assert fire.key == ("ops", "key", "key_a", "balance_tokens", 0.5) and fire.epoch == "100"
    assert p.step(balance(60)) == []
    assert p.step(balance(99)) == []


def test_several_thresholds_crossed_at_once_each_fire_lowest_first():
    p = Principal((rule(),))
    decisions = p.step(balance(96))
    assert thresholds_of(decisions) == [0.5, 0.8, 0.95]
    assert len({d.event["id"] for d in decisions}) == 3
    assert thresholds_of(p.step(balance(100))) == [1.0]


def test_a_period_cap_fires_again_in_the_next_period_only():
    p = Principal((rule(thresholds=(0.5,)),))
    december = CapLevel("period_usd", 600_000, 1_000_000, "monthly:2026-12-01@UTC", period={"id": "monthly:2026-12-01@UTC"})
    january = CapLevel("period_usd", 700_000, 1_000_000, "monthly:2027-01-01@UTC")
    january_low = CapLevel("period_usd", 100_000, 1_000_000, "monthly:2027-01-01@UTC")
    (fire,) = p.step(december)
    assert fire.epoch == "monthly:2026-12-01@UTC" and fire.event["period"] == {"id": "monthly:2026-12-01@UTC"}
    assert p.step(december) == []
    (fire,) = p.step(january)
    assert fire.epoch == "monthly:2027-01-01@UTC"
    assert p.step(january) == []
    assert p.step(january_low) == []  # falling within a period does not re-arm it


def test_a_stale_period_epoch_is_re_armed_by_the_new_period():
    p = Principal((rule(thresholds=(0.5,)),))
    p.fired[("ops", "key", "key_a", "period_tokens", 0.5)] = "daily:2026-11-30@UTC"
    assert p.step(CapLevel("period_tokens", 10, 100, "daily:2026-12-01@UTC")) == []
    (fire,) = p.step(CapLevel("period_tokens", 50, 100, "daily:2026-12-01@UTC"))
    assert fire.epoch == "daily:2026-12-01@UTC"


def test_a_balance_cap_re_arms_after_a_top_up():
    p = Principal((rule(thresholds=(0.5, 0.8)),))
    assert thresholds_of(p.step(balance(85))) == [0.5, 0.8]
    assert p.step(balance(90)) == []
    assert thresholds_of(p.step(balance(85, limit=150))) == [0.5]  # a new balance level: 57 % of it
    assert p.step(balance(100, limit=150)) == []
    assert thresholds_of(p.step(balance(130, limit=150))) == [0.8]


def test_an_exhausted_cap_counts_as_full_once_per_balance_level():
    p = Principal((rule(thresholds=(0.5, 0.95, 1.0)),))
    assert thresholds_of(p.step(balance(92))) == [0.5]
    # The balance refused a request: what is left cannot fit one, though spend is at 92 %.
    (fire_95, fire_100) = p.step(balance(92, exhausted=True))
    assert (fire_95.key[4], fire_100.key[4]) == (0.95, 1.0) and fire_100.event["exhausted"] is True
    assert fire_100.event["spent"] == 92 and fire_100.event["fraction"] == 1.0
    assert p.step(balance(92, exhausted=True)) == [] and p.step(balance(93)) == []


def test_a_window_cap_re_arms_only_below_half_its_threshold():
    p = Principal((rule(thresholds=(0.8,)),))
    window = lambda spent: CapLevel("window_tokens", spent, 100, "", window_s=60.0)  # noqa: E731
    assert thresholds_of(p.step(window(80))) == [0.8]
    assert p.step(window(50)) == []  # aged out a little: still armed off
    assert p.step(window(85)) == []  # no second alert in the same fill
    assert thresholds_of(p.step(window(39)), Rearm) == [0.8]
    (fire,) = p.step(window(80))
    assert fire.event["window_seconds"] == 60.0


def test_a_rule_applies_only_to_its_caps_and_principals():
    only = rule(thresholds=(0.5,), caps=frozenset({"balance_usd"}), principals=frozenset({"key:key_a"}))
    levels = (balance(90), CapLevel("balance_usd", 900, 1000, "1000"))
    assert [d.key[3] for d in Principal((only,)).step(*levels)] == ["balance_usd"]
    assert Principal((only,), principal_id="key_b").step(*levels) == []
    assert Principal((only,), kind="account", principal_id="key_a").step(*levels) == []


def test_each_rule_fires_independently():
    p = Principal((rule(id="a", thresholds=(0.5,)), rule(id="b", thresholds=(0.5,))))
    assert [d.key[0] for d in p.step(balance(60))] == ["a", "b"]


def test_a_usd_event_carries_usd_and_exact_micro_usd():
    (fire,) = Principal((rule(thresholds=(0.8,)),)).step(CapLevel("balance_usd", 8_300_001, 10_000_000, "10000000"))
    event = json.loads(json.dumps(fire.event))
    assert event == {
        "id": "evt_1", "type": "budget.threshold_crossed", "alert": "ops",
        "principal": {"kind": "key", "id": "key_a"}, "cap": "balance_usd", "threshold": 0.8, "unit": "usd",
        "spent": 8.300001, "limit": 10.0, "spent_micro_usd": 8_300_001, "limit_micro_usd": 10_000_000,
        "fraction": 0.83, "exhausted": False, "period": None, "window_seconds": None, "time": "2026-12-01T12:00:00Z",
    }


def test_a_token_event_has_no_micro_usd_fields():
    (fire,) = Principal((rule(thresholds=(1.0,)),)).step(balance(120))
    assert fire.event["unit"] == "tokens" and fire.event["spent"] == 120 and fire.event["limit"] == 100
    assert "spent_micro_usd" not in fire.event


# --- signatures and backoff ---------------------------------------------------------------


def test_a_signature_verifies_and_a_tampered_body_or_old_timestamp_does_not():
    body = b'{"id":"evt_1"}'
    header = alerts.sign("s3cret", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert alerts.verify("s3cret", header, body, now=1_700_000_010)
    assert not alerts.verify("s3cret", header, body + b" ", now=1_700_000_010)
    assert not alerts.verify("other", header, body, now=1_700_000_010)
    assert not alerts.verify("s3cret", header, body, now=1_700_000_000 + 301)
    assert not alerts.verify("s3cret", header.replace("t=1700000000", "t=1700000300"), body, now=1_700_000_300)
    assert not alerts.verify("s3cret", "garbage", body, now=1_700_000_000)


def test_backoff_doubles_up_to_five_minutes():
    assert [alerts.backoff_s(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert alerts.backoff_s(9) == 256 and alerts.backoff_s(10) == 300 and alerts.backoff_s(10_000) == 300


# --- the shell: a real receiver, a real SQLite file ---------------------------------------


class Receiver:
    """A tiny HTTP/1.1 server (h11 on Trio) that records requests and answers with scripted statuses."""

    def __init__(self, statuses: tuple[int, ...] = (), hang_s: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses)  # answered in turn; then 200
        self.hang_s = hang_s
        self.port = 0

    async def start(self, nursery: trio.Nursery, port: int = 0) -> "Receiver":
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._serve, port, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read(conn, stream)
                if request is None:
                    return
                await trio.sleep(self.hang_s)
                status = self.statuses.pop(0) if self.statuses else 200
                self.requests.append({**request, "status": status})
                reply = conn.send(h11.Response(status_code=status, headers=[("content-length", "2")]))
                await stream.send_all(reply + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    @staticmethod
    async def _read(conn: h11.Connection, stream: trio.SocketStream) -> dict[str, Any] | None:
        head, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and head is None:
                    return None
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {k.decode(): v.decode() for k, v in head.headers}
                return {"method": head.method.decode(), "target": head.target.decode(), "headers": headers,
                        "body": body, "received_at": time.time()}
            else:
                return None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_store(path: Path) -> SyncStore:
    conn = connect(path)
    conn.executescript(ALERTS_SCHEMA)
    return SyncStore(conn)


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    text = metrics.registry.render().decode()
    label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{label_text} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def eventually(predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """A bounded wait for an asynchronous effect, not a timing assertion."""
    with trio.fail_after(timeout_s):
        while not (value := predicate()):
            await trio.sleep(0.01)
    return value


async def queue_alerts(store: SyncStore, rules: tuple[AlertRule, ...], spent: int = 96, outbox_max: int = 10_000,
                       principal_id: str = "key_a") -> list[Fire]:
    """What the budget service does after a settlement: evaluate, commit the ops."""
    fired = load_fired(store.conn)
    decisions = evaluate(rules, "key", principal_id, [balance(spent)], fired, time.time(), new_event_id)
    await store.commit(fire_ops(decisions, rules, time.time(), outbox_max))
    return [d for d in decisions if isinstance(d, Fire)]


def delivery(store: SyncStore, metrics: GatewayMetrics, rules: tuple[AlertRule, ...], **kwargs: Any) -> AlertDelivery:
    kwargs.setdefault("backoff", lambda attempts: 0.05)
    return AlertDelivery(store, time.time, metrics, rules, **kwargs)


async def test_an_event_is_delivered_once_with_a_valid_signature(tmp_path, nursery):
    receiver = await Receiver().start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.8,), secret="s3cret"),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    (fire,) = await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, rules).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_sent_total", alert="ops") == 1)
    await trio.sleep(0.2)  # nothing more arrives
    (request,) = receiver.requests
    headers = request["headers"]
    assert request["method"] == "POST" and request["target"] == "/hook"
    assert json.loads(request["body"]) == fire.event
    assert headers["content-type"] == "application/json" and headers["user-agent"] == "cortex-alerts/1"
    assert headers["x-cortex-event-id"] == fire.event["id"]
    assert alerts.verify("s3cret", headers["x-cortex-signature"], request["body"], now=time.time())
    assert outbox_depth(store.conn) == 0 and sample(metrics, "cortex_alerts_outbox") == 0


async def test_an_event_for_a_receiver_that_is_down_is_delivered_once_it_is_up(tmp_path, nursery):
    port = closed_port()
    rules = (rule(url=f"http://127.0.0.1:{port}/hook", thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    (fire,) = await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, rules).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_failed_total", reason="connect") >= 2)
    assert outbox_depth(store.conn) == 1
    (attempts, last_error), = store.conn.execute("SELECT attempts, last_error FROM alert_outbox").fetchall()
    assert attempts >= 2 and "ConnectError" in last_error
    receiver = await Receiver().start(nursery, port)
    await eventually(lambda: outbox_depth(store.conn) == 0)
    assert [json.loads(r["body"])["id"] for r in receiver.requests] == [fire.event["id"]]
    assert sample(metrics, "cortex_alerts_sent_total", alert="ops") == 1


async def test_a_500_is_retried_and_the_event_delivered_once(tmp_path, nursery):
    receiver = await Receiver(statuses=(500,)).start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, rules).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_sent_total", alert="ops") == 1)
    await trio.sleep(0.2)
    assert [r["status"] for r in receiver.requests] == [500, 200]
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    assert sample(metrics, "cortex_alerts_failed_total", reason="status") == 1
    assert outbox_depth(store.conn) == 0


async def test_a_slow_receiver_counts_as_a_timeout(tmp_path, nursery):
    receiver = await Receiver(hang_s=1.0).start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, rules, timeout_s=0.1, backoff=lambda attempts: 5.0).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_failed_total", reason="timeout") == 1)
    assert outbox_depth(store.conn) == 1


async def test_an_event_that_keeps_failing_expires(tmp_path, nursery):
    receiver = await Receiver(statuses=(503,) * 1000).start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, rules, retry_for_s=0.3).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_failed_total", reason="expired") == 1)
    assert outbox_depth(store.conn) == 0
    assert len(receiver.requests) >= 2 and sample(metrics, "cortex_alerts_sent_total", alert="ops") == 0


async def test_a_full_outbox_drops_the_oldest_events_and_counts_them(tmp_path, nursery):
    receiver = await Receiver().start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    fires = []
    for n in range(5):
        fires += await queue_alerts(store, rules, outbox_max=3, principal_id=f"key_{n}")
    kept = [row[0] for row in store.conn.execute("SELECT event_id FROM alert_outbox ORDER BY seq")]
    assert len(kept) == 3 and kept == [f.event["id"] for f in fires[2:]]
    await nursery.start(delivery(store, metrics, rules, outbox_max=3).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_sent_total", alert="ops") == 3)
    assert sample(metrics, "cortex_alerts_failed_total", reason="outbox_full") == 2
    assert sorted(json.loads(r["body"])["principal"]["id"] for r in receiver.requests) == ["key_2", "key_3", "key_4"]
    assert store.conn.execute("SELECT value FROM alert_counters").fetchall() == [(0,)]  # counted once, not again


async def test_queued_events_survive_a_restart(tmp_path, nursery):
    path, port = tmp_path / "ledger.db", closed_port()
    rules = (rule(url=f"http://127.0.0.1:{port}/hook", thresholds=(0.5, 0.8)),)
    store, metrics = open_store(path), GatewayMetrics()
    fires = await queue_alerts(store, rules)
    with trio.CancelScope() as first_life:  # the first process: the receiver is down, then shutdown
        async with trio.open_nursery() as inner:
            await inner.start(delivery(store, metrics, rules).run)
            await eventually(lambda: sample(metrics, "cortex_alerts_failed_total", reason="connect") >= 2)
            first_life.cancel()
    store.conn.close()
    receiver = await Receiver().start(nursery, port)
    store, metrics = open_store(path), GatewayMetrics()
    await nursery.start(delivery(store, metrics, rules).run)
    await eventually(lambda: sample(metrics, "cortex_alerts_sent_total", alert="ops") == 2)
    assert sorted(json.loads(r["body"])["id"] for r in receiver.requests) == sorted(f.event["id"] for f in fires)


async def test_fired_state_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.db"
    rules = (rule(thresholds=(0.5, 0.8)),)
    store = open_store(path)
    await queue_alerts(store, rules, spent=90)
    key_05 = ("ops", "key", "key_a", "balance_tokens", 0.5)
    await store.commit([RearmAlert(("ops", "key", "key_a", "balance_tokens", 0.8))])
    store.conn.close()
    fired = load_fired(open_store(path).conn)
    assert fired == {key_05: "100"}
    decisions = evaluate(rules, "key", "key_a", [balance(90)], fired, NOW, ids())
    assert thresholds_of(decisions) == [0.8]  # 0.5 is still fired; 0.8 was re-armed


async def test_applying_the_same_fire_twice_queues_one_event(tmp_path):
    store = open_store(tmp_path / "ledger.db")
    op = FireAlert(("ops", "key", "k", "balance_tokens", 0.5), "", "evt_1", "ops", URL, b"{}", NOW)
    await store.commit([op])
    await store.commit([op])
    assert outbox_depth(store.conn) == 1


async def test_an_event_of_a_removed_rule_is_dropped_and_counted_not_sent(tmp_path, nursery):
    receiver = await Receiver().start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,), secret="s3cret"),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    await queue_alerts(store, rules)
    await nursery.start(delivery(store, metrics, ()).run)  # the config no longer has the rule
    await eventually(lambda: outbox_depth(store.conn) == 0)
    assert receiver.requests == []
    assert sample(metrics, "cortex_alerts_failed_total", reason="rule_removed") == 1


async def test_wake_delivers_an_event_queued_while_running(tmp_path, nursery):
    receiver = await Receiver().start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    store, metrics = open_store(tmp_path / "ledger.db"), GatewayMetrics()
    sender = delivery(store, metrics, rules, poll_max_s=60.0)
    await nursery.start(sender.run)
    await trio.sleep(0.05)
    await queue_alerts(store, rules)
    sender.wake()
    with trio.fail_after(2):  # far sooner than the 60 s poll
        await eventually(lambda: receiver.requests)


async def test_the_threaded_store_delivers_and_records_fires(tmp_path, nursery):
    from cortex.budget.store import ThreadedStore

    path = tmp_path / "ledger.db"
    open_store(path).conn.close()  # the lead's connect() will create the alert tables itself
    receiver = await Receiver().start(nursery)
    rules = (rule(url=receiver.url, thresholds=(0.5,)),)
    metrics = GatewayMetrics()
    async with ThreadedStore.open(path) as store:
        fired = await store.query(load_fired)
        decisions = evaluate(rules, "key", "key_a", [balance(60)], fired, time.time(), new_event_id)
        await store.commit(fire_ops(decisions, rules, time.time()))
        async with trio.open_nursery() as inner:
            await inner.start(delivery(store, metrics, rules).run)
            await eventually(lambda: sample(metrics, "cortex_alerts_sent_total", alert="ops") == 1)
            assert await store.query(outbox_depth) == 0
            inner.cancel_scope.cancel()
        assert await store.query(load_fired) == {("ops", "key", "key_a", "balance_tokens", 0.5): "100"}
    assert len(receiver.requests) == 1
