"""Tiny on-disk datasets, generated in tmp_path, in every layout the builders read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save(path: Path, arr: np.ndarray) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(arr, np.uint8)).save(path)
  return path


def rgb(value: int, size: int = 8) -> np.ndarray:
  a = np.zeros((size, size, 3), np.uint8)
  a[..., 0] = value
  a[..., 1] = np.arange(size, dtype=np.uint8)[None, :] * 3
  a[..., 2] = 7
  return a


def polyp_mask(size: int = 8) -> np.ndarray:
  """Values 0, 100 (below the > 127 threshold) and 200 (foreground, top-left 2x2)."""
  m = np.zeros((size, size), np.uint8)
  m[4:, 4:] = 100
  m[:2, :2] = 200
  return m


def make_pair(folder: Path, stem: str, value: int, img_ext=".png", size: int = 8,
              img_dir="images", mask_dir="masks"):
  save(folder / img_dir / f"{stem}{img_ext}", rgb(value, size))
  save(folder / mask_dir / f"{stem}.png", polyp_mask(size))


def polyp_per_site(root: Path, kvasir=20, clinicdb=10, colondb=380, etis=0):
  for i in range(kvasir):
    make_pair(root / "kvasir", f"cju{i:03d}", 10)
  for i in range(1, clinicdb + 1):
    make_pair(root / "clinicdb", str(i), 20, img_ext=".jpg")
  for i in range(1, colondb + 1):
    make_pair(root / "colondb", str(i), 150)
  for i in range(1, etis + 1):
    make_pair(root / "etis", str(i), 50)
  return root


def polyp_pranet(root: Path):
  tr = root / "TrainDataset"
  for i in range(3):
    make_pair(tr, f"cju{i}", 10, img_dir="image", mask_dir="mask")
  for i in range(1, 5):
    make_pair(tr, str(i), 20, img_dir="image", mask_dir="mask")
  te = root / "TestDataset"
  for i in range(2):
    make_pair(te / "Kvasir", f"cjx{i}", 11)
  for i in range(1, 3):
    make_pair(te / "CVC-ClinicDB", str(i), 21)
  for i in range(1, 381):
    make_pair(te / "CVC-ColonDB", str(i), 150)
  for i in range(1, 197):
    make_pair(te / "ETIS-LaribPolypDB", str(i), 50)
  for i in range(1, 3):   # CVC-300 is not used by LC-Fed
    make_pair(te / "CVC-300", str(i), 99)
  return root


def fundus_mask(size: int = 8, rgb_mask: bool = True) -> np.ndarray:
  """255 background, 128 disc rim (rows 2..5), 0 cup (rows 3..4, cols 3..4)."""
  m = np.full((size, size), 255, np.uint8)
  m[2:6, 2:6] = 128
  m[3:5, 3:5] = 0
  return np.repeat(m[..., None], 3, axis=-1) if rgb_mask else m


def fundus(root: Path, prefix="Site", n_sites=2, train=2, test=1, rgb_mask=True):
  for k in range(1, n_sites + 1):
    for split, n in (("train", train), ("test", test)):
      for i in range(n):
        d = root / f"{prefix}{k}" / split / "ROIs"
        save(d / "image" / f"s{k}_{split}_{i}.png", rgb(30 * k + i))
        save(d / "mask" / f"s{k}_{split}_{i}.png", fundus_mask(rgb_mask=rgb_mask))
  return root


def faz(root: Path, n_sites=2, train=3, test=2, mask_value=255):
  for k in range(1, n_sites + 1):
    for split, n in (("train", train), ("test", test)):
      for i in range(n):
        d = root / f"site{k}" / split
        save(d / "images" / f"{k}_{split}_{i}.png", np.full((8, 8), 40 * k + i, np.uint8))
        m = np.zeros((8, 8), np.uint8)
        m[1:3, 2:5] = mask_value
        save(d / "masks" / f"{k}_{split}_{i}.png", m)
  return root


def prostate_slices(root: Path, sites=("BIDMC", "HK"), inverted=True, empty_extra=True):
  """Slice-PNG layout; one extra all-background test slice per site if empty_extra."""
  for s in sites:
    for split, stems in (("train", ["00_03", "01_05"]), ("test", ["02_01"])):
      for stem in stems:
        fg = np.zeros((8, 8), bool)
        fg[2:4, 3:6] = True
        m = np.where(fg, 0, 255) if inverted else np.where(fg, 255, 0)
        save(root / s / split / "image" / f"{stem}.png", np.full((8, 8), 60, np.uint8))
        save(root / s / split / "mask" / f"{stem}.png", m)
      if empty_extra and split == "test":
        save(root / s / split / "image" / "02_09.png", np.full((8, 8), 61, np.uint8))
        save(root / s / split / "mask" / "02_09.png",
             np.full((8, 8), 255 if inverted else 0, np.uint8))
  return root


def nifti_volume(shape=(8, 8, 6), fg_slices=(2, 3, 4), seed=0):
  """(image, label): image intensities 100..~1100, label 1 (and 2) on an asymmetric block."""
  rng = np.random.default_rng(seed)
  img = rng.uniform(100, 1100, size=shape).astype(np.float32)
  seg = np.zeros(shape, np.float32)
  for z in fg_slices:
    seg[1:3, 2:7, z] = 1      # asymmetric in x vs y: catches a missing transpose
    seg[1, 2, z] = 2
  return img, seg


def prostate_nifti(root: Path, sites=("BIDMC", "I2CVB"), n_cases=5):
  import nibabel as nib
  for s in sites:
    suffix = "_Segmentation" if s == "I2CVB" else "_segmentation"
    for c in range(n_cases):
      img, seg = nifti_volume(seed=c)
      d = root / s
      d.mkdir(parents=True, exist_ok=True)
      nib.save(nib.Nifti1Image(img, np.eye(4)), str(d / f"Case{c:02d}.nii.gz"))
      nib.save(nib.Nifti1Image(seg, np.eye(4)), str(d / f"Case{c:02d}{suffix}.nii.gz"))
  return root
