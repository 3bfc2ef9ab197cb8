"""The fleet poller: a background task owned by the app's lifespan.

After each poll it starts, in its own nursery, the fetches of the tokenizers
the neurons advertise that cortex does not hold yet (cortex/fleet/tokenizers.py
decides which); a request never waits on one.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from common.chat_template import LIMIT_DOCUMENT_BYTES, TokenizerFilesError, document_sha256, files_from_document
from cortex import logs
from cortex.budget.exact_count import ExactCounter
from cortex.config import FleetConfig
from cortex.fleet import tokenizers
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
    """Poll every node now (so cortex starts with a real picture), then forever; after each poll,
    fetch the advertised tokenizers in the background."""
    async with trio.open_nursery() as fetches:
        await poll_once(fleet, upstream, config)
        start_tokenizer_fetches(fleet, upstream, fetches)
        task_status.started()
        while True:
            await trio.sleep(config.poll_interval_s)
            await poll_once(fleet, upstream, config)
            start_tokenizer_fetches(fleet, upstream, fetches)


# --- advertised tokenizers ----------------------------------------------------------


def start_tokenizer_fetches(fleet: Fleet, upstream: Upstream, nursery: trio.Nursery,
                            timeout_s: float = tokenizers.FETCH_TIMEOUT_S) -> list[str]:
    """Log disagreements, drop what nobody advertises, and start the fetches now due; their sha256s."""
    store = fleet.tokenizers
    new, ended = store.conflicts_changed(fleet.tokenizer_conflicts())
    for model, shas in new.items():
        logs.event("tokenizer_disagreement", logging.WARNING, model=model, sha256=list(shas),
                   neurons=[n.url for n in fleet.nodes if n.healthy and model in n.models],
                   effect="the byte bound holds for this model")
    for model in ended:
        logs.event("tokenizer_agreement", model=model, sha256=fleet.tokenizer_sha256(model))
    for sha256 in store.retain(fleet.tokenizers_advertised()):
        logs.event("tokenizer_dropped", sha256=sha256)
    sources = fleet.tokenizer_sources()
    due = store.due(sources, trio.current_time())
    for sha256 in due:
        nursery.start_soon(fetch_tokenizer, fleet, upstream, sha256, sources[sha256], timeout_s)
    return due


async def fetch_tokenizer(fleet: Fleet, upstream: Upstream, sha256: str, sources: list[tuple[str, str]],
                          timeout_s: float = tokenizers.FETCH_TIMEOUT_S) -> None:
    """Fetch one advertised tokenizer from the first source that serves it whole and true, and
    hand its exact counter to the fleet; or record the failure, to be retried later."""
    store = fleet.tokenizers
    failures = []
    try:
        for url, path in sources:
            started = trio.current_time()
            try:
                counter, size = await _fetch_counter(upstream, fleet.node(url), path, sha256, timeout_s)
            except Exception as exc:  # noqa: BLE001 - whatever a neuron sends, the poller lives on
                failures.append(f"{url}{path}: {exc or type(exc).__name__}")
                continue
            store.fetched(sha256, counter)
            logs.event("tokenizer_fetched", sha256=sha256, neuron=url, path=path, bytes=size,
                       seconds=round(trio.current_time() - started, 3))
            return
        retry_s = store.fetch_failed(sha256, "; ".join(failures) or "no healthy neuron serves it", trio.current_time())
        logs.event("tokenizer_unusable", logging.WARNING, sha256=sha256, error=store.last_error(sha256),
                   retry_in_s=retry_s, effect="the byte bound holds until it is fetched")
    finally:
        if store.state(sha256) == "fetching":  # cancelled midway (shutdown)
            store.abandoned(sha256)


async def _fetch_counter(upstream: Upstream, node: Node, path: str, sha256: str,
                         timeout_s: float) -> tuple[Any, int]:
    status, raw = await upstream.get(node.url, path, timeout_s, auth_headers(node), limit_bytes=LIMIT_DOCUMENT_BYTES)
    if status != 200:
        raise UpstreamFailed(f"GET {path}: HTTP {status}")
    counter = await trio.to_thread.run_sync(counter_from_document, raw, sha256, f"GET {path}", abandon_on_cancel=True)
    return counter, len(raw)


def counter_from_document(raw: bytes, sha256: str, what: str) -> ExactCounter:
    """The exact counter of a fetched tokenizer document (in a worker thread: loading a large
    tokenizer takes a while); TokenizerFilesError if it is not what was advertised or does not load."""
    got = document_sha256(raw)
    if got != sha256:
        raise TokenizerFilesError(f"{what}: the document's sha256 is {got}, not the advertised {sha256}")
    try:
        files = files_from_document(raw, what=what)
        if files.template is None:
            raise TokenizerFilesError(f"{what}: tokenizer_config has no 'chat_template': a chat prompt cannot be counted")
        # Only neuron's kernel engine advertises its files, and it renders every request with its own
        # template and nothing else (neuron/engines/kernel_engine.py `encode_sync`): fields that make
        # other servers render differently (`chat_template_kwargs`, ...) change nothing there.
        return ExactCounter(files, render_fields=())
    except TokenizerFilesError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a worker thread; the tokenizers library may panic (a BaseException)
        raise TokenizerFilesError(f"{what}: does not load: {exc!r}") from None
