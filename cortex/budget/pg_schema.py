"""The PostgreSQL ledger's schema: versioned migrations, the start-up check, safe URLs, and the SQLite import.

The schema mirrors the SQLite ledger (cortex/budget/store.py and the alert
tables of cortex/budget/alert_delivery.py) in PostgreSQL types: BIGINT for
tokens and micro-USD, DOUBLE PRECISION for times (epoch seconds, as the
SQLite store keeps them), TEXT, BYTEA for key hashes. On top of it, what
many replicas sharing one ledger need: a `replicas` table, holds that carry
the replica that opened them and a lease deadline after which another
replica may reap them, and per-principal `held_tokens`, `held_usd` and
`in_flight` columns, so that a cap's state is one row that a conditional
update can check and change at once.

`MIGRATIONS` is the only description of the schema: version N is what
applying steps 1..N gives. `migrate` applies the missing steps, each in its
own transaction under a transaction-scoped advisory lock, so replicas that
migrate at the same moment apply every step exactly once. `check` is the
start-up test: a ledger older or newer than this cortex is refused with
the command that fixes it.

Passwords never travel in a URL: libpq reads them from PGPASSWORD or a
.pgpass file (PGPASSFILE), so `ledger_url` refuses a URL that carries one,
and `redact` strips any from text bound for a log or an error message.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cortex.budget import store as sqlite_store

Migration = tuple[int, tuple[str, ...]]

# "cortex" in ASCII, then the lock's number: one constant for every cortex, so replicas contend on it.
MIGRATE_LOCK_KEY = 0x636F72746578_0001
MIGRATE_LOCK_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "cortex"
HOLD_STATES = ("open", "settled", "released", "expired", "orphaned")
URL_SCHEMES = ("postgresql", "postgres")
URL_LENGTH_MAX = 2048
# A peer that vanished without a FIN (a host lost, a NAT that forgot us) fails a connection in ~10 s instead
# of after TCP's retransmissions (minutes): the writer's batch and the change listener would hang on it.
TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                "tcp_user_timeout": 10_000}

_CAPS_COLUMNS = """
    balance_tokens BIGINT CHECK (balance_tokens >= 0),
    window_tokens BIGINT CHECK (window_tokens >= 0),
    window_s DOUBLE PRECISION CHECK (window_s > 0),
    max_concurrency INTEGER CHECK (max_concurrency >= 0),
    balance_usd BIGINT CHECK (balance_usd >= 0),  -- micro-USD, as every money figure here
    window_usd BIGINT CHECK (window_usd >= 0),
    period TEXT CHECK (period IN ('daily', 'weekly', 'monthly')),
    period_timezone TEXT,
    period_anchor_day INTEGER,
    period_tokens BIGINT CHECK (period_tokens >= 0),
    period_usd BIGINT CHECK (period_usd >= 0),
    spent_tokens BIGINT NOT NULL DEFAULT 0 CHECK (spent_tokens >= 0),
    spent_usd BIGINT NOT NULL DEFAULT 0 CHECK (spent_usd >= 0),
    -- What open holds reserve on this principal, kept in the row so that one
    -- conditional UPDATE can admit against spent + held <= cap.
    held_tokens BIGINT NOT NULL DEFAULT 0 CHECK (held_tokens >= 0),
    held_usd BIGINT NOT NULL DEFAULT 0 CHECK (held_usd >= 0),
    in_flight INTEGER NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    CHECK ((window_tokens IS NULL AND window_usd IS NULL) = (window_s IS NULL)),
    CHECK ((period_tokens IS NULL AND period_usd IS NULL) = (period IS NULL))"""

_V1 = (
    # Free-form facts about the ledger (where it was imported from, and when).
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    """CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
)""",
    f"""CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,{_CAPS_COLUMNS}
)""",
    f"""CREATE TABLE keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,{_CAPS_COLUMNS}
)""",
    # As in SQLite, no foreign keys on holds: the hot path inserts them, and keys are never deleted.
    f"""CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    amount_tokens BIGINT NOT NULL CHECK (amount_tokens >= 0),
    amount_usd BIGINT NOT NULL DEFAULT 0 CHECK (amount_usd >= 0),
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in HOLD_STATES)})),
    charged_tokens BIGINT NOT NULL DEFAULT 0 CHECK (charged_tokens >= 0),
    charged_usd BIGINT NOT NULL DEFAULT 0 CHECK (charged_usd >= 0),
    actual_tokens BIGINT,
    resolved_at DOUBLE PRECISION,
    request_id TEXT,  -- cortex's own id, unique per request
    model TEXT,
    client_request_id TEXT,  -- the client's x-request-id, if it sent one; not unique
    -- The replica that opened it, and the time after which another replica's reaper may resolve it.
    replica_id TEXT,
    lease_deadline DOUBLE PRECISION,
    CHECK ((state = 'open') = (resolved_at IS NULL)),
    CHECK (state <> 'open' OR (replica_id IS NOT NULL AND lease_deadline IS NOT NULL))
)""",
    "CREATE INDEX holds_open_lease ON holds (lease_deadline) WHERE state = 'open'",
    "CREATE INDEX holds_resolved_at ON holds (resolved_at)",
    "CREATE INDEX holds_key_created ON holds (key_id, created_at)",
    # A calendar period's usage is summed from the holds resolved in it.
    "CREATE INDEX holds_key_resolved ON holds (key_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
    "CREATE INDEX holds_account_resolved ON holds (account_id, resolved_at) WHERE charged_tokens > 0 OR charged_usd > 0",
    """CREATE TABLE alert_state (
    rule_id TEXT NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    cap TEXT NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    epoch TEXT NOT NULL,
    fired_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rule_id, principal_kind, principal_id, cap, threshold)
)""",
    """CREATE TABLE alert_outbox (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    rule_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT
)""",
    "CREATE INDEX alert_outbox_next_attempt_at ON alert_outbox (next_attempt_at)",
    # Events dropped from a full outbox and not yet counted in the metrics.
    "CREATE TABLE alert_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
)

# --- step 2: the cross-replica admission protocol (cortex/budget/pg_ledger.py) ------------------
#
# Window usage in per-bucket rows, the current calendar period's usage in the principal rows, and
# the server-side functions that admit and resolve a whole batch in one statement. The proof that
# `spent + held <= cap` holds across replicas is at the top of cortex/budget/pg_ledger.py.

WINDOW_BUCKETS = 64  # a window's usage is kept in buckets of window_s / 64

_PRINCIPAL_V2_COLUMNS = (
    # The current calendar period, what was charged in it, and the spec it was computed for: a
    # different spec (or none yet, as after an import) is summed afresh from the resolved holds.
    "period_start DOUBLE PRECISION", "period_end DOUBLE PRECISION", "period_spec TEXT",
    "period_used_tokens BIGINT NOT NULL DEFAULT 0 CHECK (period_used_tokens >= 0)",
    "period_used_usd BIGINT NOT NULL DEFAULT 0 CHECK (period_used_usd >= 0)",
    # The window_s the principal's usage_buckets were built for: another (or none) rebuilds them from the holds.
    "buckets_window_s DOUBLE PRECISION",
)

_LOCAL_MIDNIGHT = r"""
CREATE FUNCTION cortex_local_midnight(tz TEXT, day DATE) RETURNS DOUBLE PRECISION
LANGUAGE plpgsql STABLE AS $$
-- periods.py's _boundary_s: local midnight of `day` in `tz`; in a fold its first occurrence,
-- in a gap the first instant after it.
DECLARE
    wall TIMESTAMP := day::timestamp;
    wall_s DOUBLE PRECISION := extract(epoch FROM day::timestamp);
    guess DOUBLE PRECISION := extract(epoch FROM day::timestamp AT TIME ZONE tz);
    probe DOUBLE PRECISION;
    candidate DOUBLE PRECISION;
    low_s DOUBLE PRECISION := NULL;
    high_s DOUBLE PRECISION := NULL;
    best DOUBLE PRECISION := NULL;
    low BIGINT;
    high BIGINT;
    mid BIGINT;
BEGIN
    -- Each candidate is the wall time less the UTC offset in force around it.
    FOREACH probe IN ARRAY ARRAY[guess - 86400, guess, guess + 86400] LOOP
        candidate := wall_s - (extract(epoch FROM to_timestamp(probe) AT TIME ZONE tz) - probe);
        low_s := LEAST(low_s, candidate);
        high_s := GREATEST(high_s, candidate);
        IF (to_timestamp(candidate) AT TIME ZONE tz) = wall THEN
            best := LEAST(best, candidate);
        END IF;
    END LOOP;
    IF best IS NOT NULL THEN
        RETURN best;
    END IF;
    -- A gap: the least instant whose wall time is at or after midnight.
    low := floor(low_s);
    high := ceil(high_s);
    WHILE high - low > 1 LOOP
        mid := (low + high) / 2;
        IF (to_timestamp(mid) AT TIME ZONE tz) >= wall THEN
            high := mid;
        ELSE
            low := mid;
        END IF;
    END LOOP;
    RETURN high;
END $$"""

_PERIOD_START_DAY = r"""
CREATE FUNCTION cortex_period_start_day(kind TEXT, anchor INTEGER, day DATE) RETURNS DATE
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    this_month DATE;
    prev DATE;
BEGIN
    IF kind = 'daily' THEN
        RETURN day;
    ELSIF kind = 'weekly' THEN
        RETURN day - (((extract(isodow FROM day)::integer - anchor) % 7 + 7) % 7);
    END IF;
    this_month := cortex_monthly_start(extract(year FROM day)::integer, extract(month FROM day)::integer, anchor);
    IF day >= this_month THEN
        RETURN this_month;
    END IF;
    prev := date_trunc('month', day)::date - 1;
    RETURN cortex_monthly_start(extract(year FROM prev)::integer, extract(month FROM prev)::integer, anchor);
END $$"""

_MONTHLY_START = r"""
CREATE FUNCTION cortex_monthly_start(y INTEGER, m INTEGER, anchor INTEGER) RETURNS DATE
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_date(y, m, LEAST(anchor, extract(day FROM make_date(y, m, 1) + interval '1 month' - interval '1 day')::integer))
$$"""

_NEXT_START_DAY = r"""
CREATE FUNCTION cortex_period_next_start_day(kind TEXT, anchor INTEGER, start_day DATE) RETURNS DATE
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    nxt DATE;
BEGIN
    IF kind = 'daily' THEN
        RETURN start_day + 1;
    ELSIF kind = 'weekly' THEN
        RETURN start_day + 7;
    END IF;
    nxt := (date_trunc('month', start_day) + interval '1 month')::date;
    RETURN cortex_monthly_start(extract(year FROM nxt)::integer, extract(month FROM nxt)::integer, anchor);
END $$"""

_PERIOD_BOUNDS = r"""
CREATE FUNCTION cortex_period_bounds(kind TEXT, tz TEXT, anchor INTEGER, now_s DOUBLE PRECISION)
RETURNS DOUBLE PRECISION[] LANGUAGE plpgsql STABLE AS $$
-- periods.py's period_bounds: {start, end} of the period with start <= now_s < end.
DECLARE
    start_day DATE := cortex_period_start_day(kind, anchor, (to_timestamp(now_s) AT TIME ZONE tz)::date);
    s DOUBLE PRECISION;
    e DOUBLE PRECISION;
BEGIN
    FOR attempt IN 1..3 LOOP
        s := cortex_local_midnight(tz, start_day);
        e := cortex_local_midnight(tz, cortex_period_next_start_day(kind, anchor, start_day));
        IF now_s < s THEN
            start_day := cortex_period_start_day(kind, anchor, start_day - 1);
        ELSIF now_s >= e THEN
            start_day := cortex_period_next_start_day(kind, anchor, start_day);
        ELSE
            RETURN ARRAY[s, e];
        END IF;
    END LOOP;
    RAISE EXCEPTION 'cortex: no % period (%, anchor %) contains %', kind, tz, anchor, now_s;
END $$"""

_WINDOW_WAIT = r"""
CREATE FUNCTION cortex_window_wait(p_kind TEXT, p_id TEXT, now_s DOUBLE PRECISION, win_s DOUBLE PRECISION,
                                   excess BIGINT, in_usd BOOLEAN) RETURNS DOUBLE PRECISION
LANGUAGE sql STABLE AS $$
-- Seconds until at least `excess` of the window's usage has aged out (its buckets' ends left the window).
    SELECT GREATEST(0, s.bucket_end + win_s - now_s) FROM (
        SELECT b.bucket_end, SUM(CASE WHEN in_usd THEN b.usd ELSE b.tokens END)
                                 OVER (ORDER BY b.bucket_end, b.bucket_start) AS aged
        FROM usage_buckets b WHERE b.kind = p_kind AND b.id = p_id AND b.bucket_end > now_s - win_s
    ) s WHERE s.aged >= excess ORDER BY s.bucket_end LIMIT 1
$$"""

_BATCH = r"""
CREATE FUNCTION cortex_batch(
    r_ids TEXT[], r_states TEXT[], r_tokens BIGINT[], r_usd BIGINT[],
    q_ids TEXT[], q_keys TEXT[], q_tokens BIGINT[], q_usd BIGINT[], q_ttl DOUBLE PRECISION[], q_request_ids TEXT[],
    q_models TEXT[], q_client_ids TEXT[], p_now DOUBLE PRECISION, p_replica TEXT, p_lease_s DOUBLE PRECISION
) RETURNS TABLE (o_part TEXT, o_idx INTEGER, o_ok BOOLEAN, o_tokens BIGINT, o_usd BIGINT, o_detail JSONB,
                o_account TEXT, o_now DOUBLE PRECISION)
