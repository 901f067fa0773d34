"""What `launch.py` calls: set up JAX, run the mode, turn user errors into exit code 2."""
from __future__ import annotations

import os
import sys

import jax

from lcfed_jax.errors import UserError


def setup_jax() -> None:
  """A persistent compilation cache: a repeated run skips most of its compile time."""
  cache = os.environ.get("LCFED_JAX_CACHE", os.path.expanduser("~/.cache/lcfed_jax/xla"))
  if cache and cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(config, workdir: str, mode: str = "train") -> int:
  from lcfed_jax import sharding
  try:
    # Multi-host: jax.distributed.initialize() before anything else touches JAX.
    sharding.initialize_distributed(config)
    setup_jax()
    from lcfed_jax import train
    if mode == "train":
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return 0
