#!/usr/bin/env python
"""Benchmark: `starchart audit verify` (Registry.verify_audit -> audit.verify, which streams the chain in keyset
pages) over 100,000 and 1,000,000 events (`--quick`: 20,000 and 100,000; `--smoke`: 500 and 2,000), measuring
its peak memory at each size: the claim is that verify streams, so its peak memory does not grow with the table.

The parent process fills one SQLite database per size with a valid hash chain (the generator and bulk loader of
benchmarks/audit_queries.py; the Registry's migrations create the schema), then runs each verify in a fresh
subprocess, which builds the Registry, warms it up (one ORM select of an audit row), resets its peak-RSS mark
(`/proc/self/clear_refs`), reads its RSS, verifies, and reads its peak RSS (VmHWM; not ru_maxrss, which Linux
carries over fork and exec, so a child started by a parent that loaded a million rows would report the parent's).
Growth = peak during verify - RSS just before it. ratio = growth at the large size / growth at the small size
(better: lower; about 1 when memory does not grow with the table, about 10 if it grew linearly). Verify speed
(events/s) is reported per size as well. verify fetches 5,000 events a page, so sizes below that (the smoke
run) grow with the table by construction; the claim is about sizes well above a page. `--postgresql` also measures on a temporary PostgreSQL database
(127.0.0.1:5432, user postgres, database test; created and dropped); the headline is the worst database.

    python benchmarks/audit_verify.py [--quick | --smoke] [--sizes SMALL,LARGE] [--postgresql]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import audit_queries as common  # noqa: E402  (the shared helpers: generator, loader, databases)

MAX_RATIO = 1.5  # "does not grow with the table": 10x the events, at most 1.5x the memory growth


def log(msg: str) -> None:
    common.log(msg)


def _status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError):  # not Linux: no /proc, no number
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    return None


def child(home: str, url: str, expect: int) -> int:
    """Runs in a fresh process: verify the chain once and report memory and time as JSON on stdout."""
    from sqlalchemy import select

    from model_registry.adapters.records import AuditEvent

    reg = common.make_registry(Path(home), url)
    with reg.db.sessions() as s:  # warm up: mapper configured, connection open, statement caches primed
        s.execute(select(AuditEvent).where(AuditEvent.seq > 0).order_by(AuditEvent.seq).limit(1)).scalars().all()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS mark := current RSS
    except OSError:
        reset = False
    rss_before = _status_kb("VmRSS") or 0
    hwm_before = _status_kb("VmHWM") or 0
    t0 = time.perf_counter()
    result = reg.audit.verify(checkpoints=[])
    seconds = time.perf_counter() - t0
    hwm_after = _status_kb("VmHWM") or 0
    reg.db.engine.dispose()
    if not result.ok or result.events != expect:
        print(json.dumps({"error": f"verify said ok={result.ok}, events={result.events} ({result.problem}); "
                                   f"expected {expect} valid events"}))
        return 1
    print(json.dumps({"events": result.events, "seconds": seconds, "rss_before_kb": rss_before,
                      "hwm_before_kb": hwm_before, "peak_kb": hwm_after,
                      "growth_kb": hwm_after - rss_before, "hwm_reset": reset}))
    return 0


def measure(kind: str, db: Any, work: Path, events: int) -> dict[str, Any]:
    url, connect, _ph = db
    home = work / f"home-{kind}-{events}"
    reg = common.make_registry(home, url)  # the migrations create the schema
    reg.db.engine.dispose()
    t0 = time.perf_counter()
    common.load_events(kind, connect, events, datetime.now().replace(microsecond=0) - timedelta(hours=1))
    log(f"{kind}: {events:,} chained events loaded in {time.perf_counter() - t0:.1f}s; verifying in a fresh process")
    proc = subprocess.run([sys.executable, __file__, "--child", str(home), url, str(events)],
                          capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "error" in out or not out:
        raise SystemExit(f"{kind}: the verify subprocess failed: {out.get('error') or proc.stderr[-2000:]}")
    out["events_per_s"] = out["events"] / out["seconds"]
    log(f"{kind:<10} {events:>9,} events: verify {out['seconds']:6.2f}s ({out['events_per_s']:8.0f} ev/s); "
        f"RSS before {out['rss_before_kb'] / 1024:6.1f} MiB, peak {out['peak_kb'] / 1024:6.1f} MiB "
        f"growth {out['growth_kb'] / 1024:6.1f} MiB")
    return out


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        common.set_log_prefix("audit_verify:child")
        return child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    common.set_log_prefix("audit_verify")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 and 100,000 events (< 1 minute on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 500 and 2,000 events")
    ap.add_argument("--sizes", help="SMALL,LARGE event counts (default 100000,1000000)")
    ap.add_argument("--postgresql", action="store_true", help="also measure on PostgreSQL when it is reachable")
    ap.add_argument("--sqlite-only", action="store_true", help="SQLite only (the default; kept for symmetry)")
    opts = ap.parse_args()
    if opts.sizes:
        small, large = (int(x) for x in opts.sizes.split(","))
    else:
        small, large = (500, 2_000) if opts.smoke else (20_000, 100_000) if opts.quick else (100_000, 1_000_000)

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-audit-verify-"))
    kinds = ["sqlite"]
    skipped: dict[str, str] = {}
    if opts.postgresql and not (opts.smoke or opts.sqlite_only):
        if common.pg_available():
            kinds.append("postgresql")
        else:
            skipped["postgresql"] = "unreachable at 127.0.0.1:5432"
    else:
        skipped["postgresql"] = "not requested (--postgresql)"
    log(f"work dir {work}; sizes {small:,} and {large:,} events; databases {', '.join(kinds)}")
    per_db: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds:
            sizes = {}
            for n in (small, large):
                opener = common.sqlite_db(work, f"sqlite-{n}") if kind == "sqlite" else common.pg_db()
                with opener as db:
                    sizes[n] = measure(kind, db, work, n)
            g_small = max(sizes[small]["growth_kb"], 1)
            g_large = max(sizes[large]["growth_kb"], 1)
            per_db[kind] = {"ratio": g_large / g_small, "sizes": sizes}
            log(f"{kind}: peak growth {g_small / 1024:.1f} MiB at {small:,} events, {g_large / 1024:.1f} MiB at "
                f"{large:,}: ratio {g_large / g_small:.2f} for {large / small:.0f}x the events")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst_kind = max(per_db, key=lambda k: per_db[k]["ratio"])
    worst = per_db[worst_kind]
    big = worst["sizes"][large]
    print(json.dumps({
        "benchmark": "audit_verify",
        "ratio": round(worst["ratio"], 4),
        "better": "lower",
        "measured": round(big["growth_kb"] / 1024, 2),
        "baseline": round(max(worst["sizes"][small]["growth_kb"], 1) / 1024, 2),
        "unit": "MiB (peak RSS growth during verify: large size / small size)",
        "worst": worst_kind,
        "target": MAX_RATIO,
        "meets_target": all(v["ratio"] <= MAX_RATIO for v in per_db.values()),
        "ratios": {k: round(v["ratio"], 3) for k, v in per_db.items()},
        "events": large,
        "sizes": [small, large],
        "size_ratio": large / small,
        "peak_rss_mib": {k: {str(n): round(s["peak_kb"] / 1024, 1) for n, s in v["sizes"].items()}
                         for k, v in per_db.items()},
        "rss_before_mib": {k: {str(n): round(s["rss_before_kb"] / 1024, 1) for n, s in v["sizes"].items()}
                           for k, v in per_db.items()},
        "growth_mib": {k: {str(n): round(s["growth_kb"] / 1024, 2) for n, s in v["sizes"].items()}
                       for k, v in per_db.items()},
        "events_per_s": {k: {str(n): round(s["events_per_s"], 1) for n, s in v["sizes"].items()}
                         for k, v in per_db.items()},
        "verify_s": {k: {str(n): round(s["seconds"], 3) for n, s in v["sizes"].items()} for k, v in per_db.items()},
        "hwm_reset": all(s["hwm_reset"] for v in per_db.values() for s in v["sizes"].values()),
        "skipped": skipped,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
