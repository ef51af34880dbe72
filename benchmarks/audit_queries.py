#!/usr/bin/env python
"""Benchmark: `Registry.audit_events(model=M, since=now-7d, limit=20)` (what `/ml audit M --since 7d --limit 20`
and `starchart audit` run) on an audit trail of 1,000,000 events against the same call on a trail of 10,000
events: the (model, created_at) index does the work, so 100 times the events may cost at most 1.5 times the time.
On SQLite and on PostgreSQL (127.0.0.1:5432, user postgres, database test; temporary databases are created and
dropped).

Both trails span 60 days, with one model per 5,000 events (200 models in the large trail, 2 in the small one),
so each call returns the same 20 rows' worth of work whatever the table's size. The Registry is built on a
temporary STARCHART_HOME, so the migrations create the schema (indexes and append-only triggers included). The
events are generated in Python with a valid hash chain (the encoding of model_registry.adapters.audit_log:
`event_hash(hashed_fields(...))`, so `audit.verify` accepts them) and bulk inserted (executemany on SQLite, COPY
on PostgreSQL); audit_head is set to the last event. The large and the small trail are queried alternately each
round (the model rotates), and the ratio of medians is reported per database; the headline ratio is the worst
one. Target: <= 1.5 on each database. For reference, a hand-written SELECT of the same rows through the raw
DB-API cursor (sqlite3, psycopg) on the large trail is timed alongside:

    SELECT <the columns the Registry returns> FROM audit_events
    WHERE model = ? AND created_at >= ? ORDER BY created_at DESC, seq DESC LIMIT 20

    python benchmarks/audit_queries.py [--quick | --smoke] [--events N] [--small N] [--reps N] [--sqlite-only]
                                       [--profile]

`--quick` compares 100,000 events with 1,000 (the JSON says so in "events" and "events_small"); `--smoke` 2,000
with 200, SQLite only. Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md,
"Benchmarks").

This module also holds the helpers (event generator, bulk loader, temporary databases, alternating timer)
that benchmarks/audit_append.py and benchmarks/audit_verify.py import.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from support.databases import pg_available, pg_db, sqlite_db  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.5
MODELS = 200
DAYS = 60
EVENTS_PER_MODEL = 5_000  # the large trail: 1,000,000 events, 200 models

COLUMNS = ("seq", "created_at", "action", "actor", "actor_name", "model", "version", "request_id", "job_id",
           "channel", "message_ts", "details", "prev_hash", "hash")
# The bare select: the columns Registry.audit_events returns, its WHERE, ORDER BY and LIMIT.
QUERY_SQL = ("SELECT seq, created_at, action, actor, actor_name, model, version, request_id, job_id, channel, "
             "message_ts, details FROM audit_events WHERE model = {p} AND created_at >= {p} "
             "ORDER BY created_at DESC, seq DESC LIMIT 20")

_PREFIX = ["audit"]


def log(msg: str) -> None:
    print(f"[{_PREFIX[0]}] {msg}", file=sys.stderr, flush=True)


def set_log_prefix(name: str) -> None:
    _PREFIX[0] = name


def model_name(i: int) -> str:
    return f"m{i:03d}"


# ---------------------------------------------------------------------- events with a valid chain


def generate_events(n: int, end: datetime, *, models: int = MODELS, days: int = DAYS, seed: int = 7,
                    start_seq: int = 1, prev_hash: str | None = None) -> Iterator[tuple]:
    """n events (tuples in COLUMNS order) spread evenly over `days` days up to `end`, created_at increasing
    with seq, each model drawn at random; prev_hash/hash form the chain model_registry.adapters.audit_log.verify checks."""
    from model_registry.adapters import audit_log as audit
    from model_registry.domain.diffs import canonical

    rng = random.Random(seed)
    event_hash, actions = audit.event_hash, audit.ACTIONS
    prev = prev_hash or audit.GENESIS
    step = max(1, days * 86_400_000_000 // max(n, 1))  # microseconds between events
    start = end - timedelta(days=days)
    us = timedelta(microseconds=1)
    for seq in range(start_seq, start_seq + n):
        at = start + us * ((seq - start_seq) * step + rng.randrange(step))
        m = rng.randrange(models)
        action = actions[rng.randrange(len(actions))]
        u = rng.randrange(60)
        has_req = action.startswith(("promotion", "approval", "rollback"))
        version = f"v2024{(seq % 12) + 1:02d}{(seq % 28) + 1:02d}{seq % 86400:06d}"
        details = canonical({"reason": "scheduled retrain" if seq % 3 else "manual", "args": ["--epochs=10"],
                             "n": seq % 1000})
        row = {
            "seq": seq, "created_at": at.isoformat(timespec="microseconds"), "action": action,
            "actor": f"U{u:08d}", "actor_name": f"user{u}", "model": model_name(m), "version": version,
            "request_id": (seq // 7) if has_req else None, "job_id": f"{model_name(m)}_{version[1:]}",
            "channel": "C0AUDIT01", "message_ts": f"{1_700_000_000 + seq}.{seq % 1_000_000:06d}",
            "details": details, "prev_hash": prev,
        }
        h = event_hash(row)
        yield (seq, at, action, row["actor"], row["actor_name"], row["model"], version, row["request_id"],
               row["job_id"], row["channel"], row["message_ts"], details, prev, h)
        prev = h


def _sqlite_time(at: datetime) -> str:
    # SQLAlchemy's storage format for DateTime on SQLite
    return at.isoformat(sep=" ", timespec="microseconds")


def load_events(kind: str, connect: Callable[[], Any], n: int, end: datetime, table: str = "audit_events",
                **kw: Any) -> tuple[int, str]:
    """Bulk insert n chained events into an empty audit_events and point audit_head at the last one
    (or into another table of the same shape, then audit_head is left alone)."""
    last = [0, ""]

    def tracked() -> Iterator[tuple]:
        for row in generate_events(n, end, **kw):
            last[0], last[1] = row[0], row[-1]
            yield row

    cols = ", ".join(COLUMNS)
    if kind == "sqlite":
        conn = connect()
        try:
            conn.isolation_level = None
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA cache_size=-400000")
            conn.execute("BEGIN")
            conn.executemany(
                f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})",
                ((r[0], _sqlite_time(r[1]), *r[2:]) for r in tracked()),
            )
            if table == "audit_events":
                conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (last[0], last[1]))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    else:
        conn = connect()
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                        for row in tracked():
                            copy.write_row(row)
                    if table == "audit_events":
                        cur.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", (last[0], last[1]))
            conn.execute(f"VACUUM ANALYZE {table}")  # what autovacuum does after a bulk load
        finally:
            conn.close()
    return last[0], last[1]


# ---------------------------------------------------------------------- registry and databases


def make_registry(home: Path, db_url: str, models: int = MODELS) -> Any:
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    home.mkdir(parents=True, exist_ok=True)
    raw = {
        "trainer_base": str(home / "trainers"),
        "model_files": str(home / "models"),
        "defaults": {"approvers": [], "required_approvals": 1, "allow_self_approval": False, "request_expiry": "72h"},
        "models": {model_name(i): {} for i in range(models)},
    }
    settings = Settings.from_env({"STARCHART_HOME": str(home), "DATABASE_URL": db_url,
                                  "STARCHART_CONFIG": str(home / "starchart.yaml")})
    return bootstrap(settings, ProjectConfig.from_dict(raw, home))


def databases(opts: Any, work: Path) -> tuple[list[tuple[str, Callable[[], Any]]], dict[str, str]]:
    dbs: list[tuple[str, Callable[[], Any]]] = [("sqlite", lambda: sqlite_db(work))]
    skipped: dict[str, str] = {}
    if opts.smoke or opts.sqlite_only:
        skipped["postgresql"] = "not requested"
    elif pg_available():
        dbs.append(("postgresql", pg_db))
    else:
        skipped["postgresql"] = "unreachable at 127.0.0.1:5432"
        log("PostgreSQL is not reachable at 127.0.0.1:5432: measuring SQLite only")
    return dbs, skipped


# ---------------------------------------------------------------------- timing


def alternate(sides: dict[str, Callable[[int], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Time each side `reps` times, interleaved (each gets the round number); the first side rotates."""
    for i in range(warmup):
        for fn in sides.values():
            fn(i)
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = sides[name]
            t0 = clock()
            fn(i)
            times[name].append(clock() - t0)
    return times


