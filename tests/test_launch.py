"""`launch.py` end to end in a subprocess: the documented entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.local_steps=2"]


def _launch(*args, env=None):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_tiny_run_writes_config_metrics_and_results(tmp_path):
  r = _launch("--config", "configs/synthetic.py:fedavg,tiny", "--workdir", str(tmp_path), *TINY)
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["method"] == "fedavg" and cfg["rounds"] == 2 and cfg["image_size"] == 32
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [rec["round"] for rec in records] == [1, 2]
  for rec in records:
    assert set(rec["sites"]) == {"clinic_a", "clinic_b", "clinic_c", "clinic_d"}
    for site in rec["sites"].values():
      assert 0 <= site["iou"] <= 1 and 0 <= site["dice"] <= 1
  out = r.stdout + r.stderr
  assert "round 2/2" in out and "rounds/s" in out and "ETA" in out
  assert "all-foreground mean IoU" in out
  assert (tmp_path / "results.md").exists() and (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("override,needle", [
    ("--config.rounds=0", "config.rounds=0"),
    ("--config.image_size=30", "config.image_size=30"),
    ("--config.model.norm=ln", "config.model.norm='ln'"),
])
def test_invalid_config_is_a_clear_error_before_compiling(tmp_path, override, needle):
  r = _launch("--config", "configs/synthetic.py", "--workdir", str(tmp_path), override)
  assert r.returncode == 2
  assert needle in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_method_and_missing_data_are_user_errors(tmp_path):
  r = _launch("--config", "configs/synthetic.py:nope", "--workdir", str(tmp_path))
  assert r.returncode == 2 and "config.method='nope'" in r.stderr
  env = dict(os.environ, LCFED_TFDS_DIR=str(tmp_path / "tfds"))
  r = _launch("--config", "configs/polyp.py", "--workdir", str(tmp_path / "w"),
              f"--config.data_dir={tmp_path / 'nowhere'}", env=env)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "nowhere" in r.stderr
