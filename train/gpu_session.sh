#!/usr/bin/env bash
# The GPU measurements behind the README's GPU tables, as one command per device call.
#   PART=a: the framework benchmark (train/bench.py) and plan gpu-a of train/experiments.py
#   PART=b: plan gpu-b (the accuracy recipe over 3 seeds, ensembles, ablations)
#   PART=d: where the H100 step's time goes (train/profile_step.py), then plan gpu-d
#   PART=f: the H100 step profiled (Flax and PyTorch, raw trace kept), Flax with XLA against
#           cuDNN attention, then plan gpu-f: seed 0 alone, seeds 1 and 2 at once (cut at a
#           deadline so that the ensembles still run); everything packed into $OUT/part-f.tar.gz
#   PART=g: plan gpu-g (the kaggle recipe with half-strength elastic distortion, 3 seeds, TTA ensemble)
#   PART=h: plans gpu-g (3 runs at once) and gpu-d's four bf16 runs (2 at once) side by side on the one GPU, cut
#           at a deadline; then one launch of gpu-g's recipe alone with the compilation cache
#           those runs filled (killed after 40 s: its first epochs time a warm start-up);
#           everything packed into $OUT/part-h.tar.gz
#   PART=i: after jaxvit's Dense began summing bias gradients in float32 in bf16 and its head
#           began computing in bf16 as under autocast (not run; PART=j asked the same questions):
#           the bf16 step's speed (Flax beside torch.compile), then the Flax `base` runs of plan
#           gpu-d in bf16, seeds 0-2, 2 at a time: does the Flax twin now reach PyTorch's 99.26%?
#   PART=j: (an H200, 2026-12-04) the bf16 train step of Flax, our PyTorch twin and timm's ViT
#           (eager and compiled) in one session, then plan gpu-j (width 384 against 192 on the
#           `kaggle` recipe at 60 epochs; the twins' bf16 gap on `base`), four runs at a time, cut
#           at a deadline; everything packed into $OUT/part-j.tar.gz
#   PART=k: plan gpu-k (width 384 at lower learning rates), three runs at once, cut at a deadline
#   PART=l: where our PyTorch twin's step loses to timm's (train/profile_step.py: both, eager
#           and compiled, bf16, every GPU kernel classed by name; raw traces kept), then plan
#           gpu-l (width 384 at 3e-4 over 3 seeds and their TTA ensemble, and at 2e-4), four runs
#           at a time, cut at a deadline; everything packed into $OUT/part-l.tar.gz
#   PART=m: the 20-s goal: plan gpu-m (the cropped CPU recipe, 17 tokens: batch 128 over three
#           seeds, overlapping 8x8 patches every 4 pixels over two, the recipe with --rope
#           over two, then 256, 512 and 128 in float32), one run at
#           a time, each alone for its launch-to-exit time; the cache starts empty, so the first
#           run of each batch size and dtype compiles (as on a fresh machine) and the seeds
#           after it find it warm; cut at a deadline; everything packed into $OUT/part-m.tar.gz
#   PART=s: start-up on the GPU, caches off / cold / warm (train/startup.py, `kaggle`, one round)
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
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log-$PART.txt"; }
# The rest of the part's $BUDGET on plan gpu-$PART in $R/exp ($1: the runs' --extra, $2: runs at
# a time), cut at a deadline 25 s before the end; then everything but weights and submissions
# packed into $OUT/part-$PART.tar.gz
plan_to_deadline() {
  local left=$(( BUDGET - ($(date +%s) - T0) - 25 ))
  XLA_PYTHON_CLIENT_PREALLOCATE=false python train/experiments.py --plan "gpu-$PART" --data "$DATA" \
    --out "$R/exp" --extra="$1" --jobs "$2" --deadline $left > "$R/exp.log" 2>&1
  stamp "experiments rc $? (deadline $left s)"
  cp "$R/exp/results.json" "$OUT/results-$PART.json" 2>/dev/null
  tar czf "$OUT/part-$PART.tar.gz" -C "$R" --exclude='*.safetensors' --exclude='submission*.csv' .
  stamp "packed"
}
if [ "$PART" = s ]; then
  if [ "${SMOKE:-0}" = 1 ]; then SX="--preset tiny --limit-train 1000 --limit-test 100"; else SX="--preset kaggle"; fi
  python train/startup.py --data "$DATA" --rounds 1 --out "$OUT" --extra="$SX" > "$OUT/startup.md" 2> "$OUT/startup.log"
  echo "startup rc $? after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
  exit 0
