"""Cold loads and evictions on demand: the Trio shell around `placement`.

A request for a catalogue model (one with `memory_mb`) that no healthy
neuron serves waits, inside its hold, on `Lifecycle.ensure`. One load per
model is in flight at a time (single flight): the first waiter starts it in
the lifecycle's own nursery (owned by the app's lifespan), so a client that
leaves stops waiting without cancelling the load for the others. A load:

1. plans with `placement.place` over each neuron's last residency report
   and cortex's own in-flight counts and last-use times;
2. for each model to evict: withdraws it from routing at once (no await
   between the plan and the withdrawal, so no request can be routed to it),
   asks the neuron to unload it, and reads the neuron's memory again, so the
   fit is checked against what the neuron says now, not a stale poll;
3. asks the neuron to load the model, within `fleet.load_timeout_s`;
4. reads the neuron's model list again and puts it in force for routing.

Last-use times survive a restart in the data dir (`residency.json`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from common import errors
from common.errors import ApiError
from cortex import logs
from cortex.config import FleetConfig
from cortex.fleet import placement
from cortex.fleet.catalogue import Catalogue
from cortex.fleet.health import auth_headers, read_residency
from cortex.fleet.registry import Fleet, Node, model_info
from cortex.fleet.upstream import Upstream
from cortex.metrics import GatewayMetrics

LOAD_PATH = "/models/load"
UNLOAD_PATH = "/models/unload"
PLAN_ATTEMPTS_MAX = 3  # re-plans when a neuron's fresh report says the planned room is not there
PLAN_ROUNDS_MAX = 64  # turns taken on neurons' placement locks, counting those given up for a better neuron
LRU_FILE = "residency.json"
LRU_ENTRIES_MAX = 10_000
CONTROL_TIMEOUT_S = 30.0  # an unload's answer, beyond its drain bound; a residency read


class LoadFailed(Exception):
    """A cold load did not happen; `error` is what each waiting client is answered."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Load:
    done: trio.Event = field(default_factory=trio.Event)
    error: ApiError | None = None


