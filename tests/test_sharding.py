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

from conftest import ROOT, tiny_config, tiny_flags, xla_flags
from lcfed_jax.run import checkpoints as ckpt_lib, train, eval_checkpoint
from lcfed_jax.fed import setup, sharding
from lcfed_jax.util.errors import ConfigError

QUIET = lambda *a, **k: None
# XLA compiles a block of 2 sites and one of 6 into slightly different float code (even
# with no communication at all: 'local' differs by ~1e-6 after one step), and Adam turns
# such noise into lr-sized steps from its second update on. So every comparison here
# gives each leaf at most one or two Adam updates, with a large eps ('unroll' runs the
# same convolution per site on any layout, tests/test_engine.py).
SIX = {"data.num_sites": 6, "data.train_sizes": (10, 7, 5, 8, 6, 9), "eval.selection": "test",
       "local_steps": 1, "optimizer.eps": 1e-3, "model.conv_impl": "unroll"}

CHILD = """
import json, os, sys
import jax, numpy as np
jax.config.update('jax_compilation_cache_dir', os.environ['LCFED_JAX_CACHE'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
from conftest import tiny_config
from helpers import flat
from lcfed_jax.fed import setup, sharding
from lcfed_jax.run import train
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.synthetic import generate
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
for method in ("lcfed", "prrfl", "lcfed_seeds", "ditto"):
  over = dict(SIX, local_steps=1 if method == "prrfl" else 2, **({{"seeds": (0, 1)}} if method == "lcfed_seeds" else {{}}))
  config = tiny_config(method.split("_")[0], **over)
  data = generate(6, 32, SIX["data.train_sizes"], 4, 0)
  for n in (4, 1):
    layout = sharding.SiteLayout(sharding.make_mesh(n), 6)
    exp = setup.build(config, 6, 3, 1, (32, 32, 3), layout)
    m = exp.method
    host = jax.tree.map(np.asarray, exp.init_state())
    state = layout.pad_host_tree(host)
    train_arrays = stack_splits(data.train, layout.num_padding, sharding=layout.site_sharding)
    test_arrays = stack_splits(data.test, layout.num_padding, 2, sharding=layout.site_sharding)
    weights = layout.weights(np.full(6, 1 / 6, np.float32))
    for output in sorted({{s.output for s in m.stages}}):
      pred = exp.predict_fn(output, 2)(state.params, state.model_state, test_arrays.images)
      arrays[f"{{method}}{{n}}/{{output}}"] = np.asarray(pred["prob"])[:6]
    for i, stage in enumerate(m.stages):
      new, loss, _ = exp.round_fn(stage)(layout.pad_host_tree(host), train_arrays, weights)
      arrays[f"{{method}}{{n}}/losses{{i}}"] = np.asarray(loss)[:6]
      for key, leaf in flat(layout.strip(new).params).items():
        arrays[f"{{method}}{{n}}/params{{i}}/{{key}}"] = leaf
    if n == 4:
      leaf = jax.tree.leaves(state.params)[0]
      info[method] = {{"spec": str(leaf.sharding.spec), "total": int(leaf.shape[0])}}

np.savez(os.path.join(out, "arrays.npz"), **arrays)
with open(os.path.join(out, "info.json"), "w") as f:
  json.dump(info, f, default=float)
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD.format(six=SIX)), str(out)],
                        env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, dict(np.load(out / "arrays.npz")), json.loads((out / "info.json").read_text())


def _close(a, b, atol, what):
  np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=what)


def _mostly_close(a, b, tight, loose, what):
  """The median element within `tight`, every element within `loose`."""
  err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  assert err.max() <= loose and np.median(err) <= tight, (what, err.max(), np.median(err))


def _compare(arrays, a, b, atol):
  keys = sorted(k[len(a):] for k in arrays if k.startswith(a))
  assert keys and keys == sorted(k[len(b):] for k in arrays if k.startswith(b))
  for key in keys:
    _close(arrays[a + key], arrays[b + key], atol, key)


def _numbers(tree, path=""):
  """Every number of a (JSON) record, flattened, for a tolerance comparison."""
  return [x for _, x in _numbered(tree, path)]


def _numbered(tree, path=""):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _numbered(tree[k], f"{path}/{k}")]
  if isinstance(tree, (list, tuple)):
    return [x for i, v in enumerate(tree) for x in _numbered(v, f"{path}/{i}")]
  if isinstance(tree, bool) or tree is None or isinstance(tree, str):
    return []
  return [(path, float(tree))]


def _close_metrics(got, want, overlap_atol, pixels_atol):
  """Records compared number by number: overlap scores and losses to `overlap_atol`,
  surface distances (ASSD, HD95, in pixels) to `pixels_atol`."""
  a, b = _numbered(got), _numbered(want)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    distance = "assd" in path or "hd95" in path
    assert abs(x - y) <= (pixels_atol if distance else overlap_atol) + 1e-2 * abs(y), (path, x, y)


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


@pytest.mark.parametrize("method", ["lcfed", "prrfl", "lcfed_seeds", "ditto"])
def test_padding_sites_change_nothing(four_devices, method):
  """Cross-site terms (HC's gathered heads, PCS codes, PRR-FL's amplitude mean and its
  divisor) see the 6 real sites only: 4 devices + 2 padding sites == 1 device, none.
  'lcfed_seeds': two seeds on the replica axis, each gathering and averaging in its group;
  'ditto': its second, personal network beside the averaged one."""
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
      _close(x, y, 2e-5 if method == "prrfl" else 1e-3, key)


def test_checkpoint_of_padded_run_restores_on_one_device(four_devices):
  """The 4-device run's checkpoint holds the 6 real sites and evaluates here (1 device)
  to the child's results."""
  out, arrays, info = four_devices
  config = tiny_config("fedavg", **SIX)
  result = eval_checkpoint.evaluate_checkpoint(config, str(out / "run4"), log=QUIET)
  child = info["run4"]["result"]
  assert result["site_rounds"] == child["site_rounds"]
  np.testing.assert_allclose(_numbers(result["sites"]), _numbers(child["sites"]), atol=1e-6)
  # And training resumes from it here, with one device, as a longer run.
  res = train.train_and_evaluate(tiny_config("fedavg", **dict(SIX, rounds=3)), str(out / "run4"), log=QUIET)
  assert [r["round"] for r in res["history"]] == [1, 2, 3]
  assert res["history"][:2] == info["run4"]["history"]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
  """launch.py --multihost as two processes of 2 CPU devices each (gloo collectives),
  the 6-site run of `four_devices`: process 0 holds sites 0-3, process 1 sites 4-5 and
  the 2 padding sites."""
  workdir = tmp_path_factory.mktemp("two_hosts") / "run"
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *tiny_flags("fedavg", **SIX),
         f"--workdir={workdir}", "--multihost"],
        env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for pid, p in enumerate(procs):
    assert p.returncode == 0, f"process {pid}:\n" + logs[pid][-4000:]
  return workdir, logs


