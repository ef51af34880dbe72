#!/usr/bin/env python
"""Benchmark: audit appends with the hash chain against plain inserts of the same rows, one event per
transaction on both sides, on SQLite and on PostgreSQL (127.0.0.1:5432, user postgres, database test; a
temporary database is created and dropped).

- chain: `AuditLog.append(session, ...)` inside the core's `db.unit_of_work()`, as the product records every event
  (locks audit_head, reads the previous hash, hashes the canonical encoding, inserts, moves the head, commits).
- plain: one `INSERT` of the same field values per transaction through the raw DB-API connection (sqlite3 with
  BEGIN IMMEDIATE ... COMMIT as the product's SQLite sessions begin; psycopg, commit per row), into
  `audit_plain`, a scratch table of the same shape (same columns, primary key, unique prev_hash and the same four
  indexes, copied from the migrated audit_events) without the append-only triggers, with dummy hashes.
- sqlalchemy_plain (extra, not the baseline): the same plain INSERT through the core's `db.unit_of_work()` with
  SQLAlchemy Core, to split what the chain costs from what the session costs.

Both tables are first filled with the same N events (1,000,000; `--quick` 100,000; `--smoke` 2,000), so the
appends land on indexes of the issue's size. Then the sides run in alternating batches (the first side rotates
every round) on the same database; rates are events per second, the ratio is chain rate / plain rate (median
of the batch rates), the headline the worst database. Target: >= 0.5.

    python benchmarks/audit_append.py [--quick | --smoke] [--events N] [--rounds N] [--batch N] [--sqlite-only]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import audit_queries as common  # noqa: E402  (the shared helpers: generator, loader, databases)

TARGET = 0.5
PLAIN = "audit_plain"


def log(msg: str) -> None:
    common.log(msg)


def copy_table_shape(kind: str, connect: Callable[[], Any]) -> None:
    """audit_plain: audit_events' columns, keys and indexes, without its triggers."""
    conn = connect()
    try:
        if kind == "sqlite":
            ddl = conn.execute("SELECT type, sql FROM sqlite_master WHERE tbl_name = 'audit_events' "
                               "AND type IN ('table', 'index') AND sql IS NOT NULL ORDER BY type DESC").fetchall()
            for _type, sql in ddl:
                conn.execute(sql.replace("audit_events", PLAIN).replace("ix_audit_", "ix_plain_"))
            conn.commit()
        else:
            conn.execute(f"CREATE TABLE {PLAIN} (LIKE audit_events INCLUDING ALL)")
    finally:
        conn.close()


def event_fields(i: int) -> dict[str, Any]:
    """The i-th appended event's fields (both sides write the same values)."""
    from model_registry.adapters import audit_log as audit

    action = audit.ACTIONS[i % len(audit.ACTIONS)]
    m = common.model_name(i % common.MODELS)
    return {
        "action": action, "actor": f"U{i % 60:08d}", "actor_name": f"user{i % 60}", "model": m,
        "version": f"v20240101{i % 86400:06d}", "request_id": i // 3 if action.startswith("promotion") else None,
        "job_id": f"{m}_20240101{i % 86400:06d}", "channel": "C0AUDIT01", "message_ts": f"{1_700_000_000 + i}.000100",
        "details": {"reason": "scheduled retrain", "args": ["--epochs=10"], "n": i % 1000},
    }


