"""Evaluation of every site on its own test split, with its own model."""
from __future__ import annotations

from typing import Dict

import numpy as np


def _iou_dice(pred: np.ndarray, gt: np.ndarray):
  """Per example and class; both empty counts as a perfect match."""
  axes = (1, 2)
  inter = np.sum(pred & gt, axis=axes).astype(np.float64)
  ps = np.sum(pred, axis=axes).astype(np.float64)
  gs = np.sum(gt, axis=axes).astype(np.float64)
  union = ps + gs - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  dice = np.where(ps + gs > 0, 2 * inter / np.maximum(ps + gs, 1), 1.0)
  return iou, dice


def trivial_baselines(data) -> Dict[str, float]:
  """Mean IoU over sites of predicting all foreground and all background."""
  fg, bg = [], []
  for split in data.test:
    gt = split.masks.astype(bool)
    fg.append(np.mean(_iou_dice(np.ones_like(gt), gt)[0]))
    bg.append(np.mean(_iou_dice(np.zeros_like(gt), gt)[0]))
  return {"all_foreground": float(np.mean(fg)), "all_background": float(np.mean(bg))}


def evaluate(predict_fn, state, test_arrays, data, config) -> Dict:
  out = predict_fn(state.params, state.model_state, test_arrays.images)
  preds = np.asarray(out["pred"]).astype(bool)
  sites = {}
  for k, name in enumerate(data.site_names):
    split = data.test[k]
    iou, dice = _iou_dice(preds[k, :len(split)], split.masks.astype(bool))
    sites[name] = {"iou": float(np.mean(iou)), "dice": float(np.mean(dice))}
  keys = ("iou", "dice")
  mean = {m: float(np.mean([s[m] for s in sites.values()])) for m in keys}
  std = {m: float(np.std([s[m] for s in sites.values()])) for m in keys}
  return {"sites": sites, "mean": mean, "std": std}


def format_line(record, site_names) -> str:
  per = " ".join(f"{n}={record['sites'][n]['iou']:.4f}" for n in site_names)
  return (f"eval round {record['round']}: IoU {per} | mean IoU {record['mean']['iou']:.4f} "
          f"Dice {record['mean']['dice']:.4f}")
