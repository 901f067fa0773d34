"""Checks every config value before anything is loaded or compiled."""
from __future__ import annotations

from lcfed_jax.config_defaults import TASKS
from lcfed_jax.conv import IMPLEMENTATIONS
from lcfed_jax.errors import ConfigError
from lcfed_jax.methods import METHODS


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _require(ok: bool, key: str, value, expected: str):
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def validate(config) -> None:
  _require(config.method in METHODS, "method", config.method, f"one of {sorted(METHODS)}")
  _require(config.data.task in TASKS, "data.task", config.data.task, f"one of {list(TASKS)}")
  for key in ("rounds", "local_steps", "batch_size", "image_size", "eval_every",
              "checkpoint_every", "model.base", "eval.batch_size"):
    v = _get(config, key)
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, v, "a positive integer")
  for key in ("learning_rate", "ft.learning_rate", "lcfed.hc_learning_rate"):
    v = _get(config, key)
    _require(isinstance(v, (int, float)) and v > 0, key, v, "a positive number")
  _require(isinstance(config.seed, int), "seed", config.seed, "an integer")
  _require(config.image_size % 16 == 0, "image_size", config.image_size,
           "a multiple of 16 (the U-Net pools four times)")
  _require(config.model.norm in ("in", "bn", "gn"), "model.norm", config.model.norm, "'in', 'bn' or 'gn'")
  _require(config.model.conv_impl in ("auto",) + IMPLEMENTATIONS, "model.conv_impl",
           config.model.conv_impl, f"'auto' or one of {IMPLEMENTATIONS}")
  _require(config.model.dtype in ("auto", "float32", "bfloat16"), "model.dtype", config.model.dtype,
           "'auto', 'float32' or 'bfloat16'")
  f = config.federated
  _require(f.weighting in ("uniform", "size"), "federated.weighting", f.weighting, "'uniform' or 'size'")
  _require(f.opt_state in ("keep", "mean", "reset"), "federated.opt_state", f.opt_state,
           "'keep', 'mean' or 'reset'")
  _require(f.frozen_adam in ("skip", "zero_grad"), "federated.frozen_adam", f.frozen_adam,
           "'skip' or 'zero_grad'")
  lc = config.lcfed
  _require(isinstance(lc.alpha, (int, float)) and lc.alpha >= 0, "lcfed.alpha", lc.alpha, "a number >= 0")
  _require(isinstance(lc.head_iters, int) and lc.head_iters >= 0 and
           (lc.head_iters < config.local_steps or config.method not in ("fedrep", "lcfed")),
           "lcfed.head_iters", lc.head_iters, f"an integer in [0, local_steps={config.local_steps})")
  _require(lc.pcs_n in (1, 2, 3, 4, 5), "lcfed.pcs_n", lc.pcs_n, "1..5")
  _require(lc.pcs_pool in ("avg+max", "avg"), "lcfed.pcs_pool", lc.pcs_pool, "'avg+max' or 'avg'")
  _require(isinstance(lc.hc_rounds, int) and lc.hc_rounds >= 0, "lcfed.hc_rounds", lc.hc_rounds,
           "an integer >= 0")
  _require(isinstance(config.ft.rounds, int) and config.ft.rounds >= 0, "ft.rounds", config.ft.rounds,
           "an integer >= 0")
  p = config.prrfl
  _require(0 <= p.l0 <= 1 and 0 <= p.cap <= 1, "prrfl.l0/cap", (p.l0, p.cap), "fractions in [0, 1]")
  _require(p.period > 0, "prrfl.period", p.period, "a positive number")
  mesh = config.get("mesh", None)
  if mesh is not None:
    n = mesh.get("num_devices", 0)
    _require(isinstance(n, int) and not isinstance(n, bool) and n >= 0, "mesh.num_devices", n,
             "an integer >= 0 (0: all devices)")
    mh = mesh.get("multihost", False)
    _require(isinstance(mh, bool), "mesh.multihost", mh, "True or False")
    _require(isinstance(mesh.get("coordinator_address", ""), str), "mesh.coordinator_address",
             mesh.get("coordinator_address"), "'host:port' or '' (environment / auto-detect)")
    for key, low in (("num_processes", 0), ("process_id", -1)):
      v = mesh.get(key, low)
      _require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"mesh.{key}", v,
               f"an integer >= {low} ({low}: environment / auto-detect)")
  if config.data.task == "synthetic":
    _require(isinstance(config.data.num_sites, int) and 1 <= config.data.num_sites <= 6,
             "data.num_sites", config.data.num_sites, "an integer in 1..6 for the synthetic task")
    _require(config.data.test_size > 0, "data.test_size", config.data.test_size, "a positive integer")
    _require(all(int(n) > 0 for n in config.data.train_sizes), "data.train_sizes",
             config.data.train_sizes, "positive integers")
  elif not config.data_dir and not config.data.get("root", ""):
    raise ConfigError(f"config.data_dir is empty: set it (or the LCFED_DATA_DIR environment variable) "
                      f"to the directory that holds the {config.data.task} data")
