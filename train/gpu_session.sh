#!/usr/bin/env bash
# The GPU measurements behind the README's GPU tables, as one command per device call.
#   PART=a: the framework benchmark (train/bench.py) and plan gpu-a of train/experiments.py
#   PART=b: plan gpu-b (the accuracy recipe over 3 seeds, ensembles, ablations)
#   PART=d: where the H100 step's time goes (train/profile_step.py), then plan gpu-d
#   PART=e: plan gpu-e (the accuracy recipe at 120 epochs with stronger augmentation, 3 seeds)
# Needs the competition zip at $DATA. Results land in $OUT (bench.*, results-*.json, logs).
# SMOKE=1 runs the same steps with tiny settings, to check the script on a CPU first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; DATA=${DATA:-.gpu/digit-recognizer.zip}; PART=${PART:-a}; WORK=${WORK:-/tmp/vit-exp}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  BENCH=(--preset tiny --batch-size 32 --steps 3 --patchify-batches 64 --modes flax-fp32,flax-bf16,torch-eager-fp32,torch-eager-bf16)
  PROFILE=(--preset tiny --batch-size 32 --steps 2 --bf16)
  EXTRA="--preset tiny --epochs 1 --limit-train 1000 --limit-test 100"
else
  BENCH=(--preset base --batch-size 1024 --steps 20 --patchify-batches 64,1024,8192)
  PROFILE=(--preset base --batch-size 1024 --steps 20 --bf16)
  EXTRA=""
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"; } > "$OUT/env-$PART.txt" 2>&1
T0=$(date +%s)
if [ "$PART" = d ]; then
  python train/profile_step.py "${PROFILE[@]}" --out "$OUT/profile" > "$OUT/profile.log" 2>&1
  echo "profile done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
fi
if [ "$PART" = a ]; then
  python train/bench.py "${BENCH[@]}" --out "$OUT" 2>&1 | tail -40 > "$OUT/bench.log"
  echo "bench done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
fi
python train/experiments.py --plan "gpu-$PART" --data "$DATA" --out "$WORK/$PART" --extra "$EXTRA" \
  > "$OUT/experiments-$PART.log" 2>&1
cp "$WORK/$PART/results.json" "$OUT/results-$PART.json" 2>/dev/null
echo "all done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
