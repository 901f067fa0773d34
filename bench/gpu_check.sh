#!/bin/bash
# One prepared accelerator session (bench/README.md). Every step has its own time limit
# and appends its JSON lines to $OUT/bench.jsonl (default ./gpu_out), so a step that fails
# or runs out of time costs only itself. Steps (STEPS="..." picks some, in this order):
#
#   env       versions and the device
#   torch     PyTorch: the official pattern (eager fp32) and the best-practice one (AMP bf16,
#             channels_last, torch.compile), sites in sequence, in one invocation
#   profile   the top device ops of two LC-Fed stage-A rounds (bench/profile_round.py)
#   impls     LC-Fed stage A per conv implementation: compile s, img/s, peak memory
#   sites     K = 4, 8, 16, 32 sites with the one-copy implementations (unroll for comparison)
#   seeds     S = 1, 2, 4 seeds in one program at K = 4
#   flags     XLA flags the profile may point to (command buffers, autotune level)
#   full      a whole LC-Fed run through launch.py: 300 + 300 rounds, polyp-sized synthetic data
#
# The device tool allows 10 minutes a command: run it as two commands, e.g.
#   STEPS="env torch profile impls" bash bench/gpu_check.sh
#   STEPS="sites seeds full" bash bench/gpu_check.sh
# SMOKE=1 runs every step at toy sizes on a CPU, to check the script before a lease.
# Packages the image lacks (ml-collections, tensorboardX) are installed first from ./.whl.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"env torch profile impls sites seeds flags full"}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
T0=$(date +%s)
step() {   # step NAME LIMIT_S COMMAND...: runs it, its output into $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" ${name%%_*} "*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" | sed "s/^{/{\"step\": \"$name\", /" | tee -a "$OUT/bench.jsonl"
  echo "   $name: rc=$rc wall_s=$(( $(date +%s) - t ))"
  [ $rc -eq 0 ] || tail -n 8 "$OUT/$name.log"
}
# The paper's polyp setting, or toy sizes on a CPU.
PAPER="--size 384 --base 16 --local_steps 50 --batch 6"
TORCH_SIZE="--size 384 --local_steps 50 --base 16"
FULL_SIZE="--config.image_size=384 --config.model.base=16 --config.rounds=300 --config.local_steps=50 --config.lcfed.hc_rounds=300 --config.lcfed.head_iters=10"
K32=32
if [ "${SMOKE:-0}" = 1 ]; then
  PAPER="--size 32 --base 4 --local_steps 2 --batch 2"
  TORCH_SIZE="--size 32 --local_steps 2 --base 4"
  FULL_SIZE="--config.image_size=32 --config.model.base=4 --config.rounds=2 --config.local_steps=2 --config.lcfed.hc_rounds=1 --config.lcfed.head_iters=1"
  K32=8
fi
COMPILE="$PY bench/compile.py $PAPER --rounds 3 --train_size 16 --timeout 170"

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import jax, flax, optax, orbax.checkpoint, ml_collections, tensorboardX; print(jax.__version__, jax.devices())'"
cat "$OUT/env.log" 2>/dev/null
step torch 240 ${TORCH_PY:-$PY} bench/torch_reference.py --sites 4 --batch 6 --rounds 3 --patterns eager best $TORCH_SIZE
step profile 200 $PY bench/profile_round.py $PAPER --top 15
for impl in unroll grouped pallas map; do
  step impls_$impl 180 $COMPILE --sites 4 --impls $impl
done
for k in 8 16 $K32; do
  step sites_$k 180 $COMPILE --sites $k --impls grouped pallas --timeout 85
done
step sites_unroll32 180 $COMPILE --sites $K32 --impls unroll
step seeds 300 $COMPILE --sites 4 --impls grouped map --seeds 2 4 --timeout 140
step flags_cmdbuf 180 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" $COMPILE --sites 4 --impls unroll
step flags_autotune 180 env XLA_FLAGS="--xla_gpu_autotune_level=0" $COMPILE --sites 4 --impls unroll
# The whole pipeline at the paper's scale: 4 sites at 384 px, 300 rounds of 50 local steps
# (stage A) + 300 HC rounds, evaluation every 50 rounds and at the end. Training-set size
# does not change a round's cost (batches are drawn on the device), so the synthetic sites
# keep 60 training images each (a polyp site's test split: 100 images).
rm -rf /tmp/full_run
step full 420 $PY launch.py --config configs/synthetic.py:lcfed --workdir /tmp/full_run $FULL_SIZE \
  --config.eval_every=50 --config.checkpoint_every=100 --config.eval.selection=test \
  --config.data.train_sizes="(60,)" --config.data.test_size=100 --config.log.tensorboard=False
if [ -f "$OUT/full.log" ]; then
  grep -E "(data|mesh|method|compil|eval round|selected|done in|round (1|50|300|301|600)/)" "$OUT/full.log" | tail -n 20
fi
echo "== done at $(( $(date +%s) - T0 ))s"
