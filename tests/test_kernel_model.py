"""The kernel model core: numba against the numpy oracle, RoPE scaling, batching, sampling.

Tolerance: numba and numpy both run in float32 and differ only in the
order of additions, so logits agree within rtol = atol = 1e-4 (they
differ by about 1e-5 on synth-tiny).
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import pytest

from neuron.engines.kernel import numba_ops
from neuron.engines.kernel.checkpoint import preset_config
from neuron.engines.kernel.config import parse_config, rope_inv_freq
from neuron.engines.kernel.numpy_ref import NumpyBackend, apply_rope
from neuron.engines.kernel.numpy_ref import attention as reference_attention
from neuron.engines.kernel.runner import ModelRunner, StepInput, load_runner
from neuron.engines.kernel.sampling import Sampler, SamplingParams

RTOL = ATOL = 1e-4
PROMPTS = ["Hello, world!", "Ünïcödé ✓ 你好", "a", "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def runners() -> dict[str, ModelRunner]:
    out = {b: load_runner(preset="synth-tiny", backend=b, device="cpu") for b in ("numpy", "numba")}
    yield out
    for r in out.values():
        r.close()


def greedy_run(runner: ModelRunner, prompts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Greedy-decode all prompts together for `steps` tokens; frees them after."""
    logits = runner.step([StepInput(i, p) for i, p in prompts.items()])
    out: dict[int, list[int]] = {i: [] for i in prompts}
    for _ in range(steps):
        for row, i in enumerate(prompts):
            out[i].append(int(np.argmax(logits[row])))
        logits = runner.step([StepInput(i, [out[i][-1]]) for i in prompts])
    for i in prompts:
        runner.free(i)
    return out


# -- parity -------------------------------------------------------------------------------------


def test_numba_matches_numpy_on_prefill_and_mixed_batches(runners: dict[str, ModelRunner]) -> None:
    tok = runners["numpy"].tokenizer
    first = [StepInput(1, tok.encode(PROMPTS[0])), StepInput(2, tok.encode(PROMPTS[1]))]
    mixed = [StepInput(1, [65]), StepInput(3, tok.encode(PROMPTS[3])), StepInput(2, [66])]
    chunk = [StepInput(3, tok.encode(" and more")), StepInput(2, [67])]  # a prefill chunk after a prefill
    results = {}
    for name, runner in runners.items():
        results[name] = [runner.step(first), runner.step(mixed), runner.step(chunk)]
        for i in (1, 2, 3):
            runner.free(i)
    for a, b in zip(results["numpy"], results["numba"]):
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, numba_ops.SMALL_ROWS_MAX, numba_ops.SMALL_ROWS_MAX + 1])
@pytest.mark.parametrize("cols", [1, 3, 4, 7, 64, 2 * numba_ops.PARALLEL_COLS + 5])
def test_the_small_batch_projection_matches_numpy_at_every_tail(rows: int, cols: int) -> None:
    """matmul_small's 4x4 blocks and its row and column tails, and project's switch to BLAS."""
    rng = np.random.default_rng(rows * 1000 + cols)
    x = rng.standard_normal((rows, 37), dtype=np.float32)  # inner not a multiple of any vector width
    w = rng.standard_normal((cols, 37), dtype=np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    got = numba_ops.project(x, w)
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    for kernel in (numba_ops.matmul_small, numba_ops.matmul_small_parallel):
        out = np.full((rows, cols), np.nan, np.float32)  # every cell written, whatever the shape
        kernel(x, w, out)
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL, err_msg=str(kernel))


