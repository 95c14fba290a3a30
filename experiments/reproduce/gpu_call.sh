#!/usr/bin/env bash
# One device call of the reproduction grid (issue 17): train, collect, hand back.
#
#   bash experiments/reproduce/gpu_call.sh STUDIES MATCH WORKERS DEADLINE
#
# Run from the repository root on the device machine with .whl (ml_collections,
# tensorboardX, tqdm) and workdir_data/ (a copy of ../shared/data/an4, and ptb for the PTB
# studies; /workdir*/ is git-ignored) carried. grid.py run sets the Triton GEMM flag itself
# (--xla_gpu_enable_triton_gemm=false: 12+ processes autotuning at once took minutes to
# start). collect writes dense_scores.json from the checkpoints of the keep_scores runs, so
# it must run in the same call as their training. What collect changed under
# experiments/results and the log.txt of every unfinished run come back in one archive,
# $OUT/results.tar.gz (results/: copy it over experiments/results; failed/; raw/: every finished
# run's report, command and metrics as trained; with MODELS=REGEX also the model.npz of the
# runs whose study/name/model.npz matches), the log in $OUT/log.
set -u
STUDIES=$1 MATCH=$2 WORKERS=$3 DEADLINE=$4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export BSRNN_DATA=${BSRNN_DATA:-$PWD/workdir_data}
W=${WORKDIR:-/tmp/grid}
mkdir -p "$W" "$OUT/failed"
{
  echo "=== $(date +%T) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  python3 experiments/reproduce/grid.py run --studies="$STUDIES" --match="$MATCH" \
    --workdir="$W" --workers="$WORKERS" --deadline="$DEADLINE"
  echo "=== $(date +%T) run rc $?"
  touch "$W/.collect_stamp"
  sleep 1
  python3 experiments/reproduce/grid.py collect --workdir="$W"
  echo "=== $(date +%T) collect rc $?"
  find experiments/results -type f -newer "$W/.collect_stamp" -print | while read -r f; do
    mkdir -p "$OUT/results/$(dirname "${f#experiments/results/}")"
    cp "$f" "$OUT/results/${f#experiments/results/}"
  done
  for log in "$W"/*/*/log.txt; do
    [ -e "$log" ] || continue
    [ -e "$(dirname "$log")/report.json" ] && continue
    cp "$log" "$OUT/failed/$(basename "$(dirname "$(dirname "$log")")")_$(basename "$(dirname "$log")").txt"
  done
  # Every finished run's own files too, whatever collect did with them (small: no masks).
  (cd "$W" && find . -mindepth 3 -maxdepth 3 \( -name report.json -o -name command.txt \
     -o -name metrics.jsonl -o -name dense_scores.json \) -print) | while read -r f; do
    mkdir -p "$OUT/raw/$(dirname "$f")" && cp "$W/$f" "$OUT/raw/$f"
  done
  # MODELS (a regex of study/name, optional): those runs' exported model.npz too, for
  # experiments/bench/end_to_end.py --ds2_model (trained files, not random ones).
  if [ -n "${MODELS:-}" ]; then
    (cd "$W" && find . -mindepth 3 -maxdepth 3 -name model.npz -print) | while read -r f; do
      echo "${f#./}" | grep -Eq "$MODELS" || continue
      mkdir -p "$OUT/raw/$(dirname "$f")" && cp "$W/$f" "$OUT/raw/$f"
    done
  fi
  echo "=== $(date +%T) done"
} 2>&1 | tee "$OUT/log"
# The device tool returns at most 8 files, 2 folders down: everything travels as one archive.
mkdir -p "$OUT/results" "$OUT/raw"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results failed raw && rm -rf "$OUT/results" "$OUT/failed" "$OUT/raw"
