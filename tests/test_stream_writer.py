"""The stream writer: keep-alives while idle, never two sends at once, no spin under a slow client."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from cortex.proxy import _Writer


class _Shape:
    ping_interval_s = 10.0

    def __init__(self) -> None:
        self.pings = 0

    def ping(self) -> bytes:
        self.pings += 1
        return b"event: ping\n\n"


class _Client:
    """An ASGI send that records each body and can be made slow; flags overlapping sends."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.delay_s = 0.0
        self.sending = False
        self.overlaps = 0

    async def send(self, message: dict) -> None:
        if self.sending:
            self.overlaps += 1
        self.sending = True
        try:
            await trio.sleep(self.delay_s)
            self.bodies.append(message["body"])
        finally:
            self.sending = False


async def _run(client: _Client, shape: _Shape, body: object, steps: "_Steps | None" = None) -> None:
    writer = _Writer(SimpleNamespace(send=client.send), pings=True)
    async with trio.open_nursery() as nursery:
        if steps is not None:
            steps.scope = nursery.cancel_scope
        nursery.start_soon(writer.ping_while_idle, shape)
        await body(writer)
        nursery.cancel_scope.cancel()


def test_an_idle_stream_pings_once_per_interval() -> None:
    client, shape = _Client(), _Shape()

    async def body(writer: _Writer) -> None:
        await writer.write(b"a")
        await trio.sleep(35)  # silent upstream: pings at 10, 20, 30
        await writer.write(b"b")

    trio.run(_run, client, shape, body, clock=trio.testing.MockClock(autojump_threshold=0))
    assert client.bodies == [b"a", *[b"event: ping\n\n"] * 3, b"b"]
    assert client.overlaps == 0


def test_a_slow_client_gets_no_ping_mid_write_and_the_pinger_does_not_spin() -> None:
    client, shape = _Client(), _Shape()
    steps = _Steps()

    async def body(writer: _Writer) -> None:
        client.delay_s = 45.0  # one write blocked for 4.5 ping intervals
        await writer.write(b"slow")
        client.delay_s = 0.0
        await writer.write(b"next")

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(_run, client, shape, body, steps, clock=clock, instruments=[steps])
    assert client.overlaps == 0
    assert shape.pings == 0  # the stream was never idle: a write was under way
    assert client.bodies == [b"slow", b"next"]
    assert steps.count < 100  # a pinger that spun on its past deadline would take thousands


class _Steps(trio.abc.Instrument):
    """Counts task steps; a run past 10,000 is cancelled, so a spin fails the test instead of hanging it."""

    def __init__(self) -> None:
        self.count = 0
        self.scope: trio.CancelScope | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1
        if self.count > 10_000 and self.scope is not None:
            self.scope.cancel()


def test_a_write_waits_for_a_ping_already_on_the_wire() -> None:
    client, shape = _Client(), _Shape()

    async def body(writer: _Writer) -> None:
        await trio.sleep(10.5)  # the first ping went at 10 and takes 1 s on a slow link
        await writer.write(b"data")

    client.delay_s = 1.0
    trio.run(_run, client, shape, body, clock=trio.testing.MockClock(autojump_threshold=0))
    assert client.overlaps == 0
    assert client.bodies == [b"event: ping\n\n", b"data"]
