"""`cortex keys|accounts|usage|fleet` against a running server, over the data dir's admin socket (real processes)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cortex import cli as cortex_cli
from tests.budget_helpers import ADMIN_TOKEN, HI_PROMPT_TOKENS, MODEL, admin, budget_cortex, chat
from tests.conftest import Proc, Stack, wait_until

COST = HI_PROMPT_TOKENS + 10  # one `chat` with its default max_tokens


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(data_dir: Path, *args: str) -> Ran:
    """The CLI's own `main`, in this process: the servers are real processes, and the
    concurrency test runs the CLI as processes too; this keeps the many calls fast."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cortex_cli.main([*args, "--data-dir", str(data_dir)])
    return Ran(code, out.getvalue(), err.getvalue())


def cli_json(data_dir: Path, *args: str) -> Any:
    result = cli(data_dir, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def socket_path(data_dir: Path) -> Path:
    return data_dir / "admin.sock"


def over_socket(data_dir: Path, method: str, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(socket_path(data_dir)))
    with httpx.Client(transport=transport, base_url="http://cortex", timeout=30) as http:
        return http.request(method, path, **kwargs)


def tokenless_cortex(stack: Stack, *neurons: Proc, args_extra: tuple[str, ...] = ()) -> Proc:
    """Keys required, but no admin token: the socket alone administers it."""
    return stack.cortex(*neurons, args=args_extra, auth=True)


def test_every_change_takes_effect_at_once_on_a_server_without_an_admin_token(stack: Stack):
    cortex = tokenless_cortex(stack, stack.neuron())
    data = cortex.data_dir
    assert cortex.announcement["admin"] is False and cortex.announcement["admin_socket"] == str(socket_path(data))
    created = cli_json(data, "keys", "create", "--name", "agent", "--account", "team", "--balance", str(COST - 1))
    key_id, key = created["id"], created["key"]
    assert chat(cortex, key).status_code == 429  # one token short
    assert cli_json(data, "keys", "topup", key_id, "1")["usage"]["remaining"]["balance_tokens"] == COST
    assert chat(cortex, key).status_code == 200

    cli_json(data, "keys", "set-limits", key_id, "--window-tokens", "1", "--window-seconds", "600")
    assert chat(cortex, key).json()["error"]["code"] == "rate_limit_exceeded"
    cli_json(data, "keys", "set-limits", key_id)  # no flags: no caps
    assert chat(cortex, key).status_code == 200

    cli_json(data, "accounts", "set-limits", "team", "--balance", str(3 * COST - 1))  # the key has spent 2 * COST
    assert chat(cortex, key).json()["error"]["code"] == "insufficient_quota"
    assert cli_json(data, "accounts", "topup", "team", "1")["remaining"]["balance_tokens"] == COST
    assert chat(cortex, key).status_code == 200
    assert cli_json(data, "accounts", "show", "team")["spent_tokens"] == 3 * COST

    cli_json(data, "accounts", "create", "lab", "--max-concurrency", "0")
    assert [a["id"] for a in cli_json(data, "accounts", "list")["data"]] == ["lab", "team"]
    lab_key = cli_json(data, "keys", "create", "--name", "intern", "--account", "lab")["key"]
    assert chat(cortex, lab_key).json()["error"]["code"] == "rate_limit_exceeded"

    usage = cli_json(data, "usage", key_id)["data"][0]
    assert usage["usage"]["spent_tokens"] == 3 * COST and [r["state"] for r in usage["recent"]] == ["settled"] * 3
    cli_json(data, "keys", "revoke", key_id)
    assert chat(cortex, key).status_code == 401
    assert {k["name"]: k["revoked"] for k in cli_json(data, "keys", "list")["data"]} == {"agent": True, "intern": False}


COMMANDS = [
    ("keys", "list"), ("keys", "show", "{key}"), ("accounts", "list"), ("accounts", "show", "team"),
    ("usage",), ("usage", "{key}"),
    ("keys", "show", "key_nope"), ("keys", "topup", "key_nope", "5"), ("accounts", "show", "nope"),
    ("keys", "set-limits", "{key}", "--window-tokens", "5"), ("keys", "topup", "{revoked}", "-1"),
]


def _outputs(data: Path, key_id: str, revoked_id: str) -> list[tuple[int, str, str]]:
    runs = []
    for command in COMMANDS:
        argv = [a.format(key=key_id, revoked=revoked_id) for a in command]
        for json_flag in ((), ("--json",)):
            r = cli(data, *argv, *json_flag)
            runs.append((r.returncode, r.stdout, r.stderr))
    return runs


def _socket_requests(cortex: Proc) -> list[dict[str, Any]]:
    return [e for e in cortex.log_events() if e.get("event") == "request" and e.get("listener") == "admin_socket"]


def test_output_and_exit_codes_are_the_same_online_and_offline(stack: Stack):
    cortex = tokenless_cortex(stack, stack.neuron())
    data = cortex.data_dir
    key = cli_json(data, "keys", "create", "--name", "agent", "--account", "team", "--balance", "10000",
                   "--window-tokens", "5000", "--window-seconds", "3600", "--period", "monthly", "--period-tokens",
                   "90000", "--period-anchor-day", "31")
    revoked = cli_json(data, "keys", "create", "--name", "gone")
    cli_json(data, "keys", "revoke", revoked["id"])
    cli_json(data, "accounts", "set-limits", "team", "--max-concurrency", "4", "--period", "daily", "--period-tokens",
             "50000", "--period-timezone", "Europe/Berlin")
    assert chat(cortex, key["key"]).status_code == 200
    asked_before = len(_socket_requests(cortex))
    online = _outputs(data, key["id"], revoked["id"])
    sent = 2 * (len(COMMANDS) - 1)  # each but the one refused before it is sent (--window-tokens alone)
    wait_until(lambda: len(_socket_requests(cortex)) - asked_before == sent)  # the server answered, not the files
    cortex.stop()
    assert cortex.popen.returncode == 0 and not socket_path(data).exists()
    offline = _outputs(data, key["id"], revoked["id"])
    assert online == offline
    by_command = dict(zip([c for c in COMMANDS for _ in (0, 1)], online))
    assert json.loads(by_command[("usage", "{key}")][1])["data"][0]["usage"]["spent_tokens"] == COST
    assert by_command[("keys", "show", "key_nope")] == (1, "", "cortex: no key 'key_nope'.\n")
    assert by_command[("accounts", "show", "nope")] == (1, "", "cortex: no account 'nope'.\n")
    assert by_command[("keys", "topup", "{revoked}", "-1")][0] == 1


def test_money_and_period_changes_from_the_cli_take_effect_at_once_on_a_running_server(stack: Stack):
    catalogue = stack.tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\ncost = {{ input = 1.0, output = 1.0 }}\n')
    cortex = tokenless_cortex(stack, stack.neuron(), args_extra=("--models", str(catalogue)))
    data = cortex.data_dir
    key = cli_json(data, "keys", "create", "--name", "agent", "--balance-usd", "0.000001")
    assert chat(cortex, key["key"]).status_code == 429  # one micro-USD cannot pay for COST tokens
    shown = cli_json(data, "keys", "topup", key["id"], "--usd", "0.01")
    assert shown["limits"]["balance_usd"] == 0.010001
    assert chat(cortex, key["key"]).status_code == 200
    # Today's spend (COST micro-USD so far) counts against a daily cap set now: no room for a second.
    daily = f"{COST * 3 // 2 / 10**6:.6f}"
    cli_json(data, "keys", "set-limits", key["id"], "--balance-usd", "1", "--period", "daily", "--period-usd", daily)
    r = chat(cortex, key["key"])
    assert r.status_code == 429 and "per day (UTC)" in r.json()["error"]["message"]
    assert 0 < int(r.headers["retry-after"]) <= 86400  # the next UTC midnight
    human = cli(data, "usage", key["id"])
    assert human.returncode == 0 and "this daily period" in human.stdout and f"model {MODEL}" in human.stdout
    bad = cli(data, "keys", "set-limits", key["id"], "--period-usd", "1")
    assert bad.returncode == 1 and "'period'" in bad.stderr


def test_the_offline_cli_uses_the_servers_default_period_zone(stack: Stack):
    config = stack.tmp_path / "berlin.toml"
    config.write_text('[budget]\nperiod_timezone = "Europe/Berlin"\n')
    cortex = tokenless_cortex(stack, args_extra=("--config", str(config)))
    data = cortex.data_dir
    online = cli_json(data, "keys", "create", "--name", "agent", "--period", "daily", "--period-tokens", "5")
    cortex.stop()
    offline = cli_json(data, "keys", "set-limits", online["id"], "--period", "daily", "--period-tokens", "6")
    assert online["limits"]["period_timezone"] == offline["limits"]["period_timezone"] == "Europe/Berlin"


def test_the_socket_is_owner_only_and_serves_only_the_admin_api(stack: Stack):
    cortex = tokenless_cortex(stack)
    path = socket_path(cortex.data_dir)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert over_socket(cortex.data_dir, "GET", "/admin/v1/keys").json() == {"data": []}  # no token asked
    for method, route in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics")):
        r = over_socket(cortex.data_dir, method, route, json={} if method == "POST" else None)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", route
    # TCP is as before: without a token the admin API is off there.
    assert admin(cortex, "GET", "keys").json()["error"]["code"] == "admin_disabled"


def test_the_socket_gets_the_server_fixes_http2_is_refused(stack: Stack):
    cortex = tokenless_cortex(stack)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path(cortex.data_dir)))
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert b"HTTP/1.1 only" in received  # the GOAWAY of common/server_fixes.py, then the close


