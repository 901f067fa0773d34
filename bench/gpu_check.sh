#!/bin/bash
# One prepared accelerator session (bench/README.md, "The next device session"): every
# measurement the engine's GPU work needs, in one command of at most $BUDGET seconds
# (default 540: the device gives 10 minutes a command). Each step has its own time limit
# and is skipped, with a JSON line saying so, when the budget left is shorter than it.
# Every JSON line goes to $OUT/bench.jsonl with {"step": NAME, ...} added, and each step
# ends with a status line {"step", "status": ok|failed|timed_out|skipped, "rc", "wall_s",
# "limit_s"}; the steps' logs go to $OUT/steps.log; the profile's trimmed trace (a test
# fixture, tests/fixtures/profile_gpu) to $OUT/profile_gpu/. At most 8 files come back.
#
# Steps (STEPS="..." picks some; this order, most needed first):
#   env        versions and the device
#   torch      PyTorch reference, the official pattern (eager fp32, sites in sequence);
#              TORCH_PATTERNS="eager best" adds bf16 + channels_last + torch.compile (+70 s)
#   profile    LC-Fed stage A, conv_impl=auto (4 models: unroll): compile s, img/s over 3
#              rounds, then 2 profiled rounds: top ops and categories (>= 90% of device
#              time), busy fraction, FLOPs and bytes per round, fraction of H200 peaks
#   sites32    32 sites in one program, conv_impl=auto (grouped): compile s, img/s, memory
#   seeds8     4 sites x 8 seeds in one program, conv_impl=auto
#   pallas     4 sites, the Pallas (Triton) kernels for every convolution
#   autotune0  4 sites, auto, --xla_gpu_autotune_level=0 (compile time vs speed)
#   cmdbuf     4 sites, auto, command buffers for the local-step loop too (bench/xla_flags.py)
#   full       (not by default) a 300 + 300-round LC-Fed run through launch.py
#
# SMOKE=1 runs every step at toy sizes on a CPU (two at a time), to check the script
# before a lease; tests/test_gpu_check.py does. Wheels for packages the device image lacks
# (ml-collections, tensorboardX) are installed from ./.whl first.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-"env torch profile sites32 seeds8 pallas autotune0 cmdbuf"}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
if ! $PY -c "import ml_collections, tensorboardX" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The paper's polyp setting (4 sites x batch 6, 384 px, base 16, 50 local steps), or a
# toy one on a CPU with XLA's cheap compile (run time does not matter there).
SIZE="--size 384 --base 16 --local_steps 50 --batch 6"
TORCH_SIZE="--size 384 --base 16 --local_steps 50 --batch 6"
K32=32; K_SEEDS=4; SEEDS=8; ROUNDS=3; K4=4
TORCH_EXTRA=""
if [ "$SMOKE" = 1 ]; then
  SIZE="--size 16 --base 4 --depth 2 --local_steps 1 --batch 2"
  TORCH_SIZE="--size 32 --base 4 --local_steps 1 --batch 2"   # its U-Net has 5 levels
  K32=4; K_SEEDS=2; SEEDS=2; ROUNDS=1; K4=2
  TORCH_EXTRA="--compile_backend eager"
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  # Steps that build the same program share it through JAX's persistent cache.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/.jax_cache}
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  export OMP_NUM_THREADS=1   # PyTorch's toy rounds: no thread pool spinning beside the compiles
  # Steps on a CPU run two at a time (compiles are single-threaded), each with 3x its
  # limit: a toy step is far inside it unless the machine is shared.
  PARALLEL=${PARALLEL:-2}
  LIMIT_SCALE=${LIMIT_SCALE:-3}
fi
PARALLEL=${PARALLEL:-1}
LIMIT_SCALE=${LIMIT_SCALE:-1}
TORCH_PATTERNS=${TORCH_PATTERNS:-eager}
COMPILE="$PY bench/compile.py $SIZE --rounds $ROUNDS --train_size 16"

: > "$OUT/bench.jsonl"; : > "$OUT/steps.log"
collect() {   # collect NAME: a finished step's lines into bench.jsonl and steps.log
  local log="$OUT/.$1.log"
  [ -f "$log.jsonl" ] && cat "$log.jsonl" >> "$OUT/bench.jsonl"
  [ -f "$log" ] && { echo "==== $1"; cat "$log"; } >> "$OUT/steps.log"
  rm -f "$log" "$log.jsonl"
}

