"""Defaults shared by every task config: `configs/<task>.py` starts from `base_config`.

Top-level keys are the stable interface; everything else is nested by topic, and every
method reads its own subtree (`config.fedrep`, `config.lcfed`, `config.ditto`, ...).

A config file's argument (after the ':' of `--config configs/<task>.py:<arg>`) is parsed
by `parse_arg` as in big_vision: comma-separated items, `key=value` or a bare word,
e.g. `fedavg`, `fedavg,tiny`, `method=fedavg,tiny=True`. `tiny` shrinks the task to the
size the tests and the notebooks' CI run use (`TINY`).
"""
from __future__ import annotations

import copy
import os
from typing import Dict

import ml_collections

from lcfed_jax.util.errors import ConfigError

TASKS = ("synthetic", "polyp", "fundus", "prostate", "faz")

# The test-suite / notebook-CI size: seconds per run on a CPU once compiled.
TINY: Dict[str, object] = {
    "image_size": 32, "model.base": 4, "model.depth": 3, "batch_size": 2, "local_steps": 4, "rounds": 2,
    "eval_every": 1, "checkpoint_every": 1, "lcfed.head_iters": 1, "fedrep.head_iters": 1,
    "lcfed.hc_rounds": 1, "ft.rounds": 1, "fedbabu.ft_rounds": 1, "eval.batch_size": 2,
    "data.train_sizes": (10, 7, 5, 8), "data.test_size": 4,   # synthetic only
}


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """'fedavg,tiny' or 'method=fedavg,tiny=True' -> ConfigDict(method='fedavg', tiny=True).

  A bare word is the method if `defaults` has 'method' and the word is not another key;
  a bare key is True. Values are converted to the type of their default."""
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      if key in defaults and isinstance(defaults[key], bool):
        out[key] = True
      elif "method" in defaults:
        out["method"] = key
      else:
        raise ConfigError(f"config argument {item!r}: expected key=value, one of {sorted(defaults)}")
      continue
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: expected one of {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r}: expected True or False")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = kind(value)
  return out


# Settings added after runs were saved, each with the value that reproduces those runs:
# an older config.json or checkpoint reads as if it held them (resume, --mode eval).
ADDED_SETTINGS: Dict[str, object] = {"model.depth": 5, "lcfed.pcs_train": "head", "lcfed.hc_start": "last",
                                     "data.pack": ""}


def with_added_settings(saved: Dict) -> Dict:
  """A saved config (a dict) with every setting in ADDED_SETTINGS it lacks."""
  out = copy.deepcopy(saved)
  for key, value in ADDED_SETTINGS.items():
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node.setdefault(leaf, value)
  return out


def set_dotted(config, key: str, value) -> None:
  node = config
  parts = key.split(".")
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value


def apply_tiny(config) -> ml_collections.ConfigDict:
  """The task at `TINY` size (data keys only where the task has them)."""
  for key, value in TINY.items():
    if key.startswith("data.") and key.split(".")[1] not in config.data:
      continue
    set_dotted(config, key, value)
  return config