def profile(fn: Callable[[int], Any], calls: int, label: str) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        fn(i)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    buf.write(f"==== cProfile of {label}, {calls} calls: by internal time ====\n")
    stats.sort_stats("tottime").print_stats(15)
    buf.write(f"==== cProfile of {label}: by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(25)
    return buf.getvalue()


# ---------------------------------------------------------------------- the query benchmark


def explain(kind: str, cur: Any, sql: str, params: tuple) -> list[str]:
    if kind == "sqlite":
        cur.execute("EXPLAIN QUERY PLAN " + sql, params)
        return [str(r[-1]) for r in cur.fetchall()]
    cur.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + sql, params)
    return [str(r[0]) for r in cur.fetchall()]


def captured_sql(reg: Any, call: Callable[[], Any]) -> list[str]:
    """What reaches the database during `call`: the statements the driver runs (SQLite's trace callback; psycopg
    cursors, with the BEGIN psycopg sends by itself), pool checkouts and check-ins, SQLAlchemy begin/rollback."""
    from sqlalchemy import event

    sent: list[str] = []
    engine = reg.db.engine
    sqlite = engine.dialect.name == "sqlite"

    def short(statement: str) -> str:
        return " ".join(statement.split())[:60]

    if not sqlite:
        import psycopg

        class Recording(psycopg.Cursor):  # type: ignore[type-arg]
            def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
                conn = self.connection
                if not conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    sent.append("BEGIN (psycopg)")
                sent.append(short(str(query)))
                return super().execute(query, params, **kw)

    def checkout(dbapi_conn: Any, _rec: Any, _proxy: Any) -> None:
        sent.append("(pool checkout)")
        if sqlite:
            dbapi_conn.set_trace_callback(lambda statement: sent.append(short(statement)))
        else:
            dbapi_conn.cursor_factory = Recording

    def checkin(dbapi_conn: Any, _rec: Any) -> None:
        sent.append("(pool checkin)")
        if dbapi_conn is None:
            return
        if sqlite:
            dbapi_conn.set_trace_callback(None)
        else:
            dbapi_conn.cursor_factory = psycopg.Cursor

    def begin(_conn: Any) -> None:
        sent.append("(sqlalchemy begin)")

    def rollback(_conn: Any) -> None:
        sent.append("(sqlalchemy rollback)")

    hooks = (("checkout", checkout), ("checkin", checkin), ("begin", begin), ("rollback", rollback))
    for name, fn in hooks:
        event.listen(engine, name, fn)
    try:
        call()
    finally:
        for name, fn in hooks:
            event.remove(engine, name, fn)
    return sent