def test_sigterm_removes_the_socket(stack: Stack):
    cortex = tokenless_cortex(stack)
    assert socket_path(cortex.data_dir).is_socket()
    cortex.signal(signal.SIGTERM)
    assert cortex.popen.wait(15) == 0
    assert not socket_path(cortex.data_dir).exists()


def test_after_kill_9_the_cli_works_offline_and_the_next_server_replaces_the_stale_socket(stack: Stack):
    neuron = stack.neuron()
    cortex = tokenless_cortex(stack, neuron)
    data = cortex.data_dir
    created = cli_json(data, "keys", "create", "--name", "agent", "--balance", "0")
    cortex.kill()
    assert socket_path(data).is_socket()  # left behind, and nothing listens on it
    topped = cli_json(data, "keys", "topup", created["id"], str(COST))  # on the files
    assert topped["usage"]["limits"]["balance_tokens"] == COST
    restarted = stack.cortex(neuron, auth=True, data_dir=data)  # starts: the stale socket is no obstacle
    assert chat(restarted, created["key"]).status_code == 200  # it loaded the offline top-up
    assert chat(restarted, created["key"]).status_code == 429
    cli_json(data, "keys", "topup", created["id"], str(COST))  # over the new socket, into its memory
    assert chat(restarted, created["key"]).status_code == 200
    wait_until(lambda: [e["path"] for e in _socket_requests(restarted)] == [f"/admin/v1/keys/{created['id']}/topup"])


