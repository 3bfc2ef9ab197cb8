"""What a run prints and writes: the summary table, summary.json, trace.jsonl, a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cortex.budget.pricing import usd_text


def _cap_text(cap: dict[str, Any]) -> str:
    parts = []
    if cap["balance_tokens"] is not None:
        parts.append(f"balance {cap['balance_tokens']:,}")
    if cap.get("balance_micro_usd") is not None:
        parts.append(f"balance {usd_text(cap['balance_micro_usd'])}")
    window = [f"{cap['window_tokens']:,}"] if cap["window_tokens"] is not None else []
    window += [usd_text(cap["window_micro_usd"])] if cap.get("window_micro_usd") is not None else []
    if window:
        parts.append(f"window {' + '.join(window)}" + (f" / {cap['window_seconds']:g} s" if cap.get("window_seconds") else ""))
    period = [f"{cap['period_tokens']:,}"] if cap.get("period_tokens") is not None else []
    period += [usd_text(cap["period_micro_usd"])] if cap.get("period_micro_usd") is not None else []
    if period:
        parts.append(f"{' + '.join(period)} {cap['period']}")
    if cap["max_concurrency"] is not None:
        parts.append(f"concurrency {cap['max_concurrency']}")
    return ", ".join(parts)


def _charged_text(cap: dict[str, Any]) -> str:
    money = cap.get("spent_micro_usd") or 0
    return f"{cap['spent_tokens']:,}" + (f" + {usd_text(money)}" if money else "")


def _peak_text(cap: dict[str, Any]) -> str:
    money = cap.get("held_micro_usd_peak") or 0
    return f"{cap['held_tokens_peak']:,}" + (f" + {usd_text(money)}" if money else "")


def summary_table(summary: dict[str, Any]) -> str:
    outcomes = summary["outcomes"]
    refused = ", ".join(f"{k} {v}" for k, v in summary["refused"].items()) or "none"
    by_cap = ", ".join(f"{k} {v}" for k, v in summary.get("refused_by_cap", {}).items())
    lines = [
        f"scenario {summary['scenario']}  seed {summary['seed']}"
        + (f"  from {summary['start']} to {summary['end']}" if summary.get("start") else ""),
        "",
        "| outcome | requests |",
        "| --- | ---: |",
        *(f"| {name} | {count:,} |" for name, count in outcomes.items()),
        f"| **total** | {summary['requests']:,} |",
        "",
        f"refused by reason: {refused}" + (f"; by cap: {by_cap}" if by_cap else ""),
        f"tokens held {summary['held_tokens']:,}, charged {summary['charged_tokens']:,}"
        + (f"; money held {usd_text(summary['held_micro_usd'])}, charged {usd_text(summary['charged_micro_usd'])}"
           if summary.get("held_micro_usd") else "")
        + (f"; admitted on retry {summary['admitted_on_retry']}" if summary["admitted_on_retry"] else ""),
        "",
    ]
    if summary.get("failovers") or summary.get("stream_errors"):
        lines += [
            f"failover: {summary['failovers']:,} requests tried more than one upstream; "
            f"{summary['failed_before_first_byte']:,} failed before their first byte; "
            f"{summary['stream_errors']:,} streams cut after it ({summary['partial_charges']:,} charged part of their hold)",
            "",
        ]
    if summary.get("loads") or summary.get("evictions") or summary.get("cold_waits"):
        lines += [
            f"lifecycle: {summary['loads']:,} loads ({summary['load_refusals']:,} refused), "
            f"{summary['evictions']:,} evictions; {summary['cold_waits']:,} requests waited on a cold load "
            f"(hit rate {summary['hit_rate']:.1%})",
            "",
        ]
    shared = summary.get("shared_ledger")
    if shared:
        by_replica = ", ".join(f"{name} {n:,} ({shared['served_by_replica'].get(name, 0):,} served)"
                               for name, n in shared["requests_by_replica"].items())
        lines += [
            f"shared ledger: {shared['replicas']} replicas ({shared['replica_lives']} lives); {shared['batches']:,} batches, "
            f"{shared['reserves_per_batch']:g} reserves per batch with any, at most {shared['batch_items_max']:,} items; "
            f"{shared['round_trips']:,} round trips; {shared['reaped']:,} holds reaped; {shared['notices']:,} change notices",
            f"requests by replica: {by_replica}",
            "",
        ]
    if len(summary.get("upstreams", ())) > 1 or any(u["kind"] != "neuron" for u in summary.get("upstreams", ())):
        lines += ["| upstream | kind | requests received | served |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {u['name']} | {u['kind']} | {u['delivered']:,} | {u['served']:,} |" for u in summary["upstreams"]]
        lines.append("")
    if summary["caps"]:
        lines += ["| principal | caps | charged | peak held |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {c['principal']} | {_cap_text(c)} | {_charged_text(c)} | {_peak_text(c)} |" for c in summary["caps"]]
        lines.append("")
    if summary.get("period_edges"):
        lines += [
            "| period edge | principal | period | refused by it before (told to wait for the edge) | admitted after |",
            "| --- | --- | --- | ---: | ---: |",
        ]
        lines += [
            f"| {e['edge']} | {e['principal']} | {e['period']} | {e['refused_before']:,} ({e['waited_for_edge']:,}) "
            f"| {e['admitted_after']:,} |"
            for e in summary["period_edges"]
        ]
        lines.append("")
    holds = summary.get("output_holds")
    if holds:
        lines += [
            f"output holds: {holds['policy']}" + (f" (slices of {holds['slice_tokens']:,})" if holds["slice_tokens"] else "")
            + f"; {holds['admitted']:,} admitted, {holds['refused']:,} refused; {holds['useful_tokens']:,} output tokens "
            f"delivered" + (f" ({holds['useful_per_cap']:.4f} per token of the {holds['cap_tokens']:,}-token cap)"
                            if holds["cap_tokens"] else "")
            + f"; {holds['extensions']:,} extensions ({holds['extensions_refused']:,} refused); {holds['truncations']:,} "
            f"truncated, {holds['waste_tokens']:,} tokens of waste; overshoot {holds['overshoot_tokens']:,}",
            "",
        ]
    latency = summary["latency_s"]
    if latency:
        lines.append(
            "latency of served requests (virtual): "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in latency.items())
        )
    lines += [
        f"virtual time {summary['virtual_s']:,.1f} s; wall time {summary['wall_s']:.2f} s; "
        f"{summary['requests_per_wall_s']:,.0f} simulated requests per wall-second",
        f"trace: {summary['trace_events']:,} events, sha256 {summary['trace_sha256']}",
    ]
    return "\n".join(lines)


def policies_table(summary: dict[str, Any]) -> str:
    """A `run_policies` summary: what each output-hold policy delivered for the same cap, and the ratio."""
    cap = next((f["cap_tokens"] for f in summary["policies"].values() if f["cap_tokens"]), None)
    lines = [
        f"scenario {summary['scenario']}  seed {summary['seed']}: output-hold policies"
        + (f" on the same {cap:,}-token cap" if cap else ""),
        "",
        "| policy | admitted | refused | served | useful tokens | per token of cap | truncated | waste tokens "
        "| undelivered | extensions (refused) | overshoot |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in summary["policies"].items():
        per_cap = f"{f['useful_per_cap']:.4f}" if f["useful_per_cap"] is not None else "-"
        lines.append(
            f"| {name} | {f['admitted']:,} | {f['refused']:,} | {f['served']:,} | {f['useful_tokens']:,} | {per_cap} "
            f"| {f['truncations']:,} | {f['waste_tokens']:,} | {f['undelivered_tokens']:,} "
            f"| {f['extensions']:,} ({f['extensions_refused']:,}) | {f['overshoot_tokens']:,} |"
        )
    ratio = summary.get("useful_ratio")
    lines += [
        "",
        f"useful tokens, incremental / worst_case: {ratio:.2f}x" if ratio is not None else "useful tokens ratio: n/a",
        f"wall time {summary['wall_s']:.2f} s; traces sha256 {summary['trace_sha256']}",
    ]
    return "\n".join(lines)


def write_outputs(out_dir: Path, summary: dict[str, Any], trace_lines: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "trace.jsonl").write_text("".join(line + "\n" for line in trace_lines))


def write_policy_outputs(out_dir: Path, summary: dict[str, Any], traces: dict[str, list[str]]) -> list[Path]:
    """A comparison's summary.json, and each policy's trace as trace.<policy>.jsonl; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.json"]
    written[0].write_text(json.dumps(summary, indent=2) + "\n")
    for policy, lines in traces.items():
        path = out_dir / f"trace.{policy}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        written.append(path)
    return written


def plot(out_path: Path, samples: list[tuple[float, str, str, int, int, int]]) -> None:
    """Spend (or usage) and held amounts against each cap over virtual time, tokens or micro-USD (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'cortex-gateway[plot]'") from None
    series: dict[tuple[str, str], list[tuple[float, int, int, int]]] = {}
    for t, who, kind, used, held, cap in samples:
        series.setdefault((who, kind), []).append((t, used, held, cap))
    count = max(1, len(series))
    fig, axes = plt.subplots(count, 1, figsize=(10, 2.6 * count), squeeze=False)
    for ax, ((who, kind), points) in zip(axes[:, 0], sorted(series.items())):
        ts = [p[0] for p in points]
        usage = "spent" if kind.startswith("balance") else f"{kind.removesuffix('_usd')} usage"
        ax.step(ts, [p[1] for p in points], where="post", label=usage)
        ax.step(ts, [p[1] + p[2] for p in points], where="post", label="+ held")
        ax.step(ts, [p[3] for p in points], where="post", linestyle="--", color="red", label=f"{kind} cap")
        ax.set_title(f"{who}: {kind}")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("micro-USD" if kind.endswith("_usd") else "tokens")
        ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
