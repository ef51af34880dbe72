#!/usr/bin/env bash
# Start the machine's PostgreSQL if it is down (tests run against it as well as SQLite).
set -u
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then exit 0; fi
if command -v pg_lsclusters >/dev/null 2>&1; then
  version=$(pg_lsclusters -h | awk '{print $1; exit}')
  [ -n "$version" ] && pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && exit 0
  sleep 1
done
echo "PostgreSQL is not reachable on 127.0.0.1:5432; the PostgreSQL tests will be skipped" >&2
exit 0
