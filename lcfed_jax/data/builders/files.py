"""Finding and pairing a dataset's files, and seeded splits: what every builder's `plan` uses."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lcfed_jax.util.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_DIR_NAMES = ("images", "image", "imgs", "img")
MASK_DIR_NAMES = ("masks", "mask", "labels", "label")


def natural_key(name: str):
  """Sort key: purely numeric names sort by value ('2' < '10'), others by text."""
  parts = re.split(r"(\d+)", name)
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "")


def find_subdir(parent: Path, names: Sequence[str]) -> Optional[Path]:
  """First existing child of `parent` whose name matches one of `names` (case-insensitive)."""
  if not parent.is_dir():
    return None
  children = {c.name.lower(): c for c in parent.iterdir() if c.is_dir()}
  for n in names:
    if n.lower() in children:
      return children[n.lower()]
  return None


def list_images(folder: Path) -> Dict[str, Path]:
  """Map stem -> path for the image files in `folder`; two files with one stem is an error."""
  out: Dict[str, Path] = {}
  for p in sorted(folder.iterdir()):
    if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
      if p.stem in out:
        raise DataError(f"Two files share the name '{p.stem}' in {folder}: "
                        f"{out[p.stem].name} and {p.name}; keep one.")
      out[p.stem] = p
  return out


def pair_files(image_dir: Path, mask_dir: Path) -> List[Tuple[str, Path, Path]]:
  """(stem, image, mask) for every image in image_dir, matched to mask_dir by base name.

  An image without a mask, or a mask without an image, is a DataError naming the file.
  Returned in natural order of the stem.
  """
  for d in (image_dir, mask_dir):
    if not d.is_dir():
      raise DataError(f"Expected folder {d} does not exist.")
  images, masks = list_images(image_dir), list_images(mask_dir)
  for stem, p in images.items():
    if stem not in masks:
      raise DataError(f"Image {p} has no mask: expected {mask_dir}/{stem}.<png|jpg|...>.")
  for stem, p in masks.items():
    if stem not in images:
      raise DataError(f"Mask {p} has no image: expected {image_dir}/{stem}.<png|jpg|...>.")
  return [(s, images[s], masks[s]) for s in sorted(images, key=natural_key)]


def pair_dir(folder: Path) -> List[Tuple[str, Path, Path]]:
  """Pairs in `folder/{images|image|imgs}` and `folder/{masks|mask}`."""
  img = find_subdir(folder, IMAGE_DIR_NAMES)
  msk = find_subdir(folder, MASK_DIR_NAMES)
  if img is None or msk is None:
    raise DataError(f"Expected {folder}/images/ and {folder}/masks/ (or image/, mask/); "
                    f"found: {sorted(c.name for c in folder.iterdir()) if folder.is_dir() else 'no folder'}.")
  return pair_files(img, msk)


def split_seeded(items: List, frac_test: float, seed: int) -> Tuple[List, List]:
  """Fixed-seed split of a (sorted) list: test = ceil(frac_test * n) items drawn by
  `np.random.default_rng(seed).permutation(n)`; both parts keep the sorted order."""
  n = len(items)
  n_test = int(np.ceil(frac_test * n))
  perm = np.random.default_rng(seed).permutation(n)
  test_idx = set(perm[:n_test].tolist())
  train = [it for i, it in enumerate(items) if i not in test_idx]
  test = [it for i, it in enumerate(items) if i in test_idx]
  return train, test