LANGUAGE plpgsql AS $$
-- One group commit: resolve `r_*` (each exactly once), then judge the reserves `q_*` in order.
-- Lock order, always: the holds to resolve by id, then accounts by id, then keys by id.
--
-- Linear in the batch: every per-item lookup is set-based SQL (unnest ... WITH ORDINALITY joined
-- by hash, once per batch) or an O(1) subscript of an expanded array indexed by input position or
-- by principal; nothing searches an array inside a per-item loop, and no array grows by appending
-- per item. The only per-item loop is the in-order judging of the reserves, which must see the
-- holds of the reserves before it; its fast path is one comparison per principal against the
-- room each cap leaves (exactly the per-cap checks, rearranged), and only a reserve that fails
-- it takes the per-cap path that builds the refusal's details.
#variable_conflict use_column
DECLARE
    now_s DOUBLE PRECISION := COALESCE(p_now, extract(epoch FROM clock_timestamp()));
    nr INTEGER := COALESCE(array_length(r_ids, 1), 0);
    nq INTEGER := COALESCE(array_length(q_ids, 1), 0);
    rec RECORD;
    -- the open holds being resolved, locked, in id order
    h_id TEXT[]; h_key TEXT[]; h_t BIGINT[]; h_u BIGINT[]; h_tid TID[];
    -- the principals, locked: accounts 1..na, keys na+1..n
    a_ids TEXT[]; k_ids TEXT[]; na INTEGER := 0; n INTEGER := 0;
    p_kind TEXT[] := '{}'; p_id TEXT[] := '{}'; p_acct INTEGER[] := '{}'; p_revoked BOOLEAN[] := '{}';
    acct_of TEXT[] := '{}';
    bal_t BIGINT[] := '{}'; bal_u BIGINT[] := '{}'; win_t BIGINT[] := '{}'; win_u BIGINT[] := '{}';
    win_s DOUBLE PRECISION[] := '{}'; maxc INTEGER[] := '{}'; per_t BIGINT[] := '{}'; per_u BIGINT[] := '{}';
    per_kind TEXT[] := '{}'; per_tz TEXT[] := '{}'; per_anchor INTEGER[] := '{}';
    spent_t BIGINT[] := '{}'; spent_u BIGINT[] := '{}'; held_t BIGINT[] := '{}'; held_u BIGINT[] := '{}';
    infl INTEGER[] := '{}'; grew BOOLEAN[] := '{}';
    wu_t BIGINT[] := '{}'; wu_u BIGINT[] := '{}'; ch_t BIGINT[] := '{}'; ch_u BIGINT[] := '{}';
    pu_t BIGINT[] := '{}'; pu_u BIGINT[] := '{}'; ps DOUBLE PRECISION[] := '{}'; pe DOUBLE PRECISION[] := '{}';
    pspec TEXT[] := '{}'; bws DOUBLE PRECISION[] := '{}';
    -- what each cap leaves for more holds once this batch's resolutions are in (constant while judging)
    room_t BIGINT[] := '{}'; room_u BIGINT[] := '{}'; room_c INTEGER[] := '{}';
    -- the resolutions, by input position: resolved?, the charge, the hold's key (as a principal) and amounts
    r_ok BOOLEAN[]; r_ct BIGINT[]; r_cu BIGINT[]; r_k INTEGER[]; r_ht BIGINT[]; r_hu BIGINT[]; r_tid TID[];
    n_ok INTEGER;
    -- the reserves, by input position: the key (as a principal), whether the id is already a hold, the
    -- position of the id's first occurrence in the batch, and what judging decided
    q_k INTEGER[]; q_exists BOOLEAN[]; q_first INTEGER[]; q_ok BOOLEAN[]; q_det JSONB[]; taken BOOLEAN[];
    b_kind TEXT[] := '{}'; b_id TEXT[] := '{}'; b_start DOUBLE PRECISION[] := '{}'; b_end DOUBLE PRECISION[] := '{}';
    b_t BIGINT[] := '{}'; b_u BIGINT[] := '{}';
    i INTEGER; k INTEGER; ac INTEGER; pi INTEGER; cnt INTEGER;
    qt BIGINT; qu BIGINT; x BIGINT; y BIGINT; aged BIGINT; excess BIGINT;
    spec TEXT; bounds DOUBLE PRECISION[]; bucket_s DOUBLE PRECISION; bstart DOUBLE PRECISION;
    fails JSONB; seqscan TEXT;
