"""Regression tests for the hardening issue: each reproduces one defect an
adversarial review found, against real cortex and neuron processes."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.budget_helpers import HI, HI_PROMPT_TOKENS, MODEL, budget_cortex, chat, create_key, usage
from tests.conftest import Proc, Stack
from tests.fake_upstream import FakeUpstream


def _http_reply(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
        % (content_type, len(body), body)
    )


def _completion(content: str, usage_value: object) -> bytes:
    return json.dumps({
        "id": "x", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage_value,
    }).encode()


def _stream(pieces: list[str], usage_value: object) -> bytes:
    events = [
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}).encode() + b"\n\n" for p in pieces
    ]
    events.append(b"data: " + json.dumps({"choices": [], "usage": usage_value}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return _http_reply(b"".join(events), b"text/event-stream")


def _sse_text(body: str) -> tuple[str, list[dict]]:
    text, frames = "", []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            frame = json.loads(line[6:])
            frames.append(frame)
            for choice in frame.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
    return text, frames


def _metric(cortex, name: str) -> float:
    total = 0.0
    for line in httpx.get(cortex.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- 2. the output bound the hold covers is the bound the upstream gets ---------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_upstreams_with_different_output_limits_never_serve_past_the_hold(stack: Stack, stream):
    tight = stack.neuron("--max-output-tokens", "100", "--reply-tokens", "600")
    roomy = stack.neuron("--max-output-tokens", "4096", "--reply-tokens", "600")
    cortex = budget_cortex(stack, tight, roomy)
    hold = HI_PROMPT_TOKENS + 100  # the estimate takes the tightest limit.output in the fleet
    key_id, key = create_key(cortex, balance_tokens=2 * hold + 30)
    received = 0
    for _ in range(2):
        r = httpx.post(
            cortex.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": stream},
            headers={"authorization": f"Bearer {key}"}, timeout=60,
        )
        assert r.status_code == 200, r.text
        if stream:
            text, frames = _sse_text(r.text)
            assert "error" not in frames[-1]  # the upstream stopped by itself; the relay's guard did not cut it
        else:
            text = r.json()["choices"][0]["message"]["content"]
        assert len(text.encode()) <= 100
        received += HI_PROMPT_TOKENS + len(text.encode())
    assert tight.get_json("/health")["requests_total"] == 1 and roomy.get_json("/health")["requests_total"] == 1
    view = usage(cortex, key_id)["usage"]
    assert received <= view["spent_tokens"] <= 2 * hold + 30
    assert view["held_tokens"] == 0


def test_a_stream_past_its_bound_is_cut_at_the_bound_and_charged_for_what_was_relayed(stack: Stack):
    # An upstream that ignores max_tokens: 40 one-token events when 10 were allowed.
    fake = FakeUpstream(_stream(["x"] * 40, {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 40}))
    try:
        cortex = budget_cortex(stack, fake)
        key_id, key = create_key(cortex, balance_tokens=1000)
        r = chat(cortex, key, max_tokens=10, stream=True)
        text, frames = _sse_text(r.text)
        assert len(text) == 10
        assert frames[-1]["error"]["code"] == "upstream_error" and "allowed" in frames[-1]["error"]["message"]
        view = usage(cortex, key_id)["usage"]
        assert view["spent_tokens"] == HI_PROMPT_TOKENS + 10 and view["held_tokens"] == 0
    finally:
        fake.close()


def test_a_whole_response_past_its_bound_is_refused_and_costs_nothing(stack: Stack):
    fake = FakeUpstream(_http_reply(_completion("y" * 50, {"prompt_tokens": 9, "completion_tokens": 50})))
    try:
        cortex = budget_cortex(stack, fake)
        key_id, key = create_key(cortex, balance_tokens=1000)
        r = chat(cortex, key, max_tokens=10)
        assert r.status_code == 502 and "allowed" in r.json()["error"]["message"]
        view = usage(cortex, key_id)["usage"]
        assert view["spent_tokens"] == 0 and view["held_tokens"] == 0
    finally:
        fake.close()


# --- 3. whatever usage an upstream sends, settlement resolves the hold ----------------


@pytest.mark.parametrize(
    ("usage_value", "expected_charge"),
    [
        ("lots", HI_PROMPT_TOKENS + 5),
        ([1, 2], HI_PROMPT_TOKENS + 5),
        (12.5, HI_PROMPT_TOKENS + 5),
        ({"prompt_tokens": 9.0, "completion_tokens": 5.0}, HI_PROMPT_TOKENS + 5),
        ({"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 0}, HI_PROMPT_TOKENS + 5),
    ],
    ids=["string", "list", "float", "float-fields", "zero-below-relayed"],
)
def test_malformed_whole_usage_is_charged_by_cortexs_own_count_and_never_locks_the_key(stack: Stack, usage_value, expected_charge):
    fake = FakeUpstream(_http_reply(_completion("hello", usage_value)))
    try:
        cortex = budget_cortex(stack, fake)
        key_id, key = create_key(cortex, balance_tokens=1000, max_concurrency=2)
        for _ in range(3):  # a leaked hold would lock the key out by the third
            r = chat(cortex, key, max_tokens=10)
            assert r.status_code == 200, r.text
        view = usage(cortex, key_id)["usage"]
        assert view["spent_tokens"] == 3 * expected_charge
        assert view["held_tokens"] == 0 and view["in_flight"] == 0
        assert _metric(cortex, "cortex_usage_disagreements_total") == 3
    finally:
        fake.close()


@pytest.mark.parametrize(
    "usage_value", [0, "x", {"prompt_tokens": 1, "completion_tokens": 0}], ids=["zero", "string", "below-relayed"]
)
def test_a_streamed_usage_below_what_was_relayed_is_charged_what_was_relayed(stack: Stack, usage_value):
    fake = FakeUpstream(_stream(["ab"] * 10, usage_value))
    try:
        cortex = budget_cortex(stack, fake)
        key_id, key = create_key(cortex, balance_tokens=1000, max_concurrency=1)
        for _ in range(2):
            r = chat(cortex, key, max_tokens=40, stream=True)
            assert _sse_text(r.text)[0] == "ab" * 10
        view = usage(cortex, key_id)["usage"]
        assert view["spent_tokens"] == 2 * (HI_PROMPT_TOKENS + 20)  # an under-counted prompt is raised to its floor too
        assert view["held_tokens"] == 0 and view["in_flight"] == 0
        assert _metric(cortex, "cortex_usage_disagreements_total") == 2
    finally:
        fake.close()


# --- 8. nesting is bounded once, at parse time; non-standard numbers are refused -----


def _chat_with_extra(extra: bytes) -> bytes:
    return b'{"model": "cortex-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "extra": ' + extra + b"}"


@pytest.fixture(scope="module")
def refusing_pair(shared_stack: Stack) -> tuple[Proc, Proc]:
    """One neuron and cortex for cases that must all be refused before any hold: none changes the next."""
    neuron = shared_stack.neuron()
    return neuron, budget_cortex(shared_stack, neuron)


@pytest.mark.parametrize(
    "extra",
    [b"[" * 980 + b"]" * 980, b'{"a":' * 500 + b"1" + b"}" * 500, b"[" * 65 + b"]" * 65, b"NaN", b"Infinity", b"-Infinity"],
    ids=["lists-980-deep", "objects-500-deep", "just-past-the-bound", "nan", "infinity", "minus-infinity"],
)
def test_hostile_json_in_an_unknown_field_is_a_400_and_costs_no_hold(refusing_pair: tuple[Proc, Proc], extra):
    neuron, cortex = refusing_pair
    key_id, key = create_key(cortex, name=f"hostile-{len(extra)}-{extra[0]}", balance_tokens=1000)
    r = httpx.post(
        cortex.url + "/v1/chat/completions", content=_chat_with_extra(extra),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"}, timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    view = usage(cortex, key_id)
    assert view["recent"] == [] and view["usage"]["spent_tokens"] == 0
    assert neuron.get_json("/health")["requests_total"] == 0


def test_nesting_at_the_bound_is_still_served(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=1000)
    # The body itself is one level; the extra field may nest 63 more.
    r = httpx.post(
        cortex.url + "/v1/chat/completions", content=_chat_with_extra(b"[" * 63 + b"]" * 63),
        headers={"authorization": f"Bearer {key}"}, timeout=30,
    )
    assert r.status_code == 200, r.text


# --- 6. stalled request bodies: a deadline, and a bound on bytes buffered at once ------


def _stalled_body(url: str, key: str, declared: int, sent: int):
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + b" " * sent)
    return sock


def _recv_until(sock, marker: bytes, timeout_s: float = 20.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_status(sock) -> int:
    data = _recv_until(sock, b"\r\n")
    return int(data.split(b" ", 2)[1]) if data else 0


def test_stalled_bodies_time_out_with_408_and_past_the_buffer_bound_get_503(stack: Stack):
    neuron = stack.neuron()
    config = "[server]\nbody_timeout_s = 2.0\nbody_buffer_max_bytes = 3200000\n"
    cortex = budget_cortex(stack, neuron, config=config)
    _, key = create_key(cortex, balance_tokens=10_000)
    socks = []
    try:
        for _ in range(3):  # 3 x 1 MB fit under the 3.2 MB bound
            socks.append(_stalled_body(cortex.url, key, 4_000_000, 1_000_000))
        import time

        time.sleep(0.5)  # let cortex take those bytes before the next body arrives
        over = _stalled_body(cortex.url, key, 4_000_000, 1_000_000)
        assert _read_status(over) == 503
        over.close()
        assert [_read_status(s) for s in socks] == [408, 408, 408]
    finally:
        for s in socks:
            s.close()
    # Every buffered byte was given back: a normal request is served.
    assert chat(cortex, key, max_tokens=5).status_code == 200
    outcomes = [e.get("outcome") for e in cortex.log_events() if e.get("event") == "request"]
    assert outcomes.count("request_timeout") == 3 and outcomes.count("service_unavailable") == 1


# --- also: request ids, WebSocket upgrades, the admin token, file modes ------------------


def test_the_first_request_id_header_wins_and_ledger_rows_use_cortexs_own_ids(stack: Stack):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    key_id, key = create_key(cortex, balance_tokens=1000)
    body = {"model": MODEL, "messages": HI, "max_tokens": 3}
    headers = [("authorization", f"Bearer {key}"), ("x-request-id", "first-id"), ("x-request-id", "second-id")]
    for _ in range(2):  # the same client id twice must not collide in the ledger
        r = httpx.post(cortex.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.headers["x-request-id"] == "first-id"
    recent = usage(cortex, key_id)["recent"]
    ids = {row["request_id"] for row in recent}
    assert len(ids) == 2 and "first-id" not in ids and "second-id" not in ids
    logged = [e for e in cortex.log_events() if e.get("event") == "request" and e.get("path") == "/v1/chat/completions"]
    assert [e["client_request_id"] for e in logged] == ["first-id", "first-id"]
    assert {e["request_id"] for e in logged} == ids


@pytest.mark.parametrize("target", ["cortex", "neuron"])
def test_a_websocket_upgrade_is_a_clean_400(stack: Stack, target):
    import socket

    neuron = stack.neuron()
    proc = budget_cortex(stack, neuron) if target == "cortex" else neuron
    host, port = proc.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/chat/completions HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        data = _recv_until(sock, b"}}")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "websocket_not_supported"


@pytest.mark.parametrize("token", ["                    ", "  padded-admin-token-0123  ", "tab\there-admin-token-0123"])
def test_an_admin_token_with_whitespace_is_refused_at_start_up(tmp_path, token):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        env={**__import__("os").environ, "CORTEX_ADMIN_TOKEN": token}, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "admin.token" in r.stderr


def test_the_ledger_database_and_its_data_dir_are_owner_only(stack: Stack):
    import os
    import stat

    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=100)
    assert chat(cortex, key, max_tokens=2).status_code == 200
    data_dir = cortex.data_dir
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        path = data_dir / name
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name


# --- 1 (part). a client that stops reading cannot pin its hold -------------------------


def test_a_client_that_stops_reading_is_cut_off_by_the_write_timeout_and_settled(stack: Stack):
    import socket

    from tests.conftest import wait_until

    neuron = stack.neuron(
        "--reply-tokens", "3000000", "--max-output-tokens", "3000000", "--context-length", "3100000",
        "--chunk-tokens", "16",
    )
    cortex = budget_cortex(stack, neuron, config="[server]\nclient_write_timeout_s = 1.0\n")
    key_id, key = create_key(cortex, balance_tokens=10_000_000, max_concurrency=1)
    host, port = cortex.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        body = json.dumps({"model": MODEL, "messages": HI, "stream": True, "max_tokens": 3000000}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + key.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # then it never reads again
        wait_until(lambda: neuron.get_json("/health")["cancelled_total"] == 1, timeout_s=60)
        view = wait_until(lambda: (u := usage(cortex, key_id)["usage"])["in_flight"] == 0 and u, timeout_s=10)
        assert view["held_tokens"] == 0
        assert 0 < view["spent_tokens"] < 3000000  # what was relayed, not the hold
        # The key is free again while the stuck connection is still open.
        assert chat(cortex, key, max_tokens=3).status_code == 200
    finally:
        sock.close()
    events = [e for e in cortex.log_events() if e.get("event") == "request" and e.get("stream")]
    assert events[0]["outcome"] == "client_disconnected"


# --- 4 (part). cortex's own fd shortage is never blamed on the neuron ------------------


class _LocalShortage:
    """A transport whose connects fail the way trio's do when this process is out of fds."""

    def __init__(self, errno_value: int) -> None:
        self.errno_value = errno_value

    async def handle_async_request(self, request):
        try:
            try:
                raise OSError(self.errno_value, "Too many open files")
            except OSError as exc:
                raise OSError("all attempts to connect failed") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect: {exc}", request=request) from None

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("errno_name", ["EMFILE", "ENFILE", "ENOBUFS"])
async def test_a_local_fd_shortage_on_connect_is_cortexs_error_and_leaves_the_neuron_healthy(errno_name):
    import errno

    from cortex.config import FleetConfig, UpstreamConfig
    from cortex.fleet.health import poll_node
    from cortex.fleet.registry import Fleet, ModelInfo
    from cortex.fleet.upstream import LocalResourceError, Upstream

    upstream = Upstream(UpstreamConfig(), lambda url: _LocalShortage(getattr(errno, errno_name)))
    with pytest.raises(LocalResourceError):
        async with upstream.post("http://127.0.0.1:9", "/v1/chat/completions", b"{}", {}):
            pass
    fleet = Fleet(["http://127.0.0.1:9"], FleetConfig().unhealthy_after_failures)
    fleet.poll_succeeded("http://127.0.0.1:9", {MODEL: ModelInfo(MODEL, 100, 10)})
    for _ in range(3):
        await poll_node(fleet, upstream, "http://127.0.0.1:9", 1.0)
    node = fleet.node("http://127.0.0.1:9")
    assert node.healthy and node.failures == 0


