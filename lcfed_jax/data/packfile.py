"""Data packs: a task's prepared sites in one folder that trains without the raw data.

A pack holds what `load_task` returns for the config it was built with (every site's
train and test split at one image size; the validation split is carved from train at run
time as usual), compressed to travel: images as WebP or JPEG at a stated quality (or
PNG), masks as lossless PNG (class c in bit c). One `<site>.<split>.npz` per site and
split holds the encoded files concatenated, their offsets, the example names and, for
volumes, the volume and slice indices. `manifest.json` records the format version, task,
image size, the data settings the pack was built with, the sites and their counts, the
codecs and the sha256 and size of every file.

Reading a pack (`site_names`, `load_pack`) needs NumPy and Pillow only: no TFDS, no raw
data, so a machine that has the pack alone trains with `--config.data.pack=DIR`. A pack
whose manifest is missing or malformed, whose file fails its checksum, or that was built
for another task, image size or data settings (and so other sites) than the config's is
refused with a `DataError` naming the file and what was expected.

Build one with `python -m lcfed_jax.data.pack` (lcfed_jax/data/pack.py).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
from PIL import Image, features

from lcfed_jax.data.types import FederatedData, SiteSplit
from lcfed_jax.util.errors import DataError

FORMAT = "lcfed_jax data pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
# Keys of config.data that say where data lives rather than what it is.
_WHERE = ("root", "tfds_dir", "pack")
_THREADS = min(8, os.cpu_count() or 1)


def _plain(value):
  """JSON's view of a config value (tuples are lists), so saved and live settings compare."""
  return json.loads(json.dumps(value, default=list))


def data_settings(config) -> Dict[str, object]:
  """What the data depends on: the image size and every config.data key but its location."""
  out = {"image_size": int(config.image_size)}
  for key, value in config.data.items():
    if key not in _WHERE:
      out[f"data.{key}"] = _plain(value)
  return out


# ------------------------------------------------------------------ codecs

def encode_image(a: np.ndarray, codec: Dict) -> bytes:
  """uint8 [H, W, C] -> JPEG (4:4:4, optimised, progressive), WebP (lossy, slowest and
  smallest method) or PNG bytes."""
  im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
  buf = io.BytesIO()
  if codec["format"] == "jpeg":
    im.save(buf, format="JPEG", quality=int(codec["quality"]), subsampling=0, optimize=True,
            progressive=True)
  elif codec["format"] == "webp":
    im.save(buf, format="WEBP", quality=int(codec["quality"]), method=6)
  else:
    im.save(buf, format="PNG", compress_level=9)
  return buf.getvalue()


def decode_image(b: bytes, channels: int) -> np.ndarray:
  with Image.open(io.BytesIO(b)) as im:
    a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
  return a[..., None] if a.ndim == 2 else a


def encode_mask(m: np.ndarray) -> bytes:
  """uint8 [H, W, K] in {0, 1} -> PNG: 1-bit for one class, else grey with class c in bit c."""
  if m.shape[-1] == 1:
    im = Image.fromarray(m[..., 0].astype(bool))
  else:
    im = Image.fromarray(np.sum(m.astype(np.uint8) << np.arange(m.shape[-1], dtype=np.uint8), -1,
                                dtype=np.uint8))
  buf = io.BytesIO()
  im.save(buf, format="PNG", optimize=True)
  return buf.getvalue()


def decode_mask(b: bytes, num_classes: int) -> np.ndarray:
  with Image.open(io.BytesIO(b)) as im:
    v = np.asarray(im).astype(np.uint8)
  return ((v[..., None] >> np.arange(num_classes, dtype=np.uint8)) & 1).astype(np.uint8)


def _concat(blobs: List[bytes]):
  offsets = np.zeros(len(blobs) + 1, np.int64)
  offsets[1:] = np.cumsum([len(b) for b in blobs])
  return np.frombuffer(b"".join(blobs), np.uint8), offsets


def _split_blobs(data: np.ndarray, offsets: np.ndarray) -> List[bytes]:
  raw = data.tobytes()
  return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _map(fn, items):
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as ex:   # Pillow codecs drop the GIL
    return list(ex.map(fn, items))


def sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ------------------------------------------------------------------ writing

