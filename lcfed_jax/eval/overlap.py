"""Overlap metrics: IoU and Dice on the device (`device_overlap`, jit-friendly counts) and
on the host, with the explicit empty-mask rules of `lcfed_jax.eval.metrics`."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

METRICS = ("iou", "dice", "assd", "hd95")
EMPTY_POLICIES = ("strict", "strict_nan", "official_baseline")

Spacing = Optional[Union[float, Sequence[float]]]


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
