"""The kernel engine's model runner: the contract neuron's serving layer steps.

`ModelRunner.step` runs one forward pass over a mixed batch: prefills for
new sequence ids and further tokens (one, for a decode) for known ones,
each with its own KV length. The runner owns the bookkeeping (which
sequences live, how long each is, the exact context wall); a backend
(numpy, numba, cupy) owns the arithmetic and the KV storage.

`free` never waits for a step in flight: it drops the sequence from the
books at once (so `kv_tokens_used` falls at once), and a step that was
using it releases its storage when it finishes and leaves its length alone.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from neuron.engines.kernel.checkpoint import PRESET_SEEDS, preset_config, preset_tensors, preset_tokenizer
from neuron.engines.kernel.config import KernelConfigError, ModelConfig, load_config
from neuron.engines.kernel.loader import Weights, load_weights, weights_from_tensors
from neuron.engines.kernel.tokenizer import ChatTemplateError, KernelTokenizer, load_tokenizer

__all__ = [
    "BACKENDS", "ChatTemplateError", "KernelConfigError", "KernelTokenizer", "ModelRunner", "StepInput",
    "cuda_available", "estimate_weight_bytes", "load_runner",
]

BACKENDS = ("numpy", "numba", "cupy")
DEVICES = ("cpu", "cuda")
LIMIT_BATCH = 4096  # sequences in one step
LIMIT_STEP_TOKENS = 1 << 20  # tokens in one step, all sequences together


@dataclass(frozen=True)
class StepInput:
    seq_id: int  # caller-chosen, unique among live sequences
    tokens: list[int]  # first call for a seq_id: the prompt (or its first chunk); later: the token(s) to append


class Backend(Protocol):
    name: str
    device: str
    weight_bytes: int
    kv_bytes_per_token: int

    def new_sequence(self) -> Any: ...
    def forward(self, work: list[tuple[Any, int, np.ndarray]]) -> np.ndarray: ...
    def release(self, handle: Any) -> None: ...
    def close(self) -> None: ...


class _Seq:
    __slots__ = ("handle", "length")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.length = 0


class ModelRunner:
    """One loaded model on one backend. See the module docstring for the threading rules."""

    def __init__(self, *, name: str, config: ModelConfig, tokenizer: KernelTokenizer, backend: Backend) -> None:
        self.name = name
        self.config = config
        self.tokenizer = tokenizer
        self._backend = backend
        self.backend = backend.name
        self.device = backend.device
        self.context_tokens = config.max_position_embeddings
        self.vocab_size = config.vocab_size  # logits' width; columns past the tokenizer's vocabulary are -inf
        self.weight_bytes = backend.weight_bytes
        self.kv_bytes_per_token = backend.kv_bytes_per_token
        self._seqs: dict[int, _Seq] = {}
        self._books = threading.Lock()  # held briefly: the sequence table, never during arithmetic
        self._stepping = threading.Lock()  # one step (or close) at a time
        self._in_step: set[int] = set()  # ids of handles the running step uses
        self._orphans: list[Any] = []  # handles freed during a step: released when it ends
        self._closed = False

    # -- the contract ---------------------------------------------------------------------------

    def step(self, batch: list[StepInput]) -> np.ndarray:
        """Append each input's tokens to its sequence; logits [len(batch), vocab_size] after each last token."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("ModelRunner.step called while another step runs (one caller at a time)")
        try:
            return self._step(batch)
        finally:
            self._stepping.release()

    def free(self, seq_id: int) -> None:
        with self._books:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return
            if id(seq.handle) in self._in_step:
                self._orphans.append(seq.handle)
                return
        self._backend.release(seq.handle)

    def kv_tokens_used(self) -> int:
        with self._books:
            return sum(s.length for s in self._seqs.values())

    def sequence_length(self, seq_id: int) -> int | None:
        """Tokens held for `seq_id`, or None when it is not live (an addition to the contract)."""
        with self._books:
            seq = self._seqs.get(seq_id)
            return None if seq is None else seq.length

    def close(self) -> None:
        with self._stepping:
            with self._books:
                if self._closed:
                    return
                self._closed = True
                handles = [s.handle for s in self._seqs.values()]
                self._seqs.clear()
            for handle in handles:
                self._backend.release(handle)
            self._backend.close()

    # -- inside a step --------------------------------------------------------------------------

    def _check(self, batch: list[StepInput]) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError(f"model {self.name!r} is closed")
        if len(batch) > LIMIT_BATCH:
            raise ValueError(f"a step takes at most {LIMIT_BATCH} sequences, got {len(batch)}")
        ids = [item.seq_id for item in batch]
        if len(set(ids)) != len(ids):
            raise ValueError("a step lists the same seq_id twice")
        arrays = []
        total = 0
        for item in batch:
            tokens = np.asarray(item.tokens, dtype=np.int64)
            if tokens.ndim != 1 or tokens.size == 0:
                raise ValueError(f"sequence {item.seq_id}: tokens must be a non-empty list of token ids")
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise ValueError(f"sequence {item.seq_id}: token ids must be from 0 to {self.vocab_size - 1}")
            seq = self._seqs.get(item.seq_id)
            length = (seq.length if seq else 0) + tokens.size
            if length > self.context_tokens:
                raise ValueError(
                    f"sequence {item.seq_id} would hold {length} tokens, over the context of {self.context_tokens}"
                )
            total += tokens.size
            arrays.append(tokens)
        if total > LIMIT_STEP_TOKENS:
            raise ValueError(f"a step takes at most {LIMIT_STEP_TOKENS} tokens, got {total}")
        return arrays

    def _step(self, batch: list[StepInput]) -> np.ndarray:
        if not batch:
            return np.empty((0, self.vocab_size), np.float32)
        with self._books:
            arrays = self._check(batch)
            created = []
            work = []
            for item, tokens in zip(batch, arrays):
                seq = self._seqs.get(item.seq_id)
                if seq is None:
                    seq = self._seqs[item.seq_id] = _Seq(self._backend.new_sequence())
                    created.append(item.seq_id)
                work.append((item.seq_id, seq, tokens))
            self._in_step = {id(seq.handle) for _, seq, _ in work}
        try:
            logits = self._backend.forward([(seq.handle, seq.length, tokens) for _, seq, tokens in work])
        except BaseException:
            with self._books:
                for seq_id in created:  # a failed step leaves no new sequence behind
                    seq = self._seqs.pop(seq_id, None)
                    if seq is not None:
                        self._orphans.append(seq.handle)
            raise
        finally:
            with self._books:
                self._in_step = set()
                orphans, self._orphans = self._orphans, []
            for handle in orphans:
                self._backend.release(handle)
        with self._books:
            for seq_id, seq, tokens in work:
                if self._seqs.get(seq_id) is seq:  # not freed while the step ran
                    seq.length += tokens.size
                    assert seq.length <= self.context_tokens
        assert logits.shape == (len(batch), self.vocab_size) and logits.dtype == np.float32
        if self.tokenizer.vocab_size < self.vocab_size:
            logits[:, self.tokenizer.vocab_size :] = -np.inf  # ids no text maps to
        return logits


