"""One validator for every config key, run before anything is loaded or compiled.

Every key must be one `base_config` defines, with a value of its default's type; named
choices must be spelled right; numbers must be in range; and a few keys are checked
against each other. The first problem is a `ConfigError` that names the key, the value
and what was expected.
"""
from __future__ import annotations

from typing import Dict

from lcfed_jax.config.defaults import TASKS, base_config
from lcfed_jax.util.errors import ConfigError

CHOICES = {
    "model.norm": ("in", "bn", "gn"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "optimizer.name": ("adam", "sgd", "adamw"),
    "federated.weighting": ("uniform", "size"),
    "federated.opt_state": ("keep", "mean", "reset"),
    "federated.frozen_adam": ("skip", "zero_grad"),
    "lcfed.pcs_pool": ("avg+max", "avg"),
    "lcfed.pcs_train": ("body", "head", "all"),
    "lcfed.hc_start": ("selected", "last"),
    "eval.empty_policy": ("strict", "strict_nan", "official_baseline"),
    "eval.selection": ("val", "test", "last"),
    "eval.checkpoint": ("best", "latest"),
    "data.polyp_site2": ("etis", "colondb_as_released"),
    "data.prostate_mask": ("auto", "foreground_255", "inverted"),
    "data.prostate_norm": ("range", "vmax_as_released"),
    "data.layout": ("auto", "pranet", "per_site", "nifti", "slices", "fundus", "faz"),
    "sweep.seeds": ("together", "sequential"),
}
POSITIVE_INT = ("rounds", "local_steps", "batch_size", "image_size", "eval_every", "checkpoint_every",
                "model.base", "model.scan_unroll", "eval.batch_size", "checkpoint.keep")
NONNEG_INT = ("lcfed.hc_rounds", "ft.rounds", "fedbabu.ft_rounds", "lcfed.head_iters", "fedrep.head_iters",
              "eval.overlay_examples", "mesh.num_devices", "mesh.num_processes")
POSITIVE = ("learning_rate", "ft.learning_rate", "lcfed.hc_learning_rate", "fedbabu.ft_learning_rate",
            "optimizer.eps", "prrfl.period")
NONNEG = ("lcfed.alpha", "fedprox.mu", "ditto.lam", "optimizer.momentum", "optimizer.weight_decay")
FRACTION = ("optimizer.b1", "optimizer.b2", "prrfl.l0", "prrfl.cap", "prrfl.slope")


def flatten(config) -> Dict[str, object]:
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      out[key] = value
  return out


def _fail(key: str, value, expected: str):
  raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def _check_type(key: str, value, default) -> None:
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, (tuple, list)):
    ok = isinstance(value, (tuple, list))
  else:
    ok = isinstance(value, type(default))
  if not ok:
    _fail(key, value, f"a value of type {type(default).__name__} (like its default {default!r})")


def validate(config) -> None:
  from lcfed_jax.fed.methods import METHODS
  from lcfed_jax.models.conv import IMPLEMENTATIONS
  task = config.data.task
  if task not in TASKS:
    _fail("data.task", task, f"one of {list(TASKS)}")
  if config.method not in METHODS:
    _fail("method", config.method, f"one of {sorted(METHODS)}")
  values, defaults = flatten(config), flatten(base_config(task, config.method))
  for key in values:
    if key not in defaults:
      raise ConfigError(f"config.{key}: no such setting (check the spelling; settings of this "
                        f"section: {sorted(k for k in defaults if k.rsplit('.', 1)[0] == key.rsplit('.', 1)[0])[:12]})")
  for key, default in defaults.items():
    if key not in values:
      raise ConfigError(f"config.{key} is missing (default {default!r})")
    _check_type(key, values[key], default)
  choices = dict(CHOICES, **{"model.conv_impl": ("auto",) + IMPLEMENTATIONS})
  for key, allowed in choices.items():
    if key in values and values[key] not in allowed:
      _fail(key, values[key], f"one of {list(allowed)}")
  for key in POSITIVE_INT:
    if values[key] <= 0:
      _fail(key, values[key], "a positive integer")
  for key in NONNEG_INT:
    if values[key] < 0:
      _fail(key, values[key], "an integer >= 0")
  for key in POSITIVE:
    if not values[key] > 0:
      _fail(key, values[key], "a positive number")
  for key in NONNEG:
    if not values[key] >= 0:
      _fail(key, values[key], "a number >= 0")
  for key in FRACTION:
    if not 0 <= values[key] <= 1:
      _fail(key, values[key], "a number in [0, 1]")
  _check_relations(config, values)


def _check_relations(config, v) -> None:
  if not 2 <= v["model.depth"] <= 7:
    _fail("model.depth", v["model.depth"], "an integer in 2..7 (5: the paper's U-Net)")
  pools = v["model.depth"] - 1
  if v["image_size"] % 2 ** pools:
    _fail("image_size", v["image_size"], f"a multiple of {2 ** pools} (the U-Net of model.depth="
          f"{v['model.depth']} pools {pools} times)")
  for method, key in (("lcfed", "lcfed.head_iters"), ("fedrep", "fedrep.head_iters")):
    if config.method == method and not v[key] < v["local_steps"]:
      _fail(key, v[key], f"an integer in [0, local_steps={v['local_steps']})")
  if not 1 <= config.lcfed.pcs_n <= v["model.depth"]:
    _fail("lcfed.pcs_n", config.lcfed.pcs_n, f"1..model.depth={v['model.depth']}")
  if not 0.0 < v["eval.val_fraction"] < 1.0:
    _fail("eval.val_fraction", v["eval.val_fraction"], "a fraction in (0, 1)")
  seeds = tuple(config.seeds)
  if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds) or len(set(seeds)) != len(seeds):
    _fail("seeds", seeds, "distinct integers >= 0 (or () for the one seed of config.seed)")
  if v["mesh.process_id"] < -1:
    _fail("mesh.process_id", v["mesh.process_id"], "an integer >= -1 (-1: environment / auto-detect)")
  if config.data.task == "synthetic":
    if not 1 <= config.data.num_sites <= 6:
      _fail("data.num_sites", config.data.num_sites, "an integer in 1..6 for the synthetic task")
    if config.data.test_size <= 0:
      _fail("data.test_size", config.data.test_size, "a positive integer")
    if not config.data.train_sizes or not all(isinstance(n, int) and n > 0 for n in config.data.train_sizes):
      _fail("data.train_sizes", config.data.train_sizes, "positive integers")
  elif not config.data_dir and not config.data.root and not config.data.pack:
    raise ConfigError(f"config.data_dir is empty: set it (or the LCFED_DATA_DIR environment variable) "
                      f"to the directory that holds the {config.data.task} data, or "
                      f"config.data.pack to a data pack built with python -m lcfed_jax.data.pack")