def test_concurrent_topups_from_the_cli_and_the_admin_api_all_count(stack: Stack):
    cortex = budget_cortex(stack)
    data = cortex.data_dir
    key_id = cli_json(data, "keys", "create", "--name", "agent", "--balance", "1000")["id"]
    cli_amounts = [1 << i for i in range(6)]  # distinct bits: any lost top-up shows in the sum
    api_amounts = [1 << i for i in range(6, 26)]
    argv = [sys.executable, "-m", "cortex", "keys", "topup", key_id]
    procs = [subprocess.Popen([*argv, str(n), "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for n in cli_amounts]
    statuses: list[int] = []

    def api_topup(n: int) -> None:
        statuses.append(admin(cortex, "POST", f"keys/{key_id}/topup", {"tokens": n}).status_code)

    threads = [threading.Thread(target=api_topup, args=(n,)) for n in api_amounts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert statuses == [200] * len(api_amounts)
    balance = cli_json(data, "keys", "show", key_id)["usage"]["limits"]["balance_tokens"]
    assert balance == 1000 + sum(cli_amounts) + sum(api_amounts)
    # Every CLI top-up went to the server, none to the files.
    wait_until(lambda: sum(e["path"].endswith("/topup") for e in _socket_requests(cortex)) == len(cli_amounts))


def test_fleet_reload_goes_over_the_socket_without_a_token_and_falls_back_to_the_url(stack: Stack):
    models = stack.tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "{MODEL}"\n[aliases]\n"sonnet" = "{MODEL}"\n')
    cortex = stack.cortex(args=("--models", str(models)), auth=True)
    env = {k: v for k, v in os.environ.items() if k != "CORTEX_ADMIN_TOKEN"}
    argv = [sys.executable, "-m", "cortex", "fleet", "reload", "--data-dir", str(cortex.data_dir), "--url", cortex.url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "catalogue reloaded" in r.stdout and "sonnet -> cortex-mock" in r.stdout
    cortex.kill()  # the socket is stale now: the URL (with a token) is the way, and the server is gone
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "admin token" in r.stderr
    r = subprocess.run([*argv, "--admin-token", ADMIN_TOKEN], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_cortex_up_serves_the_socket_too(tmp_path):
    data = tmp_path / "up"
    argv = [sys.executable, "-m", "cortex", "up", "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    proc = Proc(argv, tmp_path / "up.log")
    try:
        banner = "".join(proc.read_line() for _ in range(5))  # printed once the socket is up
        url = re.search(r"cortex is up at (http://\S+)", banner).group(1)
        token = re.search(r"admin token .*: (\S+)", banner).group(1)
        cli_json(data, "keys", "create", "--name", "cli")  # a change: only the server could make it now
        keys = httpx.get(url + "/admin/v1/keys", headers={"authorization": f"Bearer {token}"}, timeout=10).json()
        assert [k["name"] for k in keys["data"]] == ["demo", "cli"]
    finally:
        proc.stop()
    assert proc.popen.returncode == 0 and not socket_path(data).exists()


def test_with_no_server_the_cli_ignores_a_stale_socket_file(tmp_path):
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path(data)))
    stale.close()  # bound, never listening, closed: what kill -9 leaves
    created = cli_json(data, "keys", "create", "--name", "agent", "--balance", "5")
    assert cli_json(data, "keys", "topup", created["id"], "5")["usage"]["limits"]["balance_tokens"] == 10
    missing = cli(data, "keys", "topup", "key_x", "5")
    assert (missing.returncode, missing.stderr) == (1, "cortex: no key 'key_x'.\n")


def test_a_change_on_a_locked_data_dir_without_a_socket_fails_clearly_and_a_read_still_works(tmp_path, monkeypatch):
    from cortex import admin_cli
    from cortex.budget import datadir

    data = tmp_path / "d"
    key_id = cli_json(data, "keys", "create", "--name", "agent", "--balance", "5")["id"]
    monkeypatch.setattr(admin_cli, "BUSY_WAIT_S", 0.3)
    lock = datadir.lock(data)  # as a server too old to serve the socket would hold it
    try:
        assert cli_json(data, "keys", "show", key_id)["usage"]["limits"]["balance_tokens"] == 5
        refused = cli(data, "keys", "topup", key_id, "5")
    finally:
        lock.close()
    assert refused.returncode == 1
    assert "in use by a running cortex" in refused.stderr and "does not answer on" in refused.stderr


def test_a_change_waits_for_a_lock_held_briefly_by_another_cli(tmp_path):
    from cortex.budget import datadir

    data = tmp_path / "d"
    key_id = cli_json(data, "keys", "create", "--name", "agent", "--balance", "5")["id"]
    lock = datadir.lock(data)
    threading.Timer(0.3, lock.close).start()  # well inside BUSY_WAIT_S
    assert cli_json(data, "keys", "topup", key_id, "5")["usage"]["limits"]["balance_tokens"] == 10
