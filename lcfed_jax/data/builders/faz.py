"""Foveal avascular zone (FAZ) segmentation in OCTA (grey, 1 channel), 5 sites.

Layout (docs/datasets.md; FedICRA's own `Domain<k>/{train,test}/{imgs,mask}` is
accepted too)::

  <root>/site{1..5}/{train,test}/{images,masks}/<name>.png

The split is the folders' own. Images must be grey (RGB with R == G == B is accepted).
Masks: foreground = value > 0, values must be in {0, 127, 255} (255 in the converted copy,
127 in FedICRA's release).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lcfed_jax.data.builders import common, files, sites
from lcfed_jax.util.errors import DataError

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FAZ segmentation in OCTA, 5 sites (FAZID, OCTA-500 3M, OCTA-500 6M, OCTA-25K sOCTA-3x3,
ROSE) with FedICRA's split: take data/FAZ/Domain{1..5}/{train,test}/{imgs,mask} from
github.com/llmir/FedICRA (or a converted copy) and place it so that
<data_dir>/faz/site{1..5}/{train,test}/{images,masks}/*.png exist (Domain<k>, imgs/, mask/
names are accepted). Build ahead with
  python -m lcfed_jax.data.build --task faz --data_dir <data_dir>
"""
LAYOUT_TEXT = "<root>/site<k>/{train,test}/{images,masks}/*.png"


def site_dirs(root: Path):
  found = sites.numbered_site_dirs(root)
  if not found:
    raise common.missing_root_error(root, "faz", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  return found


class LcfedFaz(common.SiteBuilder):
  """FAZ segmentation sites (OCTA, FedICRA split)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  IN_CHANNELS = 1
  NUM_CLASSES = 1

  def plan(self, cfg):
    d = dict(site_dirs(Path(cfg.root)))[cfg.site]
    out = {}
    for split in ("train", "test"):
      if not (d / split).is_dir():
        raise DataError(f"Expected folder {d / split} (layout {LAYOUT_TEXT}).")
      out[split] = files.pair_dir(d / split)
    return out

  def load_unit(self, unit, cfg):
    stem, img_path, mask_path = unit
    img, m = common.read_pair(img_path, mask_path, 1)
    common.check_values(m, (0, 1, 127, 255), mask_path, "{0, 255} (or FedICRA's {0, 127}, or {0, 1})")
    fg = (m > 0).astype(np.uint8)
    return [common.Example(image=common.resize_image(img, cfg.image_size),
                           mask=common.resize_labels(fg, cfg.image_size)[..., None],
                           name=stem)]
