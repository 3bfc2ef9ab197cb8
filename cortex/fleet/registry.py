"""What cortex knows about its neurons, and which one gets a request.

Pure state: the poller and the dispatcher report observations, this module
turns them into health, a merged model catalogue and routing decisions. No
I/O and no clock, so the simulator and tests drive it directly.

It also holds the tokenizers the neurons advertise (cortex/fleet/tokenizers.py):
a model whose nodes all advertise one sha256 that cortex holds is counted
exactly (`exact_counter`), and its prompt bound is then exact (`bound_exact`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from common import counting
from cortex.config import UpstreamSpec
from cortex.fleet.kinds import KINDS, Kind, ModelEntry, Residency
from cortex.fleet.tokenizers import TokenizerStore


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_tokens: int
    output_tokens: int
    limits_reported: bool = True  # False: the server reports none; these are configured defaults
    # The chat template's cost, for the prompt bound (common/counting's own unless the server says).
    message_overhead_tokens: int = counting.MESSAGE_OVERHEAD_TOKENS
    reply_primer_tokens: int = counting.REPLY_PRIMER_TOKENS
    token_bytes_max: int | None = None  # None: the upstream kind's
    # True: the template is common/counting's own, whose costs are exact and so a floor too;
    # False: the server advertised its own costs, which are only upper bounds.
    template_exact: bool = True
    completion_prefix_tokens: int = 0  # special tokens a completion prompt gains (a BOS)
    # The prompt bound is the exact count on every replica (a byte-level tokenizer and
    # common/counting's template, or the model's advertised tokenizer, held): cortex may then
    # refuse a context overflow itself.
    bound_exact: bool = False
    # The tokenizer document the server advertises (its sha256, and its path on that server); on
    # the fleet's merged view, the sha256 every replica agrees on, else None.
    tokenizer_sha256: str | None = None
    tokenizer_path: str | None = None


def _counts_as_cortex(info: ModelInfo) -> bool:
    """The server renders common/counting's template (its own, or advertised at the same costs)."""
    return (info.message_overhead_tokens, info.reply_primer_tokens, info.completion_prefix_tokens) == (
        counting.MESSAGE_OVERHEAD_TOKENS, counting.REPLY_PRIMER_TOKENS, 0
    )


def model_info(entry: ModelEntry, default_context_tokens: int, default_output_tokens: int) -> ModelInfo:
    """A kind's model entry with every limit filled: what it reported, else the configured defaults."""
    context = entry.context_tokens or default_context_tokens
    output = entry.output_tokens or (context if entry.context_tokens else default_output_tokens)
    overhead = entry.message_overhead_tokens
    primer = entry.reply_primer_tokens
    return ModelInfo(
        entry.name, context, min(output, context), entry.context_tokens is not None,
        counting.MESSAGE_OVERHEAD_TOKENS if overhead is None else overhead,
        counting.REPLY_PRIMER_TOKENS if primer is None else primer,
        entry.token_bytes_max,
        overhead is None and primer is None,
        entry.completion_prefix_tokens or 0,
        tokenizer_sha256=entry.tokenizer_sha256,
        tokenizer_path=entry.tokenizer_path,
    )


@dataclass
class Node:
    url: str
    index: int
    kind: Kind = KINDS["neuron"]
    api_key: str | None = field(default=None, repr=False)  # sent upstream as Bearer; never logged
    allowed_models: frozenset[str] | None = None
    healthy: bool = False
    ever_polled: bool = False
    models: dict[str, ModelInfo] = field(default_factory=dict)
    failures: int = 0  # consecutive failed polls
    cool_until: float = 0.0  # said it was overloaded: out of rotation until then (the caller's clock)
    last_error: str | None = None
    in_flight: int = 0
    dispatched_total: int = 0
    in_flight_by_model: dict[str, int] = field(default_factory=dict)
    residency: Residency | None = None  # a lifecycle kind's last report; None: no lifecycle
    # Bumped whenever cortex itself changes which models the node serves (an eviction, a load):
    # a poll that began before cannot put back what it saw then.
    models_epoch: int = 0
    # Models cortex is unloading here: never routed again until a residency report shows them gone,
    # whatever a model list read meanwhile (a poll's, a load's refresh) still says.
    withdrawn: set[str] = field(default_factory=set)

    @property
    def has_lifecycle(self) -> bool:
        return self.kind.lifecycle_path is not None and self.residency is not None

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "kind": self.kind.name,
            "healthy": self.healthy,
            "models": sorted(self.models),
            "in_flight": self.in_flight,
            "dispatched_total": self.dispatched_total,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "limits": {
                name: "reported" if m.limits_reported else "default" for name, m in sorted(self.models.items())
            },
        }


