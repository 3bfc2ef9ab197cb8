"""Model lifecycle: the pure state machine, then both engines over HTTP: load, list,
unload (draining, then cutting), concurrent loads as one, over-budget loads refused
with 507; and the kernel engine's commands and start-up errors."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import trio

from neuron.app import NeuronApp, NeuronConfig
from neuron.engines import kernel_engine
from neuron.lifecycle import Lifecycle, Requests
from tests.conftest import Stack, wait_until
from tests.kernel_helpers import served, sse_events, tiny_engine

MB = 2**20
HI = [{"role": "user", "content": "hi"}]
KERNEL = ("--engine", "kernel", "--backend", "numpy")


# --- the pure state machine --------------------------------------------------------------------


def test_a_load_reserves_its_memory_and_a_second_load_of_that_model_joins_it():
    lc = Lifecycle(memory_budget_bytes=100)
    assert lc.begin_load("a", 60, "cpu") == "start"
    assert lc.memory_reserved_bytes == 60  # reserved while loading: a second model cannot overcommit
    assert lc.begin_load("a", 60, "cpu") == "join"
    assert lc.begin_load("b", 50, "cpu") == "no_memory"
    lc.load_done("a", object(), now=5.0, device="cpu", memory_bytes=55)
    assert lc.begin_load("a", 60, "cpu") == "ready"
    assert lc.loads_total == 1 and lc.load_refusals_total == 1
    assert lc.get("a").loaded_at == 5.0 and lc.memory_reserved_bytes == 55
    lc.check()


def test_a_failed_load_releases_its_reservation():
    lc = Lifecycle(memory_budget_bytes=100)
    lc.begin_load("a", 80, "cpu")
    assert lc.begin_load("b", 30, "cpu") == "no_memory"
    lc.load_failed("a")
    assert lc.begin_load("b", 30, "cpu") == "start" and lc.load_failures_total == 1


def test_unload_begins_once_and_frees_when_done():
    lc = Lifecycle()
    assert lc.begin_unload("a") == "absent"
    lc.begin_load("a", 10, "cpu")
    assert lc.begin_unload("a") == "loading"
    lc.load_done("a", object(), now=0.0, device="cpu")
    assert lc.begin_unload("a") == "start" and lc.get("a").status == "unloading"
    assert lc.begin_unload("a") == "join"
    assert lc.begin_load("a", 10, "cpu") == "unloading"
    lc.unload_done("a")
    assert lc.get("a") is None and lc.memory_reserved_bytes == 0 and lc.unloads_total == 1


async def test_requests_drain_within_the_bound_or_are_cut():
    requests = Requests()
    finished: list[str] = []

    async def work(name: str, seconds: float, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with requests.track() as scope:
            task_status.started()
            await trio.sleep(seconds)
            finished.append(name)
        if scope.cancelled_caught:
            finished.append(name + " cut")

    async with trio.open_nursery() as nursery:
        await nursery.start(work, "short", 0.01)
        assert len(requests) == 1 and await requests.drain(10.0)
        await nursery.start(work, "long", 100.0)
        assert not await requests.drain(0.01)
        assert requests.cut() == 1
        await requests.wait_empty()
    assert finished == ["short", "long cut"]


# --- the mock engine over HTTP -----------------------------------------------------------------


def _load(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/models/load", json=body, timeout=60)


def _unload(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/models/unload", json=body, timeout=60)


def _chat(url: str, model: str, max_tokens: int = 5, **extra) -> httpx.Response:
    body = {"model": model, "messages": HI, "max_tokens": max_tokens, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _status(url: str, model: str) -> str | None:
    entries = {m["id"]: m for m in httpx.get(url + "/models").json()["data"]}
    return entries[model]["status"] if model in entries else None


def test_mock_models_load_list_and_unload_and_a_load_past_the_budget_is_507(stack: Stack):
    neuron = stack.neuron("--memory-mb", "2500", "--model-memory-mb", "1000")
    listing = neuron.get_json("/models")
    assert [(m["id"], m["status"], m["memory_bytes"]) for m in listing["data"]] == [("cortex-mock", "ready", 1000 * MB)]
    assert listing["memory_budget_bytes"] == 2500 * MB and listing["data"][0]["loaded_at"] > 0
    assert _load(neuron.url, model="b").json()["load"] == "loaded"
    assert _load(neuron.url, model="b").json()["load"] == "already_loaded"
    refused = _load(neuron.url, model="c")
    assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_memory"
    assert "MiB" in refused.json()["error"]["message"]
    assert _load(neuron.url, model="c", memory_mb=400).status_code == 200
    assert [m["id"] for m in neuron.get_json("/v1/models")["data"]] == ["cortex-mock", "b", "c"]
    assert _chat(neuron.url, "b").status_code == 200
    gone = _unload(neuron.url, model="b")
    assert gone.status_code == 200 and gone.json()["status"] == "unloaded"
    assert _chat(neuron.url, "b").json()["error"]["code"] == "model_not_found"
    assert _unload(neuron.url, model="b").status_code == 404
    assert neuron.get_json("/models")["memory_reserved_bytes"] == 1400 * MB
    assert _load(neuron.url, model="d", memory_mb="lots").json()["error"]["param"] == "memory_mb"


def test_mock_unload_under_load_drains_and_refuses_newcomers_then_cuts_past_the_bound(stack: Stack):
    neuron = stack.neuron("--token-interval-ms", "5")
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_chat, neuron.url, "cortex-mock", 200, stream=True)  # about a second
        wait_until(lambda: neuron.get_json("/health")["in_flight"] == 1)
        unload = pool.submit(_unload, neuron.url, model="cortex-mock")
        wait_until(lambda: _status(neuron.url, "cortex-mock") == "unloading")
        newcomer = _chat(neuron.url, "cortex-mock")
        drained, unloaded = stream.result(60), unload.result(60)
    assert newcomer.status_code == 503 and int(newcomer.headers["retry-after"]) >= 1
    assert "unloading" in newcomer.json()["error"]["message"]
    assert sse_events(drained.content)[-1] == "[DONE]"  # drained: it finished as if nothing happened
    assert unloaded.json()["cancelled"] == 0 and unloaded.json()["in_flight_at_unload"] == 1
    assert _load(neuron.url, model="cortex-mock").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_chat, neuron.url, "cortex-mock", 3000, stream=True)  # fifteen seconds
        wait_until(lambda: neuron.get_json("/health")["in_flight"] == 1)
        cut = _unload(neuron.url, model="cortex-mock", drain_timeout_s=0.2)
        partial = stream.result(60)
    assert cut.json()["cancelled"] == 1
    assert "[DONE]" not in sse_events(partial.content)  # cut mid-stream: a broken stream, not a finished one
    assert neuron.get_json("/health")["in_flight"] == 0


# --- the kernel engine -------------------------------------------------------------------------


async def test_concurrent_loads_of_one_model_are_one_load_and_requests_meanwhile_get_503(monkeypatch):
    gate = threading.Event()
    calls: list[str] = []
    real = kernel_engine.load_sync

    def slow_load(spec, engine, make_spec):
        calls.append(spec.name)
        assert gate.wait(30)
        return real(spec, engine, make_spec)

    monkeypatch.setattr(kernel_engine, "load_sync", slow_load)
    config = NeuronConfig(models=[], engine=tiny_engine())
    async with served(config) as (app, url), httpx.AsyncClient(timeout=30) as client:
        answers: list[httpx.Response] = []

        async def load() -> None:
            answers.append(await client.post(url + "/models/load", json={"model": "synth-tiny"}))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(load)
            with trio.fail_after(30):
                while app.load_waiters.get("synth-tiny", 0) < 4:  # one loads (held at the gate), four wait on it
                    await trio.sleep(0.01)
            listing = (await client.get(url + "/models")).json()
            early = await client.post(url + "/v1/chat/completions", json={"model": "synth-tiny", "messages": HI})
            gate.set()
        chat = await client.post(url + "/v1/chat/completions",
                                 json={"model": "synth-tiny", "messages": HI, "max_tokens": 4})
        health = (await client.get(url + "/health")).json()
    assert calls == ["synth-tiny"] and health["model_loads_total"] == 1
    assert sorted(a.json()["load"] for a in answers) == ["joined"] * 4 + ["loaded"]
    assert all(a.status_code == 200 and a.json()["status"] == "ready" for a in answers)
    assert listing["data"][0]["status"] == "loading"
    assert early.status_code == 503 and int(early.headers["retry-after"]) >= 1 and "loading" in early.text
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4
    assert health["per_model"]["synth-tiny"]["rejections"]["not_ready"] == 1


def test_an_over_budget_load_is_refused_with_507_before_anything_is_allocated(stack: Stack, tmp_path):
    neuron = stack.neuron(*KERNEL, "--memory-mb", "600")
    assert neuron.get_json("/v1/models")["data"] == []
    loaded = _load(neuron.url, model="synth-tiny")  # 0.5 MiB of weights plus the 512 MiB KV budget
    assert loaded.status_code == 200 and loaded.json()["device"] == "cpu" and loaded.json()["backend"] == "numpy"
    before = neuron.get_json("/models")["memory_reserved_bytes"]
    refused = _load(neuron.url, model="synth-small")  # ~400 MiB of weights more: over 600
    assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_memory"
    after = neuron.get_json("/models")
    assert after["memory_reserved_bytes"] == before and [m["id"] for m in after["data"]] == ["synth-tiny"]
    assert neuron.get_json("/health")["model_loads_total"] == 1
    broken = _load(neuron.url, model="mine", path=str(tmp_path / "nowhere"))
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "model_load_failed"
    assert "nowhere" in broken.json()["error"]["message"]
    assert _load(neuron.url, model="x", preset="synth-huge").json()["error"]["param"] == "preset"


def test_kernel_unload_drains_in_flight_work_then_frees_and_a_short_bound_cuts(stack: Stack):
    neuron = stack.neuron(*KERNEL, "--model", "synth-tiny")
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_chat, neuron.url, "synth-tiny", 800, stream=True, temperature=0)
        wait_until(lambda: neuron.get_json("/health")["per_model"]["synth-tiny"]["in_flight"] == 1)
        unload = pool.submit(_unload, neuron.url, model="synth-tiny")
        wait_until(lambda: _status(neuron.url, "synth-tiny") == "unloading")
        newcomer = _chat(neuron.url, "synth-tiny")
        drained, unloaded = stream.result(60), unload.result(60)
    assert newcomer.status_code == 503 and "unloading" in newcomer.json()["error"]["message"]
    events = sse_events(drained.content)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert unloaded.json()["cancelled"] == 0
    assert neuron.get_json("/v1/models")["data"] == [] and _chat(neuron.url, "synth-tiny").status_code == 404
    assert _load(neuron.url, model="synth-tiny").json()["load"] == "loaded"
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_chat, neuron.url, "synth-tiny", 2000, stream=True, temperature=0)
        wait_until(lambda: neuron.get_json("/health")["per_model"]["synth-tiny"]["in_flight"] == 1)
        cut = _unload(neuron.url, model="synth-tiny", drain_timeout_s=0)
        partial = stream.result(60)
    assert cut.json()["cancelled"] == 1 and "[DONE]" not in sse_events(partial.content)
    health = neuron.get_json("/health")
    assert health["per_model"] == {} and health["cancelled_total"] == 1


# --- commands ----------------------------------------------------------------------------------


def _neuron(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(kernel_engine.cupy_installed(), reason="cupy is installed here: cuda may well exist")
def test_asking_for_cuda_without_a_gpu_is_a_clear_startup_error():
    done = _neuron("serve", "--engine", "kernel", "--model", "synth-tiny", "--device", "cuda", "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--engine", "kernel", "--ttft-ms", "5"), "--ttft-ms applies to --engine mock only"),
        (("--kv-budget-mb", "5"), "--kv-budget-mb applies to --engine kernel only"),
        (("--engine", "kernel", "--model", "llama-9000"), "not a preset"),
        (("--engine", "kernel", "--model", "synth-tiny", "--memory-mb", "1"), "over the memory budget"),
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(args, said):
    done = _neuron("serve", "--listen", "127.0.0.1:0", *args)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_make_checkpoint_writes_a_directory_that_serves_under_its_own_name(stack: Stack, tmp_path):
    directory = tmp_path / "tiny"
    written = _neuron("make-checkpoint", "synth-tiny", str(directory))
    assert written.returncode == 0, written.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in directory.iterdir()
    }
    neuron = stack.neuron(*KERNEL, "--model-path", str(directory), "--served-name", "tiny")
    entry = neuron.get_json("/v1/models")["data"][0]
    assert entry["id"] == "tiny" and entry["limit"] == {"context": 2048, "output": 2048}
    assert entry["tokenizer"]["kind"] == "byte-level" and entry["tokenizer"]["message_overhead_tokens"] >= 1
    reply = _chat(neuron.url, "tiny", 8, temperature=0)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8


def test_a_neuron_holds_a_bounded_number_of_models():
    lc = Lifecycle(models_max=2)
    assert [lc.begin_load(name, 1, "cpu") for name in "abc"] == ["start", "start", "too_many"]
    assert lc.load_refusals_total == 1


async def test_a_mock_unload_without_a_lifespan_answers_instead_of_a_500():
    # In-process use (no lifespan nursery) runs the unload inline; it must still answer.
    app = NeuronApp(NeuronConfig(memory_mb=4096))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://neuron") as client:
        assert (await client.post("/models/load", json={"model": "x", "memory_mb": 512})).status_code == 200
        r = await client.post("/models/unload", json={"model": "x"})
        assert r.status_code == 200 and r.json()["status"] == "unloaded"


@pytest.mark.parametrize("drain_s", [0, 30])
async def test_an_unload_while_a_long_prompt_is_encoded_cuts_or_drains_it_and_never_hangs(monkeypatch, drain_s):
    """A prompt long enough to be encoded in a thread is already the unload's to drain or cut:
    with no drain it is refused with a 503, with one it is served, and the unload waits for it."""
    from tests.kernel_helpers import load_tiny

    model = load_tiny()
    gate, encoding = threading.Event(), threading.Event()
    real = model.encode_sync

    def slow_encode(gen):
        encoding.set()
        assert gate.wait(30), "the test never opened the gate"
        return real(gen)

    monkeypatch.setattr(model, "encode_sync", slow_encode)
    config = NeuronConfig(models=[], engine=tiny_engine(), preloaded=[model])
    # Long in characters, short in tokens: each special token's string is one token.
    long_text = "<|end_of_text|>" * (kernel_engine.ENCODE_IN_THREAD_CHARS // len("<|end_of_text|>") + 1)
    async with served(config) as (app, url), httpx.AsyncClient(timeout=30) as client:
        answers: dict[str, httpx.Response] = {}

        async def chat() -> None:
            body = {"model": "synth-tiny", "messages": [{"role": "user", "content": long_text}], "max_tokens": 3}
            answers["chat"] = await client.post(url + "/v1/chat/completions", json=body)

        async def unload() -> None:
            answers["unload"] = await client.post(url + "/models/unload",
                                                  json={"model": "synth-tiny", "drain_timeout_s": drain_s})

        with trio.fail_after(60):  # a hang fails here, not forever
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat)
                await trio.to_thread.run_sync(encoding.wait, 30)
                nursery.start_soon(unload)
                while app.lifecycle.get("synth-tiny").status == "ready":
                    await trio.sleep(0.01)
                gate.set()
        health = (await client.get(url + "/health")).json()
    assert answers["unload"].status_code == 200, answers["unload"].text
    assert answers["chat"].status_code in (200, 503), answers["chat"].text
    if drain_s:
        assert answers["chat"].status_code == 200 and answers["chat"].json()["usage"]["completion_tokens"] == 3
        assert answers["unload"].json()["in_flight_at_unload"] == 1
    else:
        assert answers["chat"].status_code == 503 and "unloading" in answers["chat"].text
        assert int(answers["chat"].headers["retry-after"]) >= 1
        # Counted once, as a refusal: not as a request, not as a cancellation.
        assert (health["requests_total"], health["cancelled_total"], health["rejected_total"]) == (0, 0, 1)


@pytest.mark.parametrize("env", [{"NEURON_MATMUL_THREADS": "0"}, {"NEURON_BLAS_THREADS": "many"}])
def test_a_bad_thread_setting_is_a_start_up_error_even_with_no_model_to_load(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = _neuron("serve", "--listen", "127.0.0.1:0", "--engine", "kernel", "--backend", "numba")
    assert done.returncode == 2 and next(iter(env)) in done.stderr and "Traceback" not in done.stderr
