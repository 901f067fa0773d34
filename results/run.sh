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
# PROTOCOL=gpu: the paper's schedule at 256 px, base 16, 300 rounds of 50 local steps
# (+300 HC, +50 FT and FedBABU fine-tuning rounds), seeds 0,1,2 in one program
# (results/protocol.sh holds both; on a device session use results/gpu_run.sh instead).
# STUDY=methods (default): the paper's rows (METHODS adds the other baselines).
# STUDY=ablation: LC-Fed with {one common initial model, each site's own draw} x {PCS
# trained with the body, in the head steps}, and with a shared PCS; its default row is the
# methods study's LC-Fed run (linked, not run again when it exists).
# The sweep runs in workdirs/<task>_sweep (checkpoints stay there); a rerun skips the
# methods that finished and resumes an interrupted one. METHODS, SEEDS, SWEEP_DIR and
# RESULTS_DIR override the defaults (PYTHON the interpreter), PACK trains from a data pack
# (python -m lcfed_jax.data.pack) instead of the raw data; extra arguments go to launch.py
# after the protocol's.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: bash results/run.sh polyp|faz}
export LCFED_DATA_DIR=${LCFED_DATA_DIR:-$(cd .. && pwd)/shared/data}
source results/protocol.sh
sweep=${SWEEP_DIR:-workdirs/${task}_sweep}
out=${RESULTS_DIR:-results}/$task
methods=${METHODS:-local,fedavg,ft,fedbn,fedrep,prrfl,lcfed}
rerun="${PROTOCOL:+PROTOCOL=$PROTOCOL }bash results/run.sh $task"
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
note="$protocol_note Rerun: $rerun."
# Runs collected earlier (committed under $out/runs, e.g. by another session whose
# workdirs are gone) count as finished: their small files are put back into the sweep.
put_back() {  # put_back COMMITTED_METHOD_DIR SWEEP_METHOD_DIR
  for done in "$1"/seed*; do
    [ -f "$done/results.json" ] || continue
    dest="$2/$(basename "$done")"
    if [ ! -f "$dest/results.json" ]; then
      mkdir -p "$dest" && cp "$done"/*.json* "$dest"/
      # seeds trained in one program read their timing from the program's folder
      [ -f "$2/timing.json" ] || cp "$done/timing.json" "$2/"
    fi
  done
}
for done in "$out"/runs/*/; do put_back "${done%/}" "$sweep/$(basename "$done")"; done
# The ablation's default row from the methods study's committed LC-Fed run, when its
# workdir is gone.
if [ "${STUDY:-methods}" = ablation ] && [ ! -e "$sweep/lcfed" ]; then
  put_back "$(dirname "$out")/runs/lcfed" "$sweep/lcfed"
fi
"${PYTHON:-python}" launch.py --config "configs/${task}.py" --mode sweep --workdir "$sweep" --methods "$methods" \
  --seeds "${SEEDS:-$protocol_seeds}" --note "$note" "${protocol_args[@]}" ${PACK:+"--config.data.pack=$PACK"} "${@:2}"
mkdir -p "$out"
cp "$sweep"/results.md "$sweep"/results.csv "$sweep"/iou_curves.png "$out"/
# Drawn from the best and the worst run's own overlays, which runs put back from an
# earlier session do not have: then the figure collected then stays.
if [ -f "$sweep"/overlays_best_worst.png ]; then cp "$sweep"/overlays_best_worst.png "$out"/; fi
for run in "$sweep"/*/seed*; do
  dest="$out/runs/$(basename "$(dirname "$run")")/$(basename "$run")"
  mkdir -p "$dest"
  for f in config.json metrics.jsonl results.json timing.json; do
    # Seeds trained in one program share the method folder's config.json and timing.json.
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dest"/; else cp "$(dirname "$run")/$f" "$dest"/; fi
  done
done
echo "collected into $out"
