"""The simulated world: the real cortex and neuron apps on a simulated network.

Everything here runs inside one `trio.run` on a `MockClock`: no sockets, no
threads, no real sleeps. cortex is the real `CortexApp` (routing with the
real kind adapters, the ledger and its SQLite store, the request lifetime,
failover, streaming), its store a `SyncStore` on an in-memory database that
outlives cortex restarts like a disk. Each upstream of kind neuron is the
real `NeuronApp` with the mock engine; one of any other kind is modelled in
sim/upstream_kinds.py. cortex reaches all of them as `[[fleet.upstreams]]`
through the same transport seam. A scenario's `[[models]]` are cortex's
catalogue, parsed by the real catalogue parser, so cortex's real lifecycle
loads and evicts them on the mock neurons' pretend memory.

With `[cortex] replicas` (or `[shared_ledger]`), the world runs that many
real `CortexApp`s instead, hosts `cortex-1` .. `cortex-N`, each on its own
handle of one shared-ledger model (sim/shared_ledger.py), so each builds the
real `SharedBudgetService`; the simulated clients reach them round-robin,
skipping replicas that are down, as a health-checking load balancer would.

`[cortex] output_holds` (or a scenario's `policies`, one run each) puts
cortex's output-hold policy in force: under "incremental" the real proxy
extends each hold a slice at a time as the reply streams, and the clients
report every chunk they read to the checker, which holds what was forwarded
to what the hold covers at that instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from common import counting
from cortex import config as config_mod
from cortex.app import CortexApp
from cortex.budget.ledger import Ledger, Refusal
from cortex.budget.store import SyncStore, connect
from cortex.fleet import catalogue
from cortex.fleet.lifecycle import LOAD_PATH, UNLOAD_PATH
from cortex.relay import StreamRelay
from neuron.app import ModelSpec, NeuronApp, NeuronConfig
from neuron.engines.mock import MockEngine, Pacing, Reply, Tool, plan_chat_reply
from sim.invariants import Checker, RequestRecord
from sim.network import Host, SimNetwork
from sim.scenario import NEURON_OUTPUT_TOKENS, FaultSpec, LogNormal, Scenario, UpstreamSpec, WorkloadSpec
from sim.shared_ledger import LinkSpec, ReplicaHandle, SharedDb, SharedLedgerModel
from sim.trace import Trace
from sim.upstream_kinds import KindApp, NeuronGate, ServerFaults

PROMPT_ALPHABET = "abcdefghijklmnopqrstuvwxyz "
SETTLE_GRACE_S = 5.0  # virtual time for in-flight settlements after the workload ends
# A client's request refused by policy, not failed: bad request, bad key, an unpriced model for a money cap, a cap.
REFUSAL_STATUSES = (400, 401, 403, 429)
NOTICES_WAIT_MAX_S = 30.0  # on a shared ledger: the longest the clients wait for every replica to know the keys
NOTICES_POLL_S = 0.001
TRUNCATED_MARK = b"x-cortex-budget-truncated"  # cortex's SSE comment (streams) and header (whole replies) on a cut


@dataclass
class LedgerFaults:
    """Planted bugs, so tests can prove the simulator catches them."""

    skip_cap_check: bool = False
    double_charge: bool = False
    window_amnesia: bool = False
    evict_busy: bool = False  # not the ledger's: cortex's lifecycle evicts models with requests in flight
    # On a shared ledger: the first replica admits against its own view (its own holds and charges
    # only) instead of the database's, which places what it admits unjudged.
    local_admission: bool = False
    # Not the ledger's: cortex's relay lets one slice of output past an incremental hold's bound, as if
    # it forwarded before the extension that covers it (planted from the simulator's side, on the proxy).
    forward_past_hold: bool = False


class _Lifespan:
    """Drives an ASGI app's lifespan protocol from inside the world."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.failed: str | None = None
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self._sent_startup = False

    async def receive(self) -> dict[str, Any]:
        if not self._sent_startup:
            self._sent_startup = True
            return {"type": "lifespan.startup"}
        await self.stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            self.started.set()
        elif message["type"] == "lifespan.startup.failed":
            self.failed = message.get("message", "")
            self.started.set()
        elif message["type"] == "lifespan.shutdown.complete":
            self.stopped.set()