fi
if [ "$PART" = f ]; then
  BUDGET=${BUDGET:-540}  # seconds for the whole part
  if [ "${SMOKE:-0}" = 1 ]; then PRESET=tiny; BATCH=32; STEPS=2; RUNX="--preset tiny --limit-train 1000 --limit-test 100 --epochs 2 --no-plots"
  else PRESET=base; BATCH=1024; STEPS=20; RUNX="--no-plots"; fi
  R="$WORK/f"; mkdir -p "$R"
  if [ "${SKIP_PROFILE:-0}" != 1 ]; then
    stamp "profile"
    timeout 150 python train/profile_step.py --preset $PRESET --batch-size $BATCH --steps $STEPS \
      --bf16 --keep-trace --out "$R/profile" > "$R/profile.log" 2>&1; stamp "profile rc $?"
    for attn in xla cudnn; do
      timeout 90 python train/bench.py --preset $PRESET --batch-size $BATCH --steps $STEPS \
        --modes flax-bf16 --flax-attention $attn --patchify-batches "" --out "$R/attn-$attn" \
        > "$R/attn-$attn.log" 2>&1; stamp "bench flax-bf16 $attn attention rc $?"
    done
  fi
  python train/experiments.py --plan gpu-f --data "$DATA" --out "$R/exp" --extra="$RUNX" \
    --only kaggle-e120-aug-s0 > "$R/exp-solo.log" 2>&1; stamp "solo run rc $?"
  cp "$R/exp/results.json" "$R/results-solo.json" 2>/dev/null
  python train/ensemble.py "$R/exp/kaggle-e120-aug-s0" --tta --weights final --data "$DATA" \
    --out "$R/s0-tta-final" > "$R/s0-tta-final.log" 2>&1; stamp "s0 TTA rc $?"
  LEFT=$(( BUDGET - ($(date +%s) - T0) - 75 ))  # keep 75 s for the ensembles
  XLA_PYTHON_CLIENT_PREALLOCATE=false python train/experiments.py --plan gpu-f --data "$DATA" \
    --out "$R/exp" --extra="$RUNX" --only kaggle-e120-aug-s1,kaggle-e120-aug-s2 --jobs 2 --deadline $LEFT > "$R/exp-pair.log" 2>&1
  stamp "pair rc $? (deadline $LEFT s)"
  cp "$R/exp/results.json" "$R/results-pair.json" 2>/dev/null
  mv "$R/profile/flax.trace.json.gz" "$OUT/" 2>/dev/null  # apart: it may be large
  tar czf "$OUT/part-f.tar.gz" -C "$R" --exclude='*.safetensors' --exclude='submission.csv' .
  stamp "packed"
  exit 0
fi
if [ "$PART" = j ]; then
  BUDGET=${BUDGET:-500}  # seconds for the whole part
  if [ "${SMOKE:-0}" = 1 ]; then JB=(--preset tiny --batch-size 32 --steps 3 --device cpu)
    JX="--preset tiny --epochs 2 --limit-train 1000 --limit-test 100"; TORCH=torch-eager-bf16
  else JB=(--preset base --batch-size 1024 --steps 20); JX=""; TORCH=torch-eager-bf16,torch-compile-bf16; fi
  R="$WORK/j"; mkdir -p "$R"
  nvidia-smi > "$R/nvidia-smi-before.txt" 2>&1
  timeout 150 python train/bench.py "${JB[@]}" --modes "flax-bf16,$TORCH" --patchify-batches "" \
    --out "$R/bench" > "$R/bench.log" 2>&1; stamp "bench rc $?"
  timeout 100 python train/bench.py "${JB[@]}" --modes timm-eager-bf16,timm-compile-bf16 \
    --patchify-batches "" --out "$R/bench-timm" > "$R/bench-timm.log" 2>&1; stamp "bench timm rc $?"
  cp "$R/bench/bench.md" "$OUT/bench.md" 2>/dev/null; cp "$R/bench-timm/bench.md" "$OUT/bench-timm.md" 2>/dev/null
  plan_to_deadline "$JX" 4
  exit 0
fi
if [ "$PART" = l ]; then
  BUDGET=${BUDGET:-540}  # seconds for the whole part
  if [ "${SMOKE:-0}" = 1 ]; then LP=(--preset tiny --batch-size 32 --steps 2)
    LX="--preset tiny --epochs 2 --limit-train 1000 --limit-test 100"
  else LP=(--preset base --batch-size 1024 --steps 20); LX=""; fi
  R="$WORK/l"; mkdir -p "$R"
  timeout 240 python train/profile_step.py "${LP[@]}" --bf16 --keep-trace \
    --frameworks torch-compile,timm-compile,torch,timm --out "$R/profile" > "$R/profile.log" 2>&1
  stamp "profile rc $?"; cp "$R/profile/profile.md" "$OUT/profile-l.md" 2>/dev/null
  plan_to_deadline "$LX" 4
  exit 0
