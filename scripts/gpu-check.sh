#!/usr/bin/env bash
# The one prepared GPU check, in two phases (docs/gpu.md).
#
# Here, on the development machine (network, cargo):
#   scripts/gpu-check.sh prepare   fetch onnxruntime-gpu $ORT_GPU_VERSION from PyPI (scripts/setup.sh --gpu),
#                                  build the release binary, pack both and split the pack into parts
#                                  that fit one device call each (the working tree travels with every
#                                  call and the whole call is capped at 64 MiB) under .gpu-check/
#                                  (git-ignored); prints the calls to make.
#                                  PICIE_VIT_WEIGHTS=FILE (PICIE_VIT_BACKBONE=dino-vits16 by default,
#                                  any ViT --backbone name) also packs a package made with those
#                                  weights, and `run` times /segment with it too
#   scripts/gpu-check.sh plan      print those calls again
#   scripts/gpu-check.sh clean     remove .gpu-check/ (and .ort-gpu/ with --all)
#
# There, on a machine with an NVIDIA GPU, one call per part, back to back (a machine left idle
# is given back, and with it what was carried):
#   scripts/gpu-check.sh receive   keep the parts carried so far in $STASH (outside the work tree)
#   scripts/gpu-check.sh run       receive the last part, join and check the parts, then:
#                                  `picie serve --device cuda` on models/default, /info must say cuda,
#                                  /segment p50/p95 and images/s at 1/4/16 clients at fast, edges
#                                  (the guided filter as an ONNX graph on the GPU) and crf (a CPU
#                                  server on the same machine alongside), CUDA against CPU masks on
#                                  fixtures/images at fast and edges (>= 99.9 % equal pixels); then the training bench
#                                  built with `--features wgpu`: one PiCIE step on the GPU through
#                                  Vulkan (PICIE_TRAIN_DEVICE=vulkan) beside the same step on the CPU
#                                  there; prints everything, and into $OUT/gpu-check.log when OUT is
#                                  set. Exit 1 on a failed check.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
WORK="$ROOT/.gpu-check"
PARTS="$WORK/parts"
SUMS="$WORK/SHA256SUMS"
STASH="${PICIE_GPU_STASH:-/tmp/picie-gpu-check}"
CALL_LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1024 * 1024))

say() { echo "gpu-check: $*" >&2; }
die() { say "$*"; exit 1; }

# Bytes of what travels with every call: tracked and untracked, not ignored, files (and shared/).
tree_bytes() {
  (cd "$ROOT" && {
    git ls-files -z -co --exclude-standard
    if [ -d shared ]; then find shared -type f -print0; fi
  } | xargs -0 stat -L -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}') || true
}

