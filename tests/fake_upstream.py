"""A fake neuron at the HTTP boundary, for upstream misbehaviour we cannot get from a real one."""

from __future__ import annotations

import socket
import threading
import time

MODELS_BODY = b'{"data":[{"id":"cortex-mock","limit":{"context":1000,"output":100}}]}'


class FakeUpstream:
    """A fake neuron at the HTTP boundary: healthy to polls, broken for generation."""

    def __init__(self, generation_reply: bytes | list[tuple[float, bytes]], models_body: bytes = MODELS_BODY) -> None:
        """`generation_reply`: the bytes of the reply, or (delay_s, bytes) pieces sent in turn."""
        self.models_body = models_body
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = generation_reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            if request.startswith(b"GET /health"):
                reply = _json_reply(b'{"status":"ok"}')
            elif request.startswith(b"GET /v1/models"):
                reply = _json_reply(self.models_body)
            else:
                reply = self.reply
            try:
                for delay_s, piece in reply if isinstance(reply, list) else [(0.0, reply)]:
                    time.sleep(delay_s)
                    conn.sendall(piece)
                # Close politely: unread data or an abrupt close would reset the connection
                # and turn the reply we mean to test into a different error.
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return  # the client left first (cortex gave up on a malformed reply): nothing to be polite to
            conn.settimeout(2)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    """The whole request: head, then as many body bytes as content-length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _json_reply(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body,
    )