BEGIN
    IF nr <> COALESCE(array_length(r_states, 1), 0) OR nq <> COALESCE(array_length(q_keys, 1), 0) THEN
        RAISE EXCEPTION 'cortex_batch: arrays of different lengths';
    END IF;
    -- 1. Lock the holds to resolve, in id order; one resolved meanwhile is no longer 'open' and drops out.
    --    One primary-key probe per distinct id, in id order (a nested loop over the sorted ids; the
    --    locking subquery cannot be flattened). `(state || '')` keeps the planner off the partial
    --    indexes on open holds: a bitmap scan of those visits the entries of every hold resolved since
    --    the last vacuum, a cost that grows with the history, not with the batch. The locked
    --    version's ctid lets step 4 update it without searching again.
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'), COALESCE(array_agg(l.key_id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.amount_tokens ORDER BY l.id), '{}'), COALESCE(array_agg(l.amount_usd ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.ctid ORDER BY l.id), '{}')
    INTO h_id, h_key, h_t, h_u, h_tid
    FROM (SELECT DISTINCT r.id FROM unnest(r_ids) AS r(id) WHERE r.id IS NOT NULL ORDER BY r.id) r
    CROSS JOIN LATERAL (SELECT h.id, h.key_id, h.amount_tokens, h.amount_usd, h.ctid FROM holds h
                        WHERE h.id = r.id AND (h.state || '') = 'open' FOR UPDATE) l;
    -- 2. Lock every principal either side touches: accounts by id, then keys by id.
    k_ids := ARRAY(SELECT DISTINCT x FROM unnest(h_key || q_keys) AS t(x) ORDER BY x);
    a_ids := ARRAY(SELECT DISTINCT account_id FROM keys WHERE id = ANY(k_ids) ORDER BY account_id);
    PERFORM 1 FROM accounts WHERE id = ANY(a_ids) ORDER BY id FOR UPDATE;
    PERFORM 1 FROM keys WHERE id = ANY(k_ids) ORDER BY id FOR UPDATE;
    FOR rec IN
        SELECT 'account'::text AS kind, a.id, NULL::text AS account_id, false AS revoked, a.balance_tokens,
               a.balance_usd, a.window_tokens, a.window_usd, a.window_s, a.max_concurrency, a.period_tokens,
               a.period_usd, a.period, a.period_timezone, a.period_anchor_day, a.spent_tokens, a.spent_usd,
               a.held_tokens, a.held_usd, a.in_flight, a.period_start, a.period_end, a.period_spec,
               a.period_used_tokens, a.period_used_usd, a.buckets_window_s
        FROM accounts a WHERE a.id = ANY(a_ids)
        UNION ALL
        SELECT 'key', k.id, k.account_id, k.revoked_at IS NOT NULL, k.balance_tokens, k.balance_usd, k.window_tokens,
               k.window_usd, k.window_s, k.max_concurrency, k.period_tokens, k.period_usd, k.period, k.period_timezone,
               k.period_anchor_day, k.spent_tokens, k.spent_usd, k.held_tokens, k.held_usd, k.in_flight,
               k.period_start, k.period_end, k.period_spec, k.period_used_tokens, k.period_used_usd, k.buckets_window_s
        FROM keys k WHERE k.id = ANY(k_ids)
        ORDER BY 1, 2
    LOOP
        n := n + 1;
        IF rec.kind = 'account' THEN na := n; END IF;
        p_kind[n] := rec.kind; p_id[n] := rec.id; acct_of[n] := rec.account_id; p_revoked[n] := rec.revoked;
        bal_t[n] := rec.balance_tokens; bal_u[n] := rec.balance_usd; win_t[n] := rec.window_tokens;
        win_u[n] := rec.window_usd; win_s[n] := rec.window_s; maxc[n] := rec.max_concurrency;
        per_t[n] := rec.period_tokens; per_u[n] := rec.period_usd; per_kind[n] := rec.period;
        per_tz[n] := rec.period_timezone; per_anchor[n] := rec.period_anchor_day;
        spent_t[n] := rec.spent_tokens; spent_u[n] := rec.spent_usd; held_t[n] := rec.held_tokens;
        held_u[n] := rec.held_usd; infl[n] := rec.in_flight; grew[n] := false;
        ps[n] := rec.period_start; pe[n] := rec.period_end; pspec[n] := rec.period_spec;
        pu_t[n] := rec.period_used_tokens; pu_u[n] := rec.period_used_usd; bws[n] := rec.buckets_window_s;
        wu_t[n] := 0; wu_u[n] := 0; ch_t[n] := 0; ch_u[n] := 0;
    END LOOP;
    -- Each key's account, as a principal's position (NULL for the accounts themselves): one hash join.
    p_acct := ARRAY(SELECT pa.pos FROM unnest(acct_of) WITH ORDINALITY AS pk(acct, pos)
                    LEFT JOIN unnest(p_id[1:na]) WITH ORDINALITY AS pa(id, pos) ON pa.id = pk.acct ORDER BY pk.pos);
    -- 3. Each principal's calendar period (rolled forward, never back) and sliding-window usage.
    FOR pi IN 1 .. n LOOP
        IF per_kind[pi] IS NULL THEN
            pspec[pi] := NULL;  -- a period cap set later is summed afresh from the resolved holds
        ELSE
            spec := per_kind[pi] || '/' || per_tz[pi] || '/' || per_anchor[pi];
            IF pspec[pi] IS DISTINCT FROM spec OR pe[pi] IS NULL OR now_s >= pe[pi] THEN
                bounds := cortex_period_bounds(per_kind[pi], per_tz[pi], per_anchor[pi], now_s);
                IF pspec[pi] IS DISTINCT FROM spec OR ps[pi] IS NULL THEN
                    IF p_kind[pi] = 'key' THEN
                        SELECT COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(charged_usd), 0) INTO x, y FROM holds
                        WHERE key_id = p_id[pi] AND resolved_at >= bounds[1] AND resolved_at < bounds[2]
                          AND (charged_tokens > 0 OR charged_usd > 0);
                    ELSE
                        SELECT COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(charged_usd), 0) INTO x, y FROM holds
                        WHERE account_id = p_id[pi] AND resolved_at >= bounds[1] AND resolved_at < bounds[2]
                          AND (charged_tokens > 0 OR charged_usd > 0);
                    END IF;
                    pu_t[pi] := x; pu_u[pi] := y;
                ELSIF bounds[1] <> ps[pi] THEN
                    pu_t[pi] := 0; pu_u[pi] := 0;  -- a new period: its usage starts at zero by construction
                END IF;
                ps[pi] := bounds[1]; pe[pi] := bounds[2]; pspec[pi] := spec;
            END IF;
        END IF;
        IF win_s[pi] IS NULL THEN
            bws[pi] := NULL;  -- a window set later is rebuilt from the resolved holds
        ELSE
            bucket_s := win_s[pi] / WINDOW_BUCKETS_PLACEHOLDER;
            IF bws[pi] IS DISTINCT FROM win_s[pi] THEN
                DELETE FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi];
                INSERT INTO usage_buckets (kind, id, bucket_start, bucket_end, tokens, usd)
                SELECT p_kind[pi], p_id[pi], floor(h.resolved_at / bucket_s) * bucket_s,
                       GREATEST(floor(h.resolved_at / bucket_s) * bucket_s + bucket_s, MAX(h.resolved_at)),
                       SUM(h.charged_tokens), SUM(h.charged_usd)
                FROM holds h
                WHERE (CASE WHEN p_kind[pi] = 'key' THEN h.key_id ELSE h.account_id END) = p_id[pi]
                  AND h.resolved_at > now_s - win_s[pi] AND (h.charged_tokens > 0 OR h.charged_usd > 0)
                GROUP BY 3;
                bws[pi] := win_s[pi];
            END IF;
            SELECT COALESCE(SUM(tokens) FILTER (WHERE bucket_end > now_s - win_s[pi]), 0),
                   COALESCE(SUM(usd) FILTER (WHERE bucket_end > now_s - win_s[pi]), 0),
                   COUNT(*) FILTER (WHERE bucket_end <= now_s - win_s[pi])
            INTO x, y, aged FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi];
            wu_t[pi] := x; wu_u[pi] := y;
            IF aged > 0 THEN  -- buckets whose END left the window count no more: drop them
                DELETE FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi] AND bucket_end <= now_s - win_s[pi];
            END IF;
        END IF;
    END LOOP;
    -- 4. Resolutions, set-based: the first mention of a locked open hold resolves it; a hold named
    --    again, or no longer open, reports false. Charges are capped at the hold.
    IF nr > 0 THEN
        SELECT array_agg(c.ok ORDER BY c.pos), array_agg(c.ct ORDER BY c.pos), array_agg(c.cu ORDER BY c.pos),
               array_agg(c.k ORDER BY c.pos), array_agg(c.ht ORDER BY c.pos), array_agg(c.hu ORDER BY c.pos),
               array_agg(c.tid ORDER BY c.pos), COUNT(*) FILTER (WHERE c.ok)
        INTO r_ok, r_ct, r_cu, r_k, r_ht, r_hu, r_tid, n_ok
        FROM (SELECT m.pos, m.ok, m.k, m.ht, m.hu, m.tid,
                     CASE WHEN NOT m.ok THEN 0 WHEN m.st = 'settled' THEN LEAST(m.t, m.ht) WHEN m.st = 'released' THEN 0
                          WHEN m.st IN ('expired', 'orphaned') THEN m.ht END AS ct,
                     CASE WHEN NOT m.ok THEN 0 WHEN m.st = 'settled' THEN LEAST(m.u, m.hu) WHEN m.st = 'released' THEN 0
                          WHEN m.st IN ('expired', 'orphaned') THEN m.hu END AS cu
              FROM (SELECT r.pos, r.st, r.t, r.u, h.t AS ht, h.u AS hu, h.tid, na + pk.pos AS k,
                           (h.id IS NOT NULL AND row_number() OVER (PARTITION BY r.id ORDER BY r.pos) = 1) AS ok
                    FROM unnest(r_ids, r_states, r_tokens, r_usd) WITH ORDINALITY AS r(id, st, t, u, pos)
                    LEFT JOIN unnest(h_id, h_key, h_t, h_u, h_tid) AS h(id, key_id, t, u, tid) ON h.id = r.id
                    LEFT JOIN unnest(p_id[na + 1 : n]) WITH ORDINALITY AS pk(id, pos) ON pk.id = h.key_id
                    WHERE r.pos <= nr) m) c;
        -- The first resolution (in order) that cannot be made aborts the batch, as it always did.
        SELECT c.pos INTO i FROM unnest(r_ok, r_ct, r_cu, r_k) WITH ORDINALITY AS c(ok, ct, cu, k, pos)
        WHERE c.ok AND (c.ct IS NULL OR c.ct < 0 OR c.cu < 0 OR c.k IS NULL) ORDER BY c.pos LIMIT 1;
        IF i IS NOT NULL THEN
            IF r_ct[i] IS NULL THEN
                RAISE EXCEPTION 'cortex_batch: a hold cannot be resolved as %', r_states[i];
            ELSIF r_k[i] IS NULL THEN
                RAISE EXCEPTION 'cortex_batch: hold % names a key that is not in the ledger', r_ids[i];
            END IF;
            RAISE EXCEPTION 'cortex_batch: a negative charge';
        END IF;
        -- Per key, what its resolutions free and charge; each key's sums go to it and to its account.
        FOR rec IN SELECT c.k, SUM(c.ht) AS ht, SUM(c.hu) AS hu, COUNT(*) AS cnt, SUM(c.ct) AS ct, SUM(c.cu) AS cu
                   FROM unnest(r_ok, r_k, r_ht, r_hu, r_ct, r_cu) AS c(ok, k, ht, hu, ct, cu)
                   WHERE c.ok GROUP BY c.k ORDER BY c.k LOOP
            FOREACH pi IN ARRAY ARRAY[rec.k, p_acct[rec.k]] LOOP
                held_t[pi] := held_t[pi] - rec.ht; held_u[pi] := held_u[pi] - rec.hu; infl[pi] := infl[pi] - rec.cnt;
                IF held_t[pi] < 0 OR held_u[pi] < 0 OR infl[pi] < 0 THEN
                    RAISE EXCEPTION 'cortex_batch: % % holds less than its open holds', p_kind[pi], p_id[pi];
                END IF;
                spent_t[pi] := spent_t[pi] + rec.ct; spent_u[pi] := spent_u[pi] + rec.cu;
                IF pspec[pi] IS NOT NULL THEN pu_t[pi] := pu_t[pi] + rec.ct; pu_u[pi] := pu_u[pi] + rec.cu; END IF;
                IF bws[pi] IS NOT NULL THEN
                    wu_t[pi] := wu_t[pi] + rec.ct; wu_u[pi] := wu_u[pi] + rec.cu;
                    ch_t[pi] := ch_t[pi] + rec.ct; ch_u[pi] := ch_u[pi] + rec.cu;
                END IF;
            END LOOP;
        END LOOP;
        IF n_ok > 0 THEN
            -- The planner prices a TID scan at a random page per hold and may prefer to scan the whole
            -- (young) table, a cost of the history: this statement alone runs with seq scans off.
            seqscan := current_setting('enable_seqscan');
            PERFORM set_config('enable_seqscan', 'off', true);
            UPDATE holds h SET state = c.st, charged_tokens = c.ct, charged_usd = c.cu,
                               actual_tokens = CASE WHEN c.st = 'settled' THEN c.t END, resolved_at = now_s
            FROM unnest(r_tid, r_ids, r_states, r_tokens, r_ct, r_cu, r_ok) AS c(tid, id, st, t, ct, cu, ok)
            -- The locked versions, by ctid (a TID scan: `(state || '')`, as in step 1, rules out the partial indexes).
            WHERE h.ctid = ANY(r_tid) AND c.ok AND h.ctid = c.tid AND h.id = c.id AND (h.state || '') = 'open';
            GET DIAGNOSTICS cnt = ROW_COUNT;
            PERFORM set_config('enable_seqscan', seqscan, true);
            IF cnt <> n_ok THEN RAISE EXCEPTION 'cortex_batch: a locked hold was not open'; END IF;
        END IF;
        RETURN QUERY SELECT 'resolve'::text, c.pos::integer, c.ok, c.ct, c.cu, NULL::jsonb, NULL::text, now_s
                     FROM unnest(r_ok, r_ct, r_cu) WITH ORDINALITY AS c(ok, ct, cu, pos);
    END IF;
    -- Charges join the bucket that contains now; a bucket's end is never before a charge in it.
    FOR pi IN 1 .. n LOOP
        IF ch_t[pi] > 0 OR ch_u[pi] > 0 THEN
            bucket_s := win_s[pi] / WINDOW_BUCKETS_PLACEHOLDER;
            bstart := floor(now_s / bucket_s) * bucket_s;
            b_kind := b_kind || p_kind[pi]; b_id := b_id || p_id[pi]; b_start := b_start || bstart;
            b_end := b_end || GREATEST(bstart + bucket_s, now_s); b_t := b_t || ch_t[pi]; b_u := b_u || ch_u[pi];
        END IF;
    END LOOP;
    IF array_length(b_id, 1) > 0 THEN
        INSERT INTO usage_buckets AS b (kind, id, bucket_start, bucket_end, tokens, usd)
        SELECT * FROM unnest(b_kind, b_id, b_start, b_end, b_t, b_u)
        ON CONFLICT (kind, id, bucket_start) DO UPDATE
        SET tokens = b.tokens + excluded.tokens, usd = b.usd + excluded.usd,
            bucket_end = GREATEST(b.bucket_end, excluded.bucket_end);
    END IF;
    -- 5. Reserves, in order: each is judged against the holds of those before it.
    IF nq > 0 THEN
        -- Per reserve, set-based: its key's position (NULL: unknown), whether its id is already a
        -- hold, and the position of its id's first occurrence in the batch (for duplicates within it).
        SELECT array_agg(s.k ORDER BY s.pos), array_agg(s.ex ORDER BY s.pos), array_agg(s.first ORDER BY s.pos)
        INTO q_k, q_exists, q_first
        -- The existing ids: one primary-key probe per reserve (OFFSET 0 keeps the probe a subquery, so
        -- the planner cannot turn it into a hash of the whole holds table, a cost of the history).
        FROM (SELECT q.pos, na + pk.pos AS k, e.id IS NOT NULL AS ex, MIN(q.pos) OVER (PARTITION BY q.id) AS first
              FROM unnest(q_ids, q_keys) WITH ORDINALITY AS q(id, key_id, pos)
              LEFT JOIN unnest(p_id[na + 1 : n]) WITH ORDINALITY AS pk(id, pos) ON pk.id = q.key_id
              LEFT JOIN LATERAL (SELECT h.id FROM holds h WHERE h.id = q.id OFFSET 0) e ON true
              WHERE q.pos <= nq) s;
        -- What each principal's caps leave for holds: a reserve fits a cap iff used + held + amount
        -- <= cap, i.e. amount <= (cap - used) - held; the least over the caps is the room.
        FOR pi IN 1 .. n LOOP
            room_t[pi] := COALESCE(LEAST(bal_t[pi] - spent_t[pi], win_t[pi] - wu_t[pi], per_t[pi] - pu_t[pi]),
                                   9223372036854775807);
            room_u[pi] := COALESCE(LEAST(bal_u[pi] - spent_u[pi], win_u[pi] - wu_u[pi], per_u[pi] - pu_u[pi]),
                                   9223372036854775807);
            room_c[pi] := COALESCE(maxc[pi], 2147483647);
        END LOOP;
        q_ok := array_fill(false, ARRAY[nq]); q_det := array_fill(NULL::jsonb, ARRAY[nq]);
        taken := array_fill(false, ARRAY[nq]);
        FOR i IN 1 .. nq LOOP
            k := q_k[i];
            IF k IS NULL THEN
                q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'unknown', 'kind', 'key', 'id', q_keys[i]));
                CONTINUE;
            ELSIF p_revoked[k] THEN
                q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'revoked', 'kind', 'key', 'id', q_keys[i]));
                CONTINUE;
            ELSIF q_exists[i] OR taken[q_first[i]] THEN  -- already a hold, or admitted earlier in this batch
                q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'duplicate', 'kind', 'key', 'id', q_keys[i]));
                CONTINUE;
            ELSIF q_tokens[i] < 0 OR q_usd[i] < 0 OR NOT q_ttl[i] > 0 THEN
                RAISE EXCEPTION 'cortex_batch: a reserve needs amounts >= 0 and a ttl > 0';
            END IF;
            ac := p_acct[k]; qt := q_tokens[i]; qu := q_usd[i];
            IF (qt <= room_t[k] - held_t[k] AND qu <= room_u[k] - held_u[k] AND infl[k] < room_c[k]
                AND qt <= room_t[ac] - held_t[ac] AND qu <= room_u[ac] - held_u[ac] AND infl[ac] < room_c[ac]) IS NOT TRUE THEN
                -- Some cap refuses it: every failing cap, on the key and then on its account.
                fails := '[]'::jsonb;
                FOREACH pi IN ARRAY ARRAY[k, ac] LOOP
                    IF bal_t[pi] IS NOT NULL AND spent_t[pi] + held_t[pi] + qt > bal_t[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', bal_t[pi], 'used', spent_t[pi], 'held', held_t[pi], 'asked', qt);
                    END IF;
                    IF bal_u[pi] IS NOT NULL AND spent_u[pi] + held_u[pi] + qu > bal_u[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', bal_u[pi], 'used', spent_u[pi], 'held', held_u[pi], 'asked', qu);
                    END IF;
                    IF win_t[pi] IS NOT NULL AND wu_t[pi] + held_t[pi] + qt > win_t[pi] THEN
                        excess := wu_t[pi] + held_t[pi] + qt - win_t[pi];
                        fails := fails || jsonb_build_object('reason', 'window', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', win_t[pi], 'used', wu_t[pi], 'held', held_t[pi], 'asked', qt,
                            'window_s', win_s[pi], 'excess', excess, 'wait_s',
                            CASE WHEN excess <= wu_t[pi] THEN cortex_window_wait(p_kind[pi], p_id[pi], now_s, win_s[pi], excess, false) END);
                    END IF;
                    IF win_u[pi] IS NOT NULL AND wu_u[pi] + held_u[pi] + qu > win_u[pi] THEN
                        excess := wu_u[pi] + held_u[pi] + qu - win_u[pi];
                        fails := fails || jsonb_build_object('reason', 'window', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', win_u[pi], 'used', wu_u[pi], 'held', held_u[pi], 'asked', qu,
                            'window_s', win_s[pi], 'excess', excess, 'wait_s',
                            CASE WHEN excess <= wu_u[pi] THEN cortex_window_wait(p_kind[pi], p_id[pi], now_s, win_s[pi], excess, true) END);
                    END IF;
                    IF per_t[pi] IS NOT NULL AND pu_t[pi] + held_t[pi] + qt > per_t[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', per_t[pi], 'used', pu_t[pi], 'held', held_t[pi], 'asked', qt,
                            'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                    END IF;
                    IF per_u[pi] IS NOT NULL AND pu_u[pi] + held_u[pi] + qu > per_u[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', per_u[pi], 'used', pu_u[pi], 'held', held_u[pi], 'asked', qu,
                            'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                    END IF;
                    IF maxc[pi] IS NOT NULL AND infl[pi] + 1 > maxc[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'concurrency', 'kind', p_kind[pi], 'id', p_id[pi],
                            'limit', maxc[pi]);
                    END IF;
                END LOOP;
                IF jsonb_array_length(fails) > 0 THEN
                    q_det[i] := fails;
                    CONTINUE;
                END IF;
            END IF;
            held_t[k] := held_t[k] + qt; held_u[k] := held_u[k] + qu; infl[k] := infl[k] + 1; grew[k] := true;
            held_t[ac] := held_t[ac] + qt; held_u[ac] := held_u[ac] + qu; infl[ac] := infl[ac] + 1; grew[ac] := true;
            q_ok[i] := true; taken[q_first[i]] := true;
        END LOOP;
        RETURN QUERY SELECT 'reserve'::text, c.pos::integer, c.ok, 0::bigint, 0::bigint, c.det,
                            CASE WHEN c.ok THEN p_id[p_acct[c.k]] END, now_s
                     FROM unnest(q_ok, q_det, q_k) WITH ORDINALITY AS c(ok, det, k, pos);
    END IF;
    -- 6. Write the principals back. The guard re-checks, in SQL on the locked row, every cap of a
    --    principal whose holds grew: it cannot fail unless the judging above is wrong.
    UPDATE accounts a SET held_tokens = u.ht, held_usd = u.hu, in_flight = u.inf, spent_tokens = u.st,
        spent_usd = u.su, period_start = u.ps, period_end = u.pe, period_spec = u.spec,
        period_used_tokens = u.put, period_used_usd = u.puu, buckets_window_s = u.bws
    FROM unnest(p_id[1:na], held_t[1:na], held_u[1:na], infl[1:na], spent_t[1:na], spent_u[1:na], ps[1:na],
                pe[1:na], pspec[1:na], pu_t[1:na], pu_u[1:na], bws[1:na], grew[1:na], wu_t[1:na], wu_u[1:na])
         AS u(id, ht, hu, inf, st, su, ps, pe, spec, put, puu, bws, grew, wut, wuu)
    WHERE a.id = u.id AND (NOT u.grew OR (
        (a.balance_tokens IS NULL OR u.st + u.ht <= a.balance_tokens) AND (a.balance_usd IS NULL OR u.su + u.hu <= a.balance_usd)
        AND (a.window_tokens IS NULL OR u.wut + u.ht <= a.window_tokens) AND (a.window_usd IS NULL OR u.wuu + u.hu <= a.window_usd)
        AND (a.period_tokens IS NULL OR u.put + u.ht <= a.period_tokens) AND (a.period_usd IS NULL OR u.puu + u.hu <= a.period_usd)
        AND (a.max_concurrency IS NULL OR u.inf <= a.max_concurrency)));
    GET DIAGNOSTICS cnt = ROW_COUNT;
    IF cnt <> na THEN RAISE EXCEPTION 'cortex_batch: an account cap check failed at write-back'; END IF;
    UPDATE keys a SET held_tokens = u.ht, held_usd = u.hu, in_flight = u.inf, spent_tokens = u.st,
        spent_usd = u.su, period_start = u.ps, period_end = u.pe, period_spec = u.spec,
        period_used_tokens = u.put, period_used_usd = u.puu, buckets_window_s = u.bws
    FROM unnest(p_id[na+1:n], held_t[na+1:n], held_u[na+1:n], infl[na+1:n], spent_t[na+1:n], spent_u[na+1:n],
                ps[na+1:n], pe[na+1:n], pspec[na+1:n], pu_t[na+1:n], pu_u[na+1:n], bws[na+1:n], grew[na+1:n],
                wu_t[na+1:n], wu_u[na+1:n])
         AS u(id, ht, hu, inf, st, su, ps, pe, spec, put, puu, bws, grew, wut, wuu)
    WHERE a.id = u.id AND (NOT u.grew OR (
        (a.balance_tokens IS NULL OR u.st + u.ht <= a.balance_tokens) AND (a.balance_usd IS NULL OR u.su + u.hu <= a.balance_usd)
        AND (a.window_tokens IS NULL OR u.wut + u.ht <= a.window_tokens) AND (a.window_usd IS NULL OR u.wuu + u.hu <= a.window_usd)
        AND (a.period_tokens IS NULL OR u.put + u.ht <= a.period_tokens) AND (a.period_usd IS NULL OR u.puu + u.hu <= a.period_usd)
        AND (a.max_concurrency IS NULL OR u.inf <= a.max_concurrency)));
    GET DIAGNOSTICS cnt = ROW_COUNT;
    IF cnt <> n - na THEN RAISE EXCEPTION 'cortex_batch: a key cap check failed at write-back'; END IF;
    IF nq > 0 THEN
        INSERT INTO holds (id, key_id, account_id, amount_tokens, amount_usd, created_at, expires_at, state,
                           request_id, model, client_request_id, replica_id, lease_deadline)
        SELECT c.id, c.key_id, p_id[p_acct[c.k]], c.t, c.u, now_s, now_s + c.ttl, 'open', c.rid, c.model, c.cid,
               p_replica, now_s + p_lease_s
        FROM unnest(q_ids, q_keys, q_tokens, q_usd, q_ttl, q_request_ids, q_models, q_client_ids, q_ok, q_k)
             AS c(id, key_id, t, u, ttl, rid, model, cid, ok, k)
        WHERE c.ok;
    END IF;
END $$"""

_REAP = r"""
CREATE FUNCTION cortex_reap(p_now DOUBLE PRECISION, p_replica TEXT, p_limit INTEGER)
RETURNS TABLE (o_id TEXT, o_tokens BIGINT, o_usd BIGINT) LANGUAGE plpgsql AS $$
-- Orphan other replicas' open holds whose lease has passed, charged in full. SKIP LOCKED: a hold
-- that its owner (or another reaper) is resolving right now is left to it.
#variable_conflict use_column
DECLARE
    now_s DOUBLE PRECISION := COALESCE(p_now, extract(epoch FROM clock_timestamp()));
    ids TEXT[];
    m INTEGER;
BEGIN
    ids := ARRAY(SELECT id FROM holds WHERE state = 'open' AND lease_deadline < now_s AND replica_id <> p_replica
                 ORDER BY id LIMIT p_limit FOR UPDATE SKIP LOCKED);
    m := COALESCE(array_length(ids, 1), 0);
    IF m = 0 THEN RETURN; END IF;
    RETURN QUERY SELECT ids[b.o_idx], b.o_tokens, b.o_usd
    FROM cortex_batch(ids, array_fill('orphaned'::text, ARRAY[m]), array_fill(0::bigint, ARRAY[m]),
                      array_fill(0::bigint, ARRAY[m]), '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', now_s, p_replica, 0) b
    WHERE b.o_ok;
END $$"""

_HEARTBEAT = r"""
CREATE FUNCTION cortex_heartbeat(p_replica TEXT, p_now DOUBLE PRECISION, p_lease_s DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
-- This replica is alive: extend its open holds' leases (locked in id order, as every resolver locks them).
#variable_conflict use_column
DECLARE
    now_s DOUBLE PRECISION := COALESCE(p_now, extract(epoch FROM clock_timestamp()));
    cnt INTEGER;
BEGIN
    INSERT INTO replicas AS r (id, started_at, heartbeat_at) VALUES (p_replica, now_s, now_s)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = GREATEST(r.heartbeat_at, excluded.heartbeat_at);
    UPDATE holds h SET lease_deadline = GREATEST(h.lease_deadline, now_s + p_lease_s)
    FROM (SELECT id FROM holds WHERE replica_id = p_replica AND state = 'open' ORDER BY id FOR UPDATE) s
    WHERE h.id = s.id;
    GET DIAGNOSTICS cnt = ROW_COUNT;
    RETURN cnt;
END $$"""

_V2 = (
    *(f"ALTER TABLE {table} ADD COLUMN {column}" for table in ("accounts", "keys") for column in _PRINCIPAL_V2_COLUMNS),
    """CREATE TABLE usage_buckets (
    kind TEXT NOT NULL CHECK (kind IN ('key', 'account')),
    id TEXT NOT NULL,
    bucket_start DOUBLE PRECISION NOT NULL,
    -- Charges in the bucket happened before its end; it leaves the window only when its END does.
    bucket_end DOUBLE PRECISION NOT NULL CHECK (bucket_end > bucket_start),
    tokens BIGINT NOT NULL CHECK (tokens >= 0),
    usd BIGINT NOT NULL CHECK (usd >= 0),
    PRIMARY KEY (kind, id, bucket_start)
)""",
    # Reserves look up existing ids; a replica's heartbeat finds its own open holds.
    "CREATE INDEX holds_replica_open ON holds (replica_id) WHERE state = 'open'",
    _LOCAL_MIDNIGHT, _MONTHLY_START, _PERIOD_START_DAY, _NEXT_START_DAY, _PERIOD_BOUNDS, _WINDOW_WAIT,
    _BATCH.replace("WINDOW_BUCKETS_PLACEHOLDER", str(WINDOW_BUCKETS)), _REAP, _HEARTBEAT,
)

# --- step 3: incremental output holds (issue 14): `cortex_batch` also EXTENDS open holds ------------
#
# A streaming response's next output slice grows its open hold, each extension checked against every
# cap of its key and account as a reserve is, but not their concurrency (the request is in flight
# already): `Ledger.extend` in cortex/budget/ledger.py, on the shared ledger. The function keeps its
# fifteen parameters and its result's columns (and adds four, the grown hold's), and gains the
# extensions as three trailing parameters with empty defaults, so a call of step 2's shape
# (`cortex_reap`'s, and a replica still running the previous cortex during a rolling upgrade) means
# what it meant. The principals also gain the `output_holds` policy column SQLite's have. The proof is
# in pg_ledger.py.

_BATCH_V3 = r"""
CREATE FUNCTION cortex_batch(
    r_ids TEXT[], r_states TEXT[], r_tokens BIGINT[], r_usd BIGINT[],
    q_ids TEXT[], q_keys TEXT[], q_tokens BIGINT[], q_usd BIGINT[], q_ttl DOUBLE PRECISION[], q_request_ids TEXT[],
    q_models TEXT[], q_client_ids TEXT[], p_now DOUBLE PRECISION, p_replica TEXT, p_lease_s DOUBLE PRECISION,
    e_ids TEXT[] DEFAULT '{}', e_tokens BIGINT[] DEFAULT '{}', e_usd BIGINT[] DEFAULT '{}'
) RETURNS TABLE (o_part TEXT, o_idx INTEGER, o_ok BOOLEAN, o_tokens BIGINT, o_usd BIGINT, o_detail JSONB,
                o_account TEXT, o_now DOUBLE PRECISION, o_key TEXT, o_created_at DOUBLE PRECISION,
                o_expires_at DOUBLE PRECISION, o_request_id TEXT)
LANGUAGE plpgsql AS $$
-- One group commit: resolve `r_*` (each exactly once), then judge the extensions `e_*` and then the
-- reserves `q_*`, in that order (a started response's next slice goes ahead of new admissions).
-- Lock order, always: the holds to resolve or extend by id, then accounts by id, then keys by id.
--
-- Linear in the batch: every per-item lookup is set-based SQL (unnest ... WITH ORDINALITY joined
-- by hash, once per batch) or an O(1) subscript of an expanded array indexed by input position, by
-- locked hold or by principal; nothing searches an array inside a per-item loop, and no array grows
-- by appending per item. The only per-item loop is the in-order judging of the extensions and the
-- reserves, each of which must see the holds of those before it; its fast path is one comparison
-- per principal against the room each cap leaves (exactly the per-cap checks, rearranged), and only
-- an item that fails it takes the per-cap path that builds the refusal's details.
#variable_conflict use_column
DECLARE
    now_s DOUBLE PRECISION := COALESCE(p_now, extract(epoch FROM clock_timestamp()));
    nr INTEGER := COALESCE(array_length(r_ids, 1), 0);
    nq INTEGER := COALESCE(array_length(q_ids, 1), 0);
    ne INTEGER := COALESCE(array_length(e_ids, 1), 0);
    rec RECORD;
    -- the open holds being resolved or extended, locked, in id order; h_t and h_u grow with extensions
    h_id TEXT[]; h_key TEXT[]; h_acct TEXT[]; h_t BIGINT[]; h_u BIGINT[]; h_tid TID[];
    h_created DOUBLE PRECISION[]; h_expires DOUBLE PRECISION[]; h_rid TEXT[]; h_grown BOOLEAN[];
    -- the principals, locked: accounts 1..na, keys na+1..n
    a_ids TEXT[]; k_ids TEXT[]; na INTEGER := 0; n INTEGER := 0;
    p_kind TEXT[] := '{}'; p_id TEXT[] := '{}'; p_acct INTEGER[] := '{}'; p_revoked BOOLEAN[] := '{}';
    acct_of TEXT[] := '{}';
    bal_t BIGINT[] := '{}'; bal_u BIGINT[] := '{}'; win_t BIGINT[] := '{}'; win_u BIGINT[] := '{}';
    win_s DOUBLE PRECISION[] := '{}'; maxc INTEGER[] := '{}'; per_t BIGINT[] := '{}'; per_u BIGINT[] := '{}';
    per_kind TEXT[] := '{}'; per_tz TEXT[] := '{}'; per_anchor INTEGER[] := '{}';
    spent_t BIGINT[] := '{}'; spent_u BIGINT[] := '{}'; held_t BIGINT[] := '{}'; held_u BIGINT[] := '{}';
    -- grew: the principal's held amounts grew (its amount caps are re-checked at write-back);
    -- more: its in_flight grew (its concurrency cap is re-checked too; an extension never sets it)
    infl INTEGER[] := '{}'; grew BOOLEAN[] := '{}'; more BOOLEAN[] := '{}';
    wu_t BIGINT[] := '{}'; wu_u BIGINT[] := '{}'; ch_t BIGINT[] := '{}'; ch_u BIGINT[] := '{}';
    pu_t BIGINT[] := '{}'; pu_u BIGINT[] := '{}'; ps DOUBLE PRECISION[] := '{}'; pe DOUBLE PRECISION[] := '{}';
    pspec TEXT[] := '{}'; bws DOUBLE PRECISION[] := '{}';
    -- what each cap leaves for more holds once this batch's resolutions are in (constant while judging)
    room_t BIGINT[] := '{}'; room_u BIGINT[] := '{}'; room_c INTEGER[] := '{}';
    -- the resolutions, by input position: resolved?, the charge, the hold's key (as a principal) and amounts
    r_ok BOOLEAN[]; r_ct BIGINT[]; r_cu BIGINT[]; r_k INTEGER[]; r_ht BIGINT[]; r_hu BIGINT[]; r_tid TID[];
    n_ok INTEGER;
    -- the extensions, by input position: the locked hold's position (NULL: not open, or resolved just
    -- now), its key (as a principal), what judging decided and the hold's amounts after it
    e_h INTEGER[]; e_k INTEGER[]; e_ok BOOLEAN[]; e_det JSONB[]; e_t BIGINT[]; e_u BIGINT[];
    grown_tids TID[];
    -- the reserves, by input position: the key (as a principal), whether the id is already a hold, the
    -- position of the id's first occurrence in the batch, and what judging decided
    q_k INTEGER[]; q_exists BOOLEAN[]; q_first INTEGER[]; q_ok BOOLEAN[]; q_det JSONB[]; taken BOOLEAN[];
    b_kind TEXT[] := '{}'; b_id TEXT[] := '{}'; b_start DOUBLE PRECISION[] := '{}'; b_end DOUBLE PRECISION[] := '{}';
    b_t BIGINT[] := '{}'; b_u BIGINT[] := '{}';
    i INTEGER; j INTEGER; k INTEGER; ac INTEGER; pi INTEGER; hp INTEGER; cnt INTEGER; is_ext BOOLEAN;
    qt BIGINT; qu BIGINT; x BIGINT; y BIGINT; aged BIGINT; excess BIGINT;
    spec TEXT; bounds DOUBLE PRECISION[]; bucket_s DOUBLE PRECISION; bstart DOUBLE PRECISION;
    fails JSONB; seqscan TEXT;
BEGIN
    IF nr <> COALESCE(array_length(r_states, 1), 0) OR nq <> COALESCE(array_length(q_keys, 1), 0)
       OR ne <> COALESCE(array_length(e_tokens, 1), 0) OR ne <> COALESCE(array_length(e_usd, 1), 0) THEN
        RAISE EXCEPTION 'cortex_batch: arrays of different lengths';
    END IF;
    -- 1. Lock the holds to resolve or extend, together, in id order; one resolved meanwhile is no
    --    longer 'open' and drops out. One primary-key probe per distinct id, in id order (a nested
    --    loop over the sorted ids; the locking subquery cannot be flattened). `(state || '')` keeps
    --    the planner off the partial indexes on open holds: a bitmap scan of those visits the entries
    --    of every hold resolved since the last vacuum, a cost that grows with the history, not with
    --    the batch. The locked version's ctid lets steps 4 and 6 update it without searching again.
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'), COALESCE(array_agg(l.key_id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.account_id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.amount_tokens ORDER BY l.id), '{}'), COALESCE(array_agg(l.amount_usd ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.ctid ORDER BY l.id), '{}'), COALESCE(array_agg(l.created_at ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.expires_at ORDER BY l.id), '{}'), COALESCE(array_agg(l.request_id ORDER BY l.id), '{}')
    INTO h_id, h_key, h_acct, h_t, h_u, h_tid, h_created, h_expires, h_rid
    FROM (SELECT DISTINCT r.id FROM unnest(r_ids || e_ids) AS r(id) WHERE r.id IS NOT NULL ORDER BY r.id) r
    CROSS JOIN LATERAL (SELECT h.id, h.key_id, h.account_id, h.amount_tokens, h.amount_usd, h.ctid, h.created_at,
                               h.expires_at, h.request_id FROM holds h
                        WHERE h.id = r.id AND (h.state || '') = 'open' FOR UPDATE) l;
    -- 2. Lock every principal the holds and the reserves touch: accounts by id, then keys by id.
    k_ids := ARRAY(SELECT DISTINCT x FROM unnest(h_key || q_keys) AS t(x) ORDER BY x);
    a_ids := ARRAY(SELECT DISTINCT account_id FROM keys WHERE id = ANY(k_ids) ORDER BY account_id);
    PERFORM 1 FROM accounts WHERE id = ANY(a_ids) ORDER BY id FOR UPDATE;
    PERFORM 1 FROM keys WHERE id = ANY(k_ids) ORDER BY id FOR UPDATE;
    FOR rec IN
        SELECT 'account'::text AS kind, a.id, NULL::text AS account_id, false AS revoked, a.balance_tokens,
               a.balance_usd, a.window_tokens, a.window_usd, a.window_s, a.max_concurrency, a.period_tokens,
               a.period_usd, a.period, a.period_timezone, a.period_anchor_day, a.spent_tokens, a.spent_usd,
               a.held_tokens, a.held_usd, a.in_flight, a.period_start, a.period_end, a.period_spec,
               a.period_used_tokens, a.period_used_usd, a.buckets_window_s
        FROM accounts a WHERE a.id = ANY(a_ids)
        UNION ALL
        SELECT 'key', k.id, k.account_id, k.revoked_at IS NOT NULL, k.balance_tokens, k.balance_usd, k.window_tokens,
               k.window_usd, k.window_s, k.max_concurrency, k.period_tokens, k.period_usd, k.period, k.period_timezone,
               k.period_anchor_day, k.spent_tokens, k.spent_usd, k.held_tokens, k.held_usd, k.in_flight,
               k.period_start, k.period_end, k.period_spec, k.period_used_tokens, k.period_used_usd, k.buckets_window_s
        FROM keys k WHERE k.id = ANY(k_ids)
        ORDER BY 1, 2
    LOOP
        n := n + 1;
        IF rec.kind = 'account' THEN na := n; END IF;
        p_kind[n] := rec.kind; p_id[n] := rec.id; acct_of[n] := rec.account_id; p_revoked[n] := rec.revoked;
        bal_t[n] := rec.balance_tokens; bal_u[n] := rec.balance_usd; win_t[n] := rec.window_tokens;
        win_u[n] := rec.window_usd; win_s[n] := rec.window_s; maxc[n] := rec.max_concurrency;
        per_t[n] := rec.period_tokens; per_u[n] := rec.period_usd; per_kind[n] := rec.period;
        per_tz[n] := rec.period_timezone; per_anchor[n] := rec.period_anchor_day;
        spent_t[n] := rec.spent_tokens; spent_u[n] := rec.spent_usd; held_t[n] := rec.held_tokens;
        held_u[n] := rec.held_usd; infl[n] := rec.in_flight; grew[n] := false; more[n] := false;
        ps[n] := rec.period_start; pe[n] := rec.period_end; pspec[n] := rec.period_spec;
        pu_t[n] := rec.period_used_tokens; pu_u[n] := rec.period_used_usd; bws[n] := rec.buckets_window_s;
        wu_t[n] := 0; wu_u[n] := 0; ch_t[n] := 0; ch_u[n] := 0;
    END LOOP;
    -- Each key's account, as a principal's position (NULL for the accounts themselves): one hash join.
    p_acct := ARRAY(SELECT pa.pos FROM unnest(acct_of) WITH ORDINALITY AS pk(acct, pos)
                    LEFT JOIN unnest(p_id[1:na]) WITH ORDINALITY AS pa(id, pos) ON pa.id = pk.acct ORDER BY pk.pos);
    -- 3. Each principal's calendar period (rolled forward, never back) and sliding-window usage.
    FOR pi IN 1 .. n LOOP
        IF per_kind[pi] IS NULL THEN
            pspec[pi] := NULL;  -- a period cap set later is summed afresh from the resolved holds
        ELSE
            spec := per_kind[pi] || '/' || per_tz[pi] || '/' || per_anchor[pi];
            IF pspec[pi] IS DISTINCT FROM spec OR pe[pi] IS NULL OR now_s >= pe[pi] THEN
                bounds := cortex_period_bounds(per_kind[pi], per_tz[pi], per_anchor[pi], now_s);
                IF pspec[pi] IS DISTINCT FROM spec OR ps[pi] IS NULL THEN
                    IF p_kind[pi] = 'key' THEN
                        SELECT COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(charged_usd), 0) INTO x, y FROM holds
                        WHERE key_id = p_id[pi] AND resolved_at >= bounds[1] AND resolved_at < bounds[2]
                          AND (charged_tokens > 0 OR charged_usd > 0);
                    ELSE
                        SELECT COALESCE(SUM(charged_tokens), 0), COALESCE(SUM(charged_usd), 0) INTO x, y FROM holds
                        WHERE account_id = p_id[pi] AND resolved_at >= bounds[1] AND resolved_at < bounds[2]
                          AND (charged_tokens > 0 OR charged_usd > 0);
                    END IF;
                    pu_t[pi] := x; pu_u[pi] := y;
                ELSIF bounds[1] <> ps[pi] THEN
                    pu_t[pi] := 0; pu_u[pi] := 0;  -- a new period: its usage starts at zero by construction
                END IF;
                ps[pi] := bounds[1]; pe[pi] := bounds[2]; pspec[pi] := spec;
            END IF;
        END IF;
        IF win_s[pi] IS NULL THEN
            bws[pi] := NULL;  -- a window set later is rebuilt from the resolved holds
        ELSE
            bucket_s := win_s[pi] / WINDOW_BUCKETS_PLACEHOLDER;
            IF bws[pi] IS DISTINCT FROM win_s[pi] THEN
                DELETE FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi];
                INSERT INTO usage_buckets (kind, id, bucket_start, bucket_end, tokens, usd)
                SELECT p_kind[pi], p_id[pi], floor(h.resolved_at / bucket_s) * bucket_s,
                       GREATEST(floor(h.resolved_at / bucket_s) * bucket_s + bucket_s, MAX(h.resolved_at)),
                       SUM(h.charged_tokens), SUM(h.charged_usd)
                FROM holds h
                WHERE (CASE WHEN p_kind[pi] = 'key' THEN h.key_id ELSE h.account_id END) = p_id[pi]
                  AND h.resolved_at > now_s - win_s[pi] AND (h.charged_tokens > 0 OR h.charged_usd > 0)
                GROUP BY 3;
                bws[pi] := win_s[pi];
            END IF;
            SELECT COALESCE(SUM(tokens) FILTER (WHERE bucket_end > now_s - win_s[pi]), 0),
                   COALESCE(SUM(usd) FILTER (WHERE bucket_end > now_s - win_s[pi]), 0),
                   COUNT(*) FILTER (WHERE bucket_end <= now_s - win_s[pi])
            INTO x, y, aged FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi];
            wu_t[pi] := x; wu_u[pi] := y;
            IF aged > 0 THEN  -- buckets whose END left the window count no more: drop them
                DELETE FROM usage_buckets WHERE kind = p_kind[pi] AND id = p_id[pi] AND bucket_end <= now_s - win_s[pi];
            END IF;
        END IF;
    END LOOP;
    -- 4. Resolutions, set-based: the first mention of a locked open hold resolves it; a hold named
    --    again, or no longer open, reports false. Charges are capped at the hold.
    IF nr > 0 THEN
        SELECT array_agg(c.ok ORDER BY c.pos), array_agg(c.ct ORDER BY c.pos), array_agg(c.cu ORDER BY c.pos),
               array_agg(c.k ORDER BY c.pos), array_agg(c.ht ORDER BY c.pos), array_agg(c.hu ORDER BY c.pos),
               array_agg(c.tid ORDER BY c.pos), COUNT(*) FILTER (WHERE c.ok)
        INTO r_ok, r_ct, r_cu, r_k, r_ht, r_hu, r_tid, n_ok
        FROM (SELECT m.pos, m.ok, m.k, m.ht, m.hu, m.tid,
                     CASE WHEN NOT m.ok THEN 0 WHEN m.st = 'settled' THEN LEAST(m.t, m.ht) WHEN m.st = 'released' THEN 0
                          WHEN m.st IN ('expired', 'orphaned') THEN m.ht END AS ct,
                     CASE WHEN NOT m.ok THEN 0 WHEN m.st = 'settled' THEN LEAST(m.u, m.hu) WHEN m.st = 'released' THEN 0
                          WHEN m.st IN ('expired', 'orphaned') THEN m.hu END AS cu
              FROM (SELECT r.pos, r.st, r.t, r.u, h.t AS ht, h.u AS hu, h.tid, na + pk.pos AS k,
                           (h.id IS NOT NULL AND row_number() OVER (PARTITION BY r.id ORDER BY r.pos) = 1) AS ok
                    FROM unnest(r_ids, r_states, r_tokens, r_usd) WITH ORDINALITY AS r(id, st, t, u, pos)
                    LEFT JOIN unnest(h_id, h_key, h_t, h_u, h_tid) AS h(id, key_id, t, u, tid) ON h.id = r.id
                    LEFT JOIN unnest(p_id[na + 1 : n]) WITH ORDINALITY AS pk(id, pos) ON pk.id = h.key_id
                    WHERE r.pos <= nr) m) c;
        -- The first resolution (in order) that cannot be made aborts the batch, as it always did.
        SELECT c.pos INTO i FROM unnest(r_ok, r_ct, r_cu, r_k) WITH ORDINALITY AS c(ok, ct, cu, k, pos)
        WHERE c.ok AND (c.ct IS NULL OR c.ct < 0 OR c.cu < 0 OR c.k IS NULL) ORDER BY c.pos LIMIT 1;
        IF i IS NOT NULL THEN
            IF r_ct[i] IS NULL THEN
                RAISE EXCEPTION 'cortex_batch: a hold cannot be resolved as %', r_states[i];
            ELSIF r_k[i] IS NULL THEN
                RAISE EXCEPTION 'cortex_batch: hold % names a key that is not in the ledger', r_ids[i];
            END IF;
            RAISE EXCEPTION 'cortex_batch: a negative charge';
        END IF;
        -- Per key, what its resolutions free and charge; each key's sums go to it and to its account.
        FOR rec IN SELECT c.k, SUM(c.ht) AS ht, SUM(c.hu) AS hu, COUNT(*) AS cnt, SUM(c.ct) AS ct, SUM(c.cu) AS cu
                   FROM unnest(r_ok, r_k, r_ht, r_hu, r_ct, r_cu) AS c(ok, k, ht, hu, ct, cu)
                   WHERE c.ok GROUP BY c.k ORDER BY c.k LOOP
            FOREACH pi IN ARRAY ARRAY[rec.k, p_acct[rec.k]] LOOP
                held_t[pi] := held_t[pi] - rec.ht; held_u[pi] := held_u[pi] - rec.hu; infl[pi] := infl[pi] - rec.cnt;
                IF held_t[pi] < 0 OR held_u[pi] < 0 OR infl[pi] < 0 THEN
                    RAISE EXCEPTION 'cortex_batch: % % holds less than its open holds', p_kind[pi], p_id[pi];
                END IF;
                spent_t[pi] := spent_t[pi] + rec.ct; spent_u[pi] := spent_u[pi] + rec.cu;
                IF pspec[pi] IS NOT NULL THEN pu_t[pi] := pu_t[pi] + rec.ct; pu_u[pi] := pu_u[pi] + rec.cu; END IF;
                IF bws[pi] IS NOT NULL THEN
                    wu_t[pi] := wu_t[pi] + rec.ct; wu_u[pi] := wu_u[pi] + rec.cu;
                    ch_t[pi] := ch_t[pi] + rec.ct; ch_u[pi] := ch_u[pi] + rec.cu;
                END IF;
            END LOOP;
        END LOOP;
        IF n_ok > 0 THEN
            -- The planner prices a TID scan at a random page per hold and may prefer to scan the whole
            -- (young) table, a cost of the history: this statement alone runs with seq scans off.
            seqscan := current_setting('enable_seqscan');
            PERFORM set_config('enable_seqscan', 'off', true);
            UPDATE holds h SET state = c.st, charged_tokens = c.ct, charged_usd = c.cu,
                               actual_tokens = CASE WHEN c.st = 'settled' THEN c.t END, resolved_at = now_s
            FROM unnest(r_tid, r_ids, r_states, r_tokens, r_ct, r_cu, r_ok) AS c(tid, id, st, t, ct, cu, ok)
            -- The locked versions, by ctid (a TID scan: `(state || '')`, as in step 1, rules out the partial indexes).
            WHERE h.ctid = ANY(r_tid) AND c.ok AND h.ctid = c.tid AND h.id = c.id AND (h.state || '') = 'open';
            GET DIAGNOSTICS cnt = ROW_COUNT;
            PERFORM set_config('enable_seqscan', seqscan, true);
            IF cnt <> n_ok THEN RAISE EXCEPTION 'cortex_batch: a locked hold was not open'; END IF;
        END IF;
        RETURN QUERY SELECT 'resolve'::text, c.pos::integer, c.ok, c.ct, c.cu, NULL::jsonb, NULL::text, now_s,
                            NULL::text, NULL::float8, NULL::float8, NULL::text
                     FROM unnest(r_ok, r_ct, r_cu) WITH ORDINALITY AS c(ok, ct, cu, pos);
    END IF;
    -- Charges join the bucket that contains now; a bucket's end is never before a charge in it.
    FOR pi IN 1 .. n LOOP
        IF ch_t[pi] > 0 OR ch_u[pi] > 0 THEN
            bucket_s := win_s[pi] / WINDOW_BUCKETS_PLACEHOLDER;
            bstart := floor(now_s / bucket_s) * bucket_s;
            b_kind := b_kind || p_kind[pi]; b_id := b_id || p_id[pi]; b_start := b_start || bstart;
            b_end := b_end || GREATEST(bstart + bucket_s, now_s); b_t := b_t || ch_t[pi]; b_u := b_u || ch_u[pi];
        END IF;
    END LOOP;
    IF array_length(b_id, 1) > 0 THEN
        INSERT INTO usage_buckets AS b (kind, id, bucket_start, bucket_end, tokens, usd)
        SELECT * FROM unnest(b_kind, b_id, b_start, b_end, b_t, b_u)
        ON CONFLICT (kind, id, bucket_start) DO UPDATE
        SET tokens = b.tokens + excluded.tokens, usd = b.usd + excluded.usd,
            bucket_end = GREATEST(b.bucket_end, excluded.bucket_end);
    END IF;
    -- 5. Extensions, then reserves, in order: each is judged against the holds of those before it.
    IF ne > 0 THEN
        -- Per extension, set-based: its locked open hold's position, unless this batch's resolutions
        -- just resolved it (they went first), and that hold's key's position.
        SELECT array_agg(s.hp ORDER BY s.pos), array_agg(s.k ORDER BY s.pos) INTO e_h, e_k
        FROM (SELECT e.pos, CASE WHEN rr.id IS NULL THEN hh.pos END AS hp, na + pk.pos AS k
              FROM unnest(e_ids) WITH ORDINALITY AS e(id, pos)
              LEFT JOIN unnest(h_id, h_key) WITH ORDINALITY AS hh(id, key_id, pos) ON hh.id = e.id
              LEFT JOIN (SELECT DISTINCT c.id FROM unnest(r_ids, r_ok) AS c(id, ok) WHERE c.ok) rr ON rr.id = e.id
              LEFT JOIN unnest(p_id[na + 1 : n]) WITH ORDINALITY AS pk(id, pos) ON pk.id = hh.key_id
              WHERE e.pos <= ne) s;
        e_ok := array_fill(false, ARRAY[ne]); e_det := array_fill(NULL::jsonb, ARRAY[ne]);
        e_t := array_fill(NULL::bigint, ARRAY[ne]); e_u := array_fill(NULL::bigint, ARRAY[ne]);
        h_grown := array_fill(false, ARRAY[cardinality(h_id)]);
    END IF;
    IF nq > 0 THEN
        -- Per reserve, set-based: its key's position (NULL: unknown), whether its id is already a
        -- hold, and the position of its id's first occurrence in the batch (for duplicates within it).
        SELECT array_agg(s.k ORDER BY s.pos), array_agg(s.ex ORDER BY s.pos), array_agg(s.first ORDER BY s.pos)
        INTO q_k, q_exists, q_first
        -- The existing ids: one primary-key probe per reserve (OFFSET 0 keeps the probe a subquery, so
        -- the planner cannot turn it into a hash of the whole holds table, a cost of the history).
        FROM (SELECT q.pos, na + pk.pos AS k, e.id IS NOT NULL AS ex, MIN(q.pos) OVER (PARTITION BY q.id) AS first
              FROM unnest(q_ids, q_keys) WITH ORDINALITY AS q(id, key_id, pos)
              LEFT JOIN unnest(p_id[na + 1 : n]) WITH ORDINALITY AS pk(id, pos) ON pk.id = q.key_id
              LEFT JOIN LATERAL (SELECT h.id FROM holds h WHERE h.id = q.id OFFSET 0) e ON true
              WHERE q.pos <= nq) s;
        q_ok := array_fill(false, ARRAY[nq]); q_det := array_fill(NULL::jsonb, ARRAY[nq]);
        taken := array_fill(false, ARRAY[nq]);
    END IF;
    IF ne + nq > 0 THEN
        -- What each principal's caps leave for holds: an item fits a cap iff used + held + amount
        -- <= cap, i.e. amount <= (cap - used) - held; the least over the caps is the room.
        FOR pi IN 1 .. n LOOP
            room_t[pi] := COALESCE(LEAST(bal_t[pi] - spent_t[pi], win_t[pi] - wu_t[pi], per_t[pi] - pu_t[pi]),
                                   9223372036854775807);
            room_u[pi] := COALESCE(LEAST(bal_u[pi] - spent_u[pi], win_u[pi] - wu_u[pi], per_u[pi] - pu_u[pi]),
                                   9223372036854775807);
            room_c[pi] := COALESCE(maxc[pi], 2147483647);
        END LOOP;
        -- Items 1..ne are the extensions, ne+1..ne+nq the reserves: one loop, one set of cap checks.
        FOR j IN 1 .. ne + nq LOOP
            is_ext := j <= ne;
            IF is_ext THEN
                i := j; hp := e_h[i]; k := e_k[i];
                IF hp IS NULL THEN  -- not an open hold (settled, released, reaped, unknown): no effect
                    CONTINUE;
                ELSIF k IS NULL THEN
                    RAISE EXCEPTION 'cortex_batch: hold % names a key that is not in the ledger', e_ids[i];
                ELSIF (e_tokens[i] >= 0 AND e_usd[i] >= 0) IS NOT TRUE THEN
                    RAISE EXCEPTION 'cortex_batch: an extension needs amounts >= 0';
                END IF;
                qt := e_tokens[i]; qu := e_usd[i];
            ELSE
                i := j - ne; k := q_k[i];
                IF k IS NULL THEN
                    q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'unknown', 'kind', 'key', 'id', q_keys[i]));
                    CONTINUE;
                ELSIF p_revoked[k] THEN
                    q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'revoked', 'kind', 'key', 'id', q_keys[i]));
                    CONTINUE;
                ELSIF q_exists[i] OR taken[q_first[i]] THEN  -- already a hold, or admitted earlier in this batch
                    q_det[i] := jsonb_build_array(jsonb_build_object('reason', 'duplicate', 'kind', 'key', 'id', q_keys[i]));
                    CONTINUE;
                ELSIF q_tokens[i] < 0 OR q_usd[i] < 0 OR NOT q_ttl[i] > 0 THEN
                    RAISE EXCEPTION 'cortex_batch: a reserve needs amounts >= 0 and a ttl > 0';
                END IF;
                qt := q_tokens[i]; qu := q_usd[i];
            END IF;
            ac := p_acct[k];
            IF (qt <= room_t[k] - held_t[k] AND qu <= room_u[k] - held_u[k]
                AND qt <= room_t[ac] - held_t[ac] AND qu <= room_u[ac] - held_u[ac]
                AND (is_ext OR (infl[k] < room_c[k] AND infl[ac] < room_c[ac]))) IS NOT TRUE THEN
                -- Some cap refuses it: every failing cap, on the key and then on its account.
                fails := '[]'::jsonb;
                FOREACH pi IN ARRAY ARRAY[k, ac] LOOP
                    IF bal_t[pi] IS NOT NULL AND spent_t[pi] + held_t[pi] + qt > bal_t[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', bal_t[pi], 'used', spent_t[pi], 'held', held_t[pi], 'asked', qt);
                    END IF;
                    IF bal_u[pi] IS NOT NULL AND spent_u[pi] + held_u[pi] + qu > bal_u[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', bal_u[pi], 'used', spent_u[pi], 'held', held_u[pi], 'asked', qu);
                    END IF;
                    IF win_t[pi] IS NOT NULL AND wu_t[pi] + held_t[pi] + qt > win_t[pi] THEN
                        excess := wu_t[pi] + held_t[pi] + qt - win_t[pi];
                        fails := fails || jsonb_build_object('reason', 'window', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', win_t[pi], 'used', wu_t[pi], 'held', held_t[pi], 'asked', qt,
                            'window_s', win_s[pi], 'excess', excess, 'wait_s',
                            CASE WHEN excess <= wu_t[pi] THEN cortex_window_wait(p_kind[pi], p_id[pi], now_s, win_s[pi], excess, false) END);
                    END IF;
                    IF win_u[pi] IS NOT NULL AND wu_u[pi] + held_u[pi] + qu > win_u[pi] THEN
                        excess := wu_u[pi] + held_u[pi] + qu - win_u[pi];
                        fails := fails || jsonb_build_object('reason', 'window', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', win_u[pi], 'used', wu_u[pi], 'held', held_u[pi], 'asked', qu,
                            'window_s', win_s[pi], 'excess', excess, 'wait_s',
                            CASE WHEN excess <= wu_u[pi] THEN cortex_window_wait(p_kind[pi], p_id[pi], now_s, win_s[pi], excess, true) END);
                    END IF;
                    IF per_t[pi] IS NOT NULL AND pu_t[pi] + held_t[pi] + qt > per_t[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'tokens', 'limit', per_t[pi], 'used', pu_t[pi], 'held', held_t[pi], 'asked', qt,
                            'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                    END IF;
                    IF per_u[pi] IS NOT NULL AND pu_u[pi] + held_u[pi] + qu > per_u[pi] THEN
                        fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                            'unit', 'usd', 'limit', per_u[pi], 'used', pu_u[pi], 'held', held_u[pi], 'asked', qu,
                            'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                    END IF;
                    IF NOT is_ext AND maxc[pi] IS NOT NULL AND infl[pi] + 1 > maxc[pi] THEN  -- not for an extension
                        fails := fails || jsonb_build_object('reason', 'concurrency', 'kind', p_kind[pi], 'id', p_id[pi],
                            'limit', maxc[pi]);
                    END IF;
                END LOOP;
                IF jsonb_array_length(fails) > 0 THEN
                    IF is_ext THEN e_det[i] := fails; ELSE q_det[i] := fails; END IF;
                    CONTINUE;
                END IF;
            END IF;
            held_t[k] := held_t[k] + qt; held_u[k] := held_u[k] + qu; grew[k] := true;
            held_t[ac] := held_t[ac] + qt; held_u[ac] := held_u[ac] + qu; grew[ac] := true;
            IF is_ext THEN  -- the same hold grows by what its principals now hold more
                h_t[hp] := h_t[hp] + qt; h_u[hp] := h_u[hp] + qu; h_grown[hp] := true;
                e_ok[i] := true; e_t[i] := h_t[hp]; e_u[i] := h_u[hp];
            ELSE
                infl[k] := infl[k] + 1; more[k] := true; infl[ac] := infl[ac] + 1; more[ac] := true;
                q_ok[i] := true; taken[q_first[i]] := true;
            END IF;
        END LOOP;
    END IF;
    IF ne > 0 THEN
        -- The grown hold's own columns by a join, not by subscripts: a query's array parameters are flat,
        -- and subscripting a flat array of text walks it from the start (quadratic in the batch).
        RETURN QUERY SELECT 'extend'::text, c.pos::integer, c.ok, c.t, c.u, c.det, hh.acct, now_s, hh.key_id,
                            hh.created, hh.expires, hh.rid
                     FROM unnest(e_ok, e_det, e_h, e_t, e_u) WITH ORDINALITY AS c(ok, det, hp, t, u, pos)
                     LEFT JOIN unnest(h_key, h_acct, h_created, h_expires, h_rid) WITH ORDINALITY
                               AS hh(key_id, acct, created, expires, rid, pos) ON c.ok AND hh.pos = c.hp;
    END IF;
    IF nq > 0 THEN
        RETURN QUERY SELECT 'reserve'::text, c.pos::integer, c.ok, 0::bigint, 0::bigint, c.det,
                            CASE WHEN c.ok THEN p_id[p_acct[c.k]] END, now_s,
                            NULL::text, NULL::float8, NULL::float8, NULL::text
                     FROM unnest(q_ok, q_det, q_k) WITH ORDINALITY AS c(ok, det, k, pos);
    END IF;
    -- 6. Write the principals back. The guard re-checks, in SQL on the locked row, every amount cap
    --    of a principal whose holds grew (by a reserve or an extension), and the concurrency cap of
    --    one whose in_flight grew (by a reserve): it cannot fail unless the judging above is wrong.
    UPDATE accounts a SET held_tokens = u.ht, held_usd = u.hu, in_flight = u.inf, spent_tokens = u.st,
        spent_usd = u.su, period_start = u.ps, period_end = u.pe, period_spec = u.spec,
        period_used_tokens = u.put, period_used_usd = u.puu, buckets_window_s = u.bws
    FROM unnest(p_id[1:na], held_t[1:na], held_u[1:na], infl[1:na], spent_t[1:na], spent_u[1:na], ps[1:na],
                pe[1:na], pspec[1:na], pu_t[1:na], pu_u[1:na], bws[1:na], grew[1:na], wu_t[1:na], wu_u[1:na],
                more[1:na])
         AS u(id, ht, hu, inf, st, su, ps, pe, spec, put, puu, bws, grew, wut, wuu, more)
    WHERE a.id = u.id AND (NOT u.grew OR (
        (a.balance_tokens IS NULL OR u.st + u.ht <= a.balance_tokens) AND (a.balance_usd IS NULL OR u.su + u.hu <= a.balance_usd)
        AND (a.window_tokens IS NULL OR u.wut + u.ht <= a.window_tokens) AND (a.window_usd IS NULL OR u.wuu + u.hu <= a.window_usd)
        AND (a.period_tokens IS NULL OR u.put + u.ht <= a.period_tokens) AND (a.period_usd IS NULL OR u.puu + u.hu <= a.period_usd)))
      AND (NOT u.more OR a.max_concurrency IS NULL OR u.inf <= a.max_concurrency);
    GET DIAGNOSTICS cnt = ROW_COUNT;
    IF cnt <> na THEN RAISE EXCEPTION 'cortex_batch: an account cap check failed at write-back'; END IF;
    UPDATE keys a SET held_tokens = u.ht, held_usd = u.hu, in_flight = u.inf, spent_tokens = u.st,
        spent_usd = u.su, period_start = u.ps, period_end = u.pe, period_spec = u.spec,
        period_used_tokens = u.put, period_used_usd = u.puu, buckets_window_s = u.bws
    FROM unnest(p_id[na+1:n], held_t[na+1:n], held_u[na+1:n], infl[na+1:n], spent_t[na+1:n], spent_u[na+1:n],
                ps[na+1:n], pe[na+1:n], pspec[na+1:n], pu_t[na+1:n], pu_u[na+1:n], bws[na+1:n], grew[na+1:n],
                wu_t[na+1:n], wu_u[na+1:n], more[na+1:n])
         AS u(id, ht, hu, inf, st, su, ps, pe, spec, put, puu, bws, grew, wut, wuu, more)
    WHERE a.id = u.id AND (NOT u.grew OR (
        (a.balance_tokens IS NULL OR u.st + u.ht <= a.balance_tokens) AND (a.balance_usd IS NULL OR u.su + u.hu <= a.balance_usd)
        AND (a.window_tokens IS NULL OR u.wut + u.ht <= a.window_tokens) AND (a.window_usd IS NULL OR u.wuu + u.hu <= a.window_usd)
        AND (a.period_tokens IS NULL OR u.put + u.ht <= a.period_tokens) AND (a.period_usd IS NULL OR u.puu + u.hu <= a.period_usd)))
      AND (NOT u.more OR a.max_concurrency IS NULL OR u.inf <= a.max_concurrency);
    GET DIAGNOSTICS cnt = ROW_COUNT;
    IF cnt <> n - na THEN RAISE EXCEPTION 'cortex_batch: a key cap check failed at write-back'; END IF;
    -- The grown holds, by the locked version's ctid (still current: a hold this batch resolved is never
    -- extended), and only while still open and no larger than judged: held stays the sum of the open holds.
    IF ne > 0 THEN
        grown_tids := ARRAY(SELECT c.tid FROM unnest(h_tid, h_grown) AS c(tid, grown) WHERE c.grown);
        IF cardinality(grown_tids) > 0 THEN
            seqscan := current_setting('enable_seqscan');
            PERFORM set_config('enable_seqscan', 'off', true);  -- a TID scan, as in step 4
            UPDATE holds h SET amount_tokens = c.t, amount_usd = c.u
            FROM unnest(h_tid, h_id, h_t, h_u, h_grown) AS c(tid, id, t, u, grown)
            WHERE h.ctid = ANY(grown_tids) AND c.grown AND h.ctid = c.tid AND h.id = c.id AND (h.state || '') = 'open'
              AND h.amount_tokens <= c.t AND h.amount_usd <= c.u;
            GET DIAGNOSTICS cnt = ROW_COUNT;
            PERFORM set_config('enable_seqscan', seqscan, true);
            IF cnt <> cardinality(grown_tids) THEN RAISE EXCEPTION 'cortex_batch: an extended hold was not open'; END IF;
        END IF;
    END IF;
    IF nq > 0 THEN
        INSERT INTO holds (id, key_id, account_id, amount_tokens, amount_usd, created_at, expires_at, state,
                           request_id, model, client_request_id, replica_id, lease_deadline)
        SELECT c.id, c.key_id, p_id[p_acct[c.k]], c.t, c.u, now_s, now_s + c.ttl, 'open', c.rid, c.model, c.cid,
               p_replica, now_s + p_lease_s
        FROM unnest(q_ids, q_keys, q_tokens, q_usd, q_ttl, q_request_ids, q_models, q_client_ids, q_ok, q_k)
             AS c(id, key_id, t, u, ttl, rid, model, cid, ok, k)
        WHERE c.ok;
    END IF;
END $$"""

OUTPUT_HOLDS = ("worst_case", "incremental")  # a principal's output-hold policy; NULL: inherited (ledger.Caps)

_V3 = (
    # The policy that asks for incremental holds, per principal, as the SQLite ledger keeps it.
    *(f"ALTER TABLE {table} ADD COLUMN output_holds TEXT CHECK (output_holds IN ({', '.join(repr(p) for p in OUTPUT_HOLDS)}))"
      for table in ("accounts", "keys")),
    # Step 2's signature; the one `cortex_reap` calls, now with the extensions' empty defaults.
    "DROP FUNCTION cortex_batch(TEXT[], TEXT[], BIGINT[], BIGINT[], TEXT[], TEXT[], BIGINT[], BIGINT[],"
    " DOUBLE PRECISION[], TEXT[], TEXT[], TEXT[], DOUBLE PRECISION, TEXT, DOUBLE PRECISION)",
    _BATCH_V3.replace("WINDOW_BUCKETS_PLACEHOLDER", str(WINDOW_BUCKETS)),
)

# Ordered; version N is what steps 1..N give. A new step goes at the end, never in the middle.
# --- step 4: small batches on generic plans ---------------------------------------------------------
#
# A batch of one or a few requests (a replica at low concurrency) re-plans four of cortex_batch's
# statements on every call (custom plans: their parameters are arrays), about a fifth of the
# server's CPU for such a call; a generic plan is as good for them. For a large batch a custom plan
# pays (a generic one costs +48 % at 128 items), so this twin is for small ones only: the same
# function, run with plan_cache_mode = force_generic_plan (a function's SET holds for what it calls).

_BATCH_SMALL = r"""
CREATE FUNCTION cortex_batch_small(
    r_ids TEXT[], r_states TEXT[], r_tokens BIGINT[], r_usd BIGINT[],
    q_ids TEXT[], q_keys TEXT[], q_tokens BIGINT[], q_usd BIGINT[], q_ttl DOUBLE PRECISION[], q_request_ids TEXT[],
    q_models TEXT[], q_client_ids TEXT[], p_now DOUBLE PRECISION, p_replica TEXT, p_lease_s DOUBLE PRECISION,
    e_ids TEXT[] DEFAULT '{}', e_tokens BIGINT[] DEFAULT '{}', e_usd BIGINT[] DEFAULT '{}'
) RETURNS TABLE (o_part TEXT, o_idx INTEGER, o_ok BOOLEAN, o_tokens BIGINT, o_usd BIGINT, o_detail JSONB,
                o_account TEXT, o_now DOUBLE PRECISION, o_key TEXT, o_created_at DOUBLE PRECISION,
                o_expires_at DOUBLE PRECISION, o_request_id TEXT)
LANGUAGE sql SET plan_cache_mode = force_generic_plan AS $$
    SELECT * FROM cortex_batch(r_ids, r_states, r_tokens, r_usd, q_ids, q_keys, q_tokens, q_usd, q_ttl, q_request_ids,
                               q_models, q_client_ids, p_now, p_replica, p_lease_s, e_ids, e_tokens, e_usd)
$$
"""
_V4 = (_BATCH_SMALL,)

# --- step 5: one request's batch, judged without arrays; a revoked key's next slice refused ----------
#
# At low concurrency a replica's batch is one reserve and the settlement that rides along with it.
# cortex_batch's cost is then almost all fixed: its array bookkeeping and twenty-odd statements (about
# 1.1 ms of server time here, against 0.45 ms for the four row writes and one commit such a batch
# needs), and it is on every request's path. `cortex_batch_one` takes that batch as scalars and
# judges it with the same rules in straight-line code: at most one resolution and one reserve, on ONE
# key, whose key and account have no sliding window and whose periods need no roll-over. Anything
# else (two keys, a window, a period boundary or a changed period) goes to cortex_batch_small, after
# the same locks in the same order (the hold, the account, the key: the general function asks only
# for locks this transaction holds already, so no new lock order appears). The same rows, refusals
# and errors as cortex_batch for every input: tests/test_pg_ledger.py runs both on random steps and
# compares their answers and their tables.

_BATCH_ONE = r"""
CREATE FUNCTION cortex_batch_one(
    r_id TEXT, r_state TEXT, r_tokens BIGINT, r_usd BIGINT,
    q_id TEXT, q_key TEXT, q_tokens BIGINT, q_usd BIGINT, q_ttl DOUBLE PRECISION, q_request_id TEXT,
    q_model TEXT, q_client_id TEXT, p_now DOUBLE PRECISION, p_replica TEXT, p_lease_s DOUBLE PRECISION
) RETURNS TABLE (o_part TEXT, o_idx INTEGER, o_ok BOOLEAN, o_tokens BIGINT, o_usd BIGINT, o_detail JSONB,
                o_account TEXT, o_now DOUBLE PRECISION, o_key TEXT, o_created_at DOUBLE PRECISION,
                o_expires_at DOUBLE PRECISION, o_request_id TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    now_s DOUBLE PRECISION := COALESCE(p_now, extract(epoch FROM clock_timestamp()));
    h_found BOOLEAN := false; h_key TEXT; h_t BIGINT; h_u BIGINT;
    kid TEXT; aid TEXT; k keys%ROWTYPE; a accounts%ROWTYPE;
    ct BIGINT := 0; cu BIGINT := 0; fits BOOLEAN := false; det JSONB; fails JSONB := '[]'::jsonb;
    -- the key (1) and its account (2), in the order cortex_batch reports their caps
    p_kind TEXT[] := ARRAY['key', 'account']; p_id TEXT[]; bal_t BIGINT[]; bal_u BIGINT[]; per_t BIGINT[];
    per_u BIGINT[]; maxc INTEGER[]; spent_t BIGINT[]; spent_u BIGINT[]; held_t BIGINT[]; held_u BIGINT[];
    infl INTEGER[]; pu_t BIGINT[]; pu_u BIGINT[]; pspec TEXT[]; per_kind TEXT[]; per_tz TEXT[]; per_anchor INTEGER[];
    pe DOUBLE PRECISION[]; pi INTEGER;
BEGIN
    IF r_id IS NOT NULL THEN  -- 1. the hold, locked, if it is open (a primary-key probe)
        SELECT h.key_id, h.amount_tokens, h.amount_usd INTO h_key, h_t, h_u FROM holds h
        WHERE h.id = r_id AND (h.state || '') = 'open' FOR UPDATE;  -- not the partial indexes: see cortex_batch
        h_found := FOUND;
    END IF;
    kid := CASE WHEN q_id IS NOT NULL THEN q_key ELSE h_key END;
    IF h_found AND q_id IS NOT NULL AND h_key IS DISTINCT FROM q_key THEN
        kid := NULL;  -- two keys: the general function takes them in its lock order
    ELSIF kid IS NOT NULL THEN
        SELECT account_id INTO aid FROM keys WHERE id = kid;
    END IF;
    IF kid IS NOT NULL AND aid IS NOT NULL THEN  -- 2. the account, then the key, locked
        SELECT * INTO a FROM accounts WHERE id = aid FOR UPDATE;
        SELECT * INTO k FROM keys WHERE id = kid FOR UPDATE;
        IF k.account_id IS DISTINCT FROM aid THEN  -- read before the locks; nothing in cortex moves a key
            RAISE EXCEPTION 'cortex_batch: key % changed its account', kid;
        END IF;
    END IF;
    IF (h_found OR q_id IS NOT NULL) AND (kid IS NULL AND (h_found AND q_id IS NOT NULL)
        OR aid IS NOT NULL AND (k.window_s IS NOT NULL OR k.window_tokens IS NOT NULL OR k.window_usd IS NOT NULL
            OR a.window_s IS NOT NULL OR a.window_tokens IS NOT NULL OR a.window_usd IS NOT NULL
            OR k.period IS NOT NULL AND (k.period_spec IS DISTINCT FROM k.period || '/' || k.period_timezone || '/' || k.period_anchor_day
                                         OR k.period_end IS NULL OR now_s >= k.period_end)
            OR a.period IS NOT NULL AND (a.period_spec IS DISTINCT FROM a.period || '/' || a.period_timezone || '/' || a.period_anchor_day
                                         OR a.period_end IS NULL OR now_s >= a.period_end))) THEN
        RETURN QUERY SELECT * FROM cortex_batch_small(
            CASE WHEN r_id IS NULL THEN '{}'::text[] ELSE ARRAY[r_id] END,
            CASE WHEN r_id IS NULL THEN '{}'::text[] ELSE ARRAY[r_state] END,
            CASE WHEN r_id IS NULL THEN '{}'::bigint[] ELSE ARRAY[r_tokens] END,
            CASE WHEN r_id IS NULL THEN '{}'::bigint[] ELSE ARRAY[r_usd] END,
            CASE WHEN q_id IS NULL THEN '{}'::text[] ELSE ARRAY[q_id] END,
            CASE WHEN q_id IS NULL THEN '{}'::text[] ELSE ARRAY[q_key] END,
            CASE WHEN q_id IS NULL THEN '{}'::bigint[] ELSE ARRAY[q_tokens] END,
            CASE WHEN q_id IS NULL THEN '{}'::bigint[] ELSE ARRAY[q_usd] END,
            CASE WHEN q_id IS NULL THEN '{}'::float8[] ELSE ARRAY[q_ttl] END,
            CASE WHEN q_id IS NULL THEN '{}'::text[] ELSE ARRAY[q_request_id] END,
            CASE WHEN q_id IS NULL THEN '{}'::text[] ELSE ARRAY[q_model] END,
            CASE WHEN q_id IS NULL THEN '{}'::text[] ELSE ARRAY[q_client_id] END,
            now_s, p_replica, p_lease_s);
        RETURN;
    END IF;
    IF aid IS NOT NULL THEN
        p_id := ARRAY[k.id, a.id]; bal_t := ARRAY[k.balance_tokens, a.balance_tokens];
        bal_u := ARRAY[k.balance_usd, a.balance_usd]; per_t := ARRAY[k.period_tokens, a.period_tokens];
        per_u := ARRAY[k.period_usd, a.period_usd]; maxc := ARRAY[k.max_concurrency, a.max_concurrency];
        spent_t := ARRAY[k.spent_tokens, a.spent_tokens]; spent_u := ARRAY[k.spent_usd, a.spent_usd];
        held_t := ARRAY[k.held_tokens, a.held_tokens]; held_u := ARRAY[k.held_usd, a.held_usd];
        infl := ARRAY[k.in_flight, a.in_flight]; pu_t := ARRAY[k.period_used_tokens, a.period_used_tokens];
        pu_u := ARRAY[k.period_used_usd, a.period_used_usd]; pe := ARRAY[k.period_end, a.period_end];
        per_kind := ARRAY[k.period, a.period]; per_tz := ARRAY[k.period_timezone, a.period_timezone];
        per_anchor := ARRAY[k.period_anchor_day, a.period_anchor_day];
        pspec := ARRAY[CASE WHEN k.period IS NOT NULL THEN k.period_spec END, CASE WHEN a.period IS NOT NULL THEN a.period_spec END];
    END IF;
    -- 3. The resolution: charged at most the hold, as cortex_batch charges it.
    IF h_found THEN
        ct := CASE WHEN r_state = 'settled' THEN LEAST(r_tokens, h_t) WHEN r_state = 'released' THEN 0
                   WHEN r_state IN ('expired', 'orphaned') THEN h_t END;
        cu := CASE WHEN r_state = 'settled' THEN LEAST(r_usd, h_u) WHEN r_state = 'released' THEN 0
                   WHEN r_state IN ('expired', 'orphaned') THEN h_u END;
        IF ct IS NULL THEN
            RAISE EXCEPTION 'cortex_batch: a hold cannot be resolved as %', r_state;
        ELSIF aid IS NULL THEN
            RAISE EXCEPTION 'cortex_batch: hold % names a key that is not in the ledger', r_id;
        ELSIF ct < 0 OR cu < 0 THEN
            RAISE EXCEPTION 'cortex_batch: a negative charge';
        END IF;
        FOR pi IN 1 .. 2 LOOP
            held_t[pi] := held_t[pi] - h_t; held_u[pi] := held_u[pi] - h_u; infl[pi] := infl[pi] - 1;
            IF held_t[pi] < 0 OR held_u[pi] < 0 OR infl[pi] < 0 THEN
                RAISE EXCEPTION 'cortex_batch: % % holds less than its open holds', p_kind[pi], p_id[pi];
            END IF;
            spent_t[pi] := spent_t[pi] + ct; spent_u[pi] := spent_u[pi] + cu;
            IF pspec[pi] IS NOT NULL THEN pu_t[pi] := pu_t[pi] + ct; pu_u[pi] := pu_u[pi] + cu; END IF;
        END LOOP;
        UPDATE holds h SET state = r_state, charged_tokens = ct, charged_usd = cu,
                           actual_tokens = CASE WHEN r_state = 'settled' THEN r_tokens END, resolved_at = now_s
        WHERE h.id = r_id AND (h.state || '') = 'open';
        IF NOT FOUND THEN RAISE EXCEPTION 'cortex_batch: a locked hold was not open'; END IF;
    END IF;
    IF r_id IS NOT NULL THEN
        RETURN QUERY SELECT 'resolve'::text, 1, h_found, ct, cu, NULL::jsonb, NULL::text, now_s,
                            NULL::text, NULL::float8, NULL::float8, NULL::text;
    END IF;
    -- 4. The reserve, against every cap of its key and its account (none is a window here).
    IF q_id IS NOT NULL THEN
        IF aid IS NULL THEN
            det := jsonb_build_array(jsonb_build_object('reason', 'unknown', 'kind', 'key', 'id', q_key));
        ELSIF k.revoked_at IS NOT NULL THEN
            det := jsonb_build_array(jsonb_build_object('reason', 'revoked', 'kind', 'key', 'id', q_key));
        ELSIF EXISTS (SELECT 1 FROM holds h WHERE h.id = q_id) THEN
            det := jsonb_build_array(jsonb_build_object('reason', 'duplicate', 'kind', 'key', 'id', q_key));
        ELSIF q_tokens < 0 OR q_usd < 0 OR NOT q_ttl > 0 THEN
            RAISE EXCEPTION 'cortex_batch: a reserve needs amounts >= 0 and a ttl > 0';
        ELSE
            FOR pi IN 1 .. 2 LOOP
                IF bal_t[pi] IS NOT NULL AND spent_t[pi] + held_t[pi] + q_tokens > bal_t[pi] THEN
                    fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                        'unit', 'tokens', 'limit', bal_t[pi], 'used', spent_t[pi], 'held', held_t[pi], 'asked', q_tokens);
                END IF;
                IF bal_u[pi] IS NOT NULL AND spent_u[pi] + held_u[pi] + q_usd > bal_u[pi] THEN
                    fails := fails || jsonb_build_object('reason', 'balance', 'kind', p_kind[pi], 'id', p_id[pi],
                        'unit', 'usd', 'limit', bal_u[pi], 'used', spent_u[pi], 'held', held_u[pi], 'asked', q_usd);
                END IF;
                IF per_t[pi] IS NOT NULL AND pu_t[pi] + held_t[pi] + q_tokens > per_t[pi] THEN
                    fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                        'unit', 'tokens', 'limit', per_t[pi], 'used', pu_t[pi], 'held', held_t[pi], 'asked', q_tokens,
                        'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                END IF;
                IF per_u[pi] IS NOT NULL AND pu_u[pi] + held_u[pi] + q_usd > per_u[pi] THEN
                    fails := fails || jsonb_build_object('reason', 'period', 'kind', p_kind[pi], 'id', p_id[pi],
                        'unit', 'usd', 'limit', per_u[pi], 'used', pu_u[pi], 'held', held_u[pi], 'asked', q_usd,
                        'period', per_kind[pi], 'tz', per_tz[pi], 'anchor', per_anchor[pi], 'period_end', pe[pi]);
                END IF;
                IF maxc[pi] IS NOT NULL AND infl[pi] + 1 > maxc[pi] THEN
                    fails := fails || jsonb_build_object('reason', 'concurrency', 'kind', p_kind[pi], 'id', p_id[pi],
                        'limit', maxc[pi]);
                END IF;
            END LOOP;
            fits := jsonb_array_length(fails) = 0;
            IF fits THEN
                FOR pi IN 1 .. 2 LOOP
                    held_t[pi] := held_t[pi] + q_tokens; held_u[pi] := held_u[pi] + q_usd; infl[pi] := infl[pi] + 1;
                END LOOP;
            ELSE
                det := fails;
            END IF;
        END IF;
    END IF;
    -- 5. Write the principals back, with cortex_batch's guard: it cannot fail unless the judging is wrong.
    --    (`held <= cap - used`: the planner folds these variables into constants, and `used + held` of a
    --    dimension with no cap may pass 2^63 where the general function's never computes it.)
    IF aid IS NOT NULL THEN
        UPDATE accounts a SET held_tokens = held_t[2], held_usd = held_u[2], in_flight = infl[2],
            spent_tokens = spent_t[2], spent_usd = spent_u[2], period_spec = pspec[2],
            period_used_tokens = pu_t[2], period_used_usd = pu_u[2], buckets_window_s = NULL
        WHERE a.id = aid AND (NOT fits OR ((a.balance_tokens IS NULL OR held_t[2] <= a.balance_tokens - spent_t[2])
            AND (a.balance_usd IS NULL OR held_u[2] <= a.balance_usd - spent_u[2])
            AND (a.period_tokens IS NULL OR held_t[2] <= a.period_tokens - pu_t[2])
            AND (a.period_usd IS NULL OR held_u[2] <= a.period_usd - pu_u[2])
            AND (a.max_concurrency IS NULL OR infl[2] <= a.max_concurrency)));
        IF NOT FOUND THEN RAISE EXCEPTION 'cortex_batch: an account cap check failed at write-back'; END IF;
        UPDATE keys a SET held_tokens = held_t[1], held_usd = held_u[1], in_flight = infl[1],
            spent_tokens = spent_t[1], spent_usd = spent_u[1], period_spec = pspec[1],
            period_used_tokens = pu_t[1], period_used_usd = pu_u[1], buckets_window_s = NULL
        WHERE a.id = kid AND (NOT fits OR ((a.balance_tokens IS NULL OR held_t[1] <= a.balance_tokens - spent_t[1])
            AND (a.balance_usd IS NULL OR held_u[1] <= a.balance_usd - spent_u[1])
            AND (a.period_tokens IS NULL OR held_t[1] <= a.period_tokens - pu_t[1])
            AND (a.period_usd IS NULL OR held_u[1] <= a.period_usd - pu_u[1])
            AND (a.max_concurrency IS NULL OR infl[1] <= a.max_concurrency)));
        IF NOT FOUND THEN RAISE EXCEPTION 'cortex_batch: a key cap check failed at write-back'; END IF;
    END IF;
    IF fits THEN
        INSERT INTO holds (id, key_id, account_id, amount_tokens, amount_usd, created_at, expires_at, state,
                           request_id, model, client_request_id, replica_id, lease_deadline)
        VALUES (q_id, q_key, aid, q_tokens, q_usd, now_s, now_s + q_ttl, 'open', q_request_id, q_model, q_client_id,
                p_replica, now_s + p_lease_s);
    END IF;
    IF q_id IS NOT NULL THEN
        RETURN QUERY SELECT 'reserve'::text, 1, fits, 0::bigint, 0::bigint, det, CASE WHEN fits THEN aid END, now_s,
                            NULL::text, NULL::float8, NULL::float8, NULL::text;
    END IF;
END $$
"""
# And cortex_batch refuses the next slice of a key revoked mid-reply, as the SQLite judges do (it granted
# it: the replica's own view was the only check, and a view can be seconds stale).
_EXTENSION_JUDGED = """                ELSIF (e_tokens[i] >= 0 AND e_usd[i] >= 0) IS NOT TRUE THEN
                    RAISE EXCEPTION 'cortex_batch: an extension needs amounts >= 0';
                END IF;"""
_EXTENSION_REVOKED = """                ELSIF (e_tokens[i] >= 0 AND e_usd[i] >= 0) IS NOT TRUE THEN
                    RAISE EXCEPTION 'cortex_batch: an extension needs amounts >= 0';
                ELSIF p_revoked[k] THEN  -- revoked mid-reply: no more output is paid for
                    e_det[i] := jsonb_build_array(jsonb_build_object('reason', 'revoked', 'kind', 'key', 'id', p_id[k]));
                    CONTINUE;
                END IF;"""
assert _BATCH_V3.count(_EXTENSION_JUDGED) == 1 and _BATCH_V3.count("CREATE FUNCTION cortex_batch(") == 1
_BATCH_V5 = (_BATCH_V3.replace("CREATE FUNCTION cortex_batch(", "CREATE OR REPLACE FUNCTION cortex_batch(")
             .replace(_EXTENSION_JUDGED, _EXTENSION_REVOKED).replace("WINDOW_BUCKETS_PLACEHOLDER", str(WINDOW_BUCKETS)))
# And a reaper that steps past a hold it cannot resolve: the three-argument form resolves the first
# `p_limit` orphans by id in one transaction, so one that fails (a bug the batch's own checks caught)
# would fail every reap, and every dead replica's holds would stay open. This form takes only the ids
# after `p_after`, for a reaper walking them one by one once a whole reap has failed.
_REAP_AFTER = _REAP.replace("p_limit INTEGER)", "p_limit INTEGER, p_after TEXT)").replace(
    "AND replica_id <> p_replica\n                 ORDER BY id", "AND replica_id <> p_replica\n                 AND id > p_after ORDER BY id")
assert _REAP_AFTER.count("p_after") == 2
_V5 = (_BATCH_V5, _BATCH_ONE, _REAP_AFTER)

MIGRATIONS: tuple[Migration, ...] = ((1, _V1), (2, _V2), (3, _V3), (4, _V4), (5, _V5))
# The tables that hold a ledger's contents (schema_version and meta describe the ledger itself).
DATA_TABLES = ("replicas", "accounts", "keys", "holds", "alert_state", "alert_outbox", "alert_counters", "usage_buckets")


def latest(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1][0] if migrations else 0


def _check_migrations(migrations: Sequence[Migration]) -> None:
    assert [version for version, _ in migrations] == list(range(1, len(migrations) + 1)), "versions must be 1..N"
    assert all(statements for _, statements in migrations), "a step with no statements"


_check_migrations(MIGRATIONS)
SCHEMA_VERSION = latest()


class LedgerUrlError(ValueError):
    """A --ledger URL that cortex will not use."""


class SchemaError(Exception):
    """The ledger's schema is not the one this cortex runs on."""


class ImportRefused(Exception):
    """`cortex db import` will not copy into this target, or from this source."""


# --- URLs --------------------------------------------------------------------------------

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@]*)@")
# libpq's secrets: the password, and the passphrase of an SSL client key.
SECRET_PARAMETERS = ("password", "sslpassword")
_PASSWORD_KEYWORD = re.compile(r"(?i)\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")


def redact(url: str) -> str:
    """`url` without any password, for logs and error messages; never raises.

    Removes the password of the user part (`user:secret@host`) and any
    `password=` or `sslpassword=` parameter. Text that does not parse loses everything
    up to its last `@`, which errs on the side of removing too much.
    """
    text = str(url)
    match = _USERINFO.match(text)
    if match is not None:
        user = match["userinfo"].split(":", 1)[0]
        rest = text[match.end():]
        at = rest.rfind("@")
        if at >= 0:  # an unescaped '@' in the password: drop all of it
            rest = rest[at + 1:]
        text = f"{match['scheme']}{user}@{rest}" if user else f"{match['scheme']}{rest}"
    elif "@" in text:
        text = "..." + text[text.rfind("@"):]
    base, mark, query = text.partition("?")
    if mark:  # libpq decodes a parameter's name too: `pass%77ord=` is a password
        kept = [p for p in query.split("&") if unquote(p.partition("=")[0]).strip().lower() not in SECRET_PARAMETERS]
        text = base + ("?" + "&".join(kept) if any(kept) else "")
    return _PASSWORD_KEYWORD.sub(r"\1=(redacted)", text)  # libpq's keyword=value form


_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://[^\s'\"]+")


def redact_text(text: str) -> str:
    """A message with every URL in it redacted, and any `password=` keyword; never raises."""
    def one(match: re.Match[str]) -> str:
        url = match[0].rstrip(".,;:)")  # the sentence's punctuation, not the URL's
        return redact(url) + match[0][len(url):]

    return _PASSWORD_KEYWORD.sub(r"\1=(redacted)", _URL_IN_TEXT.sub(one, str(text)))


def ledger_url(url: str) -> str:
    """A checked `postgresql://user@host:port/db` URL; raises LedgerUrlError naming the problem.

    Checked with libpq's own parser, so a password in the user part or as
    a `?password=` parameter (or an `sslpassword=`) is refused either way.
    """
    if len(url) > URL_LENGTH_MAX:
        raise LedgerUrlError(f"the ledger URL is longer than {URL_LENGTH_MAX} characters")
    scheme = url.partition("://")[0]
    if scheme not in URL_SCHEMES or "://" not in url:
        raise LedgerUrlError(f"the ledger must be a postgresql://user@host:port/dbname URL, got {redact(url)!r}")
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise LedgerUrlError(f"cannot parse the ledger URL {redact(url)!r}: {redact_text(str(exc))}") from None
    if any(params.get(name) for name in SECRET_PARAMETERS):
        raise LedgerUrlError(
            f"the ledger URL {redact(url)!r} contains a password; put it in the PGPASSWORD environment variable or"
            " in a .pgpass file (~/.pgpass or PGPASSFILE, mode 0600) instead, so it stays out of the command line,"
            " the process list and the logs"
        )
    return url


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to the ledger at `url` (checked by `ledger_url`); errors carry only the redacted URL."""
    ledger_url(url)
    kwargs.setdefault("autocommit", True)  # so that `conn.transaction()` is always a transaction of its own
    given = conninfo_to_dict(url)
    for name, value in TCP_SETTINGS.items():  # the URL's own choices win
        if name not in given:
            kwargs.setdefault(name, value)
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=APPLICATION_NAME, **kwargs)
    except psycopg.OperationalError as exc:
        reason = redact_text(str(exc)).strip()
        raise psycopg.OperationalError(f"cannot connect to the ledger at {redact(url)}: {reason}") from None


def describe(conn: psycopg.Connection[Any]) -> str:
    """The connection as a URL without a password, for messages."""
    info = conn.info
    if info.host.startswith("/"):  # a Unix socket's directory
        return f"postgresql://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


# --- versions and migrations -----------------------------------------------------------------

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)"""


def _assert_idle(conn: psycopg.Connection[Any]) -> None:
    # Inside a caller's transaction, `conn.transaction()` would be a savepoint: no commit, no lock release.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "needs a connection outside a transaction"


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The ledger's schema version; 0 for a database cortex has never migrated."""
    _assert_idle(conn)
    with conn.transaction():
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _too_new(version: int, expected: int) -> SchemaError:
    return SchemaError(
        f"this cortex is older than the ledger's schema {version} (it runs on schema {expected}):"
        " upgrade cortex, or point it at another ledger"
    )


def migrate(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] = MIGRATIONS, clock: Callable[[], float] = time.time
) -> tuple[int, int]:
    """Apply the missing steps, one transaction each; (version before, version after).

    Each transaction first takes a transaction-scoped advisory lock and then
    reads the version, so of several replicas migrating at once exactly one
    applies each step, and the others see it done. A ledger newer than
    `migrations` is refused, never touched.
    """
    _check_migrations(migrations)
    _assert_idle(conn)
    target = latest(migrations)
    start: int | None = None
    while True:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{MIGRATE_LOCK_TIMEOUT_S}s")))
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
            conn.execute(_VERSION_TABLE)
            version = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
            start = version if start is None else start
            if version > target:
                raise _too_new(version, target)
            if version == target:
                return start, version
            step, statements = migrations[version]  # versions are 1..N: step `version + 1` is at index `version`
            assert step == version + 1
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (step, clock()))


