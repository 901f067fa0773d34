"""Tables over seeds and the paper's orderings read off them."""
import numpy as np
import pytest

from lcfed_jax.run import orderings, tables

SITES = ["a", "b"]


def _result(method, iou, stage_a=None):
  sites = {s: {"iou": v, "dice": v, "assd": 1.0 - v, "hd95": 2.0} for s, v in zip(SITES, iou)}
  r = {"method": method, "task": "t", "site_names": SITES, "selection": "val", "sites": sites,
       "mean": {m: float(np.mean([sites[s][m] for s in SITES])) for m in ("iou", "dice", "assd", "hd95")},
       "std": {m: 0.0 for m in ("iou", "dice", "assd", "hd95")}}
  if stage_a is not None:
    r["earlier_stages"] = [dict(_result(method, stage_a), stage="A")]
  return r


def _table(tmp_path, per_method):
  results = tables.with_stage_rows(per_method)
  path = tmp_path / "results.csv"
  path.write_text(tables.to_csv(results))
  return tables.read_csv(path), results


def test_stage_rows_and_orderings_match_a_direct_computation(tmp_path):
  rng = np.random.default_rng(0)
  seeds = (0, 1, 2)
  iou = {"lcfed": 0.80, "fedavg": 0.70, "fedrep": 0.795, "local": 0.90}
  per = {m: {s: _result(m, [v + 0.01 * rng.normal(), v + 0.01 * rng.normal()],
                        stage_a=[0.5, 0.5] if m == "lcfed" else None) for s in seeds} for m, v in iou.items()}
  table, results = _table(tmp_path, per)
  assert list(results)[:2] == ["lcfed", "lcfed (stage A)"]
  out = {r["claim"]: r for r in orderings.evaluate(table)}
  assert set(out) == {"lcfed > fedrep", "lcfed > fedavg", "lcfed > local", "fedrep > fedavg",
                      "fedrep > local", "fedavg > local", "lcfed > lcfed (stage A)"}
  for claim, r in out.items():
    a, b = claim.split(" > ")
    va = [per[a][s]["mean"]["iou"] for s in seeds] if a in per else None
    vb = ([per[b][s]["mean"]["iou"] for s in seeds] if b in per
          else [per["lcfed"][s]["earlier_stages"][0]["mean"]["iou"] for s in seeds])
    diff = np.mean(va) - np.mean(vb)
    margin = 2 * max(np.std(va, ddof=1), np.std(vb, ddof=1))
    want = "holds" if diff > margin else "reversed" if diff < -margin else "not separable"
    assert r["verdict"] == want and r["diff"] == pytest.approx(diff), claim
  assert out["lcfed > fedavg"]["verdict"] == "holds" and out["lcfed > local"]["verdict"] == "reversed"
  assert out["lcfed > lcfed (stage A)"]["verdict"] == "holds"
  md = orderings.to_markdown(orderings.evaluate(table), "iou")
  assert "| lcfed > local |" in md and "reversed" in md


def test_lower_is_better_for_distances():
  assert orderings.verdict((1.0, 0.1), (2.0, 0.1), higher_is_better=False)[0] == "holds"
  assert orderings.verdict((1.0, 0.3), (1.5, 0.3), higher_is_better=False)[0] == "not separable"


def test_an_ablation_reads_against_its_default_row(tmp_path):
  seeds = (0, 1, 2)
  iou = {"lcfed": 0.80, "lcfed[x=1]": 0.70, "lcfed[x=2]": 0.90, "lcfed[x=3]": 0.801}
  per = {m: {s: _result(m, [v + 0.002 * s, v + 0.002 * s], stage_a=[0.6, 0.6] if m == "lcfed" else None)
             for s in seeds} for m, v in iou.items()}
  table, _ = _table(tmp_path, per)
  out = {r["claim"]: r["verdict"] for r in orderings.evaluate(table, against="lcfed")}
  assert out == {"lcfed > lcfed[x=1]": "holds", "lcfed > lcfed[x=2]": "reversed",
                 "lcfed > lcfed[x=3]": "not separable", "lcfed > lcfed (stage A)": "holds"}
  with pytest.raises(orderings.UserError, match="--against nope: no such row"):
    orderings.evaluate(table, against="nope")
  assert "default > variant (iou)" in orderings.to_markdown(orderings.evaluate(table, "iou", "lcfed"), "iou", "lcfed")
