"""Fundus optic disc / cup segmentation (RGB, 2 target channels), (docs/datasets.md).

Layout (FedDG / DoFE ROIs; the folders may be named Site<k> or Domain<k>)::

  <root>/{Site1..Site4 | Domain1..Domain4}/{train,test}/ROIs/{image,mask}/<name>.png

The split is the folders' own. Masks are grey (or RGB with R == G == B; one channel is
taken) with values 255 = background, 128 = disc rim, 0 = cup (LC-Fed's label map is
2 - mask // 127); any other value is an error. Targets, as two binary channels:
[optic disc incl. cup (mask < 255), optic cup (mask == 0)]. The label map is resized with
nearest, the image bilinear.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lcfed_jax.data.builders import common, files, sites
from lcfed_jax.util.errors import DataError

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Fundus OD/OC data as prepared by FedDG / DoFE (Drishti-GS, RIM-ONE r3, REFUGE train,
REFUGE validation): download the processed "Fundus" archive linked from
github.com/liuquande/FedDG-ELCFS (or the DoFE repository github.com/emma-sjwang/Dofe) and
unpack it so that <data_dir>/fundus/Site{1..4}/{train,test}/ROIs/{image,mask}/*.png exist
(Domain{1..4} folder names are accepted too). Masks: 255 background, 128 disc, 0 cup.
A tiny sample in this layout: the MiDSS repository's data/Fundus. Build ahead with
  python -m lcfed_jax.data.build --task fundus --data_dir <data_dir>
"""
LAYOUT_TEXT = "<root>/{Site<k>|Domain<k>}/{train,test}/ROIs/{image,mask}/*.png"


def site_dirs(root: Path):
  found = sites.numbered_site_dirs(root)
  if not found:
    raise common.missing_root_error(root, "fundus", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  return found


class LcfedFundus(common.SiteBuilder):
  """LC-Fed fundus optic disc / cup sites (FedDG/DoFE ROIs)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  IN_CHANNELS = 3
  NUM_CLASSES = 2

  def plan(self, cfg):
    d = dict(site_dirs(Path(cfg.root)))[cfg.site]
    out = {}
    for split in ("train", "test"):
      rois = d / split / "ROIs"
      if not rois.is_dir():
        raise DataError(f"Expected folder {rois} (layout {LAYOUT_TEXT}).")
      out[split] = files.pair_dir(rois)
    return out

  def load_unit(self, unit, cfg):
    stem, img_path, mask_path = unit
    img, m = common.read_pair(img_path, mask_path, 3)
    common.check_values(m, (0, 128, 255), mask_path,
                        "{0 (cup), 128 (disc rim), 255 (background)}")
    label = (2 - m // 127).astype(np.uint8)     # 0 bg, 1 rim, 2 cup
    label = common.resize_labels(label, cfg.image_size)
    mask = np.stack([label > 0, label > 1], axis=-1).astype(np.uint8)
    return [common.Example(image=common.resize_image(img, cfg.image_size), mask=mask,
                           name=stem)]
