"""Reports: results.csv holds the metrics.jsonl numbers of the selected round(s); per-site
selection; plots; the compare table; --mode eval of the latest checkpoint."""
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lcfed_jax.run import compare, report, train, eval_checkpoint
from lcfed_jax.util import files as io_utils
from lcfed_jax.eval import selection

QUIET = lambda *a, **k: None


@pytest.fixture(scope="module")
def lcfed_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("lcfed")
  out = train.train_and_evaluate(tiny_config("lcfed", rounds=2, **{"lcfed.hc_rounds": 2}), str(wd), log=QUIET)
  return wd, out


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ft")
  config = tiny_config("ft", rounds=1, **{"ft.rounds": 3, "eval.selection": "test", "ft.learning_rate": 3e-3})
  out = train.train_and_evaluate(config, str(wd), log=QUIET)
  return wd, out


def _check_csv_matches_metrics(wd):
  rows = report.read_csv(wd / "results.csv")
  recs = {r["round"]: r for r in io_utils.read_jsonl(wd / "metrics.jsonl")}
  sites = [s for s in rows if s not in ("mean", "std")]
  assert sites and len(sites) == 4
  for s in sites:
    r = int(rows[s]["round"])
    for m in report.METRICS:
      assert rows[s][m] == recs[r]["sites"][s][m], (s, m, r)     # exactly, not approximately
  for m in report.METRICS:
    vals = [rows[s][m] for s in sites]
    assert rows["mean"][m] == pytest.approx(np.mean(vals), abs=1e-12)
    assert rows["std"][m] == pytest.approx(np.std(vals), abs=1e-12)
  return rows, recs


def test_results_csv_equals_metrics_of_selected_round(lcfed_run):
  wd, out = lcfed_run
  rows, recs = _check_csv_matches_metrics(wd)
  rounds = {rows[s]["round"] for s in rows if s not in ("mean", "std")}
  assert len(rounds) == 1                                  # one round for every site
  sel = int(rounds.pop())
  # Stage B selects on its own (it starts from stage A's selection): its best mean IoU on
  # the validation split.
  best = max((r for r in recs.values() if r["stage"] == "B"), key=lambda r: (r["val"]["mean"]["iou"], -r["round"]))
  assert sel == best["round"]
  assert recs[max(recs)]["selection"]["best_round"] == sel
  for m in report.METRICS:                                # mean row == metrics' site mean of that round
    assert rows["mean"][m] == pytest.approx(recs[sel]["mean"][m], abs=1e-12)


