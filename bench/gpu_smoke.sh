#!/usr/bin/env bash
# GPU check: a short teacher (ResNet-20) and ERDE student (ResNet-8) on a 10,000-image CIFAR-10
# subset with bf16 autocast and channels_last, then the training-throughput benchmark; prints the
# GPU's name and images/s. Needs only torch, torchvision and erde's own dependencies (no network):
# erde runs from src/ through PYTHONPATH, nothing is installed.
#
#   bash bench/gpu_smoke.sh                        # on a CUDA machine
#   DEVICE=cpu EPOCHS=1 bash bench/gpu_smoke.sh    # the same steps on the CPU (slow)
#   NPROC=2 bash bench/gpu_smoke.sh                # two GPUs, one process each, under torchrun
#
# Settings (environment): DEVICE (cuda), EPOCHS (3), NPROC (1), PRECISION (bf16),
# DATA (.devdata/cifar10-small, made from CIFAR_ROOT=../shared/data/cifar10 when missing),
# OUT (.devdata/gpu-smoke, replaced), PYTHON (python), STEPS (20, benchmark steps; 0 skips it),
# WORKERS (0, DataLoader workers of the benchmark's torchvision baseline).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-3}
NPROC=${NPROC:-1}
PRECISION=${PRECISION:-bf16}
DATA=${DATA:-.devdata/cifar10-small}
OUT=${OUT:-.devdata/gpu-smoke}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-20}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - "$DEVICE" <<'EOF'
import importlib.util, sys, torch, torchvision
missing = [m for m in ("numpy", "omegaconf", "safetensors", "sklearn", "tqdm", "PIL")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}; install them first")
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible; run with DEVICE=cpu to check the script on the CPU")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
print(f"device: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"Python {sys.version.split()[0]}")
EOF

if [ ! -f "$DATA/train.npz" ]; then
    "$PYTHON" bench/make_cifar_subset.py --root "${CIFAR_ROOT:-../shared/data/cifar10}" --out "$DATA"
fi

if [ "$NPROC" -gt 1 ]; then
    ERDE=("$PYTHON" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" -m erde)
else
    ERDE=("$PYTHON" -m erde)
fi

mkdir -p "$OUT"
cat > "$OUT/smoke.yaml" <<EOF
# Written by bench/gpu_smoke.sh: CIFAR-10 subset, short schedule, bf16 + channels_last.
data: {source: cifar10, root: $DATA, val_size: 1000}
train: {epochs: $EPOCHS, batch_size: 128, lr: 0.1, warmup_epochs: 0, device: $DEVICE,
        precision: $PRECISION, channels_last: true}
EOF

"${ERDE[@]}" train "$OUT/smoke.yaml" model.name=resnet20 \
    --out "$OUT/teacher" --overwrite --no-progress
"${ERDE[@]}" train "$OUT/smoke.yaml" model.name=resnet8 distill.method=erde \
    "distill.teacher=$OUT/teacher" --out "$OUT/erde" --overwrite --no-progress

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
for run in ("teacher", "erde"):
    with open(f"{sys.argv[1]}/{run}/metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    rates = ", ".join(f"{r['images_per_s']:,.0f}" for r in rows)
    last = max((k for k in rows[-1] if k.startswith("val/acc/")), key=lambda k: int(k[8:]))
    print(f"{run}: train images/s per epoch {rates} (first includes warm-up); "
          f"val accuracy of the last exit {100 * rows[-1][last]:.1f} % after {len(rows)} epoch(s)")
EOF

if [ "$STEPS" -gt 0 ]; then
    "$PYTHON" bench/train_throughput.py --root "$DATA" --device "$DEVICE" \
        --precision "$PRECISION" --steps "$STEPS" --workers "${WORKERS:-0}"
fi