def _node(index: int, spec: str | UpstreamSpec) -> Node:
    if isinstance(spec, str):
        return Node(spec.rstrip("/"), index)
    key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    allowed = frozenset(spec.models) if spec.models is not None else None
    return Node(spec.url.rstrip("/"), index, KINDS[spec.kind], key, allowed)


class Fleet:
    def __init__(self, upstreams: list[str | UpstreamSpec] | tuple[str | UpstreamSpec, ...], unhealthy_after_failures: int = 2) -> None:
        assert unhealthy_after_failures >= 1
        self.nodes = [_node(i, spec) for i, spec in enumerate(upstreams)]
        self._by_url = {n.url: n for n in self.nodes}
        self.unhealthy_after_failures = unhealthy_after_failures
        self.tokenizers = TokenizerStore()

    def node(self, url: str) -> Node:
        return self._by_url[url]

    # --- observations ----------------------------------------------------

    def poll_epoch(self, url: str) -> int:
        """Take before a poll's requests; hand back to `poll_succeeded`."""
        return self._by_url[url].models_epoch

    def poll_succeeded(
        self, url: str, models: dict[str, ModelInfo], residency: Residency | None = None, epoch: int | None = None
    ) -> None:
        node = self._by_url[url]
        if node.allowed_models is not None:
            models = {name: m for name, m in models.items() if name in node.allowed_models}
        if epoch is not None and epoch != node.models_epoch:
            # cortex loaded or evicted on this node while the poll was out: what it saw is stale.
            models, residency = node.models, node.residency
        if node.withdrawn:
            if residency is not None:
                node.withdrawn = {m for m in node.withdrawn if m in residency.models}  # gone: may come back
            models = {name: m for name, m in models.items() if name not in node.withdrawn}
        node.models = models
        node.residency = residency
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

    def _info_nodes(self, model: str) -> list[Node]:
        """The nodes `model`'s limits come from: those serving it that are healthy, else all serving it."""
        nodes = [n for n in self.nodes if model in n.models and n.healthy]
        return nodes or [n for n in self.nodes if model in n.models]

    def model_info(self, model: str) -> ModelInfo | None:
        """The tightest limits advertised for `model` by healthy nodes (any node if none)."""
        nodes = self._info_nodes(model)
        infos = [n.models[model] for n in nodes]
        if not infos:
            return None
        sha256 = _agreed(infos)
        # Limits: the tightest, so any replica can take it. Template costs: the dearest, so the
        # prompt bound holds on whichever replica it is routed to.
        return ModelInfo(
            model, min(i.context_tokens for i in infos), min(i.output_tokens for i in infos),
            message_overhead_tokens=max(i.message_overhead_tokens for i in infos),
            reply_primer_tokens=max(i.reply_primer_tokens for i in infos),
            template_exact=all(i.template_exact for i in infos),
            completion_prefix_tokens=max(i.completion_prefix_tokens for i in infos),
            bound_exact=self.tokenizers.held(sha256) is not None
            or all(_counts_as_cortex(i) and self.token_bytes_max(n, model) == 1 for n, i in zip(nodes, infos)),
            tokenizer_sha256=sha256,
        )

    # --- advertised tokenizers ------------------------------------------------

    def tokenizer_sha256(self, model: str) -> str | None:
        """The tokenizer every node `model`'s limits come from advertises; None if one advertises
        none or two differ (the byte bound then holds)."""
        return _agreed([n.models[model] for n in self._info_nodes(model)])

    def exact_counter(self, model: str) -> Any | None:
        """The exact counter of `model`'s advertised tokenizer, once held (cortex/budget/exact_count.py)."""
        return self.tokenizers.held(self.tokenizer_sha256(model))

    def tokenizer_sources(self) -> dict[str, list[tuple[str, str]]]:
        """sha256 -> the (node URL, path) pairs that serve it, healthy nodes only, in node order."""
        sources: dict[str, list[tuple[str, str]]] = {}
        for node in self.nodes:
            if not node.healthy:
                continue
            for info in node.models.values():
                if info.tokenizer_sha256 is not None and info.tokenizer_path is not None:
                    pair = (node.url, info.tokenizer_path)
                    if pair not in sources.setdefault(info.tokenizer_sha256, []):
                        sources[info.tokenizer_sha256].append(pair)
        return sources

    def tokenizers_advertised(self) -> set[str]:
        """Every sha256 any node, healthy or not, advertises: what is worth keeping."""
        return {i.tokenizer_sha256 for n in self.nodes for i in n.models.values() if i.tokenizer_sha256 is not None}

    def tokenizer_conflicts(self) -> dict[str, tuple[str | None, ...]]:
        """model -> the different tokenizers (None: none) its healthy nodes advertise, where they differ."""
        conflicts = {}
        for model in sorted({m for n in self.nodes if n.healthy for m in n.models}):
            shas = {n.models[model].tokenizer_sha256 for n in self.nodes if n.healthy and model in n.models}
            if len(shas) > 1:
                conflicts[model] = tuple(sorted(shas, key=lambda s: s or ""))
        return conflicts

    def tokenizer_view(self) -> dict[str, dict[str, Any]]:
        """Per model that advertises a tokenizer: its sha256 (if agreed) and cortex's state of it."""
        view: dict[str, dict[str, Any]] = {}
        for model in sorted({m for n in self.nodes for m, i in n.models.items() if i.tokenizer_sha256}):
            sha256 = self.tokenizer_sha256(model)
            if sha256 is None:
                view[model] = {"sha256": None, "state": "disagree"}
                continue
            view[model] = {"sha256": sha256, "state": self.tokenizers.state(sha256)}
            error = self.tokenizers.last_error(sha256)
            if error is not None and view[model]["state"] != "held":
                view[model]["error"] = error
        return view

    def token_bytes_max(self, node: Node, model: str) -> int:
        """The most bytes one token of `model` on `node` covers: its tokenizer's, else its kind's."""
        info = node.models.get(model)
        return info.token_bytes_max if info is not None and info.token_bytes_max else node.kind.token_bytes_max

    def route(self, model: str, exclude: frozenset[str] = frozenset(), now: float = 0.0) -> Node | None:
        """The healthy node serving `model` with the fewest requests in flight.

        Ties go to the node dispatched least, then the first configured,
        which spreads sequential traffic evenly and deterministically. A node
        cooling down after an overload is skipped until `now` passes it.
        """
        best: Node | None = None
        for node in self.nodes:
            if not node.healthy or model not in node.models or node.url in exclude or node.cool_until > now:
                continue
            if best is None or (node.in_flight, node.dispatched_total) < (best.in_flight, best.dispatched_total):
                best = node
        return best

    def cool_down(self, url: str, until: float) -> None:
        """The node answered overloaded with a Retry-After: skip it until `until`."""
        node = self._by_url[url]
        node.cool_until = max(node.cool_until, until)

    def acquire(self, node: Node, model: str | None = None) -> None:
        node.in_flight += 1
        node.dispatched_total += 1
        if model is not None:
            node.in_flight_by_model[model] = node.in_flight_by_model.get(model, 0) + 1

    def release(self, node: Node, model: str | None = None) -> None:
        assert node.in_flight > 0
        node.in_flight -= 1
        if model is not None:
            left = node.in_flight_by_model[model] - 1
            assert left >= 0
            if left:
                node.in_flight_by_model[model] = left
            else:
                del node.in_flight_by_model[model]

    # --- lifecycle ----------------------------------------------------------

    def withdraw(self, url: str, model: str) -> None:
        """Stop routing `model` to the node at once (it is about to be unloaded)."""
        node = self._by_url[url]
        node.models.pop(model, None)
        node.withdrawn.add(model)
        node.models_epoch += 1

    def unloaded(self, url: str, model: str) -> None:
        """The neuron said the unload is done: the model may be loaded and routed here again."""
        self._by_url[url].withdrawn.discard(model)

    def loaded(self, url: str, models: dict[str, ModelInfo], residency: Residency | None) -> None:
        """A load finished: the node's fresh model list, read after it, is in force now."""
        node = self._by_url[url]
        node.models_epoch += 1
        self.poll_succeeded(url, models, residency)

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
        status = {
            "status": state,
            "neurons": {"total": total, "healthy": healthy, "unhealthy": total - healthy},
            "nodes": [n.view() for n in self.nodes],
        }
        tokenizers = self.tokenizer_view()
        if tokenizers:
            status["tokenizers"] = tokenizers
        return status


def _agreed(infos: list[ModelInfo]) -> str | None:
    """The one tokenizer sha256 all of `infos` advertise, or None."""
    shas = {i.tokenizer_sha256 for i in infos}
    return shas.pop() if len(shas) == 1 else None
