"""CuPy backend parity against the numpy oracle. Skips without a GPU; NEURON_REQUIRE_GPU=1 makes that a failure.

Tolerance: the GPU keeps weights, activations between kernels and the KV
cache in fp16 (fp32 accumulation and an fp32 residual stream), so logits
agree with the fp32 oracle within atol = 0.05 + 2% of their spread
(synth-tiny's logits span about +-12). Greedy parity is checked
teacher-forced: at each position both backends see the oracle's token,
and their argmax must agree wherever the oracle's top two logits are
more than the tolerance apart (elsewhere fp16 may legitimately flip a tie).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from neuron.engines.kernel.runner import ModelRunner, StepInput, cuda_available, load_runner

REQUIRED = os.environ.get("NEURON_REQUIRE_GPU") == "1"
SKIP_REASON = "no CUDA device: cupy not installed or cupy.cuda.is_available() is False"
PROMPTS = ["Hello, GPU!", "Ünïcödé ✓ 你好", "a", "The quick brown fox jumps over the lazy dog. " * 8]


@pytest.fixture(scope="module", autouse=True)
def _need_gpu() -> None:
    if not cuda_available():
        if REQUIRED:
            pytest.fail(f"NEURON_REQUIRE_GPU=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="module")
def pair() -> dict[str, ModelRunner]:
    out = {"numpy": load_runner(preset="synth-tiny", backend="numpy", device="cpu"),
           "cupy": load_runner(preset="synth-tiny", backend="cupy", device="cuda")}
    yield out
    for r in out.values():
        r.close()


def _tol(reference: np.ndarray) -> float:
    return 0.05 + 0.02 * float(reference.max() - reference.min())


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(want))


def test_the_gpu_runner_reports_its_device_and_sizes(pair: dict[str, ModelRunner]) -> None:
    gpu = pair["cupy"]
    config = gpu.config
    assert (gpu.backend, gpu.device) == ("cupy", "cuda")
    assert gpu.kv_bytes_per_token == 2 * config.num_hidden_layers * config.kv_dim * 2  # fp16
    assert gpu.weight_bytes == config.param_count() * 2


def test_cupy_matches_numpy_on_prefill_mixed_and_decode_batches(pair: dict[str, ModelRunner]) -> None:
    tok = pair["numpy"].tokenizer
    steps = [
        [StepInput(1, tok.encode(PROMPTS[0])), StepInput(2, tok.encode(PROMPTS[1]))],
        [StepInput(1, [65]), StepInput(3, tok.encode(PROMPTS[3])), StepInput(2, [66])],  # mixed: eager
        [StepInput(1, [67]), StepInput(2, [68]), StepInput(3, [69])],  # decode only: the CUDA graph
        [StepInput(3, [70]), StepInput(1, [71])],
        [StepInput(2, tok.encode(" a chunk")), StepInput(1, [72])],
    ]
    for batch in steps:
        _close(pair["cupy"].step(batch), pair["numpy"].step(batch))
    for runner in pair.values():
        for i in (1, 2, 3):
            runner.free(i)


def test_graph_and_eager_decode_agree(pair: dict[str, ModelRunner]) -> None:
    gpu = pair["cupy"]
    backend = gpu._backend
    ids = gpu.tokenizer.encode(PROMPTS[0])
    gpu.step([StepInput(1, ids)])
    gpu.step([StepInput(2, ids)])
    graphed_before = backend.steps_graphed
    a = gpu.step([StepInput(1, [80])])
    backend.use_graphs, saved = False, backend.use_graphs
    try:
        b = gpu.step([StepInput(2, [80])])
    finally:
        backend.use_graphs = saved
    assert backend.graph_failures == [], backend.graph_failures
    assert backend.steps_graphed == graphed_before + 1
    # The same arithmetic, but cuBLAS may pick other kernels under capture: a few fp16 ulps (0.008 at 16).
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05)
    assert int(np.argmax(a)) == int(np.argmax(b))
    gpu.free(1)
    gpu.free(2)


def test_greedy_tokens_agree_teacher_forced(pair: dict[str, ModelRunner]) -> None:
    ref, gpu = pair["numpy"], pair["cupy"]
    prompts = {i: ref.tokenizer.encode_chat([{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)}
    batch = [StepInput(i, p) for i, p in prompts.items()]
    checked = 0
    for _ in range(24):
        want, got = ref.step(batch), gpu.step(batch)
        for row in range(len(batch)):
            top2 = np.sort(want[row])[-2:]
            if top2[1] - top2[0] > _tol(want[row]):
                assert int(np.argmax(got[row])) == int(np.argmax(want[row]))
                checked += 1
        batch = [StepInput(item.seq_id, [int(np.argmax(want[row]))]) for row, item in enumerate(batch)]
    assert checked >= 24  # most positions have a clear winner
    for runner in pair.values():
        for i in prompts:
            runner.free(i)


def test_a_batch_gives_the_same_greedy_tokens_as_each_alone_on_the_gpu(pair: dict[str, ModelRunner]) -> None:
    """Greedy together, then each alone fed the same tokens: the argmax agrees wherever it is not a near-tie.

    The batch and a lone sequence are different matrix sizes, so cuBLAS may pick other kernels and
    differ in the last fp16 bit; a top-two gap under GAP may flip legitimately, and then a free
    run would diverge, so the lone runs are teacher-forced on the batch's tokens.
    """
    gpu = pair["cupy"]
    prompts = {i: gpu.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    gap = 0.05
    logits = gpu.step([StepInput(i, p) for i, p in prompts.items()])
    together: dict[int, list[tuple[int, bool]]] = {i: [] for i in prompts}  # (token, clear winner)
    for _ in range(12):
        for row, i in enumerate(prompts):
            top2 = np.sort(logits[row])[-2:]
            together[i].append((int(np.argmax(logits[row])), bool(top2[1] - top2[0] > gap)))
        logits = gpu.step([StepInput(i, [together[i][-1][0]]) for i in prompts])
    for i in prompts:
        gpu.free(i)
    checked = 0
    for i, p in prompts.items():
        logits = gpu.step([StepInput(100 + i, p)])
        for token, clear in together[i]:
            if clear:
                assert int(np.argmax(logits[0])) == token
                checked += 1
            logits = gpu.step([StepInput(100 + i, [token])])
        gpu.free(100 + i)
    assert checked >= len(prompts) * 12 // 2  # most positions have a clear winner


def test_free_and_close_release_device_memory() -> None:
    import cupy

    pool = cupy.get_default_memory_pool()
    baseline = pool.used_bytes()
    runner = load_runner(preset="synth-tiny", backend="cupy", device="cuda")
    runner.step([StepInput(1, list(range(100))), StepInput(2, list(range(50)))])
    assert runner.kv_tokens_used() == 150
    held = pool.used_bytes()
    runner.free(1)  # its cache holds exactly its 100 prompt tokens
    assert runner.kv_tokens_used() == 50
    assert held - pool.used_bytes() >= 100 * runner.kv_bytes_per_token
    runner.close()
    assert runner.kv_tokens_used() == 0
    assert pool.used_bytes() - baseline < 1 << 20  # weights, caches and graphs all gone


def test_the_context_wall_holds_on_the_gpu(pair: dict[str, ModelRunner]) -> None:
    gpu = pair["cupy"]
    gpu.step([StepInput(9, [1] * (gpu.context_tokens - 1))])
    gpu.step([StepInput(9, [2])])
    with pytest.raises(ValueError, match="over the context"):
        gpu.step([StepInput(9, [3])])
    gpu.free(9)
