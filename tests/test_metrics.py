"""Metrics: medpy equality, empty-mask rules, largest component, per-volume grouping."""
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from lcfed_jax.eval import metrics as M

binary = pytest.importorskip("medpy.metric.binary")

TOL = 1e-6


# ----------------------------------------------------------------------------------------
# Random mask generators (deterministic)
# ----------------------------------------------------------------------------------------

def _blob(rng, shape, sigma, thr):
  x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return x > thr * x.std()


def _components(rng, shape, k):
  m = np.zeros(shape, bool)
  grids = np.indices(shape)
  for _ in range(k):
    c = [rng.uniform(0, n) for n in shape]
    r = rng.uniform(1, max(2.0, min(shape) / 4))
    d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
    m |= d2 <= r * r
  return m


def _thin(rng, shape):
  m = np.zeros(shape, bool)
  for _ in range(rng.integers(1, 4)):
    if rng.random() < 0.5:
      m[(slice(None),) * (len(shape) - 1) + (rng.integers(0, shape[-1]),)] = True
    else:                     # diagonal one-pixel line (connectivity-1 disconnected)
      n = min(shape[-2:])
      o = rng.integers(0, n)
      idx = np.arange(n)
      m[..., idx, (idx + o) % shape[-1]] = True
  return m


def _holes(rng, shape):
  m = _components(rng, shape, 1) | _blob(rng, shape, 3.0, -0.5)
  return m & ~_blob(rng, shape, 1.0, 1.2)


def _random_mask(rng, shape):
  kind = rng.integers(0, 4)
  if kind == 0:
    return _blob(rng, shape, rng.uniform(1, 4), rng.uniform(-0.5, 1.5))
  if kind == 1:
    return _components(rng, shape, int(rng.integers(1, 5)))
  if kind == 2:
    return _thin(rng, shape)
  return _holes(rng, shape)


def _pairs(seed, n, ndim):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    if ndim == 2:
      shape = (int(rng.integers(5, 70)), int(rng.integers(5, 70)))
    else:
      shape = (int(rng.integers(2, 12)), int(rng.integers(5, 30)), int(rng.integers(5, 30)))
    a, b = _random_mask(rng, shape), _random_mask(rng, shape)
    if rng.random() < 0.15:          # related pair: shifted copy
      b = np.roll(a, int(rng.integers(-3, 4)), axis=-1)
    if not a.any() or not b.any():
      continue
    spacing = None if rng.random() < 0.5 else tuple(rng.uniform(0.3, 3.0, ndim))
    out.append((a, b, spacing))
  return out


# ----------------------------------------------------------------------------------------
# Equality with medpy
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", M.SURFACE_METHODS)
@pytest.mark.parametrize("ndim,seed,n", [(2, 0, 120), (3, 1, 50)])
def test_matches_medpy_random(ndim, seed, n, method):
  for a, b, sp in _pairs(seed, n, ndim):
    sm = M.surface_metrics(a, b, sp, method=method)
    assert abs(sm["assd"] - binary.assd(a, b, voxelspacing=sp)) < TOL
    assert abs(sm["hd95"] - binary.hd95(a, b, voxelspacing=sp)) < TOL
    assert abs(M.assd(b, a, sp) - binary.assd(b, a, voxelspacing=sp)) < TOL
    assert abs(M.hd95(a, b, sp) - binary.hd95(a, b, voxelspacing=sp)) < TOL
    assert abs(M.iou(a, b) - binary.jc(a, b)) < TOL
    assert abs(M.dice(a, b) - binary.dc(a, b)) < TOL


def test_matches_medpy_on_touching_border_and_anchor_squares():
  # Object touching the array border: erosion treats outside as background.
  a = np.zeros((30, 40), bool); a[0:12, 0:15] = True
  b = np.zeros((30, 40), bool); b[5:30, 10:40] = True
  for sp in (None, (0.5, 2.0), 1.7):
    for method in M.SURFACE_METHODS:
      assert abs(M.assd(a, b, sp, method=method) - binary.assd(a, b, voxelspacing=sp)) < TOL
      assert abs(M.hd95(a, b, sp, method=method) - binary.hd95(a, b, voxelspacing=sp)) < TOL
  # medpy 0.5.2 on two shifted 20x20 squares -> dc 0.72, jc 0.5625, assd 2.8193, hd95 4.0
  a = np.zeros((64, 64), bool); a[10:30, 10:30] = True
  b = np.zeros((64, 64), bool); b[12:32, 14:34] = True
  assert M.dice(a, b) == pytest.approx(0.72)
  assert M.iou(a, b) == pytest.approx(0.5625)
  assert M.assd(a, b) == pytest.approx(2.8193, abs=1e-4)
  assert M.hd95(a, b) == pytest.approx(4.0)


