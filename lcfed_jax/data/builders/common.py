"""Shared pieces of the LC-Fed TFDS builders: file pairing, image reading, resizing,
the per-site builder base class, and an atomic build into the TFDS directory.

No TensorFlow is needed at any point: the builders write `array_record` files and are
read back with `builder.as_data_source()`. Images and masks are stored as
`tfds.features.Tensor(uint8, encoding='zlib')` (an `Image` feature would need TensorFlow
to encode NumPy arrays).

Every example carries an explicit `index` (its position in the site's sorted order),
because array_record data sources return records in a hashed order.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
from PIL import Image

from lcfed_jax.util.errors import DataError

log = logging.getLogger(__name__)

VERSION = "1.0.0"


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray:
  """Decode an image file into uint8 [H, W] or [H, W, C]; unreadable -> DataError."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(f"Image {path} has mode {im.mode}; expected 8-bit (L, RGB).")
      if im.mode == "P":
        im = im.convert("RGB")
      if im.mode in ("RGBA", "LA"):
        im = im.convert(im.mode[:-1])
      if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
      arr = np.asarray(im)
  except DataError:
    raise
  except Exception as e:  # PIL raises many kinds of errors for bad files
    raise DataError(f"Cannot read image {path}: {type(e).__name__}: {e}") from None
  if arr.dtype != np.uint8:
    raise DataError(f"Image {path} has dtype {arr.dtype}; expected 8-bit.")
  return arr


def to_channels(arr: np.ndarray, channels: int, path: Path) -> np.ndarray:
  """[H, W] or [H, W, C] -> [H, W, channels]. RGB -> 1 channel only if R == G == B."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.shape[-1] == channels:
    return arr
  if channels == 3 and arr.shape[-1] == 1:
    return np.repeat(arr, 3, axis=-1)
  if channels == 1 and arr.shape[-1] == 3:
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
      raise DataError(f"Image {path} is colour (R, G, B differ) but this task expects a "
                      "single-channel (grey) image.")
    return arr[..., :1]
  raise DataError(f"Image {path} has {arr.shape[-1]} channels; expected {channels}.")


def mask_channel(arr: np.ndarray, path: Path) -> np.ndarray:
  """A mask as [H, W]: an RGB mask is allowed if its channels agree (then one is taken)."""
  if arr.ndim == 3:
    if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1])):
      raise DataError(f"Mask {path} is RGB with channels that differ; expected a grey mask "
                      "(or RGB with R == G == B).")
    arr = arr[..., 0]
  return arr


def check_values(arr: np.ndarray, allowed: Iterable[int], path: Path, what: str) -> None:
  vals = np.unique(arr)
  bad = sorted(set(vals.tolist()) - set(allowed))
  if bad:
    raise DataError(f"Mask {path} has unexpected values {bad[:10]}{' ...' if len(bad) > 10 else ''} "
                    f"(all values: {vals[:20].tolist()}); expected {what}.")


def resize_image(arr: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a uint8 [H, W, C] image to [size, size, C]."""
  if arr.shape[0] == size and arr.shape[1] == size:
    return arr
  mode = "L" if arr.shape[-1] == 1 else "RGB"
  im = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)
  out = np.asarray(im.resize((size, size), Image.BILINEAR))
  return out[..., None] if out.ndim == 2 else out


def resize_labels(arr: np.ndarray, size: int) -> np.ndarray:
  """Nearest resize of a uint8 [H, W] label map to [size, size]."""
  if arr.shape[0] == size and arr.shape[1] == size:
    return arr
  return np.asarray(Image.fromarray(arr.astype(np.uint8), mode="L").resize((size, size), Image.NEAREST))