def test_two_processes_equal_one_device(two_hosts, four_devices):
  """Two processes (hosts) with their own sites' data only give the metrics, selection and
  results of the 1-device run; process 0 alone writes the workdir's files."""
  workdir, logs = two_hosts
  _, _, info = four_devices
  for pid, sites in ((0, "['clinic_a', 'clinic_b', 'clinic_c', 'clinic_d']"), (1, "['clinic_e', 'clinic_f']")):
    assert f"multihost: process {pid}/2, 2 local of 4 devices" in logs[pid]
    assert "mesh: 4 devices on 'sites', 6 sites (+2 padding), 2 per device, 2 processes" in logs[pid]
    assert f"(this process: {sites})" in logs[pid]
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  r1 = info["run1"]
  assert [r["round"] for r in history] == [1, 2]
  assert _strings(history) == _strings(r1["history"])
  # The cross-process mean (gloo) rounds differently from one device's: the parameters
  # agree to ~1e-4 (next test), which can flip a thresholded pixel of a 32-px mask, so the
  # metrics get a pixel's worth of tolerance (overlap 2e-2 on a 32-px mask, surface
  # distances 0.25 px); the losses are continuous and tight.
  for r, ref in zip(history, r1["history"]):
    _close(r["loss"], ref["loss"], 1e-5, f"round {r['round']} losses")
  _close_metrics(history, r1["history"], 2e-2, 0.25)
  result = json.loads((workdir / "results.json").read_text())
  assert result["site_rounds"] == r1["result"]["site_rounds"]
  _close_metrics(result["sites"], r1["result"]["sites"], 2e-2, 0.25)
  assert (workdir / "results_overlays.png").stat().st_size > 0   # examples of all 6 sites gathered
  # Both processes agree on every record (the selection they checkpoint by).
  evals = [[line[line.index("eval round"):] for line in log.splitlines() if "eval round" in line]
           for log in logs]
  assert len(evals[0]) == 2 and evals[0] == evals[1]


