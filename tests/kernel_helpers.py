"""Shared pieces for the kernel-engine serving tests: the real synth-tiny runner,
wrapped so a test can see (and hold) its steps, and a neuron served in-process
on a loopback port with its lifespan running."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from common.serving import serve
from neuron.app import NeuronApp, NeuronConfig, kernel_spec
from neuron.engines import kernel_engine
from neuron.engines.kernel_engine import KernelEngine, KernelModel, LoadSpec

PRESET = "synth-tiny"
HI = [{"role": "user", "content": "hi"}]
STEP_HOLD_TIMEOUT_S = 30.0  # a held step gives up after this: a broken test fails, never hangs


def tiny_engine(**overrides: Any) -> KernelEngine:
    return KernelEngine(**{"backend": "numpy", "device": "cpu", **overrides})


def load_tiny(engine: KernelEngine | None = None, name: str = PRESET) -> KernelModel:
    engine = engine or tiny_engine()
    return kernel_engine.load_sync(LoadSpec(name, preset=PRESET, device="cpu", backend="numpy"), engine, kernel_spec)


@dataclass
class StepRecord:
    seq_ids: list[int]
    kv_tokens_at_entry: int
    live_at_entry: frozenset[int]  # of the sequences seen so far, those the runner still holds


@dataclass
class WatchedRunner:
    """Delegates to a real ModelRunner; records every step and free, and can hold steps.

    `hold` (when set) blocks a step whose batch holds a prompt of at least
    `hold_tokens` tokens until `release` is set: the test can then look at
    the server while that step is still running.
    """

    inner: Any
    steps: list[StepRecord] = field(default_factory=list)
    freed: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, steps begun when freed)
    hold_tokens: int | None = None
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def live(self) -> frozenset[int]:
        seen = {seq_id for record in self.steps for seq_id in record.seq_ids}
        return frozenset(s for s in seen if self.inner.sequence_length(s) is not None)

    def step(self, batch: list[Any]) -> Any:
        live = self.live()
        self.steps.append(StepRecord([b.seq_id for b in batch], self.inner.kv_tokens_used(), live))
        if self.hold_tokens is not None and any(len(b.tokens) >= self.hold_tokens for b in batch):
            self.holding.set()
            assert self.release.wait(STEP_HOLD_TIMEOUT_S), "the test never released the held step"
        return self.inner.step(batch)

    def free(self, seq_id: int) -> None:
        self.freed.append((seq_id, len(self.steps)))
        self.inner.free(seq_id)

    def kv_tokens_used(self) -> int:
        return self.inner.kv_tokens_used()


def watch(model: KernelModel) -> WatchedRunner:
    watched = WatchedRunner(model.runner)
    model.runner = watched
    model.scheduler.runner = watched
    return watched


@asynccontextmanager
async def served(config: NeuronConfig) -> AsyncIterator[tuple[NeuronApp, str]]:
    """A NeuronApp on an ephemeral loopback port, lifespan and all; (app, base URL)."""
    app = NeuronApp(config)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        binds = await nursery.start(lambda task_status: serve(app, "127.0.0.1:0", shutdown_trigger=stop.wait,
                                                              graceful_timeout_s=1.0, task_status=task_status))
        try:
            yield app, binds[0]
        finally:
            stop.set()


def sse_events(raw: bytes) -> list[Any]:
    """The data of each SSE event: parsed JSON, or the string "[DONE]"."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(events: list[Any]) -> str:
    return "".join(
        (e["choices"][0]["delta"].get("content") or "") if "delta" in e["choices"][0] else e["choices"][0]["text"]
        for e in events if isinstance(e, dict) and e.get("choices")
    )


async def post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    return await client.post(url, json=body, timeout=60)
