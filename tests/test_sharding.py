"""The site axis over a device mesh: 4 simulated CPU devices against 1, padding sites.

One child process (XLA_FLAGS set before it imports jax) runs everything that needs 4
devices and writes its numbers to files; this process (1 device) compares them and
restores the child's checkpoint.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from lcfed_jax import sharding, train
from lcfed_jax.errors import ConfigError

QUIET = lambda *a, **k: None
# XLA compiles a block of 2 sites and one of 6 into slightly different float code (even
# with no communication at all: 'local' differs by ~1e-6 after one step), and Adam turns
# such noise into lr-sized steps from its second update on. So every comparison here
# gives each leaf at most one or two Adam updates, with a large eps ('unroll' runs the
# same convolution per site on any layout, tests/test_engine.py).
SIX = {"data.num_sites": 6, "data.train_sizes": (10, 7, 5, 8, 6, 9), "eval.selection": "test",
       "local_steps": 1, "adam.eps": 1e-3, "model.conv_impl": "unroll"}

CHILD = """
import json, os, sys
import jax, numpy as np
jax.config.update('jax_compilation_cache_dir', os.environ['LCFED_JAX_CACHE'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
from conftest import tiny_config
from helpers import flat
from lcfed_jax import engine, sharding, train
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.synthetic import generate
from lcfed_jax.methods import get_method
assert jax.device_count() == 4, jax.devices()
out, SIX = sys.argv[1], {six!r}
quiet = lambda *a, **k: None
arrays, info = {{}}, {{}}

# 1. Whole runs (fedavg): 6 sites on 4 devices (+2 padding) and on a 1-device mesh.
for n in (4, 1):
  lines = []
  res = train.train_and_evaluate(tiny_config("fedavg", **dict(SIX, **{{"mesh.num_devices": n}})),
                                 os.path.join(out, f"run{{n}}"), log=lines.append)
  info[f"run{{n}}"] = {{"history": res["history"], "result": res["result"],
                       "mesh_line": [l for l in lines if l.startswith("mesh:")]}}
  for key, leaf in flat(res["state"]).items():
    arrays[f"run{{n}}/state/{{key}}"] = leaf
  for key, leaf in flat(res["selected"]).items():
    arrays[f"run{{n}}/selected/{{key}}"] = leaf
  leaf = res["state"].params["head"]["kernel"]
  info[f"run{{n}}"]["state_shape"] = list(leaf.shape)

# 2. The engine per layout for the methods whose server or model reads other sites:
#    lcfed (PCS codes and contrastive loss, HC heads gathered over devices in stage B and
#    in the 'hc' predictor) and prrfl (Fourier amplitudes, divisor = real sites). Every
#    stage runs one round from the same initial state; predictions of that state too.
for method in ("lcfed", "prrfl"):
  config = tiny_config(method, **dict(SIX, local_steps=2 if method == "lcfed" else 1))
  data = generate(6, 32, SIX["data.train_sizes"], 4, 0)
  m = get_method(config)
  model = engine.build_model(config, m, 6, 3, 1)
  host = jax.tree.map(np.asarray, engine.init_state(model, 0, 6, (32, 32, 3)))
  masks = engine.Masks.build(host, m)
  for n in (4, 1):
    layout = sharding.SiteLayout(sharding.make_mesh(n), 6)
    state = layout.pad_host_tree(host)
    train_arrays = stack_splits(data.train, layout.num_padding, sharding=layout.site_sharding)
    test_arrays = stack_splits(data.test, layout.num_padding, 2, sharding=layout.site_sharding)
    weights = layout.weights(np.full(6, 1 / 6, np.float32))
    for output in sorted({{s.output for s in m.stages}}):
      pred = engine.make_predict_fn(model, output, 2, 6, layout)(state.params, state.model_state,
                                                                test_arrays.images)
      arrays[f"{{method}}{{n}}/{{output}}"] = np.asarray(pred["prob"])[:6]
    for i, stage in enumerate(m.stages):
      new, loss = engine.make_round_fn(model, stage, masks, config, 6, layout)(
          layout.pad_host_tree(host), train_arrays, weights)
      arrays[f"{{method}}{{n}}/losses{{i}}"] = np.asarray(loss)[:6]
      for key, leaf in flat(layout.strip(new).params).items():
        arrays[f"{{method}}{{n}}/params{{i}}/{{key}}"] = leaf
    if n == 4:
      info[method] = {{"spec": str(state.params["head"]["kernel"].sharding.spec),
                      "total": int(state.params["head"]["kernel"].shape[0])}}

np.savez(os.path.join(out, "arrays.npz"), **arrays)
with open(os.path.join(out, "info.json"), "w") as f:
  json.dump(info, f, default=float)
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD.format(six=SIX)), str(out)],
                        env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, dict(np.load(out / "arrays.npz")), json.loads((out / "info.json").read_text())


def _close(a, b, atol, what):
  np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=what)


