"""Where a cold model goes, and what makes room for it. Pure.

Given what each neuron last reported (its memory and its models) and the
catalogue's residency hints, `place` decides where a model that is loaded
nowhere should be loaded, and which residents to unload first:

1. a neuron in the model's `pinned_on` list, if one can take it;
2. otherwise one with enough free memory now (the most free, so load
   spreads);
3. otherwise the neuron where evicting the fewest models, of the lowest
   priority, least recently used, makes room.

What may be evicted to make room, on one neuron:

* only models of lower or equal `residency_priority` than the incoming one;
* never one with requests in flight, or being loaded or unloaded;
* never one pinned on that neuron;
* least recently used first among equal priorities, and only as many as the
  fit needs (the caller re-checks the neuron's reported memory after each
  unload before it loads, so a stale view cannot overfill it).

A model that fits on no neuron even when empty is `Infeasible(never=True)`
(the client's 404); one that could fit once busy residents finish is
`Infeasible(never=False)` (a 503 with Retry-After).

No I/O and no clock: `last_used` times come in with the views.

`policy` is a seam for the simulator's benchmark only (scripts/bench_eviction.py):
"lru" (plain least-recently-used, priorities ignored) and "random" (a seeded
`rng`) choose the victims differently, under the same safety rules (never a
busy, pinned or transitional model). cortex itself always uses "cortex".
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field

Status = str  # "loading" | "ready" | "unloading"
SEARCH_SUBSETS_MAX = 5_000  # subsets of one neuron's residents searched for the cheapest eviction
POLICIES = ("cortex", "lru", "random")  # the last two: baselines for the simulator's benchmark only


@dataclass(frozen=True)
class Resident:
    """One model on one neuron, as the neuron reported it, plus what cortex knows."""

    model: str
    status: Status
    memory_bytes: int
    in_flight: int = 0  # cortex's requests on it right now
    last_used: float = 0.0  # cortex's clock; 0: never used since it was loaded
    priority: int = 100
    pinned_here: bool = False


@dataclass(frozen=True)
class NeuronView:
    url: str
    memory_total_bytes: int
    memory_free_bytes: int
    residents: tuple[Resident, ...] = ()
    healthy: bool = True

    def resident(self, model: str) -> Resident | None:
        return next((r for r in self.residents if r.model == model), None)


@dataclass(frozen=True)
class Wanted:
    model: str
    memory_bytes: int
    priority: int = 100
    pinned_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    url: str
    evict: tuple[str, ...] = ()  # to unload first, in this order
    reason: str = "free"  # "pinned" | "free" | "evict"


@dataclass(frozen=True)
class Infeasible:
    message: str
    never: bool  # True: no neuron could ever hold it; False: not now (residents are busy)


@dataclass(frozen=True)
class _Option:
    view: NeuronView
    evict: tuple[Resident, ...] = field(default=())

    def cost(self) -> tuple[int, int, float, int]:
        """Fewest evictions, then lowest priorities, then least recently used, then most free."""
        return (
            len(self.evict),
            sum(r.priority for r in self.evict),
            max((r.last_used for r in self.evict), default=0.0),
            -self.view.memory_free_bytes,
        )


def evictable(view: NeuronView, wanted: Wanted) -> list[Resident]:
    """The residents that may make room for `wanted`, in the order they should go."""
    candidates = [
        r for r in view.residents
        if r.status == "ready" and r.in_flight == 0 and not r.pinned_here and r.priority <= wanted.priority
        and r.model != wanted.model
    ]
    return sorted(candidates, key=lambda r: (r.priority, r.last_used, r.model))


def room(view: NeuronView, wanted: Wanted) -> _Option | None:
    """How `wanted` fits on `view`: as is, or after the fewest evictions; None if it cannot now."""
    need = wanted.memory_bytes - view.memory_free_bytes
    if need <= 0:
        return _Option(view)
    victims = fewest_evictions(evictable(view, wanted), need)
    return None if victims is None else _Option(view, victims)


def fewest_evictions(pool: list[Resident], need_bytes: int) -> tuple[Resident, ...] | None:
    """The fewest residents of `pool` freeing `need_bytes`, of the lowest priorities and least
    recently used among those; in `pool`'s order (the order to unload them). None: impossible."""
    largest = sorted((r.memory_bytes for r in pool), reverse=True)
    count, freed = 0, 0
    while freed < need_bytes and count < len(largest):
        freed += largest[count]
        count += 1
    if freed < need_bytes:
        return None
    if math.comb(len(pool), count) <= SEARCH_SUBSETS_MAX:
        fits = (c for c in itertools.combinations(pool, count) if sum(r.memory_bytes for r in c) >= need_bytes)
        return min(fits, key=lambda c: (sum(r.priority for r in c), max(r.last_used for r in c)))
    # Too many residents to search: the largest that fit, taken in eviction order. Still the fewest.
    chosen = sorted(pool, key=lambda r: -r.memory_bytes)[:count]
    return tuple(r for r in pool if r in chosen)


