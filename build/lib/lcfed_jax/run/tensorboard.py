"""TensorBoard event files in the workdir, next to metrics.jsonl, without TensorFlow.

Written with tensorboardX: it writes the event-file format with protobuf alone (no
TensorFlow at run time, unlike `flax.metrics.tensorboard` or clu's writers), and its
`purge_step` makes a resumed run discard the events past its checkpoint, as
metrics.jsonl is cut back. View with `tensorboard --logdir WORKDIR`.

Per evaluation: `test/<metric>/<site>`, `test/<metric>/mean` (and `val/...`) for IoU,
Dice, ASSD and HD95, `train/loss/<site>`; the results' overlay figure as an image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

METRICS = ("iou", "dice", "assd", "hd95")


class Board:
  def __init__(self, workdir, start_round: int = 0):
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(str(Path(workdir) / "tb"), purge_step=start_round + 1 if start_round else None,
                                flush_secs=30)

  def record(self, record: Dict, site_names) -> None:
    step = int(record["round"])
    for split in ("test", "val"):
      res = record if split == "test" else record.get("val")
      if not res:
        continue
      for m in METRICS:
        for s in site_names:
          self._scalar(f"{split}/{m}/{s}", res["sites"][s][m], step)
        self._scalar(f"{split}/{m}/mean", res["mean"][m], step)
    for s, loss in zip(site_names, record.get("loss", [])):
      self._scalar(f"train/loss/{s}", loss, step)
    self.writer.flush()

  def _scalar(self, tag: str, value, step: int) -> None:
    if value is not None and np.isfinite(value):
      self.writer.add_scalar(tag, float(value), step)

  def image(self, tag: str, png_path, step: int) -> None:
    from PIL import Image
    img = np.asarray(Image.open(png_path).convert("RGB"))
    self.writer.add_image(tag, img, step, dataformats="HWC")
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def open_board(workdir, start_round: int, enabled: bool) -> Optional[Board]:
  return Board(workdir, start_round) if enabled else None
