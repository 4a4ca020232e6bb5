#!/usr/bin/env bash
# The reference dense CRF beside picie's, in one run: the C++ densecrf of Krähenbühl and Koltun
# (PyPI `pydensecrf2`, built into target/crf-venv) and picie's lattice CRF on the same frames,
# from the same logits, with the same settings (10 iterations, temperature 2, smoothness sxy 1
# weight 3, appearance sxy 67 srgb 3 weight 4): each one's time per frame and how many pixels
# get the same label.
#
#     scripts/crf-reference.sh [IMAGES_DIR]      (default: the first 10 CamVid val frames when
#                                                 ../shared/data/camvid is there, else a fixture)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-}
[ -z "$IMAGES" ] && [ -d ../shared/data/camvid/val/images ] && IMAGES=../shared/data/camvid/val/images
VENV=target/crf-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import pydensecrf.densecrf, PIL, numpy" 2>/dev/null; then
  echo "crf-reference: building pydensecrf2 1.1 into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "numpy<3" cython "pillow<12"
  "$VENV/bin/pip" install -q pydensecrf2==1.1
fi
OUT=$(mktemp -d target/crf-reference.XXXXXX)
env BENCH_ONLY=crf BENCH_CRF_DUMP="$PWD/$OUT" ${IMAGES:+"BENCH_CRF_IMAGES=$IMAGES"} cargo bench --bench embedder
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys, time, glob, os
import numpy as np
from PIL import Image
import pydensecrf.densecrf as dcrf

out = sys.argv[1]
rows = []
for meta_path in sorted(glob.glob(os.path.join(out, "meta-*.json")), key=lambda p: int(p.split("-")[-1].split(".")[0])):
    i = meta_path.split("-")[-1].split(".")[0]
    meta = json.load(open(meta_path))
    w, h, k, c = meta["width"], meta["height"], meta["k"], meta["config"]
    img = np.ascontiguousarray(np.array(Image.open(os.path.join(out, f"frame-{i}.png")).convert("RGB")))
    logits = np.fromfile(os.path.join(out, f"logits-{i}.f32"), dtype="<f4").reshape(h * w, k)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    unary = np.ascontiguousarray(-np.log(np.maximum(p, 1e-5)).T.astype(np.float32))  # K x N, as picie clips
    best, labels = float("inf"), None
    for _ in range(3):
        t = time.perf_counter()
        d = dcrf.DenseCRF2D(w, h, k)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=c["smooth_sxy"], compat=c["smooth_weight"])
        d.addPairwiseBilateral(sxy=c["appearance_sxy"], srgb=c["appearance_srgb"], rgbim=img, compat=c["appearance_weight"])
        q = np.array(d.inference(c["iterations"])).reshape(k, h * w)
        labels = q.argmax(0)
        best = min(best, time.perf_counter() - t)
    ours = np.array(Image.open(os.path.join(out, f"rust-{i}.png"))).reshape(-1)
    start = p.argmax(1)
    rows.append((i, meta["rust_ms"], best * 1e3, (labels == ours).mean() * 100, (start != labels).mean() * 100, (start != ours).mean() * 100))
print(f"\nreference dense CRF (pydensecrf2 1.1, C++ densecrf) against picie's, 480x360, K = {k}, same logits and settings, best of 3 each")
print(f"{'frame':>5} {'picie ms':>9} {'densecrf ms':>12} {'same label %':>13} {'changed by densecrf %':>22} {'changed by picie %':>19}")
for r in rows:
    print(f"{r[0]:>5} {r[1]:>9.1f} {r[2]:>12.1f} {r[3]:>13.2f} {r[4]:>22.2f} {r[5]:>19.2f}")
m = np.array([r[1:] for r in rows]).mean(0)
print(f"{'mean':>5} {m[0]:>9.1f} {m[1]:>12.1f} {m[2]:>13.2f} {m[3]:>22.2f} {m[4]:>19.2f}   picie / densecrf time: {m[0] / m[1]:.2f}x")
PY
rm -rf "$OUT"
