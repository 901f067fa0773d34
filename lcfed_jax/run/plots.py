"""PNG figures for a workdir: IoU against round, and qualitative overlays.

`iou_curves`   per-site test IoU (and the site mean) from metrics.jsonl against the round,
               the validation mean dashed when there is one, the selected round(s) marked.
`overlays`     per site a few test examples: image, ground truth, prediction and, for a
               model whose output is LC-Fed's HC, the HC's peak map of head disagreement
               (`engine.make_predict_fn` returns it as 'peaks').
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def iou_curves(records: Sequence[Dict], site_names: Sequence[str], path,
               site_rounds: Optional[Dict[str, int]] = None, title: str = "") -> Path:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  rounds = [r["round"] for r in records]
  for i, s in enumerate(site_names):
    line, = ax.plot(rounds, [r["sites"][s]["iou"] for r in records], marker=".", lw=1, label=s)
    if site_rounds and site_rounds.get(s) in rounds:
      j = rounds.index(site_rounds[s])
      ax.plot([rounds[j]], [records[j]["sites"][s]["iou"]], marker="*", ms=12, color=line.get_color())
  ax.plot(rounds, [r["mean"]["iou"] for r in records], color="k", lw=2, label="mean (test)")
  if records and "val" in records[0]:
    ax.plot(rounds, [r["val"]["mean"]["iou"] for r in records], color="k", lw=1.5, ls="--",
            label="mean (val)")
  if site_rounds and len(set(site_rounds.values())) == 1:
    ax.axvline(next(iter(site_rounds.values())), color="gray", ls=":", label="selected")
  return _save_iou_axes(plt, fig, ax, path, "IoU", title or "test IoU per site")


def _save_iou_axes(plt, fig, ax, path, ylabel: str, title: str, ncol: int = 1) -> Path:
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right", ncol=ncol)
  ax.set_title(title)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _label_map(mask: np.ndarray) -> np.ndarray:
  """[H, W, nc] binary -> [H, W] with the highest set class index + 1 (fundus: cup over disc)."""
  out = np.zeros(mask.shape[:2], np.int32)
  for c in range(mask.shape[-1]):
    out = np.where(mask[..., c] > 0, c + 1, out)
  return out


def overlays(images: np.ndarray, gts: np.ndarray, preds: np.ndarray, site_names: Sequence[str],
             path, peaks: Optional[np.ndarray] = None, per_site: int = 2,
             counts: Optional[Sequence[int]] = None) -> Path:
  """images [K, N, H, W, C] uint8, gts and preds [K, N, H, W, nc] {0,1}, peaks like preds
  or None. The first `per_site` real examples of every site."""
  plt = _plt()
  k = len(site_names)
  counts = counts if counts is not None else [images.shape[1]] * k
  cols = ["image", "ground truth", "prediction"] + (["HC peak map"] if peaks is not None else [])
  rows = [(i, j) for i in range(k) for j in range(min(per_site, int(counts[i])))]
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.2 * len(rows)), squeeze=False)
  for r, (i, j) in enumerate(rows):
    img = images[i, j]
    img = img[..., 0] if img.shape[-1] == 1 else img
    cmap = "gray" if img.ndim == 2 else None
    gt, pred = _label_map(gts[i, j]), _label_map(preds[i, j])
    panels = [None, gt, pred] + ([peaks[i, j].max(-1)] if peaks is not None else [])
    for c, panel in enumerate(panels):
      ax = axes[r, c]
      ax.imshow(img, cmap=cmap)
      if panel is not None and c < 3:
        ax.imshow(np.ma.masked_equal(panel, 0), cmap="autumn" if c == 1 else "winter", alpha=0.5,
                  vmin=0, vmax=max(gts.shape[-1], 1))
        if c == 2:
          ax.contour(gt > 0, levels=[0.5], colors="yellow", linewidths=0.8)
      elif panel is not None:
        ax.imshow(np.ma.masked_equal(panel, 0), cmap="cool", vmin=0, vmax=1, alpha=0.9)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(cols[c], fontsize=9)
      if c == 0:
        ax.set_ylabel(f"{site_names[i]} #{j}", fontsize=8)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def method_curves(curves: Dict[str, Sequence[Sequence[Dict]]], path, title: str = "") -> Path:
  """Mean test IoU per round of every method: the mean over seeds, shaded over their range.
  curves: {method: [metrics.jsonl records of one seed, ...]}."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 5))
  for label, seeds in curves.items():
    rounds = sorted(set.intersection(*[{r["round"] for r in recs} for recs in seeds]))
    if not rounds:
      continue
    values = np.array([[next(r["mean"]["iou"] for r in recs if r["round"] == x) for x in rounds]
                       for recs in seeds])
    line, = ax.plot(rounds, values.mean(0), lw=1.8, label=label)
    if len(seeds) > 1:
      ax.fill_between(rounds, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0)
  return _save_iou_axes(plt, fig, ax, path, "mean test IoU over sites",
                        title or "mean test IoU per round (band: range over seeds)", ncol=2)


def side_by_side(panels: Sequence, path, max_width: int = 1800, max_height: int = 1000) -> Path:
  """[(title, png path), ...] next to each other in one figure, scaled down together to at
  most `max_width` x `max_height` pixels (a results figure stays small enough to commit)."""
  from PIL import Image
  plt = _plt()
  images = [Image.open(p).convert("RGB") for _, p in panels]
  scale = min(1.0, max_width / sum(i.width for i in images), max_height / max(i.height for i in images))
  images = [np.asarray(i.resize((max(1, round(i.width * scale)), max(1, round(i.height * scale))),
                                Image.LANCZOS)) for i in images]
  h = max(i.shape[0] for i in images)
  fig, axes = plt.subplots(1, len(images), figsize=(sum(i.shape[1] for i in images) / 90, h / 90 + 0.4),
                           squeeze=False)
  for ax, (title, _), img in zip(axes[0], panels, images):
    ax.imshow(img)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