def _compare(arrays, a, b, atol):
  keys = sorted(k[len(a):] for k in arrays if k.startswith(a))
  assert keys and keys == sorted(k[len(b):] for k in arrays if k.startswith(b))
  for key in keys:
    _close(arrays[a + key], arrays[b + key], atol, key)


def _numbers(tree):
  """Every number of a (JSON) record, flattened, for a tolerance comparison."""
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _numbers(tree[k])]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _numbers(v)]
  if isinstance(tree, bool) or tree is None or isinstance(tree, str):
    return []
  return [float(tree)]


def _strings(tree):
  if isinstance(tree, dict):
    return {k: _strings(v) for k, v in tree.items() if _strings(v) is not None}
  if isinstance(tree, list):
    return [_strings(v) for v in tree]
  return tree if isinstance(tree, (str, bool)) or tree is None else None


def test_four_devices_equal_one(four_devices):
  """6 sites over 4 devices (2 per device, 2 padding sites) give the parameters,
  losses, metrics and selection of the same run on one device."""
  _, arrays, info = four_devices
  r4, r1 = info["run4"], info["run1"]
  assert r4["mesh_line"] == ["mesh: 4 devices on 'sites', 6 sites (+2 padding), 2 per device"]
  assert r1["mesh_line"] == ["mesh: 1 device on 'sites', 6 sites, 6 per device"]
  assert r4["state_shape"][0] == 6 == r1["state_shape"][0]         # padding stripped
  _compare(arrays, "run4/", "run1/", atol=1e-4)
  assert [r["round"] for r in r4["history"]] == [1, 2]
  assert all(len(r["loss"]) == 6 and len(r["sites"]) == 6 for r in r4["history"])
  assert _strings(r4["history"]) == _strings(r1["history"])         # sites, stages, selection
  np.testing.assert_allclose(_numbers(r4["history"]), _numbers(r1["history"]), atol=1e-3, rtol=1e-3)
  assert r4["result"]["site_rounds"] == r1["result"]["site_rounds"]
  np.testing.assert_allclose(_numbers(r4["result"]), _numbers(r1["result"]), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["lcfed", "prrfl"])
def test_padding_sites_change_nothing(four_devices, method):
  """Cross-site terms (HC's gathered heads, PCS codes, PRR-FL's amplitude mean and its
  divisor) see the 6 real sites only: 4 devices + 2 padding sites == 1 device, none."""
  _, arrays, info = four_devices
  assert info[method] == {"spec": str(jax.sharding.PartitionSpec("sites")), "total": 8}
  keys = sorted(k[len(method) + 2:] for k in arrays if k.startswith(f"{method}4/"))
  assert any(k.startswith("losses") for k in keys) and any(k.startswith("params") for k in keys)
  for key in keys:
    x, y = arrays[f"{method}4/{key}"], arrays[f"{method}1/{key}"]
    if key.startswith("losses"):      # same batches, same cross-site terms: rounding only
      _close(x, y, 1e-5, key)
    elif key == "hc":                 # peak maps threshold the heads' disagreement
      _close(x, y, 1e-2, key)
      assert np.mean(np.abs(x - y)) < 1e-5, key
    elif key == "probs":
      _close(x, y, 1e-4, key)
    else:                             # one Adam update (lcfed: the body's follows the head's)
      _close(x, y, 1e-3 if method == "lcfed" else 2e-5, key)


def test_checkpoint_of_padded_run_restores_on_one_device(four_devices):
  """The 4-device run's checkpoint holds the 6 real sites and evaluates here (1 device)
  to the child's results."""
  out, arrays, info = four_devices
  config = tiny_config("fedavg", **SIX)
  result = train.evaluate_checkpoint(config, str(out / "run4"), log=QUIET)
  child = info["run4"]["result"]
  assert result["site_rounds"] == child["site_rounds"]
  np.testing.assert_allclose(_numbers(result["sites"]), _numbers(child["sites"]), atol=1e-6)
  # And training resumes from it here, with one device, as a longer run.
  res = train.train_and_evaluate(tiny_config("fedavg", **dict(SIX, rounds=3)), str(out / "run4"), log=QUIET)
  assert [r["round"] for r in res["history"]] == [1, 2, 3]
  assert res["history"][:2] == info["run4"]["history"]


def test_layout_and_config():
  mesh = sharding.make_mesh(0)
  assert mesh.axis_names == ("sites",) and mesh.devices.size == jax.device_count()
  layout = sharding.SiteLayout(mesh, 6)
  assert (layout.num_total, layout.num_padding, layout.per_device) == (6, 0, 6)
  assert layout.local_sites() == list(range(6))
  w = layout.weights([0.5, 0.5, 0, 0, 0, 0])
  assert w.sharding.spec == jax.sharding.PartitionSpec("sites")
  with pytest.raises(ConfigError, match="mesh.num_devices=2"):
    sharding.make_mesh(2)
  from lcfed_jax.config_validation import validate
  with pytest.raises(ConfigError, match="mesh.num_devices"):
    validate(tiny_config("fedavg", **{"mesh.num_devices": -1}))
