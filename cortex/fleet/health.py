"""The fleet poller: a background task owned by the app's lifespan."""

from __future__ import annotations

import logging

import trio

from cortex import logs
from cortex.config import FleetConfig
from cortex.fleet.kinds import Residency
from cortex.fleet.registry import Fleet, Node, model_info
from cortex.fleet.upstream import LocalResourceError, Upstream, UpstreamFailed


def auth_headers(node: Node) -> dict[str, str]:
    return {"authorization": f"Bearer {node.api_key}"} if node.api_key else {}


async def poll_node(fleet: Fleet, upstream: Upstream, url: str, timeout_s: float, config: FleetConfig = FleetConfig()) -> None:
    """One health check, in the node's kind's own terms: healthy, and a model list that parses."""
    node = fleet.node(url)
    kind = node.kind
    was_healthy = node.healthy
    headers = auth_headers(node)
    epoch = fleet.poll_epoch(url)
    try:
        status, raw = await upstream.get(url, kind.health_path, timeout_s, headers)
        health = kind.judge_health(status, raw)
        if not health.healthy:
            raise UpstreamFailed(f"{kind.label} {health.state.replace('_', ' ')}: {health.reason or f'HTTP {status}'}")
        bodies = {path: await upstream.get_json(url, path, timeout_s, headers) for path in kind.model_paths}
        entries = kind.parse_models(bodies)
        models = {
            name: model_info(e, config.default_context_tokens, config.default_output_tokens) for name, e in entries.items()
        }
        residency = await read_residency(upstream, node, timeout_s)
    except LocalResourceError as exc:  # cortex's own shortage says nothing about the upstream
        logs.event("poll_skipped", logging.WARNING, neuron=url, error=str(exc))
        return
    except Exception as exc:  # whatever an upstream sends, the poller lives on
        fleet.poll_failed(url, str(exc) or type(exc).__name__)
        if was_healthy and not node.healthy:
            logs.event("neuron_unhealthy", logging.WARNING, neuron=url, kind=kind.name, error=str(exc))
        return
    fleet.poll_succeeded(url, models, residency, epoch)
    if not was_healthy:
        logs.event("neuron_healthy", neuron=url, kind=kind.name, models=sorted(models))


async def read_residency(upstream: Upstream, node: Node, timeout_s: float) -> Residency | None:
    """A lifecycle kind's residency report; None when it has none, or sends none cortex can read
    (an older neuron): it is then routed to for what it serves, never asked to load."""
    kind = node.kind
    if kind.lifecycle_path is None or kind.parse_residency is None:
        return None
    try:
        return kind.parse_residency(await upstream.get_json(node.url, kind.lifecycle_path, timeout_s, auth_headers(node)))
    except LocalResourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - without a residency report the node still serves
        logs.event("residency_unreadable", logging.DEBUG, neuron=node.url, error=str(exc))
        return None


async def poll_once(fleet: Fleet, upstream: Upstream, config: FleetConfig) -> None:
    async with trio.open_nursery() as nursery:
        for node in fleet.nodes:
            nursery.start_soon(poll_node, fleet, upstream, node.url, config.poll_timeout_s, config)


async def poll_forever(
    fleet: Fleet,
    upstream: Upstream,
    config: FleetConfig,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll every node now (so cortex starts with a real picture), then forever."""
    await poll_once(fleet, upstream, config)
    task_status.started()
    while True:
        await trio.sleep(config.poll_interval_s)
        await poll_once(fleet, upstream, config)
