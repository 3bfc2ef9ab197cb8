"""Continuous batching: the pure core's decisions, the Trio shell's bookkeeping
(against a small fake runner defined here), then the real synth-tiny runner:
batched greedy output equals each request run alone, a cancelled sequence
leaves within one step, and /health answers while a long prefill runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import trio
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neuron import admission
from neuron.admission import AdmissionLimits
from neuron.app import NeuronConfig
from neuron.engines.kernel.sampling import Sampler, SamplingParams
from neuron.engines.kernel_engine import ByteDetokenizer, SequenceOutput, StopText, TextDetokenizer, byte_table
from neuron.scheduler import Admitted, BatchCore, Failed, Finished, Piece, Refused, Scheduler, Ticket
from tests.kernel_helpers import HI, load_tiny, served, tiny_engine, watch

LIMITS = AdmissionLimits(max_in_flight=2, max_queue_depth=2, queue_wait_s=5.0, kv_budget_tokens=100)


# --- the pure core ---------------------------------------------------------------------------


def test_admits_up_to_max_in_flight_then_queues_then_refuses():
    core = BatchCore(LIMITS)
    verdicts = [core.submit(i, [1, 2], 3, now=0.0) for i in range(5)]
    assert verdicts == ["admit", "admit", "queue", "queue", "refuse"]
    assert core.tally.rejections[admission.QUEUE_FULL] == 1
    assert core.load() == admission.Load(in_flight=2, queued=2, kv_reserved_tokens=8)  # 2 + 3 - 1 each
    core.check()


def test_a_request_larger_than_the_whole_kv_budget_never_fits():
    core = BatchCore(LIMITS)
    assert core.submit(0, [1] * 60, 42, now=0.0) == "too_large"  # 60 + 42 - 1 = 101 > 100
    assert core.submit(1, [1] * 60, 41, now=0.0) == "admit"  # exactly the budget
    assert core.tally.rejections[admission.TOO_LARGE] == 1 and core.tally.submitted == 1
    core.check()


def test_the_kv_reservation_holds_admission_back_until_a_sequence_leaves():
    core = BatchCore(AdmissionLimits(max_in_flight=8, max_queue_depth=8, queue_wait_s=5.0, kv_budget_tokens=100))
    assert core.submit(0, [1] * 10, 50, now=0.0) == "admit"  # reserves 59
    assert core.submit(1, [1] * 10, 40, now=0.0) == "queue"  # 59 + 49 > 100, though slots are free
    assert core.tick(now=1.0) == ([], [])
    core.record(0, 7)
    core.leave(0, "finished")
    assert core.tick(now=1.0) == ([1], [])
    assert core.kv_reserved_tokens == 49
    core.check()


def test_the_queue_is_fifo_a_small_request_does_not_jump_a_large_head():
    core = BatchCore(AdmissionLimits(max_in_flight=8, max_queue_depth=8, queue_wait_s=5.0, kv_budget_tokens=100))
    core.submit(0, [1] * 10, 50, now=0.0)
    assert core.submit(1, [1] * 10, 40, now=0.0) == "queue"  # needs 50: does not fit beside 60
    assert core.submit(2, [1], 1, now=0.0) == "queue"  # would fit, but queues behind the head
    assert core.tick(now=0.5) == ([], [])


def test_queued_sequences_expire_after_the_queue_wait_bound():
    core = BatchCore(AdmissionLimits(max_in_flight=1, max_queue_depth=4, queue_wait_s=2.0, kv_budget_tokens=100))
    core.submit(0, [1], 5, now=0.0)
    core.submit(1, [1], 5, now=0.0)
    core.submit(2, [1], 5, now=1.5)
    assert core.next_deadline() == 2.0
    assert core.tick(now=1.9) == ([], [])
    assert core.tick(now=2.0) == ([], [1])
    assert core.next_deadline() == 3.5
    assert core.tally.rejections[admission.QUEUE_WAIT] == 1 and core.tally.expired == 1
    core.check()


def test_the_prefill_budget_feeds_a_long_prompt_in_chunks_beside_the_decodes():
    core = BatchCore(AdmissionLimits(max_in_flight=4, max_queue_depth=0, queue_wait_s=5.0, kv_budget_tokens=1000),
                     prefill_budget_tokens=8)
    core.submit(0, [1, 2, 3], 5, now=0.0)
    assert core.plan() == [(0, [1, 2, 3], True)]
    core.record(0, 9)
    core.submit(1, list(range(20)), 5, now=0.0)
    core.submit(2, [5, 6], 5, now=0.0)
    steps = []
    while not core.running[1].prefilled:
        plan = core.plan()
        steps.append(plan)
        assert plan[0] == (0, [core.running[0].last_token], True)  # the decode never waits
        assert sum(len(tokens) for seq_id, tokens, _ in plan if seq_id != 0) <= 8
        for seq_id, tokens, sample in plan:
            if seq_id == 0 or sample:
                core.record(seq_id, 4)
            else:
                core.fed(seq_id, len(tokens))
    fed = [tokens for plan in steps for seq_id, tokens, _ in plan if seq_id == 1]
    assert fed == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert (2, [5, 6], True) in steps[-1]  # the short prompt took the budget left over


def test_cancel_removes_a_queued_sequence_now_and_a_running_one_at_the_reap():
    core = BatchCore(AdmissionLimits(max_in_flight=1, max_queue_depth=1, queue_wait_s=5.0, kv_budget_tokens=100))
    core.submit(0, [1], 5, now=0.0)
    core.submit(1, [1], 5, now=0.0)
    assert core.cancel(1) == "queued" and not core.queue
    assert core.cancel(0) == "running" and 0 in core.running
    assert core.cancel(0) is None  # already doomed
    assert core.reap() == [0] and not core.running and core.kv_reserved_tokens == 0
    assert core.tally.cancelled_queued == 1 and core.tally.cancelled_running == 1
    core.check()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 30), st.integers(1, 30)),
        st.tuples(st.just("step"), st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 40), st.integers(0, 0)),
        st.tuples(st.just("tick"), st.integers(0, 3), st.integers(0, 0)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(1, 4), st.integers(0, 3), st.integers(1, 16))
def test_every_sequence_is_accounted_for_whatever_happens(ops, max_in_flight, max_queue_depth, budget):
    limits = AdmissionLimits(max_in_flight, max_queue_depth, queue_wait_s=2.0, kv_budget_tokens=60)
    core = BatchCore(limits, prefill_budget_tokens=budget)
    now, next_id, outcomes = 0.0, 0, {"too_large": 0, "refuse": 0, "admit": 0, "queue": 0}
    for op, a, b in ops:
        if op == "submit":
            outcomes[core.submit(next_id, [1] * a, b, now)] += 1
            next_id += 1
        elif op == "step":
            for seq_id, tokens, sample in core.plan():
                if sample:
                    if core.record(seq_id, a):
                        core.leave(seq_id, "finished")
                else:
                    core.fed(seq_id, len(tokens))
        elif op == "cancel":
            core.cancel(a)
            core.reap()
        else:
            now += a
            core.tick(now)
        core.check()
        assert len(core.running) <= max_in_flight and len(core.queue) <= max_queue_depth
        assert core.kv_reserved_tokens <= limits.kv_budget_tokens
    t = core.tally
    assert next_id == t.submitted + t.rejections[admission.TOO_LARGE]
    assert t.rejections[admission.QUEUE_FULL] == outcomes["refuse"] and t.queued_total == outcomes["queue"]
    gone = t.finished + t.failed + t.cancelled_running + t.cancelled_queued + t.expired + outcomes["refuse"]
    assert t.submitted == gone + len(core.running) + len(core.queue)


# --- the shell, against a fake runner ---------------------------------------------------------


@dataclass(frozen=True)
class FakeInput:
    seq_id: int
    tokens: list[int]


class FakeRunner:
    """Obeys the runner contract: logits after each input's last token, KV per sequence, free.

    The next token is a function of the sequence so far, so batching cannot change it.
    `gate`, when given, holds every step until it is set; `fail` makes steps raise."""

    VOCAB = 50
    kv_bytes_per_token = 8

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.history: dict[int, list[int]] = {}
        self.batches: list[list[int]] = []
        self.freed: list[int] = []
        self.gate = gate
        self.stepping = threading.Event()
        self.fail = False

    def step(self, batch: list[FakeInput]) -> np.ndarray:
        self.batches.append([item.seq_id for item in batch])
        self.stepping.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail:
            raise RuntimeError("the device fell over")
        rows = np.full((len(batch), self.VOCAB), -1.0, np.float32)
        for i, item in enumerate(batch):
            seen = self.history.setdefault(item.seq_id, [])
            seen.extend(item.tokens)
            rows[i, (sum(seen) * 7 + len(seen)) % self.VOCAB] = 1.0
        return rows

    def free(self, seq_id: int) -> None:
        self.freed.append(seq_id)
        self.history.pop(seq_id, None)

    def kv_tokens_used(self) -> int:
        return sum(len(h) for h in self.history.values())


class Greedy:
    def sample(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))


class Tokens:
    """An Output that writes each token id as text and stops on `stop_token`."""

    def __init__(self, stop_token: int | None = None) -> None:
        self.tokens: list[int] = []
        self.stop_token = stop_token

    def feed(self, token: int) -> tuple[str, str | None]:
        self.tokens.append(token)
        return (f"{token},", "stop") if token == self.stop_token else (f"{token},", None)

    def flush(self) -> str:
        return ""


async def events_of(ticket: Ticket) -> list[object]:
    return [event async for event in ticket.events]


def fake_scheduler(runner: FakeRunner, limits: AdmissionLimits = LIMITS, **kwargs: object) -> Scheduler:
    return Scheduler("fake", runner, limits, step_input=FakeInput, **kwargs)


async def test_a_sequence_streams_its_tokens_then_finishes_and_frees_its_kv():
    runner = FakeRunner()
    scheduler = fake_scheduler(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        output = Tokens()
        ticket = scheduler.submit([3, 4, 5], 6, Greedy(), output)
        events = await events_of(ticket)
        nursery.cancel_scope.cancel()
    assert isinstance(events[0], Admitted)
    pieces = [e for e in events if isinstance(e, Piece)]
    assert "".join(p.text for p in pieces) == "".join(f"{t}," for t in output.tokens) and len(output.tokens) == 6
    assert events[-1] == Finished("length", 6)
    assert runner.freed == [ticket.seq_id] and runner.kv_tokens_used() == 0
    assert len(runner.batches) == 6  # one prefill, then a decode per further token


async def test_an_output_that_stops_ends_the_sequence_at_once():
    runner = FakeRunner()
    scheduler = fake_scheduler(runner)
    alone = Tokens()
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await events_of(scheduler.submit([1], 20, Greedy(), alone))
        stopping = Tokens(stop_token=alone.tokens[2])
        events = await events_of(scheduler.submit([1], 20, Greedy(), stopping))
        nursery.cancel_scope.cancel()
    assert events[-1] == Finished("stop", 3)
    assert scheduler.core.kv_reserved_tokens == 0 and runner.kv_tokens_used() == 0


async def test_a_failing_step_fails_its_sequences_and_the_loop_serves_on():
    runner = FakeRunner()
    scheduler = fake_scheduler(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        runner.fail = True
        failed = await events_of(scheduler.submit([1, 2], 5, Greedy(), Tokens()))
        runner.fail = False
        fine = await events_of(scheduler.submit([1, 2], 5, Greedy(), Tokens()))
        nursery.cancel_scope.cancel()
    assert isinstance(failed[-1], Failed) and fine[-1] == Finished("length", 5)
    assert scheduler.core.tally.failed == 1 and runner.kv_tokens_used() == 0


async def test_a_queued_request_past_the_wait_bound_is_refused_with_503():
    gate = threading.Event()
    runner = FakeRunner(gate)
    limits = AdmissionLimits(max_in_flight=1, max_queue_depth=1, queue_wait_s=0.05, kv_budget_tokens=100)
    scheduler = fake_scheduler(runner, limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        first = scheduler.submit([1], 3, Greedy(), Tokens())
        queued = scheduler.submit([1], 3, Greedy(), Tokens())
        with pytest.raises(Exception) as full:
            scheduler.submit([1], 3, Greedy(), Tokens())
        events = await events_of(queued)  # the held step keeps the slot taken past the wait bound
        gate.set()
        await events_of(first)
        nursery.cancel_scope.cancel()
    assert full.value.status == 503 and full.value.code == "service_unavailable"
    assert len(events) == 1 and isinstance(events[0], Refused)
    assert events[0].error.status == 503 and "queue wait" in events[0].error.message
    assert dict(events[0].error.headers)[b"retry-after"] == b"1"
    assert scheduler.core.tally.rejections == {**dict.fromkeys(admission.REASONS, 0), "queue_full": 1, "queue_wait": 1}


# --- the real synth-tiny runner ---------------------------------------------------------------

PROMPTS = [[256, 260, *b"hello there", 258, 261], [256, 260, *"héllo €".encode(), 258, 261], [256, 7, 8, 9],
           [256, *b"a much longer prompt, to make the batch uneven", 261]]
MAX_TOKENS = [12, 30, 25, 18]


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0), fallback_seed=0)


async def test_batched_greedy_output_equals_each_request_run_alone_as_others_join_and_leave():
    model = load_tiny()
    watched = watch(model)
    scheduler = model.scheduler
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        alone = []
        for prompt, limit in zip(PROMPTS, MAX_TOKENS):
            output = Tokens()
            await events_of(scheduler.submit(prompt, limit, greedy(), output))
            alone.append(output.tokens)
        solo_steps = len(watched.steps)
        outputs = [Tokens() for _ in PROMPTS]
        tickets: dict[int, Ticket] = {}
        done = {i: trio.Event() for i in range(len(PROMPTS))}

        async def run(i: int, join_after: tuple[int, int] | None) -> None:
            count = 0
            async for event in tickets[i].events:
                count += isinstance(event, Piece)
                if join_after and count == join_after[1]:
                    start(join_after[0], None)
            done[i].set()

        def start(i: int, join_after: tuple[int, int] | None) -> None:
            tickets[i] = scheduler.submit(PROMPTS[i], MAX_TOKENS[i], greedy(), outputs[i])
            nursery.start_soon(run, i, join_after)

        start(0, (2, 3))  # 2 joins once 0 has three tokens; 0 leaves first (the shortest)
        start(1, (3, 5))  # 3 joins once 1 has five
        for event in done.values():
            await event.wait()
        nursery.cancel_scope.cancel()
    assert [o.tokens for o in outputs] == alone
    batched = watched.steps[solo_steps:]
    assert max(len(s.seq_ids) for s in batched) == 4  # all four shared steps
    assert len(batched) < sum(MAX_TOKENS)  # fewer steps than running them one by one
    assert watched.kv_tokens_used() == 0


async def test_a_prompt_fed_in_chunks_gives_the_tokens_it_gives_fed_whole():
    prompt = [256, *(b"the prefill budget splits this prompt " * 8)]  # 305 tokens
    outputs = []
    for budget in (2048, 37):
        model = load_tiny(tiny_engine(prefill_budget_tokens=budget))
        watched = watch(model)
        async with trio.open_nursery() as nursery:
            await nursery.start(model.scheduler.run)
            outputs.append(Tokens())
            await events_of(model.scheduler.submit(prompt, 20, greedy(), outputs[-1]))
            nursery.cancel_scope.cancel()
        steps = len(watched.steps)
    assert outputs[0].tokens == outputs[1].tokens and len(outputs[0].tokens) == 20
    assert steps == -(-len(prompt) // 37) + 19  # nine chunks, the last sampling the first token


async def test_a_sequence_that_runs_to_max_tokens_holds_exactly_its_reservation_at_most():
    """The reservation is prompt + max_tokens - 1: the last token ends the sequence unfed."""
    prompt = [256, *b"fill the reservation"]
    model = load_tiny()
    watched = watch(model)
    out = Tokens()
    async with trio.open_nursery() as nursery:
        await nursery.start(model.scheduler.run)
        ticket = model.scheduler.submit(prompt, 12, greedy(), out)
        peak = 0

        def high_water(batch, step=watched.step):  # the sequence's length after each step
            logits = step(batch)
            nonlocal peak
            peak = max(peak, watched.inner.sequence_length(ticket.seq_id) or 0)
            return logits

        watched.step = high_water
        model.scheduler.runner = watched
        await events_of(ticket)
        nursery.cancel_scope.cancel()
    assert len(out.tokens) == 12
    assert peak == admission.kv_tokens_needed(len(prompt), 12) == len(prompt) + 11


async def test_a_cancelled_sequence_leaves_the_batch_and_frees_its_kv_within_one_step():
    model = load_tiny()
    watched = watch(model)
    scheduler = model.scheduler
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        keep = scheduler.submit(PROMPTS[0], 40, greedy(), Tokens())
        drop = scheduler.submit(PROMPTS[1], 200, greedy(), Tokens())
        pieces = 0
        async for event in drop.events:
            pieces += isinstance(event, Piece)
            if pieces == 5:
                break
        # Steps are numbered in order: those done, then the one in flight (if any) may still hold it.
        begun = scheduler.core.tally.steps + scheduler.stepping
        scheduler.cancel(drop)
        await events_of(keep)
        nursery.cancel_scope.cancel()
    after = watched.steps[begun:]
    assert after, "the kept sequence went on stepping"
    assert all(drop.seq_id not in s.seq_ids for s in after)
    assert drop.seq_id not in after[0].live_at_entry  # its KV was gone before the next step began
    assert [steps for seq_id, steps in watched.freed if seq_id == drop.seq_id] == [begun]  # freed before step `begun`
    assert scheduler.core.tally.cancelled_running == 1 and scheduler.core.kv_reserved_tokens == 0
    assert watched.kv_tokens_used() == 0


async def test_health_answers_while_a_long_prefill_step_is_still_running():
    model = load_tiny()
    watched = watch(model)
    watched.hold_tokens = 400  # only the long prompt's step is held
    config = NeuronConfig(models=[], engine=tiny_engine(), preloaded=[model])
    async with served(config) as (app, url), httpx.AsyncClient(timeout=30) as client:
        results: list[httpx.Response] = []

        async def long_request() -> None:
            body = {"model": "synth-tiny", "messages": [{"role": "user", "content": "x" * 500}], "max_tokens": 3}
            results.append(await client.post(url + "/v1/chat/completions", json=body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            await trio.to_thread.run_sync(watched.holding.wait, 30)
            health = (await client.get(url + "/health")).json()
            still_held = not watched.release.is_set()
            watched.release.set()
    assert still_held and health["per_model"]["synth-tiny"]["step_in_progress"] is True
    assert health["per_model"]["synth-tiny"]["in_flight"] == 1
    assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 3


# --- what a sequence writes (neuron/engines/kernel_engine.py) -------------------------------------

TOKENIZER = load_tiny().tokenizer
TABLE = byte_table(TOKENIZER)


def test_the_byte_table_covers_every_byte_valid_utf8_can_hold():
    assert TABLE is not None and len(TABLE) == 256  # the specials are not bytes
    assert {TABLE[b] for b in (0xC0, 0xC1, *range(0xF5, 0x100))} == {0xFF}  # bytes no valid text holds
    assert all(TOKENIZER.decode([token]) == chr(byte) for token, byte in TABLE.items() if byte < 0x80)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.sampled_from([256, 258, 260]), max_size=4))
def test_bytes_become_whole_characters_invalid_ones_dropped_never_more_bytes_than_tokens(data, specials):
    detok = ByteDetokenizer(TABLE)
    tokens = list(data) + specials  # synth-tiny's token b is byte b
    text = "".join(detok.feed(t) for t in tokens) + detok.flush()
    assert text == data.decode("utf-8", errors="ignore")  # specials write nothing
    assert len(text.encode()) <= len(tokens)


SPECIAL_STRINGS = [t.content for t in TOKENIZER._tok.get_added_tokens_decoder().values()]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_any_tokenizer_path_round_trips_text_one_token_at_a_time(text):
    # A special token's string in text encodes as that token (as in transformers), and replies
    # leave specials out: that case is the next test's.
    assume(not any(special in text for special in SPECIAL_STRINGS))
    detok = TextDetokenizer(TOKENIZER)
    pieces = [detok.feed(t) for t in TOKENIZER.encode(text)]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # never half a character


def test_a_long_text_is_encoded_as_a_short_one_is():
    """Past RELEASE_GIL_CHARS the tokenizer takes encode_batch (it releases the GIL): the same ids."""
    from neuron.engines.kernel.tokenizer import RELEASE_GIL_CHARS

    text = ("héllo <|eot_id|> wörld ✓ " * (RELEASE_GIL_CHARS // 20))[: RELEASE_GIL_CHARS + 7]
    assert len(text) > RELEASE_GIL_CHARS
    for special in (False, True):
        assert TOKENIZER.encode(text, add_special_tokens=special) == \
            TOKENIZER._tok.encode(text, add_special_tokens=special).ids


def test_a_special_tokens_string_in_text_is_that_token_and_writes_nothing():
    for special in SPECIAL_STRINGS:
        ids = TOKENIZER.encode(f"a{special}b")
        assert ids[1:-1] == [TOKENIZER.token_id(special)]
        detok = TextDetokenizer(TOKENIZER)
        assert "".join(detok.feed(t) for t in ids) + detok.flush() == "ab"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_the_first_stop_sequence_to_complete_cuts_the_text_however_it_arrives(text, stops, sizes):
    stop = StopText(stops)
    out, found, at = [], False, 0
    for size in sizes * 30:
        if at >= len(text) or found:
            break
        piece, found = stop.feed(text[at:at + size])
        out.append(piece)
        at += size
    if not found:
        out.append(stop.flush())
    matches = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    cut = min(matches)[1] if matches else len(text)  # the first to complete, at its start
    assert "".join(out) == text[:cut] and found == bool(matches)


def test_a_sequence_stops_on_eos_and_writes_its_held_text_first():
    output = SequenceOutput(ByteDetokenizer(TABLE), frozenset({258}), stops=["zz"])
    assert output.feed(ord("a")) == ("", None)  # held: it might start "zz"
    assert output.feed(ord("z")) == ("a", None)
    assert output.feed(258) == ("z", "stop")
    cut = SequenceOutput(ByteDetokenizer(TABLE), frozenset({258}), stops=["zz"])
    assert [cut.feed(t) for t in b"xzz"] == [("", None), ("x", None), ("", "stop")]
    tail = SequenceOutput(ByteDetokenizer(TABLE), frozenset(), stops=[])
    assert tail.feed(0xC3) == ("", None) and tail.flush() == ""  # half a character at max_tokens: dropped


def test_a_prompt_the_chat_template_refuses_is_a_400_naming_the_messages():
    from common.openai_schema import chat_request
    from neuron.engines.kernel.runner import ChatTemplateError

    class Refusing:
        def encode_chat(self, messages, tools=None):
            raise ChatTemplateError("chat template: tools need a user turn")

    model = load_tiny()
    model.runner = type("R", (), {"tokenizer": Refusing()})()
    with pytest.raises(Exception) as refused:
        model.encode_sync(chat_request({"model": "synth-tiny", "messages": HI}))
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "tools need a user turn" in refused.value.message


async def test_a_stopped_scheduler_refuses_new_work_with_a_503_and_counts_it():
    from common.errors import ApiError

    model = load_tiny()
    reasons: list[str] = []
    model.scheduler.on_reject = reasons.append
    async with trio.open_nursery() as nursery:
        await nursery.start(model.scheduler.run)
        await model.scheduler.shutdown()
    with pytest.raises(ApiError) as refused:
        model.scheduler.submit([256, 65], 3, greedy(), Tokens())  # nothing would ever step it: no hang
    assert refused.value.status == 503 and "unloading" in refused.value.message
    assert reasons == [admission.NOT_READY] and model.scheduler.core.tally.submitted == 0