async def test_a_refused_connect_is_still_the_neurons_fault():
    import errno

    from cortex.config import UpstreamConfig
    from cortex.fleet.upstream import Upstream, UpstreamUnavailable

    upstream = Upstream(UpstreamConfig(), lambda url: _LocalShortage(errno.ECONNREFUSED))
    with pytest.raises(UpstreamUnavailable):
        async with upstream.post("http://127.0.0.1:9", "/v1/chat/completions", b"{}", {}):
            pass


# --- found by the adversarial review of these fixes ------------------------------------


def _hostile(reply: bytes, stack: Stack, balance: int = 1000):
    fake = FakeUpstream(reply)
    cortex = budget_cortex(stack, fake)
    key_id, key = create_key(cortex, balance_tokens=balance)
    return fake, cortex, key_id, key


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": [{"type": "text", "text": "z" * 5000}]}}]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": "z" * 5000}}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "text": "z" * 5000}]},
    ],
    ids=["content-parts", "arguments-object", "text-beside-delta"],
)
def test_output_in_an_unexpected_shape_is_counted_and_bounded(stack: Stack, body):
    fake, cortex, key_id, key = _hostile(_http_reply(json.dumps({**body, "usage": {"prompt_tokens": 9, "completion_tokens": 10}}).encode()), stack)
    try:
        r = chat(cortex, key, max_tokens=10)
        assert r.status_code == 502 and "allowed" in r.json()["error"]["message"]
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == 0
    finally:
        fake.close()


