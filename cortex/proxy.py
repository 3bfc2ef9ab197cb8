"""One generation request's life inside cortex: estimate, reserve, dispatch, settle.

The whole exchange runs in one block under a disconnect watch: if the
client goes away, the block is cancelled, the upstream response is closed,
and the neuron stops generating. The budget is reserved before routing,
and the hold is settled in the block's `finally`, so every way out settles
exactly once. A connect failure (the neuron never saw the request) fails
over to the next healthy neuron; anything after that is reported, never
retried, since the neuron may already have generated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import trio

from cortex import logs
from common import asgi
from common import errors
from common.errors import ApiError
from common.openai_schema import GenerationRequest
from cortex.api.surfaces import StreamShape
from cortex.budget.estimate import Estimate, estimate, prompt_tokens_floor
from cortex.budget.exact_count import Counters, counts_inline
from cortex.budget.ledger import Hold
from cortex.budget.meter import Meter, Settlement, usage_counts
from cortex.budget.pricing import Prices
from cortex.budget.service import BudgetService, KeyRecord
from cortex.config import Config
from cortex.fleet.kinds.base import NormalisedError, prompt_truncation_suspected
from cortex.fleet.catalogue import Catalogue, apply_limits
from cortex.fleet.lifecycle import Lifecycle
from cortex.fleet.registry import Fleet, ModelInfo, Node
from cortex.fleet.upstream import (
    LocalResourceError,
    Upstream,
    UpstreamFailed,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from cortex.assemble import StreamAssembler, cut_events
from cortex.relay import SSEDecoder, SSEProtocolError, StreamRelay, event_data, output_tokens

ERROR_BODY_MAX_BYTES = 64 * 1024


FAILOVERS_MAX = 1  # an overload or a reset before the head is retried once, on another replica


class _Overloaded(Exception):
    """An upstream refused the request as overloaded, before any byte reached the client."""

    def __init__(self, error: ApiError, retry_after_s: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after_s = retry_after_s


def upstream_error(node: Node, status: int, raw: bytes, headers: Any) -> ApiError:
    """An upstream's error response, in its kind's own words, as the client's error."""
    return client_error(node.kind.normalise_error(status, raw, headers.get("retry-after")))


def client_error(err: NormalisedError) -> ApiError:
    """A normalised upstream error as the client's; an overload raises _Overloaded, for failover."""
    extra = errors.retry_after_headers(err.retry_after_s) if err.retry_after_s is not None else []
    api_error = ApiError(err.status, err.message, type=err.type, code=err.code, param=err.param, headers=extra)
    if err.overloaded and err.retry_after_s is not None:
        raise _Overloaded(api_error, err.retry_after_s)
    return api_error


@dataclass
class _ClientStream:
    """A streamed request's client side: its shape, and whether its head went out (it may go
    early, to ping through a cold load)."""

    shape: StreamShape
    started: bool = False


@dataclass
class OutputGrant:
    """How much of a request's output its hold covers, and how that grows.

    Worst case: the hold covers the request's whole output bound from the start
    (`slice_tokens` 0). Incremental: it covers `slice_tokens` at first and is
    extended a slice at a time, ahead of the output, each extension checked
    against every cap and durable before what it covers is forwarded; once one
    is refused the output ends where the hold does.
    """

    hold: Hold | None
    prompt_tokens: int  # the hold's prompt part
    output_max: int  # the request's own output bound
    granted: int  # output tokens the hold covers now
    slice_tokens: int = 0
    prices: Prices | None = None
    refused: bool = False  # an extension was refused (or could not be made durable): no more
    cut: bool = False  # the output was ended where the hold ends
    counter: Any = None  # the model's exact counter, if cortex has its tokenizer: a cut reply is counted with it
    relayed: list[bytes] = dataclasses.field(default_factory=list)  # what was forwarded (kept when counter is set)

    @property
    def incremental(self) -> bool:
        return self.slice_tokens > 0

    @property
    def can_grow(self) -> bool:
        return self.incremental and not self.refused and self.granted < self.output_max


