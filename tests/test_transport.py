"""The h11 upstream transport against real loopback servers."""

from __future__ import annotations

import h11
import httpx
import pytest
import trio

from cortex.fleet.transport import H11Transport

BODY = b'{"ok":true}'


class CountingServer:
    """A tiny keep-alive HTTP/1.1 server that counts connections.

    With `close_after_response`, it drops each connection right after
    answering, without saying so: a server closing an idle keep-alive
    connection, which a client pool must survive.
    """

    def __init__(self, close_after_response: bool = False, body_chunks: int = 1) -> None:
        self.connections = 0
        self.disconnects = trio.Event()
        self.close_after_response = close_after_response
        self.body_chunks = body_chunks
        self.url = ""

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    chunked = self.body_chunks > 1
                    headers = [("transfer-encoding", "chunked")] if chunked else [("content-length", str(len(BODY)))]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    for _ in range(self.body_chunks):
                        await stream.send_all(conn.send(h11.Data(data=BODY)))
                        if chunked:
                            await trio.sleep(0.01)
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    if self.close_after_response:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.disconnects.set()
            await stream.aclose()


async def test_sequential_requests_reuse_one_connection(nursery):
    server = CountingServer()
    await nursery.start(server.run)
    async with httpx.AsyncClient(transport=H11Transport()) as client:
        for _ in range(5):
            r = await client.post(server.url + "/x", content=b"hi")
            assert r.status_code == 200 and r.content == BODY
    assert server.connections == 1


async def test_concurrent_requests_open_one_connection_each_and_park_them(nursery):
    server = CountingServer()
    await nursery.start(server.run)
    transport = H11Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        async with trio.open_nursery() as inner:
            for _ in range(20):
                inner.start_soon(client.get, server.url + "/x")
        assert server.connections == 20
        assert sum(len(stack) for stack in transport._idle.values()) == 20
        await client.get(server.url + "/x")
        assert server.connections == 20


async def test_idle_connections_beyond_the_cap_are_closed_not_parked(nursery):
    server = CountingServer()
    await nursery.start(server.run)
    transport = H11Transport(max_idle_per_origin=2)
    async with httpx.AsyncClient(transport=transport) as client:
        async with trio.open_nursery() as inner:
            for _ in range(5):
                inner.start_soon(client.get, server.url + "/x")
        assert server.connections == 5
        assert sum(len(stack) for stack in transport._idle.values()) == 2


async def test_a_connection_the_server_closed_while_parked_is_replaced(nursery):
    server = CountingServer(close_after_response=True)
    await nursery.start(server.run)
    async with httpx.AsyncClient(transport=H11Transport()) as client:
        for _ in range(3):
            r = await client.get(server.url + "/x")
            assert r.content == BODY
            await trio.sleep(0.05)  # let the server's close reach us
    assert server.connections == 3


async def test_connection_refused_is_a_connect_error():
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        async with httpx.AsyncClient(transport=H11Transport()) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/x")


async def test_abandoning_a_response_mid_body_closes_its_connection(nursery):
    server = CountingServer(body_chunks=50)
    await nursery.start(server.run)
    transport = H11Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", server.url + "/x") as response:
            async for _ in response.aiter_raw():
                break
        with trio.fail_after(5):
            await server.disconnects.wait()  # the server saw the connection go
        assert not any(transport._idle.values())  # and it was not parked for reuse


async def test_https_is_refused_clearly():
    async with httpx.AsyncClient(transport=H11Transport()) as client:
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("https://127.0.0.1:1/x")


def _unanswered_port() -> tuple[int, list]:
    """A listener whose accept queue is full: further connects hang, as to a dead host."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held = [server]
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        held.append(filler)
    return port, held


async def test_a_connect_that_hangs_times_out_and_counts_as_unreachable():
    from cortex.config import UpstreamConfig
    from cortex.fleet.upstream import Upstream, UpstreamUnavailable

    port, held = _unanswered_port()
    try:
        upstream = Upstream(UpstreamConfig(connect_timeout_s=0.3))
        with trio.fail_after(10):
            with pytest.raises(UpstreamUnavailable, match="timed out connecting"):
                async with upstream.post(f"http://127.0.0.1:{port}", "/v1/completions", b"{}", {}):
                    pass
        await upstream.aclose()
    finally:
        for sock in held:
            sock.close()