def test_sse_events_ended_by_a_lone_cr_are_counted_and_cut_at_the_bound(stack: Stack):
    events = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\r\r' for _ in range(40))
    fake, cortex, key_id, key = _hostile(_http_reply(events + b"data: [DONE]\r\r", b"text/event-stream"), stack)
    try:
        text, frames = _sse_text(chat(cortex, key, max_tokens=10, stream=True).text.replace("\r", "\n"))
        assert len(text) <= 10 and frames[-1]["error"]["code"] == "upstream_error"
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + len(text)
    finally:
        fake.close()


def test_nothing_after_done_is_relayed_or_charged(stack: Stack):
    tail = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"late"}}]}\n\n' for _ in range(100))
    head = _stream(["x"] * 5, {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 5})
    fake, cortex, key_id, key = _hostile(head.replace(b"content-length: %d" % (len(head.split(b"\r\n\r\n", 1)[1])),
                                                      b"content-length: %d" % (len(head.split(b"\r\n\r\n", 1)[1]) + len(tail))) + tail, stack)
    try:
        r = chat(cortex, key, max_tokens=40, stream=True)
        assert _sse_text(r.text)[0] == "xxxxx" and "late" not in r.text
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + 5
    finally:
        fake.close()


def test_an_absurd_usage_count_is_malformed_and_never_breaks_the_ledger(stack: Stack):
    fake, cortex, key_id, key = _hostile(_http_reply(_completion("hello", {"prompt_tokens": 9, "completion_tokens": 2**64})), stack)
    try:
        assert chat(cortex, key, max_tokens=10).status_code == 200
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + 5
        data_dir = cortex.data_dir
        cortex.stop()
        restarted = budget_cortex(stack, fake, data_dir=data_dir)
        view = usage(restarted, key_id)
        assert view["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + 5  # durable, not orphaned
        assert [r["state"] for r in view["recent"]] == ["settled"]
    finally:
        fake.close()


def test_a_usage_that_zeroes_the_prompt_is_charged_the_prompt_anyway(stack: Stack):
    fake, cortex, key_id, key = _hostile(_stream(["ab"] * 10, {"prompt_tokens": 0, "completion_tokens": 0}), stack)
    try:
        chat(cortex, key, max_tokens=40, stream=True)
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == HI_PROMPT_TOKENS + 20
    finally:
        fake.close()


def test_a_200_that_carries_an_error_is_an_error_and_costs_nothing(stack: Stack):
    body = json.dumps({"error": {"message": "engine died", "type": "server_error"}}).encode()
    fake, cortex, key_id, key = _hostile(_http_reply(body), stack)
    try:
        r = chat(cortex, key, max_tokens=10)
        assert r.status_code == 502 and "engine died" in r.json()["error"]["message"]
        assert usage(cortex, key_id)["usage"]["spent_tokens"] == 0
    finally:
        fake.close()


def test_an_upstream_error_with_a_lone_surrogate_is_still_a_clean_json_error(stack: Stack):
    raw = b'{"error": {"message": "bad \\udc80 byte", "type": "invalid_request_error"}}'
    reply = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(raw), raw)
    fake, cortex, key_id, key = _hostile(reply, stack)
    try:
        r = chat(cortex, key, max_tokens=10)
        assert r.status_code == 400 and "bad" in r.json()["error"]["message"]
    finally:
        fake.close()


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
def test_a_float_that_overflows_to_infinity_is_a_400(stack: Stack, number):
    neuron = stack.neuron()
    cortex = budget_cortex(stack, neuron)
    _, key = create_key(cortex, balance_tokens=1000)
    r = httpx.post(cortex.url + "/v1/chat/completions", content=_chat_with_extra(number),
                   headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert neuron.get_json("/health")["requests_total"] == 0


def test_max_tokens_above_the_advertised_limit_is_refused_whichever_neuron_would_serve(stack: Stack):
    tight = stack.neuron("--max-output-tokens", "100")
    roomy = stack.neuron("--max-output-tokens", "4096")
    cortex = budget_cortex(stack, tight, roomy)
    _, key = create_key(cortex, balance_tokens=100_000)
    for _ in range(4):
        r = chat(cortex, key, max_tokens=200)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert tight.get_json("/health")["requests_total"] + roomy.get_json("/health")["requests_total"] == 0


def test_the_admin_body_deadline_follows_the_configuration(stack: Stack):
    import socket

    cortex = budget_cortex(stack, config="[server]\nbody_timeout_s = 1.0\n")
    host, port = cortex.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /admin/v1/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-admin-token-0123456789\r\n"
                     b"content-length: 100\r\n\r\n{")
        assert _read_status(sock) == 408
