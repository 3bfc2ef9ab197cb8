"""Continuous batching for one loaded model: a pure core in a thin Trio shell.

`BatchCore` makes every decision and performs none: who is admitted, who
waits, who is refused, what the next step runs, who leaves. It takes `now`
as an argument. `Scheduler` is the shell: one loop per model that asks the
core for a step, runs it off the event loop (`trio.to_thread.run_sync`, so
`/health` answers during a long prefill), samples, and hands each token to
its sequence's output; beside it, a small task refuses queued sequences
whose wait runs out, on time even while a long step holds the loop.

A step runs every sequence in the batch together: one decode position for
each sequence already prefilled, and the whole prompt of new ones. New
sequences join at the next step; finished and cancelled ones leave between
steps, and their KV is freed at once. A sequence cancelled while a step is
running leaves right after that step (within one step).

Prefill budget: a step feeds at most `prefill_budget_tokens` prompt tokens,
taken from new sequences in admission order; a long prompt is fed in
chunks over several steps (the runner appends a chunk to a sequence's KV
and samples nothing until its last one). Decodes therefore stall for at
most one chunk's worth of prefill per step, however long the prompt.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from common.errors import ApiError
from neuron import admission
from neuron.admission import AdmissionLimits, Load, Verdict

_log = logging.getLogger("neuron")

DEFAULT_PREFILL_BUDGET_TOKENS = 2048


# --- the pure core -------------------------------------------------------------


@dataclass
class Seq:
    seq_id: int
    prompt: list[int]
    max_tokens: int
    kv_tokens: int  # reserved at admission: admission.kv_tokens_needed
    enqueued_at: float
    fed: int = 0  # prompt tokens already in the KV (chunked prefill)
    prefilled: bool = False
    last_token: int | None = None
    generated: int = 0
    doomed: bool = False  # cancelled while in the batch: leaves at the next reap


@dataclass
class Tally:
    """Every sequence's fate is counted once; `BatchCore.check` proves they add up."""

    submitted: int = 0  # passed the size check (admitted at once, queued or refused)
    admitted: int = 0  # entered the batch, at once or from the queue
    queued_total: int = 0  # entered the queue
    expired: int = 0  # left the queue after queue_wait_s (refused, 503)
    cancelled_queued: int = 0  # the client left while queued
    cancelled_running: int = 0  # the client left (or unload cut it) while in the batch
    finished: int = 0  # left the batch with a finish reason
    failed: int = 0  # its step raised
    steps: int = 0
    prompt_tokens: int = 0  # prefilled
    generated_tokens: int = 0
    rejections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(admission.REASONS, 0))


