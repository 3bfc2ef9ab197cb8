#!/usr/bin/env python3
"""Benchmark the HTTP layer: cortex's raw ASGI toolkit vs Starlette.

Question: what does a framework cost per request, on the server cortex
actually runs (Hypercorn's Trio worker)?  cortex serves raw ASGI behind
``common.asgi.Router``; this measures that choice against Starlette.

What it does
------------
1. Starts one server subprocess per framework (this same file in
   ``--serve NAME`` mode), each through ``common.serving.serve`` -- i.e.
   Hypercorn's Trio worker with exactly cortex's Hypercorn configuration -- on
   127.0.0.1 with an ephemeral port.  Both answer ``POST /v1/echo`` by reading
   the whole JSON body, ``json``-decoding it and replying with a small JSON
   object (``{"ok":true,"model":...,"messages":N}``):

   ``raw``        ``common.asgi.Router`` + ``common.asgi.Request.body`` +
                  ``common.asgi.send_json``: what cortex uses.
   ``starlette``  ``Starlette(routes=[Route("/v1/echo", ..., methods=["POST"])])``
                  with ``await request.body()`` and ``JSONResponse`` (runs on
                  trio through anyio).  Needs ``pip install 'starlette>=0.37'``
                  (benchmark only, not a cortex dependency); skipped with a note
                  if it is missing.
2. Drives both with the lean trio + h11 load generator of
   ``scripts/_loadgen.py`` (one keep-alive connection per worker) at each
   concurrency level, for a fixed request count or a time cap, ``--repeats``
   times, alternating which framework goes first; reports medians.
3. Prints one Markdown table: per concurrency, req/s, p50/p99 ms and server
   CPU per request for each framework, and the raw/starlette throughput ratio
   (median of per-repeat paired ratios).

Usage
-----
    python scripts/bench_framework.py                  # full run (~1 min)
    python scripts/bench_framework.py --quick          # fewer requests, 1 repeat
    python scripts/bench_framework.py --concurrency 1,16,64 --repeats 5
    python scripts/bench_framework.py --serve raw      # one server only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _loadgen as lg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("raw", "starlette")
DEFAULT_CONCURRENCY = (1, 16)
PATH = "/v1/echo"
BODY_LIMIT = 1 << 20
REQUEST_BODY = json.dumps(
    {"model": "cortex-mock", "messages": [{"role": "user", "content": "bench"}], "max_tokens": 100},
    separators=(",", ":"),
).encode()
EXPECTED = {"ok": True, "model": "cortex-mock", "messages": 1}


def _reply(data: dict) -> dict:
    return {"ok": True, "model": data.get("model"), "messages": len(data.get("messages") or ())}


# --------------------------------------------------------------------------
# The two apps
# --------------------------------------------------------------------------


def make_raw_app():
    from common import asgi

    async def not_found(request: asgi.Request) -> None:
        await asgi.send_json(request.send, 404, {"error": "not found"})

    async def method_not_allowed(request: asgi.Request, methods: list[str]) -> None:
        await asgi.send_json(request.send, 405, {"error": "method not allowed"},
                            [(b"allow", ", ".join(methods).encode())])

    async def echo(request: asgi.Request) -> None:
        data = json.loads(await request.body(BODY_LIMIT))
        await asgi.send_json(request.send, 200, _reply(data))

    router = asgi.Router(not_found, method_not_allowed)
    router.add("POST", PATH, echo)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http":
            await router.dispatch(asgi.Request.from_scope(scope, receive, send))
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    return app


def make_starlette_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Request) -> JSONResponse:
        data = json.loads(await request.body())
        return JSONResponse(_reply(data))

    return Starlette(routes=[Route(PATH, echo, methods=["POST"])])


APP_FACTORIES = {"raw": make_raw_app, "starlette": make_starlette_app}


def serve_main(name: str) -> int:
    from functools import partial

    from common.serving import announce, serve, shutdown_signals

    app = APP_FACTORIES[name]()

    async def run() -> None:
        with shutdown_signals() as trigger:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(serve, app, "127.0.0.1:0", shutdown_trigger=trigger))
                announce("listening", service=f"bench-{name}", url=binds[0])

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------
# Measurement and report
# --------------------------------------------------------------------------


def _validate(body: bytes) -> None:
    got = json.loads(body)
    if got != EXPECTED:
        raise lg.BadResponse(f"unexpected reply {got!r}")


async def bench(args, servers: dict[str, lg.Daemon]) -> dict[tuple[str, int], list[lg.Result]]:
    reqs = {}
    for name, d in servers.items():
        host, port = d.host_port
        reqs[name] = lg.Req(host, port, PATH, REQUEST_BODY, validate=_validate)
    for name, req in reqs.items():
        lg.progress(f"warm-up {name} ...")
        res = await lg.run_point(req, max(args.concurrency), args.warmup_requests, args.warmup_seconds)
        if res.errors:
            raise RuntimeError(f"warm-up {name}: {res.errors} errors; first: {res.first_error}")

    results: dict[tuple[str, int], list[lg.Result]] = {(n, c): [] for n in reqs for c in args.concurrency}
    names = list(reqs)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for c in args.concurrency:
            for name in order:
                res = await lg.run_point(reqs[name], c, args.requests, args.max_seconds,
                                         probes={"server": servers[name].cpu_s})
                results[(name, c)].append(res)
                lg.progress(
                    f"[{r + 1}/{args.repeats}] c={c:<3d} {name:9s} {res.completed:5d} ok"
                    f"{'*' if res.truncated else ' '} {res.errors} err  {res.rps:8,.0f} req/s  "
                    f"p50 {res.pct_ms(0.5):6.2f}  p99 {res.pct_ms(0.99):6.2f} ms  "
                    f"server cpu {_cpu_ms(res):.3f} ms/req, loadgen {res.loadgen_cpu_pct:.0f}%"
                    + (f"  first error: {res.first_error}" if res.first_error else "")
                )
    return results


def _cpu_ms(res: lg.Result) -> float:
    return 1000.0 * res.extra["server"] / res.completed if res.completed else float("nan")


def format_table(results, names: list[str], concurrency: list[int]) -> str:
    cols = ["concurrency"]
    for n in names:
        cols += [f"{n} req/s", f"{n} p50 ms", f"{n} p99 ms", f"{n} CPU ms/req"]
    both = "raw" in names and "starlette" in names
    if both:
        cols += ["raw/starlette req/s", "starlette/raw CPU"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for c in concurrency:
        cells = [str(c)]
        for n in names:
            rs = results[(n, c)]
            cells += [
                lg.fmt(lg.median([r.rps for r in rs]), ",.0f"),
                lg.fmt(lg.median([r.pct_ms(0.5) for r in rs]), ".2f"),
                lg.fmt(lg.median([r.pct_ms(0.99) for r in rs]), ".2f"),
                lg.fmt(lg.median([_cpu_ms(r) for r in rs]), ".3f"),
            ]
        if both:
            pairs = list(zip(results[("raw", c)], results[("starlette", c)]))
            cells.append(lg.fmt(lg.median([a.rps / b.rps for a, b in pairs if b.rps]), ".2f"))
            cells.append(lg.fmt(lg.median([_cpu_ms(b) / _cpu_ms(a) for a, b in pairs]), ".2f"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark cortex's raw ASGI toolkit against Starlette on Hypercorn's Trio worker.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--serve", choices=FRAMEWORKS, help="run only that server (announces its URL on stdout)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per point, 1 repeat")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help=f"comma-separated subset of: {', '.join(FRAMEWORKS)} (default: %(default)s)")
    ap.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                    help="comma-separated concurrency levels (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, default=None, help="requests per point (default 6000, --quick 1000)")
    ap.add_argument("--max-seconds", type=float, default=None, help="time cap per point (default 3, --quick 1)")
    ap.add_argument("--label", default="", help="free text printed with the results")
    args = ap.parse_args(argv)
    if args.serve:
        return args
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
    if unknown or not args.frameworks:
        ap.error(f"unknown framework(s): {', '.join(unknown) or '(none)'}")
    args.concurrency = lg.parse_concurrency(ap, args.concurrency)
    lg.resolve_point_args(ap, args, requests=6000, quick_requests=1000, max_seconds=3.0, quick_max_seconds=1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main(args.serve)

    frameworks = list(args.frameworks)
    starlette_version = ""
    if "starlette" in frameworks:
        try:
            import starlette

            starlette_version = f"starlette {starlette.__version__}"
        except ImportError:
            print("note: skipping starlette (not installed; pip install 'starlette>=0.37')", file=sys.stderr)
            frameworks.remove("starlette")
    if not frameworks:
        return 2

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    servers: dict[str, lg.Daemon] = {}
    try:
        for name in frameworks:
            d = lg.Daemon(name, [sys.executable, str(Path(__file__).resolve()), "--serve", name],
                          env=env, cwd=str(REPO_ROOT))
            servers[name] = d
            d.wait_listening()
        lg.progress(", ".join(f"{n} {d.url}" for n, d in servers.items()))
        results = trio.run(bench, args, servers)
    finally:
        for d in servers.values():
            d.stop()

    print()
    print(f"Label: {args.label or '-'}; git {lg.git_rev(str(REPO_ROOT))}")
    print(f"Environment: {lg.versions(*filter(None, [starlette_version]))}")
    print(
        f"Hypercorn Trio worker (common.serving config), POST {PATH} with a {len(REQUEST_BODY)}-byte JSON body; "
        f"{args.requests} requests or {args.max_seconds:g} s per point, {args.repeats} repeat(s), medians"
    )
    print()
    print(format_table(results, frameworks, args.concurrency))
    print()
    print("CPU ms/req = server process CPU (user+sys, /proc) per request; ratios are medians of "
          "per-repeat paired values.")
    errors = sum(r.errors for rs in results.values() for r in rs)
    if errors:
        print(f"WARNING: {errors} failed requests in total (see progress on stderr).")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
