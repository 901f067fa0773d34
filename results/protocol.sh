# The launch.py flags of each protocol, sourced by results/run.sh and results/gpu_run.sh:
# sets protocol_args (an array), protocol_seeds and protocol_note from PROTOCOL.
#
#   reduced  the CPU protocol of the committed results: 96 px, U-Net base 8, 60 rounds of 10
#            local steps (+60 HC rounds for LC-Fed, +10 fine-tuning rounds for FT), evaluation
#            every 5 rounds (FedBABU: +10 head fine-tuning rounds), seeds 0,1,2 in one program
#   gpu      the paper's schedule at 256 px: base 16, batch 6, 300 rounds of 50 local steps
#            (+300 HC rounds for LC-Fed, +50 fine-tuning rounds for FT and FedBABU: the configs'
#            own values, which the reduced protocol scales by its 60/300 rounds), evaluation
#            every 10 rounds, seeds 0,1,2 in one program
#   smoke    toy sizes for a CPU check of the scripts (tests/test_gpu_run.py)
#
# Every protocol selects on the validation split carved from each site's training data
# (eval.selection=val, eval.val_fraction=0.1).
case "${PROTOCOL:-reduced}" in
  reduced)
    protocol_note="Reduced CPU protocol (not the paper's: 96 px, base 8, 60 rounds of 10 local steps)."
    protocol_seeds=0,1,2
    protocol_args=(--config.image_size=96 --config.model.base=8 --config.local_steps=10
      --config.lcfed.head_iters=2 --config.fedrep.head_iters=2 --config.rounds=60
      --config.lcfed.hc_rounds=60 --config.ft.rounds=10 --config.fedbabu.ft_rounds=10 --config.eval_every=5
      --config.eval.selection=val --config.checkpoint_every=20);;
  gpu)
    protocol_note="GPU protocol (the paper's schedule at 256 px: base 16, 300 rounds of 50 local steps, 3 seeds)."
    protocol_seeds=0,1,2
    protocol_args=(--config.image_size=256 --config.model.base=16 --config.model.depth=5
      --config.batch_size=6 --config.local_steps=50 --config.lcfed.head_iters=10
      --config.fedrep.head_iters=10 --config.rounds=300 --config.lcfed.hc_rounds=300
      --config.ft.rounds=50 --config.fedbabu.ft_rounds=50 --config.eval_every=10
      --config.eval.selection=val --config.checkpoint_every=50);;
  smoke)
    protocol_note="Smoke protocol (toy sizes)."
    protocol_seeds=0,1
    protocol_args=(--config.image_size=32 --config.model.base=4 --config.model.depth=3
      --config.batch_size=2 --config.local_steps=2 --config.lcfed.head_iters=1
      --config.fedrep.head_iters=1 --config.rounds=2 --config.lcfed.hc_rounds=1
      --config.ft.rounds=1 --config.fedbabu.ft_rounds=1 --config.eval_every=1
      --config.eval.batch_size=2 --config.eval.selection=val --config.checkpoint_every=1);;
  *)
    echo "error: PROTOCOL=${PROTOCOL}: expected reduced, gpu or smoke" >&2
    exit 2;;
esac
