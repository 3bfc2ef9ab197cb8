"""Token sampling: greedy, or seeded temperature / top-k / top-p.

A Sampler owns one request's random stream: PCG64 seeded with the
request's `seed` (or the engine's `fallback_seed`), one uniform draw per
sampled token. Candidates are ordered by (logit descending, id ascending)
before the draw, so the choice is a pure function of the seed and the
logits seen, independent of how the backend laid them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K_MAX = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be from 0 to 100, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be above 0 and at most 1, got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= TOP_K_MAX):
            raise ValueError(f"top_k must be from 0 to {TOP_K_MAX}, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def greedy(logits: np.ndarray) -> int:
    """The first id with the largest logit."""
    return int(np.argmax(logits))


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities) that may be drawn, most likely first, probabilities summing to 1."""
    x = np.asarray(logits, dtype=np.float64)
    vocab = x.shape[0]
    if params.top_k and params.top_k < vocab:
        # argpartition is not stable: take everything tied with the k-th logit, then cut after ordering.
        kth = np.partition(x, vocab - params.top_k)[vocab - params.top_k]
        ids = np.flatnonzero(x >= kth)
    else:
        ids = np.flatnonzero(x > -np.inf)
    order = np.lexsort((ids, -x[ids]))  # logit descending, then id ascending
    ids = ids[order]
    if params.top_k:
        ids = ids[: params.top_k]
    scaled = x[ids] / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if params.top_p < 1:
        # The smallest prefix whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p, side="left")) + 1
        ids, probs = ids[:keep], probs[:keep]
        probs = probs / probs.sum()
    return ids, probs


class Sampler:
    """One request's sampler: deterministic for a given seed and sequence of logits."""

    def __init__(self, params: SamplingParams, fallback_seed: int) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else fallback_seed
        self._rng = np.random.Generator(np.random.PCG64(seed % (1 << 128)))

    def sample(self, logits: np.ndarray) -> int:
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"logits must be one non-empty row, got shape {logits.shape}")
        if np.isnan(logits).any():
            raise ValueError("logits contain NaN")
        if not np.isfinite(logits).any():
            raise ValueError("logits are all infinite")
        if self.params.greedy:
            return greedy(logits)
        if np.isposinf(logits).any():
            return int(np.flatnonzero(np.isposinf(logits))[0])  # certain: no draw needed
        ids, probs = candidates(logits, self.params)
        u = self._rng.random()
        index = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(ids[min(index, len(ids) - 1)])  # rounding can leave the last cumsum a hair below 1
