"""results/run.sh, the command that reruns a real-data comparison, end to end at a toy size
on generated FAZ-layout data; its table parses back to the runs' own results."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
from conftest import ROOT
from lcfed_jax.run import tables

TOY = ["--config.image_size=32", "--config.model.base=4", "--config.rounds=1", "--config.lcfed.hc_rounds=1",
       "--config.ft.rounds=1", "--config.local_steps=2", "--config.lcfed.head_iters=1",
       "--config.fedrep.head_iters=1", "--config.eval_every=1", "--config.batch_size=2",
       "--config.eval.batch_size=2", "--config.log.tensorboard=False"]


def test_results_script_end_to_end(tmp_path):
  fx.faz(tmp_path / "raw" / "faz", n_sites=2, train=4, test=2)
  env = dict(os.environ, LCFED_DATA_DIR=str(tmp_path / "raw"), LCFED_TFDS_DIR=str(tmp_path / "tfds"),
             METHODS="fedavg,lcfed", SEEDS="0,1", SWEEP_DIR=str(tmp_path / "sweep"), RESULTS_DIR=str(tmp_path / "results"), PYTHON=sys.executable)
  r = subprocess.run(["bash", str(ROOT / "results" / "run.sh"), "faz", *TOY], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / "results" / "faz"
  md = (out / "results.md").read_text()
  assert "Rerun: bash results/run.sh faz" in md and "Protocol:" in md and "| lcfed |" in md
  assert "| lcfed (stage A) |" in md and "over seeds [0, 1]" in md
  table = tables.read_csv(out / "results.csv")
  for method in ("fedavg", "lcfed"):
    means = []
    for seed in ("0", "1"):   # seeds trained in one program, collected as separate runs
      run = out / "runs" / method / f"seed{seed}"
      own = json.loads((run / "results.json").read_text())
      for site in own["site_names"]:
        for m in ("iou", "assd"):
          assert table[(method, seed, site)][m] == pytest.approx(own["sites"][site][m], abs=1e-12)
      means.append(own["mean"]["iou"])
      assert json.loads((run / "config.json").read_text())["seeds"] == [0, 1]
      assert {"metrics.jsonl", "timing.json"} <= {p.name for p in run.iterdir()}
    assert table[(method, "mean", "avg")]["iou"] == pytest.approx(np.mean(means), abs=1e-12)
  stage_a = json.loads((out / "runs" / "lcfed" / "seed0" / "results.json").read_text())["earlier_stages"][0]
  assert table[("lcfed (stage A)", "0", "avg")]["iou"] == pytest.approx(stage_a["mean"]["iou"], abs=1e-12)
  assert np.isfinite(table[("lcfed", "0", "avg")]["iou"])
  for fig in ("iou_curves.png", "overlays_best_worst.png"):
    assert (out / fig).stat().st_size > 0
  # Another session: its workdirs are gone, the collected runs count as finished.
  shutil.rmtree(tmp_path / "sweep")
  again = subprocess.run(["bash", str(ROOT / "results" / "run.sh"), "faz", *TOY], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "(2 finished already)" in again.stderr and "compiling" not in again.stderr
  assert tables.read_csv(out / "results.csv") == table
  # The ablation, its workdirs gone too: its default row is the committed LC-Fed run.
  abl = subprocess.run(["bash", str(ROOT / "results" / "run.sh"), "faz", *TOY], cwd=ROOT, capture_output=True,
                       env=dict(env, STUDY="ablation", METHODS="lcfed", SWEEP_DIR=str(tmp_path / "ablation")),
                       text=True, timeout=900)
  assert abl.returncode == 0, abl.stderr[-3000:]
  assert "(1 finished already)" in abl.stderr and "compiling" not in abl.stderr
  ablation = tables.read_csv(out / "ablation" / "results.csv")
  assert {k: v for k, v in ablation.items() if k[0] == "lcfed"} == {k: v for k, v in table.items() if k[0] == "lcfed"}
  assert "Rerun: STUDY=ablation bash results/run.sh faz" in (out / "ablation" / "results.md").read_text()
