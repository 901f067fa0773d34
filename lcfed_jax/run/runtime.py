"""Process-wide JAX settings every entry point (launch.py, the notebooks) applies first."""
from __future__ import annotations

import os

import jax


def setup_jax() -> None:
  """A persistent compilation cache ($LCFED_JAX_CACHE, default ~/.cache/lcfed_jax/xla;
  'off' disables it): a repeated run loads its compiled programs instead of compiling."""
  cache = os.environ.get("LCFED_JAX_CACHE", os.path.expanduser("~/.cache/lcfed_jax/xla"))
  if cache and cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