prepare() {
  command -v git >/dev/null || die "git is needed"
  ORT_GPU_VERSION="$ORT_GPU_VERSION" "$ROOT/scripts/setup.sh" --gpu --no-build
  local lib="$ROOT/.ort-gpu/lib" bin="${PICIE_BIN:-}"
  for f in "libonnxruntime.so.$ORT_GPU_VERSION" libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so; do
    [ -e "$lib/$f" ] || die "$lib/$f is missing after setup.sh --gpu"
  done
  if [ -z "$bin" ]; then
    (cd "$ROOT" && cargo build --release --locked)
    bin="$ROOT/target/release/picie"
  fi
  [ -x "$bin" ] || die "no picie binary at $bin"
  # The training bench with burn's wgpu backend (Vulkan): a build of its own, with the feature.
  local bench
  bench="$(cd "$ROOT" && cargo bench --locked --features wgpu --bench train --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "train"][-1])')" \
    || die "building the training bench with --features wgpu failed (cargo bench --features wgpu --bench train --no-run)"
  [ -f "$ROOT/.weights/efficientnet-lite0.pth" ] || die ".weights/efficientnet-lite0.pth is missing: scripts/setup.sh fetches it"

  rm -rf "$WORK"
  mkdir -p "$WORK/pack/lib" "$WORK/pack/bin" "$PARTS"
  cp "$lib/libonnxruntime.so.$ORT_GPU_VERSION" "$lib/libonnxruntime_providers_shared.so" "$lib/libonnxruntime_providers_cuda.so" "$WORK/pack/lib/"
  ln -s "libonnxruntime.so.$ORT_GPU_VERSION" "$WORK/pack/lib/libonnxruntime.so"
  cp "$bin" "$WORK/pack/bin/picie"
  cp "$bench" "$WORK/pack/bin/train-bench"
  strip "$WORK/pack/bin/picie" "$WORK/pack/bin/train-bench" 2>/dev/null || true
  mkdir -p "$WORK/pack/weights"
  cp "$ROOT/.weights/efficientnet-lite0.pth" "$WORK/pack/weights/"
  if [ -n "${PICIE_VIT_WEIGHTS:-}" ]; then
    # A package with the user's ViT weights (docs/backbones.md), timed by `run` beside the
    # default one. Its ONNX graph and weights are ~90 MB each: a few more parts to carry.
    local vit_backbone="${PICIE_VIT_BACKBONE:-dino-vits16}"
    [ -f "$PICIE_VIT_WEIGHTS" ] || die "PICIE_VIT_WEIGHTS=$PICIE_VIT_WEIGHTS: no such file"
    "$bin" package init --backbone "$vit_backbone" --backbone-weights "$PICIE_VIT_WEIGHTS" --images "$ROOT/fixtures/images" \
      --name vit --out "$WORK/pack/models/vit" || die "picie package init with $PICIE_VIT_WEIGHTS failed"
    echo "$vit_backbone from $(basename "$PICIE_VIT_WEIGHTS")" >"$WORK/pack/VIT_BACKBONE"
  fi
  echo "$ORT_GPU_VERSION" >"$WORK/pack/ORT_GPU_VERSION"
  git -C "$ROOT" rev-parse HEAD >"$WORK/pack/COMMIT" 2>/dev/null || true
  say "packing (gzip) ..."
  tar -C "$WORK/pack" -czf "$WORK/pack.tgz" .
  rm -rf "$WORK/pack"

  # One part per call: what is left of 64 MiB after the working tree, less a margin.
  local tree part
  tree="$(tree_bytes)"
  part=$(( (CALL_LIMIT - tree - MARGIN) / 1024 / 1024 ))
  [ "$part" -ge 60 ] && part=60
  [ "$part" -ge 8 ] || die "the working tree ($((tree / 1024 / 1024)) MiB) leaves too little of a call's 64 MiB for parts"
  split -b "${part}M" -d -a 2 "$WORK/pack.tgz" "$PARTS/pack.tgz."
  rm "$WORK/pack.tgz"
  (cd "$WORK" && sha256sum parts/* >"$SUMS")
  say "$(find "$PARTS" -type f | wc -l) parts of at most $part MiB (working tree $((tree / 1024 / 1024)) MiB) in $PARTS"
  plan
}

plan() {
  [ -s "$SUMS" ] || die "nothing prepared: run scripts/gpu-check.sh prepare first"
  local parts=() p last
  while read -r _ p; do parts+=("$p"); done <"$SUMS"
  last=$((${#parts[@]} - 1))
  echo "Device calls, back to back (each within 30 s of the last; carry paths are relative to the repository root):"
  for i in "${!parts[@]}"; do
    if [ "$i" -lt "$last" ]; then
      echo "  $((i + 1)). run  command: bash scripts/gpu-check.sh receive   carry: [\".gpu-check/SHA256SUMS\", \".gpu-check/${parts[$i]}\"]   timeout_s: 120"
    else
      echo "  $((i + 1)). run  command: bash scripts/gpu-check.sh run   carry: [\".gpu-check/SHA256SUMS\", \".gpu-check/${parts[$i]}\"]   timeout_s: 540"
    fi
  done
  echo "Then give_back. The log comes back as gpu-check.log (from \$OUT)."
}

clean() {
  rm -rf "$WORK"
  [ "${1:-}" = "--all" ] && rm -rf "$ROOT/.ort-gpu"
  say "removed $WORK${1:+ and .ort-gpu}"
}

# Copies the parts present in the work tree into the stash; says which are still missing and
# returns their number.
stash_parts() {
  [ -s "$SUMS" ] || die "no .gpu-check/SHA256SUMS here: carry it with every call"
  mkdir -p "$STASH/parts"
  cp "$SUMS" "$STASH/SHA256SUMS"
  local f
  for f in "$PARTS"/*; do
    [ -e "$f" ] || continue
    cp "$f" "$STASH/parts/.partial" && mv "$STASH/parts/.partial" "$STASH/parts/$(basename "$f")"
  done
  local missing=0 p
  while read -r _ p; do
    if [ -e "$STASH/$p" ]; then say "have $p"; else say "missing $p"; missing=$((missing + 1)); fi
  done <"$SUMS"
  return "$missing"
}

receive() {
  local missing=0
  stash_parts || missing=$?
  say "$missing part(s) still to carry"
}

run() {
  local failed=0
  fail() { echo "FAIL: $*"; failed=1; }
  echo "== picie GPU check ($(date -u +%FT%TZ))"
  stash_parts || die "parts are missing (above): carry each with its own call, back to back"
  (cd "$STASH" && sha256sum -c --quiet SHA256SUMS) || die "a part is damaged (checksums above)"
  local app="$STASH/app"
  rm -rf "$app" && mkdir -p "$app"
  cat "$STASH"/parts/pack.tgz.* | tar -C "$app" -xzf -
  echo "pack: onnxruntime-gpu $(cat "$app/ORT_GPU_VERSION"), picie built at $(cat "$app/COMMIT" 2>/dev/null || echo '?')"
  [ "$(cat "$app/ORT_GPU_VERSION")" = "$ORT_GPU_VERSION" ] || fail "the pack holds onnxruntime-gpu $(cat "$app/ORT_GPU_VERSION"), this script names $ORT_GPU_VERSION"

  local picie="$app/bin/picie"
  if ! "$picie" --version >/dev/null 2>&1; then
    echo "the carried binary does not run here ($("$picie" --version 2>&1 | head -n 2)); building one"
    command -v cargo >/dev/null || die "no cargo here to build picie with"
    (cd "$ROOT" && cargo build --release --offline) || die "cargo build failed"
    picie="$ROOT/target/release/picie"
  fi

  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # CUDA 13 and cuDNN 9 libraries: the CUDA toolkit's and the pip `nvidia-*` packages' folders.
  local dirs=() d
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
  local py
  py="$(command -v python3 || true)"
  if [ -n "$py" ]; then
    while IFS= read -r d; do dirs+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import os, sys
try:
    import nvidia
except ImportError:
    sys.exit(0)
seen = set()
for base in nvidia.__path__:
    for dirpath, _, files in os.walk(base):
        if any(".so" in f for f in files) and dirpath not in seen:
            seen.add(dirpath)
            print(dirpath)
EOF
)
  fi
  local joined
  joined="$(IFS=:; echo "${dirs[*]:-}")"
  export LD_LIBRARY_PATH="$app/lib${joined:+:$joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ORT_DYLIB_PATH="$app/lib/libonnxruntime.so"
  local missing
  missing="$(ldd "$app/lib/libonnxruntime_providers_cuda.so" | grep 'not found' || true)"
  if [ -n "$missing" ]; then
    fail "the CUDA provider cannot find these libraries (CUDA 13, cuDNN 9 needed):"
    echo "$missing"
  else
    echo "CUDA provider's libraries: all found"
  fi

  [ -n "$py" ] || die "python3 is needed for the client and the mask comparison"
  local tmp
  tmp="$(mktemp -d)"
  "$py" - "$ROOT/fixtures/images/rocket.jpg" "$tmp/bench.jpg" <<'EOF'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").resize((480, 360), Image.BILINEAR).save(sys.argv[2], quality=90)
EOF

  # Masks: CUDA against CPU on the shipped photos, at --quality fast (the embedder and the
  # assignment alone), edges (the server's default: on CUDA the guided filter runs as an ONNX
  # graph on the GPU, on the CPU as Rust; both required to agree) and best (flip averaging and
  # the CRF; reported, not required).
  local imgs=("$ROOT"/fixtures/images/*.jpg "$ROOT"/fixtures/images/*.png) quality
  for quality in fast edges best; do
    echo "== masks at --quality $quality, CUDA vs CPU, models/default, ${#imgs[@]} images"
    if "$picie" segment --model "$ROOT/models/default" --quality "$quality" --device cpu --out "$tmp/cpu-$quality" "${imgs[@]}" >"$tmp/segment.log" 2>&1 \
      && "$picie" segment --model "$ROOT/models/default" --quality "$quality" --device cuda --out "$tmp/cuda-$quality" "${imgs[@]}" >>"$tmp/segment.log" 2>&1; then
      if ! "$py" - "$tmp/cpu-$quality" "$tmp/cuda-$quality" <<'EOF'; then
import os, sys
import numpy as np
from PIL import Image
bad = 0
for name in sorted(os.listdir(sys.argv[1])):
    a = np.asarray(Image.open(os.path.join(sys.argv[1], name)))
    b = np.asarray(Image.open(os.path.join(sys.argv[2], name)))
    same = (a == b).mean() if a.shape == b.shape else 0.0
    ok = same >= 0.999
    bad += not ok
    print(f"  {name:<20} {a.shape[1]}x{a.shape[0]}  equal pixels {100 * same:8.4f} %  {'ok' if ok else 'under 99.9 %'}")
sys.exit(1 if bad else 0)
EOF
        if [ "$quality" != best ]; then fail "CUDA masks differ from the CPU ones at $quality"; else echo "  (at best the CRF can spread a flipped pixel; only fast and edges are required)"; fi
      fi
    else
      fail "picie segment --quality $quality failed:"
      tail -n 5 "$tmp/segment.log"
    fi
  done

  # /segment on a CUDA server, then a CPU one on the same machine for reference; the queue bound is
  # lifted so that 16 clients measure throughput, not 429s.
  # A ViT package packed by `prepare` (PICIE_VIT_WEIGHTS) is timed the same way, at fast only
  # (the refinements cost what they cost with any backbone).
  local targets=("$ROOT/models:default") target models_dir model qualities
  if [ -d "$app/models/vit" ]; then targets+=("$app/models:vit"); fi
  local device port pid
  for target in "${targets[@]}"; do
  models_dir="${target%%:*}" model="${target##*:}"
  qualities="${GPU_CHECK_QUALITIES:-fast edges crf}"
  if [ "$model" = vit ]; then qualities=fast; echo "== the ViT package: $(cat "$app/VIT_BACKBONE" 2>/dev/null)"; fi
  for device in cuda cpu; do
    port=$((18080 + RANDOM % 1000))
    echo "== picie serve --device $device, model $model (port $port)"
    "$picie" serve --device "$device" --models-dir "$models_dir" --model "$model" --data-dir "$tmp/data-$model-$device" \
      --host 127.0.0.1 --port "$port" --max-queue-ms 600000 --max-concurrent 64 >"$tmp/serve-$device.log" 2>&1 &
    pid=$!
    if ! "$py" - "$port" "$tmp/bench.jpg" "$device" "${GPU_CHECK_REQUESTS:-192}" "$pid" "$qualities" <<'EOF'; then
import http.client, json, statistics, sys, threading, time
port, jpeg, device, total = int(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3], int(sys.argv[4])
pid = sys.argv[5]
qualities = sys.argv[6].split()

def server_alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def get(path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()

if device == "cpu":
    total //= 4
deadline = time.time() + 180
while True:
    try:
        if get("/health/ready")[0] == 200:
            break
    except OSError:
        pass
    if not server_alive():
        sys.exit("the server exited")
    if time.time() > deadline:
        sys.exit("the server did not get ready in 180 s")
    time.sleep(0.5)
info = json.loads(get("/info")[1])
print("  /info:", json.dumps(info))
provider = info.get("execution_provider")
if provider != device:
    sys.exit(f"/info says execution_provider {provider!r}, expected {device!r}")

def post(conn, quality):
    conn.request("POST", f"/segment?quality={quality}", body=jpeg, headers={"content-type": "image/jpeg"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}")

for quality in qualities:
    # best adds the CRF on the CPU: a quarter of the requests keeps the run short.
    total_q = total if quality == "fast" else max(16, total // 4)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(5):
        post(conn, quality)
    lat = []
    for _ in range(max(20, total_q // 4)):
        t = time.perf_counter()
        post(conn, quality)
        lat.append(time.perf_counter() - t)
    lat.sort()
    p50, p95 = statistics.median(lat), lat[round(0.95 * (len(lat) - 1))]
    print(f"  quality={quality}: POST /segment 480x360 JPEG ({len(lat)} sequential): p50 {1e3 * p50:.1f} ms, p95 {1e3 * p95:.1f} ms")
    for clients in (1, 4, 16):
        per = max(1, total_q // clients)
        errors = []
        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                for _ in range(per):
                    post(conn, quality)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        if errors:
            sys.exit(f"{clients} clients: {errors[0]}")
        print(f"  quality={quality}: {clients:>2} concurrent clients: {clients * per / dt:8.2f} images/s ({clients * per} requests)")
EOF
      fail "/segment on the $device server, model $model (its log below)"
      tail -n 20 "$tmp/serve-$device.log"
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  done

  # The training step through burn's wgpu backend on Vulkan, beside the CPU step on this
  # machine. The bench reads the backbone from $BENCH_ROOT/.weights and photos from fixtures/.
  echo "== training step: burn wgpu (Vulkan) against burn Flex (CPU) on this machine"
  mkdir -p "$tmp/bench-root"
  ln -sfn "$ROOT/fixtures" "$tmp/bench-root/fixtures"
  ln -sfn "$app/weights" "$tmp/bench-root/.weights"
  local dev
  for dev in vulkan cpu; do
    if ! BENCH_ROOT="$tmp/bench-root" PICIE_TRAIN_DEVICE="$dev" BENCH_KMEANS=0 BENCH_FREEZE="0 16" \
      timeout 600 "$app/bin/train-bench" --bench >"$tmp/train-$dev.log" 2>&1; then
      fail "the training bench on $dev (its log below; Vulkan needs the NVIDIA driver's Vulkan ICD, nvidia_icd.json)"
    fi
    grep -E "^PiCIE training|per image" "$tmp/train-$dev.log" || tail -n 20 "$tmp/train-$dev.log"
  done
  rm -rf "$tmp"
  if [ "$failed" = 0 ]; then echo "== all checks passed"; else echo "== some checks FAILED (above)"; fi
  return "$failed"
}

case "${1:-}" in
  prepare) prepare ;;
  plan) plan ;;
  clean) clean "${2:-}" ;;
  receive) receive ;;
  run)
    if [ -n "${OUT:-}" ]; then
      # A pipe, not a process substitution: tee has written everything when the call returns.
      mkdir -p "$OUT"
      run 2>&1 | tee -a "$OUT/gpu-check.log"
      exit "${PIPESTATUS[0]}"
    fi
    run ;;
  *) echo "usage: $0 prepare|plan|clean [--all]   (here)   |   receive|run   (on the GPU machine)" >&2; exit 2 ;;
esac
