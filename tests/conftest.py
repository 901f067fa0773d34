"""Shared test setup: repo on sys.path, one persistent XLA cache, the tiny config."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
  if p not in sys.path:
    sys.path.insert(0, p)

# Tests compile many tiny programs whose run time is negligible: skip XLA:CPU's expensive
# code-generation passes (about a third of the compile time), and emit fusions the older
# way where this jaxlib has the switch (LC-Fed's tiny round compiles in ~0.6x the time).
# Child processes inherit the flags; `xla_flags(...)` adds to them.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
OPTIONAL_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false",)


def _xla_knows(flag: str) -> bool:
  """XLA aborts on a flag it does not know: ask a child process once."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                         env=dict(os.environ, XLA_FLAGS=flag), capture_output=True, timeout=120)
  return probe.returncode == 0


def xla_flags(*extra: str) -> str:
  return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *extra]))


if FAST_COMPILE[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = xla_flags(*FAST_COMPILE, *filter(_xla_knows, OPTIONAL_FAST_COMPILE))

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.setdefault("LCFED_JAX_CACHE", str(Path.home() / ".cache" / "lcfed_jax" / "xla-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def tiny_flags(method: str = "fedavg", **overrides):
  """launch.py's arguments for `tiny_config(method, **overrides)`."""
  return [f"--config={ROOT / 'configs' / 'synthetic.py'}:{method},tiny"] + [
      f"--config.{k}={v}" for k, v in overrides.items()]


def tiny_config(method: str = "fedavg", **overrides):
  """`configs/synthetic.py:<method>,tiny` with `overrides` ({'a.b': value})."""
  from configs.synthetic import get_config
  from lcfed_jax.config.defaults import set_dotted
  c = get_config(f"{method},tiny")
  for k, v in overrides.items():
    set_dotted(c, k, v)
  return c


@pytest.fixture(scope="session")
def tiny():
  return tiny_config


@pytest.fixture(scope="session")
def lcfed_flower(tmp_path_factory):
  """LC-Fed's stages A and B through the Flower apps (`flower_helpers.lcfed_run`), run once
  for test_deploy.py and test_deploy_equality.py."""
  pytest.importorskip("flwr")
  import flower_helpers
  return flower_helpers.lcfed_run(tmp_path_factory.mktemp("lcfed_flower"))


# The longest test files first: xdist hands out whole files (--dist loadfile) in collection
# order (--no-loadscope-reorder), so the 2 workers finish together instead of one running
# the multi-device file alone at the end (cold-cache seconds per file, 2-core CPU).
_LONGEST_FIRST = ("test_data_pack.py", "test_sharding.py", "test_deploy.py", "test_deploy_equality.py", "test_methods_new.py",
                  "test_methods.py", "test_seeds.py", "test_conv.py",
                  "test_engine.py", "test_deploy_parts.py", "test_checkpoints.py", "test_errors.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
