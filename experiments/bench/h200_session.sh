#!/usr/bin/env bash
# The issue-12/13/14 benchmarks of the 2026-12-02 session in one device call (H200):
# GPU tests of the kernels first, then each benchmark under its own time limit, so one
# failure does not stop the rest. Everything lands in $OUT/results.tar.gz; the log in $OUT/log.
# Run from the repository root on the device machine, with .whl carried (ml_collections,
# tensorboardX, tqdm):  bash experiments/bench/h200_session.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 BSRNN_AUTOTUNE_CACHE=$OUT/r/autotune.json
R=$OUT/r; mkdir -p "$R"
C=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
step() {  # limit, command...: run it, then pack what has come out so far
  local limit=$1; shift; echo "=== $(date +%T) $*"; timeout "$limit" "$@"; echo "=== rc $?"
  tar -czf "$OUT/results.tar.gz" -C "$OUT" r
}
{
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
python3 -c "import jax, jaxlib, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())"
step 80 python3 -m pytest -q -p no:warnings tests/test_recurrence.py tests/test_mosaic_gpu.py -k "gpu or mosaic"
step 70 python3 experiments/bench/masked_step.py --json=$R/masked_step_h200.json
step 50 python3 experiments/bench/block_diagonal.py --unroll=8 --json=$R/bd_h200.json --markdown=$R/bd_h200.md
step 40 python3 experiments/bench/sparse_training.py --json=$R/st_h200.json --markdown=$R/st_h200.md
step 140 python3 -W ignore experiments/bench/gru_sequence.py --cases gru:2560 \
  --blocks 16x16,32x32,4x4 --methods cudnn,dense,proj,auto,pallas,persist,mosaic \
  --budget_s 125 --skip_canary --commit "$C" --json=$R/gru2560_h200.json --markdown=$R/gru2560_h200.md
step 90 python3 -W ignore experiments/bench/gru_sequence.py --cases lstm:1500,gru:1760,rnn:1760 \
  --blocks 16x16,4x4 --methods cudnn,dense,auto,pallas --budget_s 75 --skip_canary --commit "$C" \
  --json=$R/seq_others_h200.json --markdown=$R/seq_others_h200.md
step 60 python3 experiments/bench/end_to_end.py --json=$R/e2e_h200.json --markdown=$R/e2e_h200.md
step 40 python3 experiments/bench/matmul.py --mode=gpu --budget_s 30 --commit "$C" \
  --json=$R/matmul_h200.json --markdown=$R/matmul_h200.md
} 2>&1 | tee "$OUT/log"
