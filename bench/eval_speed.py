"""Evaluation speed: seconds per image for ASSD + HD95 (plus IoU/Dice) on blob masks.

Prints one JSON line per configuration:
  {"bench": "eval_speed", "size": 384, "mode": "serial"|"threads"|"processes"|"medpy",
   "workers": k, "images": n, "sec_per_image": t, ...}

'serial' and 'threads' run `metrics.evaluate_site` (num_workers=1 / default); 'processes'
maps `metrics.surface_metrics` over a warm process pool (for comparison only);
'medpy' calls medpy's `assd` and `hd95` per image (the reference, serial).

Usage: python bench/eval_speed.py [--sizes 96 256 384] [--images 48] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcfed_jax.eval import metrics  # noqa: E402


def blob_masks(rng, n, size):
  """Ground truth: 1-3 smooth blobs; prediction: the gt smoothed, shifted and noised."""
  sigma = size / 24.0
  gts = np.zeros((n, size, size, 1), np.uint8)
  preds = np.zeros_like(gts)
  for i in range(n):
    x = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    g = x > 1.0 * x.std()
    if not g.any():
      g[size // 3:size // 2, size // 3:size // 2] = True
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma / 3)
    y = ndimage.gaussian_filter(g.astype(np.float64), sigma / 4) + 0.15 * noise / noise.std()
    p = np.roll(y > 0.5, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    gts[i, ..., 0] = g
    preds[i, ..., 0] = p
  return preds, gts


def _pair(args):
  p, g = args
  return metrics.surface_metrics(p, g)


def timeit(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", type=int, nargs="+", default=[96, 256, 384])
  ap.add_argument("--images", type=int, default=48)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-medpy", action="store_true")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  workers = metrics.default_num_workers()
  ctx = mp.get_context("spawn")
  with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
    list(pool.map(_pair, [(np.ones((4, 4), bool), np.ones((4, 4), bool))] * workers))
    for size in args.sizes:
      preds, gts = blob_masks(rng, args.images, size)
      n = len(preds)
      ref = metrics.evaluate_site(preds, gts, num_workers=1)
      base = {"bench": "eval_speed", "size": size, "images": n, "cpus": os.cpu_count(),
              "mean_assd": round(ref["mean"]["assd"], 4),
              "mean_iou": round(ref["mean"]["iou"], 4)}
      rows = [
          ("serial", 1, lambda: metrics.evaluate_site(preds, gts, num_workers=1)),
          ("threads", workers,
           lambda: metrics.evaluate_site(preds, gts, num_workers=workers)),
          ("processes", workers,
           lambda: list(pool.map(_pair, list(zip(preds[..., 0] != 0, gts[..., 0] != 0)),
                                 chunksize=max(1, n // (4 * workers))))),
      ]
      if not args.no_medpy:
        from medpy.metric import binary
        rows.append(("medpy", 1, lambda: [(binary.assd(p, g), binary.hd95(p, g))
                                          for p, g in zip(preds[..., 0], gts[..., 0])]))
      for mode, w, fn in rows:
        t = timeit(fn, args.repeats)
        print(json.dumps(dict(base, mode=mode, workers=w,
                              sec_per_image=round(t / n, 6))), flush=True)


if __name__ == "__main__":
  main()
