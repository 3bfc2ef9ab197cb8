"""Placement of cold models: pins, free memory, the fewest low-priority LRU evictions; never a busy or pinned one."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.fleet.placement import Infeasible, NeuronView, Plan, Resident, Wanted, evictable, place

GIB = 2**30


def _view(url: str, total_gib: int, *residents: Resident, free_gib: float | None = None) -> NeuronView:
    used = sum(r.memory_bytes for r in residents)
    free = total_gib * GIB - used if free_gib is None else int(free_gib * GIB)
    return NeuronView(url, total_gib * GIB, free, residents)


def _r(model: str, gib: int, **kw) -> Resident:
    return Resident(model, kw.pop("status", "ready"), gib * GIB, **kw)


def test_a_pinned_neuron_wins_even_when_another_has_more_room():
    views = [_view("a", 80), _view("b", 80, _r("x", 40))]
    assert place(views, Wanted("m", 20 * GIB, pinned_on=("b",))) == Plan("b", (), "pinned")


def test_free_memory_is_used_before_anything_is_evicted_and_the_most_free_wins():
    views = [_view("a", 80, _r("x", 70)), _view("b", 80, _r("y", 30)), _view("c", 80, _r("z", 10))]
    assert place(views, Wanted("m", 20 * GIB)) == Plan("c", (), "free")


def test_the_fewest_lowest_priority_least_recently_used_models_are_evicted():
    a = _view("a", 80, _r("a1", 30, priority=50, last_used=5), _r("a2", 30, priority=50, last_used=1), free_gib=20)
    b = _view("b", 80, _r("b1", 20, priority=10, last_used=9), _r("b2", 20, priority=10, last_used=8),
              _r("b3", 20, priority=10, last_used=7), free_gib=20)
    # a needs one eviction (30 + 20 free >= 40), b needs one too (20 + 20 >= 40), at lower priority: b.
    assert place([a, b], Wanted("m", 40 * GIB)) == Plan("b", ("b3",), "evict")
    # Needing 50: a evicts its LRU one (a2), b would need two.
    assert place([a, b], Wanted("m", 50 * GIB)) == Plan("a", ("a2",), "evict")


def test_one_big_eviction_beats_two_small_ones_even_if_they_are_older():
    view = _view("a", 21, _r("big", 19, priority=10, last_used=9), _r("small", 1, priority=10, last_used=0),
                 _r("tiny", 1, priority=10, last_used=0), free_gib=0)
    assert place([view], Wanted("m", 2 * GIB, priority=10)) == Plan("a", ("big",), "evict")


def test_busy_pinned_higher_priority_and_transitional_models_are_never_evicted():
    view = _view(
        "a", 80, _r("busy", 20, in_flight=1), _r("pinned", 20, pinned_here=True), _r("vip", 20, priority=500),
        _r("loading", 10, status="loading"), free_gib=10,
    )
    assert evictable(view, Wanted("m", 0, priority=100)) == []
    result = place([view], Wanted("m", 30 * GIB, priority=100))
    assert isinstance(result, Infeasible) and not result.never  # it would fit once they finish


def test_a_model_bigger_than_every_neuron_is_never_feasible():
    result = place([_view("a", 80), _view("b", 40)], Wanted("huge", 100 * GIB))
    assert isinstance(result, Infeasible) and result.never and "fits on no neuron" in result.message


def test_pins_of_other_models_count_against_feasibility():
    view = _view("a", 80, _r("p", 60, pinned_here=True))
    assert isinstance(place([view], Wanted("m", 30 * GIB)), Infeasible)
    assert place([view], Wanted("m", 20 * GIB)) == Plan("a", (), "free")


def test_an_unhealthy_neuron_is_never_chosen():
    views = [NeuronView("a", 80 * GIB, 80 * GIB, (), healthy=False), _view("b", 80, _r("x", 70))]
    assert place(views, Wanted("m", 20 * GIB)) == Plan("b", ("x",), "evict")


residents = st.builds(
    Resident,
    model=st.sampled_from([f"r{i}" for i in range(6)]),
    status=st.sampled_from(["ready", "ready", "ready", "loading", "unloading"]),
    memory_bytes=st.integers(1, 40).map(lambda g: g * GIB),
    in_flight=st.sampled_from([0, 0, 0, 2]),
    last_used=st.floats(0, 100),
    priority=st.sampled_from([10, 100, 500]),
    pinned_here=st.booleans(),
)


@st.composite
def fleets(draw):
    views = []
    for i in range(draw(st.integers(1, 4))):
        rs = {r.model: r for r in draw(st.lists(residents, max_size=5))}.values()
        total = draw(st.integers(20, 120)) * GIB
        used = sum(r.memory_bytes for r in rs)
        views.append(NeuronView(f"n{i}", max(total, used), max(total, used) - used, tuple(rs)))
    return views


@settings(max_examples=300, deadline=None)
@given(fleets(), st.integers(1, 100), st.sampled_from([10, 100, 500]))
def test_a_plan_fits_evicts_only_what_may_go_and_no_neuron_needs_fewer_evictions(views, gib, priority):
    wanted = Wanted("m", gib * GIB, priority)
    result = place(views, wanted)
    if isinstance(result, Infeasible):
        for view in views:  # truly no room anywhere, even evicting every evictable model
            assert view.memory_free_bytes + sum(r.memory_bytes for r in evictable(view, wanted)) < wanted.memory_bytes
        return
    view = next(v for v in views if v.url == result.url)
    allowed = {r.model for r in evictable(view, wanted)}
    assert set(result.evict) <= allowed
    freed = sum(view.resident(m).memory_bytes for m in result.evict)
    assert view.memory_free_bytes + freed >= wanted.memory_bytes
    for model in result.evict:  # only as many as needed: without any one of them it would not fit
        assert view.memory_free_bytes + freed - view.resident(model).memory_bytes < wanted.memory_bytes
    for other in views:  # no neuron could have done it with fewer evictions
        pool = evictable(other, wanted)
        for k in range(len(result.evict)):
            for subset in itertools.combinations(pool, k):
                assert other.memory_free_bytes + sum(r.memory_bytes for r in subset) < wanted.memory_bytes


def test_a_neuron_that_is_down_makes_a_model_wait_not_vanish():
    down = NeuronView("a", 80 * GIB, 80 * GIB, (), healthy=False)
    result = place([down], Wanted("m", 20 * GIB))
    assert isinstance(result, Infeasible) and not result.never  # a 503 with Retry-After, not a 404
    assert place([down], Wanted("huge", 100 * GIB)).never  # bigger than any neuron ever is


def test_a_model_already_resident_or_loading_is_joined_without_evicting_anyone():
    for status in ("ready", "loading"):
        view = _view("a", 40, _r("m", 20, status=status), _r("other", 20), free_gib=0)
        assert place([view], Wanted("m", 20 * GIB)) == Plan("a", (), "resident")