class World:
    def __init__(
        self, scenario: Scenario, seed: int, faults: LedgerFaults | None = None, policy: str = "cortex",
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.ledger_faults = faults or LedgerFaults()
        self.policy = policy  # cortex's eviction policy: "cortex", or a benchmark's baseline
        self.t0 = scenario.start_s  # the virtual clock's start; workload and fault times are offsets from it
        self.trace = Trace(origin=self.t0)
        self.checker = Checker(self.trace)
        self.network = SimNetwork(self._rng("network"), scenario.latency_ms / 1000, scenario.jitter_ms / 1000)
        self.network.on_deliver = self._on_deliver
        self.network.on_attempt = self._on_attempt
        self.network.on_head = self._on_head
        self.network.on_body = self._on_body
        self.network.on_open = self._on_open
        self.network.on_close = self._on_close
        self.db = connect(":memory:")
        self.cortex_hosts = {name: self.network.add_host(name) for name in scenario.replica_names}
        self.cortex_host = self.cortex_hosts[scenario.replica_names[0]]
        self.upstream_hosts = {u.name: self.network.add_host(u.name) for u in scenario.upstreams}
        self.upstream_specs = {u.name: u for u in scenario.upstreams}
        self.server_faults = {u.name: ServerFaults(self._rng(f"server:{u.name}")) for u in scenario.upstreams}
        self.upstream_apps: list[NeuronApp | KindApp] = []  # every incarnation, for the admitted counts
        self.incarnations: dict[str, list[tuple[NeuronApp | KindApp, NeuronGate | None]]] = {
            u.name: [] for u in scenario.upstreams
        }  # the same, by upstream, each with its gate
        self.deliveries: Counter[str] = Counter()  # generation requests each upstream received
        self.checker.token_bytes = {u.name: u.token_bytes for u in scenario.upstreams}
        self.checker.lifecycle.pinned = {(name, m.id) for m in scenario.models for name in m.pinned_on}
        self.catalogue = catalogue.parse(scenario.catalogue())
        self.neurons: dict[str, NeuronApp] = {}  # the live incarnation of each neuron
        self.gates: list[NeuronGate] = []
        self.cold_waits = 0  # client requests that waited on a cold load (every cortex incarnation)
        self.cortex: CortexApp | None = None  # the first replica's live incarnation: it creates the principals
        self.cortexes: dict[str, CortexApp] = {}  # each replica's live incarnation
        self.cortex_lives: list[CortexApp] = []  # every cortex incarnation, for their metrics
        self.shared: SharedLedgerModel | None = None
        self.handles: dict[str, ReplicaHandle] = {}  # each replica's handle on the shared ledger, this life's
        self._lives: Counter[str] = Counter()
        if scenario.shared_ledger is not None:
            spec = scenario.shared_ledger
            shared_db = SharedDb(self._ledger(), spec.lease_s)
            link = LinkSpec(spec.round_trip_ms / 1000, spec.notice_delay_ms / 1000, spec.batch_window_ms / 1000, spec.batch_max)
            self.shared = SharedLedgerModel(shared_db, link, seed)
            self.checker.ledger = shared_db.ledger
        self.keys: dict[str, str] = {}  # name -> plaintext
        self.key_ids: dict[str, str] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._lifespans: dict[str, _Lifespan] = {}
        self._request_counter = 0
        self._next_replica = 0  # the clients' round-robin over the replicas
        self.client: httpx.AsyncBaseTransport = self.network.transport()
        self._simulated_client = self.client  # live mode swaps in a real one, and a base_url
        self.base_url = "http://cortex"
        self.virtual_end_s = 0.0

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.seed}:{stream}")

    # --- hosts --------------------------------------------------------------------

    async def _host(self, host: Host, app: Any, lifespan: bool, task_status: trio.TaskStatus[None]) -> None:
        """Run `app` on `host` until its scope is cancelled (a crash) or it is stopped."""
        with trio.CancelScope() as host_scope:
            self._scopes[host.name] = host_scope
            try:
                async with trio.open_nursery() as nursery:
                    host.nursery = nursery
                    if lifespan:
                        span = self._lifespans[host.name] = _Lifespan()
                        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
                        nursery.start_soon(app, scope, span.receive, span.send, name="lifespan")
                        await span.started.wait()
                        if span.failed is not None:
                            raise RuntimeError(f"{host.name} failed to start: {span.failed}")
                    host.app = app
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                host.app = None
                host.nursery = None

    def crash(self, name: str) -> None:
        """Kill a host at once: no shutdown, no settlement, connections broken."""
        self._scopes[name].cancel()
        if name in self.neurons:
            self.checker.lifecycle.neuron_reset(name)  # its models are gone with it

    async def start_upstream(self, nursery: trio.Nursery, name: str) -> None:
        spec, faults = self.upstream_specs[name], self.server_faults[name]
        app: NeuronApp | KindApp
        if spec.kind == "neuron":
            app = self.neurons[name] = NeuronApp(_neuron_config(spec, self.seed), wall_clock=trio.current_time)
            self.checker.lifecycle.neuron_reset(name, spec.models)
            served: Any = NeuronGate(app, faults)
            self.gates.append(served)
        else:
            app = served = KindApp(spec, self.seed, faults, ready_at=trio.current_time() + spec.load_s)
        self.upstream_apps.append(app)
        self.incarnations[name].append((app, served if spec.kind == "neuron" else None))
        # A neuron runs its lifespan, as under a server: its loads and unloads live in that nursery.
        await nursery.start(self._host, self.upstream_hosts[name], served, spec.kind == "neuron")

    async def start_cortex(self, nursery: trio.Nursery) -> None:
        """The cortex, or on a shared ledger every replica, in order."""
        if self.shared is None:
            app = self._cortex_app(self._store, self._ledger, "placement")
            await nursery.start(self._host, self.cortex_host, app, True)
            self.cortex = app
            assert app.budget is not None
            self.checker.ledger = app.budget.ledger
            return
        for name in self.cortex_hosts:
            await self.start_replica(nursery, name)

    async def start_replica(self, nursery: trio.Nursery, name: str) -> None:
        """One replica's life on a handle of its own: a replica id names one life, as on PostgreSQL."""
        assert self.shared is not None
        self._lives[name] += 1
        life = self._lives[name]
        handle = self.shared.handle(name if life == 1 else f"{name}.{life}",
                                    self.ledger_faults.local_admission and name == next(iter(self.cortex_hosts)))
        self.handles[name] = handle

        @asynccontextmanager
        async def store(config: Any, metrics: Any) -> AsyncIterator[ReplicaHandle]:
            try:
                yield handle
            finally:
                await handle.close()  # a graceful stop's last batch; nothing after a crash

        # The replica's view of the directory is a plain Ledger: the checker watches the database's.
        app = self._cortex_app(store, Ledger, f"placement:{name}")
        await nursery.start(self._host, self.cortex_hosts[name], app, True)
        self.cortexes[name] = app
        if name == next(iter(self.cortex_hosts)):
            self.cortex = app

    def _cortex_app(self, store: Any, ledger: Any, placement: str) -> CortexApp:
        app = CortexApp(
            self._cortex_config(),
            transport_factory=lambda url: self.network.transport(),
            store_factory=store,
            clock=trio.current_time,
            ledger_factory=ledger,
            # The simulated clients send unique ids; reusing them keeps runs reproducible
            # and lets the checker follow each request to the neuron and the ledger.
            request_ids=lambda offered: offered or self.next_request_id(),
        )
        self._lifecycle_seams(app, placement)
        if self.ledger_faults.forward_past_hold:
            _plant_forward_past_hold(app)
        self.cortex_lives.append(app)
        return app

    async def stop_cortex(self) -> None:
        """Graceful, for every replica that is up: the lifespan shuts down (background tasks end, a
        replica's last batch commits), then the host."""
        for name, host in self.cortex_hosts.items():
            if not host.up:
                continue
            span = self._lifespans[name]
            span.stop.set()
            await span.stopped.wait()
            self._scopes[name].cancel()

    def _lifecycle_seams(self, app: CortexApp, placement: str) -> None:
        """The scenario's catalogue, in force as a reload would put it; the eviction policy and the
        planted bug; and a count of the requests that wait on a cold load."""
        app.catalogue = app.proxy.catalogue = self.catalogue
        lifecycle = app.lifecycle
        lifecycle.placement_policy = self.policy
        lifecycle.placement_rng = self._rng(placement)
        lifecycle.fault_evict_busy = self.ledger_faults.evict_busy
        ensure = lifecycle.ensure

        async def counted(model: str) -> None:
            self.cold_waits += 1
            self.trace.event("cold_wait", model=model)
            await ensure(model)

        lifecycle.ensure = counted  # type: ignore[method-assign]

    def _ledger(self) -> Ledger:
        ledger = Ledger(
            fault_skip_cap_check=self.ledger_faults.skip_cap_check,
            fault_double_charge=self.ledger_faults.double_charge,
            fault_window_amnesia=self.ledger_faults.window_amnesia,
        )
        ledger.observer = self.checker.on_ledger
        reserve, checker = ledger.reserve, self.checker

        def reserve_observed(
            hold_id: str, key_id: str, amount_tokens: int, now: float, ttl_s: float, request_id: str | None = None,
            amount_usd: int = 0,
        ) -> Any:
            """The observer sees holds; the refusals are seen here, with the cap that refused and the wait."""
            result = reserve(hold_id, key_id, amount_tokens, now, ttl_s, request_id, amount_usd)
            if isinstance(result, Refusal) and ledger.observer is not None:  # a dead incarnation's are not
                checker.on_refusal(request_id or hold_id, key_id, result, now, (amount_tokens, amount_usd))
            return result

        extend = ledger.extend

        def extend_observed(hold_id: str, amount_tokens: int, now: float, amount_usd: int = 0) -> Any:
            """The observer sees a hold grow; a refused extension is seen here (the hold is open: it says whose)."""
            result = extend(hold_id, amount_tokens, now, amount_usd)
            if isinstance(result, Refusal) and ledger.observer is not None:
                hold = ledger.holds[hold_id]
                checker.on_extend_refused(hold.request_id or hold_id, hold.key_id, result, now, (amount_tokens, amount_usd))
            return result

        ledger.reserve = reserve_observed  # type: ignore[method-assign]
        ledger.extend = extend_observed  # type: ignore[method-assign]
        return ledger

    @asynccontextmanager
    async def _store(self, config: Any, metrics: Any) -> AsyncIterator["_MortalStore"]:
        self._cortex_store = _MortalStore(self.db)
        yield self._cortex_store

    def crash_cortex(self, name: str = "cortex") -> None:
        """kill -9: the process stops mid-flight. Trio still unwinds the dead
        incarnation's tasks, so its store and ledger go deaf first: nothing it
        does while unwinding reaches the disk or the checker. A replica's handle
        goes deaf instead: a batch already on the wire still commits."""
        if self.shared is not None:
            self.handles[name].dead = True
            self.crash(name)
            return
        self._cortex_store.dead = True
        if self.cortex is not None and self.cortex.budget is not None:
            self.cortex.budget.ledger.observer = None
        self.crash("cortex")

    def _cortex_config(self) -> config_mod.Config:
        c = self.scenario.cortex
        return config_mod.from_mapping({
            "fleet": {
                "upstreams": [{"url": f"http://{u.name}", "kind": u.kind} for u in self.scenario.upstreams],
                "default_context_tokens": c.default_context_tokens,
                "default_output_tokens": c.default_output_tokens,
                "poll_interval_s": c.poll_interval_s,
                "poll_timeout_s": c.connect_timeout_s,
                "unhealthy_after_failures": c.unhealthy_after_failures,
                "load_timeout_s": c.load_timeout_s,
                "unload_drain_s": c.unload_drain_s,
            },
            "upstream": {
                "connect_timeout_s": c.connect_timeout_s,
                "first_byte_timeout_s": c.first_byte_timeout_s,
                "idle_timeout_s": c.idle_timeout_s,
            },
            "budget": {"hold_ttl_s": c.hold_ttl_s, "expiry_interval_s": c.expiry_interval_s, "unpriced": c.unpriced,
                       "output_holds": c.output_holds, "output_slice_tokens": c.output_slice_tokens},
        })

    # --- what the network reports (generation requests only) ------------------------------

    def _is_cortex(self, host: Host) -> bool:
        return host.name in self.cortex_hosts

    def _on_deliver(self, host: Host, request: httpx.Request) -> None:
        if not self._is_cortex(host):
            headers = request.headers
            self.deliveries[host.name] += 1
            self.checker.on_deliver(host.name, headers.get("x-request-id", "?"), headers.get("authorization"))

    def _on_attempt(self, host: Host, request: httpx.Request, result: str) -> None:
        if not self._is_cortex(host):
            self.checker.on_attempt(host.name, request.headers.get("x-request-id", "?"), result)

    def _on_head(self, host: Host, request: httpx.Request, status: int) -> None:
        path = request.url.path
        if path in (LOAD_PATH, UNLOAD_PATH):
            self.checker.lifecycle.on_answer(host.name, path, _model_of(request), status)
            self.check_memory()
            return
        self.checker.on_head(host.name, request.headers.get("x-request-id", "?"), status, self._is_cortex(host))

    def _on_body(self, host: Host, request: httpx.Request, chunk: bytes) -> None:
        if not self._is_cortex(host):
            self.checker.on_body(host.name, request.headers.get("x-request-id", "?"), chunk)

    def _on_open(self, host: Host, request: httpx.Request) -> None:
        self._lifecycle_event(host, request, True)

    def _on_close(self, host: Host, request: httpx.Request) -> None:
        self._lifecycle_event(host, request, False)

    def _lifecycle_event(self, host: Host, request: httpx.Request, opened: bool) -> None:
        """A POST from cortex to an upstream: a load, an unload, or a generation on a model."""
        if self._is_cortex(host):
            return
        lc, path, model = self.checker.lifecycle, request.url.path, _model_of(request)
        if path == LOAD_PATH:
            lc.on_load(host.name, model, opened)
        elif path == UNLOAD_PATH:
            lc.on_unload(host.name, model, opened)
        else:
            lc.on_generation(host.name, model, opened)
        self.check_memory()

    def check_memory(self) -> None:
        for name, app in self.neurons.items():
            if self.upstream_hosts[name].up:
                lc = app.lifecycle
                self.checker.lifecycle.check_memory(name, lc.memory_reserved_bytes, lc.memory_budget_bytes)

    # --- principals -------------------------------------------------------------------

    async def create_principals(self) -> None:
        assert self.cortex is not None and self.cortex.budget is not None
        budget = self.cortex.budget
        for account in self.scenario.accounts:
            await budget.create_account(account.id, account.caps)
        for key in self.scenario.keys:
            record, plaintext = await budget.create_key(key.name, key.account, key.caps)
            self.keys[key.name] = plaintext
            self.checker.client_keys.add(f"Bearer {plaintext}")
            self.key_ids[key.name] = record.id
            self.checker.names[record.id] = key.name
        if self.shared is not None:
            await self._until_every_replica_knows_the_keys()

    async def _until_every_replica_knows_the_keys(self) -> None:
        """The other replicas learn the new keys from change notices; the clients start once they have."""
        wanted = set(self.key_ids.values())
        with trio.move_on_after(NOTICES_WAIT_MAX_S) as scope:
            while not all(app.budget is not None and wanted <= set(app.budget.keys) for app in self.cortexes.values()):
                await trio.sleep(NOTICES_POLL_S)
        if scope.cancelled_caught:
            self.checker.fail(f"the replicas did not learn the scenario's keys within {NOTICES_WAIT_MAX_S:g} s")

    # --- faults -----------------------------------------------------------------------

    async def run_fault(self, fault: FaultSpec, nursery: trio.Nursery) -> None:
        await trio.sleep_until(self.t0 + fault.at_s)
        self.trace.event("fault", kind=fault.kind, target=fault.target or "cortex")
        if fault.kind == "cortex_restart" and self.shared is not None:
            self.crash_cortex(fault.target)
            await trio.sleep(fault.for_s)  # its holds wait for a reaper: the new life has a new replica id
            await self.start_replica(nursery, fault.target)
            self.trace.event("recovered", target=fault.target)
            return
        if fault.kind == "cortex_restart":
            self.crash_cortex()
            crashed_at = trio.current_time()
            await trio.sleep(fault.for_s)
            await self.start_cortex(nursery)
            self.checker.on_orphans(self.db.execute(
                "SELECT request_id, key_id, account_id, charged_tokens, charged_usd, resolved_at FROM holds"
                " WHERE state = 'orphaned' AND resolved_at >= ? ORDER BY request_id",
                (crashed_at,),
            ).fetchall())
            self.trace.event("recovered", target="cortex")
            return
        host = self.upstream_hosts[fault.target]
        end = self.t0 + fault.at_s + fault.for_s if fault.for_s else float("inf")
        if fault.kind == "crash":
            if fault.between_requests:
                await host.wait_idle()  # and no checkpoint until the kill, so none can slip in
                self.trace.event("killed", target=fault.target)
            self.crash(fault.target)
            if fault.for_s:
                await trio.sleep(fault.for_s)
                await self.start_upstream(nursery, fault.target)
                self.trace.event("recovered", target=fault.target)
        elif fault.kind == "partition":
            host.faults.partitioned_until = end
        elif fault.kind == "delay":
            host.faults.extra_delay_s = fault.delay_ms / 1000
            await trio.sleep(fault.for_s)
            host.faults.extra_delay_s = 0.0
        elif fault.kind == "drop":
            host.faults.drop_at_chunk, host.faults.drop_share = fault.at_chunk, fault.share
            if fault.for_s:
                await trio.sleep(fault.for_s)
                host.faults.drop_at_chunk = None
        elif fault.kind == "reset":
            host.faults.reset_until, host.faults.reset_share = end, fault.share
        elif fault.kind == "overload":
            server = self.server_faults[fault.target]
            server.overload_until, server.overload_share = end, fault.share
            server.overload_status, server.retry_after_s = fault.status, fault.retry_after_s

    # --- clients ------------------------------------------------------------------------

    def next_request_id(self) -> str:
        self._request_counter += 1
        return f"r{self._request_counter:06d}"

    async def run_workload(self, index: int, wl: WorkloadSpec) -> None:
        rng = self._rng(f"workload{index}")
        await trio.sleep_until(self.t0 + wl.at_s)
        async with trio.open_nursery() as nursery:
            if wl.kind == "burst":
                for i in range(wl.count):  # keys in turn, so a burst spreads evenly
                    nursery.start_soon(self.client_request, wl, wl.keys[i % len(wl.keys)], random.Random(rng.random()))
            elif wl.kind == "open":
                end = self.t0 + wl.at_s + wl.duration_s
                while True:
                    await trio.sleep(rng.expovariate(wl.rate_per_s))
                    if trio.current_time() >= end:
                        break
                    nursery.start_soon(self.client_request, wl, rng.choice(wl.keys), random.Random(rng.random()))
            else:
                for c in range(wl.clients):
                    nursery.start_soon(self._closed_loop_client, wl, wl.keys[c % len(wl.keys)], random.Random(rng.random()))

    async def _closed_loop_client(self, wl: WorkloadSpec, key: str, rng: random.Random) -> None:
        end = self.t0 + wl.at_s + wl.duration_s
        while trio.current_time() < end:
            await self.client_request(wl, key, random.Random(rng.random()))
            await trio.sleep(wl.think_s.sample(rng))

    async def client_request(self, wl: WorkloadSpec, key_name: str, rng: random.Random) -> None:
        prompt_len = int(wl.prompt_bytes.sample(rng))
        prompt = "".join(rng.choices(PROMPT_ALPHABET, k=prompt_len))
        body: dict[str, Any] = {"model": wl.pick_model(rng), "messages": [{"role": "user", "content": prompt}]}
        if wl.max_tokens is not None:
            body["max_tokens"] = int(wl.max_tokens.sample(rng))
        stream = rng.random() < wl.stream_share
        if stream:
            body["stream"] = True
        cancel_tokens = cancel_s = None
        if wl.cancel_share and rng.random() < wl.cancel_share:
            if wl.cancel_after_tokens is not None:
                cancel_tokens = int(wl.cancel_after_tokens.sample(rng))
            if wl.cancel_after_s is not None:
                cancel_s = wl.cancel_after_s.sample(rng)
        payload = json.dumps(body).encode()
        prompt_tokens = counting.count_chat(body["messages"])  # the hold's prompt part: cortex's byte-level bound
        for attempt in range(wl.max_retries + 1):
            wait_s = await self._one_request(key_name, body["model"], payload, stream, cancel_tokens, cancel_s, attempt,
                                             prompt_tokens)
            if wait_s is None or not wl.honor_retry_after:
                return
            await trio.sleep(wait_s)

    async def _one_request(
        self, key_name: str, model: str, payload: bytes, stream: bool, cancel_tokens: int | None, cancel_s: float | None,
        attempt: int, prompt_tokens: int | None = None,
    ) -> float | None:
        """One HTTP exchange; returns the Retry-After wait when refused by a rate limit."""
        rid = self.next_request_id()
        record = self.checker.requests[rid] = RequestRecord(rid, key_name, model, prompt_tokens=prompt_tokens)
        key = self.keys.get(key_name, "sk-cx-invalid-" + "0" * 24)
        replica = record.replica = self._pick_replica()
        request = httpx.Request(
            "POST", (self.base_url if replica is None else f"http://{replica}") + "/v1/chat/completions", content=payload,
            headers={"authorization": f"Bearer {key}", "x-request-id": rid, "content-type": "application/json"},
        )
        started = trio.current_time()
        on_replica = {"replica": replica} if replica is not None else {}
        self.trace.event("send", req=rid, key=key_name, stream=stream, attempt=attempt, **on_replica)
        retry_after: float | None = None
        with trio.move_on_after(cancel_s if cancel_s is not None else float("inf")) as scope:
            try:
                retry_after = await self._exchange(request, record, stream, cancel_tokens)
            except httpx.HTTPError as exc:
                record.outcome = "failed"
                record.code = type(exc).__name__
        if scope.cancelled_caught:
            record.outcome = "cancelled"
        if attempt and record.outcome == "served":
            self.checker.admitted_on_retry += 1
        record.latency_s = trio.current_time() - started
        extra = {"retry_after_ms": record.retry_after_ms} if record.retry_after_ms is not None else {}
        self.trace.event("done", req=rid, outcome=record.outcome, status=record.status, code=record.code,
                         bytes=record.received_bytes, **extra)
        return retry_after

    def _pick_replica(self) -> str | None:
        """The next replica that is up, round-robin (the next in turn when none is); None: the one
        cortex at `base_url` (a simulated one, or a real one in live mode)."""
        if self.shared is None or self.client is not self._simulated_client:
            return None
        names = list(self.cortex_hosts)
        for i in range(len(names)):
            name = names[(self._next_replica + i) % len(names)]
            if self.cortex_hosts[name].up:
                self._next_replica = (self._next_replica + i + 1) % len(names)
                return name
        name = names[self._next_replica]
        self._next_replica = (self._next_replica + 1) % len(names)
        return name

    async def _exchange(self, request: httpx.Request, record: RequestRecord, stream: bool, cancel_tokens: int | None) -> float | None:
        response = await self.client.handle_async_request(request)
        record.status = response.status_code
        try:
            if response.status_code != 200:
                raw = b"".join([c async for c in response.stream])  # type: ignore[union-attr]
                error = json.loads(raw).get("error", {})
                record.code = error.get("code")
                record.outcome = "refused" if response.status_code in REFUSAL_STATUSES else "failed"
                if response.status_code == 429 and "retry-after-ms" in response.headers:
                    record.retry_after_ms = int(response.headers["retry-after-ms"])
                    record.retry_after_s = int(response.headers.get("retry-after", "0"))
                    return record.retry_after_ms / 1000
                return None
            if not stream:
                raw = b"".join([c async for c in response.stream])  # type: ignore[union-attr]
                content = json.loads(raw)["choices"][0]["message"]["content"] or ""
                record.received_bytes = len(content.encode())
                record.truncated = response.headers.get(TRUNCATED_MARK.decode()) == "true"
                self.checker.on_forwarded(record)
                record.outcome = "served"
                return None
            relay = StreamRelay(client_wants_usage=True)
            async for chunk in response.stream:  # type: ignore[union-attr]
                relay.feed(chunk)
                record.received_bytes = relay.output_tokens
                self.checker.on_forwarded(record)
                if TRUNCATED_MARK in chunk:
                    record.truncated = True
                if b'"error"' in chunk:
                    record.outcome = "failed"
                    record.code = "stream_error"
                if cancel_tokens is not None and relay.output_tokens >= cancel_tokens:
                    record.outcome = "cancelled"
                    return None
            if not record.outcome:
                record.outcome = "served" if relay.done else "failed"
            return None
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    # --- the end ---------------------------------------------------------------------------

    def leaked_tasks(self) -> list[str]:
        """Tasks still alive on any host once every client is done (the lifespan aside)."""
        return [
            f"{host.name}:{task.name}"
            for host in [*self.cortex_hosts.values(), *self.upstream_hosts.values()]
            if host.nursery is not None
            for task in host.nursery.child_tasks
            if task.name != "lifespan"
        ]

    def store_states(self) -> tuple[int, dict[str, str]]:
        if self.shared is not None:
            return self.shared.db.states()
        rows = self.db.execute("SELECT request_id, state FROM holds").fetchall()
        return sum(1 for _, s in rows if s == "open"), {rid: state for rid, state in rows}

    def upstream_counts(self) -> tuple[int, int]:
        """Generation requests the upstreams admitted, and those they (or their overload faults) refused."""
        return (
            sum(a.counters.requests_total for a in self.upstream_apps),
            sum(a.counters.rejected_total for a in self.upstream_apps) + sum(f.refused_total for f in self.server_faults.values())
            - sum(g.control_refused_total for g in self.gates),  # the neuron counts its lifecycle refusals too
        )

    def upstream_counts_by_name(self) -> dict[str, tuple[int, int, int]]:
        """Per upstream: the generation requests it admitted, those it (or its overload fault) refused,
        and those the cortexes delivered to it."""
        out = {}
        for name, lives in self.incarnations.items():
            admitted = sum(app.counters.requests_total for app, _ in lives)
            refused = (sum(app.counters.rejected_total for app, _ in lives) + self.server_faults[name].refused_total
                       - sum(gate.control_refused_total for _, gate in lives if gate is not None))
            out[name] = (admitted, refused, self.deliveries[name])
        return out

    def shared_summary(self) -> dict[str, Any]:
        """The shared ledger's figures (nothing for one cortex on SQLite)."""
        if self.shared is None:
            return {}
        c = self.shared.db.counters
        requests = list(self.checker.requests.values())
        return {"shared_ledger": {
            "replicas": len(self.cortex_hosts), "replica_lives": len(self.shared.handles), "batches": c.batches,
            "reserves": c.reserves, "admitted": c.admitted, "reserves_per_batch": round(c.reserves / c.reserve_batches, 2) if c.reserve_batches else 0.0,
            "batch_items_max": c.batch_items_max, "round_trips": c.round_trips, "heartbeats": c.heartbeats,
            "reaped": c.reaped, "notices": c.notices,
            "requests_by_replica": {name: sum(r.replica == name for r in requests) for name in self.cortex_hosts},
            "served_by_replica": {name: sum(r.replica == name and r.outcome == "served" for r in requests)
                                  for name in self.cortex_hosts},
        }}


