#!/usr/bin/env bash
# The whole protocol on one GPU in about ten minutes: the `cifar10-gpu` preset (ResNet-56 teacher,
# then ce, kd, kd-masked and erde ResNet-20 students, then the comparison), timed, with the images/s
# of every run and the test accuracies. erde runs from src/ through PYTHONPATH, nothing is
# installed, no network is needed.
#
#   bash bench/gpu_protocol.sh                                    # full CIFAR-10 at DATA
#   DEVICE=cpu EPOCHS=1 DATA=.devdata/cifar10-small bash bench/gpu_protocol.sh   # the check on a CPU
#
# Settings (environment): DATA (../shared/data/cifar10: train.npz/test.npz or the official
# cifar-10-batches-py parent), DEVICE (cuda), EPOCHS (the preset's 30), JOBS (2 students at once),
# OUT (.devdata/gpu-protocol, replaced), PYTHON (python). A machine that only receives this
# checkout gets the data as a subset: python bench/make_cifar_subset.py --train-per-class 1500
# --test-per-class 500 --out .devdata/cifar10-gpu (about 45 MB), then DATA=.devdata/cifar10-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/cifar10}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-2}
OUT=${OUT:-.devdata/gpu-protocol}
PYTHON=${PYTHON:-python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - "$DEVICE" <<'PY'
import sys, torch, torchvision
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible; run with DEVICE=cpu EPOCHS=1 to check the script on the CPU")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
print(f"device: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"Python {sys.version.split()[0]}", flush=True)
PY
if [ ! -f "$DATA/train.npz" ] && [ ! -d "$DATA/cifar-10-batches-py" ]; then
    echo "no CIFAR-10 at DATA=$DATA; see the comment at the top of $0" >&2
    exit 2
fi

ARGS=(--preset cifar10-gpu "data.root=$DATA" "teacher.train.device=$DEVICE"
      "student.train.device=$DEVICE" --out "$OUT" --jobs "$JOBS" --no-progress)
if [ -n "${EPOCHS:-}" ]; then
    ARGS+=("teacher.train.epochs=$EPOCHS" "student.train.epochs=$EPOCHS"
           teacher.train.warmup_epochs=0 student.train.warmup_epochs=0)
fi
rm -rf "$OUT"
start=$(date +%s)
"$PYTHON" -m erde reproduce "${ARGS[@]}" > "$OUT.log"
end=$(date +%s)
tail -n +1 "$OUT.log" | grep -v "^epoch\|^start\|^teacher outputs" || true
echo "protocol wall time: $((end - start)) s (teacher, teacher cache, 4 students, comparison)"

"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rate = sorted(r["images_per_s"] for r in rows)[len(rows) // 2]
    total = sum(r["epoch_s"] for r in rows)
    print(f"{run.name}: median {rate:,.0f} train images/s over {len(rows)} epochs, "
          f"{total:.0f} s training")
PY