def check(conn: psycopg.Connection[Any], expected: int = SCHEMA_VERSION) -> int:
    """The start-up check: the ledger's version if it is `expected`, else SchemaError saying what to do."""
    version = current_version(conn)
    if version > expected:
        raise _too_new(version, expected)
    if version < expected:
        where = describe(conn)
        state = "has no cortex schema" if version == 0 else f"has schema {version}, older than this cortex's {expected}"
        raise SchemaError(f"the ledger at {where} {state}: run `cortex db migrate --ledger {where}`")
    return version


# --- importing a SQLite ledger -----------------------------------------------------------------

_INT, _FLOAT, _TEXT, _BYTES = int, float, str, bytes
_CAPS_TYPES = {
    "balance_tokens": _INT, "window_tokens": _INT, "window_s": _FLOAT, "max_concurrency": _INT, "balance_usd": _INT,
    "window_usd": _INT, "period": _TEXT, "period_timezone": _TEXT, "period_anchor_day": _INT, "period_tokens": _INT,
    "period_usd": _INT, "spent_tokens": _INT, "spent_usd": _INT, "output_holds": _TEXT,
}
# What is copied from each SQLite table, column by column, with the Python type PostgreSQL gets.
IMPORT_COLUMNS: dict[str, dict[str, type]] = {
    "accounts": {"id": _TEXT, "created_at": _FLOAT, **_CAPS_TYPES},
    "keys": {
        "id": _TEXT, "account_id": _TEXT, "name": _TEXT, "key_hash": _BYTES, "key_prefix": _TEXT, "created_at": _FLOAT,
        "revoked_at": _FLOAT, **_CAPS_TYPES,
    },
    "holds": {
        "id": _TEXT, "key_id": _TEXT, "account_id": _TEXT, "amount_tokens": _INT, "amount_usd": _INT, "created_at": _FLOAT,
        "expires_at": _FLOAT, "state": _TEXT, "charged_tokens": _INT, "charged_usd": _INT, "actual_tokens": _INT,
        "resolved_at": _FLOAT, "request_id": _TEXT, "model": _TEXT, "client_request_id": _TEXT,
        "replica_id": _TEXT, "lease_deadline": _FLOAT,  # a --workers ledger's
    },
    "alert_state": {
        "rule_id": _TEXT, "principal_kind": _TEXT, "principal_id": _TEXT, "cap": _TEXT, "threshold": _FLOAT,
        "epoch": _TEXT, "fired_at": _FLOAT,
    },
    "alert_outbox": {
        "seq": _INT, "event_id": _TEXT, "rule_id": _TEXT, "url": _TEXT, "body": _BYTES, "created_at": _FLOAT,
        "attempts": _INT, "next_attempt_at": _FLOAT, "last_error": _TEXT,
    },
    "alert_counters": {"name": _TEXT, "value": _INT},
}
SMALL_TABLES = ("accounts", "keys", "alert_state", "alert_outbox", "alert_counters")  # read whole; holds are streamed
COPY_BATCH_ROWS = 10_000  # holds read from SQLite at a time: the history can be long


