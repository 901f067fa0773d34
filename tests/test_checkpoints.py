"""Checkpoints: exact resume, retention, a kill during a save, restore on another topology."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config, xla_flags
from lcfed_jax.config import defaults
from lcfed_jax.run import checkpoints as ckpt_lib, train, eval_checkpoint
from lcfed_jax.util import files as io_utils
from lcfed_jax.run.runner import Run
from lcfed_jax.util.errors import UserError

QUIET = lambda *a, **k: None


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def _run_subprocess(code: str, env_extra=None, timeout=240):
  env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", **(env_extra or {}))
  prelude = ("import jax, os\n"
             "jax.config.update('jax_compilation_cache_dir', os.environ['LCFED_JAX_CACHE'])\n"
             "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)\n")
  return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- resume (fedavg, 'val')

@pytest.fixture(scope="module")
def fedavg_runs(tmp_path_factory):
  full_dir = tmp_path_factory.mktemp("full")
  full = train.train_and_evaluate(tiny_config("fedavg", rounds=4), str(full_dir), log=QUIET)
  res_dir = tmp_path_factory.mktemp("resumed")
  train.train_and_evaluate(tiny_config("fedavg", rounds=2), str(res_dir), log=QUIET)
  # A record past the checkpoint, as left by a crash after an eval: a resume must drop it.
  io_utils.append_jsonl(res_dir / "metrics.jsonl", {"round": 3, "stale": True})
  resumed = train.train_and_evaluate(tiny_config("fedavg", rounds=4), str(res_dir), log=QUIET)
  return full_dir, full, res_dir, resumed


def test_resume_is_exact(fedavg_runs):
  full_dir, full, res_dir, resumed = fedavg_runs
  assert int(resumed["state"].round) == 4
  _leaves_equal(full["state"], resumed["state"])          # params, BN/IN state, Adam mu/nu/counts, rng
  _leaves_equal(full["selected"], resumed["selected"])
  a, b = io_utils.read_jsonl(full_dir / "metrics.jsonl"), io_utils.read_jsonl(res_dir / "metrics.jsonl")
  assert [r["round"] for r in b] == [1, 2, 3, 4]          # no duplicates, stale record gone
  assert a == b                                           # every number of every round
  assert full["result"] == resumed["result"]


def test_restart_of_finished_run_does_nothing(fedavg_runs, tmp_path):
  _, _, res_dir, resumed = fedavg_runs
  before = (res_dir / "metrics.jsonl").read_text()
  again = train.train_and_evaluate(tiny_config("fedavg", rounds=4), str(res_dir), log=QUIET)
  assert (res_dir / "metrics.jsonl").read_text() == before
  _leaves_equal(again["state"], resumed["state"])
  assert again["result"] == resumed["result"]


def test_retention_keeps_newest_and_selected(fedavg_runs):
  full_dir, full, _, _ = fedavg_runs
  steps = sorted(int(p.name) for p in (full_dir / "checkpoints").iterdir() if p.name.isdigit())
  sel = full["result"]["site_rounds"]
  assert steps == sorted({3, 4} | set(sel.values()))      # keep=2 newest + the selected round
  meta = ckpt_lib.Checkpoints(full_dir, read_only=True).read_meta()
  assert meta["round"] == 4 and meta["method"] == "fedavg" and meta["selection"]["site_rounds"] == sel
  assert meta["config"]["rounds"] == 4 and meta["schedule"][0]["name"] == "train"
  # The selected round is the best mean validation IoU in metrics.jsonl.
  recs = io_utils.read_jsonl(full_dir / "metrics.jsonl")
  best = max(recs, key=lambda r: (r["val"]["mean"]["iou"], -r["round"]))
  assert set(sel.values()) == {best["round"]}


def test_incompatible_resume_is_a_user_error(fedavg_runs):
  full_dir = fedavg_runs[0]
  with pytest.raises(UserError, match="method: 'fedavg' -> 'fedrep'"):
    train.train_and_evaluate(tiny_config("fedrep", rounds=4), str(full_dir), log=QUIET)
  with pytest.raises(UserError, match="past the end"):
    train.train_and_evaluate(tiny_config("fedavg", rounds=3), str(full_dir), log=QUIET)


def test_a_run_saved_before_a_setting_existed_resumes_and_evaluates(fedavg_runs, tmp_path, monkeypatch):
  """An older run's config.json and checkpoints lack a setting added since
  (`defaults.ADDED_SETTINGS`): they read as holding the value that reproduces them, so the
  run restarts (finished: nothing to do) and `--mode eval` evaluates it as before; the
  value matters (another one is another experiment)."""
  full_dir, full = fedavg_runs[:2]
  old = tmp_path / "old"
  shutil.copytree(full_dir, old)
  saved = [old / "config.json", *old.glob("checkpoints/*/meta/metadata")]
  assert len(saved) >= 3
  for path in saved:
    record = json.loads(path.read_text())
    del (record if path.name == "config.json" else record["config"])["model"]["depth"]
    path.write_text(json.dumps(record))
  monkeypatch.setitem(defaults.ADDED_SETTINGS, "model.depth", 3)      # what this (tiny) run used
  again = train.train_and_evaluate(tiny_config("fedavg", rounds=4), str(old), log=QUIET)
  assert again["result"] == full["result"]
  result = eval_checkpoint.evaluate_checkpoint(tiny_config("fedavg"), str(old), log=QUIET)
  assert result["sites"] == full["result"]["sites"] and result["site_rounds"] == full["result"]["site_rounds"]
  monkeypatch.setitem(defaults.ADDED_SETTINGS, "model.depth", 5)
  with pytest.raises(UserError, match="model.depth: 5 -> 3"):
    train.train_and_evaluate(tiny_config("fedavg", rounds=4), str(old), log=QUIET)


def test_eval_without_checkpoint_names_workdir(tmp_path):
  with pytest.raises(UserError, match=str(tmp_path / "nothing")):
    eval_checkpoint.evaluate_checkpoint(tiny_config("fedavg"), str(tmp_path / "nothing"), log=QUIET)


# ---------------------------------------------------------------- a kill during a save (lcfed)

LCFED = dict(rounds=3, **{"lcfed.hc_rounds": 2})   # stages A (3) + B (2); killed saving round 3


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
  killed = tmp_path / "killed"
  proc = _run_subprocess(f"""
      import os
      from pathlib import Path
      from orbax.checkpoint._src.path import atomicity
      from conftest import tiny_config
      from lcfed_jax.run import train
      orig = atomicity.AtomicRenameTemporaryPath.finalize
      async def finalize(self, *a, **k):
        if Path(str(self._final_path)).name == "3":   # every item is written, the step is not renamed
          os._exit(17)
        return await orig(self, *a, **k)
      atomicity.AtomicRenameTemporaryPath.finalize = finalize
      train.train_and_evaluate(tiny_config("lcfed", **{LCFED!r}), {str(killed)!r}, log=lambda *a: None)
      """)
  assert proc.returncode == 17, proc.stderr[-3000:]
  ckdir = killed / "checkpoints"
  leftovers = [p.name for p in ckdir.iterdir() if "tmp" in p.name]
  assert leftovers and leftovers[0].startswith("3."), sorted(p.name for p in ckdir.iterdir())
  assert any((ckdir / leftovers[0]).iterdir())           # it was killed with data written
  ck = ckpt_lib.Checkpoints(killed, read_only=True)
  assert ck.latest_step() == 2 and ck.read_meta()["round"] == 2
  # The previous checkpoint restores, and training resumes from it to exactly the same end.
  resumed = train.train_and_evaluate(tiny_config("lcfed", **LCFED), str(killed), log=QUIET)
  assert not [p for p in ckdir.iterdir() if "tmp" in p.name]
  full = train.train_and_evaluate(tiny_config("lcfed", **LCFED), str(tmp_path / "full"), log=QUIET)
  _leaves_equal(full["state"], resumed["state"])
  _leaves_equal(full["selected"], resumed["selected"])
  assert (io_utils.read_jsonl(killed / "metrics.jsonl") ==
          io_utils.read_jsonl(tmp_path / "full" / "metrics.jsonl"))


# ---------------------------------------------------------------- another topology

def test_checkpoint_from_four_devices_restores_on_one(tmp_path):
  wd = tmp_path / "w4"
  proc = _run_subprocess(f"""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from conftest import tiny_config
      from lcfed_jax.run import checkpoints as ckpt_lib
      from lcfed_jax.run.runner import Run
      from lcfed_jax.run.train import Schedule
      from lcfed_jax.eval import selection
      assert jax.device_count() == 4, jax.devices()
      config = tiny_config("fedavg", **{{"eval.selection": "test"}})
      setup = Run(config, log=lambda *a: None)
      state = setup.exp.init_state()
      mesh = Mesh(np.array(jax.devices()), ("sites",))
      site, rep = NamedSharding(mesh, P("sites")), NamedSharding(mesh, P())
      state = jax.tree.map(lambda a: jax.device_put(a, site if a.ndim else rep), state)
      leaf = state.params["head"]["kernel"]
      assert len(leaf.sharding.device_set) == 4 and leaf.sharding.spec == P("sites")
      tracker = selection.Tracker("test", setup.data.site_names)
      tracker.update(state, 1, np.zeros(setup.k), "probs", False)
      ck = ckpt_lib.Checkpoints({str(wd)!r})
      meta = dict(ckpt_lib.run_meta(config, setup, "test", Schedule(list(setup.exp.stages))),
                  has_selection=True, selection=tracker.to_json())
      ck.save(1, state, tracker.tree, meta)
      ck.close()
      flat = {{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}}
      np.savez({str(tmp_path / "leaves.npz")!r}, **flat)
      """, env_extra={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert jax.device_count() == 1
  config = tiny_config("fedavg", **{"eval.selection": "test"})
  # Without a target orbax refuses the topology; with ours every leaf comes back exactly.
  setup = Run(config, log=QUIET)
  abstract = ckpt_lib.abstract_like(setup.exp.abstract_state())
  restored = ckpt_lib.Checkpoints(wd, read_only=True).restore(1, abstract, items=("state",))["state"]
  saved = np.load(tmp_path / "leaves.npz")
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(restored)}
  assert sorted(flat) == sorted(saved.files)
  for key, x in flat.items():
    assert isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
    np.testing.assert_array_equal(np.asarray(x), saved[key], err_msg=key)
  assert type(restored.opt_state).__name__ == "FreezableState"
  # --mode eval on this process's one device.
  result = eval_checkpoint.evaluate_checkpoint(config, str(wd), log=QUIET)
  scores, _ = setup.evaluate_selected({"params": restored.params, "model_state": restored.model_state},
                                      ["probs"] * setup.k)
  assert result["sites"] == scores["sites"] and result["mean"] == scores["mean"]
  assert (wd / "results.csv").exists() and json.loads((wd / "eval_best.json").read_text())["checkpoint_step"] == 1


# ---------------------------------------------------------------- paths a sweep names

def test_a_sweep_rows_checkpoint_restores(tmp_path):
  """A sweep row with overrides (label `lcfed[lcfed.hc=False]`) saves under a path without
  glob characters, where its checkpoint restores (orbax globs for its per-process files:
  under `[...]` it saved checkpoints it could not read back)."""
  from types import SimpleNamespace
  from lcfed_jax.run import sweep, workdir as workdir_lib
  wd = sweep.run_dir(tmp_path, "lcfed[lcfed.hc=False]", 0)
  assert not set(str(wd)) & set(workdir_lib.GLOB_CHARS)
  tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
  ckpts = ckpt_lib.Checkpoints(wd)
  ckpts.save(1, tree, {"params": tree, "model_state": {}}, {"x": 1})
  ckpts.close()
  abstract = SimpleNamespace(params=ckpt_lib.abstract_like(tree), model_state={})
  got = ckpt_lib.Checkpoints(wd, read_only=True).restore(1, abstract, items=("selected",))["selected"]
  np.testing.assert_array_equal(got["params"]["w"], tree["w"])
  with pytest.raises(UserError, match=r"glob characters"):
    workdir_lib.check_writable(tmp_path / "runs[1]")
