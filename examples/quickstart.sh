#!/usr/bin/env bash
# The whole LAD pipeline on the built-in toy digits dataset, on CPU:
#   toy data -> teacher (ResNet-50 PAA) -> label cache -> student with cached LAD
#   and a baseline student with plain PAA (same iterations) -> COCO AP of all three.
# Usage: bash examples/quickstart.sh [WORKDIR]     (about 15 minutes on 2 CPU cores)
# Sizes can be scaled with TEACHER_ITERS, STUDENT_ITERS, TRAIN_IMAGES, VAL_IMAGES and SCALE (view side, px).
set -euo pipefail

WORK=${1:-quickstart}
TEACHER_ITERS=${TEACHER_ITERS:-300}
STUDENT_ITERS=${STUDENT_ITERS:-200}
TRAIN_IMAGES=${TRAIN_IMAGES:-512}
VAL_IMAGES=${VAL_IMAGES:-128}
SCALE=${SCALE:-256}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TEACHER_CFG=$HERE/configs/toy_teacher_r50.toml
STUDENT_CFG=$HERE/configs/toy_student_r18.toml
mkdir -p "$WORK"
cd "$WORK"

step() { printf '\n== %s\n' "$*"; }
DATA=(--ann toy/train/annotations.json --images toy/train/images)
SIZE=(--set "data.scales=[[$SCALE, $SCALE]]")
VAL=(--ann toy/val/annotations.json --images toy/val/images)

step "toy dataset ($TRAIN_IMAGES train / $VAL_IMAGES val images)"
[ -f toy/toy.json ] || lad make-toy-data toy --train "$TRAIN_IMAGES" --val "$VAL_IMAGES" --seed 0

step "teacher: ResNet-50 PAA, $TEACHER_ITERS iterations"
[ -f runs/teacher/checkpoints/final.pth ] || \
  lad train-teacher --config "$TEACHER_CFG" "${DATA[@]}" --out runs/teacher --set train.max_iters="$TEACHER_ITERS" \
    "${SIZE[@]}"

step "stage one: the teacher's labels for both flips of every image"
[ -f labels.zarr/zarr.json ] && lad cache-info labels.zarr >/dev/null 2>&1 || \
  lad cache-labels --teacher runs/teacher/checkpoints/final.pth "${DATA[@]}" --out labels.zarr \
    --scales "${SCALE}x${SCALE}" --overwrite
lad cache-info labels.zarr

step "stage two: ResNet-18 student from the cached labels, $STUDENT_ITERS iterations"
[ -f runs/student_lad/checkpoints/final.pth ] || \
  lad train-student --cache labels.zarr --config "$STUDENT_CFG" "${DATA[@]}" --out runs/student_lad \
    --set train.max_iters="$STUDENT_ITERS" "${SIZE[@]}"

step "baseline: the same student with plain PAA, $STUDENT_ITERS iterations"
[ -f runs/student_paa/checkpoints/final.pth ] || \
  lad train-teacher --config "$STUDENT_CFG" "${DATA[@]}" --out runs/student_paa \
    --set train.max_iters="$STUDENT_ITERS" "${SIZE[@]}"

for run in teacher student_paa student_lad; do
  step "eval $run"
  lad eval --checkpoint runs/$run/checkpoints/final.pth "${VAL[@]}" --out runs/$run/val_metrics.json \
    > runs/$run/eval.txt
  head -n 1 runs/$run/eval.txt
done

step "COCO AP on the toy val split"
python - <<'PY'
import json
rows = [("teacher (R-50, PAA)", "teacher"), ("student (R-18, PAA)", "student_paa"),
        ("student (R-18, cached LAD)", "student_lad")]
print(f"{'model':<28}{'AP':>7}{'AP50':>7}{'AP75':>7}")
for name, run in rows:
    m = json.load(open(f"runs/{run}/val_metrics.json"))
    print(f"{name:<28}{m['AP']:>7.3f}{m['AP50']:>7.3f}{m['AP75']:>7.3f}")
PY
