"""`cortex-sim`: run, fuzz and list simulator scenarios."""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import httpx

from common.serving import leaf_error
from cortex.config import OUTPUT_HOLDS
from sim import report, runner
from sim.scenario import Scenario, ScenarioError, load
from sim.world import LedgerFaults

SCENARIO_DIR = Path(__file__).parent / "scenarios"


def resolve(name: str) -> Path:
    """A scenario file path, or the name of a bundled scenario."""
    path = Path(name)
    if path.exists():
        return path
    bundled = SCENARIO_DIR / f"{name.removesuffix('.toml')}.toml"
    if bundled.exists():
        return bundled
    raise ScenarioError(f"no scenario file {name!r}, and no bundled scenario of that name (see `cortex-sim list`)")


def bundled() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.toml"))


def _reproduce(scenario: Scenario, seed: int) -> str:
    return f"cortex-sim run {scenario.source} --seed {seed}"


def cmd_list(_: argparse.Namespace) -> int:
    for path in bundled():
        scenario = load(path)
        print(f"{scenario.name:<26} {scenario.description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    scenario = load(resolve(args.scenario))
    if args.live:
        return _run_live(args, scenario)
    faults = LedgerFaults(**{args.plant_bug: True}) if args.plant_bug else None
    if args.policy:
        scenario = runner.with_policy(scenario, args.policy)
    elif scenario.policies:
        return _run_policies(args, scenario, faults)
    result = runner.run(scenario, args.seed, faults, keep_samples=args.plot)
    print(report.summary_table(result.summary))
    if args.out:
        out = Path(args.out)
        report.write_outputs(out, result.summary, result.world.trace.lines)
        if args.plot:
            report.plot(out / "caps.png", result.world.checker.samples)
        print(f"wrote {out}/summary.json, {out}/trace.jsonl" + (f", {out}/caps.png" if args.plot else ""))
    elif args.plot:
        report.plot(Path("caps.png"), result.world.checker.samples)
        print("wrote caps.png")
    return _verdict(result)


def _run_policies(args: argparse.Namespace, scenario: Scenario, faults: LedgerFaults | None) -> int:
    """The world once per output-hold policy; each run's table, then the comparison."""
    comparison = runner.run_policies(scenario, args.seed, faults, keep_samples=args.plot)
    for policy, result in comparison.results.items():
        print(f"## under {policy} output holds\n")
        print(report.summary_table(result.summary) + "\n")
    print(report.policies_table(comparison.summary))
    out = Path(args.out) if args.out else None
    if out is not None:
        traces = {policy: result.world.trace.lines for policy, result in comparison.results.items()}
        print("wrote " + ", ".join(str(path) for path in report.write_policy_outputs(out, comparison.summary, traces)))
    if args.plot:
        for policy, result in comparison.results.items():
            report.plot((out or Path(".")) / f"caps.{policy}.png", result.world.checker.samples)
        print("wrote " + ", ".join(f"caps.{p}.png" for p in comparison.results))
    return _verdict(comparison)


def _verdict(result: runner.Result | runner.Comparison) -> int:
    if result.ok:
        print("\nresult: PASS (every invariant held; expectations met)")
        return 0
    if result.violation:
        print(f"\nINVARIANT VIOLATED in {result.scenario.name} with seed {result.seed} at {result.violation}")
        print("events leading up to it:")
        for line in result.recent_events:
            print("  " + line)
    for failure in result.expectation_failures:
        print(f"\nEXPECTATION FAILED: {failure}")
    print(f"\nreproduce: {_reproduce(result.scenario, result.seed)}")
    return 1


def _run_live(args: argparse.Namespace, scenario: Scenario) -> int:
    from sim.live import LiveError, run_live

    if not args.cortex or not args.admin_token:
        print("cortex-sim: --live needs --cortex URL and --admin-token T", file=sys.stderr)
        return 2
    if scenario.faults:
        print(f"note: live mode skips the scenario's {len(scenario.faults)} fault(s); the fleet is real")
    if scenario.start_s or any(m.cost is not None for m in scenario.models):
        print("note: live mode runs on the real cortex's clock and catalogue; the scenario's start and prices do not apply")
    try:
        world, wall_s = run_live(scenario, args.seed, args.cortex, args.admin_token)
    except BaseException as exc:  # noqa: BLE001 - report, don't dump a traceback
        leaf = leaf_error(exc, LiveError, httpx.HTTPError, OSError)
        if isinstance(leaf, (LiveError, httpx.HTTPError, OSError)):
            print(f"cortex-sim: live run failed: {leaf}", file=sys.stderr)
            return 2
        raise
    counts = world.checker.summary_counts()
    print(f"live run of {scenario.name} against {args.cortex}: {len(world.checker.requests)} requests in {wall_s:.1f} s")
    print(f"outcomes: {counts['outcomes']}; refused: {counts['refused']}")
    if world.checker.violation:
        print(f"\nINVARIANT VIOLATED: {world.checker.violation}")
        return 1
    summary = {
        **counts,
        "charged_tokens": sum(r.charged or 0 for r in world.checker.requests.values()),
        "admitted_on_retry": world.checker.admitted_on_retry,
    }
    failures = runner.check_expectations(scenario, world.checker, summary)
    for failure in failures:
        print(f"\nEXPECTATION FAILED: {failure}")
    if failures:
        return 1
    print("\nresult: PASS (caps held, no hold left open, charges between received and held)")
    return 0


def _fuzz_one(path: str, seed: int) -> tuple[int, bool, str, str, float]:
    result = runner.run_any(load(path), seed)
    why = result.violation or "; ".join(result.expectation_failures)
    return seed, result.ok, why, result.trace_sha256, result.summary["wall_s"]


def cmd_fuzz(args: argparse.Namespace) -> int:
    if args.seeds < 1 or args.jobs < 1:
        print("cortex-sim: --seeds and --jobs must be at least 1", file=sys.stderr)
        return 2
    path = resolve(args.scenario)
    scenario = load(path)
    seeds = range(args.start, args.start + args.seeds)
    failures: list[tuple[int, str]] = []
    done = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_fuzz_one, str(path), seed): seed for seed in seeds}
        for future in as_completed(futures):
            try:
                seed, ok, why, _, _ = future.result()
            except Exception as exc:  # a crash is a failing seed too, with its reproduce line
                seed, ok, why = futures[future], False, f"crashed: {type(exc).__name__}: {exc}"
            done += 1
            if not ok:
                failures.append((seed, why))
            _progress(done, args.seeds, len(failures))
    sys.stderr.write("\n")
    print(f"fuzzed {scenario.name} over {args.seeds} seeds ({args.start}..{args.start + args.seeds - 1}): "
          f"{args.seeds - len(failures)} passed, {len(failures)} failed")
    for seed, why in sorted(failures):
        print(f"  seed {seed}: {why}\n    reproduce: {_reproduce(scenario, seed)}")
    return 1 if failures else 0