fi
if [ "$PART" = m ]; then
  BUDGET=${BUDGET:-480}  # seconds for the whole part
  if [ "${SMOKE:-0}" = 1 ]; then MX="--epochs 2 --clean-epochs 1 --limit-train 1000 --limit-test 100"; else MX=""; fi
  R="$WORK/m"; mkdir -p "$R"
  export VIT_CACHE_DIR="$R/cache"  # empty: the first run compiles, as on a fresh machine
  plan_to_deadline "$MX" 1
  exit 0
fi
if [ "$PART" = k ]; then
  BUDGET=${BUDGET:-250}
  if [ "${SMOKE:-0}" = 1 ]; then KX="--preset tiny --epochs 2 --limit-train 1000 --limit-test 100"; else KX=""; fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false python train/experiments.py --plan gpu-k --data "$DATA" \
    --out "$WORK/k" --extra="$KX" --jobs 3 --deadline $(( BUDGET - 20 )) > "$OUT/experiments-k.log" 2>&1
  echo "experiments rc $? after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
  cp "$WORK/k/results.json" "$OUT/results-k.json" 2>/dev/null
  tar czf "$OUT/part-k.tar.gz" -C "$WORK/k" --exclude='*.safetensors' --exclude='submission*.csv' .
  exit 0
fi
if [ "$PART" = h ]; then
  DEADLINE=${DEADLINE:-400}  # seconds: runs still going then are killed, the ensemble follows
  if [ "${SMOKE:-0}" = 1 ]; then HX="--preset tiny --epochs 2 --limit-train 1000 --limit-test 100"; else HX=""; fi
  R="$WORK/h"; mkdir -p "$R"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # five processes share the GPU's memory
  python train/experiments.py --plan gpu-g --data "$DATA" --out "$R/g" --extra="$HX" --jobs 3 \
    --deadline "$DEADLINE" > "$R/g.log" 2>&1 &
  G=$!
  python train/experiments.py --plan gpu-d --data "$DATA" --out "$R/d" --extra="$HX --no-plots" --jobs 2 \
    --only flax-base-s1,flax-base-s2,torch-base-s1,torch-base-s2 \
    --deadline "$DEADLINE" > "$R/d.log" 2>&1 &
  D=$!
  wait $D; stamp "gpu-d rc $?"
  wait $G; stamp "gpu-g rc $?"
  cp "$R/g/results.json" "$OUT/results-g.json"; cp "$R/d/results.json" "$OUT/results-d.json"
  nvidia-smi > "$R/nvidia-smi-after.txt" 2>&1
  timeout 40 python train/flax_main.py --preset kaggle --elastic 17 --no-plots --data "$DATA" \
    --out "$R/warm-launch" $HX > "$R/warm-launch.log" 2>&1; stamp "warm launch rc $? (124: cut at 40 s, as meant)"
  tar czf "$OUT/part-h.tar.gz" -C "$R" --exclude='*.safetensors' --exclude='submission*.csv' \
    --exclude='pseudo*.csv' .
  stamp "packed"
  exit 0
fi
if [ "$PART" = i ]; then
  if [ "${SMOKE:-0}" = 1 ]; then IB=(--preset tiny --batch-size 32 --steps 3); IX="--preset tiny --epochs 1 --limit-train 1000 --limit-test 100"
  else IB=(--preset base --batch-size 1024 --steps 20); IX=""; fi
  python train/bench.py "${IB[@]}" --modes flax-bf16,torch-compile-bf16 --patchify-batches "" --out "$OUT/bench" \
    > "$OUT/bench-i.log" 2>&1; echo "bench rc $? after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
  XLA_PYTHON_CLIENT_PREALLOCATE=false python train/experiments.py --plan gpu-d --data "$DATA" --out "$WORK/i" \
    --extra="$IX --no-plots" --jobs 2 --only flax-base-s0,flax-base-s1,flax-base-s2 > "$OUT/experiments-i.log" 2>&1
  cp "$WORK/i/results.json" "$OUT/results-i.json"
  echo "all done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
  exit 0
fi
if [ "$PART" = d ]; then
  python train/profile_step.py "${PROFILE[@]}" --out "$OUT/profile" > "$OUT/profile.log" 2>&1
  echo "profile done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
fi
if [ "$PART" = a ]; then
  python train/bench.py "${BENCH[@]}" --out "$OUT" 2>&1 | tail -40 > "$OUT/bench.log"
  echo "bench done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
fi
python train/experiments.py --plan "gpu-$PART" --data "$DATA" --out "$WORK/$PART" --extra="$EXTRA" \
  > "$OUT/experiments-$PART.log" 2>&1
cp "$WORK/$PART/results.json" "$OUT/results-$PART.json" 2>/dev/null
echo "all done after $(( $(date +%s) - T0 )) s" >> "$OUT/env-$PART.txt"