class BatchCore:
    def __init__(self, limits: AdmissionLimits, prefill_budget_tokens: int = DEFAULT_PREFILL_BUDGET_TOKENS) -> None:
        assert prefill_budget_tokens >= 1
        self.limits = limits
        self.prefill_budget_tokens = prefill_budget_tokens
        self.queue: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}  # admission order
        self.kv_reserved_tokens = 0
        self.tally = Tally()

    def load(self) -> Load:
        return Load(len(self.running), len(self.queue), self.kv_reserved_tokens)

    def submit(self, seq_id: int, prompt: list[int], max_tokens: int, now: float) -> Verdict | Literal["too_large"]:
        assert seq_id not in self.running and all(s.seq_id != seq_id for s in self.queue)
        need = admission.kv_tokens_needed(len(prompt), max_tokens)
        if admission.never_fits(need, self.limits):
            self.reject(admission.TOO_LARGE)
            return "too_large"
        self.tally.submitted += 1
        seq = Seq(seq_id, list(prompt), max_tokens, need, now)
        decision = admission.verdict(self.load(), need, self.limits)
        if decision == "admit":
            self._start(seq)
        elif decision == "queue":
            self.queue.append(seq)
            self.tally.queued_total += 1
        else:
            self.reject(admission.QUEUE_FULL)
        return decision

    def reject(self, reason: str) -> None:
        self.tally.rejections[reason] += 1

    def _start(self, seq: Seq) -> None:
        self.running[seq.seq_id] = seq
        self.kv_reserved_tokens += seq.kv_tokens
        self.tally.admitted += 1
        assert self.kv_reserved_tokens <= self.limits.kv_budget_tokens
        assert len(self.running) <= self.limits.max_in_flight

    def expire(self, now: float) -> list[int]:
        """Queued sequences that waited past queue_wait_s leave (refused)."""
        expired = [s.seq_id for s in self.queue if admission.wait_expired(s.enqueued_at, now, self.limits)]
        if expired:
            gone = set(expired)
            self.queue = deque(s for s in self.queue if s.seq_id not in gone)
            self.tally.expired += len(expired)
            self.tally.rejections[admission.QUEUE_WAIT] += len(expired)
        return expired

    def admit(self) -> list[int]:
        """Admit from the head of the queue while the head fits."""
        admitted = []
        while self.queue and admission.can_start(self.load(), self.queue[0].kv_tokens, self.limits):
            seq = self.queue.popleft()
            self._start(seq)
            admitted.append(seq.seq_id)
        return admitted

    def tick(self, now: float) -> tuple[list[int], list[int]]:
        """Between steps: expire, then admit. (admitted, expired)."""
        expired = self.expire(now)
        return self.admit(), expired

    def next_deadline(self) -> float:
        """When the oldest queued sequence expires (inf with an empty queue)."""
        return self.queue[0].enqueued_at + self.limits.queue_wait_s if self.queue else math.inf

    def plan(self) -> list[tuple[int, list[int], bool]]:
        """The next step: (seq_id, tokens, sample?) for each decode and each prefill chunk.

        A chunk that ends before its prompt does samples nothing (its logits are not the next token's)."""
        inputs: list[tuple[int, list[int], bool]] = []
        budget = self.prefill_budget_tokens
        for seq in self.running.values():
            assert not seq.doomed  # reaped before planning
            if seq.prefilled:
                assert seq.last_token is not None
                inputs.append((seq.seq_id, [seq.last_token], True))
            elif budget > 0:
                chunk = seq.prompt[seq.fed : seq.fed + budget]
                budget -= len(chunk)
                inputs.append((seq.seq_id, chunk, seq.fed + len(chunk) == len(seq.prompt)))
        return inputs

    def fed(self, seq_id: int, tokens: int) -> None:
        """A prefill chunk that is not the prompt's last is in the KV now."""
        seq = self.running[seq_id]
        assert not seq.prefilled and seq.fed + tokens < len(seq.prompt)
        seq.fed += tokens

    def record(self, seq_id: int, token: int) -> bool:
        """A step sampled `token` for `seq_id`; True when it has now generated max_tokens."""
        seq = self.running[seq_id]
        assert not seq.doomed and seq.generated < seq.max_tokens
        if not seq.prefilled:
            seq.prefilled = True
            self.tally.prompt_tokens += len(seq.prompt)
            seq.fed = len(seq.prompt)
            seq.prompt = []  # the KV holds it now
        seq.last_token = token
        seq.generated += 1
        self.tally.generated_tokens += 1
        return seq.generated == seq.max_tokens

    def leave(self, seq_id: int, how: Literal["finished", "failed"]) -> None:
        seq = self.running.pop(seq_id)
        self.kv_reserved_tokens -= seq.kv_tokens
        if how == "finished":
            self.tally.finished += 1
        else:
            self.tally.failed += 1
        assert self.kv_reserved_tokens >= 0

    def cancel(self, seq_id: int) -> Literal["queued", "running"] | None:
        """Queued: gone now. Running: doomed, gone at the next reap. None: already gone."""
        seq = self.running.get(seq_id)
        if seq is not None:
            if not seq.doomed:
                seq.doomed = True
                return "running"
            return None
        for queued in self.queue:
            if queued.seq_id == seq_id:
                self.queue.remove(queued)
                self.tally.cancelled_queued += 1
                return "queued"
        return None

    def reap(self) -> list[int]:
        """Doomed sequences leave the batch now; the caller frees their KV."""
        doomed = [s.seq_id for s in self.running.values() if s.doomed]
        for seq_id in doomed:
            seq = self.running.pop(seq_id)
            self.kv_reserved_tokens -= seq.kv_tokens
            self.tally.cancelled_running += 1
        return doomed

    def check(self) -> None:
        """Nothing is dropped silently: every submitted sequence is somewhere, or counted gone."""
        t = self.tally
        from_queue = t.queued_total - t.expired - t.cancelled_queued - len(self.queue)
        assert from_queue >= 0
        assert t.submitted == (t.admitted - from_queue) + t.queued_total + t.rejections[admission.QUEUE_FULL]
        assert t.admitted == t.finished + t.failed + t.cancelled_running + len(self.running)
        assert self.kv_reserved_tokens == sum(s.kv_tokens for s in self.running.values())


# --- the Trio shell ------------------------------------------------------------


class Runner(Protocol):
    """The part of neuron.engines.kernel.runner.ModelRunner the scheduler uses."""

    kv_bytes_per_token: int

    def step(self, batch: list[Any]) -> Any: ...  # float32 logits [len(batch), vocab]
    def free(self, seq_id: int) -> None: ...
    def kv_tokens_used(self) -> int: ...