class Lifecycle:
    def __init__(
        self, fleet: Fleet, upstream: Upstream, config: FleetConfig, catalogue: Callable[[], Catalogue],
        metrics: GatewayMetrics, data_dir: str | None = None, clock: Callable[[], float] = time.time,
        placement_policy: str = "cortex", placement_rng: random.Random | None = None, fault_evict_busy: bool = False,
    ) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.config = config
        self._catalogue = catalogue
        self.metrics = metrics
        self._clock = clock
        self._path = Path(data_dir) / LRU_FILE if data_dir else None
        self.last_used: dict[str, float] = self._read_lru()  # "url model" -> wall-clock time
        self._loads: dict[str, _Load] = {}
        self._node_locks: dict[str, trio.Lock] = {}  # one placement (evictions + load) at a time per neuron
        self._nursery: trio.Nursery | None = None
        # Seams for the simulator only: the eviction policy its benchmark compares (placement.POLICIES),
        # and a planted bug (evict a model with requests in flight) its checker must catch.
        self.placement_policy = placement_policy
        self.placement_rng = placement_rng
        self.fault_evict_busy = fault_evict_busy

    # --- the lifespan ---------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.save()

    # --- what the proxy asks -------------------------------------------------------

    def loadable(self, model: str) -> bool:
        """A catalogue model with a memory size, and some neuron with a lifecycle to put it on."""
        defined = self._catalogue().model(model)
        return defined is not None and defined.memory_mb is not None and any(n.has_lifecycle for n in self.fleet.nodes)

    def used(self, url: str, model: str) -> None:
        self.last_used[f"{url} {model}"] = self._clock()

    async def ensure(self, model: str) -> None:
        """Return once some healthy neuron serves `model`, loading it if need be; else raise ApiError."""
        load = self._loads.get(model)
        if load is None:
            if self._nursery is None:
                raise errors.service_unavailable("cortex is shutting down.", retry_after_s=1)
            load = self._loads[model] = _Load()
            self._nursery.start_soon(self._load, model, load)
        started = trio.current_time()
        try:
            await load.done.wait()
        finally:
            self.metrics.cold_start_wait_s.observe(trio.current_time() - started)
        if load.error is not None:
            raise load.error

    # --- one load -------------------------------------------------------------------

    async def _load(self, model: str, load: _Load) -> None:
        started = trio.current_time()
        outcome = "failed"
        try:
            with trio.fail_after(self.config.load_timeout_s):
                await self._place_and_load(model)
            outcome = "loaded"
        except trio.TooSlowError:
            outcome = "timeout"
            load.error = errors.service_unavailable(
                f"Loading `{model}` did not finish within {self.config.load_timeout_s:g} s.",
                retry_after_s=math.ceil(self.config.poll_interval_s),
            )
        except LoadFailed as exc:
            load.error = exc.error
            outcome = "refused" if exc.error.status in (404, 507) else "failed"
        except Exception as exc:  # noqa: BLE001 - a neuron's nonsense fails this load, never the lifecycle
            load.error = errors.service_unavailable(f"Loading `{model}` failed: {exc}", retry_after_s=1)
        finally:
            del self._loads[model]
            load.done.set()
            self.save()
            self.metrics.model_loads.inc(model=model, outcome=outcome)
            self.metrics.model_load_s.observe(trio.current_time() - started)
            logs.event("model_load", logging.INFO if outcome == "loaded" else logging.WARNING, model=model,
                       outcome=outcome, seconds=round(trio.current_time() - started, 3),
                       error=load.error.message if load.error else None)

    async def _place_and_load(self, model: str) -> None:
        attempts = 0
        for _ in range(PLAN_ROUNDS_MAX):
            plan = self._plan(model)
            if plan is None:
                return  # a poll or another replica of cortex got there first
            # One placement at a time per neuron, so two cold loads of different models cannot both
            # count the same free memory. Holding the neuron, plan again from what the last one left.
            async with self._node_locks.setdefault(plan.url, trio.Lock()):
                fresh = self._plan(model)
                if fresh is None:
                    return
                if fresh.url != plan.url:
                    continue  # another neuron suits it now: take that one's turn instead
                attempts += 1
                if await self._carry_out(model, fresh):
                    return
            if attempts >= PLAN_ATTEMPTS_MAX:
                break
        raise LoadFailed(errors.service_unavailable(
            f"No room could be made for `{model}` after {attempts} attempts.", retry_after_s=1))

    def _plan(self, model: str) -> placement.Plan | None:
        """Where to load `model` now; None: it is routable already; LoadFailed: nowhere."""
        if self.fleet.route(model, now=trio.current_time()) is not None:
            return None
        plan = placement.place(self.views(), self._wanted(model), self.placement_policy, self.placement_rng)
        if isinstance(plan, placement.Infeasible):
            if plan.never:
                raise LoadFailed(ApiError(404, plan.message, type="invalid_request_error", code="model_not_found"))
            raise LoadFailed(errors.service_unavailable(plan.message, retry_after_s=math.ceil(self.config.poll_interval_s)))
        return plan

    async def _carry_out(self, model: str, plan: placement.Plan) -> bool:
        """Evict, check the neuron's own count, load, read back; False: plan again."""
        node = self.fleet.node(plan.url)
        residency = node.residency
        for victim in plan.evict:
            await self._evict(node, victim, reason=f"make room for {model}")
            # The fit is the neuron's own count after each unload, not the plan's: stop once there is room.
            residency = await read_residency(self.upstream, node, CONTROL_TIMEOUT_S)
            if residency is not None and residency.memory_free_bytes >= self._wanted(model).memory_bytes:
                break
        if not plan.evict:
            residency = await read_residency(self.upstream, node, CONTROL_TIMEOUT_S)
        already = residency is not None and residency.models.get(model, ("", 0))[0] in ("ready", "loading")
        if not already and (residency is None or residency.memory_free_bytes < self._wanted(model).memory_bytes):
            node.residency = residency or node.residency
            return False  # the neuron's own count says no room yet: plan again from it
        await self._post(node, LOAD_PATH, self._load_body(model))
        await self._refresh(node)
        return model in node.models

    async def _evict(self, node: Node, model: str, reason: str) -> None:
        if node.in_flight_by_model.get(model) and not self.fault_evict_busy:
            raise LoadFailed(errors.service_unavailable(f"`{model}` got busy on {node.url}.", retry_after_s=1))
        self.fleet.withdraw(node.url, model)  # no await since the plan: nothing is routed to it now
        self.metrics.evictions.inc(model=model, reason="make_room")
        logs.event("model_evict", model=model, neuron=node.url, reason=reason)
        await self._post(node, UNLOAD_PATH, {"model": model, "drain_timeout_s": self.config.unload_drain_s})
        self.fleet.unloaded(node.url, model)
        self.last_used.pop(f"{node.url} {model}", None)

    async def _post(self, node: Node, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"content-type": "application/json", **auth_headers(node)}
        async with self.upstream.post(node.url, path, json.dumps(body).encode(), headers) as response:
            raw = await response.read_all(64 * 1024)
        if response.status == 200:
            try:
                return json.loads(raw)
            except ValueError:
                return {}
        err = node.kind.normalise_error(response.status, raw, response.headers.get("retry-after"))
        if response.status == 507:
            raise LoadFailed(ApiError(503, f"The neuron at {node.url} has no memory for it: {err.message}",
                                      type="server_error", code="insufficient_memory",
                                      headers=errors.retry_after_headers(1)))
        if err.status == 503 or err.retry_after_s is not None:
            raise LoadFailed(errors.service_unavailable(err.message, retry_after_s=err.retry_after_s or 1))
        raise LoadFailed(errors.upstream_error(f"The neuron at {node.url} refused {path}: {err.message}"))

    async def _refresh(self, node: Node) -> None:
        """Read the node's models now, so routing sees the load without waiting for a poll."""
        bodies = {p: await self.upstream.get_json(node.url, p, CONTROL_TIMEOUT_S, auth_headers(node))
                  for p in node.kind.model_paths}
        entries = node.kind.parse_models(bodies)
        models = {n: model_info(e, self.config.default_context_tokens, self.config.default_output_tokens)
                  for n, e in entries.items()}
        self.fleet.loaded(node.url, models, await read_residency(self.upstream, node, CONTROL_TIMEOUT_S))

    # --- views ----------------------------------------------------------------------

    def _wanted(self, model: str) -> placement.Wanted:
        defined = self._catalogue().model(model)
        assert defined is not None and defined.memory_mb is not None
        return placement.Wanted(model, defined.memory_mb * 2**20, defined.residency_priority, defined.pinned_on)

    def _load_body(self, model: str) -> dict[str, Any]:
        defined = self._catalogue().model(model)
        assert defined is not None
        return {"model": model, "memory_mb": defined.memory_mb}

    def views(self) -> list[placement.NeuronView]:
        catalogue = self._catalogue()
        out = []
        for node in self.fleet.nodes:
            if not node.has_lifecycle:
                continue
            assert node.residency is not None
            residents = []
            for name, (status, memory) in node.residency.models.items():
                defined = catalogue.model(name)
                residents.append(placement.Resident(
                    name, status if name in node.models or status != "ready" else "unloading", memory,
                    in_flight=0 if self.fault_evict_busy else node.in_flight_by_model.get(name, 0),
                    last_used=self.last_used.get(f"{node.url} {name}", 0.0),
                    priority=defined.residency_priority if defined else 100,
                    pinned_here=bool(defined and node.url in defined.pinned_on),
                ))
            out.append(placement.NeuronView(node.url, node.residency.memory_total_bytes,
                                            node.residency.memory_free_bytes, tuple(residents), node.healthy))
        return out

    def state(self, model: str) -> dict[str, Any]:
        """For `/v1/models`: where the model is and could be."""
        locations = []
        for node in self.fleet.nodes:
            entry = node.residency.models.get(model) if node.residency else None
            if entry is not None:
                locations.append({"url": node.url, "status": entry[0]})
            elif model in node.models:
                locations.append({"url": node.url, "status": "ready"})
        defined = self._catalogue().model(model)
        feasible = (placement.feasible_on(self.views(), self._wanted(model))
                    if defined is not None and defined.memory_mb is not None else [])
        return {"loaded": any(l["status"] == "ready" for l in locations), "locations": locations, "feasible_on": feasible}

    def unservable(self) -> list[dict[str, str]]:
        """Catalogue models no neuron could ever hold, with why (for `/health`)."""
        if not any(n.has_lifecycle for n in self.fleet.nodes):
            return []
        out = []
        views = self.views()
        for defined in self._catalogue().models.values():
            if defined.memory_mb is None:
                continue
            if not placement.feasible_on(views, self._wanted(defined.id)):
                biggest = max((v.memory_total_bytes for v in views if v.healthy), default=0)
                out.append({"model": defined.id, "reason": f"needs {defined.memory_mb} MiB; the largest neuron "
                            f"has {biggest // 2**20} MiB"})
        return out

    # --- administration ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """`cortex fleet status`: per neuron, its models, memory and requests in flight."""
        nodes = []
        for node in self.fleet.nodes:
            residency = node.residency
            models = {name: {"status": "ready"} for name in node.models}
            if residency is not None:
                for name, (state, memory) in residency.models.items():
                    models[name] = {"status": state if name not in node.withdrawn else "unloading", "memory_bytes": memory}
            for name, entry in models.items():
                entry["in_flight"] = node.in_flight_by_model.get(name, 0)
            nodes.append({
                "url": node.url, "kind": node.kind.name, "healthy": node.healthy, "lifecycle": node.has_lifecycle,
                "memory_total_bytes": residency.memory_total_bytes if residency else None,
                "memory_free_bytes": residency.memory_free_bytes if residency else None,
                "in_flight": node.in_flight, "models": dict(sorted(models.items())),
            })
        return {"neurons": nodes}

    def _lifecycle_node(self, url: str) -> Node:
        try:
            node = self.fleet.node(url)
        except KeyError:
            raise ApiError(404, f"No neuron {url} is configured.", type="invalid_request_error",
                           code="unknown_neuron", param="neuron") from None
        if not node.has_lifecycle:
            raise errors.invalid_request(f"The upstream at {url} has no model lifecycle.", param="neuron")
        return node

    async def load_on(self, model: str, url: str | None) -> dict[str, Any]:
        """Load `model`: where placement says (the same single-flight load a request waits on), or on `url`."""
        try:
            if url is None:
                if not self.loadable(model):
                    raise errors.invalid_request(f"`{model}` is not a catalogue model with memory_mb.", param="model")
                await self.ensure(model)
            else:
                node = self._lifecycle_node(url)
                defined = self._catalogue().model(model)
                body = {"model": model, **({"memory_mb": defined.memory_mb} if defined and defined.memory_mb else {})}
                await self._post(node, LOAD_PATH, body)
                await self._refresh(node)
        except LoadFailed as exc:
            raise exc.error from None
        return self.status()

    async def unload_from(self, model: str, url: str | None) -> dict[str, Any]:
        """Unload `model` from `url`, or from every neuron holding it; its in-flight requests drain first."""
        nodes = [self._lifecycle_node(url)] if url else [
            n for n in self.fleet.nodes if n.has_lifecycle and n.residency is not None and model in n.residency.models
        ]
        if not nodes:
            raise ApiError(404, f"No neuron holds `{model}`.", type="invalid_request_error", code="model_not_found",
                           param="model")
        try:
            for node in nodes:
                self.fleet.withdraw(node.url, model)
                self.metrics.evictions.inc(model=model, reason="admin")
                logs.event("model_evict", model=model, neuron=node.url, reason="admin")
                await self._post(node, UNLOAD_PATH, {"model": model, "drain_timeout_s": self.config.unload_drain_s})
                self.fleet.unloaded(node.url, model)
                await self._refresh(node)
        except LoadFailed as exc:
            raise exc.error from None
        return self.status()

    # --- last use, across restarts --------------------------------------------------

    def _read_lru(self) -> dict[str, float]:
        if self._path is None:
            return {}
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, (int, float))}

    def save(self) -> None:
        if self._path is None:
            return
        newest = dict(sorted(self.last_used.items(), key=lambda kv: kv[1])[-LRU_ENTRIES_MAX:])
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(newest))
            os.replace(tmp, self._path)
        except OSError as exc:
            logs.event("residency_save_failed", logging.WARNING, error=str(exc))
