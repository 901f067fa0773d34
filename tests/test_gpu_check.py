"""`SMOKE=1 bash bench/gpu_check.sh` runs every step of the prepared device session.

At toy sizes on a CPU (two steps at a time), with the default steps of the device run:
each writes a status line 'ok' and its own JSON lines to $OUT/bench.jsonl (versions, the
PyTorch reference, the profile with its categories and roofline, the compile rows with
their XLA settings), the profile's trimmed trace is saved as a fixture, and the summary
table prints. A step that broke on the device would cost a lease; here it costs a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "torch", "profile", "sites32", "seeds8", "pallas", "autotune0", "cmdbuf")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  pytest.importorskip("torch")
  out = tmp_path_factory.mktemp("gpu_out")
  env = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable, TORCH_PY=sys.executable,
             JAX_COMPILATION_CACHE_DIR=os.environ.get("LCFED_JAX_CACHE", str(out / "cache")))
  env.pop("STEPS", None)
  run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  rows = [json.loads(ln) for ln in (out / "bench.jsonl").read_text().splitlines() if ln.startswith("{")]
  return run, rows, out


def test_every_step_ran(smoke):
  run, rows, _ = smoke
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  status = {r["step"]: r for r in rows if "status" in r}
  assert set(status) == set(STEPS), status
  bad = {s: r for s, r in status.items() if r["status"] != "ok"}
  assert not bad, (bad, run.stdout[-3000:])
  for step in STEPS:
    assert [r for r in rows if r["step"] == step and "status" not in r], f"{step} wrote no JSON line"
  assert "| step | impl |" in run.stdout and "done at" in run.stdout


def test_step_contents(smoke):
  _, rows, out = smoke
  by = lambda step: [r for r in rows if r["step"] == step and "status" not in r]
  assert any("jax" in r for r in by("env")) and any("torch" in r for r in by("env"))
  assert any(r.get("impl") == "torch_eager" and r.get("img_per_s") for r in by("torch"))
  head = next(r for r in by("profile") if "trace_kind" in r)
  assert head["img_per_s"] > 0 and head["flops_per_round"] > 0 and head["device_ms_per_round"] > 0
  assert next(r for r in by("profile") if r.get("summary"))["listed_share"] >= 0.9
  assert {"conv fwd", "conv dgrad", "conv wgrad"} <= {r["category"] for r in by("profile") if "category" in r}
  assert sorted(os.listdir(out / "profile_gpu")) == ["hlo.txt", "meta.json", "trace.pbtxt"]
  for step in ("sites32", "seeds8", "pallas", "autotune0", "cmdbuf"):
    row = by(step)[-1]
    assert row.get("img_per_s", 0) > 0 and row.get("loss_finite"), row
  assert by("seeds8")[-1]["seeds"] > 1 and by("pallas")[-1]["impl_used"] == "pallas"
  assert "--xla_gpu_autotune_level=0" in by("autotune0")[-1]["xla_flags"]
  assert "WHILE" in by("cmdbuf")[-1]["xla_flags"]
