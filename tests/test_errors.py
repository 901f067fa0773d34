"""Every user mistake is one `error:` line and exit code 2, and loses nothing: a test per
failure class, each checking the message and that no file of an earlier run changed."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from conftest import ROOT, tiny_config
from lcfed_jax.run import train
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError

QUIET = lambda *a, **k: None


def launch(*args, env=None):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, **(env or {})))


def tiny(method="fedavg"):
  return ["--config", f"configs/synthetic.py:{method},tiny", "--config.rounds=1"]


def checksums(root: Path):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def assert_user_error(r, *needles):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  err = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  for n in needles:
    assert n in err[0], (n, err[0])
  return err[0]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("earlier") / "run"
  r = launch(*tiny(), "--workdir", str(wd))
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, checksums(wd)


# ---------------------------------------------------------------- a workdir is one experiment

@pytest.mark.parametrize("flags,key", [
    (tiny("fedrep"), "method: 'fedavg' -> 'fedrep'"),
    (tiny() + ["--config.image_size=48"], "image_size: 32 -> 48"),
    (tiny() + ["--config.model.base=8"], "model.base: 4 -> 8"),
    (tiny() + ["--config.model.norm=bn"], "model.norm: 'in' -> 'bn'"),
    (tiny() + ["--config.data.num_sites=3"], "data.num_sites: 4 -> 3"),
])
def test_another_experiment_in_a_workdir_is_refused_and_nothing_changes(earlier_run, flags, key):
  wd, before = earlier_run
  r = launch(*flags, "--workdir", str(wd))
  assert_user_error(r, key, "--config.resume=False", str(wd))
  assert checksums(wd) == before


def test_resume_false_moves_the_earlier_run_aside(tmp_path):
  wd = tmp_path / "run"
  assert launch(*tiny(), "--workdir", str(wd)).returncode == 0
  before = checksums(wd)
  r = launch(*tiny("local"), "--config.resume=False", "--workdir", str(wd))
  assert r.returncode == 0, r.stderr[-2000:]
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
  assert len(moved) == 1 and checksums(moved[0]) == before     # intact, renamed
  assert files.read_jsonl(wd / "metrics.jsonl") and '"method": "local"' in (wd / "config.json").read_text()


# ---------------------------------------------------------------- config mistakes

@pytest.mark.parametrize("flags,needles", [
    (["--config", "configs/synthetic.py", "--config.methd=fedavg"], ["--config.methd=fedavg", "method"]),
    (["--config", "configs/synthetic.py", "--config.rounds=ten"], ["--config.rounds=ten", "int"]),
    (["--config", "configs/synthetc.py"], ["--config", "synthetc.py"]),
    (["--config", "configs/synthetic.py:nope"], ["config.method='nope'", "fedavg"]),
    (["--config", "configs/synthetic.py", "--config.model.conv_impl=unrol"], ["config.model.conv_impl='unrol'"]),
    (["--config", "configs/synthetic.py", "--config.optimizer.name=adm"], ["config.optimizer.name='adm'"]),
    (["--config", "configs/synthetic.py", "--config.fedprox.mu=-1.0"], ["config.fedprox.mu=-1.0"]),
    (["--config", "configs/synthetic.py", "--mode", "sweep", "--methods", "fedavg,fedx"], ["fedx"]),
    (["--config", "configs/synthetic.py", "--mode", "sweep", "--seeds", "0,a"], ["--seeds", "0,a"]),
])
def test_config_mistakes_are_one_error_line(tmp_path, flags, needles):
  r = launch(*flags, "--workdir", str(tmp_path / "w"))
  assert_user_error(r, *needles)
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- paths

def test_paths_that_cannot_be_written(tmp_path, earlier_run):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert_user_error(launch(*tiny(), "--workdir", str(a_file)), str(a_file), "is a file")
  assert a_file.read_text() == "x"
  # Unwritable even for root: under /proc.
  assert_user_error(launch(*tiny(), "--workdir", "/proc/lcfed/run"), "/proc/lcfed/run")
  assert_user_error(launch(*tiny(), "--mode", "sweep", "--workdir", "/proc/lcfed/sweep"), "/proc/lcfed/sweep")
  wd, before = earlier_run
  r = launch("--config", "configs/faz.py", "--workdir", str(tmp_path / "f"), f"--config.data.root={tmp_path}",
             f"--config.data.tfds_dir={a_file}")
  assert_user_error(r, str(a_file))
  assert checksums(wd) == before


def _read_only(folder: Path):
  """A command prefix that runs with `folder` mounted read-only (a user and mount
  namespace, so it works for root too), or None where this machine cannot."""
  if os.geteuid() != 0:
    return []
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {folder} {folder} && "
                          f"mount -o remount,bind,ro {folder} && ! touch {folder}/.probe"],
                         capture_output=True)
  return None if probe.returncode else ["unshare", "-rm", "sh", "-c", f"mount --bind {folder} {folder} && "
                                        f"mount -o remount,bind,ro {folder} && exec \"$0\" \"$@\""]


def test_eval_of_a_read_only_workdir_prints_and_writes_nothing(tmp_path, earlier_run):
  """An archived study: `--mode eval` evaluates and prints, or writes where it is told."""
  wd, before = earlier_run
  prefix = _read_only(wd)
  if prefix is None:
    pytest.skip("cannot make a read-only folder here: running as root without user namespaces")
  if not prefix:
    os.chmod(wd, 0o555)
  try:
    args = [sys.executable, str(ROOT / "launch.py"), *tiny(), "--workdir", str(wd), "--mode", "eval"]
    r = subprocess.run(prefix + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot be written: the results are printed" in r.stderr and "| fedavg |" in r.stderr
    assert checksums(wd) == before
    out = tmp_path / "elsewhere"
    r = subprocess.run(prefix + args + [f"--config.eval.out_dir={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results.json").exists() and checksums(wd) == before
    assert_user_error(subprocess.run(prefix + args + ["--config.eval.out_dir=/proc/lcfed"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=600), "/proc/lcfed")
  finally:
    os.chmod(wd, 0o755)


# ---------------------------------------------------------------- data

def _faz_site_masks(root: Path, site: str, value: int):
  for m in (root / site).rglob("masks/*.png"):
    arr = np.asarray(Image.open(m))
    Image.fromarray(np.where(arr > 0, value, 0).astype(np.uint8)).save(m)


def test_a_site_without_foreground_is_an_error_naming_it(tmp_path):
  root = fx.faz(tmp_path / "raw" / "faz", n_sites=2)
  _faz_site_masks(root, "site2", 0)     # every mask of the site empty
  flags = ["--config", "configs/faz.py:fedavg,tiny", "--config.rounds=1", f"--config.data.root={root}",
           f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--workdir", str(tmp_path / "w")]
  assert_user_error(launch(*flags), "site 'site2'", "no", "foreground")


def test_masks_stored_as_zero_one_are_read_as_foreground(tmp_path):
  from lcfed_jax.config.defaults import base_config
  from lcfed_jax.data import real
  root = fx.polyp_per_site(tmp_path / "polyp")
  for m in (root / "kvasir" / "masks").glob("*.png"):
    arr = np.asarray(Image.open(m))
    Image.fromarray((arr > 127).astype(np.uint8)).save(m)     # {0, 1} instead of {0, 255}
  c = base_config("polyp")
  c.image_size, c.data.root, c.data.tfds_dir = 8, str(root), str(tmp_path / "tfds")
  fd = real.load_real_task(c)
  assert fd.train[fd.site_names.index("kvasir")].masks.any()


# ---------------------------------------------------------------- a diverging run

def test_diverging_run_stops_at_that_round_and_reports_nothing_of_it(tmp_path, monkeypatch):
  """A NaN injected into site 1's parameters before round 3: the run stops at round 3;
  checkpoints, selection, metrics and results hold rounds 1-2 only."""
  real_compile = train._compile_ahead

  def compile_with_nan(*args, **kwargs):
    rounds = real_compile(*args, **kwargs)

    def poisoned(fn):
      def call(state, data, weights):
        if int(state.round) == 2:
          k = jax.tree.leaves(state.params)[0]
          state = state.replace(params=jax.tree.map(lambda a: a.at[1].set(jnp.nan) if a is k else a, state.params))
        return fn(state, data, weights)
      return call
    return {s: poisoned(f) for s, f in rounds.items()}

  monkeypatch.setattr(train, "_compile_ahead", compile_with_nan)
  config = tiny_config("fedavg", rounds=4, **{"checkpoint_every": 1})
  with pytest.raises(train.DivergenceError, match=r"round 3 .*\['clinic_b'\].*latest checkpoint \(round 2\)"):
    train.train_and_evaluate(config, str(tmp_path), log=QUIET)
  assert [r["round"] for r in files.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 2
  assert not (tmp_path / "results.json").exists()
  assert issubclass(train.DivergenceError, UserError)   # launch.py: one error line, exit 2


def test_learning_rate_that_diverges_exits_2(tmp_path):
  r = launch(*tiny(), "--config.learning_rate=1e38", "--workdir", str(tmp_path / "w"))
  assert_user_error(r, "not finite", "round 1", "--config.learning_rate")
  assert not (tmp_path / "w" / "results.json").exists()