class Output(Protocol):
    """Turns a sequence's tokens into text and decides when it stops (EOS, stop strings)."""

    def feed(self, token: int) -> tuple[str, str | None]: ...  # (text now final, finish reason or None)
    def flush(self) -> str: ...  # held-back text, when the sequence ends at max_tokens


class SamplerLike(Protocol):
    def sample(self, logits: Any) -> int: ...


@dataclass(frozen=True)
class Admitted:
    pass


@dataclass(frozen=True)
class Piece:
    text: str
    tokens: int  # completion tokens so far


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Refused:
    error: ApiError


@dataclass(frozen=True)
class Failed:
    message: str
    completion_tokens: int


Event = Admitted | Piece | Finished | Refused | Failed


@dataclass
class Ticket:
    """One request's sequence, as its handler sees it."""

    seq_id: int
    prompt_tokens: int
    max_tokens: int
    sampler: SamplerLike
    output: Output
    events: trio.MemoryReceiveChannel[Event]
    send: trio.MemorySendChannel[Event]
    created_at: float
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    done: bool = False


class Scheduler:
    """One loaded model's batch: the only caller of its runner's step and free."""

    def __init__(
        self,
        model: str,
        runner: Runner,
        limits: AdmissionLimits,
        *,
        prefill_budget_tokens: int = DEFAULT_PREFILL_BUDGET_TOKENS,
        step_input: Callable[[int, list[int]], Any],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.model = model
        self.runner = runner
        self.core = BatchCore(limits, prefill_budget_tokens)
        self.tickets: dict[int, Ticket] = {}
        self.stepping = False  # a step is running in its thread right now
        self._step_input = step_input  # (seq_id, tokens) -> the runner's StepInput
        self._clock = clock
        self.on_step: Callable[[int], None] | None = None  # observes each step's batch size
        self.on_reject: Callable[[str], None] | None = None  # observes each refusal's reason
        self.started = False
        self._next_id = 0
        self._wake = trio.Event()
        self._queued = trio.Event()  # the queue became non-empty
        self._idle = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.stopped = trio.Event()

    @property
    def limits(self) -> AdmissionLimits:
        return self.core.limits

    def submit(self, prompt: list[int], max_tokens: int, sampler: SamplerLike, output: Output) -> Ticket:
        """Admit or queue a sequence, or raise the refusal (413, 503). Never waits."""
        assert prompt and max_tokens >= 1
        if self.stopped.is_set() or self._scope is not None and self._scope.cancel_called:
            if self.on_reject is not None:
                self.on_reject(admission.NOT_READY)
            raise admission.not_ready(self.model, "unloading")  # nothing would ever step it
        seq_id = self._next_id
        self._next_id += 1
        now = self._clock()
        verdict = self.core.submit(seq_id, prompt, max_tokens, now)
        if verdict in ("too_large", "refuse") and self.on_reject is not None:
            self.on_reject(admission.TOO_LARGE if verdict == "too_large" else admission.QUEUE_FULL)
        if verdict == "too_large":
            need = admission.kv_tokens_needed(len(prompt), max_tokens)
            raise admission.too_large(self.model, need, self.limits, self.runner.kv_bytes_per_token)
        if verdict == "refuse":
            raise admission.queue_full(self.model, self.limits)
        # Room for every event a sequence can produce: never blocks the scheduler.
        send, receive = trio.open_memory_channel[Event](max_tokens + 4)
        ticket = Ticket(seq_id, len(prompt), max_tokens, sampler, output, receive, send, now)
        self.tickets[seq_id] = ticket
        if verdict == "admit":
            ticket.admitted_at = now
            self._emit(ticket, Admitted())
        else:
            self._queued.set()
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The handler is done with it (client gone, or finished): free its slot and KV."""
        if ticket.done:
            return
        where = self.core.cancel(ticket.seq_id)
        if where == "queued":
            self._close(ticket)
        self._wake.set()

    def idle(self) -> bool:
        return not self.core.running and not self.core.queue

    async def wait_idle(self) -> None:
        while not self.idle():
            self._idle = trio.Event()
            await self._idle.wait()

    async def shutdown(self) -> None:
        """Stop the loop (a step in flight finishes first: its thread is not abandoned) and wait."""
        if self._scope is not None:
            self._scope.cancel()
        if self.started:
            await self.stopped.wait()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._expire_queued)
                    self.started = True
                    task_status.started()
                    await self._loop()
        finally:
            for ticket in list(self.tickets.values()):  # nobody may wait on a loop that is gone
                self._emit(ticket, Failed("the model stopped", ticket.completion_tokens))
                self._close(ticket)
            self.stopped.set()

    async def _loop(self) -> None:
        while True:
            self._wake = trio.Event()  # fresh before looking, so no later wake-up is lost
            self._between_steps()
            inputs = self.core.plan()
            if not inputs:
                await self._wake.wait()
                continue
            await self._step(inputs)

    async def _expire_queued(self) -> None:
        """Queue waits run out on time even while a long step holds the loop.

        The head of a FIFO queue expires first, and a newcomer never expires
        before it, so sleeping until the head's deadline is enough."""
        while True:
            if not self.core.queue:
                self._queued = trio.Event()
                await self._queued.wait()
                continue
            await trio.sleep_until(self.core.next_deadline())
            self._refuse_expired()

    def _refuse_expired(self) -> None:
        for seq_id in self.core.expire(self._clock()):
            if self.on_reject is not None:
                self.on_reject(admission.QUEUE_WAIT)
            ticket = self.tickets[seq_id]
            self._emit(ticket, Refused(admission.queue_wait(self.model, self.limits)))
            self._close(ticket)

    def _between_steps(self) -> None:
        for seq_id in self.core.reap():
            self.runner.free(seq_id)
            self._close(self.tickets[seq_id])
        self._refuse_expired()
        for seq_id in self.core.admit():
            self.tickets[seq_id].admitted_at = self._clock()
            self._emit(self.tickets[seq_id], Admitted())
        if self.idle():
            self._idle.set()

    async def _step(self, inputs: list[tuple[int, list[int], bool]]) -> None:
        batch = [self._step_input(seq_id, tokens) for seq_id, tokens, _ in inputs]
        samplers = [self.tickets[seq_id].sampler if sample else None for seq_id, _, sample in inputs]
        self.stepping = True
        try:
            tokens = await trio.to_thread.run_sync(_step_and_sample, self.runner, batch, samplers)
        except Exception as exc:  # a broken step fails its sequences, never the model's loop
            _log.error("step failed", extra={"fields": {"event": "step_failed", "model": self.model, "error": repr(exc)}})
            self._fail([seq_id for seq_id, _, _ in inputs], f"the model's step failed: {type(exc).__name__}")
            return
        finally:
            self.stepping = False
        self.core.tally.steps += 1
        if self.on_step is not None:
            self.on_step(len(inputs))
        now = self._clock()
        for (seq_id, chunk, _), token in zip(inputs, tokens, strict=True):
            if self.core.running[seq_id].doomed:
                continue  # cancelled during the step: the next reap frees it
            if token is None:
                self.core.fed(seq_id, len(chunk))
            else:
                self._deliver(seq_id, token, now)
        self.core.check()
        assert self.runner.kv_tokens_used() <= self.core.kv_reserved_tokens, "the runner holds KV nobody reserved"

    def _deliver(self, seq_id: int, token: int, now: float) -> None:
        ticket = self.tickets[seq_id]
        at_max = self.core.record(seq_id, token)
        ticket.completion_tokens += 1
        if ticket.first_token_at is None:
            ticket.first_token_at = now
        text, finish = ticket.output.feed(token)
        if finish is None and at_max:
            text, finish = text + ticket.output.flush(), "length"
        if text:
            self._emit(ticket, Piece(text, ticket.completion_tokens))
        if finish is not None:
            ticket.finished_at = now
            self.core.leave(seq_id, "finished")
            self.runner.free(seq_id)
            self._emit(ticket, Finished(finish, ticket.completion_tokens))
            self._close(ticket)

    def _fail(self, seq_ids: list[int], message: str) -> None:
        for seq_id in seq_ids:
            if self.core.running[seq_id].doomed:
                continue  # the next reap frees it
            self.core.leave(seq_id, "failed")
            self.runner.free(seq_id)
            ticket = self.tickets[seq_id]
            self._emit(ticket, Failed(message, ticket.completion_tokens))
            self._close(ticket)

    def _emit(self, ticket: Ticket, event: Event) -> None:
        if ticket.done:
            return
        try:
            ticket.send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Its handler is gone: a queued sequence leaves now, a running one at the next reap.
            if self.core.cancel(ticket.seq_id) == "queued":
                self._close(ticket)

    def _close(self, ticket: Ticket) -> None:
        ticket.done = True
        ticket.send.close()
        del self.tickets[ticket.seq_id]


def _step_and_sample(runner: Runner, batch: list[Any], samplers: list[SamplerLike | None]) -> list[int | None]:
    """In the worker thread: one step, then a sample for each row that ends its input
    (sorting a large vocabulary is not free; the event loop has better things to do)."""
    logits = runner.step(batch)
    assert logits.shape[0] == len(batch)
    return [None if sampler is None else int(sampler.sample(logits[i])) for i, sampler in enumerate(samplers)]