class _MortalStore(SyncStore):
    """The store of one cortex incarnation: after a crash its writes are lost."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.dead = False

    async def commit(self, ops: Any, durable: bool = True) -> None:
        if self.dead:
            await trio.lowlevel.checkpoint()
            return
        await super().commit(ops, durable)


@dataclass(frozen=True)
class TailedMockEngine(MockEngine):
    """The mock engine with each reply's natural length drawn from `lengths`, seeded by the engine's
    seed, the request's seed and its prompt, as the mock's own text is: the same request always gets
    the same reply, whatever the scheduling."""

    lengths: LogNormal | None = None

    def plan(
        self, request_seed: int | None, prompt: str, limit_tokens: int, stop: list[str], tool: Tool | None = None,
        reasoning_effort: str | None = None,
    ) -> Reply:
        assert self.lengths is not None
        digest = hashlib.blake2b(f"{self.seed}:{request_seed}:".encode() + prompt.encode("utf-8"), digest_size=16)
        natural = self.lengths.sample(random.Random(int.from_bytes(digest.digest(), "little")))
        return plan_chat_reply(self.seed, request_seed, prompt, natural, limit_tokens, stop, tool, reasoning_effort)


def _plant_forward_past_hold(app: CortexApp) -> None:
    """The planted bug `forward_past_hold`: each time cortex sets its relay's bound from an incremental
    hold (`Proxy._cover`), widen it by one slice of bytes, so output the hold does not cover reaches the
    client once an extension is refused. Cortex's own bound is put back before each of its calls."""
    cover = app.proxy._cover

    async def leaky(grant: Any, relay: StreamRelay, *args: Any, **kwargs: Any) -> None:
        relay.output_tokens_max = getattr(relay, "sim_cortex_bound", relay.output_tokens_max)
        await cover(grant, relay, *args, **kwargs)
        relay.sim_cortex_bound = relay.output_tokens_max  # type: ignore[attr-defined]
        if grant is not None and grant.incremental and relay.output_tokens_max is not None:
            relay.output_tokens_max += grant.slice_tokens

    app.proxy._cover = leaky  # type: ignore[method-assign]


