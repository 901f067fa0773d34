"""Checks of loaded data that catch a silently useless experiment before it compiles."""
from __future__ import annotations

import numpy as np

from lcfed_jax.util.errors import DataError


def check_foreground(data) -> None:
  """Every site held here must have foreground in some training mask after binarisation.

  A site whose masks all come out empty trains towards an all-background model and
  scores IoU 0 without any error: typically masks stored as {0, 1} read by a rule that
  expects {0, 255}, or an inverted convention."""
  for name, split in zip(data.site_names, data.train):
    if split is None or not len(split):
      continue
    if not np.any(split.masks):
      where = data.info.get("tfds_dir") if isinstance(data.info, dict) else None
      raise DataError(
          f"site {name!r}: none of its {len(split)} training masks has any foreground after "
          f"binarisation (task {data.task!r}: foreground is a grey value > 127, or 1 in masks "
          f"stored as {{0, 1}}). Check the mask convention of this site's files"
          + (f"; after fixing them delete the site's prepared data under {where}" if where else ""))
