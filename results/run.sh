#!/bin/bash
# Reruns a real-data comparison and collects its small result files into results/<task>/.
#
#   bash results/run.sh polyp     # or faz; LCFED_DATA_DIR (default ../shared/data) holds the data
#   STUDY=ablation bash results/run.sh faz   # LC-Fed's initialisation x PCS ablation
#
# PROTOCOL=reduced (default): the CPU protocol of the committed results, 96 px, U-Net base
# 8, 60 rounds of 10 local steps (+60 HC rounds for LC-Fed, +10 fine-tuning rounds for
# FT), evaluation every 5 rounds, model selection on the carved validation split, seeds
# 0, 1, 2 trained in one program per method. LC-Fed's run also reports its stage-A
# selection (the row "lcfed (stage A)"), so stage A needs no run of its own.
# STUDY=methods (default): the paper's rows (METHODS adds the other baselines).
# STUDY=ablation: LC-Fed with {one common initial model, each site's own draw} x {PCS
# trained with the body, in the head steps}, and with a shared PCS; its default row is the
# methods study's LC-Fed run (linked, not run again when it exists).
# PROTOCOL=gpu: 256 px, base 16, 100 rounds of 50 local steps (+100 HC, +17 FT).
# The sweep runs in workdirs/<task>_sweep (checkpoints stay there); a rerun skips the
# methods that finished and resumes an interrupted one. METHODS, SEEDS, SWEEP_DIR and
# RESULTS_DIR override the defaults (PYTHON the interpreter); extra arguments go to launch.py after the protocol's.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: bash results/run.sh polyp|faz}
export LCFED_DATA_DIR=${LCFED_DATA_DIR:-$(cd .. && pwd)/shared/data}
sweep=${SWEEP_DIR:-workdirs/${task}_sweep}
out=${RESULTS_DIR:-results}/$task
methods=${METHODS:-local,fedavg,ft,fedbn,fedrep,prrfl,lcfed}
rerun="bash results/run.sh $task"
if [ "${STUDY:-methods}" = ablation ]; then
  rerun="STUDY=ablation $rerun"
  methods=${METHODS:-lcfed,lcfed:lcfed.pcs_train=head,lcfed:federated.same_init=False,lcfed:federated.same_init=False:lcfed.pcs_train=head,lcfed:lcfed.pcs_shared=True}
  default_run=$sweep/lcfed
  sweep=${SWEEP_DIR:-workdirs/${task}_ablation}
  out=$out/ablation
  mkdir -p "$sweep"
  if [ -f "$default_run/seed0/results.json" ] && [ ! -e "$sweep/lcfed" ]; then
    ln -s "$(cd "$default_run" && pwd)" "$sweep/lcfed"
  fi
fi
if [ "${PROTOCOL:-reduced}" = gpu ]; then
  note="GPU protocol. Rerun: PROTOCOL=gpu $rerun."
  size=(--config.image_size=256 --config.model.base=16 --config.local_steps=50 --config.lcfed.head_iters=10
        --config.fedrep.head_iters=10 --config.rounds=100 --config.lcfed.hc_rounds=100 --config.ft.rounds=17
        --config.eval_every=10)
else
  note="Reduced CPU protocol (not the paper's: 96 px, base 8, 60 rounds of 10 local steps). Rerun: $rerun."
  size=(--config.image_size=96 --config.model.base=8 --config.local_steps=10 --config.lcfed.head_iters=2
        --config.fedrep.head_iters=2 --config.rounds=60 --config.lcfed.hc_rounds=60 --config.ft.rounds=10
        --config.eval_every=5)
fi
"${PYTHON:-python}" launch.py --config "configs/${task}.py" --mode sweep --workdir "$sweep" --methods "$methods" \
  --seeds "${SEEDS:-0,1,2}" --note "$note" "${size[@]}" --config.checkpoint_every=20 "${@:2}"
mkdir -p "$out"
cp "$sweep"/results.md "$sweep"/results.csv "$sweep"/iou_curves.png "$sweep"/overlays_best_worst.png "$out"/
for run in "$sweep"/*/seed*; do
  dest="$out/runs/$(basename "$(dirname "$run")")/$(basename "$run")"
  mkdir -p "$dest"
  for f in config.json metrics.jsonl results.json timing.json; do
    # Seeds trained in one program share the method folder's config.json and timing.json.
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dest"/; else cp "$(dirname "$run")/$f" "$dest"/; fi
  done
done
echo "collected into $out"