def _neuron_config(spec: UpstreamSpec, seed: int) -> NeuronConfig:
    pacing = Pacing(spec.ttft_s, 1 / spec.tokens_per_s)
    engine: MockEngine
    if isinstance(spec.reply_tokens, LogNormal):
        engine = TailedMockEngine(seed=seed, reply_tokens=round(spec.reply_tokens.median), pacing=pacing, lengths=spec.reply_tokens)
    else:
        engine = MockEngine(seed=seed, reply_tokens=spec.reply_tokens, pacing=pacing)
    models = [ModelSpec(m, spec.context_tokens, spec.output_tokens or NEURON_OUTPUT_TOKENS) for m in spec.models]
    return NeuronConfig(models=models, engine=engine, slots=spec.slots, queue_depth=spec.queue_depth, chunk_tokens=spec.chunk_tokens,
                        memory_mb=spec.memory_mb, model_memory_mb=spec.model_memory_mb, load_s=spec.load_s,
                        context_tokens=spec.context_tokens, output_tokens=spec.output_tokens or NEURON_OUTPUT_TOKENS)


def _model_of(request: httpx.Request) -> str:
    """The model a POST from cortex names (its generations and lifecycle requests all do)."""
    cached = request.extensions.get("sim_model")
    if cached is None:
        try:
            model = json.loads(request.content).get("model")
        except (ValueError, AttributeError):
            model = None
        cached = request.extensions["sim_model"] = model if isinstance(model, str) else "?"
    return cached


def quiet_logs() -> None:
    logging.getLogger("cortex").setLevel(logging.CRITICAL)