def run_database(kind: str, db: Any, work: Path, events: int, rounds: int, batch: int, check: bool
                 ) -> dict[str, Any]:
    from sqlalchemy import MetaData, insert

    from model_registry.adapters.records import AuditEvent
    from model_registry.domain.diffs import canonical
    from model_registry.domain.names import utcnow

    url, connect, ph = db
    reg = common.make_registry(work / f"home-{kind}", url)
    try:
        copy_table_shape(kind, connect)
        end = datetime.now().replace(microsecond=0) - timedelta(hours=1)
        t0 = time.perf_counter()
        common.load_events(kind, connect, events, end)
        common.load_events(kind, connect, events, end, table=PLAIN)
        log(f"{kind}: audit_events and {PLAIN} each filled with {events:,} events in {time.perf_counter() - t0:.1f}s")

        total = rounds * batch
        fields = [event_fields(i) for i in range(total + batch)]  # + batch for the warm-up round
        details_text = [canonical(f["details"]) for f in fields]
        counters = {"chain": 0, "plain": 0, "sqlalchemy_plain": 0}
        plain_seq = [events]

        def chain_one() -> None:
            i = counters["chain"]
            counters["chain"] += 1
            with reg.db.unit_of_work() as s:
                reg.audit_log.append(s, **fields[i])

        cols = ", ".join(common.COLUMNS)
        plain_sql = f"INSERT INTO {PLAIN} ({cols}) VALUES ({', '.join([ph] * len(common.COLUMNS))})"
        conn = connect()
        if kind == "sqlite":
            conn.isolation_level = None
            conn.execute("PRAGMA busy_timeout=60000")
        else:
            conn.autocommit = False

        def plain_row(key: str) -> tuple:
            i = counters[key]
            counters[key] += 1
            plain_seq[0] += 1
            seq, f = plain_seq[0], fields[i]
            return (seq, utcnow(), f["action"], f["actor"], f["actor_name"], f["model"], f["version"],
                    f["request_id"], f["job_id"], f["channel"], f["message_ts"], details_text[i],
                    f"plain-{seq:058d}", f"{seq:064x}")

        if kind == "sqlite":
            def plain_one() -> None:
                row = plain_row("plain")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(plain_sql, (row[0], common._sqlite_time(row[1]), *row[2:]))
                conn.execute("COMMIT")
        else:
            def plain_one() -> None:
                conn.execute(plain_sql, plain_row("plain"))
                conn.commit()

        plain_table = AuditEvent.__table__.to_metadata(MetaData(), name=PLAIN)
        plain_stmt = insert(plain_table)

        def sqlalchemy_plain_one() -> None:
            row = dict(zip(common.COLUMNS, plain_row("sqlalchemy_plain")))
            with reg.db.unit_of_work() as s:
                s.execute(plain_stmt, row)

        one = {"chain": chain_one, "plain": plain_one, "sqlalchemy_plain": sqlalchemy_plain_one}
        names = list(one)
        batch_s: dict[str, list[float]] = {n: [] for n in names}
        clock = time.perf_counter
        try:
            for r in range(rounds + 1):  # round 0 warms up, untimed
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    fn = one[name]
                    t0 = clock()
                    for _ in range(batch):
                        fn()
                    if r:
                        batch_s[name].append(clock() - t0)
        finally:
            conn.close()

        rates = {n: statistics.median(batch / t for t in ts) for n, ts in batch_s.items()}
        overall = {n: batch * len(ts) / sum(ts) for n, ts in batch_s.items()}
        ratio = rates["chain"] / rates["plain"]
        log(f"{kind:<10} chain {rates['chain']:8.0f} ev/s   plain {rates['plain']:8.0f} ev/s   ratio {ratio:5.2f}   "
            f"(SQLAlchemy plain {rates['sqlalchemy_plain']:.0f} ev/s; {rounds} rounds x {batch} per side)")
        result = {"ratio": ratio, "rates": rates, "overall_rates": overall,
                  "ratio_vs_sqlalchemy_plain": rates["chain"] / rates["sqlalchemy_plain"],
                  "ms_per_event": {n: 1000 / v for n, v in rates.items()}}
        if check:
            v = reg.audit.verify(checkpoints=[])
            if not v.ok or v.events != events + counters["chain"]:
                raise SystemExit(f"{kind}: the chain does not verify after the appends: {v}")
            result["verified_events"] = v.events
            log(f"{kind}: chain of {v.events:,} events verifies after the appends")
        return result
    finally:
        reg.db.engine.dispose()


def main() -> int:
    common.set_log_prefix("audit_append")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 events before, 15 rounds (< 1 minute on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 2,000 events, SQLite only")
    ap.add_argument("--events", type=int, help="events in each table before the appends (default 1,000,000)")
    ap.add_argument("--rounds", type=int, help="timed batches per side (default 30; 15 with --quick; 2 with --smoke)")
    ap.add_argument("--batch", type=int, help="transactions per batch (default 80; 40 with --quick; 20 with --smoke)")
    ap.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL even when it is reachable")
    opts = ap.parse_args()
    events = opts.events if opts.events is not None else (
        2_000 if opts.smoke else 100_000 if opts.quick else 1_000_000)
    # many short batches: the median batch rate shrugs off fsync stalls caused by other processes
    rounds = opts.rounds or (2 if opts.smoke else 15 if opts.quick else 30)
    batch = opts.batch or (20 if opts.smoke else 40 if opts.quick else 80)

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-audit-append-"))
    dbs, skipped = common.databases(opts, work)
    log(f"work dir {work}; {events:,} events before; {rounds} rounds x {batch} transactions per side; databases "
        f"{', '.join(k for k, _ in dbs)}")
    per_db: dict[str, dict[str, Any]] = {}
    try:
        for kind, open_db in dbs:
            with open_db() as db:
                per_db[kind] = run_database(kind, db, work, events, rounds, batch, check=events <= 20_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst_kind = min(per_db, key=lambda k: per_db[k]["ratio"])
    worst = per_db[worst_kind]
    log("ratios: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in per_db.items())
        + f"; worst {worst_kind} (target >= {TARGET})")
    print(json.dumps({
        "benchmark": "audit_append",
        "ratio": round(worst["ratio"], 4),
        "better": "higher",
        "measured": round(worst["rates"]["chain"], 1),
        "baseline": round(worst["rates"]["plain"], 1),
        "unit": "events/s",
        "worst": worst_kind,
        "target": TARGET,
        "meets_target": all(v["ratio"] >= TARGET for v in per_db.values()),
        "ratios": {k: round(v["ratio"], 3) for k, v in per_db.items()},
        "rates": {k: {n: round(r, 1) for n, r in v["rates"].items()} for k, v in per_db.items()},
        "overall_rates": {k: {n: round(r, 1) for n, r in v["overall_rates"].items()} for k, v in per_db.items()},
        "ms_per_event": {k: {n: round(r, 4) for n, r in v["ms_per_event"].items()} for k, v in per_db.items()},
        # the chain against the same plain INSERT sent through Registry.unit_of_work (SQLAlchemy): the chain's own cost
        "ratios_vs_sqlalchemy_plain": {k: round(v["ratio_vs_sqlalchemy_plain"], 3) for k, v in per_db.items()},
        "events": events,
        "appended_per_side": rounds * batch,
        "rounds": rounds,
        "batch": batch,
        "skipped": skipped,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