def feasible_on(views: list[NeuronView], wanted: Wanted) -> list[str]:
    """Neurons that could hold the model at all (if emptied of everything but their pins)."""
    out = []
    for view in views:
        pinned = sum(r.memory_bytes for r in view.residents if r.pinned_here and r.model != wanted.model)
        if view.healthy and view.memory_total_bytes - pinned >= wanted.memory_bytes:
            out.append(view.url)
    return out


def place(
    views: list[NeuronView], wanted: Wanted, policy: str = "cortex", rng: random.Random | None = None,
) -> Plan | Infeasible:
    assert wanted.memory_bytes >= 0
    assert policy in POLICIES and (policy != "random" or rng is not None)
    healthy = [v for v in views if v.healthy]
    # Never: on no neuron even if every one were up (a neuron that is down is judged by its last report).
    if not feasible_on([dataclasses.replace(v, healthy=True) for v in views], wanted):
        biggest = max((v.memory_total_bytes for v in views), default=0)
        return Infeasible(
            f"The model `{wanted.model}` needs {_mib(wanted.memory_bytes)} MiB and fits on no neuron "
            f"(the largest has {_mib(biggest)} MiB).", never=True,
        )
    if not feasible_on(healthy, wanted):
        return Infeasible(f"No neuron that could hold `{wanted.model}` is healthy now.", never=False)
    for view in healthy:  # already there, or on its way: nothing to evict, the load joins it
        resident = view.resident(wanted.model)
        if resident is not None and resident.status in ("ready", "loading"):
            return Plan(view.url, (), "resident")
    pinned = [v for v in healthy if v.url in wanted.pinned_on]
    for group, reason in ((pinned, "pinned"), (healthy, None)):
        if policy == "cortex":
            options = [o for o in (room(v, wanted) for v in group) if o is not None]
            best = min(options, key=_Option.cost) if options else None
        else:
            best = _baseline(group, wanted, policy, rng)
        if best is not None:
            return Plan(best.view.url, tuple(r.model for r in best.evict), reason or ("evict" if best.evict else "free"))
    return Infeasible(
        f"No neuron has room for `{wanted.model}` now: the models that would make room are busy or of "
        "higher priority.", never=False,
    )


def _baseline(group: list[NeuronView], wanted: Wanted, policy: str, rng: random.Random | None) -> _Option | None:
    """The benchmark's baselines: free room first (as cortex), else victims taken in LRU or random
    order until the model fits, on the neuron with the oldest victims (lru) or a random one."""
    options = []
    for view in group:
        need = wanted.memory_bytes - view.memory_free_bytes
        if need <= 0:
            options.append(_Option(view))
            continue
        pool = sorted((r for r in view.residents if r.status == "ready" and r.in_flight == 0 and not r.pinned_here
                       and r.model != wanted.model), key=lambda r: (r.last_used, r.model))
        if policy == "random":
            assert rng is not None
            rng.shuffle(pool)
        victims: list[Resident] = []
        while need > 0 and pool:
            victims.append(pool.pop(0))
            need -= victims[-1].memory_bytes
        if need <= 0:
            options.append(_Option(view, tuple(victims)))
    free = [o for o in options if not o.evict]
    if free or not options:
        return min(free, key=_Option.cost) if free else None
    if policy == "random":
        assert rng is not None
        return rng.choice(options)
    return min(options, key=lambda o: (max(r.last_used for r in o.evict), len(o.evict), -o.view.memory_free_bytes))


def _mib(n: int) -> int:
    return -(-n // 2**20)
