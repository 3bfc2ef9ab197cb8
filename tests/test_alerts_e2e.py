"""Budget alerts end to end: a real cortex process, a real HTTP receiver on loopback, restarts, a receiver that is down."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from cortex.budget.alerts import verify
from tests.budget_helpers import HI_PROMPT_TOKENS, budget_cortex, chat, create_key
from tests.conftest import Stack, wait_until

SECRET = "whsec-test-0123456789"
COST = HI_PROMPT_TOKENS + 10


class Receiver:
    """A webhook receiver: records each POST (headers, body) and answers 204."""

    def __init__(self, port: int = 0) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.events]


def _config(url: str) -> str:
    return f'[[alerts]]\nname = "ops"\nurl = "{url}"\nthresholds = [0.5, 1.0]\nsecret = "{SECRET}"\n'


def _metric(cortex, name: str) -> float:
    text = httpx.get(cortex.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_each_threshold_fires_exactly_once_signed_and_not_again_after_a_restart(stack: Stack):
    receiver = Receiver()
    try:
        neuron = stack.neuron()
        cortex = budget_cortex(stack, neuron, config=_config(receiver.url))
        key_id, key = create_key(cortex, balance_tokens=4 * COST)
        for _ in range(2):
            assert chat(cortex, key).status_code == 200
        wait_until(lambda: len(receiver.events) == 1)
        headers, body = receiver.events[0]
        assert verify(SECRET, headers["x-cortex-signature"], body, time.time())
        assert not verify(SECRET, headers["x-cortex-signature"], body.replace(b"0.5", b"0.6"), time.time())
        event = receiver.payloads()[0]
        assert (event["principal"], event["cap"], event["threshold"]) == ({"kind": "key", "id": key_id}, "balance_tokens", 0.5)
        assert (event["spent"], event["limit"], event["alert"]) == (2 * COST, 4 * COST, "ops")
        assert headers["x-cortex-event-id"] == event["id"]
        data = cortex.data_dir
        cortex.stop()
        # The fired state is in the ledger: a restart neither re-fires 0.5 nor loses 1.0.
        cortex = budget_cortex(stack, neuron, config=_config(receiver.url), data_dir=data)
        for _ in range(2):
            assert chat(cortex, key).status_code == 200
        assert chat(cortex, key).status_code == 429
        wait_until(lambda: len(receiver.events) == 2)
        time.sleep(0.5)  # anything more would arrive now: the outbox is polled on every commit
        assert [(e["threshold"], e["spent"]) for e in receiver.payloads()] == [(0.5, 2 * COST), (1.0, 4 * COST)]
        assert len({e["id"] for e in receiver.payloads()}) == 2
        assert _metric(cortex, "cortex_alerts_sent_total") == 1
    finally:
        receiver.close()


def test_events_fired_while_the_receiver_is_down_are_delivered_later_even_across_a_restart(stack: Stack):
    receiver = Receiver()
    port, url = receiver.port, receiver.url
    receiver.close()  # down from the start
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron, config=_config(url))
    key_id, key = create_key(cortex, balance_tokens=2 * COST)
    assert chat(cortex, key).status_code == 200  # 50%
    wait_until(lambda: _metric(cortex, 'cortex_alerts_failed_total{reason="connect"}') >= 1)
    assert _metric(cortex, "cortex_alerts_outbox") == 1
    data = cortex.data_dir
    cortex.stop()  # the event is still undelivered: it waits in the ledger's outbox
    receiver = Receiver(port)
    try:
        cortex = budget_cortex(stack, neuron, config=_config(url), data_dir=data)
        wait_until(lambda: len(receiver.events) == 1, timeout_s=20)
        assert chat(cortex, key).status_code == 200  # 100%
        wait_until(lambda: len(receiver.events) == 2, timeout_s=20)
        assert [e["threshold"] for e in receiver.payloads()] == [0.5, 1.0]
        for headers, body in receiver.events:
            assert verify(SECRET, headers["x-cortex-signature"], body, time.time())
        wait_until(lambda: _metric(cortex, "cortex_alerts_outbox") == 0)
    finally:
        receiver.close()
