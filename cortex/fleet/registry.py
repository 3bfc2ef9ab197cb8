"""What cortex knows about its neurons, and which one gets a request.

Pure state: the poller and the dispatcher report observations, this module
turns them into health, a merged model catalogue and routing decisions. No
I/O and no clock, so the simulator and tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_tokens: int
    output_tokens: int


@dataclass
class Node:
    url: str
    index: int
    healthy: bool = False
    ever_polled: bool = False
    models: dict[str, ModelInfo] = field(default_factory=dict)
    failures: int = 0  # consecutive failed polls
    last_error: str | None = None
    in_flight: int = 0
    dispatched_total: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "models": sorted(self.models),
            "in_flight": self.in_flight,
            "dispatched_total": self.dispatched_total,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
        }


def parse_models(payload: Any) -> dict[str, ModelInfo]:
    """A neuron's /v1/models body -> models; raises ValueError when malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("/v1/models body has no 'data' list")
    models = {}
    for entry in payload["data"]:
        try:
            name, limit = entry["id"], entry["limit"]
            context, output = limit["context"], limit["output"]
        except (KeyError, TypeError):
            raise ValueError(f"malformed model entry {str(entry)[:200]}") from None
        if not isinstance(name, str) or not name or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**40 for v in (context, output)
        ):
            raise ValueError(f"malformed model entry {str(entry)[:200]}")
        models[name] = ModelInfo(name, context, output)
    return models


class Fleet:
    def __init__(self, urls: list[str] | tuple[str, ...], unhealthy_after_failures: int = 2) -> None:
        assert unhealthy_after_failures >= 1
        self.nodes = [Node(url.rstrip("/"), i) for i, url in enumerate(urls)]
        self._by_url = {n.url: n for n in self.nodes}
        self.unhealthy_after_failures = unhealthy_after_failures

    def node(self, url: str) -> Node:
        return self._by_url[url]

    # --- observations ----------------------------------------------------

    def poll_succeeded(self, url: str, models: dict[str, ModelInfo]) -> None:
        node = self._by_url[url]
        node.models = models
        node.healthy = True
        node.ever_polled = True
        node.failures = 0
        node.last_error = None

    def poll_failed(self, url: str, error: str) -> None:
        node = self._by_url[url]
        node.failures += 1
        node.last_error = error
        if node.failures >= self.unhealthy_after_failures or not node.ever_polled:
            node.healthy = False

    def dispatch_failed(self, url: str, error: str) -> None:
        """A connect failure is proof enough: skip the node until a poll succeeds."""
        node = self._by_url[url]
        node.healthy = False
        node.last_error = error

    # --- routing ------------------------------------------------------------

    def knows(self, model: str) -> bool:
        """Any neuron, healthy or not, has advertised `model`."""
        return any(model in n.models for n in self.nodes)

    def model_info(self, model: str) -> ModelInfo | None:
        """The tightest limits advertised for `model` by healthy nodes (any node if none)."""
        infos = [n.models[model] for n in self.nodes if model in n.models and n.healthy]
        infos = infos or [n.models[model] for n in self.nodes if model in n.models]
        if not infos:
            return None
        return ModelInfo(
            model, min(i.context_tokens for i in infos), min(i.output_tokens for i in infos)
        )

    def route(self, model: str, exclude: frozenset[str] = frozenset()) -> Node | None:
        """The healthy node serving `model` with the fewest requests in flight.

        Ties go to the node dispatched least, then the first configured,
        which spreads sequential traffic evenly and deterministically.
        """
        best: Node | None = None
        for node in self.nodes:
            if not node.healthy or model not in node.models or node.url in exclude:
                continue
            if best is None or (node.in_flight, node.dispatched_total) < (best.in_flight, best.dispatched_total):
                best = node
        return best

    def acquire(self, node: Node) -> None:
        node.in_flight += 1
        node.dispatched_total += 1

    def release(self, node: Node) -> None:
        assert node.in_flight > 0
        node.in_flight -= 1

    # --- views --------------------------------------------------------------

    def catalogue(self) -> list[dict[str, Any]]:
        names = sorted({m for n in self.nodes for m in n.models})
        entries = []
        for name in names:
            info = self.model_info(name)
            assert info is not None
            entries.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "cortex",
                    "limit": {"context": info.context_tokens, "output": info.output_tokens},
                    "neurons": [
                        {"url": n.url, "healthy": n.healthy} for n in self.nodes if name in n.models
                    ],
                }
            )
        return entries

    def status(self) -> dict[str, Any]:
        healthy = sum(n.healthy for n in self.nodes)
        total = len(self.nodes)
        if total and healthy == total:
            state = "ok"
        elif healthy:
            state = "degraded"
        else:
            state = "down"
        return {
            "status": state,
            "neurons": {"total": total, "healthy": healthy, "unhealthy": total - healthy},
            "nodes": [n.view() for n in self.nodes],
        }
