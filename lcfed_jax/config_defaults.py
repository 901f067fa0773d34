"""Defaults shared by every task config (`configs/<task>.py` starts from `base_config`).

Top-level keys are the stable interface; everything else is nested by topic.
"""
from __future__ import annotations

import os

import ml_collections

TASKS = ("synthetic", "polyp", "fundus", "prostate", "faz")


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
  c.model.dtype = "auto"         # 'auto' (fp32 on CPU, bf16 compute on GPU/TPU) | 'float32' | 'bfloat16'

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

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  return c
