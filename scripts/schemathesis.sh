#!/usr/bin/env bash
# Checks the live server against its own OpenAPI document with schemathesis (PyPI): every
# status, content type and body each route answers must be documented, schema-valid requests
# must not be rejected as invalid, and nothing may answer 5xx. Runs a bounded number of
# examples per operation with a fixed seed, against a server with an API key on loopback.
#   scripts/schemathesis.sh [PICIE_BIN]        (default target/debug/picie)
# Environment: ST_MAX_EXAMPLES (default 100), ST_VERSION (default pinned below).
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
# Wait for readiness, then make a dataset with one image so job and dataset routes see a real id.
"$VENV/bin/python" - "$PORT" "$KEY" "$ROOT/fixtures/images/coffee.jpg" "$SERVER" <<'PY'
import json, os, sys, time, urllib.request, uuid
port, key, image, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if urllib.request.urlopen(base + "/health/ready", timeout=2).status == 200:
            break
    except Exception:
        os.kill(pid, 0)  # raises when the server died
        time.sleep(0.2)
else:
    sys.exit("schemathesis: the server did not become ready")
req = urllib.request.Request(base + "/datasets", data=b'{"name":"st"}', method="POST",
                             headers={"content-type": "application/json", "x-api-key": key})
ds = json.load(urllib.request.urlopen(req))["id"]
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"coffee.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + open(image, "rb").read() + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(base + f"/datasets/{ds}/images", data=body, method="POST",
                             headers={"content-type": f"multipart/form-data; boundary={boundary}", "x-api-key": key})
urllib.request.urlopen(req).read()
PY

set +e
"$VENV/bin/st" --config-file "$ROOT/scripts/schemathesis.toml" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "x-api-key: $KEY" \
  --max-examples "${ST_MAX_EXAMPLES:-100}" \
  --seed 1 \
  --workers 1 \
  --request-timeout 60 \
  --generation-database none \
  --no-color
STATUS=$?
set -e
if grep -q '"level":"ERROR"' "$WORK/server.log"; then
  echo "schemathesis: the server logged errors:" >&2
  grep '"level":"ERROR"' "$WORK/server.log" | head -20 >&2
  STATUS=1
fi
exit "$STATUS"
