"""The fleet poller: a background task owned by the app's lifespan."""

from __future__ import annotations

import logging

import trio

from cortex import logs
from cortex.config import FleetConfig
from cortex.fleet.registry import Fleet, parse_models
from cortex.fleet.upstream import LocalResourceError, Upstream


async def poll_node(fleet: Fleet, upstream: Upstream, url: str, timeout_s: float) -> None:
    """One health check: the node must answer /health and a valid /v1/models."""
    node = fleet.node(url)
    was_healthy = node.healthy
    try:
        await upstream.get_json(url, "/health", timeout_s)
        models = parse_models(await upstream.get_json(url, "/v1/models", timeout_s))
    except LocalResourceError as exc:  # cortex's own shortage says nothing about the neuron
        logs.event("poll_skipped", logging.WARNING, neuron=url, error=str(exc))
        return
    except Exception as exc:  # whatever a neuron sends, the poller lives on
        fleet.poll_failed(url, str(exc) or type(exc).__name__)
        if was_healthy and not node.healthy:
            logs.event("neuron_unhealthy", logging.WARNING, neuron=url, error=str(exc))
        return
    fleet.poll_succeeded(url, models)
    if not was_healthy:
        logs.event("neuron_healthy", neuron=url, models=sorted(models))


async def poll_once(fleet: Fleet, upstream: Upstream, timeout_s: float) -> None:
    async with trio.open_nursery() as nursery:
        for node in fleet.nodes:
            nursery.start_soon(poll_node, fleet, upstream, node.url, timeout_s)


async def poll_forever(
    fleet: Fleet,
    upstream: Upstream,
    config: FleetConfig,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll every node now (so cortex starts with a real picture), then forever."""
    await poll_once(fleet, upstream, config.poll_timeout_s)
    task_status.started()
    while True:
        await trio.sleep(config.poll_interval_s)
        await poll_once(fleet, upstream, config.poll_timeout_s)
