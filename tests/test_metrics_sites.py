"""Per-site evaluation: images and volumes against medpy, means, post-processing, policies."""
import math

import numpy as np
import pytest

from lcfed_jax.eval import metrics as M
from test_metrics import _components

binary = pytest.importorskip("medpy.metric.binary")

TOL = 1e-6


# ----------------------------------------------------------------------------------------
# evaluate_site / summarize_sites
# ----------------------------------------------------------------------------------------

def test_evaluate_site_images_match_medpy_and_means():
  rng = np.random.default_rng(11)
  n, h, w, c = 6, 40, 36, 2
  preds = np.zeros((n, h, w, c), np.uint8)
  gts = np.zeros((n, h, w, c), np.uint8)
  for i in range(n):
    for k in range(c):
      while not preds[i, ..., k].any():
        preds[i, ..., k] = _components(rng, (h, w), 3)
      while not gts[i, ..., k].any():
        gts[i, ..., k] = _components(rng, (h, w), 2)
  serial = M.evaluate_site(preds, gts, num_workers=1)
  par = M.evaluate_site(preds, gts, num_workers=2)
  edt = M.evaluate_site(preds, gts, num_workers=2, method="edt")
  for m in M.METRICS:
    assert serial[m].shape == (n, c)
    np.testing.assert_array_equal(serial[m], par[m])
    np.testing.assert_allclose(serial[m], edt[m], rtol=0, atol=TOL)
  for i in range(n):
    for k in range(c):
      p, g = preds[i, ..., k], gts[i, ..., k]
      assert abs(serial["assd"][i, k] - binary.assd(p, g)) < TOL
      assert abs(serial["hd95"][i, k] - binary.hd95(p, g)) < TOL
      assert abs(serial["iou"][i, k] - binary.jc(p, g)) < TOL
  for m in M.METRICS:
    assert serial["mean"][m] == pytest.approx(serial[m].mean(axis=1).mean())
  # largest component post-processing changes the multi-component predictions
  lc = M.evaluate_site(preds, gts, postprocess="largest_component", num_workers=1)
  for i in range(n):
    for k in range(c):
      p = M.largest_component(preds[i, ..., k])
      assert abs(lc["assd"][i, k] - binary.assd(p, gts[i, ..., k])) < TOL
  assert not np.allclose(lc["iou"], serial["iou"])


def test_evaluate_site_empty_prediction_postprocess_and_policy():
  gts = np.zeros((3, 10, 12, 1), np.uint8)
  gts[:, 2:6, 3:8] = 1
  preds = np.zeros_like(gts)
  preds[1, 2:6, 3:8] = 1
  gts[2] = 0                                       # image 2: both empty
  r = M.evaluate_site(preds, gts, num_workers=1)
  cap = M.distance_cap((10, 12))
  np.testing.assert_allclose(r["iou"][:, 0], [0.0, 1.0, 1.0])
  np.testing.assert_allclose(r["assd"][:, 0], [cap, 0.0, 0.0])
  assert r["pred_empty"][:, 0].tolist() == [True, False, True]
  assert r["gt_empty"][:, 0].tolist() == [False, False, True]
  rn = M.evaluate_site(preds, gts, empty_policy="strict_nan", num_workers=1)
  assert math.isnan(rn["assd"][0, 0]) and rn["mean"]["assd"] == pytest.approx(0.0)
  # official largest component: empty prediction -> full image
  ro = M.evaluate_site(preds, gts, postprocess="largest_component_official", num_workers=1)
  full = np.ones((10, 12), bool)
  assert ro["iou"][0, 0] == pytest.approx(binary.jc(full, gts[0, ..., 0]))
  assert abs(ro["assd"][0, 0] - binary.assd(full, gts[0, ..., 0])) < TOL
  assert not ro["pred_empty"][0, 0]
  # official baseline pixel
  rb = M.evaluate_site(preds, gts, empty_policy="official_baseline", num_workers=1)
  corner = np.zeros((10, 12), bool); corner[0, 0] = True
  assert abs(rb["assd"][0, 0] - binary.assd(corner, gts[0, ..., 0])) < TOL


