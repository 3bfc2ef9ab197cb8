"""`neuron serve`: the per-host daemon; `neuron make-checkpoint`: a preset as an HF directory.

`--engine mock` (the default) serves the deterministic mock engine.
`--engine kernel` serves real models: presets by name (`--model synth-tiny`)
or checkpoints (`--model-path DIR`), loaded and warmed up before the
server listens, so the `listening` line on stdout means ready. A model
that cannot load (a bad checkpoint, `--device cuda` without a GPU, over
`--memory-mb`) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial

import trio

from common.serving import JsonLines, announce, parse_listen, run_daemon, serve, shutdown_signals
from neuron.app import ModelSpec, NeuronApp, NeuronConfig, kernel_spec
from neuron.engines import kernel_engine
from neuron.engines.kernel_engine import KernelEngine, LoadSpec
from neuron.engines.mock import MockEngine, Pacing

# Flags of one engine only, with their defaults: given to the other engine, they are an error.
MOCK_ONLY = {
    "context_length": 32768, "ttft_ms": 0.0, "token_interval_ms": 0.0, "reply_tokens": 256, "chunk_tokens": 1,
    "slots": 256, "queue_depth": 4096, "model_memory_mb": 1024.0, "load_ms": 0.0,
}
KERNEL_ONLY = {
    "model_path": None, "served_name": None, "device": "auto", "backend": "auto", "max_in_flight": 64,
    "kv_budget_mb": 512.0, "max_queue_depth": 256, "queue_wait_s": 30.0,
    "prefill_budget_tokens": kernel_engine.KernelEngine.prefill_budget_tokens,
}


class StartupError(Exception):
    """A model could not be loaded or does not fit: exit status 2, one line."""


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
    s.add_argument("--engine", choices=["mock", "kernel"], default="mock")
    s.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="model to serve (repeatable); kernel: a preset name (synth-tiny, synth-small)")
    s.add_argument("--max-output-tokens", type=_bounded(int, 1, 2**30), default=4096, help="limit.output, tokens")
    s.add_argument("--seed", type=_bounded(int, -(2**63), 2**63 - 1), default=0,
                   help="mock: engine seed; kernel: mixed into the seed of requests that bring none")
    s.add_argument("--memory-mb", type=_bounded(float, 0, 2**40), default=None,
                   help="memory budget for all loaded models (kernel default: the device's memory; mock: none)")
    s.add_argument("--drain-timeout-s", type=_bounded(float, 0, 3600), default=30.0,
                   help="an unload waits this long for in-flight work, then cancels it")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="JSON lines on stderr; info logs one line per generation "
                        "(default: info for the kernel engine, warning for the mock, as quiet as it always was)")
    m = s.add_argument_group("mock engine")
    m.add_argument("--context-length", type=_bounded(int, 1, 2**30), help="context window, tokens (default 32768)")
    m.add_argument("--ttft-ms", type=_bounded(float, 0, 3_600_000), help="time to first token")
    m.add_argument("--token-interval-ms", type=_bounded(float, 0, 60_000), help="time per further token")
    m.add_argument("--reply-tokens", type=_bounded(int, 0, 2**30), help="natural reply length (default 256)")
    m.add_argument("--chunk-tokens", type=_bounded(int, 1, 2**20), help="tokens per streamed SSE event (default 1)")
    m.add_argument("--slots", type=_bounded(int, 1, 2**20), help="concurrent generations (default 256)")
    m.add_argument("--queue-depth", type=_bounded(int, 0, 2**24), help="waiting generations before 503 (default 4096)")
    m.add_argument("--model-memory-mb", type=_bounded(float, 0, 2**40),
                   help="memory each model pretends to take, for --memory-mb (default 1024)")
    m.add_argument("--load-ms", type=_bounded(float, 0, 3_600_000),
                   help="how long a load through POST /models/load pretends to take (default 0)")
    k = s.add_argument_group("kernel engine")
    k.add_argument("--model-path", metavar="DIR", help="a checkpoint directory in the Hugging Face layout")
    k.add_argument("--served-name", metavar="NAME", help="the model id to serve it as (one model only)")
    k.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    k.add_argument("--backend", choices=["auto", "numpy", "numba", "cupy"],
                   help="auto: cupy on cuda, else numba (default auto)")
    k.add_argument("--max-in-flight", type=_bounded(int, 1, 4096), help="sequences in one batch (default 64)")
    k.add_argument("--kv-budget-mb", type=_bounded(float, 0.001, 2**30), help="KV cache per model, MiB (default 512)")
    k.add_argument("--max-queue-depth", type=_bounded(int, 0, 2**20), help="sequences waiting for admission (default 256)")
    k.add_argument("--queue-wait-s", type=_bounded(float, 0.001, 3600), help="longest a sequence waits queued (default 30)")
    k.add_argument("--prefill-budget-tokens", type=_bounded(int, 1, 2**20),
                   help="prompt tokens prefilled per step; longer prompts go in chunks (default 2048)")
    c = sub.add_parser("make-checkpoint", help="write a preset as a Hugging Face checkpoint directory")
    c.add_argument("preset", choices=list(kernel_engine.PRESET_NAMES))
    c.add_argument("directory")
    c.add_argument("--shards", type=_bounded(int, 1, 64), default=1, help="safetensors shards (with an index when > 1)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return parser


def _settle_engine_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the other engine's flags; fill in this engine's defaults."""
    mine, theirs = (KERNEL_ONLY, MOCK_ONLY) if args.engine == "kernel" else (MOCK_ONLY, KERNEL_ONLY)
    for name in theirs:
        if getattr(args, name) is not None:
            other = "mock" if args.engine == "kernel" else "kernel"
            parser.error(f"--{name.replace('_', '-')} applies to --engine {other} only")
    for name, default in mine.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def mock_config(args: argparse.Namespace) -> NeuronConfig:
    names = args.models or ["cortex-mock"]
    models = [ModelSpec(n, args.context_length, args.max_output_tokens) for n in dict.fromkeys(names)]
    engine = MockEngine(
        seed=args.seed,
        reply_tokens=args.reply_tokens,
        pacing=Pacing(args.ttft_ms / 1000, args.token_interval_ms / 1000),
    )
    config = NeuronConfig(
        models=models, engine=engine, slots=args.slots, queue_depth=args.queue_depth, chunk_tokens=args.chunk_tokens,
        memory_mb=args.memory_mb, model_memory_mb=args.model_memory_mb, context_tokens=args.context_length,
        output_tokens=args.max_output_tokens, drain_timeout_s=args.drain_timeout_s, load_s=args.load_ms / 1000,
    )
    needed_mb = len(models) * args.model_memory_mb
    if args.memory_mb is not None and needed_mb > args.memory_mb:
        raise StartupError(f"{len(models)} models of {args.model_memory_mb:g} MiB do not fit --memory-mb {args.memory_mb:g}")
    return config


