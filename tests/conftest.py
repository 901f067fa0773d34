"""Shared test setup: repo on sys.path, one persistent XLA cache, tiny shared configs."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
  if p not in sys.path:
    sys.path.insert(0, p)

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.setdefault("LCFED_JAX_CACHE", str(Path.home() / ".cache" / "lcfed_jax" / "xla-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# The synthetic task at test size: 4 sites, 32 px, base width 4, batch 2.
TINY = {"image_size": 32, "model.base": 4, "batch_size": 2, "local_steps": 4, "rounds": 2,
        "eval_every": 1, "checkpoint_every": 1, "lcfed.head_iters": 1, "lcfed.hc_rounds": 1,
        "ft.rounds": 1, "data.train_sizes": (10, 7, 5, 8), "data.test_size": 4, "eval.batch_size": 2}


def tiny_flags(method: str = "fedavg", **overrides):
  """launch.py's arguments for `tiny_config(method, **overrides)`."""
  return [f"--config={ROOT / 'configs' / 'synthetic.py'}:{method}"] + [
      f"--config.{k}={v}" for k, v in dict(TINY, **overrides).items()]


def tiny_config(method: str = "fedavg", **overrides):
  """The synthetic task at test size (`TINY`), with `overrides` ({'a.b': value})."""
  from configs.synthetic import get_config
  c = get_config(method)
  overrides = dict(TINY, **overrides)
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = v
  return c


@pytest.fixture(scope="session")
def tiny():
  return tiny_config
