"""Defaults shared by every task config (`configs/<task>.py` starts from `base_config`).

Top-level keys are the stable interface; everything else is nested by topic.
"""
from __future__ import annotations

import os

import ml_collections

TASKS = ("synthetic", "polyp", "fundus", "prostate", "faz")

# Real-data keys (lcfed_jax.data.real reads them); None means "derived" (see that module).
REAL_DATA_DEFAULTS = {
    "root": None,                    # raw folder of the task; None: derived from data_dir
    "tfds_dir": None,                # None: $LCFED_TFDS_DIR or ~/.cache/lcfed_jax/tfds
    "layout": "auto",                # polyp: pranet | per_site; prostate: nifti | slices
    "polyp_site2": "etis",           # 'etis' (correct) | 'colondb_as_released' (leaky, as code)
    "prostate_mask": "auto",         # 'auto' | 'foreground_255' | 'inverted' (slice PNGs only)
    "prostate_norm": "range",        # 'range' (x-vmin)/(vmax-vmin) | 'vmax_as_released'
    "foreground_slices_only": True,  # prostate: keep only slices with foreground
}


def base_config(task: str, method: str = "lcfed") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.rounds = 300                 # federated rounds (stage A / the method's main stage)
  c.local_steps = 50             # local iterations per round (300 draws / batch 6)
  c.batch_size = 6
  c.image_size = 384
  c.learning_rate = 1e-3         # Adam, constant
  c.eval_every = 10
  c.checkpoint_every = 10
  c.data_dir = os.environ.get("LCFED_DATA_DIR", "")

  c.data = ml_collections.ConfigDict()
  c.data.task = task
  c.data.num_sites = 0           # synthetic: number of sites; real tasks: 0 = all

  c.model = ml_collections.ConfigDict()
  c.model.base = 16              # U-Net base width
  c.model.norm = "in"            # 'in' | 'bn' | 'gn'
  c.model.conv_impl = "auto"     # 'auto' | 'unroll' | 'im2col' | 'grouped' (lcfed_jax.conv)
  c.model.scan_unroll = 0        # local steps per scan iteration; 0: by backend (engine._scan_unroll)
  c.model.dtype = "auto"         # 'auto' (fp32 on CPU, bf16 compute on GPU/TPU) | 'float32' | 'bfloat16'

  c.adam = ml_collections.ConfigDict()   # PyTorch's Adam defaults
  c.adam.b1 = 0.9
  c.adam.b2 = 0.999
  c.adam.eps = 1e-8

  c.federated = ml_collections.ConfigDict()
  c.federated.weighting = "uniform"   # 'uniform' (official, 1/K) | 'size' (train-set size)
  c.federated.opt_state = "keep"      # Adam moments at the server step: 'keep' | 'mean' | 'reset'
  c.federated.same_init = False       # official: independent init per site
  c.federated.fixed_stream = False    # True: the released sampler's identical draws every round
  c.federated.frozen_adam = "skip"    # 'skip' (PyTorch >= 2.0) | 'zero_grad' (PyTorch < 2.0)

  c.lcfed = ml_collections.ConfigDict()
  c.lcfed.alpha = 0.1            # contrastive weight; 0 = the released default
  c.lcfed.head_iters = 10        # head-only steps at the start of every local round
  c.lcfed.pcs = True
  c.lcfed.pcs_n = 1              # PCS after the last pcs_n encoder blocks
  c.lcfed.pcs_pool = "avg+max"   # 'avg+max' (code) | 'avg' (figure)
  c.lcfed.pcs_shared = False     # True: PCS averaged (authors' earlier/later code)
  c.lcfed.hc = True
  c.lcfed.hc_rounds = 300        # stage B rounds
  c.lcfed.hc_joint = False       # train HC alongside stage A instead of a stage B
  c.lcfed.hc_learning_rate = 1e-3
  c.lcfed.hc_official_no_eps = False   # True: the released 0/0 = NaN normalisation

  c.ft = ml_collections.ConfigDict()
  c.ft.rounds = 50               # local fine-tuning rounds after FedAvg
  c.ft.learning_rate = 1e-4

  c.prrfl = ml_collections.ConfigDict()
  c.prrfl.l0 = 0.7               # L(r) = min(l0 + slope * r / period, cap)
  c.prrfl.slope = 0.25
  c.prrfl.period = 200.0
  c.prrfl.cap = 0.95
  c.prrfl.official_divisor = False   # True: divide the amplitude sum by 4 (released bug)

  if task != "synthetic":
    for key, value in REAL_DATA_DEFAULTS.items():
      c.data[key] = ml_collections.config_dict.placeholder(str) if value is None else value

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.empty_policy = "strict"   # lcfed_jax.metrics: 'strict' | 'strict_nan' | 'official_baseline'
  c.eval.sort_slices = True        # prostate volumes: stack slices in index order (False: as released)
  c.eval.lcc_official = False      # True: an empty prediction becomes a full mask (released helper)
  c.eval.selection = "val"         # lcfed_jax.selection: 'val' (carved from train) | 'test' (paper) | 'last'
  c.eval.val_fraction = 0.1        # 'val': share of each site's training examples (volumes), at least 1
  c.eval.checkpoint = "best"       # --mode eval restores 'best' (the selected model) | 'latest'
  c.eval.plots = True              # iou_curves.png and results_overlays.png in the workdir
  c.eval.overlay_examples = 2      # test examples per site in the overlay figure

  c.mesh = ml_collections.ConfigDict()   # lcfed_jax.sharding: the site axis over devices
  c.mesh.num_devices = 0           # devices on the mesh axis 'sites' (0: all, on every host)
  c.mesh.multihost = False         # jax.distributed.initialize() first (launch.py --multihost)
  c.mesh.coordinator_address = ""  # multihost: host:port of process 0 ("": $JAX_COORDINATOR_ADDRESS or auto)
  c.mesh.num_processes = 0         # multihost: process count (0: $JAX_NUM_PROCESSES or auto)
  c.mesh.process_id = -1           # multihost: this process (-1: $JAX_PROCESS_ID or auto)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2            # newest checkpoints kept, besides those holding a selected round
  return c
