"""Segmentation metrics: IoU, Dice, ASSD and HD95, per image or per volume, per site.

Two parts:

* Device part (`device_overlap`): jit-friendly `jnp` counts and IoU/Dice for a batch of
  binary masks [..., H, W, C]; no Python control flow on values.
* Host part (NumPy/SciPy): `iou`, `dice`, `assd`, `hd95`, `surface_metrics`,
  `largest_component`, `evaluate_site`, `summarize_sites`.

Definitions (medpy 0.5.2 `medpy.metric.binary`, the official evaluation)
------------------------------------------------------------------------------
* IoU  = |A & B| / |A | B|                 (medpy `jc`)
* Dice = 2 |A & B| / (|A| + |B|)           (medpy `dc`)
* Surface of a mask = mask XOR binary_erosion(mask, connectivity-1 structure); the
  erosion treats everything outside the array as background, so object pixels on the
  array border are surface pixels.
* d(A->B) = for every surface pixel of A, the Euclidean distance (in `spacing` units;
  pixels/voxels when spacing is None) to the nearest surface pixel of B; this is
  `distance_transform_edt(~surface_B, sampling=spacing)[surface_A]`.
* ASSD = mean of concat(d(A->B), d(B->A))            (medpy 0.5.2 `assd`)
  Note: medpy 0.5.2 (the version compared against here) averages the concatenated
  distances. Older medpy releases took the mean of the
  two directed means instead; the two differ when the surfaces have different lengths.
  We follow the installed medpy 0.5.2, which the tests compare against.
* HD95 = 95th percentile of concat(d(A->B), d(B->A))  (medpy `hd95`)

With both masks non-empty every function equals medpy to 1e-6 (tested). They are faster
than medpy (about 4-8x per image at 256-384 px, see bench/eval_speed.py) because
(1) the surfaces and distances are computed once per pair and shared by ASSD and HD95
(medpy's `assd` + `hd95` compute four distance transforms), (2) the work is cropped to
the bounding box of the union of both masks (exact: all surface pixels lie inside, the
erosion's out-of-array value is background, which is what surrounds the box, and
Euclidean distances between points do not depend on the crop), (3) the erosion is done
by array slicing, and (4) by default (method='kdtree') the directed distances are exact
nearest-neighbour queries between the two surface point sets (scipy cKDTree), whose
cost scales with the contour length rather than the image area. method='edt' instead
uses scipy's exact Euclidean feature transform like medpy, evaluated at surface pixels
only. Both agree with medpy to rounding (tested). The per-unit work of `evaluate_site`
runs in a thread pool (scipy releases the GIL in the heavy parts; threads also avoid
pickling masks and forking a process that has JAX loaded).

Empty-mask rules (`empty_policy`)
---------------------------------
medpy raises RuntimeError in `assd`/`hd95` when either mask is empty, and returns NaN
(NumPy 2) for `dc(empty, empty)`. Here nothing raises; the rules are explicit:

=================  ======================  =========================  ==========================
policy             both empty              prediction empty only      ground truth empty only
=================  ======================  =========================  ==========================
'strict'           IoU=Dice=1, ASSD=HD95=0  IoU=Dice=0, ASSD=HD95=cap  IoU=Dice=0, ASSD=HD95=cap
'strict_nan'       IoU=Dice=1, ASSD=HD95=0  IoU=Dice=0, ASSD=HD95=NaN  IoU=Dice=0, ASSD=HD95=NaN
'official_baseline' the prediction's first pixel/voxel ([0, 0] / [0, 0, 0]) is set to 1 when
                   the prediction is empty (as the official baseline tester
                   `test_normal_unet` does), then the 'strict' rules apply to what remains
                   (so both empty -> IoU=Dice=0, ASSD/HD95 = cap because the ground
                   truth is still empty; medpy would raise there).
=================  ======================  =========================  ==========================

`cap` = the diagonal of the evaluated array in spacing units,
sqrt(sum_i (shape_i * spacing_i)^2), an upper bound on any distance inside the image.
The default ('strict') uses the cap rather than NaN-exclusion on purpose: excluding a
unit from the ASSD mean when the model predicts nothing would reward missing the object
entirely (the hardest cases silently leave the average), and NaN makes per-site means
depend on how many failures each method had. The cap keeps every unit in every mean, is
deterministic and bounds every value a non-empty prediction can get. Choose
'strict_nan' to exclude such units instead: means then use nanmean, and a site whose
every unit is NaN has mean NaN. `evaluate_site` also reports which units/classes had
an empty prediction or ground truth, so capped values can be recognised in reports.

Official behaviours (E1-E3 in docs/official_code.md), all available as options
----------------------------------------------------------------------
* Largest connected component (`largest_component`): scipy `ndimage.label` with its
  default structure, i.e. connectivity 1 (4-neighbourhood in 2-D, 6 in 3-D), exactly like
  the official `_connectivity_region_analysis` (its 3x3 cross `s` is commented out of the
  call, and it equals the default anyway). Ties between equally large components go to
  the lowest label (first in raster order), like the official `np.argmax`. An empty mask
  stays empty by default; `official_empty_behaviour=True` reproduces the official helper
  (argmax over sizes picks the background label 0, so an empty prediction becomes a
  full-image mask, E3). In `evaluate_site`: postprocess='largest_component' or
  'largest_component_official'. Applied per 2-D image and per class (for volumes: per
  slice before stacking), as the official tester does.
* Slice order (E1): `evaluate_site(..., unit='volume', sort_slices=False)` stacks the
  slices of a volume in the order they are given (the official, arbitrary `os.listdir`
  order); the default sorts by `slice_index`. spacing=None gives the official pixel /
  voxel units (z counted as 1 voxel).
* Empty polyp prediction (E2): empty_policy='official_baseline' (the LC-Fed tester itself
  would crash in medpy).

Means (as the official evaluation): per unit, mean over classes (fundus: disc and cup); per site,
mean over units; over sites, the unweighted mean of the per-site means, with the
standard deviation across sites (`summarize_sites`). IoU/Dice are fractions in [0, 1]
here (the paper prints IoU x 100); ASSD/HD95 are in spacing units.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

METRICS = ("iou", "dice", "assd", "hd95")
EMPTY_POLICIES = ("strict", "strict_nan", "official_baseline")
POSTPROCESS = ("none", "largest_component", "largest_component_official")
UNITS = ("image", "volume")
SURFACE_METHODS = ("kdtree", "edt")

Spacing = Optional[Union[float, Sequence[float]]]


# ----------------------------------------------------------------------------------------
# Device part
# ----------------------------------------------------------------------------------------

def device_overlap(pred, gt) -> Dict[str, jnp.ndarray]:
  """Per-(leading..., class) overlap counts and IoU/Dice of binary masks, on device.

  pred, gt: arrays [..., H, W, C], any dtype; nonzero = foreground. Reduces over H and W.
  Returns int32 `intersection`, `pred_sum`, `gt_sum` and float32 `iou`, `dice`, each
  shaped [..., C]. Empty rules are the host 'strict' rules: both empty -> 1, exactly one
  empty -> 0 (falls out of the formulas because the intersection is then 0).
  jit/vmap friendly: no Python control flow on values.
  """
  p = jnp.asarray(pred) != 0
  g = jnp.asarray(gt) != 0
  axes = (-3, -2)
  inter = jnp.sum(p & g, axis=axes, dtype=jnp.int32)
  ps = jnp.sum(p, axis=axes, dtype=jnp.int32)
  gs = jnp.sum(g, axis=axes, dtype=jnp.int32)
  union = ps + gs - inter
  denom = ps + gs
  interf = inter.astype(jnp.float32)
  iou_v = jnp.where(union > 0, interf / jnp.maximum(union, 1).astype(jnp.float32), 1.0)
  dice_v = jnp.where(denom > 0, 2.0 * interf / jnp.maximum(denom, 1).astype(jnp.float32), 1.0)
  return {"intersection": inter, "pred_sum": ps, "gt_sum": gs,
          "iou": iou_v.astype(jnp.float32), "dice": dice_v.astype(jnp.float32)}


# ----------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------

def _check_policy(empty_policy: str) -> None:
  if empty_policy not in EMPTY_POLICIES:
    raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")


def _as_bool_pair(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
  p = np.atleast_1d(np.asarray(pred)).astype(bool)
  g = np.atleast_1d(np.asarray(gt)).astype(bool)
  if p.shape != g.shape:
    raise ValueError(f"prediction and ground truth shapes differ: {p.shape} vs {g.shape}")
  return p, g


def _normalize_spacing(spacing: Spacing, ndim: int) -> Optional[np.ndarray]:
  if spacing is None:
    return None
  s = np.asarray(spacing, dtype=np.float64)
  if s.ndim == 0:
    s = np.full((ndim,), float(s))
  if s.shape != (ndim,):
    raise ValueError(f"spacing must be a scalar or have {ndim} entries, got {spacing!r}")
  return np.ascontiguousarray(s)


def distance_cap(shape: Sequence[int], spacing: Spacing = None) -> float:
  """Diagonal of an array of `shape` in spacing units: the ASSD/HD95 value for a unit
  where exactly one mask is empty under the 'strict' policy."""
  s = _normalize_spacing(spacing, len(shape))
  ext = np.asarray(shape, dtype=np.float64) * (1.0 if s is None else s)
  return float(math.sqrt(float(np.sum(ext * ext))))


def _apply_pred_policy(p: np.ndarray, empty_policy: str) -> np.ndarray:
  """official_baseline: an empty prediction gets its first pixel/voxel set to 1."""
  if empty_policy == "official_baseline" and not p.any():
    p = p.copy()
    p[(0,) * p.ndim] = True
  return p


def _overlap(p: np.ndarray, g: np.ndarray) -> Tuple[float, float]:
  inter = int(np.count_nonzero(p & g))
  ps = int(np.count_nonzero(p))
  gs = int(np.count_nonzero(g))
  union = ps + gs - inter
  iou_v = 1.0 if union == 0 else inter / union
  dice_v = 1.0 if ps + gs == 0 else 2.0 * inter / (ps + gs)
  return float(iou_v), float(dice_v)


def iou(pred, gt, empty_policy: str = "strict") -> float:
  """IoU (Jaccard) of two binary arrays of any rank; see the module's empty rules."""
  _check_policy(empty_policy)
  p, g = _as_bool_pair(pred, gt)
  return _overlap(_apply_pred_policy(p, empty_policy), g)[0]


