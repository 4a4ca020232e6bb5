#!/usr/bin/env bash
# The generalisation protocol: train on two of CamVid's three training drives, score on the
# drive left out, with CamVid val and the training frames beside it (never alone: val is the
# drive 0016E5 filmed between train's own frames, so it measures the scenes a model trained on).
#
#   scripts/leave-drive-out.sh --drive 0006R0 --tag recipe [--baseline PKG] [--quality fast,edges]
#       [--seeds 5] [--model PKG] [--eval-args "more picie eval flags"] [-- picie train flags...]
#
# Without --model it trains `picie train --images <the other drives> --out runs/loo/<drive>/<tag>
# --package-k 11 <flags>` (skipped when that package exists, so a run can be repeated to score
# again). Every score is `picie eval` with fresh k-means (K = 11) on the training frames' features,
# the mean of --seeds k-means seeds, the baseline scored in the same run. It ends with one table:
# left-out drive, val, training frames, each pixel accuracy / mIoU / boundary F. Logs and the
# evaluations' JSON are kept under runs/loo/<drive>/<tag>.eval/. Needs the release binary
# (scripts/setup.sh) and CamVid at ../shared/data/camvid (or --data).
set -euo pipefail
cd "$(dirname "$0")/.."

DRIVE=0006R0
DATA=../shared/data/camvid
TAG=""
MODEL=""
BASELINE=""
QUALITY=fast,edges
SEEDS=5
EVAL_ARGS=""
BIN=${PICIE_BIN:-target/release/picie}
while [ $# -gt 0 ]; do
  case "$1" in
    --drive) DRIVE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --quality) QUALITY=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --eval-args) EVAL_ARGS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 --drive DRIVE --tag NAME [--model PKG] [--baseline PKG] [--quality Q] [--seeds N] [--eval-args FLAGS] [--data DIR] [-- train flags]" >&2; exit 2 ;;
  esac
done
[ -n "$TAG" ] || { echo "leave-drive-out: --tag names the run (runs/loo/$DRIVE/TAG)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "leave-drive-out: $BIN is missing: run scripts/setup.sh first" >&2; exit 1; }
ls "$DATA/train/images/${DRIVE}_"* >/dev/null 2>&1 || { echo "leave-drive-out: no frames of drive $DRIVE in $DATA/train/images" >&2; exit 1; }

# The split, as folders of links: the training frames without the drive, and the drive itself.
SPLIT=runs/loo/$DRIVE/split
if [ ! -d "$SPLIT" ]; then
  tmp=$(mktemp -d runs/.split-XXXXXX 2>/dev/null || { mkdir -p runs; mktemp -d runs/.split-XXXXXX; })
  mkdir -p "$tmp/train-images" "$tmp/train-labels" "$tmp/heldout-images" "$tmp/heldout-labels"
  data=$(cd "$DATA" && pwd)
  for img in "$data"/train/images/*; do
    stem=$(basename "${img%.*}")
    case "$stem" in "${DRIVE}_"*) side=heldout ;; *) side=train ;; esac
    ln -s "$img" "$tmp/$side-images/"
    ln -s "$data/train/labels/$stem.png" "$tmp/$side-labels/"
  done
  mkdir -p "$(dirname "$SPLIT")"
  mv "$tmp" "$SPLIT"
fi
echo "leave-drive-out: $DRIVE left out: $(ls "$SPLIT/heldout-images" | wc -l) frames; training frames: $(ls "$SPLIT/train-images" | wc -l)" >&2

OUT=runs/loo/$DRIVE/$TAG
if [ -z "$MODEL" ]; then
  MODEL=$OUT
  if [ ! -f "$MODEL/manifest.json" ]; then
    echo "leave-drive-out: training $MODEL: $BIN train --images $SPLIT/train-images --out $MODEL --package-k 11 $*" >&2
    started=$(date +%s)
    "$BIN" train --images "$SPLIT/train-images" --out "$MODEL" --package-k 11 --resume "$@"
    echo "leave-drive-out: trained in $(( ($(date +%s) - started) / 60 )) min" >&2
  fi
fi

EVAL=$OUT.eval
mkdir -p "$EVAL"
score() { # name images labels
  local name=$1 images=$2 labels=$3
  local args=(eval --model "$MODEL" --images "$images" --labels "$labels" --cluster-images "$SPLIT/train-images"
    --seeds "$SEEDS" --quality "$QUALITY" --json "$EVAL/$name.json"
    --class-names sky,building,pole,road,pavement,tree,sign,fence,car,pedestrian,bicyclist)
  [ -z "$BASELINE" ] || args+=(--baseline "$BASELINE")
  # shellcheck disable=SC2206 # split on purpose: several flags in one argument
  [ -z "$EVAL_ARGS" ] || args+=($EVAL_ARGS)
  echo "leave-drive-out: scoring on $name: $BIN ${args[*]}" >&2
  "$BIN" "${args[@]}" > "$EVAL/$name.log"
}
score left-out "$SPLIT/heldout-images" "$SPLIT/heldout-labels"
score val "$DATA/val/images" "$DATA/val/labels"
score train-frames "$SPLIT/train-images" "$SPLIT/train-labels"

# The "mean over N k-means seeds" rows of each log, side by side.
# The label is every field before the three scores ("name [quality]" or "name [quality, 100 by similarity]").
means() { awk '/^mean over/ {on=1; getline; next} on && NF >= 4 {l=$1; for (i = 2; i <= NF-3; i++) l = l " " $i; printf "%s\t%s / %s / %s\n", l, $(NF-2), $(NF-1), $NF}' "$EVAL/$1.log"; }
rows=$(paste <(means left-out) <(means val | cut -f2) <(means train-frames | cut -f2))
{
  echo "left out: $DRIVE; model: $MODEL${BASELINE:+; baseline: $BASELINE}; $SEEDS k-means seeds (pixel acc / mIoU / boundary F)"
  # The first column as wide as its longest label, so long run names keep the columns aligned.
  printf 'model [quality]\tleft-out %s\tval\ttraining frames\n%s\n' "$DRIVE" "$rows" |
    awk -F'\t' '{l[NR] = $0; if (length($1) > w) w = length($1)} END {for (i = 1; i <= NR; i++) {split(l[i], f, "\t"); printf "%-*s | %-21s | %-21s | %-21s\n", w, f[1], f[2], f[3], f[4]}}'
} | tee "$EVAL/summary.txt"