class _FirstRead:
    """A stream's first chunk, read by a task of its own: waiting for it may time out, but the
    read is never cancelled (a cancelled read ends the upstream body's iterator for good)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.chunk = b""
        self.error: Exception | None = None

    async def run(self, response: UpstreamResponse) -> None:
        try:
            with response.idle_watch():
                self.chunk = await response.next_chunk()
        except Exception as exc:  # noqa: BLE001 - handed to the relay, which reports it in the stream
            self.error = exc
        finally:
            self.done.set()

    async def get(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.chunk


def _first_frame(chunk: bytes) -> Any:
    """The JSON of a chunk's first complete SSE event, if it could be an error frame."""
    if b'"error"' not in chunk:  # the common case, decided without splitting or parsing
        return None
    try:
        events = SSEDecoder().feed(chunk)
        return json.loads(event_data(events[0])) if events else None
    except (SSEProtocolError, ValueError, RecursionError):
        return None


class _Writer:
    """A stream's client writes, with keep-alives while nothing else is written.

    Two tasks may write (the relay and the pinger), and an ASGI send must not
    interleave with another: the pinger skips while a write is under way, and
    the relay waits only for a ping already on the wire. No lock, so a stream
    pays no scheduler trip per write for its pings.
    """

    def __init__(self, request: asgi.Request, pings: bool) -> None:
        self._send = request.send
        self._pings = pings
        self._last_write = trio.current_time()
        self._writing = False
        self._ping_sent: trio.Event | None = None  # set while a ping is on the wire

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._ping_sent is not None:
            await self._ping_sent.wait()
        if not self._pings:
            await asgi.send_chunk(self._send, data)
            return
        self._writing = True
        try:
            await asgi.send_chunk(self._send, data)
        finally:
            self._writing = False
            self._last_write = trio.current_time()

    async def ping_while_idle(self, shape: StreamShape) -> None:
        interval_s = shape.ping_interval_s
        assert self._pings and interval_s is not None and interval_s > 0
        while True:
            await trio.sleep_until(self._last_write + interval_s)
            if self._writing:  # a slow client, not an idle stream: look again later
                await trio.sleep(interval_s)
                continue
            if trio.current_time() < self._last_write + interval_s:
                continue
            data = shape.ping()
            self._ping_sent = done = trio.Event()
            try:
                if data:
                    await asgi.send_chunk(self._send, data)
            finally:
                self._ping_sent = None
                self._last_write = trio.current_time()
                done.set()