def base_config(task: str, method: str = "lcfed") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.rounds = 300                 # federated rounds (stage A / the method's main stage)
  c.local_steps = 50             # local iterations per round (300 draws / batch 6)
  c.batch_size = 6
  c.image_size = 384
  c.learning_rate = 1e-3         # constant
  c.eval_every = 10
  c.checkpoint_every = 10
  c.data_dir = os.environ.get("LCFED_DATA_DIR", "")
  c.resume = True                # False: move an earlier run in the workdir aside, start over
  c.seeds = ()                   # several seeds: independent federations trained in one program
                                 # (a replica axis), each exactly the run of `seed` = that seed

  c.data = ml_collections.ConfigDict()
  c.data.task = task
  c.data.num_sites = 0           # synthetic: number of sites; real tasks: 0 = all
  c.data.pack = ""               # a data pack folder (python -m lcfed_jax.data.pack): the sites come
                                 # from it alone, no raw data or TFDS; its task, image size and data
                                 # settings must be the config's. "": the raw data / generator
  if task == "synthetic":
    c.data.num_sites = 4
    c.data.train_sizes = (120, 80, 60, 100)   # per site (repeated when there are more sites)
    c.data.test_size = 40
    c.data.seed = 0                # the generated data (fixed across training seeds)
  else:
    c.data.root = ""               # the task's raw folder; "": {data_dir}/{task}
    c.data.tfds_dir = ""           # prepared data; "": $LCFED_TFDS_DIR or ~/.cache/lcfed_jax/tfds
    c.data.layout = "auto"         # polyp: pranet | per_site; prostate: nifti | slices
    c.data.polyp_site2 = "etis"    # 'etis' (correct) | 'colondb_as_released' (the official leak)
    c.data.prostate_mask = "auto"  # 'auto' | 'foreground_255' | 'inverted' (slice PNGs only)
    c.data.prostate_norm = "range" # 'range' (x-vmin)/(vmax-vmin) | 'vmax_as_released'
    c.data.foreground_slices_only = True   # prostate: keep only slices with foreground

  c.model = ml_collections.ConfigDict()
  c.model.base = 16              # U-Net base width
  c.model.depth = 5              # U-Net levels (5: the paper's; fewer for quick tests)
  c.model.norm = "in"            # 'in' | 'bn' | 'gn'
  c.model.conv_impl = "auto"     # 'auto' (fastest measured per backend) or lcfed_jax.models.conv.IMPLEMENTATIONS
  c.model.scan_unroll = 1        # local steps per iteration of the local-step loop (1: rolled)
  c.model.dtype = "auto"         # 'auto' (fp32 on CPU, bf16 compute on GPU/TPU) | 'float32' | 'bfloat16'

  c.optimizer = ml_collections.ConfigDict()   # lcfed_jax.fed.optim; PyTorch's Adam defaults
  c.optimizer.name = "adam"      # 'adam' | 'sgd' | 'adamw'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9     # sgd
  c.optimizer.nesterov = False   # sgd
  c.optimizer.weight_decay = 1e-4   # adamw

  c.federated = ml_collections.ConfigDict()
  c.federated.weighting = "uniform"   # 'uniform' (official, 1/K) | 'size' (train-set size)
  c.federated.opt_state = "keep"      # optimizer state at the server step: 'keep' | 'mean' | 'reset'
  c.federated.same_init = True        # one initial model for every site (the server's
                                      # broadcast); False: each site its own draw (official script)
  c.federated.fixed_stream = False    # True: the released sampler's identical draws every round
  c.federated.frozen_adam = "skip"    # 'skip' (PyTorch >= 2.0) | 'zero_grad' (PyTorch < 2.0)

  c.lcfed = ml_collections.ConfigDict()
  c.lcfed.alpha = 0.1            # contrastive weight; 0 = the released default
  c.lcfed.head_iters = 10        # head-only steps at the start of every local round
  c.lcfed.pcs = True
  c.lcfed.pcs_n = 1              # PCS after the last pcs_n encoder blocks
  c.lcfed.pcs_pool = "avg+max"   # 'avg+max' (code) | 'avg' (figure)
  c.lcfed.pcs_shared = False     # True: PCS averaged (the authors' earlier/later code)
  c.lcfed.pcs_train = "body"     # personal PCS trains in the 'body' steps | the 'head' steps | 'all'
  c.lcfed.hc_start = "selected"  # stage B from each site's 'selected' stage-A model (train_hc.py) | the 'last' round
  c.lcfed.hc = True
  c.lcfed.hc_rounds = 300        # stage B rounds
  c.lcfed.hc_joint = False       # train HC alongside stage A instead of a stage B
  c.lcfed.hc_learning_rate = 1e-3
  c.lcfed.hc_official_no_eps = False   # True: the released 0/0 = NaN normalisation

  c.fedrep = ml_collections.ConfigDict()
  c.fedrep.head_iters = 10       # head-only steps, then body-only (LC-Fed stage A without PCS/HC)

  c.ft = ml_collections.ConfigDict()
  c.ft.rounds = 50               # local fine-tuning rounds after FedAvg
  c.ft.learning_rate = 1e-4

  c.prrfl = ml_collections.ConfigDict()
  c.prrfl.l0 = 0.7               # L(r) = min(l0 + slope * r / period, cap)
  c.prrfl.slope = 0.25
  c.prrfl.period = 200.0
  c.prrfl.cap = 0.95
  c.prrfl.official_divisor = False   # True: divide the amplitude sum by 4 (released bug)

  c.fedprox = ml_collections.ConfigDict()
  c.fedprox.mu = 0.01            # proximal weight (the FedProx paper tunes 0.001..1)

  c.ditto = ml_collections.ConfigDict()
  c.ditto.lam = 0.1              # pull of the personal model to the global one (paper: 0.05..2)

  c.fedbabu = ml_collections.ConfigDict()
  c.fedbabu.ft_rounds = 50       # local head fine-tuning rounds after the federated body
  c.fedbabu.ft_learning_rate = 1e-3

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.empty_policy = "strict"   # lcfed_jax.eval.metrics: 'strict' | 'strict_nan' | 'official_baseline'
  c.eval.sort_slices = True        # prostate volumes: stack slices in index order (False: as released)
  c.eval.lcc_official = False      # True: an empty prediction becomes a full mask (released helper)
  c.eval.selection = "val"         # 'val' (carved from train) | 'test' (paper) | 'last'
  c.eval.val_fraction = 0.1        # 'val': share of each site's training examples (volumes), at least 1
  c.eval.val_seed = 0              # which examples are carved (fixed across training seeds)
  c.eval.checkpoint = "best"       # --mode eval restores 'best' (the selected model) | 'latest'
  c.eval.out_dir = ""              # --mode eval writes here ("": the workdir; printed only if read-only)
  c.eval.plots = True              # iou_curves.png and results_overlays.png in the workdir
  c.eval.overlay_examples = 2      # test examples per site in the overlay figure

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True         # event files in WORKDIR/tb (tensorboardX, no TensorFlow)

  c.mesh = ml_collections.ConfigDict()   # lcfed_jax.fed.sharding: the site axis over devices
  c.mesh.num_devices = 0           # devices on the mesh axis 'sites' (0: all, on every host)
  c.mesh.multihost = False         # jax.distributed.initialize() first (launch.py --multihost)
  c.mesh.coordinator_address = ""  # multihost: host:port of process 0 ("": $JAX_COORDINATOR_ADDRESS or auto)
  c.mesh.num_processes = 0         # multihost: process count (0: $JAX_NUM_PROCESSES or auto)
  c.mesh.process_id = -1           # multihost: this process (-1: $JAX_PROCESS_ID or auto)

  c.sweep = ml_collections.ConfigDict()   # --mode sweep
  c.sweep.seeds = "together"       # 'together' (config.seeds: one program) | 'sequential' (a run per seed)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2            # newest checkpoints kept, besides those holding a selected round
  return c
