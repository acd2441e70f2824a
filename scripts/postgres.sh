#!/usr/bin/env bash
# Make sure the machine's PostgreSQL (127.0.0.1:5432) answers, starting its cluster if it is down.
# The assets service keeps its state there; `postroom up` then migrates its tables.
set -euo pipefail

answers() { pg_isready -q -h 127.0.0.1 -p 5432; }

if ! answers; then
  echo "postgres: PostgreSQL is down, starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
fi
for _ in $(seq 1 60); do
  answers && break
  sleep 1
done
if ! answers; then
  echo "postgres: PostgreSQL still does not answer after 60 s" >&2
  exit 1
fi
echo "postgres: PostgreSQL answers"
# the tests' database: each test module makes a schema of its own there, and drops it
if [ -z "$(psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]; then
  createdb -h 127.0.0.1 -U postgres test
fi