class Proxy:
    def __init__(
        self, config: Config, fleet: Fleet, upstream: Upstream, budget: BudgetService | None,
        catalogue: Catalogue | None = None,
    ) -> None:
        self.config = config
        self.catalogue = catalogue or Catalogue()
        self.fleet = fleet
        self.upstream = upstream
        self.budget = budget
        self._in_flight_by_key: dict[tuple[str, str], int] = {}  # (key id, model) -> requests
        # Exact prompt counts for catalogue models that name a tokenizer; large prompts are
        # counted in worker threads, at most one per core at once.
        self.counters = Counters()
        self._count_threads = trio.CapacityLimiter(os.cpu_count() or 1)
        self.lifecycle: Lifecycle | None = None  # cold loads on demand; set by the app

    def model_info(self, name: str) -> ModelInfo | None:
        """What the fleet and the catalogue say of the model `name` (an alias resolved)."""
        return self._model_info(self.catalogue.resolve(name))

    def _model_info(self, model: str) -> ModelInfo | None:
        info = self.fleet.model_info(model)
        defined = self.catalogue.model(model)
        if info is None and defined is not None and defined.context_tokens is not None:
            # Loaded nowhere yet (a cold load will place it): the catalogue's limits bound the hold.
            output = defined.output_tokens or defined.context_tokens
            return ModelInfo(model, defined.context_tokens, min(output, defined.context_tokens))
        if info is None or defined is None:
            return info
        limit = apply_limits({"context": info.context_tokens, "output": info.output_tokens}, defined)
        return dataclasses.replace(info, context_tokens=limit["context"], output_tokens=limit["output"], limits_reported=True)

    def _exact_counter(self, model: str) -> Any | None:
        """The model's exact counter: the catalogue's tokenizer if it names one, else its neurons' advert."""
        defined = self.catalogue.model(model)
        if defined is not None and defined.tokenizer is not None:
            return self.counters.get(model, defined.tokenizer)
        return self.fleet.exact_counter(model)

    async def exact_prompt_tokens(self, gen: GenerationRequest) -> int | None:
        """The prompt's tokens on the model's own tokenizer: the catalogue's `tokenizer` where it
        names one, else the one the model's neurons advertise, once the fleet holds it
        (cortex/fleet/tokenizers.py); or None: then the byte bound holds. Large prompts are
        counted off the event loop."""
        defined = self.catalogue.model(gen.model)
        if defined is not None and defined.tokenizer is not None:
            counter = self.counters.get(gen.model, defined.tokenizer)
        else:
            counter = self.fleet.exact_counter(gen.model)
        if counter is None:
            return None
        if counts_inline(gen):
            return counter.count(gen)
        # Abandoned on cancel: the thread finishes on its own, and the counter is thread-safe.
        return await trio.to_thread.run_sync(counter.count, gen, limiter=self._count_threads, abandon_on_cancel=True)

    @contextmanager
    def _fair_share(self, key: KeyRecord | None, model: str) -> Iterator[None]:
        """At most `max_in_flight_per_key` requests of one key on one model at once: the
        catalogue's value for the model, else `fleet.max_in_flight_per_key`."""
        defined = self.catalogue.model(model)
        limit = (defined and defined.max_in_flight_per_key) or self.config.fleet.max_in_flight_per_key
        if key is None or not limit:
            yield
            return
        slot = (key.id, model)
        if self._in_flight_by_key.get(slot, 0) >= limit:
            if self.budget is not None:
                self.budget.metrics.refusals.inc(reason="fair_share")
            raise ApiError(
                429, f"Key {key.id} already has {limit} requests in flight on `{model}`, the most one key may have.",
                type="requests", code="rate_limit_exceeded", headers=errors.retry_after_headers(self.config.budget.retry_hint_s),
            )
        self._in_flight_by_key[slot] = self._in_flight_by_key.get(slot, 0) + 1
        try:
            yield
        finally:
            self._in_flight_by_key[slot] -= 1
            if not self._in_flight_by_key[slot]:
                del self._in_flight_by_key[slot]

    async def generate(self, request: asgi.Request, gen: GenerationRequest, path: str, key: KeyRecord | None) -> None:
        """Estimate, reserve, dispatch, settle: one block, one owner."""
        served = self.catalogue.resolve(gen.model)
        if served != gen.model:  # an alias: everything from here on is about the model that serves it
            request.log["model_requested"] = gen.model
            gen = dataclasses.replace(gen, model=served, body={**gen.body, "model": served})
        if not self.fleet.knows(gen.model) and not (self.lifecycle is not None and self.lifecycle.loadable(gen.model)):
            raise errors.model_not_found(request.log.get("model_requested", gen.model))
        info = self._model_info(gen.model)
        exact = await self.exact_prompt_tokens(gen)
        est = estimate(gen, info, self.config.budget.fallback_output_tokens, exact_prompt_tokens=exact)
        request.log.update(model=gen.model, stream=gen.stream, estimate_tokens=est.total_tokens,
                           prompt_count="exact" if exact is not None else "bound")
        grant = self._grant(key, est)
        # Under incremental holds the upstream always streams, so the output can be cut where the hold ends.
        meter = Meter(gen.stream or grant.incremental, est.prompt_tokens, prompt_tokens_floor=prompt_tokens_floor(gen, info))
        with self._fair_share(key, gen.model):
            await self._generate(request, gen, path, key, est, meter, grant)

    def _grant(self, key: KeyRecord | None, est: Estimate) -> OutputGrant:
        budget = self.config.budget
        policy = self.budget.output_holds(key) if key is not None and self.budget is not None else "worst_case"
        slice_tokens = budget.output_slice_tokens
        if policy == "incremental" and est.output_tokens > slice_tokens:
            return OutputGrant(None, est.prompt_tokens, est.output_tokens, slice_tokens, slice_tokens)
        return OutputGrant(None, est.prompt_tokens, est.output_tokens, est.output_tokens)

    async def _generate(
        self, request: asgi.Request, gen: GenerationRequest, path: str, key: KeyRecord | None, est: Estimate, meter: Meter,
        grant: OutputGrant,
    ) -> None:
        async with asgi.disconnect_watch(request.receive) as watch:
            if key is None or self.budget is None:
                await self._dispatch(request, gen, path, est, watch, meter, grant)
            else:
                request.log["key_id"] = key.id
                grant.prices = prices = self._prices(gen.model)
                held = Estimate(est.prompt_tokens, grant.granted)  # the whole estimate, or its first slice
                if grant.incremental:
                    request.log.update(output_holds="incremental", output_slice_tokens=grant.slice_tokens)
                    grant.counter = self._exact_counter(gen.model)
                grant.hold = await self.budget.reserve(
                    key, held, request.request_id, gen.model, request.log.get("client_request_id"), prices
                )
                try:
                    request.response_headers += request.surface.ratelimit_headers(self.budget.headroom(key))
                    await self._dispatch(request, gen, path, est, watch, meter, grant)
                finally:
                    meter.client_gone = watch.disconnected
                    await self._settle(request, grant.hold, meter, prices)
                    if grant.incremental:
                        request.log.update(output_granted_tokens=grant.granted, budget_truncated=grant.cut)
        if watch.disconnected:
            request.log["outcome"] = "client_disconnected"
        else:
            request.log.setdefault("outcome", "ok")

    def _check_truncation(self, request: asgi.Request, node: Node, meter: Meter) -> None:
        """A server that cuts oversized prompts silently (Ollama) is seen, and counted."""
        if not node.kind.truncates_prompts:
            return
        counts = usage_counts(meter.usage)
        if counts is None:
            return
        if prompt_truncation_suspected(counts[0], meter.prompt_tokens_estimate):
            request.log["prompt_truncated"] = True
            if self.budget is not None:
                self.budget.metrics.upstream_truncations.inc(upstream=node.url)
            logs.event("upstream_truncated_prompt", logging.WARNING, neuron=node.url, request_id=request.request_id,
                       prompt_tokens_reported=counts[0], prompt_tokens_bound=meter.prompt_tokens_estimate)

    def _prices(self, model: str) -> Prices | None:
        defined = self.catalogue.model(model)
        return Prices.from_cost(defined.cost) if defined is not None and defined.cost is not None else None

    async def _settle(self, request: asgi.Request, hold: Hold, meter: Meter, prices: Prices | None) -> None:
        """Resolve the hold exactly once; nothing an upstream sent can make this raise."""
        assert self.budget is not None
        try:
            decision = meter.settlement()
        except Exception as exc:  # a bug in the meter must not leak the hold
            logs.event("settle_fallback", logging.ERROR, request_id=request.request_id, error=repr(exc))
            decision = Settlement("charge_hold", 0)
        if decision.disagreement is not None:
            self.budget.metrics.usage_disagreements.inc(reason=decision.disagreement)
            request.log["usage_disagreement"] = decision.disagreement
        if decision.action == "settle":
            try:
                usd = decision.usd(prices)
            except Exception as exc:  # never leak the hold over arithmetic
                logs.event("settle_fallback", logging.ERROR, request_id=request.request_id, error=repr(exc))
                usd = hold.amount_usd
            resolution = await self.budget.settle(hold, decision.tokens, usd)
        elif decision.action == "release":
            resolution = await self.budget.release(hold)
        else:
            resolution = await self.budget.charge_hold(hold)
        request.log.update(settlement=decision.action, hold_tokens=hold.amount_tokens)
        if resolution is not None:
            request.log["charged_tokens"] = resolution.charged_tokens
            if hold.amount_usd:
                request.log.update(hold_micro_usd=hold.amount_usd, charged_micro_usd=resolution.charged_usd)

    async def _dispatch(
        self,
        request: asgi.Request,
        gen: GenerationRequest,
        path: str,
        est: Estimate,
        watch: asgi.Disconnect,
        meter: Meter,
        grant: OutputGrant,
    ) -> None:
        client = _ClientStream(request.surface.stream()) if gen.stream else None
        try:
            await self._dispatch_to_a_replica(request, gen, path, est, watch, meter, client, grant)
        except ApiError as err:
            if client is None or not client.started:
                raise
            # The stream began early (pings through a cold load): the error is its last event.
            request.log.update(outcome=err.code or err.type, error=err.message)
            await asgi.send_chunk(request.send, client.shape.error(err))
            watch.closing()
            await asgi.end_stream(request.send)

    async def _dispatch_to_a_replica(
        self, request: asgi.Request, gen: GenerationRequest, path: str, est: Estimate, watch: asgi.Disconnect,
        meter: Meter, client: "_ClientStream | None", grant: OutputGrant,
    ) -> None:
        tried: set[str] = set()
        failovers = 0
        refused: ApiError | None = None  # the last failure we failed over from, answered if no replica is left
        waited = False  # for a cold load: once at most
        while True:
            node = self.fleet.route(gen.model, exclude=frozenset(tried), now=trio.current_time())
            if node is None and not tried and not waited and self.lifecycle is not None and self.lifecycle.loadable(gen.model):
                # Loaded nowhere: wait, inside the hold, for the one load of it (single flight).
                waited = True
                request.log["cold_load"] = True
                await self._wait_for_load(request, gen.model, client)
                continue
            if node is None:
                if refused is not None:
                    raise refused
                raise errors.service_unavailable(
                    f"No healthy neuron is serving `{gen.model}` right now.",
                    retry_after_s=math.ceil(self.config.fleet.poll_interval_s),
                )
            request.log["neuron"] = node.url
            # The output bound the hold covers goes upstream, in this kind's own fields, so no
            # upstream may write more than the client is charged for; its key, never the client's.
            body = node.kind.prepare_body(
                gen.body, output_tokens_max=est.output_tokens, stream=gen.stream or grant.incremental, chat=gen.kind == "chat"
            )
            headers = {"content-type": "application/json", "x-request-id": request.request_id}
            if node.api_key:
                headers["authorization"] = f"Bearer {node.api_key}"
            meter.token_bytes_max = self.fleet.token_bytes_max(node, gen.model)
            # The relay's guard, in output bytes. Worst case: the upstream was sent the hold's bound, so this
            # only stops one that ignores it. Incremental: the upstream was sent the request's own bound, so
            # the guard is what binds, and it must hold whatever the tokenizer: a token is at least a byte,
            # so no more bytes than the tokens held are forwarded.
            output_max = grant.granted if grant.incremental else grant.granted * meter.token_bytes_max
            self.fleet.acquire(node, gen.model)
            if self.lifecycle is not None:
                self.lifecycle.used(node.url, gen.model)
            meter.dispatched = True
            try:
                try:
                    async with self.upstream.post(node.url, path, asgi.encode_json(body), headers) as response:
                        await self._relay(request, gen, node, response, watch, meter, output_max, client, grant)
                finally:
                    self._check_truncation(request, node, meter)
                return
            except LocalResourceError as exc:
                meter.dispatched = False  # the request never left cortex
                logs.event("local_resource_error", logging.ERROR, request_id=request.request_id, error=str(exc))
                raise errors.service_unavailable("cortex is short of local resources (file descriptors); retry shortly.", 1) from None
            except UpstreamUnavailable as exc:
                meter.dispatched = False  # never reached the neuron
                self.fleet.dispatch_failed(node.url, str(exc))
                logs.event("neuron_unreachable", logging.WARNING, neuron=node.url, request_id=request.request_id, error=str(exc))
                tried.add(node.url)
            except _Overloaded as exc:
                # Nothing was generated or sent: another replica may take it, within the same hold.
                meter.dispatched = False
                self.fleet.cool_down(node.url, trio.current_time() + exc.retry_after_s)
                logs.event("upstream_overloaded", logging.WARNING, neuron=node.url, request_id=request.request_id,
                           retry_after_s=exc.retry_after_s)
                if failovers >= FAILOVERS_MAX:
                    raise exc.error from None
                failovers += 1
                refused = exc.error
                tried.add(node.url)
            except UpstreamTimeout as exc:
                raise errors.upstream_timeout(f"The neuron at {node.url} timed out: {exc}") from None
            except UpstreamReset as exc:
                # Broken before the head. The upstream may have begun, but no byte reached the
                # client, and the client will be charged for one answer only.
                broke = errors.upstream_error(f"The neuron at {node.url} failed: {exc}")
                if failovers >= FAILOVERS_MAX:
                    raise broke from None
                failovers += 1
                refused = broke
                logs.event("upstream_reset", logging.WARNING, neuron=node.url, request_id=request.request_id, error=str(exc))
                tried.add(node.url)
            except UpstreamFailed as exc:
                raise errors.upstream_error(f"The neuron at {node.url} failed: {exc}") from None
            finally:
                self.fleet.release(node, gen.model)

    async def _relay(
        self,
        request: asgi.Request,
        gen: GenerationRequest,
        node: Node,
        response: UpstreamResponse,
        watch: asgi.Disconnect,
        meter: Meter,
        output_max: int,
        client: "_ClientStream | None" = None,
        grant: OutputGrant | None = None,
    ) -> None:
        if response.status != 200:
            raw = await response.read_all(ERROR_BODY_MAX_BYTES)
            meter.dispatched = False  # refused by the neuron: nothing generated
            raise upstream_error(node, response.status, raw, response.headers)
        if gen.stream or (grant is not None and grant.incremental):
            relay = StreamRelay(gen.include_usage or not gen.stream, output_max)
            first = _FirstRead()
            async with asgi.companion(partial(first.run, response)):
                if gen.stream:
                    client = client or _ClientStream(request.surface.stream())
                    if not client.started:
                        await self._peek(node, first, client.shape.ping_interval_s, meter)
                    await self._relay_stream(request, gen, response, relay, watch, meter, client, first, grant)
                else:
                    await self._peek(node, first, None, meter)
                    await self._relay_assembled(request, gen, node, response, relay, watch, meter, first, grant)
            return
        raw = await response.read_all(self.config.upstream.max_response_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            raise errors.upstream_error(f"The neuron at {node.url} sent a malformed response.")
        if "choices" not in body and body.get("error") is not None:
            # A 200 that says it failed: the upstream's error, nothing delivered, nothing charged.
            raise upstream_error(node, 500, raw, response.headers)
        output = output_tokens(body)
        if output > output_max:
            # Never deliver more than the hold covers; the client gets nothing, so it pays nothing.
            raise errors.upstream_error(
                f"The neuron at {node.url} wrote more output than the {output_max} tokens it was allowed."
            )
        meter.usage = body.get("usage")
        meter.relayed_output_tokens = output
        meter.responded = meter.completed = True
        self._log_usage(request, meter.usage)
        out = request.surface.whole(body, raw)
        watch.closing()
        await asgi.send_bytes(request.send, 200, out, list(asgi.JSON_HEADERS))

    async def _peek(self, node: Node, first: "_FirstRead", wait_s: float | None, meter: Meter) -> None:
        """Wait for the stream's first chunk before the client's headers go, so an upstream that
        answers 200 and then an error event (TGI, even for an overload) can still be failed over
        or answered with a real status. A stream that pings waits at most one ping interval for
        it (a long prefill must not keep a client without a byte); the read itself goes on in
        its own task either way, and the chunk is relayed after."""
        with trio.move_on_after(math.inf if wait_s is None else wait_s):
            await first.done.wait()
        if not first.done.is_set() or first.error is not None:
            return  # still prefilling, or broken: the relay reports it in the stream
        frame = _first_frame(first.chunk)
        err = node.kind.stream_error(frame) if frame is not None else None
        if err is None:
            return
        meter.dispatched = False  # refused in band, before any output: nothing generated
        raise client_error(err)

    async def _cover(self, grant: OutputGrant | None, relay: StreamRelay, need_bytes: int) -> None:
        """Extend an incremental hold ahead of the output about to be relayed (`need_bytes` so far,
        upper bound), keeping half a slice in hand, until it covers it or an extension is refused.

        Counted one token per byte, the most tokens any bytes can be (whatever the upstream's
        tokenizer), so what is forwarded never passes what is held; the settlement charges the
        upstream's own count, when it has one, so a multi-byte tokenizer pays its real tokens."""
        if grant is None or not grant.can_grow or self.budget is None:
            return
        low_water = grant.slice_tokens // 2
        while grant.can_grow and need_bytes + low_water > grant.granted:
            assert grant.hold is not None
            more = min(grant.slice_tokens, grant.output_max - grant.granted)
            usd = 0
            if grant.prices is not None:  # the hold's money is its whole formula at the new bound: rounded once
                usd = (grant.prices.hold_usd(grant.prompt_tokens, grant.granted + more)
                       - grant.prices.hold_usd(grant.prompt_tokens, grant.granted))
            result = await self.budget.extend(grant.hold, more, usd)
            if isinstance(result, Hold):
                grant.hold = result
                grant.granted += more
            else:
                grant.refused = True
        relay.output_tokens_max = grant.granted

    async def _pump(
        self, response: UpstreamResponse, first: "_FirstRead", relay: StreamRelay, meter: Meter,
        grant: OutputGrant | None, consume: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Read the upstream's stream into the relay, covering each chunk with the hold first, and hand
        what it forwards to `consume`, until [DONE] or the bound (then the upstream is stopped)."""
        pending = await first.get()
        with response.idle_watch():
            while True:
                chunk, pending = pending or await response.next_chunk(), b""
                if not chunk:
                    return
                await self._cover(grant, relay, relay.output_tokens + len(chunk))
                events = relay.feed(chunk)
                meter.relayed_output_tokens = relay.output_tokens
                if events:
                    if grant is not None and grant.counter is not None and meter.token_bytes_max > 1:
                        grant.relayed += relay.payloads  # a cut would count them with the tokenizer
                    await consume(events)
                if relay.done or relay.overflowed:
                    return  # nothing after [DONE] is ours; past the bound, stop the upstream now

    def _budget_cut(self, request: asgi.Request, grant: OutputGrant | None, relay: StreamRelay, meter: Meter) -> bool:
        """The relay stopped at the hold's bound because an extension was refused: end cleanly, not in error."""
        if grant is None or not relay.overflowed or not grant.refused:
            return False
        grant.cut = True
        meter.responded = True  # the prompt was processed: charged with what was relayed
        if grant.counter is not None and meter.token_bytes_max > 1:
            # Tokens of many bytes: count what the client received with the model's own tokenizer.
            try:
                meter.exact_output_tokens = min(grant.counter.count_fresh(_output_text(grant.relayed)), relay.output_tokens)
            except Exception as exc:  # never let counting fail the cut: the bytes stay the (upper) bound
                logs.event("count_failed", logging.WARNING, request_id=request.request_id, error=repr(exc))
        waste = relay.dropped_output_tokens  # counted as the guard counts: a token per byte
        if self.budget is not None:
            self.budget.metrics.budget_truncations.inc()
            self.budget.metrics.truncation_waste_tokens.inc(waste)
        logs.event("budget_truncated", logging.WARNING, request_id=request.request_id, output_granted_tokens=grant.granted,
                   output_relayed_bytes=relay.output_tokens, waste_tokens=waste)
        return True

    @staticmethod
    def _cut_usage(meter: Meter) -> dict[str, int]:
        """What a cut response is charged, as its usage frame says it."""
        output = meter.relayed_output_tokens if meter.exact_output_tokens is None else meter.exact_output_tokens
        return {"prompt_tokens": meter.prompt_tokens_estimate, "completion_tokens": output,
                "total_tokens": meter.prompt_tokens_estimate + output}

    async def _relay_stream(
        self, request: asgi.Request, gen: GenerationRequest, response: UpstreamResponse, relay: StreamRelay,
        watch: asgi.Disconnect, meter: Meter, client: "_ClientStream", first: "_FirstRead", grant: OutputGrant | None = None,
    ) -> None:
        shape = client.shape
        out = _Writer(request, pings=shape.ping_interval_s is not None)
        head: dict[str, Any] = {}
        if not client.started:
            client.started = True
            await asgi.start_stream(request.send, [])
            await out.write(shape.start())
        try:
            pinger = asgi.companion(partial(out.ping_while_idle, shape)) if shape.ping_interval_s is not None else nullcontext()
            async with pinger:

                async def forward(events: bytes) -> None:
                    nonlocal head
                    if "ttft_ms" not in request.log:
                        request.log["ttft_ms"] = round((trio.current_time() - request.started) * 1000, 2)
                    if not head and relay.payloads:
                        head = _stream_head(relay.payloads[0])
                    await out.write(shape.relay(events, relay.payloads))

                await self._pump(response, first, relay, meter, grant, forward)  # pings go on while it prefills
            if self._budget_cut(request, grant, relay, meter):
                # The output ends where the hold does: a clean finish ("length"; Anthropic: "max_tokens").
                payloads = cut_events(head, gen.kind == "chat", self._cut_usage(meter) if gen.include_usage else None)
                data = b"".join(b"data: " + p + b"\n\n" for p in payloads)
                await out.write(b": x-cortex-budget-truncated: true\n\n")
                await out.write(shape.relay(data, payloads))
                await out.write(shape.end())
            else:
                if relay.overflowed:
                    raise UpstreamFailed(f"upstream wrote more output than the {relay.output_tokens_max} tokens it was allowed")
                if relay.truncated:
                    raise UpstreamFailed("upstream ended the stream without [DONE]")
                meter.completed = True
                await out.write(shape.end())
        except (UpstreamFailed, SSEProtocolError) as exc:
            # Headers are gone already: the error travels as a final event.
            err = errors.upstream_error(f"The upstream stream broke: {exc}")
            request.log.update(outcome="upstream_broken", error=str(exc))
            await out.write(shape.error(err))
        finally:
            if not (grant is not None and grant.cut):
                meter.usage = relay.usage
            meter.relayed_output_tokens = relay.output_tokens
            self._log_usage(request, meter.usage)
            request.log["data_events"] = relay.data_events
        watch.closing()
        await asgi.end_stream(request.send)

    async def _relay_assembled(
        self, request: asgi.Request, gen: GenerationRequest, node: Node, response: UpstreamResponse, relay: StreamRelay,
        watch: asgi.Disconnect, meter: Meter, first: "_FirstRead", grant: OutputGrant | None,
    ) -> None:
        """A non-streamed request under incremental holds: streamed from the upstream, cut where the hold
        ends, and answered as the one body the upstream would have sent."""
        assembler = StreamAssembler(gen.kind == "chat")
        try:
            async def collect(events: bytes) -> None:
                assembler.feed(relay.payloads)

            await self._pump(response, first, relay, meter, grant, collect)
        except SSEProtocolError as exc:
            raise errors.upstream_error(f"The neuron at {node.url} sent a malformed stream: {exc}") from None
        finally:
            meter.relayed_output_tokens = relay.output_tokens
        headers = list(asgi.JSON_HEADERS)
        if self._budget_cut(request, grant, relay, meter):
            assembler.cut("length")
            assembler.usage = self._cut_usage(meter)
            headers.append((b"x-cortex-budget-truncated", b"true"))
        elif relay.overflowed:
            raise errors.upstream_error(
                f"The neuron at {node.url} wrote more output than the {relay.output_tokens_max} tokens it was allowed."
            )
        elif relay.truncated:
            raise UpstreamFailed("upstream ended the stream without [DONE]")
        else:
            meter.usage = assembler.usage
            meter.completed = True
        meter.responded = True
        self._log_usage(request, meter.usage if not (grant is not None and grant.cut) else assembler.usage)
        body = assembler.body()
        out = request.surface.whole(body, asgi.encode_json(body))
        watch.closing()
        await asgi.send_bytes(request.send, 200, out, headers)

    async def _wait_for_load(self, request: asgi.Request, model: str, client: "_ClientStream | None") -> None:
        """Wait for a cold load; a stream that pings begins now and pings while it waits, so a
        client (Claude Code gives up after 300 s without a byte) stays through a long load."""
        assert self.lifecycle is not None
        if client is None or client.shape.ping_interval_s is None:
            await self.lifecycle.ensure(model)
            return
        client.started = True
        await asgi.start_stream(request.send, [])
        out = _Writer(request, pings=True)
        await out.write(client.shape.start())
        async with asgi.companion(partial(out.ping_while_idle, client.shape)):
            await self.lifecycle.ensure(model)

    @staticmethod
    def _log_usage(request: asgi.Request, usage: Any) -> None:
        counts = usage_counts(usage)
        request.log["prompt_tokens"], request.log["completion_tokens"] = counts if counts else (None, None)


def _stream_head(data: bytes) -> dict[str, Any]:
    """A stream's id, created and model, from its first chunk, for the events cortex adds to it."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return {k: chunk[k] for k in ("id", "created", "model") if k in chunk} if isinstance(chunk, dict) else {}


def _output_text(payloads: list[bytes]) -> str:
    """The text a client received in these stream chunks: content, reasoning and tool-call arguments."""
    assembler = StreamAssembler(chat=True)
    assembler.feed(payloads)
    return assembler.text()