def _volume_case():
  """One volume of 5 slices with a prediction that drifts through z; slices given in a
  scrambled order."""
  s, h, w = 5, 24, 24
  gt = np.zeros((s, h, w), bool)
  pred = np.zeros((s, h, w), bool)
  for z in range(s):
    gt[z, 6:18, 6:18] = True
    r = 2 + 2 * z
    pred[z, 12 - r // 2:12 + r // 2 + 1, 12 - r // 2:12 + r // 2 + 1] = True
  order = np.array([3, 0, 4, 1, 2])
  return pred, gt, order


def test_volume_grouping_uses_slice_order():
  pred, gt, order = _volume_case()
  # two volumes interleaved: vol 7 is the scrambled case, vol 2 is a simple one
  p2 = np.zeros((3, 24, 24), bool); p2[:, 5:10, 5:10] = True
  g2 = np.zeros((3, 24, 24), bool); g2[:, 6:12, 5:10] = True
  preds = np.concatenate([pred[order], p2])[..., None].astype(np.uint8)
  gts = np.concatenate([gt[order], g2])[..., None].astype(np.uint8)
  vol = np.array([7] * 5 + [2] * 3)
  sl = np.concatenate([order, [0, 1, 2]])
  perm = np.random.default_rng(0).permutation(8)      # interleave the two volumes
  preds, gts, vol, sl = preds[perm], gts[perm], vol[perm], sl[perm]

  srt = M.evaluate_site(preds, gts, unit="volume", volume_ids=vol, slice_index=sl,
                        num_workers=2)
  uns = M.evaluate_site(preds, gts, unit="volume", volume_ids=vol, slice_index=sl,
                        sort_slices=False, num_workers=1)
  assert srt["unit_ids"].tolist() == [2, 7]
  assert srt["assd"].shape == (2, 1)
  # sorted == medpy on the correctly ordered 3-D stack
  assert abs(srt["assd"][1, 0] - binary.assd(pred, gt)) < TOL
  assert abs(srt["hd95"][1, 0] - binary.hd95(pred, gt)) < TOL
  # unsorted == medpy on the stack in the given order
  given = np.flatnonzero(vol == 7)
  pu, gu = preds[given, ..., 0], gts[given, ..., 0]
  assert abs(uns["assd"][1, 0] - binary.assd(pu, gu)) < TOL
  # the order matters for ASSD but not for IoU
  assert abs(srt["assd"][1, 0] - uns["assd"][1, 0]) > 1e-3
  assert srt["iou"][1, 0] == pytest.approx(uns["iou"][1, 0])
  assert abs(srt["iou"][1, 0] - binary.jc(pred, gt)) < TOL
  # spacing is (slice, row, col)
  sp = M.evaluate_site(preds, gts, unit="volume", volume_ids=vol, slice_index=sl,
                       spacing=(3.0, 0.5, 0.5), num_workers=1)
  assert abs(sp["assd"][1, 0] - binary.assd(pred, gt, voxelspacing=(3.0, 0.5, 0.5))) < TOL


def test_volume_postprocess_per_slice():
  pred, gt, _ = _volume_case()
  pred = pred.copy()
  pred[:, 0, 0] = True                     # a stray pixel on every slice
  pred[2] = False                          # an empty slice in the middle
  preds = pred[..., None].astype(np.uint8)
  gts = gt[..., None].astype(np.uint8)
  vol = np.zeros(5, int); sl = np.arange(5)
  r = M.evaluate_site(preds, gts, unit="volume", volume_ids=vol, slice_index=sl,
                      postprocess="largest_component", num_workers=1)
  expect = np.stack([M.largest_component(s) for s in pred]).astype(bool)
  assert not expect[:, 0, 0].any() and not expect[2].any()
  assert abs(r["assd"][0, 0] - binary.assd(expect, gt)) < TOL
  ro = M.evaluate_site(preds, gts, unit="volume", volume_ids=vol, slice_index=sl,
                       postprocess="largest_component_official", num_workers=1)
  expect_o = expect.copy(); expect_o[2] = True
  assert abs(ro["assd"][0, 0] - binary.assd(expect_o, gt)) < TOL


def test_summarize_sites():
  site = lambda v: {"mean": {m: v + k for k, m in enumerate(M.METRICS)}}
  s = M.summarize_sites({"A": site(0.2), "B": site(0.6), "C": site(0.4)})
  assert s["site_names"] == ["A", "B", "C"]
  assert s["per_site"]["B"]["iou"] == pytest.approx(0.6)
  assert s["mean"]["iou"] == pytest.approx(0.4)
  assert s["mean"]["hd95"] == pytest.approx(3.4)
  assert s["std"]["dice"] == pytest.approx(np.std([0.2, 0.6, 0.4]))
  assert M.summarize_sites({"A": site(0.2), "B": site(0.6)}, ddof=1)["std"]["iou"] == \
      pytest.approx(np.std([0.2, 0.6], ddof=1))
