#!/bin/bash
# One prepared accelerator session (bench/README.md): the paper-setting throughput of each
# conv implementation, the PyTorch reference, 32 sites' memory, and a full 300-round
# polyp-sized LC-Fed run through launch.py. Every step has its own time limit and appends
# to $OUT (or ./gpu_out), so a step that fails or runs out of time costs only itself.
#
#   bash bench/gpu_check.sh                    # all steps
#   STEPS="torch lcfed" bash bench/gpu_check.sh
#
# Packages the image lacks (ml-collections) are installed first from ./.whl if present.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"env torch lcfed fedavg sites32 full"}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
T0=$(date +%s)
step() {   # step NAME LIMIT_S COMMAND...: runs it, its output into $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" | tee -a "$OUT/bench.jsonl"
  echo "   $name: rc=$rc wall_s=$(( $(date +%s) - t ))"
  [ $rc -eq 0 ] || tail -n 8 "$OUT/$name.log"
}
# SMOKE=1: the same steps at toy sizes, to check the script on a CPU before a lease.
SMALL=""; FULL_SIZE="--config.image_size=384 --config.model.base=16 --config.rounds=300 --config.local_steps=50 --config.lcfed.hc_rounds=300 --config.lcfed.head_iters=10"
if [ "${SMOKE:-0}" = 1 ]; then
  SMALL="--sizes 32 --base 4 --local_steps 2 --rounds 1"
  FULL_SIZE="--config.image_size=32 --config.model.base=4 --config.rounds=2 --config.local_steps=2 --config.lcfed.hc_rounds=1 --config.lcfed.head_iters=1"
fi
BENCH="$PY bench/throughput.py --paper --rounds 3"

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import jax, flax, optax, orbax.checkpoint, ml_collections; print(jax.__version__, jax.devices())'"
cat "$OUT/env.log" 2>/dev/null
TORCH_SIZE="--size 384 --local_steps 50 --base 16"; [ "${SMOKE:-0}" = 1 ] && TORCH_SIZE="--size 32 --local_steps 2 --base 4"
step torch 120 ${TORCH_PY:-$PY} bench/torch_reference.py --sites 4 --batch 6 --rounds 3 $TORCH_SIZE
for impl in unroll im2col shifts; do
  step lcfed 150 $BENCH --methods lcfed --impls $impl $SMALL
  mv "$OUT/lcfed.log" "$OUT/lcfed_$impl.log" 2>/dev/null
done
step fedavg 120 $BENCH --methods fedavg --impls unroll $SMALL
step sites32 150 $BENCH --methods lcfed --impls unroll --sites 32 --local_steps 5 --rounds 1 --train_size 8 $SMALL
# The whole pipeline at the paper's scale: 4 sites at 384 px, 300 rounds of 50 local steps
# (stage A) + 300 HC rounds, evaluation every 50 rounds and at the end. Training-set size
# does not change the round's cost (batches are drawn on the device), so the synthetic
# sites keep 60 training images each (a polyp site's test split: 100 images).
rm -rf /tmp/full_run
step full 330 $PY launch.py --config configs/synthetic.py:lcfed --workdir /tmp/full_run $FULL_SIZE \
  --config.lcfed.hc_learning_rate=1e-3 \
  --config.eval_every=50 --config.checkpoint_every=100 --config.eval.selection=test \
  --config.data.train_sizes="(60,)" --config.data.test_size=100
if [ -f "$OUT/full.log" ]; then
  grep -E "^(data|mesh|method|eval round|selected|round (1|50|300|301|600)/)" "$OUT/full.log" | tail -n 20
fi
echo "== done at $(( $(date +%s) - T0 ))s"
