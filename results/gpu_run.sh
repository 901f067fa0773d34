#!/bin/bash
# One prepared device command per task: the GPU protocol's methods x 3 seeds from a data
# pack, as much of it as fits one command, the rest left for the next (results/README.md).
#
#   bash results/gpu_run.sh polyp          # on the device, the pack carried: packs/polyp256
#   bash results/gpu_collect.sh gpu_out/gpu_polyp.tar.gz   # here, on what came back
#
# It installs the wheels in ./.whl where Python lacks them (ml-collections,
# tensorboardX), checks that JAX sees a GPU, skips every method whose seeds are collected under results/<task>/gpu/, runs
# the rest a method at a time (its seeds in one program) and starts a method only if its
# estimated time fits before DEADLINE_S (default 530 s after this script starts, for a
# 600 s command); one still running then is stopped, its checkpoints left in RUNS_DIR for
# a second command on the same warm machine. $OUT (default ./gpu_out) gets
# gpu_<task>.tar.gz (every finished seed's config.json, timing.json, metrics.jsonl,
# results.json, the lowest seed's overlays, the logs), gpu_run.jsonl (the session's
# JSON-lines log) and xla_cache.tar.gz (the compilation cache, when under 15 MiB).
#
# METHODS, SEEDS, PACK (default packs/<task>256), DEADLINE_S, RUNS_DIR (default
# /tmp/lcfed_gpu/<task>), RESULTS_DIR (default results), SEEDS_PER_PROGRAM (1: one program
# per seed) and PY override the defaults; extra arguments go to launch.py.
# SMOKE=1 runs the same at toy sizes on a CPU (PROTOCOL=smoke, methods fedavg,local,
# seeds 0,1, the config's tiny size), as tests/test_gpu_run.py does.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
task=${1:?usage: bash results/gpu_run.sh polyp|faz [launch.py flags]}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
# Only where this Python lacks them (the device's has no ml-collections, no tensorboardX).
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import ml_collections, tensorboardX" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${SMOKE:-0}" = 1 ]; then
  PROTOCOL=smoke; default_methods=fedavg,local; config_arg=tiny; require_gpu=0
else
  PROTOCOL=gpu; config_arg=""; require_gpu=1
  default_methods=local,fedavg,ft,fedbn,fedrep,prrfl,lcfed,lcfed:lcfed.hc=False,fedprox,ditto,fedper,fedbabu
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
source results/protocol.sh
DEADLINE_S=${DEADLINE_S:-530}
export LCFED_JAX_CACHE=${LCFED_JAX_CACHE:-$PWD/.xla_cache}
# The driver stops on its own before DEADLINE_S; this only guards against a hang.
timeout --kill-after=10 $(( DEADLINE_S + 40 )) "$PY" -m lcfed_jax.run.gpu_session run "$task" \
  --pack "${PACK:-packs/${task}256}" --out "$OUT" --results "${RESULTS_DIR:-results}/$task/gpu" \
  --runs "${RUNS_DIR:-/tmp/lcfed_gpu/$task}" --methods "${METHODS:-$default_methods}" \
  --seeds "${SEEDS:-$protocol_seeds}" --deadline_s "$DEADLINE_S" --start "$START" \
  --config_arg "$config_arg" --seeds_per_program "${SEEDS_PER_PROGRAM:-0}" --require_gpu "$require_gpu" \
  -- "${protocol_args[@]}" --config.log.tensorboard=False "${@:2}"
rc=$?
echo "== gpu_run.sh $task: rc=$rc after $(( $(date +%s) - START ))s; $OUT:"
ls -la "$OUT"
exit $rc
