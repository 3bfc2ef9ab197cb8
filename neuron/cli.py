"""`neuron serve`: the per-host daemon."""

from __future__ import annotations

import argparse
import sys
from functools import partial

import trio

from common.serving import announce, parse_listen, run_daemon, serve, shutdown_signals
from neuron.app import ModelSpec, NeuronApp, NeuronConfig
from neuron.engines.mock import MockEngine, Pacing


def _listen(value: str) -> str:
    try:
        parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _bounded(kind: type, low: float, high: float) -> object:
    def parse(value: str) -> object:
        try:
            parsed = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value}") from None
        if not low <= parsed <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {value}")
        return parsed

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron", description="neuron: the per-host model daemon behind cortex")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve an OpenAI-compatible API for one engine")
    s.add_argument("--listen", type=_listen, default="127.0.0.1:9000", help="HOST:PORT (port 0 picks a free one)")
    s.add_argument("--engine", choices=["mock"], default="mock")
    s.add_argument("--model", action="append", dest="models", metavar="NAME", help="model to serve (repeatable)")
    s.add_argument("--context-length", type=_bounded(int, 1, 2**30), default=32768, help="context window, tokens")
    s.add_argument("--max-output-tokens", type=_bounded(int, 1, 2**30), default=4096, help="limit.output, tokens")
    s.add_argument("--ttft-ms", type=_bounded(float, 0, 3_600_000), default=0.0, help="mock: time to first token")
    s.add_argument("--token-interval-ms", type=_bounded(float, 0, 60_000), default=0.0, help="mock: time per further token")
    s.add_argument("--reply-tokens", type=_bounded(int, 0, 2**30), default=256, help="mock: natural reply length")
    s.add_argument("--seed", type=_bounded(int, -(2**63), 2**63 - 1), default=0, help="mock: engine seed")
    s.add_argument("--chunk-tokens", type=_bounded(int, 1, 2**20), default=1, help="tokens per streamed SSE event")
    s.add_argument("--slots", type=_bounded(int, 1, 2**20), default=256, help="concurrent generations")
    s.add_argument("--queue-depth", type=_bounded(int, 0, 2**24), default=4096, help="waiting generations before 503")
    return parser


def config_from_args(args: argparse.Namespace) -> NeuronConfig:
    names = args.models or ["cortex-mock"]
    models = [ModelSpec(n, args.context_length, args.max_output_tokens) for n in dict.fromkeys(names)]
    engine = MockEngine(
        seed=args.seed,
        reply_tokens=args.reply_tokens,
        pacing=Pacing(args.ttft_ms / 1000, args.token_interval_ms / 1000),
    )
    return NeuronConfig(
        models=models, engine=engine, slots=args.slots, queue_depth=args.queue_depth, chunk_tokens=args.chunk_tokens
    )


async def run_serve(config: NeuronConfig, listen: str) -> None:
    app = NeuronApp(config)
    with shutdown_signals() as trigger:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, listen, shutdown_trigger=trigger))
            announce("listening", service="neuron", url=binds[0], models=[m.name for m in config.models])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_daemon(
        run_serve, config_from_args(args), args.listen, prog="neuron", expected=(OSError,),
        prefix=f"cannot listen on {args.listen}: ",
    )


if __name__ == "__main__":
    sys.exit(main())