# -- loading ----------------------------------------------------------------------------------


def cuda_available() -> bool:
    """cupy is importable and sees a CUDA device (import cupy only here)."""
    try:
        import cupy  # noqa: PLC0415 - optional, and slow to import

        return bool(cupy.cuda.is_available())
    except Exception:  # ImportError, or a CUDA runtime that fails to initialise
        return False


def _resolve(backend: str, device: str) -> tuple[str, str]:
    if backend not in ("auto", *BACKENDS):
        raise KernelConfigError(f"backend: {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if device not in ("auto", *DEVICES):
        raise KernelConfigError(f"device: {device!r} is not one of auto, {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if backend == "cupy" or (backend == "auto" and cuda_available()) else "cpu"
    if device == "cuda" and not cuda_available():
        raise KernelConfigError(
            "device: cuda was asked for, but there is no CUDA device (cupy is not installed, "
            "or cupy.cuda.is_available() is False); install the [gpu] extra or use --device cpu"
        )
    if backend == "auto":
        backend = "cupy" if device == "cuda" else "numba"
    if (backend == "cupy") != (device == "cuda"):
        raise KernelConfigError(f"backend: {backend} does not run on device {device}")
    return backend, device


def _make_backend(backend: str, config: ModelConfig, weights: Weights) -> Backend:
    if backend == "numpy":
        from neuron.engines.kernel.numpy_ref import NumpyBackend

        return NumpyBackend(config, weights)
    if backend == "numba":
        try:
            from neuron.engines.kernel.numba_ops import NumbaBackend
        except ImportError as exc:
            raise KernelConfigError(f"backend: numba cannot be imported ({exc}); use --backend numpy") from None
        return NumbaBackend(config, weights)
    from neuron.engines.kernel.cupy_ops import CupyBackend

    return CupyBackend(config, weights)


def _load_parts(preset: str | None, path: str | None) -> tuple[str, ModelConfig, Weights, KernelTokenizer]:
    if (preset is None) == (path is None):
        raise KernelConfigError("model: give exactly one of a preset name or a checkpoint path")
    if preset is not None:
        config = preset_config(preset)
        tensors = preset_tensors(preset)
        where = dict.fromkeys(tensors, f"preset {preset}")
        weights = weights_from_tensors(config, tensors.__getitem__, where)
        assert preset in PRESET_SEEDS
        return preset, config, weights, preset_tokenizer(config)
    assert path is not None
    if not os.path.isdir(path):
        raise KernelConfigError(f"model path: {path} is not a directory")
    config = load_config(path)
    tokenizer = load_tokenizer(path, config_bos=config.bos_token_id, config_eos=config.eos_token_ids)
    if tokenizer.vocab_size > config.vocab_size:
        raise KernelConfigError(
            f"tokenizer.json: its vocabulary has {tokenizer.vocab_size} tokens, over config.json's "
            f"field 'vocab_size' ({config.vocab_size})"
        )
    weights = load_weights(path, config)
    return os.path.basename(os.path.normpath(path)), config, weights, tokenizer


def load_runner(*, preset: str | None = None, path: str | None = None, served_name: str | None = None,
                backend: str = "auto", device: str = "auto") -> ModelRunner:
    """Load a preset (built in memory) or an HF checkpoint directory onto a backend.

    backend "auto": cupy when the device resolves to cuda, else numba.
    device "auto": cuda when cupy imports and sees a device, else cpu.
    Every failure is a KernelConfigError naming the file and the field.
    """
    backend, device = _resolve(backend, device)
    name, config, weights, tokenizer = _load_parts(preset, path)
    return ModelRunner(name=served_name or name, config=config, tokenizer=tokenizer,
                       backend=_make_backend(backend, config, weights))


def _bytes_per_param(device: str) -> int:
    return 2 if device == "cuda" else 4  # fp16 on the GPU, fp32 on the CPU


def estimate_weight_bytes(*, preset: str | None = None, path: str | None = None, device: str = "cpu") -> int:
    """Bytes the weights will take on `device`, from config.json or the preset alone (cheap)."""
    if (preset is None) == (path is None):
        raise KernelConfigError("model: give exactly one of a preset name or a checkpoint path")
    config = preset_config(preset) if preset is not None else load_config(path)  # type: ignore[arg-type]
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    return config.param_count() * _bytes_per_param(device)


def kv_bytes_per_token(config: ModelConfig, device: str) -> int:
    """KV bytes one token of one sequence costs: fp32 on the CPU, fp16 on the GPU."""
    return 2 * config.num_hidden_layers * config.kv_dim * _bytes_per_param(device)