def dice(pred, gt, empty_policy: str = "strict") -> float:
  """Dice of two binary arrays of any rank; see the module's empty rules."""
  _check_policy(empty_policy)
  p, g = _as_bool_pair(pred, gt)
  return _overlap(_apply_pred_policy(p, empty_policy), g)[1]


def _crop_pair(p: np.ndarray, g: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Crop both masks (union non-empty) to the union's bounding box. Exact for the
  surfaces: binary_erosion's border_value=0 equals the background around the box."""
  union = p | g
  sl = []
  for ax in range(union.ndim):
    other = tuple(i for i in range(union.ndim) if i != ax)
    idx = np.flatnonzero(union.any(axis=other) if other else union)
    sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
  sl = tuple(sl)
  return p[sl], g[sl]


def _surface(m: np.ndarray) -> np.ndarray:
  """m XOR binary_erosion(m, connectivity-1 structure, border_value=0), by slicing.

  A pixel survives the erosion iff it and its 2*ndim axis neighbours are foreground;
  pixels on the array border lose a neighbour to the (background) outside."""
  eroded = m.copy()
  for ax in range(m.ndim):
    lo = [slice(None)] * m.ndim
    hi = [slice(None)] * m.ndim
    lo[ax] = slice(0, -1)
    hi[ax] = slice(1, None)
    lo, hi = tuple(lo), tuple(hi)
    eroded[hi] &= m[lo]
    eroded[lo] &= m[hi]
    first = [slice(None)] * m.ndim
    first[ax] = 0
    eroded[tuple(first)] = False
    first[ax] = -1
    eroded[tuple(first)] = False
  return m & ~eroded


def _directed(src_border: np.ndarray, dst_border: np.ndarray,
              sampling: Optional[np.ndarray]) -> np.ndarray:
  """medpy's distance_transform_edt(~dst_border, sampling)[src_border], computed from the
  feature transform at the source surface pixels only (same arithmetic as scipy)."""
  ft = ndimage.distance_transform_edt(~dst_border, sampling=sampling,
                                      return_distances=False, return_indices=True)
  coords = np.nonzero(src_border)
  total = None
  for ax, c in enumerate(coords):
    d = (ft[ax][coords] - c.astype(np.int32)).astype(np.float64)
    if sampling is not None:
      d *= sampling[ax]
    d *= d
    total = d if total is None else total + d
  return np.sqrt(total)


def _both_directions(pb: np.ndarray, gb: np.ndarray, sampling: Optional[np.ndarray],
                     method: str) -> Tuple[np.ndarray, np.ndarray]:
  """(d(pred->gt), d(gt->pred)) from the two surfaces, in raster order of the source."""
  if method == "edt":
    return _directed(pb, gb, sampling), _directed(gb, pb, sampling)
  # 'kdtree': exact nearest neighbours between the two surface point sets; only surface
  # points are touched, so the cost scales with the contour length, not the image area.
  pa = np.argwhere(pb).astype(np.float64)
  pg = np.argwhere(gb).astype(np.float64)
  if sampling is not None:
    pa *= sampling
    pg *= sampling
  d1, _ = cKDTree(pg).query(pa, k=1)
  d2, _ = cKDTree(pa).query(pg, k=1)
  return np.asarray(d1, np.float64), np.asarray(d2, np.float64)


def _check_method(method: str) -> None:
  if method not in SURFACE_METHODS:
    raise ValueError(f"method must be one of {SURFACE_METHODS}, got {method!r}")


def surface_distances(pred, gt, spacing: Spacing = None,
                      method: str = "kdtree") -> Tuple[np.ndarray, np.ndarray]:
  """(d(pred->gt), d(gt->pred)): surface distances as medpy's private
  `__surface_distances(pred, gt)` and `__surface_distances(gt, pred)`.
  Both masks must be non-empty (ValueError otherwise). method: 'kdtree' (default,
  nearest neighbours between the surface point sets) or 'edt' (medpy's Euclidean
  distance transform, evaluated at surface pixels only); both exact."""
  _check_method(method)
  p, g = _as_bool_pair(pred, gt)
  if not p.any() or not g.any():
    raise ValueError("surface_distances needs two non-empty masks; use surface_metrics "
                     "for the empty-mask rules")
  s = _normalize_spacing(spacing, p.ndim)
  pc, gc = _crop_pair(p, g)
  pb, gb = _surface(pc), _surface(gc)
  return _both_directions(pb, gb, s, method)


def surface_metrics(pred, gt, spacing: Spacing = None, empty_policy: str = "strict",
                    method: str = "kdtree") -> Dict[str, float]:
  """{'assd', 'hd95'} of two binary 2-D or 3-D arrays, sharing the distance transforms.

  Equal to medpy `assd`/`hd95` (voxelspacing=spacing, connectivity=1) when both masks
  are non-empty; otherwise the module's empty rules for `empty_policy`.
  """
  _check_policy(empty_policy)
  _check_method(method)
  p, g = _as_bool_pair(pred, gt)
  p = _apply_pred_policy(p, empty_policy)
  pe, ge = not p.any(), not g.any()
  if pe and ge:
    return {"assd": 0.0, "hd95": 0.0}
  if pe or ge:
    v = float("nan") if empty_policy == "strict_nan" else distance_cap(p.shape, spacing)
    return {"assd": v, "hd95": v}
  d1, d2 = surface_distances(p, g, spacing, method)
  return {"assd": float(np.concatenate([d1, d2]).mean()),
          "hd95": float(np.percentile(np.hstack((d1, d2)), 95))}


def assd(pred, gt, spacing: Spacing = None, empty_policy: str = "strict",
         method: str = "kdtree") -> float:
  """Average symmetric surface distance (medpy `assd`); see surface_metrics."""
  return surface_metrics(pred, gt, spacing, empty_policy, method)["assd"]


def hd95(pred, gt, spacing: Spacing = None, empty_policy: str = "strict",
         method: str = "kdtree") -> float:
  """95th-percentile symmetric Hausdorff distance (medpy `hd95`); see surface_metrics."""
  return surface_metrics(pred, gt, spacing, empty_policy, method)["hd95"]


def largest_component(mask, official_empty_behaviour: bool = False) -> np.ndarray:
  """Keep the largest connected component (connectivity 1, scipy's default structure).

  Returns uint8 of mask's shape. Ties go to the lowest label (raster order). An empty
  mask stays empty, unless official_empty_behaviour=True, which reproduces the official
  `_connectivity_region_analysis`: an empty mask becomes all ones (E3 in docs/official_code.md).
  """
  m = np.asarray(mask) != 0
  labels, n = ndimage.label(m)
  if n == 0:
    return (np.ones_like(m, dtype=np.uint8) if official_empty_behaviour
            else np.zeros_like(m, dtype=np.uint8))
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  sizes[0] = 0
  return (labels == int(np.argmax(sizes))).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Per-site evaluation
# ----------------------------------------------------------------------------------------

def _postprocess_2d(p2: np.ndarray, postprocess: str) -> np.ndarray:
  if postprocess == "none":
    return p2
  return largest_component(
      p2, official_empty_behaviour=(postprocess == "largest_component_official")) != 0


def _eval_unit(pred_u: np.ndarray, gt_u: np.ndarray, postprocess: str, empty_policy: str,
               spacing: Spacing, method: str) -> np.ndarray:
  """pred_u, gt_u: bool [H, W, C] or [S, H, W, C]. Returns float64 [6, C]:
  iou, dice, assd, hd95, pred_empty, gt_empty (emptiness after post-processing and
  before the official_baseline pixel)."""
  num_classes = pred_u.shape[-1]
  out = np.zeros((6, num_classes), dtype=np.float64)
  for c in range(num_classes):
    p = pred_u[..., c]
    g = gt_u[..., c]
    if postprocess != "none":
      if p.ndim == 2:
        p = _postprocess_2d(p, postprocess)
      else:
        p = np.stack([_postprocess_2d(s, postprocess) for s in p], axis=0)
    out[4, c] = not p.any()
    out[5, c] = not g.any()
    p = _apply_pred_policy(p, empty_policy)
    out[0, c], out[1, c] = _overlap(p, g)
    sm = surface_metrics(p, g, spacing, empty_policy, method)
    out[2, c], out[3, c] = sm["assd"], sm["hd95"]
  return out


def _nanmean(x, axis=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    return np.nanmean(x, axis=axis)


def default_num_workers() -> int:
  """Threads for the per-unit surface work (scipy's EDT / cKDTree release the GIL; see
  bench/eval_speed.py for serial vs threads vs processes on this machine)."""
  return max(1, min(8, os.cpu_count() or 1))


def evaluate_site(preds, gts, *, unit: str = "image", volume_ids=None, slice_index=None,
                  postprocess: str = "none", empty_policy: str = "strict",
                  spacing: Spacing = None, sort_slices: bool = True,
                  num_workers: Optional[int] = None,
                  method: str = "kdtree") -> Dict[str, object]:
  """Evaluate one site's thresholded predictions.

  preds, gts: {0,1} arrays [N, H, W, C] (thresholding is the caller's job).
  unit: 'image' (one unit per image) or 'volume' (slices grouped by `volume_ids`, stacked
    along a new leading axis in `slice_index` order when sort_slices=True, or in the given
    order when False (official, E1); metrics are then 3-D).
  postprocess: 'none', 'largest_component' (empty stays empty) or
    'largest_component_official' (empty -> full image), per 2-D image and class.
  empty_policy: see the module docstring.
  spacing: None (pixel/voxel units), a scalar or per-axis spacing of a unit: (row, col)
    for images, (slice, row, col) for volumes.
  num_workers: threads for the per-unit work; None = default_num_workers(), 1 = serial.
  method: surface-distance algorithm, 'kdtree' (default) or 'edt'; both exact.

  Returns a dict with
    'iou', 'dice', 'assd', 'hd95': float64 [num_units, C];
    'pred_empty', 'gt_empty': bool [num_units, C] (prediction after post-processing);
    'unit_ids': int64 [num_units] (image index, or volume id in ascending order);
    'mean': {metric: float}: mean over classes, then over units (nanmean);
    'class_mean': {metric: float64 [C]}: mean over units per class (nanmean);
    'num_units', 'unit', 'postprocess', 'empty_policy'.
  """
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
  if postprocess not in POSTPROCESS:
    raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
  _check_policy(empty_policy)
  _check_method(method)
  preds = np.asarray(preds)
  gts = np.asarray(gts)
  if preds.ndim != 4 or preds.shape != gts.shape:
    raise ValueError("preds and gts must both be [N, H, W, C] with equal shapes, got "
                     f"{preds.shape} and {gts.shape}")
  preds = preds != 0
  gts = gts != 0
  n, num_classes = preds.shape[0], preds.shape[-1]

  if unit == "image":
    unit_ids = np.arange(n, dtype=np.int64)
    members = [np.array([i]) for i in range(n)]
  else:
    if volume_ids is None:
      raise ValueError("unit='volume' needs volume_ids")
    volume_ids = np.asarray(volume_ids).reshape(-1)
    if volume_ids.shape[0] != n:
      raise ValueError(f"volume_ids has {volume_ids.shape[0]} entries for {n} slices")
    if sort_slices:
      if slice_index is None:
        raise ValueError("sort_slices=True needs slice_index")
      slice_index = np.asarray(slice_index).reshape(-1)
      if slice_index.shape[0] != n:
        raise ValueError(f"slice_index has {slice_index.shape[0]} entries for {n} slices")
    unit_ids = np.unique(volume_ids).astype(np.int64)
    members = []
    for v in unit_ids:
      idx = np.flatnonzero(volume_ids == v)          # given order
      if sort_slices:
        idx = idx[np.argsort(slice_index[idx], kind="stable")]
      members.append(idx)

  def work(idx):
    if unit == "image":
      return _eval_unit(preds[idx[0]], gts[idx[0]], postprocess, empty_policy, spacing,
                        method)
    return _eval_unit(preds[idx], gts[idx], postprocess, empty_policy, spacing, method)

  workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
  workers = min(workers, max(1, len(members)))
  if workers == 1:
    results = [work(m) for m in members]
  else:
    with ThreadPoolExecutor(max_workers=workers) as ex:
      results = list(ex.map(work, members))

  stacked = (np.stack(results, axis=0) if results
             else np.zeros((0, 6, num_classes), dtype=np.float64))
  out: Dict[str, object] = {}
  for k, name in enumerate(METRICS):
    out[name] = stacked[:, k, :]
  out["pred_empty"] = stacked[:, 4, :].astype(bool)
  out["gt_empty"] = stacked[:, 5, :].astype(bool)
  out["unit_ids"] = unit_ids
  out["mean"] = {m: (float(_nanmean(_nanmean(out[m], axis=1)))
                     if len(results) else float("nan")) for m in METRICS}
  out["class_mean"] = {m: _nanmean(out[m], axis=0) if len(results)
                       else np.full((num_classes,), np.nan) for m in METRICS}
  out["num_units"] = len(results)
  out["unit"] = unit
  out["postprocess"] = postprocess
  out["empty_policy"] = empty_policy
  return out


def summarize_sites(site_results: Mapping[str, Mapping[str, object]],
                    ddof: int = 0) -> Dict[str, object]:
  """Per-site means, the unweighted mean over sites and the std across sites.

  site_results: {site name: evaluate_site result} (anything with a 'mean' dict works).
  Returns {'site_names': [...], 'per_site': {site: {metric: mean}},
           'mean': {metric: unweighted mean over sites},
           'std': {metric: std across site means (ddof, default 0 = population)}}.
  A NaN site mean (possible only with 'strict_nan') propagates to 'mean' and 'std'.
  """
  names = list(site_results.keys())
  per_site = {s: {m: float(site_results[s]["mean"][m]) for m in METRICS} for s in names}
  mean, std = {}, {}
  for m in METRICS:
    vals = np.array([per_site[s][m] for s in names], dtype=np.float64)
    mean[m] = float(np.mean(vals)) if len(vals) else float("nan")
    std[m] = float(np.std(vals, ddof=ddof)) if len(vals) > ddof else float("nan")
  return {"site_names": names, "per_site": per_site, "mean": mean, "std": std}
