#!/bin/bash
# Reruns a real-data comparison and collects its small result files into results/<task>/.
#
#   bash results/run.sh polyp     # or faz; LCFED_DATA_DIR (default ../shared/data) holds the data
#
# PROTOCOL=reduced (default): the CPU protocol of the committed results, 96 px, U-Net base
# 8, 60 rounds of 10 local steps (+60 HC rounds for LC-Fed, +10 fine-tuning rounds for
# FT), evaluation every 5 rounds, model selection on the carved validation split, seed 0.
# PROTOCOL=gpu: 256 px, base 16, 100 rounds of 50 local steps (+100 HC, +17 FT).
# The sweep runs in workdirs/<task>_sweep (checkpoints stay there); a rerun skips the
# methods that finished and resumes an interrupted one. METHODS, SEEDS, SWEEP_DIR and
# RESULTS_DIR override the defaults (PYTHON the interpreter); extra arguments go to launch.py after the protocol's.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: bash results/run.sh polyp|faz}
export LCFED_DATA_DIR=${LCFED_DATA_DIR:-$(cd .. && pwd)/shared/data}
methods=${METHODS:-local,fedavg,ft,fedbn,fedrep,prrfl,lcfed,lcfed:lcfed.hc=False}
if [ "${PROTOCOL:-reduced}" = gpu ]; then
  note="GPU protocol. Rerun: PROTOCOL=gpu bash results/run.sh $task."
  size=(--config.image_size=256 --config.model.base=16 --config.local_steps=50 --config.lcfed.head_iters=10
        --config.fedrep.head_iters=10 --config.rounds=100 --config.lcfed.hc_rounds=100 --config.ft.rounds=17
        --config.eval_every=10)
else
  note="Reduced CPU protocol (not the paper's: 96 px, base 8, 60 rounds of 10 local steps). Rerun: bash results/run.sh $task."
  size=(--config.image_size=96 --config.model.base=8 --config.local_steps=10 --config.lcfed.head_iters=2
        --config.fedrep.head_iters=2 --config.rounds=60 --config.lcfed.hc_rounds=60 --config.ft.rounds=10
        --config.eval_every=5)
fi
sweep=${SWEEP_DIR:-workdirs/${task}_sweep}
"${PYTHON:-python}" launch.py --config "configs/${task}.py" --mode sweep --workdir "$sweep" --methods "$methods" \
  --seeds "${SEEDS:-0}" --note "$note" "${size[@]}" --config.checkpoint_every=20 "${@:2}"
out=${RESULTS_DIR:-results}/$task
mkdir -p "$out"
cp "$sweep"/results.md "$sweep"/results.csv "$sweep"/iou_curves.png "$sweep"/overlays_best_worst.png "$out"/
for run in "$sweep"/*/seed*; do
  dest="$out/runs/$(basename "$(dirname "$run")")/$(basename "$run")"
  mkdir -p "$dest"
  cp "$run"/config.json "$run"/metrics.jsonl "$run"/results.json "$run"/timing.json "$dest"/
done
echo "collected into $out"
