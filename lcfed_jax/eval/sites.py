"""Per-unit and per-site evaluation: post-processing (largest component), units (images
or volumes), means over classes, units and sites; see `lcfed_jax.eval.metrics`."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Mapping, Optional

import numpy as np
from scipy import ndimage

from lcfed_jax.eval.overlap import METRICS, Spacing, _apply_pred_policy, _check_policy, _overlap
from lcfed_jax.eval.surface import _check_method, surface_metrics

POSTPROCESS = ("none", "largest_component", "largest_component_official")
UNITS = ("image", "volume")


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


# Per-site evaluation

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
