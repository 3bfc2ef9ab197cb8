"""Hypercorn 0.18's Trio connection handler, with three fixes.

`install()` makes `hypercorn.trio.serve` handle each connection with
`FixedTCPServer` instead of `hypercorn.trio.tcp_server.TCPServer`.
Site-packages are not edited; `common.serving.serve` calls `install()`.

1. HTTP/1.1 only. Hypercorn answers `Upgrade: h2c` with 101 and switches
   to HTTP/2, and switches as well on the prior-knowledge preface. Over
   HTTP/2 a client that drops a response without sending RST_STREAM (httpx
   and httpcore 1.0.9 never send it) cannot be told apart from a slow
   reader: the neuron generates on for it (see docs/ARCHITECTURE.md).
   Over HTTP/1.1 dropping a response means closing its connection, which
   every server sees. So the h2c upgrade is ignored (RFC 9110 section 7.8
   allows this) and the request is answered in HTTP/1.1. The preface gets
   SETTINGS and GOAWAY(HTTP_1_1_REQUIRED), then the connection is closed.
2. A connection that the peer has closed is closed at once. Hypercorn
   waits for its keep-alive timer (`keep_alive_timeout`, 75 s) first.
3. `write_timeout_s` limits how long one socket write may block. Hypercorn
   shields that write, so the app's own deadline around `send` cannot
   interrupt it while a client reads nothing.

The class depends on hypercorn's private connection internals (checked
against 0.18.0). `tests/test_server_layer.py` checks each fix from outside.
"""

from __future__ import annotations

import h11
import trio
from h2.errors import ErrorCodes
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_trio_run
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hyperframe.frame import GoAwayFrame, SettingsFrame

# What a server sends an HTTP/2 client that it will not serve: its (empty)
# connection preface, then GOAWAY with the error code made for this case.
REFUSE_HTTP2 = (
    SettingsFrame(0).serialize()
    + GoAwayFrame(
        0, last_stream_id=0, error_code=ErrorCodes.HTTP_1_1_REQUIRED, additional_data=b"HTTP/1.1 only"
    ).serialize()
)
REFUSE_LINGER_S = 1.0  # how long to read what a refused client still sends, so closing does not reset it

_STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, AttributeError)


class ServerConfig(HypercornConfig):
    """Hypercorn's config, plus the settings `FixedTCPServer` reads."""

    write_timeout_s: float | None = None  # the longest one socket write may block; None: no limit


class Http2Refused(Exception):
    """An HTTP/2 prior-knowledge preface arrived; we serve HTTP/1.1 only."""


class H11OnlyProtocol(H11Protocol):
    async def _check_protocol(self, event: h11.Request) -> None:
        # Hypercorn switches to HTTP/2 here. We ignore `Upgrade: h2c`: h11
        # takes the request's upgrade offer as declined when the response is
        # not a 101, so the exchange goes on in HTTP/1.1.
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            raise Http2Refused()


class FixedTCPServer(TCPServer):
    """One client connection; see the module docstring for what differs."""

    _peer_closed = False

    async def _read_data(self) -> None:
        # Runs once per connection, after the protocol exists and before any
        # byte is parsed: the place to put the HTTP/1.1-only protocol in.
        wrapper = self.protocol
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol = H11OnlyProtocol(
                wrapper.app, wrapper.config, wrapper.context, wrapper.task_group, wrapper.state,
                wrapper.ssl, wrapper.client, wrapper.server, wrapper.send,
            )
        try:
            await super()._read_data()
        except Http2Refused:
            await self._refuse_http2()
        finally:
            # The peer has closed or reset the connection, or we refused it,
            # so no further request can arrive. The keep-alive timer has
            # nothing left to guard. Stop it, so that the connection's task
            # group (and with it the socket) ends once in-flight requests end.
            # This cannot cut a request short. Hypercorn stops the timer
            # itself while a request is in flight, and in-flight requests are
            # tasks of their own. They have already been sent http.disconnect
            # by super()._read_data().
            self._peer_closed = True
            await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated) and event.idle and self._peer_closed:
            # A response that finished after the peer left would re-arm the
            # keep-alive timer on a connection that can take no new request.
            return
        timeout_s = getattr(self.config, "write_timeout_s", None)
        if isinstance(event, RawData) and timeout_s is not None:
            await self._send_bounded(event.data, timeout_s)
            return
        await super().protocol_send(event)

    async def _send_bounded(self, data: bytes, timeout_s: float) -> None:
        """TCPServer's shielded write, given a deadline inside the shield.

        The shield stays: a write cut off part-way would corrupt the framing.
        A write that times out leaves the stream in an unknown state, so the
        connection is dropped. The protocol is then told it closed, which
        sends the app http.disconnect.
        """
        async with self.send_lock:
            gone = False
            with trio.CancelScope(shield=True):
                with trio.move_on_after(timeout_s) as timer:
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        gone = True
                if timer.cancelled_caught:
                    await trio.aclose_forcefully(self.stream)
                    gone = True
            if gone:
                await self.protocol.handle(Closed())

    async def _close(self) -> None:
        # Hypercorn sends EOF and closes without the send lock, so a response
        # write still in progress raced it ("another task is currently
        # sending data"). Under the lock, a close waits for that write, which
        # the write timeout bounds.
        if self.send_lock.statistics().owner is trio.lowlevel.current_task():
            await super()._close()
            return
        async with self.send_lock:
            await super()._close()

    async def _refuse_http2(self) -> None:
        await self.protocol_send(RawData(data=REFUSE_HTTP2))
        # Read (for a bounded time) whatever the client still sends, until it
        # closes. Closing with unread input would send an RST, and the client
        # could lose the GOAWAY before reading it.
        with trio.move_on_after(REFUSE_LINGER_S):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(MAX_RECV):
                    pass
            except _STREAM_GONE:
                pass


def install() -> None:
    """Make hypercorn's Trio worker serve each connection with `FixedTCPServer`.

    Idempotent. Raises if something else already replaced hypercorn's class.
    """
    current = hypercorn_trio_run.TCPServer
    if current is FixedTCPServer:
        return
    if current is not TCPServer:
        raise RuntimeError(f"hypercorn.trio.run.TCPServer is {current!r}, not hypercorn's own; refusing to replace it")
    hypercorn_trio_run.TCPServer = FixedTCPServer  # type: ignore[misc]