def models_for(events: int) -> int:
    return max(1, min(MODELS, events // EVENTS_PER_MODEL))


def captured_statement(reg: Any, call: Callable[[], Any]) -> tuple[str, Any] | None:
    """The SQL and parameters SQLAlchemy sends to the driver during `call` (the last one; None if none)."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(reg.db.engine, "before_cursor_execute", before)
    try:
        call()
    finally:
        event.remove(reg.db.engine, "before_cursor_execute", before)
    return seen[-1] if seen else None


class Trail:
    """One database with an audit trail of `events` events, its Registry and a raw DB-API cursor."""

    def __init__(self, kind: str, db: Any, home: Path, events: int, now: datetime) -> None:
        url, connect, placeholder = db
        self.kind, self.events, self.models = kind, events, models_for(events)
        t0 = time.perf_counter()
        self.reg = make_registry(home, url, self.models)
        load_events(kind, connect, events, now, models=self.models)
        self.load_s = time.perf_counter() - t0
        log(f"{kind}: {events:,} chained events across {self.models} models over {DAYS} days loaded "
            f"in {self.load_s:.1f}s")
        self.since = now - timedelta(days=7)
        self.since_param: Any = _sqlite_time(self.since) if kind == "sqlite" else self.since
        self.sql = QUERY_SQL.format(p=placeholder)
        self.names = [model_name(i) for i in range(self.models)]
        random.Random(3).shuffle(self.names)
        self.conn = connect()
        self.cur = self.conn.cursor()

    def project(self, i: int) -> list[dict[str, Any]]:
        return self.reg.audit.events(model=self.names[i % self.models], since=self.since, limit=20)

    def bare(self, i: int) -> list[Any]:
        self.cur.execute(self.sql, (self.names[i % self.models], self.since_param))
        return self.cur.fetchall()

    def close(self) -> None:
        self.cur.close()
        self.conn.close()
        self.reg.db.engine.dispose()


def run_database(kind: str, open_db: Callable[[str], Any], work: Path, events: int, small: int, reps: int,
                 warmup: int, do_profile: bool) -> dict[str, Any]:
    now = datetime.now().replace(microsecond=0) - timedelta(hours=1)  # naive, like names.utcnow()
    with contextlib.ExitStack() as stack:
        trails = {}
        for size, n in (("large", events), ("small", small)):
            trail = Trail(kind, stack.enter_context(open_db(f"{kind}-{size}")), work / f"home-{kind}-{size}", n, now)
            stack.callback(trail.close)
            trails[size] = trail
        large, little = trails["large"], trails["small"]
        for trail in (large, little):
            for i in range(min(trail.models, 20)):  # the Registry returns what the bare select returns
                if [r["seq"] for r in trail.project(i)] != [r[0] for r in trail.bare(i)]:
                    raise SystemExit(f"{kind}: Registry.audit_events and the bare select disagree "
                                     f"({trail.events:,} events)")
        rows = {size: len(trail.bare(0)) for size, trail in trails.items()}
        if rows["large"] != rows["small"]:
            log(f"{kind}: WARNING: {rows['large']} rows per call on the large trail, {rows['small']} on the small one")
        sent = captured_statement(large.reg, lambda: large.project(0))
        plan_registry = explain(kind, large.cur, *sent) if sent else ["(no statement went through SQLAlchemy)"]
        plan_bare = explain(kind, large.cur, large.sql, (large.names[0], large.since_param))
        statements = captured_sql(large.reg, lambda: large.project(0))
        log(f"{kind}: plan of the Registry's select ({events:,} events): {' | '.join(plan_registry)}")
        log(f"{kind}: statements the Registry sends per call: {statements}")
        sides = {"registry_large": large.project, "registry_small": little.project, "bare_large": large.bare}
        times = alternate(sides, reps, warmup)
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = med["registry_large"] / med["registry_small"]
        log(f"{kind:<10} Registry.audit_events at {events:,} events {med['registry_large'] * 1000:7.3f} ms, "
            f"at {small:,} events {med['registry_small'] * 1000:7.3f} ms: ratio {ratio:5.2f} "
            f"(min {min(times['registry_large']) * 1000:.3f} / {min(times['registry_small']) * 1000:.3f} ms, "
            f"{reps} alternating reps, {rows['large']} rows per call)")
        log(f"{kind:<10} bare select at {events:,} events {med['bare_large'] * 1000:7.3f} ms: the Registry's call "
            f"is {med['registry_large'] / med['bare_large']:.2f}x it")
        if do_profile:
            print(profile(large.project, max(reps, 200), f"Registry.audit_events on {kind}"), file=sys.stderr)
        return {
            "ratio": ratio, "measured_ms": med["registry_large"] * 1000, "baseline_ms": med["registry_small"] * 1000,
            "ratio_of_minimums": min(times["registry_large"]) / min(times["registry_small"]),
            "ratio_vs_bare": med["registry_large"] / med["bare_large"], "rows_per_call": rows,
            "load_s": {size: trail.load_s for size, trail in trails.items()},
            "plan_bare": plan_bare, "plan_registry": plan_registry,
            "medians_ms": {k: round(v * 1000, 4) for k, v in med.items()}, "statements_per_call": statements,
        }


def main() -> int:
    set_log_prefix("audit_queries")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 against 1,000 events (< 1 minute on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 2,000 against 200 events")
    ap.add_argument("--events", type=int, help="events in the large trail (default 1,000,000)")
    ap.add_argument("--small", type=int, help="events in the small trail (default the large one / 100)")
    ap.add_argument("--reps", type=int, help="timed calls per side (default 300; 100 with --quick; 10 with --smoke)")
    ap.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL even when it is reachable")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of Registry.audit_events to stderr")
    opts = ap.parse_args()
    events = opts.events or (2_000 if opts.smoke else 100_000 if opts.quick else 1_000_000)
    small = opts.small or max(200, events // 100)
    reps = opts.reps or (10 if opts.smoke else 100 if opts.quick else 300)
    warmup = 2 if opts.smoke else 10

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-audit-queries-"))
    dbs, skipped = databases(opts, work)
    log(f"work dir {work}; {events:,} against {small:,} events; {reps} alternating reps per side; databases "
        f"{', '.join(k for k, _ in dbs)}")
    openers = {"sqlite": lambda name: sqlite_db(work, name), "postgresql": lambda _name: pg_db()}
    per_db: dict[str, dict[str, Any]] = {}
    try:
        for kind, _open in dbs:
            per_db[kind] = run_database(kind, openers[kind], work, events, small, reps, warmup, opts.profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst_kind = max(per_db, key=lambda k: per_db[k]["ratio"])
    worst = per_db[worst_kind]
    meets = all(v["ratio"] <= TARGET for v in per_db.values())
    log("ratios: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in per_db.items()) + f"; worst {worst_kind}")
    log(f"target: every ratio <= {TARGET}; measured: worst {worst['ratio']:.2f} "
        f"({'meets' if meets else 'misses'} the target)")
    print(json.dumps({
        "benchmark": "audit_queries",
        "ratio": round(worst["ratio"], 4),
        "better": "lower",
        "measured": round(worst["measured_ms"], 4),
        "baseline": round(worst["baseline_ms"], 4),
        "unit": "ms",
        "worst": worst_kind,
        "target": TARGET,
        "meets_target": meets,
        "ratios": {k: round(v["ratio"], 3) for k, v in per_db.items()},
        # registry_large / registry_small: the headline; bare_large: the raw DB-API select on the large trail
        "medians_ms": {k: v["medians_ms"] for k, v in per_db.items()},
        "ratios_vs_bare_select": {k: round(v["ratio_vs_bare"], 3) for k, v in per_db.items()},
        "statements_per_call": {k: v["statements_per_call"] for k, v in per_db.items()},
        "ratios_of_minimums": {k: round(v["ratio_of_minimums"], 3) for k, v in per_db.items()},
        "plans": {k: {"bare": v["plan_bare"], "registry": v["plan_registry"]} for k, v in per_db.items()},
        "load_s": {k: {n: round(t, 2) for n, t in v["load_s"].items()} for k, v in per_db.items()},
        "rows_per_call": {k: v["rows_per_call"] for k, v in per_db.items()},
        "events": events,
        "events_small": small,
        "models": {"large": models_for(events), "small": models_for(small)},
        "days": DAYS,
        "query": "model=M, since=now-7d, limit=20",
        "runs": reps,
        "skipped": skipped,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
