"""Model lifecycle: loading, ready, unloading, and the memory each takes.

`Lifecycle` is the pure state machine, in the manner of TigerBeetle's
two-phase transfers: a load *reserves* its estimated memory when it
begins, so two loads at once cannot overcommit the budget; it is then
completed (ready) or failed (the reservation is released), exactly once.
An unload begins (unloading: no new requests), and completes (gone, the
memory released), exactly once. A second load of a model that is loading
joins the first; of one that is ready, is the same model.

`Requests` is the Trio side of an unload: the generation requests in
flight on one model, so an unload can wait for them to drain (with a
bound) and then cut what is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from common.errors import ApiError, invalid_request

LOADING = "loading"
READY = "ready"
UNLOADING = "unloading"

Status = Literal["loading", "ready", "unloading"]
BeginLoad = Literal["start", "join", "ready", "unloading", "no_memory", "too_many"]
MODELS_MAX = 64  # loaded (or loading) at once: bounds every per-model table and metric series
NAME_CHARS_MAX = 256
BeginUnload = Literal["start", "join", "absent", "loading"]


@dataclass
class ModelRecord:
    name: str
    status: Status
    memory_bytes: int  # reserved for it: its estimate while loading, then what it took
    device: str
    backend: str | None = None
    loaded_at: float | None = None  # epoch s, once ready
    served: Any = None  # the engine's handle, once ready


@dataclass
class Lifecycle:
    memory_budget_bytes: float = math.inf  # everything loaded (or loading) together
    models_max: int = MODELS_MAX
    loads_total: int = 0  # loads begun (a joined load is not a second one)
    load_failures_total: int = 0
    load_refusals_total: int = 0  # refused: would not fit (507)
    unloads_total: int = 0

    def __post_init__(self) -> None:
        assert self.memory_budget_bytes >= 0
        self.records: dict[str, ModelRecord] = {}

    @property
    def memory_reserved_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.records.values())

    def get(self, name: str) -> ModelRecord | None:
        return self.records.get(name)

    def ready(self) -> list[ModelRecord]:
        return [r for r in self.records.values() if r.status == READY]

    def begin_load(self, name: str, memory_bytes: int, device: str) -> BeginLoad:
        assert memory_bytes >= 0
        record = self.records.get(name)
        if record is not None:
            return {LOADING: "join", READY: "ready", UNLOADING: "unloading"}[record.status]  # type: ignore[return-value]
        if len(self.records) >= self.models_max:
            self.load_refusals_total += 1
            return "too_many"
        if self.memory_reserved_bytes + memory_bytes > self.memory_budget_bytes:
            self.load_refusals_total += 1
            return "no_memory"
        self.records[name] = ModelRecord(name, LOADING, memory_bytes, device)
        self.loads_total += 1
        return "start"

    def load_done(self, name: str, served: Any, now: float, *, device: str, backend: str | None = None,
                  memory_bytes: int | None = None) -> ModelRecord:
        """The load succeeded; `memory_bytes` is what it really took, if known (never more than reserved
        without the budget's say: the estimate is the bound the caller checked)."""
        record = self.records[name]
        assert record.status == LOADING
        record.status, record.served, record.loaded_at = READY, served, now
        record.device, record.backend = device, backend
        if memory_bytes is not None:
            record.memory_bytes = memory_bytes
        return record

    def load_failed(self, name: str) -> None:
        record = self.records.pop(name)
        assert record.status == LOADING
        self.load_failures_total += 1

    def begin_unload(self, name: str) -> BeginUnload:
        record = self.records.get(name)
        if record is None:
            return "absent"
        if record.status == LOADING:
            return "loading"
        if record.status == UNLOADING:
            return "join"
        record.status = UNLOADING
        return "start"

    def unload_done(self, name: str) -> None:
        record = self.records.pop(name)
        assert record.status == UNLOADING
        self.unloads_total += 1

    def check(self) -> None:
        assert self.memory_reserved_bytes <= self.memory_budget_bytes or not self.records


def insufficient_memory(name: str, need_bytes: int, reserved_bytes: int, budget_bytes: float) -> ApiError:
    mb = 2**20
    return ApiError(
        507,
        f"Loading `{name}` needs about {need_bytes / mb:.1f} MiB (weights plus KV budget), but this neuron has "
        f"{(budget_bytes - reserved_bytes) / mb:.1f} MiB of its {budget_bytes / mb:.1f} MiB budget left. "
        "Unload a model first, or lower --kv-budget-mb.",
        type="server_error",
        code="insufficient_memory",
        param="model",
    )


def too_many_models(name: str, models_max: int) -> ApiError:
    return ApiError(507, f"Cannot load `{name}`: this neuron holds at most {models_max} models; unload one first.",
                    type="server_error", code="insufficient_memory", param="model")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > NAME_CHARS_MAX:
        raise invalid_request(f"'model' is required: a string of 1 to {NAME_CHARS_MAX} characters.", param="model")
    return name


class Requests:
    """Generation requests in flight on one model, each in a cancel scope an unload can cut."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._changed = trio.Event()
        self.cut_total = 0

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def track(self) -> Iterator[trio.CancelScope]:
        """The body runs in a scope that `cut` cancels; check `cancelled_caught` after."""
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
            self._changed.set()

    async def wait_empty(self) -> None:
        while self._scopes:
            self._changed = trio.Event()
            await self._changed.wait()

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every request to finish; True if they all did."""
        with trio.move_on_after(timeout_s):
            await self.wait_empty()
        return not self._scopes

    def cut(self) -> int:
        for scope in self._scopes:
            scope.cancel()
        self.cut_total += len(self._scopes)
        return len(self._scopes)