def test_two_process_checkpoint_restores_on_one_device(two_hosts, four_devices):
  """The checkpoint written by two processes restores here (1 device, 1 process): the
  parameters are those of the 1-device run and the evaluation repeats results.json."""
  workdir, _ = two_hosts
  _, arrays, _ = four_devices
  config = tiny_config("fedavg", **SIX)
  layout = sharding.single_device_layout(6)
  exp = setup.build(config, 6, 3, 1, (32, 32, 3), layout)
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  state = ckpts.restore(2, layout.abstract_real(exp.abstract_state()), items=("state",))["state"]
  ckpts.close()
  from helpers import flat
  got = {f"run1/state/{k}": v for k, v in flat(state).items()}
  assert got.keys() == {k for k in arrays if k.startswith("run1/state/")}
  for key, value in got.items():
    # Rounding can move a max-pool's argmax, which reroutes part of a gradient: a few of
    # Adam's moments then differ by several percent at a site, and where a second moment is
    # tiny the normalised step by ~1e-4 (CPUs of other vector widths round differently).
    # So: the typical element tight, every element loosely; averaging the wrong sites or
    # restoring a stale state moves the typical element by far more than the tight bound
    # (one Adam step is ~1e-3 here).
    tight = 1e-4 if "/opt_state/" in key else 1e-5
    _mostly_close(value, arrays[key], tight, 200 * tight, key)
  result = eval_checkpoint.evaluate_checkpoint(config, str(workdir), log=QUIET)
  saved = json.loads((workdir / "results.json").read_text())
  assert result["site_rounds"] == saved["site_rounds"]
  np.testing.assert_allclose(_numbers(result["sites"]), _numbers(saved["sites"]), atol=1e-6)


def test_distributed_settings_are_checked_before_connecting(monkeypatch):
  config = tiny_config("fedavg", **{"mesh.multihost": True, "mesh.num_processes": 2,
                                    "mesh.process_id": 2})
  with pytest.raises(ConfigError, match="process id 2 is outside 0..1"):
    sharding.initialize_distributed(config)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  config = tiny_config("fedavg", **{"mesh.multihost": True})
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two'"):
    sharding.initialize_distributed(config)


def test_a_process_with_only_padding_sites_is_a_config_error(monkeypatch, tmp_path):
  monkeypatch.setattr(sharding.SiteLayout, "local_sites", lambda self: [])
  with pytest.raises(ConfigError, match="would hold only padding sites"):
    train.train_and_evaluate(tiny_config("fedavg"), str(tmp_path), log=QUIET)


def test_gather_helpers_on_one_process():
  layout = sharding.SiteLayout(sharding.make_mesh(1), 3)
  a = layout.pad_host_tree({"x": np.arange(12).reshape(3, 4)})["x"]
  rows = sharding.local_rows(a, keep=[0, 2])
  assert sorted(rows) == [0, 2] and rows[2].tolist() == [8, 9, 10, 11]
  assert sharding.merge_sites({1: "b", 0: "a"}) == {0: "a", 1: "b"}
  assert sharding.gather_objects({"n": 1}) == [{"n": 1}]


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
  from lcfed_jax.config.validate import validate
  with pytest.raises(ConfigError, match="mesh.num_devices"):
    validate(tiny_config("fedavg", **{"mesh.num_devices": -1}))
