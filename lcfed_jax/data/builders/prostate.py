"""Prostate T2 MRI segmentation (grey, 1 channel), the SAML 6-site collection (docs/datasets.md).

Two raw layouts (`layout`):

* `nifti` (SAML release)::

    <root>/<SITE>/CaseXX.nii.gz + CaseXX_segmentation.nii.gz   (or _Segmentation, I2CVB)

  Sites are the sub-folders in sorted order (BIDMC, BMC, HK, I2CVB, RUNMC, UCL). Split as
  LC-Fed: sort the cases by mask file name, first int(0.8 n) cases train, the rest test.
  Each volume is cut into axial slices, slice z = data[:, :, z].T (nibabel's x, y swapped
  to the [row, col] = [y, x] order SimpleITK gives). Mask = label > 0. Per-slice
  normalisation (`prostate_norm`): vmin = slice min, vmax = sorted(slice)[int(0.99 N)],
  clip to [vmin, vmax], then 'range' (default, correct): (x - vmin) / (vmax - vmin), or
  'vmax_as_released' (the official code's quirk, D3 in docs/official_code.md): (x - vmin) / vmax; the result is
  clipped to [0, 1] and stored as round(255 x) in uint8. volume_ids = the case number
  (the digits of CaseXX), slice_index = z; names 'CaseXX/slice_zzz'.

* `slices` (the sliced PNG release, e.g. the MiDSS repository's data/ProstateSlice)::

    <root>/<SITE>/{train,test}/{image,mask}/NN_MM.png       NN = case, MM = slice

  The split is the folders' own; images are stored as they are (already normalised).
  Masks must be {0, 255}. `prostate_mask`: 'foreground_255' (255 = prostate),
  'inverted' (0 = prostate, as in MiDSS's release) or 'auto'. Rule for 'auto', per site:
  the prostate covers well under half of an axial slice, so for every mask holding both
  values compute the fraction of 255 pixels; if it is > 0.5 in every such mask the site
  is 'inverted', if < 0.5 in every one it is 'foreground_255'; otherwise (mixed, or no
  mask with both values) the build stops with a DataError asking to set
  config.data.prostate_mask. The decision is logged and saved in the dataset metadata.

`foreground_slices_only` (default True, as LC-Fed): keep only slices whose mask has
foreground, in both splits.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List

import numpy as np

from lcfed_jax.data.builders import common, files
from lcfed_jax.util.errors import DataError

log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Prostate MRI, SAML multi-site collection (RUNMC, BMC, I2CVB, UCL, BIDMC, HK): download the
processed data from liuquande.github.io/SAML ("Multi-site Dataset for Prostate MRI
Segmentation") and unpack it so that <data_dir>/prostate/<SITE>/CaseXX.nii.gz and
CaseXX_segmentation.nii.gz (I2CVB: _Segmentation) exist. The sliced PNG release
(<SITE>/{train,test}/{image,mask}/NN_MM.png, e.g. from github.com/MQinghe/MiDSS) is
accepted too; a tiny sample of it is in the MiDSS repository (data/ProstateSlice). Build ahead with
  python -m lcfed_jax.data.build --task prostate --data_dir <data_dir>
"""
LAYOUT_TEXT = ("<root>/<SITE>/CaseXX.nii.gz + CaseXX_segmentation.nii.gz (SAML volumes), or "
               "<root>/<SITE>/{train,test}/{image,mask}/NN_MM.png (slices)")
_SEG_RE = re.compile(r"_segmentation", re.IGNORECASE)
_SLICE_RE = re.compile(r"^(\d+)_(\d+)$")


def _is_nii(p: Path) -> bool:
  return p.is_file() and (p.name.lower().endswith(".nii.gz") or p.name.lower().endswith(".nii"))


def _nii_stem(p: Path) -> str:
  n = p.name
  return n[:-7] if n.lower().endswith(".nii.gz") else n[:-4]


def _is_slices_site(d: Path) -> bool:
  return (d / "train").is_dir() and (d / "test").is_dir()


