"""results/gpu_run.sh, the prepared device command, run as a CPU smoke test (SMOKE=1: toy
sizes, 2 methods, 2 seeds) from a tiny FAZ-layout pack, in processes that cannot import
TFDS (as on the device), then results/gpu_collect.sh on what it returned; a second command
skips what is collected and stops cleanly at its deadline. The planner's estimates and
its seed split are checked on made-up timings."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import data_fixtures as fx
from conftest import ROOT
from lcfed_jax.data import pack
from lcfed_jax.run import gpu_session, tables

BLOCK_TFDS = """import sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow_datasets', 'array_record'):
      raise ImportError('no TFDS on the device: ' + name)
sys.meta_path.insert(0, _Block())
"""


def _events(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(tmp_path, env, *extra):
  return subprocess.run(["bash", str(ROOT / "results" / "gpu_run.sh"), "faz", *extra], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)


def test_smoke_run_collect_then_skip_and_stop_at_the_deadline(tmp_path, monkeypatch):
  fx.faz(tmp_path / "raw" / "faz", n_sites=2, train=4, test=2)
  monkeypatch.setenv("LCFED_TFDS_DIR", str(tmp_path / "tfds"))
  packdir = tmp_path / "faz32"
  assert pack.main(["faz", "--image_size", "32", "--tiny", "--data_dir", str(tmp_path / "raw"),
                    "--out", str(packdir)]) == 0
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_TFDS)
  results = tmp_path / "results"
  env = dict(os.environ, SMOKE="1", PY=sys.executable, PYTHON=sys.executable, PACK=str(packdir), OUT=str(tmp_path / "out"),
             RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(results), LCFED_DATA_DIR="",
             LCFED_JAX_CACHE=str(tmp_path / "xla"), PYTHONPATH=f"{tmp_path / 'site'}:{ROOT}")
  r = _run(tmp_path, env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = tmp_path / "out"
  events = _events(out / "gpu_run.jsonl")
  finished = [(e["label"], e["seeds"]) for e in events if e["event"] == "finished"]
  assert finished == [("fedavg", [0, 1]), ("local", [0, 1])]
  assert events[-1]["event"] == "end" and events[-1]["remaining"] == []
  with tarfile.open(out / "gpu_faz.tar.gz") as tar:
    names = set(tar.getnames())
    files = {n: tar.extractfile(n).read() for n in names}
  expected = {f"runs/{m}/seed{s}/{f}" for m in ("fedavg", "local") for s in (0, 1)
              for f in gpu_session.RESULT_FILES}
  assert expected <= names
  assert {"runs/fedavg/seed0/results_overlays.png", "session.jsonl", "labels.json"} <= names
  assert "runs/fedavg/seed1/results_overlays.png" not in names
  assert files["runs/local/seed1/results.json"] == (tmp_path / "runs" / "seeds_0-1" / "local" / "seed1" /
                                                    "results.json").read_bytes()
  assert json.loads(files["runs/fedavg/seed1/config.json"])["data"]["pack"] == str(packdir)
  assert (out / "xla_cache.tar.gz").stat().st_size > 0

  # collect: the table is the mean ± std over seeds of the collected results
  c = subprocess.run(["bash", str(ROOT / "results" / "gpu_collect.sh"), str(out / "gpu_faz.tar.gz"),
                      "--results_root", str(results), "--cache_dir", str(tmp_path / "cache")],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert c.returncode == 0, c.stderr[-3000:]
  dest = results / "faz" / "gpu"
  table = tables.read_csv(dest / "results.csv")
  for method in ("fedavg", "local"):
    ious = [json.loads((dest / "runs" / method / f"seed{s}" / "results.json").read_text())["mean"]["iou"]
            for s in (0, 1)]
    assert table[(method, "mean", "avg")]["iou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert table[(method, "std", "avg")]["iou"] == pytest.approx(np.std(ious, ddof=1), abs=1e-12)
  md = (dest / "results.md").read_text()
  assert "| fedavg |" in md and " ± " in md and "results/gpu_run.sh faz" in md
  assert (dest / "iou_curves.png").stat().st_size > 0 and any((tmp_path / "cache").iterdir())
  assert [e["event"] for e in _events(dest / "sessions.jsonl")][-1] == "end"

  # the next command: the collected methods are skipped, the new one does not fit its deadline
  env2 = dict(env, METHODS="fedavg,local,fedbn", DEADLINE_S="25", OUT=str(tmp_path / "out2"))
  r = _run(tmp_path, env2)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  events = _events(tmp_path / "out2" / "gpu_run.jsonl")
  assert [(e["label"], e["seeds"]) for e in events if e["event"] == "skip"] == [("fedavg", [0, 1]), ("local", [0, 1])]
  stop, = [e for e in events if e["event"] == "stop"]
  assert stop["label"] == "fedbn" and not any(e["event"] in ("start", "finished") for e in events)
  assert events[-1]["remaining"] == [["fedbn", [0, 1]]]
  with tarfile.open(tmp_path / "out2" / "gpu_faz.tar.gz") as tar:
    assert not [n for n in tar.getnames() if n.startswith("runs/")]


def _timing(results, run_dir, seeds, wall, compile_s, rounds):
  for s in seeds:
    d = results / "runs" / run_dir / f"seed{s}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"seeds": list(seeds) if len(seeds) > 1 else []}))
    (d / "timing.json").write_text(json.dumps({"wall_s": wall, "compile_wall_s": compile_s, "rounds_run": rounds}))
    (d / "results.json").write_text("{}")


def test_estimates_and_the_seed_split(tmp_path):
  results = tmp_path / "results"
  _timing(results, "fedavg", (0, 1, 2), wall=160.0, compile_s=40.0, rounds=300)   # 0.4 s a round
  samples = gpu_session.speed_samples(results, [])
  assert len(samples) == 1 and samples[0]["per_round"] == pytest.approx(0.4)
  # its own rate; another method's (the slowest known) when it has none; seeds scale it
  assert gpu_session.estimate("fedavg", 300, 3, samples) == pytest.approx(
      gpu_session.STARTUP_S + gpu_session.MARGIN * (40 + 300 * 0.4))
  assert gpu_session.estimate("lcfed", 600, 1, samples) == pytest.approx(
      gpu_session.STARTUP_S + gpu_session.MARGIN * (40 + 600 * 0.4 / 3))
  assert gpu_session.estimate("lcfed", 600, 1, []) is None
  interrupted = {"event": "interrupted", "label": "lcfed", "dir": "lcfed", "seeds": [0, 1, 2],
                 "elapsed_s": 500.0, "rounds_done": 250}
  assert gpu_session.estimate("lcfed", 600, 3, gpu_session.speed_samples(results, [interrupted])) == \
      pytest.approx(gpu_session.STARTUP_S + gpu_session.MARGIN * (40 + 600 * 2.0))

  def plan(methods, deadline, **extra):
    args = type("A", (), dict(task="synthetic", config_arg="tiny", pack="unused", seeds="0,1,2", methods=methods,
                              deadline_s=deadline, seeds_per_program=0, start=0, out=str(tmp_path / "o"),
                              results=str(results), runs=str(tmp_path / "r"), **extra))()
    session = gpu_session.Session(args, ["--config.rounds=300", "--config.lcfed.hc_rounds=300"])
    return [(u["label"], u["seeds"], u["rounds"], u["done"]) for u in gpu_session.plan(session)]

  # fedavg is collected; LC-Fed's 600 rounds x 3 seeds (about 340 s) fit a 530 s command...
  assert plan("fedavg,lcfed", 530) == [("lcfed", [0, 1, 2], 600, 0)]
  # ...not a 300 s one, where one seed at a time (about 150 s) does
  assert plan("fedavg,lcfed", 300) == [("lcfed", [s], 600, 0) for s in (0, 1, 2)]
  # where one seed does not fit either, splitting gains nothing: the seeds stay together
  assert plan("fedavg,lcfed", 100) == [("lcfed", [0, 1, 2], 600, 0)]
  # an interrupted program left on the machine resumes as it was, its rounds done counted
  (tmp_path / "r" / "seeds_0-1-2" / "lcfed" / "checkpoints" / "450").mkdir(parents=True)
  assert plan("fedavg,lcfed", 300) == [("lcfed", [0, 1, 2], 600, 450)]


def test_a_method_still_running_at_the_deadline_is_stopped(tmp_path, monkeypatch):
  """run_unit kills the method's process when its time is up and logs how far it got;
  that attempt then informs the next estimate."""
  args = type("A", (), dict(task="synthetic", config_arg="tiny", pack="p", out=str(tmp_path / "o"), start=0,
                            results=str(tmp_path / "res"), runs=str(tmp_path / "runs"), deadline_s=530))()
  session = gpu_session.Session(args, [])
  unit = {"label": "fedavg", "item": "fedavg", "dir": "fedavg", "seeds": [0, 1], "rounds": 300, "done": 0}
  seed_dir = tmp_path / "runs" / "seeds_0-1" / "fedavg" / "seed0"
  seed_dir.mkdir(parents=True)
  (seed_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (10, 20)))
  real_popen = subprocess.Popen
  monkeypatch.setattr(gpu_session.subprocess, "Popen",
                      lambda cmd, **kw: real_popen(["sleep", "60"], **kw))
  assert gpu_session.run_unit(session, unit, timeout=1.0) == "interrupted"
  event = session.events[-1]
  assert event["event"] == "interrupted" and event["rounds_done"] == 20 and event["elapsed_s"] < 30
  assert gpu_session.speed_samples(tmp_path / "res", session.events)[0]["per_round"] == \
      pytest.approx(event["elapsed_s"] / 20)
