"""Configuration: TOML validated at start-up with errors that name the key; flags win."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cortex import config
from cortex.config import ConfigError


def load_text(tmp_path, text, overrides=None):
    path = tmp_path / "cortex.toml"
    path.write_text(text)
    return config.load(path, overrides)


def test_defaults_need_no_file():
    c = config.load(None)
    assert c.server.listen == "127.0.0.1:8080"
    assert c.server.max_body_bytes == 4 * 1024 * 1024
    assert c.fleet.neurons == ()


def test_file_values_are_read(tmp_path):
    c = load_text(tmp_path, '[fleet]\nneurons = ["http://n1:9000"]\npoll_interval_s = 0.5\n[upstream]\nidle_timeout_s = 7\n')
    assert c.fleet.neurons == ("http://n1:9000",)
    assert c.fleet.poll_interval_s == 0.5
    assert c.upstream.idle_timeout_s == 7.0


def test_flags_override_the_file(tmp_path):
    c = load_text(
        tmp_path,
        '[server]\nlisten = "127.0.0.1:1111"\n[fleet]\nneurons = ["http://a:1"]\n',
        {"server": {"listen": "127.0.0.1:2222"}, "fleet": {"neurons": None}},
    )
    assert c.server.listen == "127.0.0.1:2222"
    assert c.fleet.neurons == ("http://a:1",)  # an unset flag leaves the file's value


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[fleet]\npol_interval_s = 1\n", "fleet.pol_interval_s"),
        ("[upstream]\nidle_timeout_s = 'soon'\n", "upstream.idle_timeout_s"),
        ("[upstream]\nconnect_timeout_s = -1\n", "upstream.connect_timeout_s"),
        ("[server]\nmax_body_bytes = 1.5\n", "server.max_body_bytes"),
        ("[server]\nlisten = 'nowhere'\n", "server.listen"),
        ("[fleet]\nneurons = ['ftp://x']\n", "fleet.neurons"),
        ("[fleet]\nneurons = 'http://x'\n", "fleet.neurons"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[fleet]\npoll_interval_s = nan\n", "fleet.poll_interval_s"),
        ("[budget]\nretry_hint_s = inf\n", "budget.retry_hint_s"),
        ("[budget]\nfallback_output_tokens = 99999999999999999\n", "budget.fallback_output_tokens"),
        ("[fleet]\nneurons = ['http://']\n", "fleet.neurons"),
        ("[fleet]\nneurons = ['http://a b']\n", "fleet.neurons"),
        ("[admin]\ntoken = 'sécret-sécret-sécret'\n", "admin.token"),
        ("[budgets]\ncap = 1\n", "budgets"),
        ("[budget]\nsynchronous = 'off'\n", "budget.synchronous"),
        ("[budget]\nauth_required = 1\n", "budget.auth_required"),
        ("[admin]\ntoken = 'short'\n", "admin.token"),
        ("fleet = 3\n", "fleet"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert key in str(info.value)


def test_a_section_that_is_not_a_table_is_a_config_error_even_with_flags(tmp_path):
    with pytest.raises(ConfigError, match="'server' must be a table"):
        load_text(tmp_path, "server = 1\n", {"server": {"listen": "127.0.0.1:1"}})


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[fleet\n")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_cortex_serve_exits_2_naming_the_bad_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[upstream]\nidle_timeout = 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown key 'upstream.idle_timeout'" in result.stderr