@pytest.mark.parametrize("n, start", [(1, 0), (1, 37), (3, 5), (12, 20)])
def test_every_numba_attention_path_matches_the_reference(n: int, start: int) -> None:
    config = preset_config("synth-tiny")  # 4 heads over 2 kv heads
    rng = np.random.default_rng(n * 100 + start)
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = rng.standard_normal((n, heads, hd), dtype=np.float32)
    k = rng.standard_normal((kv_heads, start + n + 5, hd), dtype=np.float32)  # capacity past the length
    v = rng.standard_normal((kv_heads, start + n + 5, hd), dtype=np.float32)
    want = reference_attention(q, k[:, : start + n], v[:, : start + n], start, config)
    for kernel in (numba_ops.attention, numba_ops.attention_parallel, numba_ops.attention_blas):
        out = np.zeros_like(q)
        kernel(q, k, v, start, np.float32(1 / math.sqrt(hd)), out)
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL, err_msg=str(kernel))


def test_greedy_tokens_are_identical_across_backends(runners: dict[str, ModelRunner]) -> None:
    tok = runners["numpy"].tokenizer
    prompts = {i: tok.encode_chat([{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS)}
    ref = greedy_run(runners["numpy"], prompts, 24)
    assert greedy_run(runners["numba"], prompts, 24) == ref
    assert all(len(set(tokens)) > 3 for tokens in ref.values())  # the weights do not collapse onto one token


def test_prefill_in_chunks_equals_one_prefill(runners: dict[str, ModelRunner]) -> None:
    runner = runners["numba"]
    ids = runner.tokenizer.encode(PROMPTS[3])
    whole = runner.step([StepInput(1, ids)])
    runner.step([StepInput(2, ids[:10])])
    runner.step([StepInput(2, ids[10:40])])
    chunked = runner.step([StepInput(2, ids[40:])])
    np.testing.assert_allclose(chunked, whole, rtol=RTOL, atol=ATOL)
    assert runner.sequence_length(1) == runner.sequence_length(2) == len(ids)
    runner.free(1)
    runner.free(2)


# -- RoPE ----------------------------------------------------------------------------------------


def _meta_llama3_scaling(freqs: np.ndarray, factor: float, low: float, high: float, old: int) -> list[float]:
    """Meta's reference `apply_scaling` (llama-models), written out per frequency as documented."""
    low_freq_wavelen = old / low
    high_freq_wavelen = old / high
    new = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new.append(freq)
        elif wavelen > low_freq_wavelen:
            new.append(freq / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            new.append((1 - smooth) * freq / factor + smooth * freq)
    return new


def _config(rope_scaling: dict | None, head_dim: int = 128, theta: float = 500000.0):
    return parse_config({
        "model_type": "llama", "vocab_size": 10, "hidden_size": head_dim * 2, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128,
        "rope_theta": theta, "rope_scaling": rope_scaling,
    })


def test_rope_default_frequencies_are_theta_to_the_minus_2i_over_d() -> None:
    base = rope_inv_freq(_config(None, head_dim=8, theta=10000.0))
    np.testing.assert_allclose(base, [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75], rtol=1e-12)


def test_rope_llama3_scaling_matches_the_documented_formula() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    got = rope_inv_freq(_config(scaling))
    np.testing.assert_allclose(got, _meta_llama3_scaling(base, 8.0, 1.0, 4.0, 8192), rtol=1e-12)
    # All three regimes occur: kept, divided by the factor, and blended.
    assert (got == base).any() and np.isclose(got, base / 8).any()
    assert ((got < base) & ~np.isclose(got, base / 8)).any()


def test_rope_linear_scaling_divides_positions_by_the_factor() -> None:
    config = _config({"type": "linear", "factor": 4.0}, head_dim=16)
    base = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(rope_inv_freq(config), base / 4.0, rtol=1e-12)


def test_rope_rotates_the_two_halves_as_hf_rotate_half() -> None:
    config = preset_config("synth-tiny")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, config.head_dim)).astype(np.float32)
    positions = np.array([0, 5, 1000])
    got = apply_rope(x, positions, config)
    half = config.head_dim // 2
    freqs = config.rope_theta ** (-np.arange(half) * 2 / config.head_dim)
    for t, p in enumerate(positions):
        c, s = np.cos(p * freqs), np.sin(p * freqs)
        a, b = x[t, :, :half], x[t, :, half:]
        want = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)  # pair i is (x[i], x[i + d/2])
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-5)
    # numba's fused split+rope agrees with the reference.
    cos, sin = (np.cos(np.outer(np.arange(1001), freqs)).astype(np.float32),
                np.sin(np.outer(np.arange(1001), freqs)).astype(np.float32))
    q, k, v = (np.empty((3, 2, config.head_dim), np.float32) for _ in range(3))
    qkv = np.ascontiguousarray(np.concatenate([x.reshape(3, -1)] * 3, axis=1))  # 2 q heads, 2 k heads, 2 v heads
    numba_ops.rope_split(qkv, positions.astype(np.int64), cos, sin, 2, 2, q, k, v)
    np.testing.assert_allclose(q, got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, got, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(v, x)


def test_rope_scaling_in_config_changes_the_model_output(runners: dict[str, ModelRunner]) -> None:
    base = runners["numpy"]
    scaled_config = replace(base.config, rope_scaling={"rope_type": "linear", "factor": 4.0})
    weights = base._backend.weights
    scaled = ModelRunner(name="s", config=scaled_config, tokenizer=base.tokenizer,
                         backend=NumpyBackend(scaled_config, weights))
    ids = base.tokenizer.encode(PROMPTS[0])
    a, b = base.step([StepInput(1, ids)]), scaled.step([StepInput(1, ids)])
    base.free(1)
    assert not np.allclose(a, b, rtol=RTOL, atol=ATOL)


# -- batching and the books ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_batch_gives_the_same_greedy_tokens_as_each_sequence_alone(runners: dict[str, ModelRunner],
                                                                     backend: str) -> None:
    runner = runners[backend]
    prompts = {i: runner.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    together = greedy_run(runner, prompts, 12)
    for i, p in prompts.items():
        assert greedy_run(runner, {i: p}, 12) == {i: together[i]}


def test_freeing_mid_batch_leaves_the_others_unchanged(runners: dict[str, ModelRunner]) -> None:
    runner = runners["numba"]
    prompts = {i: runner.tokenizer.encode(p) for i, p in enumerate(PROMPTS)}
    alone = greedy_run(runner, {0: prompts[0], 2: prompts[2]}, 10)
    logits = runner.step([StepInput(i, p) for i, p in prompts.items()])
    live = list(prompts)
    out: dict[int, list[int]] = {i: [] for i in prompts}
    for step in range(10):
        for i in live:
            out[i].append(int(np.argmax(logits[live.index(i)])))
        if step == 3:  # 1 and 3 leave; their KV goes at once
            before = runner.kv_tokens_used()
            runner.free(1)
            runner.free(3)
            live = [0, 2]
            assert runner.kv_tokens_used() == before - len(prompts[1]) - len(prompts[3]) - 6
        logits = runner.step([StepInput(i, [out[i][-1]]) for i in live])
    assert {0: out[0], 2: out[2]} == alone
    assert runner.kv_tokens_used() == len(prompts[0]) + len(prompts[2]) + 20
    runner.free(0)
    runner.free(2)
    runner.free(12345)  # unknown ids are ignored
    assert runner.kv_tokens_used() == 0


def test_the_context_wall_is_exact(runners: dict[str, ModelRunner]) -> None:
    base = runners["numpy"]
    config = replace(base.config, max_position_embeddings=24)
    runner = ModelRunner(name="short", config=config, tokenizer=base.tokenizer,
                         backend=NumpyBackend(config, base._backend.weights))
    runner.step([StepInput(1, list(range(23)))])
    runner.step([StepInput(1, [5])])  # exactly the context: allowed
    assert runner.sequence_length(1) == 24
    with pytest.raises(ValueError, match="25 tokens, over the context of 24"):
        runner.step([StepInput(1, [5]), StepInput(2, [1, 2])])
    assert runner.sequence_length(1) == 24 and runner.sequence_length(2) is None  # a refused step changes nothing
    with pytest.raises(ValueError, match="over the context"):
        runner.step([StepInput(3, list(range(25)))])


def test_bad_steps_are_value_errors_and_change_nothing(runners: dict[str, ModelRunner]) -> None:
    runner = runners["numpy"]
    runner.step([StepInput(1, [1, 2, 3])])
    for batch, match in [
        ([StepInput(1, [4]), StepInput(1, [5])], "same seq_id twice"),
        ([StepInput(2, [])], "non-empty"),
        ([StepInput(2, [runner.vocab_size])], "token ids must be"),
        ([StepInput(2, [-1])], "token ids must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            runner.step(batch)
    assert runner.kv_tokens_used() == 3 and runner.sequence_length(2) is None
    assert runner.step([]).shape == (0, runner.vocab_size)
    runner.free(1)


class _BlockingBackend(NumpyBackend):
    """The numpy backend, held inside forward until the test lets it go."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.entered, self.go = threading.Event(), threading.Event()
        self.released: list[object] = []

    def forward(self, work):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.go.wait(30)
        return super().forward(work)

    def release(self, kv) -> None:  # type: ignore[no-untyped-def]
        self.released.append(kv)


def test_free_during_a_step_drops_the_books_at_once_and_the_storage_after(runners: dict[str, ModelRunner]) -> None:
    base = runners["numpy"]
    backend = _BlockingBackend(base.config, base._backend.weights)
    runner = ModelRunner(name="b", config=base.config, tokenizer=base.tokenizer, backend=backend)
    backend.go.set()
    runner.step([StepInput(1, [1, 2, 3]), StepInput(2, [4, 5])])
    backend.go.clear()
    result: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: result.append(runner.step([StepInput(1, [6]), StepInput(2, [7])])))
    worker.start()
    assert backend.entered.wait(30)
    runner.free(2)  # returns without waiting for the step
    assert runner.kv_tokens_used() == 3 and backend.released == []
    with pytest.raises(RuntimeError, match="one caller at a time"):
        runner.step([StepInput(9, [1])])
    backend.go.set()
    worker.join(30)
    assert result[0].shape == (2, runner.vocab_size)
    assert runner.kv_tokens_used() == 4 and runner.sequence_length(2) is None and len(backend.released) == 1
    runner.close()
    assert len(backend.released) == 2
    with pytest.raises(RuntimeError, match="closed"):
        runner.step([StepInput(1, [1])])


def test_kv_bytes_and_weight_bytes_are_reported(runners: dict[str, ModelRunner]) -> None:
    config = runners["numba"].config
    for runner in runners.values():
        assert runner.kv_bytes_per_token == 2 * config.num_hidden_layers * config.kv_dim * 4
        assert runner.weight_bytes == config.param_count() * 4
        assert runner.context_tokens == config.max_position_embeddings == 2048


# -- sampling ------------------------------------------------------------------------------------


def _draws(params: SamplingParams, logits: np.ndarray, n: int = 32, fallback: int = 0) -> list[int]:
    sampler = Sampler(params, fallback)
    return [sampler.sample(logits) for _ in range(n)]


LOGITS = np.random.default_rng(7).standard_normal(300).astype(np.float32) * 2


def test_same_seed_gives_the_same_tokens() -> None:
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42)
    assert _draws(p, LOGITS) == _draws(p, LOGITS)
    assert _draws(SamplingParams(seed=None), LOGITS, fallback=5) == _draws(SamplingParams(seed=5), LOGITS)


def test_different_seeds_differ_on_a_flat_distribution() -> None:
    flat = np.zeros(256, np.float32)  # 32 draws agreeing by chance: 256**-32
    assert _draws(SamplingParams(seed=1), flat) != _draws(SamplingParams(seed=2), flat)


def test_top_k_1_and_temperature_0_are_greedy() -> None:
    want = int(np.argmax(LOGITS))
    assert set(_draws(SamplingParams(top_k=1, seed=3), LOGITS)) == {want}
    assert set(_draws(SamplingParams(temperature=0.0, seed=3), LOGITS)) == {want}


def test_top_k_and_top_p_bound_the_candidates() -> None:
    top5 = set(np.argsort(-LOGITS)[:5].tolist())
    assert set(_draws(SamplingParams(top_k=5, seed=4), LOGITS, n=200)) <= top5
    logits = np.array([3.0, 2.0, -10.0, -10.0], np.float32)  # the top two hold > 99.9% of the mass
    assert set(_draws(SamplingParams(top_p=0.99, seed=4), logits, n=200)) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.01, seed=4), logits, n=50)) == {0}


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    counts = np.bincount(_draws(SamplingParams(seed=9), logits, n=4000), minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.04)  # ~5 standard deviations


def test_bad_sampling_params_are_refused() -> None:
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams(), 0).sample(np.array([np.nan, 1.0], np.float32))


def test_thread_settings_are_read_and_a_bad_one_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuron.engines.kernel.config import KernelConfigError

    monkeypatch.setenv("NEURON_MATMUL_THREADS", "3")
    assert numba_ops._env_threads("NEURON_MATMUL_THREADS", 1, 1) == 3
    monkeypatch.setenv("NEURON_MATMUL_THREADS", "")
    assert numba_ops._env_threads("NEURON_MATMUL_THREADS", 7, 1) == 7
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("NEURON_MATMUL_THREADS", bad)
        with pytest.raises(KernelConfigError, match="NEURON_MATMUL_THREADS.*at least 1"):
            numba_ops._env_threads("NEURON_MATMUL_THREADS", 1, 1)
    monkeypatch.setenv("NEURON_BLAS_THREADS", "0")  # 0: leave BLAS alone
    assert numba_ops._env_threads("NEURON_BLAS_THREADS", 1, 0) == 0
    monkeypatch.delenv("NEURON_MATMUL_THREADS")
    monkeypatch.setattr(numba_ops.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert numba_ops._matmul_threads() == 1  # two cores: serial
    monkeypatch.setattr(numba_ops.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(numba_ops.numba.config, "NUMBA_NUM_THREADS", 4)
    assert numba_ops._matmul_threads() == 4  # every usable CPU, within numba's pool


def test_threaded_projections_give_the_serial_logits(runners: dict[str, ModelRunner],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode batch through the whole model with the projections on 2 threads (the default past two cores)."""
    numba_runner = runners["numba"]
    prompts = {i: numba_runner.tokenizer.encode(text) for i, text in enumerate(["one", "two, three", "ünï"])}
    results = []
    threaded = min(2, numba_ops.numba.config.NUMBA_NUM_THREADS)
    if threaded < 2:
        pytest.skip("numba has one thread here (NUMBA_NUM_THREADS=1): nothing to run in parallel")
    for threads in (1, threaded):
        monkeypatch.setattr(numba_ops, "MATMUL_THREADS", threads)
        numba_runner.step([StepInput(10 + i, p) for i, p in prompts.items()])
        results.append(numba_runner.step([StepInput(10 + i, [65 + i]) for i in prompts]))
        for i in prompts:
            numba_runner.free(10 + i)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_loading_a_numba_model_compiles_the_small_batch_projection_before_any_request() -> None:
    """The warm-up step has several rows, so the first real batch does not stall on a compile.

    A fresh interpreter: in this one, earlier tests have compiled the kernel already.
    """
    import subprocess
    import sys

    code = (
        "from neuron.app import kernel_spec\n"
        "from neuron.engines import kernel_engine\n"
        "from neuron.engines.kernel import numba_ops\n"
        "from neuron.engines.kernel_engine import KernelEngine, LoadSpec\n"
        "engine = KernelEngine(backend='numba', device='cpu')\n"
        "kernel = numba_ops.matmul_small_parallel if numba_ops.MATMUL_THREADS > 1 else numba_ops.matmul_small\n"
        "assert not kernel.signatures\n"
        "kernel_engine.load_sync(LoadSpec('m', preset='synth-tiny', device='cpu', backend='numba'), engine, kernel_spec)\n"
        "print(len(kernel.signatures))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) >= 1
