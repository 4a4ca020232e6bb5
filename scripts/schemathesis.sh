#!/usr/bin/env bash
# Checks the live server against its own OpenAPI document with schemathesis (PyPI): every
# status, content type and body each route answers must be documented, schema-valid requests
# must not be rejected as invalid, and nothing may answer 5xx. Runs a bounded number of
# examples per operation with a fixed seed, against a server with an API key on loopback.
#   scripts/schemathesis.sh [PICIE_BIN]        (default target/debug/picie)
# Environment: ST_MAX_EXAMPLES (default 25), ST_VERSION (default pinned below).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/target/debug/picie}"
ST_VERSION="${ST_VERSION:-4.32.5}"
VENV="$ROOT/target/schemathesis-venv"
if [ ! -x "$VENV/bin/st" ] || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  echo "schemathesis: installing schemathesis $ST_VERSION from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

WORK="$(mktemp -d)"
# The server edits packages (class names): give it a copy of the shipped models.
cp -r "$ROOT/models" "$WORK/models"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
KEY="schemathesis-$(date +%s)"
"$BIN" serve --host 127.0.0.1 --port "$PORT" --data-dir "$WORK/data" --models-dir "$WORK/models" \
  --api-key "$KEY" --log-format json >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log" >&2; echo "schemathesis: the server died" >&2; exit 1; }
  sleep 0.2
done

# A dataset with one image, so job and dataset routes see a real id too.
DS="$(curl -fs -H "x-api-key: $KEY" -H 'content-type: application/json' -d '{"name":"st"}' "http://127.0.0.1:$PORT/datasets" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
curl -fs -H "x-api-key: $KEY" -F "f=@$ROOT/fixtures/images/coffee.jpg" "http://127.0.0.1:$PORT/datasets/$DS/images" >/dev/null

set +e
"$VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "x-api-key: $KEY" \
  --max-examples "${ST_MAX_EXAMPLES:-25}" \
  --seed 1 \
  --workers 1 \
  --request-timeout 60 \
  --no-color
STATUS=$?
set -e
if grep -q '"level":"ERROR"' "$WORK/server.log"; then
  echo "schemathesis: the server logged errors:" >&2
  grep '"level":"ERROR"' "$WORK/server.log" | head -20 >&2
  STATUS=1
fi
exit "$STATUS"