@pytest.mark.parametrize("method", M.SURFACE_METHODS)
def test_surface_distances_match_directed_medpy(method):
  for a, b, sp in _pairs(7, 20, 2):
    d1, d2 = M.surface_distances(a, b, sp, method=method)
    assert abs(d1.mean() - binary.asd(a, b, voxelspacing=sp)) < TOL
    assert abs(d2.mean() - binary.asd(b, a, voxelspacing=sp)) < TOL


# ----------------------------------------------------------------------------------------
# Empty-mask rules
# ----------------------------------------------------------------------------------------

def _edge_cases(shape):
  empty = np.zeros(shape, bool)
  single = np.zeros(shape, bool); single[tuple(s // 2 for s in shape)] = True
  full = np.ones(shape, bool)
  blob = np.zeros(shape, bool); blob[tuple(slice(1, max(2, s - 2)) for s in shape)] = True
  return empty, single, full, blob


@pytest.mark.parametrize("shape,spacing", [((16, 20), None), ((16, 20), (2.0, 0.5)),
                                           ((3, 8, 9), None), ((3, 8, 9), (3.0, 1.0, 1.0))])
def test_empty_rules_strict(shape, spacing):
  empty, single, full, blob = _edge_cases(shape)
  cap = math.sqrt(sum((n * (1.0 if spacing is None else s)) ** 2
                      for n, s in zip(shape, spacing or [1] * len(shape))))
  assert M.distance_cap(shape, spacing) == pytest.approx(cap)
  # both empty
  assert M.iou(empty, empty) == 1.0 and M.dice(empty, empty) == 1.0
  assert M.surface_metrics(empty, empty, spacing) == {"assd": 0.0, "hd95": 0.0}
  # prediction empty / gt empty
  for p, g in ((empty, blob), (blob, empty), (empty, single), (full, empty)):
    assert M.iou(p, g) == 0.0 and M.dice(p, g) == 0.0
    sm = M.surface_metrics(p, g, spacing)
    assert sm["assd"] == pytest.approx(cap) and sm["hd95"] == pytest.approx(cap)
  # non-empty edge cases still equal medpy
  for p, g in ((single, single), (full, full), (single, full), (full, blob), (single, blob)):
    sm = M.surface_metrics(p, g, spacing)
    assert abs(sm["assd"] - binary.assd(p, g, voxelspacing=spacing)) < TOL
    assert abs(sm["hd95"] - binary.hd95(p, g, voxelspacing=spacing)) < TOL
    assert abs(M.iou(p, g) - binary.jc(p, g)) < TOL
  assert M.surface_metrics(single, single) == {"assd": 0.0, "hd95": 0.0}
  assert M.iou(full, full) == 1.0


def test_empty_rules_strict_nan():
  empty, single, full, blob = _edge_cases((12, 14))
  assert M.surface_metrics(empty, empty, empty_policy="strict_nan") == {"assd": 0.0,
                                                                       "hd95": 0.0}
  for p, g in ((empty, blob), (blob, empty)):
    sm = M.surface_metrics(p, g, empty_policy="strict_nan")
    assert math.isnan(sm["assd"]) and math.isnan(sm["hd95"])
    assert M.iou(p, g, "strict_nan") == 0.0 and M.dice(p, g, "strict_nan") == 0.0
  assert M.iou(empty, empty, "strict_nan") == 1.0


def test_empty_rules_official_baseline():
  empty, single, full, blob = _edge_cases((12, 14))
  corner = np.zeros((12, 14), bool); corner[0, 0] = True
  # prediction empty -> pixel [0, 0] set, then medpy on the result
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for g in (blob, single, full):
      assert M.iou(empty, g, "official_baseline") == pytest.approx(binary.jc(corner, g))
      assert M.dice(empty, g, "official_baseline") == pytest.approx(binary.dc(corner, g))
      sm = M.surface_metrics(empty, g, empty_policy="official_baseline")
      assert abs(sm["assd"] - binary.assd(corner, g)) < TOL
      assert abs(sm["hd95"] - binary.hd95(corner, g)) < TOL
    # both empty: the pixel makes IoU 0 and the gt is still empty -> cap
    assert M.iou(empty, empty, "official_baseline") == 0.0
    assert M.surface_metrics(empty, empty, empty_policy="official_baseline")["assd"] == \
        pytest.approx(M.distance_cap((12, 14)))
    # gt empty, prediction non-empty: cap, no exception
    assert M.surface_metrics(blob, empty, empty_policy="official_baseline")["hd95"] == \
        pytest.approx(M.distance_cap((12, 14)))
  # input not modified
  assert not empty.any()


def test_bad_policy_and_shape_raise():
  a = np.ones((4, 4), bool)
  with pytest.raises(ValueError):
    M.iou(a, a, "nope")
  with pytest.raises(ValueError):
    M.surface_metrics(a, np.ones((4, 5)))
  with pytest.raises(ValueError):
    M.assd(a, a, spacing=(1.0, 2.0, 3.0))


# ----------------------------------------------------------------------------------------
# Largest component
# ----------------------------------------------------------------------------------------

def _official_cra(mask):
  """The official `_connectivity_region_analysis` (utils/util.py), verbatim logic."""
  label_im, nb_labels = ndimage.label(mask)
  sizes = ndimage.sum(mask, label_im, range(nb_labels + 1))
  label_im[label_im != np.argmax(sizes)] = 0
  label_im[label_im == np.argmax(sizes)] = 1
  return label_im


def test_largest_component_semantics():
  m = np.zeros((10, 10), np.uint8)
  m[0:3, 0:3] = 1            # 9 px
  m[5:9, 5:9] = 1            # 16 px
  m[3, 3] = 1                # diagonal neighbour of the 9-px block: separate (conn. 1)
  out = M.largest_component(m)
  assert out.dtype == np.uint8 and out.sum() == 16 and out[5:9, 5:9].all()
  # diagonal-only touching: connectivity 1 splits them
  d = np.zeros((6, 6), np.uint8); d[0:2, 0:2] = 1; d[2:5, 2:5] = 1
  assert M.largest_component(d).sum() == 9
  # tie -> first in raster order
  t = np.zeros((6, 6), np.uint8); t[0, 0:2] = 1; t[4, 3:5] = 1
  assert M.largest_component(t)[0, 0] == 1 and M.largest_component(t).sum() == 2
  # empty mask: stays empty by default, becomes all ones officially (E3)
  e = np.zeros((7, 9), np.uint8)
  assert M.largest_component(e).sum() == 0
  assert M.largest_component(e, official_empty_behaviour=True).sum() == 63


def test_largest_component_matches_official_helper():
  rng = np.random.default_rng(3)
  for i in range(40):
    m = _random_mask(rng, (int(rng.integers(5, 40)), int(rng.integers(5, 40))))
    if i % 10 == 0:
      m[:] = False
    ref = _official_cra(m.astype(np.uint8))
    assert np.array_equal(M.largest_component(m, official_empty_behaviour=True), ref)
    if m.any():
      assert np.array_equal(M.largest_component(m), ref)


# ----------------------------------------------------------------------------------------
# Device overlap
# ----------------------------------------------------------------------------------------

def test_device_overlap_equals_host():
  import jax
  rng = np.random.default_rng(5)
  p = np.stack([_random_mask(rng, (24, 20)) for _ in range(6)]).reshape(3, 2, 24, 20)
  g = np.stack([_random_mask(rng, (24, 20)) for _ in range(6)]).reshape(3, 2, 24, 20)
  p[0, 0] = False; g[0, 0] = False          # both empty
  p[0, 1] = False                           # prediction empty
  g[1, 0] = False                           # gt empty
  pr = np.moveaxis(p, 1, -1).astype(np.uint8)[None]    # [1, 3, 24, 20, C=2]
  gr = np.moveaxis(g, 1, -1).astype(np.uint8)[None]
  out = jax.jit(M.device_overlap)(pr, gr)
  assert out["iou"].shape == (1, 3, 2)
  for i in range(3):
    for c in range(2):
      assert abs(float(out["iou"][0, i, c]) - M.iou(p[i, c], g[i, c])) < TOL
      assert abs(float(out["dice"][0, i, c]) - M.dice(p[i, c], g[i, c])) < TOL
      assert int(out["intersection"][0, i, c]) == int((p[i, c] & g[i, c]).sum())
      assert int(out["pred_sum"][0, i, c]) == int(p[i, c].sum())
      assert int(out["gt_sum"][0, i, c]) == int(g[i, c].sum())
  assert float(out["iou"][0, 0, 0]) == 1.0 and float(out["dice"][0, 0, 1]) == 0.0
