"""The command line: `cortex up`, `cortex serve` lifecycle, `neuron serve` flags."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Proc, Stack


def test_cortex_up_serves_the_embedded_default_and_prints_how_to_use_it(tmp_path):
    argv = [sys.executable, "-m", "cortex", "up", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    proc = Proc(argv, tmp_path / "up.log")
    try:
        banner = "".join(proc.read_line() for _ in range(5))
        url = re.search(r"cortex is up at (http://127\.0\.0\.1:\d+)", banner).group(1)
        key = re.search(r"demo key .*: (sk-cx-\S+)", banner).group(1)
        admin_token = re.search(r"admin token .*: (\S+)", banner).group(1)
        example = "".join(proc.read_line() for _ in range(6))
        assert f"curl {url}/v1/chat/completions -H 'authorization: Bearer {key}'" in example
        assert "from openai import OpenAI" in example
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="cortex-mock", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert reply.usage.completion_tokens == 8
        with pytest.raises(openai.AuthenticationError):
            wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-cx-wrong", max_retries=0)
            wrong.chat.completions.create(model="cortex-mock", messages=[{"role": "user", "content": "hi"}])
        keys = httpx.get(url + "/admin/v1/keys", headers={"authorization": f"Bearer {admin_token}"}).json()["data"]
        assert [k["name"] for k in keys] == ["demo"]
    finally:
        proc.stop()
    assert proc.popen.returncode == 0


def test_cortex_serve_stops_cleanly_on_sigterm(stack: Stack):
    neuron = stack.neuron()
    cortex = stack.cortex(neuron)
    cortex.signal(signal.SIGTERM)
    assert cortex.popen.wait(15) == 0


def test_cortex_serve_with_no_neurons_starts_down_and_says_so(stack: Stack):
    cortex = stack.cortex()
    health = cortex.get_json("/health")
    assert health["status"] == "down" and health["neurons"]["total"] == 0


def test_cortex_serve_refuses_a_busy_port(stack: Stack, tmp_path):
    neuron = stack.neuron()
    port = neuron.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()
    assert '"listening"' not in result.stdout


def test_neuron_rejects_bad_flags_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "neuron", "serve", "--listen", "nowhere"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


def test_cortex_serve_on_a_data_dir_in_use_says_so_and_never_announces(stack: Stack, tmp_path):
    first = stack.cortex(data_dir=tmp_path / "shared")
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(first.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "in use by a running cortex" in result.stderr
    assert '"listening"' not in result.stdout and "Traceback" not in result.stderr


def test_neuron_on_a_busy_port_says_so_without_a_traceback(stack: Stack):
    neuron = stack.neuron()
    port = neuron.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "neuron", "serve", "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_neuron_flags_are_bounded():
    for argv in (["--seed", str(2**70)], ["--context-length", "0"], ["--ttft-ms", "inf"], ["--ttft-ms", "nan"]):
        result = subprocess.run([sys.executable, "-m", "neuron", "serve", *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and ("must be from" in result.stderr or "not a number" in result.stderr)


def test_neither_daemon_imports_the_other():
    """cortex and neuron share only common/: checked on the source, not by convention."""
    import ast

    root = Path(__file__).resolve().parent.parent
    for package, other in (("cortex", "neuron"), ("neuron", "cortex")):
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    assert name.split(".")[0] != other, f"{path.relative_to(root)} imports {name}"
