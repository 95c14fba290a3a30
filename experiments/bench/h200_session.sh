#!/usr/bin/env bash
# One device call (H200) of issue-12/13/14 benchmarks: each benchmark under its own time
# limit, so one failure does not stop the rest. Results land in $OUT/results.tar.gz, the log
# in $OUT/log. Run from the repository root on the device machine, with .whl carried
# (ml_collections, tensorboardX, tqdm):  STEPS="seq others e2e" bash experiments/bench/h200_session.sh
# STEPS picks the benchmarks (default: all, in this order): tests seq others e2e ds2step bd matmul
# (and mtests, mp, e2e_ds2, e2e_bi, st, bdk, e2e_trained (needs DS2_MODEL), be, e2e_rnn, only
# when named);
# OTHER_CASES, OTHER_BLOCKS, OTHER_METHODS, OTHER_BUDGET narrow "others". COMMIT names the commit
# (the device's copy of .git is the session's first checkout, so rev-parse there is stale).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 BSRNN_AUTOTUNE_CACHE=$OUT/r/autotune.json
R=$OUT/r; mkdir -p "$R"
C=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
STEPS=${STEPS:-tests seq others e2e ds2step bd matmul}
step() {  # name limit command...: run it if STEPS names it, then pack what has come out so far
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "=== $(date +%T) $*"; timeout "$limit" "$@"; echo "=== rc $?"
  tar -czf "$OUT/results.tar.gz" -C "$OUT" r
}
SEQ="python3 -W ignore experiments/bench/gru_sequence.py --skip_canary --commit $C"
{
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
python3 -c "import jax, jaxlib, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())"
step tests 80 python3 -m pytest -q -p no:warnings tests/test_recurrence.py tests/test_mosaic_gpu.py -k "gpu or mosaic"
# The Mosaic GPU kernels' tests alone (the persistent kernel's compile and probe take longer).
step mtests 200 python3 -m pytest -q -p no:warnings -x tests/test_mosaic_gpu.py
# GRU 2560 16x16 with the persistent Mosaic kernel beside the others (issue 12's target cell).
step mp ${MP_BUDGET:-200} $SEQ --cases gru:2560 --blocks 16x16 \
  --methods cudnn,dense,auto,pallas,mosaic,mosaic_p,mosaic_p_nolimit,mosaic_p_s10 \
  --budget_s $((${MP_BUDGET:-200} - 20)) --json=$R/mp.json --markdown=$R/mp.md
step seq 170 $SEQ --cases gru:2560 --blocks 16x16,4x4,32x32 --methods cudnn,dense,auto,pallas,mosaic \
  --budget_s 150 --json=$R/gru2560.json --markdown=$R/gru2560.md
step others $((${OTHER_BUDGET:-95} + 15)) $SEQ --cases ${OTHER_CASES:-lstm:1500,gru:1760,rnn:1760} \
  --blocks ${OTHER_BLOCKS:-16x16,4x4} --methods ${OTHER_METHODS:-cudnn,dense,auto,pallas} \
  --budget_s ${OTHER_BUDGET:-95} --json=$R/others.json --markdown=$R/others.md
step e2e 90 python3 experiments/bench/end_to_end.py --repeats 5 --json=$R/e2e.json --markdown=$R/e2e.md
# DS2 at B = 1 only: the AN4 GRU (unidirectional) with its unpruned copy through the same
# engine, then the same GRU bidirectional, fused directions against separate (issue 13).
step e2e_ds2 100 python3 experiments/bench/end_to_end.py --skip=lm --ds2_batches=1 --repeats 5 \
  --json=$R/e2e_ds2.json --markdown=$R/e2e_ds2.md
step e2e_ds2 90 python3 experiments/bench/end_to_end.py --skip=lm,unpruned --ds2_dtype=float16 \
  --ds2_batches=1 --repeats 5 --json=$R/e2e_ds2_fp16.json --markdown=$R/e2e_ds2_fp16.md
# The AN4 RNN config's default model (bidirectional clipped ReLU, layer norm on the input
# projections): its layers on the kernels since this evening (issue 13).
step e2e_rnn 90 python3 experiments/bench/end_to_end.py --skip=lm,unpruned --ds2_cell=rnn_clipped_relu \
  --ds2_bidirectional --ds2_input_norm --ds2_batches=1 --repeats 5 --json=$R/e2e_rnn.json \
  --markdown=$R/e2e_rnn.md
step e2e_bi 60 python3 experiments/bench/end_to_end.py --skip=lm,unpruned --ds2_bidirectional \
  --ds2_batches=1 --repeats 5 --json=$R/e2e_ds2_bi.json --markdown=$R/e2e_ds2_bi.md
# Sparse training after the freeze (issue 14): masked dense against the frozen kept blocks.
# Both kept-block weight gradients (dW as one GEMM then gathered, or per block) and where
# each variant's layer time goes (GPU kernels per step).
step st 150 python3 experiments/bench/sparse_training.py --unroll=8 --repeats=10 --impls=pallas \
  --weight_grads=${ST_WG:-blocks,dense} --kernels --json=$R/st.json --markdown=$R/st.md
step ds2step 110 python3 experiments/bench/masked_step.py --model ds2 --repeats 3 --json=$R/ds2step.json
step bd 150 python3 experiments/bench/block_diagonal.py --cells=gru,lstm --modules=1,8,16 --unroll=8 \
  --repeats=10 --timed=layer,products --json=$R/bd.json --markdown=$R/bd.md
# Where a block-diagonal step's time goes (issue 14): GPU kernels per step, GRU G = 1 and 8.
step bdk 90 python3 experiments/bench/block_diagonal.py --cells=gru --modules=1,8 --unroll=8 \
  --repeats=5 --timed=layer,products --kernels --json=$R/bdk.json --markdown=$R/bdk.md
# A trained DS2 file (DS2_MODEL=path, e.g. brought back by gpu_call.sh MODELS=...; issue 13).
[ -n "${DS2_MODEL:-}" ] && step e2e_trained 120 python3 experiments/bench/end_to_end.py --skip=lm \
  --ds2_model="$DS2_MODEL" --ds2_batches=1,32 --repeats 5 --json=$R/e2e_trained.json \
  --markdown=$R/e2e_trained.md
# The break-even chart (issue 12 asks for it redrawn on the H200; the committed one is the H100's).
step be 120 python3 experiments/bench/break_even.py --budget_s 100 --json=$R/break_even.json
step matmul 60 python3 experiments/bench/matmul.py --mode=gpu --budget_s 50 --commit "$C" \
  --json=$R/matmul.json --markdown=$R/matmul.md
} 2>&1 | tee "$OUT/log"
