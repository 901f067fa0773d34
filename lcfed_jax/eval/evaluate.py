"""Evaluation of every site on its own test split, with its own model.

Predictions are made on the device for all sites at once (`engine.make_predict_fn`),
thresholded at 0.5 there, and come to the host as uint8 masks, each process reading
only the rows of the sites on its own devices; `lcfed_jax.metrics` then applies the
task's post-processing and evaluation unit (per image, or per volume for prostate) and
computes IoU, Dice, ASSD and HD95 (medpy definitions). On several hosts the per-site
means are gathered, so every process holds the same summary.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import numpy as np

from lcfed_jax.eval import metrics
from lcfed_jax.data.types import SiteSplit
from lcfed_jax.fed import sharding

def trivial_baselines(data) -> Dict[str, float]:
  """Mean IoU over sites of predicting all foreground and all background (each process
  scores the test splits it holds)."""
  local = {}
  for k, split in enumerate(data.test):
    if split is not None:
      gt = split.masks.astype(bool)
      local[k] = (np.mean([metrics.iou(np.ones_like(g), g) for g in gt]),
                  np.mean([metrics.iou(np.zeros_like(g), g) for g in gt]))
  per_site = sharding.merge_sites(local)
  fg, bg = zip(*(per_site[k] for k in range(data.num_sites)))
  return {"all_foreground": float(np.mean(fg)), "all_background": float(np.mean(bg))}


def postprocess_name(data, config) -> str:
  if data.postprocess == "largest_component" and config.eval.lcc_official:
    return "largest_component_official"
  return data.postprocess


def score_predictions(preds: Mapping[int, np.ndarray], splits, data, config) -> Dict:
  """preds: {site index: uint8 [N_pad, H, W, nc]} for the sites this process holds
  (`splits[k]` not None; padding rows past the split's length are ignored). Every process
  returns the same summary of all sites: the per-site means are gathered. Besides each
  metric's site mean, a site reports `<metric>_std`: the std over its units (images or
  volumes), how much the method varies inside that site."""
  local = {k: score_site(pred, splits[k], data, config) for k, pred in preds.items()}
  gathered = sharding.merge_sites(local)
  missing = [data.site_names[k] for k in range(data.num_sites) if k not in gathered]
  if missing:
    raise RuntimeError(f"no process scored the sites {missing}")
  return summarize({n: gathered[k] for k, n in enumerate(data.site_names)})


def score_site(pred: np.ndarray, split, data, config) -> Tuple[Dict, Dict]:
  """(metric means, `<metric>_std` spreads over units) of one site's uint8 predictions
  [N_pad, H, W, nc] on its split (padding rows past the split's length are ignored)."""
  res = metrics.evaluate_site(
      pred[:len(split)], split.masks, unit=data.eval_unit, volume_ids=split.volume_ids,
      slice_index=split.slice_index, postprocess=postprocess_name(data, config),
      empty_policy=config.eval.empty_policy, sort_slices=config.eval.sort_slices)
  spread = {f"{m}_std": float(np.nanstd(np.nanmean(res[m], axis=1))) for m in metrics.METRICS}
  return res["mean"], spread


def summarize(per_site: Mapping[str, Tuple[Dict, Dict]]) -> Dict:
  """{'sites', 'mean', 'std'} from every site's `score_site` result, in site order."""
  summary = metrics.summarize_sites({n: {"mean": means} for n, (means, _) in per_site.items()})
  sites = {n: dict(summary["per_site"][n], **spread) for n, (_, spread) in per_site.items()}
  return {"sites": sites, "mean": summary["mean"], "std": summary["std"]}


def local_predictions(out: Dict, data, keys=("pred",)) -> Dict[str, Dict[int, np.ndarray]]:
  """{key: {site: rows}} of a predictor's site-sharded outputs, for the real sites whose
  rows live on this process (only the requested outputs leave the device)."""
  return {key: sharding.local_rows(out[key], range(data.num_sites)) for key in keys}


def seed_rows(rows: Dict[int, np.ndarray], seed_index) -> Dict[int, np.ndarray]:
  """One seed's rows of predictions made with a seed axis ([S, N, ...] per site)."""
  return rows if seed_index is None else {k: r[seed_index] for k, r in rows.items()}


def evaluate(predict_fn, state, arrays, parts, data, config, num_seeds: int = 0) -> List:
  """Scores of every part of `arrays` from one prediction: `parts` lists the per-site
  splits that were concatenated (in order) into each site's rows of `arrays`
  (`concat_splits`), so test and validation share one compiled predictor. With a seed
  axis, every part's entry is a list of one result per seed."""
  out = predict_fn(state.params, state.model_state, arrays.images)
  rows = local_predictions(out, data)["pred"]
  views = list(range(num_seeds)) if num_seeds else [None]
  results, offset = [], {k: 0 for k in rows}
  for splits in parts:
    per_seed = []
    for v in views:
      part = {k: r[..., offset[k]:offset[k] + len(splits[k]), :, :, :] for k, r in seed_rows(rows, v).items()}
      per_seed.append(score_predictions(part, splits, data, config))
    results.append(per_seed if num_seeds else per_seed[0])
    offset = {k: offset[k] + len(splits[k]) for k in rows}
  return results


def concat_splits(*parts):
  """Per site, the concatenation of the sites' splits of every part (None stays None)."""
  out = []
  for splits in zip(*parts):
    if splits[0] is None:
      out.append(None)
      continue
    cat = lambda f: None if getattr(splits[0], f) is None else np.concatenate([getattr(s, f) for s in splits])
    out.append(SiteSplit(cat("images"), cat("masks"), [n for s in splits for n in s.names],
                         cat("volume_ids"), cat("slice_index")))
  return out


def format_line(record, site_names) -> str:
  per = " ".join(f"{n}={record['sites'][n]['iou']:.4f}" for n in site_names)
  m = record["mean"]
  return (f"eval round {record['round']}: IoU {per} | mean IoU {m['iou']:.4f} "
          f"Dice {m['dice']:.4f} ASSD {m['assd']:.2f} HD95 {m['hd95']:.2f}")
