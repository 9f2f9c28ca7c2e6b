#!/usr/bin/env bash
# The whole LAD pipeline on the built-in toy digits dataset, on CPU:
#   toy data -> teacher (ResNet-18 PAA, long schedule) -> label cache -> two students for a short schedule,
#   one with cached LAD (the teacher's labels), one with plain PAA (its own) -> COCO AP -> curves.png.
# Usage: bash examples/quickstart.sh [WORKDIR]     (about 15 minutes on 2 CPU cores; re-running resumes)
# Schedules and sizes come from configs/toy_teacher_r18.toml, configs/toy_student_r18.toml and lad make-toy-data's
# defaults; TEACHER_ITERS, STUDENT_ITERS, TRAIN_IMAGES, VAL_IMAGES and SCALE (view side, px) override them, and
# JOBS=1 trains the two students one after the other instead of side by side (one CPU core each).
set -euo pipefail

WORK=${1:-quickstart}
TRAIN_IMAGES=${TRAIN_IMAGES:-512}
VAL_IMAGES=${VAL_IMAGES:-128}
JOBS=${JOBS:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TEACHER_CFG=$HERE/configs/toy_teacher_r18.toml
STUDENT_CFG=$HERE/configs/toy_student_r18.toml
mkdir -p "$WORK/runs"
cd "$WORK"

step() { printf '\n== %s\n' "$*"; }
DATA=(--ann toy/train/annotations.json --images toy/train/images)
VAL=(--ann toy/val/annotations.json --images toy/val/images)
# the configs validate on toy/val (train.eval_every) and train at their own scale unless told otherwise
SETS=() TEACHER_SETS=() STUDENT_SETS=() SCALES=()
if [ -n "${SCALE:-}" ]; then SETS+=(--set "data.scales=[[$SCALE, $SCALE]]"); SCALES+=(--scales "${SCALE}x${SCALE}"); fi
if [ -n "${TEACHER_ITERS:-}" ]; then TEACHER_SETS+=(--set "train.max_iters=$TEACHER_ITERS"); fi
if [ -n "${STUDENT_ITERS:-}" ]; then STUDENT_SETS+=(--set "train.max_iters=$STUDENT_ITERS"); fi
done_run() { [ -f "runs/$1/checkpoints/final.pth" ]; }

step "toy dataset ($TRAIN_IMAGES train / $VAL_IMAGES val images)"
[ -f toy/toy.json ] || lad make-toy-data --out toy --train "$TRAIN_IMAGES" --val "$VAL_IMAGES" --seed 0

step "teacher: ResNet-18 PAA trained on its own labels (the long schedule)"
done_run teacher || lad train-teacher --config "$TEACHER_CFG" "${DATA[@]}" --out runs/teacher --resume \
  "${SETS[@]}" "${TEACHER_SETS[@]}"

step "stage one: the teacher's labels for both flips of every image"
lad cache-info --cache labels.zarr --json 2>/dev/null | grep -q '"finalized": true' || \
  lad cache-labels --teacher runs/teacher/checkpoints/final.pth "${DATA[@]}" --out labels.zarr "${SCALES[@]}" \
    --overwrite
lad cache-info --cache labels.zarr

step "stage two: two ResNet-18 students for the same short schedule, from the same start"
train_lad() { lad train-student --cache labels.zarr --config "$STUDENT_CFG" "${DATA[@]}" --out runs/student_lad \
  --resume "${SETS[@]}" "${STUDENT_SETS[@]}"; }
train_paa() { lad train-teacher --config "$STUDENT_CFG" "${DATA[@]}" --out runs/student_paa --resume \
  "${SETS[@]}" "${STUDENT_SETS[@]}"; }
if [ "$JOBS" -gt 1 ]; then
  echo "LAD (the teacher's cached labels) and PAA (its own labels) side by side, one core each;" \
       "progress in runs/student_lad.out and runs/student_paa.out"
  started=()
  # Ctrl-C, a kill or a failed student stops the other cleanly (each keeps its latest checkpoint; re-running
  # resumes)
  trap 'for pid in "${started[@]#*:}"; do kill -TERM "$pid" 2>/dev/null || true; done' EXIT
  for kind in lad paa; do
    if ! done_run "student_$kind"; then
      OMP_NUM_THREADS=1 "train_$kind" >"runs/student_$kind.out" 2>&1 &
      started+=("$kind:$!")
    fi
  done
  for job in "${started[@]}"; do
    wait "${job#*:}" || { tail -n 20 "runs/student_${job%%:*}.out" >&2; exit 1; }
  done
  trap - EXIT
else
  done_run student_lad || train_lad
  done_run student_paa || train_paa
fi

step "evaluation, pictures: the teacher through lad eval, its detections on val image 1 (teacher.png), the students'" \
  "curves (curves.png); each student validated itself at its last iteration (train.eval_every), as lad eval would"
# three small jobs at once, one core each; a failed one stops the script
OMP_NUM_THREADS=1 lad eval --checkpoint runs/teacher/checkpoints/final.pth "${VAL[@]}" \
  --out runs/teacher/val_metrics.json > runs/teacher/eval.txt &
eval_pid=$!
OMP_NUM_THREADS=1 lad show --checkpoint runs/teacher/checkpoints/final.pth --image-id 1 "${VAL[@]}" --out teacher.png \
  --gt --score-thr 0.5 &
show_pid=$!
OMP_NUM_THREADS=1 lad plot --run runs/student_paa --run runs/student_lad --label "student, PAA (own labels)" \
  --label "student, LAD (teacher's labels)" --out curves.png
wait "$eval_pid" && wait "$show_pid"

step "COCO AP on the toy val split"
python - <<'PY'
import json

def final_val(run):
    """The student's validation at its last iteration (its metrics.jsonl), the numbers lad eval gives."""
    records = [json.loads(line) for line in open(f"runs/{run}/metrics.jsonl")]
    last = [r for r in records if "val_AP" in r][-1]
    return {k: last[f"val_{k}"] for k in ("AP", "AP50", "AP75")}

metrics = {"teacher": json.load(open("runs/teacher/val_metrics.json")),
           "student_paa": final_val("student_paa"), "student_lad": final_val("student_lad")}
rows = [("teacher (R-18, PAA)", "teacher"), ("student (R-18, PAA)", "student_paa"),
        ("student (R-18, cached LAD)", "student_lad")]
print(f"{'model':<28}{'AP':>7}{'AP50':>7}{'AP75':>7}")
for name, run in rows:
    m = metrics[run]
    print(f"{name:<28}{m['AP']:>7.3f}{m['AP50']:>7.3f}{m['AP75']:>7.3f}")
print(f"LAD - PAA: {100 * (metrics['student_lad']['AP'] - metrics['student_paa']['AP']):+.1f} AP")
PY
echo "done in $((SECONDS / 60)) min $((SECONDS % 60)) s; pictures: $PWD/teacher.png, $PWD/curves.png"
