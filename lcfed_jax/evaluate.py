"""Evaluation of every site on its own test split, with its own model.

Predictions are made on the device for all sites at once (`engine.make_predict_fn`),
thresholded at 0.5 there, and come to the host as uint8 masks; `lcfed_jax.metrics`
then applies the task's post-processing and evaluation unit (per image, or per volume
for prostate) and computes IoU, Dice, ASSD and HD95 (medpy definitions).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from lcfed_jax import metrics

METRICS = ("iou", "dice", "assd", "hd95")


def trivial_baselines(data) -> Dict[str, float]:
  """Mean IoU over sites of predicting all foreground and all background."""
  fg, bg = [], []
  for split in data.test:
    gt = split.masks.astype(bool)
    fg.append(np.mean([metrics.iou(np.ones_like(g), g) for g in gt]))
    bg.append(np.mean([metrics.iou(np.zeros_like(g), g) for g in gt]))
  return {"all_foreground": float(np.mean(fg)), "all_background": float(np.mean(bg))}


def postprocess_name(data, config) -> str:
  if data.postprocess == "largest_component" and config.eval.get("lcc_official", False):
    return "largest_component_official"
  return data.postprocess


def score_predictions(preds: np.ndarray, splits, data, config, site_names=None) -> Dict:
  """preds: uint8 [K, N_pad, H, W, nc] (padding rows past each split's length ignored)."""
  site_names = site_names or data.site_names
  results = {}
  for k, name in enumerate(site_names):
    split = splits[k]
    results[name] = metrics.evaluate_site(
        preds[k, :len(split)], split.masks, unit=data.eval_unit, volume_ids=split.volume_ids,
        slice_index=split.slice_index, postprocess=postprocess_name(data, config),
        empty_policy=config.eval.get("empty_policy", "strict"),
        sort_slices=config.eval.get("sort_slices", True))
  summary = metrics.summarize_sites(results)
  return {"sites": summary["per_site"], "mean": summary["mean"], "std": summary["std"],
          "_per_unit": results}


def evaluate(predict_fn, state, arrays, splits, data, config) -> Dict:
  out = predict_fn(state.params, state.model_state, arrays.images)
  result = score_predictions(np.asarray(out["pred"]), splits, data, config)
  result.pop("_per_unit")
  return result


def format_line(record, site_names) -> str:
  per = " ".join(f"{n}={record['sites'][n]['iou']:.4f}" for n in site_names)
  m = record["mean"]
  return (f"eval round {record['round']}: IoU {per} | mean IoU {m['iou']:.4f} "
          f"Dice {m['dice']:.4f} ASSD {m['assd']:.2f} HD95 {m['hd95']:.2f}")