def _progress(done: int, total: int, failed: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} seeds, {failed} failed")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cortex-sim", description="Deterministic simulation of cortex and its neurons")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one scenario with one seed")
    r.add_argument("scenario", help="a scenario file, or a bundled scenario's name")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--out", help="write summary.json and trace.jsonl here")
    r.add_argument("--plot", action="store_true", help="draw spend and held tokens against each cap (needs matplotlib)")
    r.add_argument("--live", action="store_true", help="drive a real cortex in wall time instead")
    r.add_argument("--cortex", help="live: the cortex base URL")
    r.add_argument("--admin-token", default=os.environ.get("CORTEX_ADMIN_TOKEN"), help="live: the admin token")
    r.add_argument("--policy", choices=OUTPUT_HOLDS,
                   help="cortex's output-hold policy for this run (a scenario with `policies` then runs once, under it)")
    # Test-only: break the ledger on purpose, to prove a violation is caught.
    r.add_argument("--plant-bug", choices=["skip_cap_check", "double_charge", "window_amnesia", "evict_busy", "local_admission",
                                            "forward_past_hold"],
                   help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fuzz", help="run one scenario over many seeds")
    f.add_argument("scenario")
    f.add_argument("--seeds", type=int, required=True)
    f.add_argument("--start", type=int, default=1, help="the first seed")
    f.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    f.set_defaults(func=cmd_fuzz)
    sub.add_parser("list", help="the bundled scenarios").set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScenarioError as exc:
        print(f"cortex-sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
