"""The cross-replica admission protocol on PostgreSQL: design (a) of issue 13, one batch per round trip.

Many cortex replicas share one PostgreSQL ledger. Each replica has one
writer thread (as store.py's) owning one connection and one `PgLedger`; it
drains the reserves, extensions and resolutions its Trio tasks queued and
hands them to `step` (or `reserve_batch` / `extend_batch` / `resolve_batch`),
which is ONE statement, hence ONE transaction and ONE round trip:
`SELECT ... FROM cortex_batch(arrays)`, a PL/pgSQL function created by
migration step 2 and extended by step 3 (cortex/budget/pg_schema.py); one
request's batch goes to its straight-line twin `cortex_batch_one` (step 5).
The database is the authority: the caps, the held amounts and the usage are
rows, and the function judges every request against them under row locks.
The pure ledger's arithmetic and messages are mirrored (and the messages
reused: `ledger._balance_refusal` and friends build every Refusal here).

Why `spent + held <= cap` holds across replicas (for every cap kind)
-------------------------------------------------------------------
State. Each principal (a key, an account) is one row with its caps and its
`spent_*`, `held_*`, `in_flight`, the current period's `period_used_*`;
window usage is in `usage_buckets` rows of that principal; holds are rows.

Locks and their order. A `cortex_batch` transaction, in this order:
  1. locks the open holds it resolves or extends, together, `ORDER BY id
     FOR UPDATE`;
  2. locks every account its holds and reserves touch, `ORDER BY id FOR UPDATE`;
  3. locks every key likewise;
  then reads those rows and those principals' buckets, decides, and writes
  the holds, the buckets and the principal rows, and commits (autocommit:
  the statement is the transaction). `cortex_reap` locks holds (id order,
  SKIP LOCKED) and then runs the same function; `cortex_heartbeat` locks only
  holds, in id order. So every transaction takes row locks in one global
  order, holds < accounts < keys, each by id, and never waits for a lock
  earlier in that order than one it holds: no cycle of waits, no deadlock.
  (A new hold row is an INSERT of a fresh id: it waits on nothing unless two
  replicas insert the same id, which hold ids, uuids, rule out.)

No lost update. Every write to a principal's `held_*`, `spent_*`,
`in_flight`, `period_*` and to its buckets is made by a transaction that
holds that principal's row lock from before it read them until it commits;
every write to an open hold's amounts or state, by one that holds the
hold's row lock (step 1) from before it read them.
Row locks are exclusive, so the transactions touching a principal are
serialised by it; under READ COMMITTED each statement inside the function
reads after the lock was granted, so it sees everything its predecessors
committed. A principal's history is therefore a serial sequence of batches,
each reading the true state.

The invariant, by induction over that sequence. A reserve is placed only if,
on the key AND on its account, for every cap present,
    balance:  spent + held + amount <= cap
    window:   window_usage + held + amount <= cap
    period:   period_used + held + amount <= cap
    concurrency: in_flight + 1 <= max_concurrency
against the state left by every request before it in the batch (judged in
order, in memory, under the locks); then `held += amount` on both, or on
neither (a request fits everywhere or takes nothing). An extension of an
open hold by `extra` is judged the same way, in the same loop, after the
batch's resolutions and ahead of its reserves: granted only if, on the key
AND on its account, for every amount cap, `used + held + extra <= cap`
against the state left by every item before it; then `held += extra` on
both AND `amount += extra` on the hold row, or nothing anywhere. It leaves
`in_flight` alone (the request is in flight already), so it is not judged
against `max_concurrency`: what does not change `in_flight` cannot break
`in_flight <= max_concurrency`. An extension of a hold that is not open
(unknown, resolved before, or resolved earlier in the same batch) changes
nothing and reports None. So every batch keeps each principal's `held`
equal to the sum of its open holds' amounts. A resolution reads the hold's
amount under the hold's row lock (a lock granted after an extension
committed returns the grown row), takes `held -= amount` and adds `charged
<= amount` (`LEAST(actual, amount)` in SQL) to spent, the period and the
window: `spent + held` cannot grow. The write-back re-checks in SQL, on the
locked row, every amount cap of each principal whose holds grew (by a
reserve or an extension) and the concurrency cap of each whose `in_flight`
grew (by a reserve): the conditional UPDATE `... WHERE spent + held <= cap
...`. It writes a grown hold only while it is open and no smaller than it
was when locked. If any of those would not hold it raises, so a bug in the
judging aborts the batch instead of committing an overshoot. (The
concurrency guard is left off for extensions because an admin may have
lowered `max_concurrency` below `in_flight`. That must refuse new
requests, not abort a batch that only grows the holds of admitted ones.)
One request's batch. At most one resolution and one reserve (no
extension), the usual batch at low concurrency, go to `cortex_batch_one`
(migration 5) as scalars. It takes the same locks in the same order (the
hold, then the key's account, then the key), judges with the same rules
(the per-cap tests above, without the arrays), and writes back with the same
guard. It judges only what it can without them: one key whose key and
account have no window and whose periods need no roll-over. For anything
else (two keys, a window, a period to roll or re-sum) it calls
cortex_batch_small while holding the locks it took. Those are exactly the
ones the general function takes first (two keys are sent on before any
principal is locked), so the general function waits on no new lock, and
the order above still stands. tests/test_pg_ledger.py runs both on random
steps and finds the same answers and the same rows.
Exactly-once resolution: a hold leaves `open` only through `UPDATE holds
... WHERE state = 'open'` under its row lock, so two reapers, or a reaper
and a late settlement, cannot both resolve it; the loser sees a hold no
longer open and reports False.

Windows, conservatively. A window of `window_s` keeps its usage in buckets
of `window_s / 64` seconds: a charge at `t` is added to the bucket
`[floor(t / b) * b, +b)` (its `bucket_end >= t`). The ageing rule: a bucket
counts while `bucket_end > now - window_s` and ages out only once its END
has left the window. Every charge in it happened at or before its end, so a
bucket never ages out before any charge in it would have: usage is never
under-counted, and over-counted by at most the oldest bucket's share.
Retry-After is when enough buckets' ends leave the window for the request
to fit (`cortex_window_wait`), None when holds rather than usage are in the
way, as in the pure ledger. A principal's buckets carry the `window_s` they
were built for (`buckets_window_s`); when the window changes (or appears,
or the ledger was imported) they are rebuilt from the resolved holds, as
SQLite rebuilds a grown window from its history.

Periods. Each principal row keeps `period_start`, `period_end`,
`period_spec` and `period_used_*`. The first batch at or past `period_end`
rolls it over (usage zero by construction), computed in SQL by
`cortex_period_bounds`, a port of periods.py's `period_bounds` (checked
against it by the tests, DST gaps and folds included). When the spec
changed, or was never computed (an import, a new cap), the period's usage
is summed from the holds resolved in it. A charge counts in the period in
which it is resolved, as in the pure ledger. A period never rolls back: a
replica whose clock lags charges into the row's (newer) period.

Replica crash. Every hold carries `replica_id` and `lease_deadline = now +
lease_s`; `heartbeat` extends the lease of this replica's open holds.
`reap`, run by any replica, orphans other replicas' open holds whose lease
has passed, charged in full (what SQLite's recovery does at start-up);
`reap_one_by_one` does the same a hold per transaction, stepping past one
that cannot be resolved (`cortex_reap`'s four-argument form, migration 5).

Cost, linear in the batch. `cortex_batch` does every per-item lookup set-
based (`unnest(...) WITH ORDINALITY`, hash-joined once per batch) or as an
O(1) subscript of an array indexed by input position or by principal; no
array is searched, or grown by appending, inside a per-item loop. Holds are
found by primary key (one probe per id, in id order for the locks) and
updated by the ctid of the locked version, never by scanning the partial
indexes on open holds (whose dead entries grow with the history until a
vacuum). An extension finds its locked hold by a hash join of the
extension ids with the locked holds (once per batch), and its hold's
amounts are O(1) subscripts of the locked holds' arrays, grown in place
and written back by ctid. The one per-item loop is the in-order judging of
the extensions and then the reserves; its fast path compares each item
with the room its key's and account's caps leave, `min over caps of (cap -
used) - held`, which is the per-cap test `used + held + amount <= cap`
rearranged (exact, in integers), and only an item that fails it takes the
per-cap path that builds the refusal's details. The arrays travel in
psycopg's binary format.

Clocks. Every method takes `now` (seconds), for tests and the simulator;
`now=None` uses the database's clock, one clock for all replicas, which is
what the request path should pass: windows and periods then do not move
with any replica's clock skew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import psycopg

from cortex.budget import ledger as pure
from cortex.budget.ledger import Caps, Hold, Principal, Refusal
from cortex.budget.periods import PeriodSpec

BATCH_MAX = 4096  # reserves, extensions, and resolutions, per statement
REAP_BATCH_MAX = 1024  # holds one reap resolves at most
RESOLUTION_STATES = ("settled", "released", "expired")
EXTRA_REASONS = ("unknown", "revoked", "duplicate")  # beyond the pure ledger's: the database also knows these

# The arrays travel in binary (%b): psycopg's text-format array dumper quotes every element through a
# regular expression, which cost more per request than the database's own work on a large batch.
_BATCH_SQL = (
    "SELECT o_part, o_idx, o_ok, o_tokens, o_usd, o_detail, o_account, o_now, o_key, o_created_at, o_expires_at,"
    " o_request_id FROM cortex_batch("
    "%b::text[], %b::text[], %b::bigint[], %b::bigint[], "
    "%b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::float8[], %b::text[], %b::text[], %b::text[], "
    "%s::float8, %s::text, %s::float8, %b::text[], %b::bigint[], %b::bigint[])"
)
# A batch this small runs on generic plans (migration 4's twin): see pg_schema.py.
SMALL_BATCH_MAX = 16
_BATCH_SMALL_SQL = _BATCH_SQL.replace(" FROM cortex_batch(", " FROM cortex_batch_small(")
# At most one resolution and one reserve (one request's batch at low concurrency), as scalars: migration 5.
_BATCH_ONE_SQL = (
    "SELECT o_part, o_idx, o_ok, o_tokens, o_usd, o_detail, o_account, o_now, o_key, o_created_at, o_expires_at,"
    " o_request_id FROM cortex_batch_one(%s::text, %s::text, %s::bigint, %s::bigint, %s::text, %s::text, %s::bigint,"
    " %s::bigint, %s::float8, %s::text, %s::text, %s::text, %s::float8, %s::text, %s::float8)"
)
_REAP_SQL = "SELECT o_id, o_tokens, o_usd FROM cortex_reap(%s::float8, %s::text, %s::integer)"
# What the batch raises for an item it cannot take (its own checks, a value out of range): not transient.
UNRESOLVABLE_ERRORS = (psycopg.errors.RaiseException, psycopg.errors.DataException, psycopg.errors.IntegrityError)
_REAP_AFTER_SQL = "SELECT o_id, o_tokens, o_usd FROM cortex_reap(%s::float8, %s::text, %s::integer, %s::text)"
_NEXT_ORPHAN_SQL = (
    "SELECT id FROM holds WHERE state = 'open' AND replica_id <> %s AND id > %s"
    " AND lease_deadline < COALESCE(%s::float8, extract(epoch FROM clock_timestamp())) ORDER BY id LIMIT 1"
)
_HEARTBEAT_SQL = "SELECT cortex_heartbeat(%s::text, %s::float8, %s::float8)"


@dataclass(frozen=True)
class Reserve:
    """A request's hold: its id (a uuid), its key (and so its account), its worst-case amounts and lifetime."""

    hold_id: str
    key_id: str
    amount_tokens: int
    ttl_s: float
    amount_usd: int = 0  # micro-USD
    request_id: str | None = None
    model: str | None = None
    client_request_id: str | None = None

    def __post_init__(self) -> None:
        assert self.amount_tokens >= 0 and self.amount_usd >= 0 and self.ttl_s > 0


