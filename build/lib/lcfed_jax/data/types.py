"""Host-side containers that every data source (synthetic or TFDS) returns.

All arrays are NumPy and uint8 so that the whole training set of every site can be put
on the device once and sampled there (see `lcfed_jax.data.device`).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np


@dataclasses.dataclass
class SiteSplit:
  """One split (train or test) of one site.

  images: uint8 [N, H, W, C], the network input is images / 255.
  masks:  uint8 [N, H, W, num_classes] with values in {0, 1}, one binary target channel
          per output class (fundus: OD incl. cup, OC).
  names:  N example identifiers (file stem, or `case/slice` for volumes), for reports.
  volume_ids: optional int32 [N]: which volume (case) each slice belongs to, for
          per-volume evaluation (prostate). None for per-image tasks.
  slice_index: optional int32 [N]: the slice's index inside its volume.
  """
  images: np.ndarray
  masks: np.ndarray
  names: List[str]
  volume_ids: Optional[np.ndarray] = None
  slice_index: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return int(self.images.shape[0])


@dataclasses.dataclass
class FederatedData:
  """Every site's train and test split, plus what evaluation needs to know."""
  task: str
  site_names: List[str]
  train: List[SiteSplit]
  test: List[SiteSplit]
  in_channels: int
  num_classes: int
  class_names: List[str]
  eval_unit: str = "image"          # 'image' or 'volume'
  postprocess: str = "none"         # 'none' or 'largest_component'
  info: Dict[str, object] = dataclasses.field(default_factory=dict)

  @property
  def num_sites(self) -> int:
    return len(self.site_names)