def detect_layout(root: Path, layout: str = "auto") -> str:
  if not root.is_dir():
    raise common.missing_root_error(root, "prostate", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  subdirs = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
  has_slices = any(_is_slices_site(d) for d in subdirs)
  has_nifti = any(any(_is_nii(f) for f in d.iterdir()) for d in subdirs)
  if layout == "auto":
    if has_slices and not has_nifti:
      return "slices"
    if has_nifti and not has_slices:
      return "nifti"
    if has_nifti and has_slices:
      raise DataError(f"{root} holds both .nii.gz volumes and train/test slice folders; set "
                      "config.data.layout to 'nifti' or 'slices'.")
    raise common.missing_root_error(root, "prostate", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if layout not in ("nifti", "slices"):
    raise DataError(f"config.data.layout='{layout}' is not a prostate layout; use 'auto', "
                    "'nifti' or 'slices'.")
  if (layout == "nifti" and not has_nifti) or (layout == "slices" and not has_slices):
    raise common.missing_root_error(root, "prostate", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  return layout


def site_names(root: Path, layout: str) -> List[str]:
  subdirs = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
  if layout == "slices":
    return [d.name for d in subdirs if _is_slices_site(d)]
  return [d.name for d in subdirs if any(_is_nii(f) for f in d.iterdir())]


def nifti_cases(site_dir: Path):
  """Sorted (case, image, mask) of a SAML site folder; unmatched files are errors."""
  files = [f for f in site_dir.iterdir() if _is_nii(f)]
  masks = sorted((f for f in files if "mentation" in f.name.lower()), key=lambda f: f.name)
  images = {_nii_stem(f): f for f in files if "mentation" not in f.name.lower()}
  cases, used = [], set()
  for m in masks:
    case = _SEG_RE.sub("", _nii_stem(m))
    if case not in images:
      raise DataError(f"Mask {m} has no image: expected {site_dir / (case + '.nii.gz')}.")
    used.add(case)
    cases.append((case, images[case], m))
  for case, f in sorted(images.items()):
    if case not in used:
      raise DataError(f"Image {f} has no mask: expected {site_dir / (case + '_segmentation.nii.gz')}.")
  return cases


def mr_norm(x: np.ndarray, mode: str) -> np.ndarray:
  """Per-slice normalisation to [0, 1] (see the module docstring)."""
  x = x.astype(np.float64)
  flat = np.sort(x.ravel())
  vmin, vmax = flat[0], flat[int(0.99 * flat.size)]
  x = np.clip(x, vmin, vmax)
  if mode == "range":
    denom = vmax - vmin
  elif mode == "vmax_as_released":
    denom = vmax
  else:
    raise DataError(f"config.data.prostate_norm='{mode}'; use 'range' or 'vmax_as_released'.")
  if denom <= 0:
    return np.zeros_like(x)
  return np.clip((x - vmin) / denom, 0.0, 1.0)


def _load_nii(path: Path) -> np.ndarray:
  import nibabel as nib
  try:
    arr = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
  except Exception as e:
    raise DataError(f"Cannot read volume {path}: {type(e).__name__}: {e}") from None
  if arr.ndim == 4 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 3:
    raise DataError(f"Volume {path} has shape {arr.shape}; expected 3-D (x, y, z).")
  return arr


def detect_inversion(mask_paths, site: str) -> str:
  fracs = []
  for p in mask_paths:
    m = common.mask_channel(common.read_image(p), p)
    common.check_values(m, (0, 255), p, "{0, 255}")
    if (m == 0).any() and (m == 255).any():
      fracs.append(float((m == 255).mean()))
  how = ("Set config.data.prostate_mask to 'inverted' (0 = prostate) or "
         "'foreground_255' (255 = prostate).")
  if not fracs:
    raise DataError(f"Cannot tell the prostate mask convention of site {site}: no mask holds "
                    f"both 0 and 255. {how}")
  if all(f > 0.5 for f in fracs):
    conv = "inverted"
  elif all(f < 0.5 for f in fracs):
    conv = "foreground_255"
  else:
    raise DataError(f"Cannot tell the prostate mask convention of site {site}: the fraction of "
                    f"255 pixels is above 0.5 in {sum(f > 0.5 for f in fracs)} masks and below "
                    f"in {sum(f < 0.5 for f in fracs)}. {how}")
  log.info("prostate site %s: mask convention detected as '%s' (fraction of 255 pixels "
           "%.3f..%.3f over %d masks; rule: > 0.5 in all -> inverted, < 0.5 in all -> "
           "foreground_255)", site, conv, min(fracs), max(fracs), len(fracs))
  return conv


class LcfedProstate(common.SiteBuilder):
  """LC-Fed prostate MRI sites (SAML collection), axial slices."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  IN_CHANNELS = 1
  NUM_CLASSES = 1
  LOAD_THREADS = 2

  def plan(self, cfg):
    d = Path(cfg.root) / cfg.site
    if cfg.layout == "nifti":
      cases = nifti_cases(d)
      if not cases:
        raise DataError(f"Site {d} has no CaseXX_segmentation.nii.gz files.")
      digits = [re.findall(r"\d+", c[0]) for c in cases]
      nums = [int(x[-1]) if x else None for x in digits]
      if None in nums or len(set(nums)) != len(nums):
        nums = list(range(len(cases)))
      units = [(c, img, m, vid) for (c, img, m), vid in zip(cases, nums)]
      n_train = int(0.8 * len(units))
      self.info.metadata["mask_convention"] = "label>0"
      return {"train": units[:n_train], "test": units[n_train:]}
    out = {}
    for split in ("train", "test"):
      pairs = files.pair_dir(d / split)
      for stem, img, _ in pairs:
        if not _SLICE_RE.match(stem):
          raise DataError(f"{img}: expected a slice name NN_MM.png (case_slice).")
      out[split] = pairs
    conv = cfg.options.get("prostate_mask", "auto")
    if conv == "auto":
      conv = detect_inversion([u[2] for s in ("train", "test") for u in out[s]], cfg.site)
    elif conv not in ("inverted", "foreground_255"):
      raise DataError(f"config.data.prostate_mask='{conv}'; use 'auto', 'inverted' or "
                      "'foreground_255'.")
    self._convention = conv
    self.info.metadata["mask_convention"] = conv
    return {split: [("png", u, conv) for u in units] for split, units in out.items()}

  def load_unit(self, unit, cfg):
    s = cfg.image_size
    fg_only = bool(cfg.options.get("foreground_slices_only", True))
    if unit[0] == "png":
      _, (stem, img_path, mask_path), conv = unit
      img = common.to_channels(common.read_image(img_path), 1, img_path)
      m = common.mask_channel(common.read_image(mask_path), mask_path)
      if m.shape != img.shape[:2]:
        raise DataError(f"Mask {mask_path} is {m.shape[1]}x{m.shape[0]} but its image "
                        f"{img_path} is {img.shape[1]}x{img.shape[0]}.")
      common.check_values(m, (0, 255), mask_path, "{0, 255}")
      fg = (m == 0) if conv == "inverted" else (m == 255)
      if fg_only and not fg.any():
        return []
      case, sl = (int(x) for x in _SLICE_RE.match(stem).groups())
      return [common.Example(image=common.resize_image(img, s),
                             mask=common.resize_labels(fg.astype(np.uint8), s)[..., None],
                             name=stem, volume_id=case, slice_index=sl)]
    case, img_path, mask_path, vid = unit
    vol, seg = _load_nii(img_path), _load_nii(mask_path)
    if vol.shape != seg.shape:
      raise DataError(f"Mask {mask_path} has shape {seg.shape} but its image {img_path} "
                      f"has {vol.shape}.")
    if np.any(seg < 0) or np.any(seg != np.round(seg)):
      bad = np.unique(seg[(seg < 0) | (seg != np.round(seg))])[:10].tolist()
      raise DataError(f"Mask {mask_path} has unexpected values {bad}; expected "
                      "non-negative integer labels (prostate = label > 0).")
    mode = cfg.options.get("prostate_norm", "range")
    out = []
    for z in range(vol.shape[2]):
      fg = seg[:, :, z].T > 0
      if fg_only and not fg.any():
        continue
      x = mr_norm(vol[:, :, z].T, mode)
      img = np.round(x * 255.0).astype(np.uint8)[..., None]
      out.append(common.Example(image=common.resize_image(img, s),
                                mask=common.resize_labels(fg.astype(np.uint8), s)[..., None],
                                name=f"{case}/slice_{z:03d}", volume_id=vid, slice_index=z))
    return out
