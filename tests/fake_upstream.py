"""A fake neuron at the HTTP boundary, for upstream misbehaviour we cannot get from a real one."""

from __future__ import annotations

import socket
import threading


class FakeUpstream:
    """A fake neuron at the HTTP boundary: healthy to polls, broken for generation."""

    def __init__(self, generation_reply: bytes) -> None:
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
            request = conn.recv(65536)
            if request.startswith(b"GET /health"):
                body = b'{"status":"ok"}'
            elif request.startswith(b"GET /v1/models"):
                body = b'{"data":[{"id":"cortex-mock","limit":{"context":1000,"output":100}}]}'
            else:
                conn.sendall(self.reply)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()