def encode_split(split: SiteSplit, codec: Dict) -> Dict[str, np.ndarray]:
  """The arrays of one `<site>.<split>.npz`; masks are checked to decode bit-exactly."""
  if split.masks.size and split.masks.max() > 1:
    raise DataError(f"masks must hold 0/1 per class channel to be packed, found {split.masks.max()}")
  images, image_offsets = _concat(_map(lambda a: encode_image(a, codec), split.images))
  mask_blobs = _map(encode_mask, split.masks)
  decoded = np.stack(_map(lambda b: decode_mask(b, split.masks.shape[-1]), mask_blobs))
  if not np.array_equal(decoded, split.masks):
    raise RuntimeError("a packed mask does not decode to the original")   # a bug, not bad input
  masks, mask_offsets = _concat(mask_blobs)
  out = dict(images=images, image_offsets=image_offsets, masks=masks, mask_offsets=mask_offsets,
             names=np.asarray(list(split.names), dtype=str))
  if split.volume_ids is not None:
    out["volume_ids"] = np.asarray(split.volume_ids, np.int32)
    out["slice_index"] = np.asarray(split.slice_index, np.int32)
  return out


def image_bytes(arrays: Dict[str, Dict[str, np.ndarray]]) -> int:
  return sum(int(a["images"].size) for a in arrays.values())