@dataclass(frozen=True)
class Resolve:
    """How a hold ends: settled to actual usage (capped at the hold), released (no charge) or expired (in full)."""

    hold_id: str
    state: str = "settled"
    actual_tokens: int = 0
    actual_usd: int = 0

    def __post_init__(self) -> None:
        assert self.state in RESOLUTION_STATES and self.actual_tokens >= 0 and self.actual_usd >= 0


@dataclass(frozen=True)
class Extend:
    """An open hold's next slice: grow it by these amounts if every amount cap of its key and account allows."""

    hold_id: str
    amount_tokens: int
    amount_usd: int = 0  # micro-USD

    def __post_init__(self) -> None:
        assert self.amount_tokens >= 0 and self.amount_usd >= 0


@dataclass
class Counters:
    """What the ledger cost the database: for the benchmark's per-request figures."""

    transactions: int = 0
    round_trips: int = 0
    reserves: int = 0
    admitted: int = 0
    resolutions: int = 0
    extensions: int = 0
    extended: int = 0  # extensions granted


class PgLedger:
    """One replica's side of the shared ledger: called from its one writer thread, never concurrently."""

    def __init__(self, conn: psycopg.Connection[Any], replica_id: str, lease_s: float) -> None:
        # Autocommit: one statement is one transaction, with no BEGIN or COMMIT round trip of its own.
        assert conn.autocommit, "PgLedger needs an autocommit connection (pg_schema.connect gives one)"
        assert replica_id and lease_s > 0
        self.conn = conn
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.counters = Counters()

    # --- the batch ------------------------------------------------------------------------

    @overload
    def step(
        self, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float | None
    ) -> tuple[list[bool], list[Hold | Refusal]]: ...

    @overload
    def step(
        self, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float | None,
        extensions: Sequence[Extend],
    ) -> tuple[list[bool], list[Hold | Refusal], list[Hold | Refusal | None]]: ...

    def step(
        self, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float | None,
        extensions: Sequence[Extend] | None = None,
    ) -> tuple[list[bool], list[Hold | Refusal]] | tuple[list[bool], list[Hold | Refusal], list[Hold | Refusal | None]]:
        """Resolve, then extend, then reserve, in ONE transaction and ONE round trip: one group commit.

        Resolutions go first, so the room they free is there for the others;
        then the extensions (a started response's next slice goes ahead of new
        admissions), then the reserves, each judged after those before it. A
        resolution is True when it resolved the hold, False when the hold was no
        longer open (settled, released, reaped) or unknown: a second resolution
        does nothing. An extension is the Hold with its grown amounts, the
        Refusal a reserve of the extra amounts would get (concurrency aside), or
        None when the hold is not open (unknown, already resolved, or resolved
        by this very step): then nothing changed.

        Returns (resolved, placed) when `extensions` is not given (the callers
        of before incremental holds), (resolved, placed, extended) when it is.
        """
        exts = () if extensions is None else extensions
        assert len(resolutions) <= BATCH_MAX and len(reserves) <= BATCH_MAX and len(exts) <= BATCH_MAX
        resolved: list[bool | None] = [None] * len(resolutions)
        placed: list[Hold | Refusal | None] = [None] * len(reserves)
        extended: list[Hold | Refusal | None] = [None] * len(exts)
        if resolutions or reserves or exts:
            answered = [False] * len(exts)
            if len(resolutions) <= 1 and len(reserves) <= 1 and not exts:
                sent = (_BATCH_ONE_SQL, self.one_params(resolutions, reserves, now))
            elif len(resolutions) + len(reserves) + len(exts) <= SMALL_BATCH_MAX:
                sent = (_BATCH_SMALL_SQL, self.batch_params(resolutions, reserves, now, exts))
            else:
                sent = (_BATCH_SQL, self.batch_params(resolutions, reserves, now, exts))
            for part, idx, ok, tokens, usd, detail, account_id, judged_at, key_id, created, expires, request_id in (
                self._execute(*sent)
            ):
                if part == "resolve":
                    resolved[idx - 1] = bool(ok)
                elif part == "reserve":
                    q = reserves[idx - 1]
                    placed[idx - 1] = _hold(q, account_id, judged_at) if ok else _refusal(detail, judged_at)
                else:
                    assert part == "extend", part
                    answered[idx - 1] = True
                    if ok:
                        extended[idx - 1] = Hold(exts[idx - 1].hold_id, key_id, account_id, int(tokens), created,
                                                 expires, request_id, amount_usd=int(usd))
                    elif detail is not None:
                        extended[idx - 1] = _refusal(detail, judged_at)
            assert None not in resolved and None not in placed and all(answered), (
                "cortex_batch answered every request exactly once")
        self.counters.reserves += len(reserves)
        self.counters.admitted += sum(isinstance(p, Hold) for p in placed)
        self.counters.resolutions += len(resolutions)
        self.counters.extensions += len(exts)
        self.counters.extended += sum(isinstance(e, Hold) for e in extended)
        if extensions is None:
            return resolved, placed  # type: ignore[return-value]
        return resolved, placed, extended  # type: ignore[return-value]

    def batch_params(
        self, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float | None,
        extensions: Sequence[Extend] = (),
    ) -> tuple[Any, ...]:
        """The parameters of `_BATCH_SQL` for one step (scripts/bench_pg_ledger.py times the statement with them)."""
        return (
            [r.hold_id for r in resolutions], [r.state for r in resolutions],
            [r.actual_tokens for r in resolutions], [r.actual_usd for r in resolutions],
            [q.hold_id for q in reserves], [q.key_id for q in reserves], [q.amount_tokens for q in reserves],
            [q.amount_usd for q in reserves], [float(q.ttl_s) for q in reserves], [q.request_id for q in reserves],
            [q.model for q in reserves], [q.client_request_id for q in reserves],
            now, self.replica_id, float(self.lease_s),
            [e.hold_id for e in extensions], [e.amount_tokens for e in extensions], [e.amount_usd for e in extensions],
        )

    def one_params(self, resolutions: Sequence[Resolve], reserves: Sequence[Reserve], now: float | None) -> tuple[Any, ...]:
        """The parameters of `_BATCH_ONE_SQL`: at most one resolution and one reserve (NULLs for one absent)."""
        r = resolutions[0] if resolutions else None
        q = reserves[0] if reserves else None
        return (
            *((r.hold_id, r.state, r.actual_tokens, r.actual_usd) if r else (None,) * 4),
            *((q.hold_id, q.key_id, q.amount_tokens, q.amount_usd, float(q.ttl_s), q.request_id, q.model,
               q.client_request_id) if q else (None,) * 8),
            now, self.replica_id, float(self.lease_s),
        )

    def reserve_batch(self, requests: Sequence[Reserve], now: float | None) -> list[Hold | Refusal]:
        return self.step((), requests, now)[1]

    def extend_batch(self, extensions: Sequence[Extend], now: float | None) -> list[Hold | Refusal | None]:
        return self.step((), (), now, extensions)[2]

    def resolve_batch(self, resolutions: Sequence[Resolve], now: float | None) -> list[bool]:
        return self.step(resolutions, (), now)[0]

    # --- crashes --------------------------------------------------------------------------

    def reap(self, now: float | None, limit: int = REAP_BATCH_MAX) -> list[str]:
        """Orphan other replicas' open holds whose lease has passed, charged in full; their ids, sorted."""
        assert 0 < limit <= REAP_BATCH_MAX
        rows = self._execute(_REAP_SQL, (now, self.replica_id, limit))
        return sorted(r[0] for r in rows)

    def reap_one_by_one(self, now: float | None, limit: int = REAP_BATCH_MAX) -> tuple[list[str], dict[str, str]]:
        """`reap`, one hold per transaction, stepping past any that cannot be resolved: (reaped, {id: why not}).

        For when a whole `reap` failed: one bad hold must not keep every other orphan open."""
        reaped: list[str] = []
        failed: dict[str, str] = {}
        after = ""
        for _ in range(limit):
            rows = self._execute(_NEXT_ORPHAN_SQL, (self.replica_id, after, now))
            if not rows:
                break
            candidate = rows[0][0]
            try:
                reaped += [r[0] for r in self._execute(_REAP_AFTER_SQL, (now, self.replica_id, 1, after))]
            except UNRESOLVABLE_ERRORS as exc:
                failed[candidate] = str(exc.diag.message_primary or exc)
            after = candidate
        return sorted(reaped), failed

    def heartbeat(self, now: float | None) -> int:
        """Extend this replica's open holds' leases to now + lease_s; how many there are."""
        return int(self._execute(_HEARTBEAT_SQL, (self.replica_id, now, float(self.lease_s)))[0][0])

    # --- plumbing -------------------------------------------------------------------------

    def _execute(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self.counters.transactions += 1
        self.counters.round_trips += 1
        return self.conn.execute(query, params).fetchall()


def _hold(q: Reserve, account_id: str, now: float) -> Hold:
    return Hold(q.hold_id, q.key_id, account_id, q.amount_tokens, now, now + q.ttl_s, q.request_id, amount_usd=q.amount_usd)


# --- refusals: the pure ledger's reasons, choice and messages --------------------------------


def _refusal(detail: list[dict[str, Any]], now: float) -> Refusal:
    refusals = [_one_refusal(d, now) for d in detail]
    assert refusals
    for r in refusals:  # a spent balance is final; otherwise wait for the slowest cap (ledger._refusal)
        if r.reason == "balance" or r.reason in EXTRA_REASONS:
            return r
    never = [r for r in refusals if r.never_fits]
    if never:
        return never[0]
    if any(r.retry_after_s is None for r in refusals):
        return next(r for r in refusals if r.retry_after_s is None)
    return max(refusals, key=lambda r: r.retry_after_s or 0.0)


def _one_refusal(d: dict[str, Any], now: float) -> Refusal:
    reason, kind, pid = d["reason"], d["kind"], d["id"]
    who = f"{kind} {pid}"
    if reason in EXTRA_REASONS:
        text = {"unknown": "is not in the ledger", "revoked": "has been revoked", "duplicate": "already has this hold id"}
        return Refusal(reason, kind, pid, f"The {who} {text[reason]}.", None, True)
    if reason == "concurrency":
        limit = int(d["limit"])
        message = f"Concurrency limit of {limit} requests in flight reached for {who}."
        return Refusal("concurrency", kind, pid, message, None, limit == 0)
    unit, limit, used = d["unit"], int(d["limit"]), int(d["used"])
    amount = pure._Amount(unit, int(d["asked"]), int(d["held"]))
    if reason == "balance":
        return pure._balance_refusal(Principal(pid, kind, Caps()), who, limit, used, amount)
    if reason == "window":
        caps = Caps(window_tokens=limit, window_s=float(d["window_s"]))
        wait_s = None if d["wait_s"] is None else float(d["wait_s"])
        return pure._window_refusal(Principal(pid, kind, caps), who, limit, used, int(d["excess"]), amount, wait_s)
    assert reason == "period", reason
    caps = Caps(period=PeriodSpec(d["period"], d["tz"], int(d["anchor"])), period_tokens=limit)
    p = Principal(pid, kind, caps)
    p.period_end = float(d["period_end"])
    return pure._period_refusal(p, who, limit, used, amount, now)
