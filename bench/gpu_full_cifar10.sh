#!/usr/bin/env bash
# Full CIFAR-10 protocol on one H200 inside a 15-minute device budget (issue 27), as steps that the
# session with a GPU runs as back-to-back device commands (the machine is kept only 30 s idle):
#
#   STEP=part PART=part-00 bash bench/gpu_full_cifar10.sh   # carry .devdata/cifar10-parts/part-00
#   STEP=part PART=part-01 ...; STEP=part PART=part-02 ... (+ manifest.json carried each time)
#   STEP=teacher bash bench/gpu_full_cifar10.sh             # assemble (SHA-256 checked), teacher
#   STEP=students bash bench/gpu_full_cifar10.sh            # 5 students, comparison, pack to $OUT
#
# Epoch arithmetic (H200 figures, docs/benchmarks.md; 45,000 training images after val_size 5,000):
# teacher 45,000 / 8,293 = 5.4 s/epoch; students (two at a time) 45,000 / 14.6-18.9 k = 2.4-3.1 s
# each, 5 students (ce, kd, kd-masked, erde b=0.1, erde b=1) in a pool of 2: ~7.0 s per epoch, <= 8.7.
# Budget 900 s - start 120 - 3 part commands ~90 - overheads (load, cache, eval, compare, pack) ~120
# - margin 60 = ~510 s training: teacher 40 epochs (217 s) + students 30 epochs (<= 261 s).
# Settings: DEVICE (cuda), TEACHER_EPOCHS (40), STUDENT_EPOCHS (30), JOBS (2), WORK (/tmp/erde27),
# PYTHON (python3), PARTS (.devdata/cifar10-parts), OUT (the device tool's folder; .devdata/out27).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}; JOBS=${JOBS:-2}; WORK=${WORK:-/tmp/erde27}; PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-.devdata/cifar10-parts}; OUT=${OUT:-.devdata/out27}
TE=${TEACHER_EPOCHS:-40}; SE=${STUDENT_EPOCHS:-30}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--preset cifar10-gpu "data.root=$WORK/cifar10" "teacher.train.device=$DEVICE"
      "student.train.device=$DEVICE" "teacher.train.epochs=$TE" "student.train.epochs=$SE"
      "data.val_size=${VAL_SIZE:-5000}" --grid distill.beta=0.1,1 --out "$WORK/study" --jobs "$JOBS" --no-progress)
[ "$TE" -lt 3 ] && ARGS+=(teacher.train.warmup_epochs=0)
[ "$SE" -lt 3 ] && ARGS+=(student.train.warmup_epochs=0)
mkdir -p "$WORK/parts" "$OUT"
case "${STEP:?STEP=part|teacher|students}" in
part)
    cp "$PARTS/manifest.json" "$PARTS/${PART:?}" "$WORK/parts/" && ls -l "$WORK/parts" ;;
teacher)
    "$PYTHON" bench/cifar_parts.py assemble --parts "$WORK/parts" --out "$WORK/cifar10"
    s=$(date +%s)
    # reproduce needs one student (methods=[] is refused): the teacher, its cache and ce here
    "$PYTHON" -m erde reproduce "${ARGS[@]}" "methods=[ce]" > "$WORK/teacher.log" 2>&1 || { tail "$WORK/teacher.log"; exit 1; }
    grep -v "^epoch" "$WORK/teacher.log" || true
    echo "teacher step wall time: $(( $(date +%s) - s )) s" | tee -a "$WORK/teacher.log" ;;
students)
    s=$(date +%s)
    "$PYTHON" -m erde reproduce "${ARGS[@]}" > "$WORK/students.log" 2>&1 || { tail "$WORK/students.log"; exit 1; }
    grep -v "^epoch" "$WORK/students.log" || true
    echo "students step wall time: $(( $(date +%s) - s )) s" | tee -a "$WORK/students.log"
    # resume states (state.pt) stay behind; weights, reports, curves, metrics, plots come back
    tar -czf - --exclude=state.pt -C "$WORK" study teacher.log students.log | split -b 15M -d - "$OUT/study.tar.gz."
    [ "$(ls "$OUT" | wc -l)" -le 8 ] || echo "more than 8 files in $OUT: only 8 come back" >&2
    ls -l "$OUT" ;;
*) echo "STEP must be part, teacher or students" >&2; exit 2 ;;
esac