@dataclass(frozen=True)
class ImportReport:
    source: str
    ledger: str
    accounts: int
    keys: int
    holds: int
    alert_state: int
    alert_outbox: int
    alert_counters: int
    orphaned: int  # holds open in the source, imported as charged in full
    orphaned_tokens: int
    orphaned_usd: int
    spent_tokens: int  # every key's, summed, after the orphaned charges
    spent_usd: int

    def view(self) -> dict[str, Any]:
        return asdict(self)


def _typed(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    if kind is _FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is _BYTES and isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if type(value) is not kind:
        raise ImportRefused(f"{where}: expected {kind.__name__}, the SQLite ledger has {value!r}; nothing was changed")
    return value


def _select(source: sqlite3.Connection, table: str) -> Iterator[dict[str, Any]]:
    columns = IMPORT_COLUMNS[table]
    cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}")
    while batch := cursor.fetchmany(COPY_BATCH_ROWS):
        for row in batch:
            yield {name: _typed(value, kind, f"{table}.{name}") for (name, kind), value in zip(columns.items(), row)}


def _orphaned(hold: dict[str, Any], now: float) -> dict[str, Any]:
    """What SQLite's recovery does to a hold left open (store.recover_and_load), done to the copy instead.

    A hold still open in a ledger no server owns belonged to a request whose
    outcome nobody knows: it is charged in full, so no cap can be passed.
    """
    if hold["state"] != "open":
        return hold
    return {**hold, "state": "orphaned", "charged_tokens": hold["amount_tokens"], "charged_usd": hold["amount_usd"],
            "actual_tokens": None, "resolved_at": now}