def kernel_load_specs(args: argparse.Namespace) -> list[LoadSpec]:
    names = list(dict.fromkeys(args.models or []))
    count = len(names) + (args.model_path is not None)
    if args.served_name is not None and count != 1:
        raise StartupError("--served-name names one model: give exactly one --model or --model-path")
    for name in names:
        if name not in kernel_engine.PRESET_NAMES:
            raise StartupError(f"--model {name}: not a preset ({', '.join(kernel_engine.PRESET_NAMES)}); "
                               "use --model-path DIR for a checkpoint")
    specs = [LoadSpec(args.served_name or name, preset=name, device=args.device, backend=args.backend) for name in names]
    if args.model_path is not None:
        name = args.served_name or os.path.basename(os.path.normpath(args.model_path))
        specs.append(LoadSpec(name, path=args.model_path, device=args.device, backend=args.backend))
    return specs


def kernel_config(args: argparse.Namespace) -> NeuronConfig:
    """Estimate every start-up model against the budget first, then load and warm each up."""
    from neuron.engines.kernel.runner import KernelConfigError  # noqa: PLC0415 - numpy and friends

    engine = KernelEngine(
        backend=args.backend, device=args.device, max_in_flight=args.max_in_flight,
        max_queue_depth=args.max_queue_depth, queue_wait_s=args.queue_wait_s, kv_budget_mb=args.kv_budget_mb,
        prefill_budget_tokens=args.prefill_budget_tokens, output_tokens=args.max_output_tokens, seed=args.seed,
    )
    specs = kernel_load_specs(args)
    try:
        if args.backend in ("auto", "numba"):  # its thread settings are the server's: check them at start-up
            try:
                import neuron.engines.kernel.numba_ops  # noqa: F401, PLC0415 - reads NEURON_*_THREADS
            except ImportError:
                pass  # a load says so, naming --backend numpy
        budget_mb = args.memory_mb
        if budget_mb is None:
            budget_mb = kernel_engine.device_memory_bytes(args.device) / 2**20
        needed = sum(kernel_engine.estimate_bytes(spec, engine) for spec in specs)
        if needed > budget_mb * 2**20:
            raise StartupError(f"the models need about {needed / 2**20:.1f} MiB (weights plus --kv-budget-mb each), "
                               f"over the memory budget of {budget_mb:.1f} MiB")
        preloaded = [kernel_engine.load_sync(spec, engine, kernel_spec) for spec in specs]
    except KernelConfigError as exc:
        raise StartupError(str(exc)) from None
    return NeuronConfig(models=[], engine=engine, memory_mb=budget_mb, drain_timeout_s=args.drain_timeout_s,
                        preloaded=preloaded, output_tokens=args.max_output_tokens)


def config_from_args(args: argparse.Namespace) -> NeuronConfig:
    return kernel_config(args) if args.engine == "kernel" else mock_config(args)


async def run_serve(config: NeuronConfig, listen: str) -> None:
    app = NeuronApp(config)
    with shutdown_signals() as trigger:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, listen, shutdown_trigger=trigger))
            announce("listening", service="neuron", url=binds[0], engine=config.engine.name, models=list(app.models))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("neuron")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def make_checkpoint(args: argparse.Namespace) -> int:
    from neuron.engines.kernel.checkpoint import make_checkpoint as write  # noqa: PLC0415
    from neuron.engines.kernel.runner import KernelConfigError  # noqa: PLC0415

    try:
        directory = write(args.preset, args.directory, shards=args.shards, dtype=args.dtype)
    except (KernelConfigError, OSError) as exc:
        print(f"neuron make-checkpoint: error: {exc}", file=sys.stderr)
        return 2
    announce("checkpoint_written", preset=args.preset, directory=directory)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "make-checkpoint":
        return make_checkpoint(args)
    _settle_engine_flags(parser, args)
    configure_logging(args.log_level or ("info" if args.engine == "kernel" else "warning"))
    try:
        config = config_from_args(args)
    except StartupError as exc:
        print(f"neuron serve: error: {exc}", file=sys.stderr)
        return 2
    return run_daemon(
        run_serve, config, args.listen, prog="neuron", expected=(OSError,),
        prefix=f"cannot listen on {args.listen}: ",
    )


if __name__ == "__main__":
    sys.exit(main())
