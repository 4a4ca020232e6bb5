#!/usr/bin/env bash
# The scale-out test on loopback: a real PostgreSQL (Debian's `postgresql`, installed when
# missing) and an S3-protocol server (npm `s3rver`, pinned in tests/scale-out/), both started
# here in a scratch folder and stopped on exit; then `cargo test --test scale_out` runs two API
# replicas and two workers of the debug binary against them. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
  echo "scale-out-test: installing Debian's postgresql" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
(cd tests/scale-out && npm ci --no-audit --no-fund --silent)

SCRATCH=$(mktemp -d /tmp/picie-scale-out.XXXXXX)
chmod 755 "$SCRATCH"
# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user the
# Debian package creates.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$SCRATCH/pg"
[ "$(id -u)" = 0 ] && chown postgres "$SCRATCH/pg"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port)
S3_PORT=$(free_port)

cleanup() {
  as_pg "$PG_BIN/pg_ctl" -D "$SCRATCH/pg/data" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null || true
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

as_pg "$PG_BIN/initdb" -D "$SCRATCH/pg/data" -U picie --auth=trust -E UTF8 >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$SCRATCH/pg/data" -l "$SCRATCH/pg/log" -w \
  -o "-p $PG_PORT -k $SCRATCH/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U picie picie
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U picie picie_leases
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U picie picie_events

mkdir -p "$SCRATCH/s3"
tests/scale-out/node_modules/.bin/s3rver -d "$SCRATCH/s3" -a 127.0.0.1 -p "$S3_PORT" --configure-bucket picie >"$SCRATCH/s3.log" 2>&1 &
S3_PID=$!
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$S3_PORT/" >/dev/null 2>&1 && break
  sleep 0.2
done

echo "scale-out-test: PostgreSQL on 127.0.0.1:$PG_PORT, s3rver on 127.0.0.1:$S3_PORT" >&2
export PICIE_TEST_DATABASE_URL="postgres://picie@127.0.0.1:$PG_PORT/picie"
export PICIE_TEST_LEASE_DATABASE_URL="postgres://picie@127.0.0.1:$PG_PORT/picie_leases"
export PICIE_TEST_EVENTS_DATABASE_URL="postgres://picie@127.0.0.1:$PG_PORT/picie_events"
export PICIE_TEST_STORE="s3://picie/scale-out"
# s3rver's fixed credentials; the endpoint speaks plain HTTP.
export AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER AWS_REGION=us-east-1 \
  AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true
cargo test --locked --test scale_out "$@" -- --nocapture
