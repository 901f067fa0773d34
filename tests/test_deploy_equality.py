"""Flower == simulation: the same config, seed, init and batch streams give the same
parameters, scores and selection through the Flower apps as through launch.py's
`train_and_evaluate`, within fp32 round-off (three sites, two rounds)."""
import pytest

pytest.importorskip("flwr")

import json  # noqa: E402

import numpy as np  # noqa: E402

import flower_helpers as fh  # noqa: E402
from helpers import flat  # noqa: E402
from lcfed_jax.run.train import train_and_evaluate  # noqa: E402

# Scores come from predictions thresholded at 0.5: a pixel whose probability is within
# round-off of 0.5 (many are, in a model this young) may fall on either side in the two
# programs. One such pixel moves a site's mean IoU by at most 1/(4 images x its union
# size) and its distances by a fraction of a pixel: the tolerances allow a few.
TOLERANCE = {"iou": 3e-3, "dice": 3e-3, "assd": 0.1, "hd95": 0.5}


def _close_scores(a, b, where):
  assert set(a["sites"]) == set(b["sites"]), where
  for site in list(a["sites"]) + [None]:
    x, y = (a["sites"][site], b["sites"][site]) if site else (a["mean"], b["mean"])
    for m, tol in TOLERANCE.items():
      np.testing.assert_allclose(x[m], y[m], rtol=0, atol=tol, err_msg=f"{where} {site or 'mean'} {m}")


@pytest.mark.parametrize("method,overrides", [("fedavg", ""), ("lcfed", "lcfed.hc_rounds=0")])
def test_flower_equals_simulation(tmp_path, method, overrides):
  rc = fh.run_config(method, tmp_path / "flower", f"{fh.SGD} {overrides}")
  config = fh.config_of(rc)
  sim = train_and_evaluate(config, str(tmp_path / "sim"), log=lambda _: None)
  fh.run(rc)

  flower, simulated = fh.metrics(tmp_path / "flower"), fh.metrics(tmp_path / "sim")
  assert [r["round"] for r in flower] == [r["round"] for r in simulated] == [1, 2]
  for f, s in zip(flower, simulated):
    np.testing.assert_allclose(f["loss"], s["loss"], rtol=1e-5, err_msg=f"round {f['round']} loss")
    _close_scores(f, s, f"round {f['round']} test")
    _close_scores(f["val"], s["val"], f"round {f['round']} val")
    assert f["selection"]["site_rounds"] == s["selection"]["site_rounds"]

  # Every site's parameters, personal and shared, after the last round's server step.
  state = flat(sim["state"].params)
  for k, site in enumerate(sim["data"].site_names):
    mine = fh.client_leaves(tmp_path / "flower", site)
    for path, value in state.items():
      np.testing.assert_allclose(mine[f"params/{path}"][0], value[k], rtol=0, atol=2e-6, err_msg=f"{site} {path}")

  result_f = json.loads((tmp_path / "flower" / "results.json").read_text())
  result_s = sim["result"]
  assert result_f["site_rounds"] == result_s["site_rounds"]
  _close_scores(result_f, result_s, "results")