def write_pack(data: FederatedData, settings: Dict, out, arrays: Dict[str, Dict[str, np.ndarray]],
               codec: Dict, extra: Optional[Dict] = None) -> Dict:
  """Writes the encoded splits (`arrays[f'{site}.{split}']`) and the manifest into a new
  folder `out`, built beside it and renamed into place whole. Returns the manifest."""
  out = Path(out)
  if out.exists():
    raise DataError(f"--out {out} exists; remove it or choose another folder (a pack is never overwritten)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    sites, files = {}, {}
    for k, site in enumerate(data.site_names):
      sites[site] = {}
      for split_name in SPLITS:
        fname = f"{site}.{split_name}.npz"
        np.savez(tmp / fname, **arrays[f"{site}.{split_name}"])
        files[fname] = {"sha256": sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        sites[site][split_name] = {"count": len(getattr(data, split_name)[k]), "file": fname}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": data.task,
        "image_size": int(settings["image_size"]), "settings": settings,
        "site_names": list(data.site_names), "sites": sites, "files": files,
        "in_channels": int(data.in_channels), "num_classes": int(data.num_classes),
        "class_names": list(data.class_names), "eval_unit": data.eval_unit,
        "postprocess": data.postprocess, "image_codec": codec,
        "mask_codec": {"format": "png", "classes": "class c in bit c (1-bit PNG for one class)"},
        "total_bytes": sum(f["bytes"] for f in files.values()), **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


# ------------------------------------------------------------------ reading

def pack_dir(config) -> Path:
  return Path(os.path.expanduser(str(config.data.pack)))


def read_manifest(pack) -> Dict:
  """The manifest of folder `pack`, its structure checked; any problem is a DataError."""
  pack = Path(pack)
  path = pack / MANIFEST
  if not pack.is_dir():
    raise DataError(f"config.data.pack={str(pack)!r}: no such folder (expected a data pack built "
                    f"with python -m lcfed_jax.data.pack)")
  if not path.is_file():
    raise DataError(f"data pack {pack}: {path} is missing (expected the pack's manifest); rebuild "
                    f"the pack with python -m lcfed_jax.data.pack")
  try:
    m = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"data pack manifest {path} is not valid JSON ({e}); rebuild the pack") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"data pack manifest {path}: expected format {FORMAT!r}, found "
                    f"{m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
  if m.get("format_version") != FORMAT_VERSION:
    raise DataError(f"data pack manifest {path}: format_version {m.get('format_version')!r}, this "
                    f"code reads version {FORMAT_VERSION}; rebuild the pack with this version")
  need = ("task", "image_size", "settings", "site_names", "sites", "files", "in_channels",
          "num_classes", "class_names", "eval_unit", "postprocess", "image_codec")
  missing = [k for k in need if k not in m]
  if missing:
    raise DataError(f"data pack manifest {path} lacks {missing}; rebuild the pack")
  fmt = (m["image_codec"] or {}).get("format") if isinstance(m["image_codec"], dict) else None
  if fmt not in ("jpeg", "webp", "png"):
    raise DataError(f"data pack manifest {path}: image_codec format {fmt!r}, expected jpeg, webp or png")
  if fmt == "webp" and not features.check("webp"):
    raise DataError(f"data pack {pack} holds WebP images and this Pillow cannot decode WebP; install "
                    f"a Pillow built with libwebp (the PyPI wheels are) or rebuild the pack with "
                    f"--image_format jpeg")
  for site in m["site_names"]:
    for split in SPLITS:
      entry = (m["sites"].get(site) or {}).get(split) or {}
      if entry.get("file") not in m["files"] or not isinstance(entry.get("count"), int):
        raise DataError(f"data pack manifest {path}: site {site!r} split {split!r} names no file "
                        f"listed under 'files' or has no count; rebuild the pack")
  return m


def check_config(m: Dict, config, pack) -> None:
  """The pack must be the config's data: task, image size and every data setting."""
  path = Path(pack) / MANIFEST
  if m["task"] != config.data.task:
    raise DataError(f"data pack {path} holds task {m['task']!r}; the config's is "
                    f"config.data.task={config.data.task!r}")
  if int(m["image_size"]) != int(config.image_size):
    raise DataError(f"data pack {path} holds {m['image_size']} px images; the config expects "
                    f"config.image_size={config.image_size} (build a pack at that size)")
  live = data_settings(config)
  for key in sorted(set(m["settings"]) | set(live)):
    saved, now = m["settings"].get(key, "<absent>"), live.get(key, "<absent>")
    if saved != now:
      raise DataError(f"data pack {path} was built with {key}={saved!r} (sites {m['site_names']}); "
                      f"the config has {key}={now!r}: set --config.{key} to match or build a pack "
                      f"for these settings")


def site_names(config) -> List[str]:
  """The pack's sites, once its manifest is read and matched to the config (no data read)."""
  m = read_manifest(pack_dir(config))
  check_config(m, config, pack_dir(config))
  return list(m["site_names"])


def _read_split(pack: Path, m: Dict, site: str, split: str) -> SiteSplit:
  entry = m["sites"][site][split]
  fname = entry["file"]
  path = pack / fname
  if not path.is_file():
    raise DataError(f"data pack {pack}: {path} is missing (listed in {pack / MANIFEST})")
  raw = path.read_bytes()
  want = m["files"][fname]["sha256"]
  if hashlib.sha256(raw).hexdigest() != want:
    raise DataError(f"data pack {pack}: {path} fails its checksum (expected sha256 {want} from "
                    f"{pack / MANIFEST}); the file is corrupt or was changed: rebuild or copy the pack again")
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
      a = {key: z[key] for key in z.files}
    images = np.stack(_map(lambda b: decode_image(b, int(m["in_channels"])),
                           _split_blobs(a["images"], a["image_offsets"])))
    masks = np.stack(_map(lambda b: decode_mask(b, int(m["num_classes"])),
                          _split_blobs(a["masks"], a["mask_offsets"])))
  except (KeyError, ValueError, OSError) as e:
    raise DataError(f"data pack {pack}: {path} cannot be read ({type(e).__name__}: {e}); rebuild the pack") from None
  size = int(m["image_size"])
  if len(images) != entry["count"] or images.shape[1:3] != (size, size):
    raise DataError(f"data pack {pack}: {path} holds {images.shape[0]} images of {images.shape[1:3]}; "
                    f"{pack / MANIFEST} expects {entry['count']} of ({size}, {size})")
  return SiteSplit(images=images, masks=masks, names=[str(s) for s in a["names"]],
                   volume_ids=a.get("volume_ids"), slice_index=a.get("slice_index"))


def load_pack(config, sites: Optional[Iterable[int]] = None) -> FederatedData:
  """Every site's splits from config.data.pack (or those of `sites`; the others are None)."""
  t0 = time.time()
  pack = pack_dir(config)
  m = read_manifest(pack)
  check_config(m, config, pack)
  names = list(m["site_names"])
  wanted = set(range(len(names))) if sites is None else {int(i) for i in sites}
  train, test = [], []
  for k, site in enumerate(names):
    train.append(_read_split(pack, m, site, "train") if k in wanted else None)
    test.append(_read_split(pack, m, site, "test") if k in wanted else None)
  info = {"source": "pack", "pack": str(pack), "image_size": int(m["image_size"]),
          "image_codec": m["image_codec"], "loaded_sites": [names[k] for k in sorted(wanted)],
          "site_counts": {s: {sp: m["sites"][s][sp]["count"] for sp in SPLITS} for s in names},
          "load_seconds_total": round(time.time() - t0, 3)}
  return FederatedData(task=m["task"], site_names=names, train=train, test=test,
                       in_channels=int(m["in_channels"]), num_classes=int(m["num_classes"]),
                       class_names=list(m["class_names"]), eval_unit=m["eval_unit"],
                       postprocess=m["postprocess"], info=info)