def short_hash(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def missing_root_error(root: Path, task: str, layout: str, instructions: str) -> DataError:
  return DataError(f"The {task} data folder {root} does not exist or has the wrong layout.\n"
                   f"Expected layout: {layout}\n"
                   f"Set config.data_dir (or LCFED_DATA_DIR), or config.data.root.\n\n"
                   f"How to get the data:\n{instructions}")


# ----------------------------------------------------------------------------------------
# Builder base
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Example:
  """One decoded example, ready to be written."""
  image: np.ndarray       # uint8 [S, S, C]
  mask: np.ndarray        # uint8 [S, S, K] in {0, 1}
  name: str
  volume_id: int = -1
  slice_index: int = -1


# A unit of work: something `load_unit` turns into zero or more Examples
# (an image/mask pair, or a whole volume).
Unit = object


@dataclasses.dataclass(eq=False)
class SiteConfig:
  """Everything a site's build depends on. Becomes a TFDS BuilderConfig whose name holds
  the site, the image size and a hash of the rest (root path, layout, options), so
  builds with different sizes or options never collide."""
  site: str
  image_size: int
  root: str
  layout: str
  options: Dict[str, object] = dataclasses.field(default_factory=dict)

  def config_name(self) -> str:
    h = short_hash({"root": os.path.abspath(self.root), "layout": self.layout,
                    "options": self.options})
    return f"{self.site.lower()}_{self.image_size}px_{h}"


import tensorflow_datasets as tfds  # noqa: E402  (after numpy/PIL; never pulls TensorFlow here)


class _QuietTfds(logging.Filter):
  """Drop TFDS's per-construction chatter about our dynamic configs and empty variants."""
  _PREFIXES = ("Using custom data configuration", "Variant folder")

  def filter(self, record):
    msg = str(record.msg)
    return not msg.startswith(self._PREFIXES)


logging.getLogger("absl").addFilter(_QuietTfds())


@dataclasses.dataclass(eq=False)
class LcfedBuilderConfig(tfds.core.BuilderConfig):
  site_config: Optional[SiteConfig] = None


class SiteBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: one BuilderConfig per site, splits 'train' and 'test'.

  Subclasses set IN_CHANNELS, NUM_CLASSES, MANUAL_DOWNLOAD_INSTRUCTIONS and implement
  `plan(site_config) -> {'train': [unit, ...], 'test': [...]}` and
  `load_unit(unit, site_config) -> [Example, ...]`.
  """
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "First release."}
  IN_CHANNELS = 3
  NUM_CLASSES = 1
  LOAD_THREADS = 4

  @property
  def site_config(self) -> SiteConfig:
    return self.builder_config.site_config

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.site_config.image_size if self.builder_config else None
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, self.IN_CHANNELS), dtype=np.uint8,
                                          encoding="zlib"),
            "mask": tfds.features.Tensor(shape=(s, s, self.NUM_CLASSES), dtype=np.uint8,
                                         encoding="zlib"),
            "name": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int32),
            "volume_id": tfds.features.Scalar(dtype=np.int32),
            "slice_index": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    plan = self.plan(self.site_config)
    for split in ("train", "test"):
      if not plan.get(split):
        raise DataError(f"Site '{self.site_config.site}' of {self.name} has no {split} "
                        f"examples under {self.site_config.root}.")
    return {split: self._generate(units, split) for split, units in plan.items()}

  def _generate(self, units, split):
    cfg = self.site_config
    n = 0
    with concurrent.futures.ThreadPoolExecutor(self.LOAD_THREADS) as ex:
      for examples in ex.map(lambda u: self.load_unit(u, cfg), units):
        for e in examples:
          yield n, {"image": e.image, "mask": e.mask, "name": e.name, "index": n,
                    "volume_id": e.volume_id, "slice_index": e.slice_index}
          n += 1
    if n == 0:
      raise DataError(f"Site '{cfg.site}' of {self.name} has no {split} examples after "
                      f"loading {len(units)} files under {cfg.root} (e.g. no slice with "
                      "foreground).")

  # TFDS prints "Downloading and preparing ... to <tmp dir>" to stdout; `build_site` logs
  # the final location and the time instead.
  def _log_download_bytes(self):
    log.info("%s/%s: building from %s", self.name, self.builder_config.name,
             self.site_config.root)

  def _log_download_done(self):
    pass

  def _generate_examples(self, *args, **kwargs):  # splits come from `_generate`
    raise NotImplementedError

  # Subclass API
  def plan(self, cfg: SiteConfig) -> Dict[str, List[Unit]]:
    raise NotImplementedError

  def load_unit(self, unit: Unit, cfg: SiteConfig) -> List[Example]:
    raise NotImplementedError


def make_builder(builder_cls, site_config: SiteConfig, data_dir: str):
  cfg = LcfedBuilderConfig(name=site_config.config_name(), site_config=site_config,
                           description=f"{site_config.site} at {site_config.image_size}px, "
                           f"layout {site_config.layout}, options {site_config.options}, "
                           f"root {os.path.abspath(site_config.root)}")
  return builder_cls(config=cfg, data_dir=data_dir, file_format="array_record")


def build_site(builder_cls, site_config: SiteConfig, tfds_dir: str):
  """Return a prepared builder for one site, building it first if needed.

  The build goes into a fresh temporary folder inside `tfds_dir`; only a finished build
  is moved into place (one rename), and the temporary folder is removed whatever happens,
  so a failed build leaves nothing behind. Returns (builder, build_seconds or None).
  """
  tfds_dir = os.path.abspath(os.path.expanduser(tfds_dir))
  builder = make_builder(builder_cls, site_config, tfds_dir)
  if builder.is_prepared():
    return builder, None
  os.makedirs(tfds_dir, exist_ok=True)
  tfds.disable_progress_bar()
  tmp = tempfile.mkdtemp(prefix=f".incomplete_{builder.name}_", dir=tfds_dir)
  t0 = time.time()
  try:
    tmp_builder = make_builder(builder_cls, site_config, tmp)
    tmp_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=site_config.root))
    src = Path(tmp_builder.data_dir)
    dst = Path(builder.data_dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.rename(src, dst)
    except OSError:
      if not (dst / "dataset_info.json").exists():  # not a concurrent identical build
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  seconds = time.time() - t0
  builder = make_builder(builder_cls, site_config, tfds_dir)
  return builder, seconds


def read_split(builder, split: str):
  """All records of one split as NumPy, sorted by the stored `index`."""
  src = builder.as_data_source(split=split)
  n = len(src)
  recs = [src[i] for i in range(n)]
  recs.sort(key=lambda r: int(r["index"]))
  if [int(r["index"]) for r in recs] != list(range(n)):
    raise DataError(f"Prepared data of {builder.name}/{builder.builder_config.name} is "
                    f"inconsistent (indices are not 0..{n - 1}); delete {builder.data_dir} "
                    "to rebuild.")
  name = lambda r: r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
  return {
      "images": np.stack([r["image"] for r in recs]).astype(np.uint8),
      "masks": np.stack([r["mask"] for r in recs]).astype(np.uint8),
      "names": [name(r) for r in recs],
      "volume_ids": np.asarray([r["volume_id"] for r in recs], np.int32),
      "slice_index": np.asarray([r["slice_index"] for r in recs], np.int32),
  }


def foreground(m: np.ndarray, path: Path) -> np.ndarray:
  """Binary {0,1} foreground of a grey mask: value > 127 for {0, 255}-style masks; masks
  stored as {0, 1} (max value 1) are taken as they are, not thresholded to nothing."""
  if m.size and int(m.max()) == 1:
    check_values(m, (0, 1), path, "{0, 1} (a mask whose maximum is 1)")
    return m.astype(np.uint8)
  return (m > 127).astype(np.uint8)


def read_pair(img_path, mask_path, channels: int):
  """An image with `channels` channels and its single-channel mask, same size or DataError."""
  img = to_channels(read_image(img_path), channels, img_path)
  m = mask_channel(read_image(mask_path), mask_path)
  if m.shape != img.shape[:2]:
    raise DataError(f"Mask {mask_path} is {m.shape[1]}x{m.shape[0]} but its image "
                    f"{img_path} is {img.shape[1]}x{img.shape[0]}.")
  return img, m
