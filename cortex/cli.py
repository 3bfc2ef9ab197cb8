"""The `cortex` command: `serve` the gateway, or bring `up` the embedded default."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cortex import config as config_mod
from cortex import logs
from cortex.app import CortexApp
from cortex.config import Config, ConfigError
from cortex.serving import announce, serve, wait_for_signal

DEFAULT_UP_LISTEN = "127.0.0.1:8080"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cortex", description="cortex: a Trio-native LLM gateway with hard budgets")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway in front of neurons")
    s.add_argument("--listen", help="HOST:PORT to listen on (server.listen; default 127.0.0.1:8080)")
    s.add_argument("--neuron", action="append", dest="neurons", metavar="URL", help="neuron base URL (repeatable; fleet.neurons)")
    s.add_argument("--config", type=Path, help="TOML config file; flags override it")
    s.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="log.level")

    u = sub.add_parser("up", help="run the embedded default: cortex plus an in-process mock neuron")
    u.add_argument("--listen", default=DEFAULT_UP_LISTEN, help=f"HOST:PORT (default {DEFAULT_UP_LISTEN})")
    u.add_argument("--log-level", choices=config_mod.LOG_LEVELS, default="info")
    return parser


def serve_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {"listen": args.listen},
        "fleet": {"neurons": args.neurons},
        "log": {"level": args.log_level},
    }
    return config_mod.load(args.config, overrides)


async def run_gateway(config: Config) -> None:
    app = CortexApp(config)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve,
                app,
                config.server.listen,
                shutdown_trigger=wait_for_signal,
                graceful_timeout_s=config.server.graceful_timeout_s,
            )
        )
        announce("listening", service="cortex", url=binds[0], neurons=list(config.fleet.neurons))


async def run_up(listen: str) -> None:
    """cortex on `listen` in front of a mock neuron on an ephemeral port, one process."""
    from neuron.app import NeuronApp, NeuronConfig

    async with trio.open_nursery() as nursery:
        neuron_binds = await nursery.start(partial(serve, NeuronApp(NeuronConfig()), "127.0.0.1:0"))
        config = config_mod.from_mapping({"server": {"listen": listen}, "fleet": {"neurons": [neuron_binds[0]]}})
        app = CortexApp(config)
        binds = await nursery.start(partial(serve, app, listen))
        print(_welcome(binds[0], neuron_binds[0]), flush=True)
        await wait_for_signal()
        nursery.cancel_scope.cancel()


def _welcome(url: str, neuron_url: str) -> str:
    return f"""
cortex is up at {url}  (mock neuron at {neuron_url}, model `cortex-mock`)

  curl {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "cortex-mock", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='unused'); \\
print(c.chat.completions.create(model='cortex-mock', messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

Press Ctrl+C to stop.
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = serve_config(args)
            logs.configure(config.log.level)
            trio.run(run_gateway, config)
        else:
            config_mod.from_mapping({"server": {"listen": args.listen}})  # validate early
            logs.configure(args.log_level)
            trio.run(run_up, args.listen)
    except ConfigError as exc:
        print(f"cortex: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