def test_results_md_and_plots(lcfed_run):
  wd, out = lcfed_run
  md = (wd / "results.md").read_text()
  res = out["result"]
  assert f"{res['mean']['iou'] * 100:.2f}" in md and f"{res['mean']['assd']:.2f}" in md
  assert "IoU clinic_a" in md and "ASSD avg" in md and "HD95" in md
  for name in ("iou_curves.png", "results_overlays.png"):
    data = (wd / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_per_site_selection(ft_run):
  """FT's fine-tuning: each site's reported numbers come from its own best test round."""
  wd, out = ft_run
  rows, recs = _check_csv_matches_metrics(wd)
  ft_rounds = [r for r in recs.values() if r["stage"] == "finetune"]
  for s in out["data"].site_names:
    # The site's best test IoU over the fedavg-selected round and the fine-tuning rounds.
    fed = max((r for r in recs.values() if r["stage"] == "fedavg"), key=lambda r: r["mean"]["iou"])
    cands = [fed] + ft_rounds
    best = max(cands, key=lambda r: (r["sites"][s]["iou"], -r["round"]))
    assert int(rows[s]["round"]) == best["round"], s
  assert out["result"]["site_rounds"] == {s: int(rows[s]["round"]) for s in out["data"].site_names}


def test_eval_latest_matches_last_round(lcfed_run):
  wd, out = lcfed_run
  config = tiny_config("lcfed", rounds=99, **{"eval.checkpoint": "latest"})   # the checkpoint's config wins
  res = eval_checkpoint.evaluate_checkpoint(config, str(wd), log=QUIET)
  last = io_utils.read_jsonl(wd / "metrics.jsonl")[-1]
  assert last["round"] == 4 and set(res["site_rounds"].values()) == {4}
  assert res["sites"] == last["sites"] and res["mean"] == last["mean"]
  assert (wd / "eval_latest.csv").exists() and (wd / "eval_latest.json").exists()


def test_compare_marks_best_per_column(lcfed_run, ft_run, tmp_path):
  (wd_a, a), (wd_b, b) = lcfed_run, ft_run
  assert compare.main([str(wd_a), str(wd_b), "--out", str(tmp_path)]) == 0
  with open(tmp_path / "compare.csv") as f:
    rows = list(csv.reader(f))
  header, body, best = rows[0], rows[1:3], rows[3]
  assert [r[0] for r in body] == ["lcfed", "ft"] and best[0] == "best"
  for j, col in enumerate(header[2:], start=2):
    vals = [float(r[j]) for r in body]
    metric = "iou" if col.startswith("IoU") else "assd"
    site = col.split(" ", 1)[1]
    expect = [a, b][int(np.argmax(vals) if metric == "iou" else np.argmin(vals))]["result"]
    want = expect["mean"][metric] if site == "avg" else expect["sites"][site][metric]
    assert float(body[["lcfed", "ft"].index(best[j])][j]) == want, col
  md = (tmp_path / "compare.md").read_text()
  assert md.count("**") == 2 * len(header[2:])             # one bold cell per column (no ties here)


def test_compare_rejects_mismatched_sites(lcfed_run, tmp_path):
  wd = tmp_path / "other"
  wd.mkdir()
  res = dict(lcfed_run[1]["result"])
  res["sites"] = {"x": res["sites"]["clinic_a"]}
  io_utils.atomic_write_json(wd / "results.json", res)
  assert compare.main([str(lcfed_run[0]), str(wd), "--out", str(tmp_path)]) == 2
  assert compare.main([str(tmp_path / "missing")]) == 2


class _State:
  def __init__(self, value):
    self.params = {"w": jnp.full((3, 2), float(value))}    # 3 sites
    self.model_state = {}


def test_tracker_per_site_and_global():
  t = selection.Tracker("val", ["a", "b", "c"])
  assert t.update(_State(1), 1, [0.5, 0.5, 0.5], "probs", per_site=False)
  assert not t.update(_State(2), 2, [0.9, 0.1, 0.4], "probs", per_site=False)   # mean 0.467 < 0.5
  assert t.update(_State(3), 3, [0.4, 0.6, float("nan")], "hc", per_site=True)    # b only; NaN never wins
  assert not t.update(_State(4), 4, [0.4, 0.6, 0.5], "hc", per_site=True)         # ties keep the earlier round
  np.testing.assert_array_equal(np.asarray(t.tree["params"]["w"])[:, 0], [1, 3, 1])
  assert t.rounds == [1, 3, 1] and t.outputs == ["probs", "hc", "probs"] and t.best_round is None
  assert t.update(_State(5), 5, [0.7, 0.7, 0.7], "probs", per_site=False)         # 0.7 > mean(0.5,0.6,0.5)
  assert t.rounds == [5, 5, 5] and t.best_round == 5
  last = selection.Tracker("last", ["a", "b", "c"])
  last.update(_State(1), 1, [0.9] * 3, "probs", False)
  assert last.update(_State(2), 2, [0.1] * 3, "probs", False) and last.rounds == [2, 2, 2]
  # The bookkeeping survives the JSON item of a checkpoint.
  t2 = selection.Tracker("val", ["a", "b", "c"])
  t2.load_json(json.loads(json.dumps(t.to_json())), t.tree)
  assert t2.rounds == t.rounds and t2.scores == t.scores and t2.outputs == t.outputs


def test_validation_split_is_carved_deterministically(lcfed_run):
  data = lcfed_run[1]["data"]
  tr, va = selection.carve_validation(data.train, 0.1, seed=0)
  tr2, va2 = selection.carve_validation(data.train, 0.1, seed=0)
  _, va3 = selection.carve_validation(data.train, 0.1, seed=1)
  for k, full in enumerate(data.train):
    assert len(va[k]) == max(1, round(0.1 * len(full))) and len(tr[k]) + len(va[k]) == len(full)
    assert not set(tr[k].names) & set(va[k].names)                  # removed from training
    assert va[k].names == va2[k].names
  assert any(va[k].names != va3[k].names for k in range(len(va)))


def test_side_by_side_scales_large_panels_down_and_keeps_small_ones(tmp_path):
  """The sweep's best/worst overlay figure: two 1600-px panels are scaled down together to
  the width bound, a tall pair to the height bound; two small ones keep their size."""
  from PIL import Image
  from lcfed_jax.run import plots
  rng = np.random.default_rng(0)
  for name, (w, h) in {"big": (1600, 700), "tall": (500, 2000), "small": (300, 200)}.items():
    paths = []
    for i in range(2):
      p = tmp_path / f"{name}{i}.png"
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
      paths.append((f"panel {i}", p))
    out = Image.open(plots.side_by_side(paths, tmp_path / f"{name}_out.png", max_width=1800, max_height=1000))
    if name == "big":
      assert 1500 <= out.width <= 1900, out.size    # 3200 px of panels -> the width bound (+ margins)
    elif name == "tall":
      assert 900 <= out.height <= 1100, out.size    # 2000 px -> the height bound (+ title)
    else:
      assert out.width >= 600, out.size             # small panels keep their size