def _charge_orphans(source: sqlite3.Connection, small: dict[str, list[dict[str, Any]]]) -> tuple[int, int, int]:
    """Add the open holds' amounts to their key's and account's spend, as `_orphaned` charges them."""
    principals = {("key", r["id"]): r for r in small["keys"]} | {("account", r["id"]): r for r in small["accounts"]}
    count = tokens = usd = 0
    for key_id, account_id, amount_tokens, amount_usd in source.execute(
        "SELECT key_id, account_id, amount_tokens, amount_usd FROM holds WHERE state = 'open'"
    ):
        for principal in (("key", key_id), ("account", account_id)):
            row = principals.get(principal)
            if row is None:
                raise ImportRefused(f"an open hold names {principal[0]} {principal[1]!r}, which the SQLite ledger lacks")
            row["spent_tokens"] += amount_tokens
            row["spent_usd"] += amount_usd
        count, tokens, usd = count + 1, tokens + amount_tokens, usd + amount_usd
    return count, tokens, usd


def _copy(target: psycopg.Connection[Any], table: str, rows: Iterable[dict[str, Any]]) -> int:
    columns = list(IMPORT_COLUMNS[table])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    copied = 0
    with target.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])
            copied += 1
    return copied


def _refuse_unless_empty(target: psycopg.Connection[Any]) -> None:
    # SHARE ROW EXCLUSIVE conflicts with itself and with every write: a second
    # import, or a replica, waits for this transaction and then sees its rows.
    target.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
        sql.SQL(", ").join(map(sql.Identifier, DATA_TABLES))
    ))
    for table in DATA_TABLES:
        if target.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))).fetchone()[0]:
            raise ImportRefused(
                f"the ledger at {describe(target)} is not empty (its {table} table has rows): import only into a"
                " freshly migrated database; nothing was changed"
            )


