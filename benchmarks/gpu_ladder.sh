#!/usr/bin/env bash
# The GPU runs behind the H100/H200 rows of benchmarks/RESULTS.md: `wm bench train` on the
# `dynamics_h100` preset and variants, each in its own process (an OOM or an unsupported
# kernel ends that variant only). Each takes ~3 min on an H100, most of it start-up.
# (`model.attention=cudnn` is refused there: cuDNN flash attention does not take the
# 15-frame temporal sequence.) Rows go to $OUT/RESULTS.md, logs beside.
# Run from the repo root on the GPU machine: `OUT=/tmp/ladder bash benchmarks/gpu_ladder.sh`.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
OUT=${OUT:-runs/gpu_ladder}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

bench() {
  local name=$1; shift
  echo "== $name: $*"
  timeout "${STEP_TIMEOUT:-300}" python3 -m wm_jax.bench.train --config dynamics_h100 --steps 10 \
    --results "$OUT/RESULTS.md" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?"; tail -n 14 "$OUT/$name.log" | cut -c1-400
}

for variant in ${VARIANTS:-base b6}; do
  case $variant in
    base) bench base ;;
    b6) bench b6 --set data.batch_size=6 ;;
    l24) bench l24 --set model.dynamics.num_layers=24 ;;
    b8remat) bench b8remat --set data.batch_size=8 --set model.remat=true ;;
  esac
done