status() {   # status NAME STATUS RC WALL LIMIT
  echo "{\"step\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"wall_s\": $4, \"limit_s\": $5}"
}

run_step() {   # run_step NAME LIMIT_S COMMAND...: its JSON lines, then its status line
  local name=$1 limit=$2; shift 2
  local log="$OUT/.$name.log" t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$? wall=$(( $(date +%s) - t )) st=ok
  [ $rc -eq 0 ] || st=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && st=timed_out
  { grep -h '^{' "$log" | sed "s/^{/{\"step\": \"$name\", /"; status "$name" $st $rc $wall "$limit"; } > "$log.jsonl"
}

step() {   # step NAME LIMIT_S COMMAND...: skipped when not in STEPS or past the budget
  local name=$1 limit=$(( $2 * LIMIT_SCALE ))
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  set -- "$name" "$limit" "${@:3}"
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$PARALLEL" -gt 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
    echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
    run_step "$@" &
    return
  fi
  if [ "$left" -lt "$limit" ]; then
    if [ "$left" -lt $(( limit / 2 )) ] || [ "$left" -lt 30 ]; then
      echo "== $name skipped: ${left}s of the budget left, limit ${limit}s"
      status "$name" skipped 0 0 "$limit" | sed "s/}$/, \"budget_left_s\": $left}/" >> "$OUT/bench.jsonl"
      return
    fi
    set -- "$name" "$left" "${@:3}"   # run it on what is left
  fi
  echo "== $name (limit ${2}s, at $(( $(date +%s) - T0 ))s)"
  run_step "$@"
  tail -n 1 "$OUT/.$name.log.jsonl"
  collect "$name"   # at once: a command stopped later still returns what ran
}

step env 90 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3; \
  $PY -c 'import json, jax, flax, optax, ml_collections, tensorboardX; print(json.dumps({\"jax\": jax.__version__, \"flax\": flax.__version__, \"devices\": [str(d) for d in jax.devices()]}))'; \
  ${TORCH_PY:-$PY} -c 'import json, torch; print(json.dumps({\"torch\": torch.__version__, \"cuda\": torch.version.cuda, \"gpu\": torch.cuda.is_available()}))'"
step torch 100 ${TORCH_PY:-$PY} bench/torch_reference.py --sites 4 --rounds 2 --patterns $TORCH_PATTERNS $TORCH_SIZE $TORCH_EXTRA
# Kernels launched one by one while traced, so each carries its HLO op (XLA's default,
# stated in case it changes; the timed rounds before the trace are unaffected).
step profile 150 $PY bench/profile_round.py $SIZE --rounds $ROUNDS --profile_rounds 2 --top 15 \
  --save_fixture "$OUT/profile_gpu" --xla_flags=--xla_enable_command_buffers_during_profiling=false
step sites32 130 $COMPILE --sites $K32 --impls auto --timeout $(( 125 * LIMIT_SCALE ))
step seeds8 130 $COMPILE --sites $K_SEEDS --seeds $SEEDS --impls auto --timeout $(( 125 * LIMIT_SCALE ))
step pallas 100 $COMPILE --sites $K4 --impls pallas --timeout $(( 95 * LIMIT_SCALE ))
step autotune0 80 $COMPILE --sites $K4 --impls auto --xla_preset autotune0 --timeout $(( 75 * LIMIT_SCALE ))
step cmdbuf 90 $COMPILE --sites $K4 --impls auto --xla_preset cmdbuf_loops --timeout $(( 85 * LIMIT_SCALE ))
FULL="--config.image_size=384 --config.model.base=16 --config.rounds=300 --config.local_steps=50 --config.lcfed.hc_rounds=300 --config.lcfed.head_iters=10"
[ "$SMOKE" = 1 ] && FULL="--config.image_size=16 --config.model.base=4 --config.model.depth=2 --config.rounds=2 --config.local_steps=2 --config.lcfed.hc_rounds=1 --config.lcfed.head_iters=1"
step full 420 $PY launch.py --config configs/synthetic.py:lcfed --workdir /tmp/full_run $FULL \
  --config.eval_every=50 --config.checkpoint_every=100 --config.eval.selection=test \
  --config.data.train_sizes="(60,)" --config.data.test_size=100 --config.log.tensorboard=False
wait

for name in $STEPS; do collect "$name"; done   # the steps run in parallel (SMOKE)
$PY bench/summarize.py "$OUT/bench.jsonl"
echo "== done at $(( $(date +%s) - T0 ))s"