def import_sqlite(
    source: sqlite3.Connection, target: psycopg.Connection[Any], source_name: str, now: float
) -> ImportReport:
    """Copy a SQLite ledger into an empty, migrated PostgreSQL ledger, in one transaction.

    The caller holds the data dir's lock, so no server is writing `source`;
    it is read in one read transaction all the same. Nothing in `source`
    changes: its open holds are imported as orphaned, charged in full at
    `now`, exactly as SQLite's recovery would charge them at the next start,
    so both ledgers agree on every balance. Holds are streamed (COPY), so the
    history's length costs time, not memory.
    """
    check(target)
    source.execute("BEGIN")  # one snapshot of the source for every read below
    try:
        small = {table: list(_select(source, table)) for table in SMALL_TABLES}
        orphaned, orphaned_tokens, orphaned_usd = _charge_orphans(source, small)
        with target.transaction():
            _refuse_unless_empty(target)
            counts = {table: _copy(target, table, small[table]) for table in ("accounts", "keys")}
            counts["holds"] = _copy(target, "holds", (_orphaned(h, now) for h in _select(source, "holds")))
            counts |= {table: _copy(target, table, small[table]) for table in SMALL_TABLES[2:]}
            if small["alert_outbox"]:  # new events continue after the imported ones
                target.execute(
                    "SELECT setval(pg_get_serial_sequence('alert_outbox', 'seq'), (SELECT MAX(seq) FROM alert_outbox))"
                )
            target.execute(
                "INSERT INTO meta (k, v) VALUES ('imported_from', %s), ('imported_at', %s), ('imported_sqlite_schema', %s)",
                (source_name, repr(now), sqlite_store.SCHEMA_VERSION),
            )
            for table, count in counts.items():  # postcondition: every row arrived, and none is left open
                copied = target.execute(sql.SQL("SELECT COUNT(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
                assert copied == count, (table, copied, count)
            assert not target.execute("SELECT EXISTS (SELECT 1 FROM holds WHERE state = 'open')").fetchone()[0]
    finally:
        source.rollback()
    return ImportReport(
        source=source_name, ledger=describe(target), accounts=counts["accounts"], keys=counts["keys"],
        holds=counts["holds"], alert_state=counts["alert_state"], alert_outbox=counts["alert_outbox"],
        alert_counters=counts["alert_counters"], orphaned=orphaned, orphaned_tokens=orphaned_tokens,
        orphaned_usd=orphaned_usd, spent_tokens=sum(r["spent_tokens"] for r in small["keys"]),
        spent_usd=sum(r["spent_usd"] for r in small["keys"]),
    )
