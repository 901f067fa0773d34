"""Real datasets (polyp, fundus, prostate, faz) through TFDS builders, without TensorFlow.

`load_real_task(config)` builds each site's TFDS dataset on first use (array_record files
under `config.data.tfds_dir`), reads it back with `builder.as_data_source()`, sorts the
records by their stored index and returns a `FederatedData` of uint8 arrays.

Where the raw data is looked for (first match wins):
  1. `config.data.root` if set;
  2. `{data_dir}/{task}`;
  3. fundus only: `{data_dir}/samples/Fundus`; prostate only: `{data_dir}/samples/ProstateSlice`
     (the tiny sample folders, for smoke tests);
with `data_dir = config.data_dir or $LCFED_DATA_DIR`. The raw folder is only read.

Prepared data goes to `config.data.tfds_dir or $LCFED_TFDS_DIR or ~/.cache/lcfed_jax/tfds`,
as `<tfds_dir>/lcfed_<task>/<site>_<size>px_<hash>/1.0.0/`. The hash covers the raw root
(absolute path), the layout and the options that change the data (polyp_site2 for the
ETIS site; prostate_mask, prostate_norm, foreground_slices_only for prostate), so a
change in any of them, or in the image size, makes a new build instead of reusing a
stale one. Delete the folder to force a rebuild after editing raw files in place.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional


from lcfed_jax.data.builders import common
from lcfed_jax.data.builders import faz as faz_lib
from lcfed_jax.data.builders import fundus as fundus_lib
from lcfed_jax.data.builders import polyp as polyp_lib
from lcfed_jax.data.builders import prostate as prostate_lib
from lcfed_jax.data.types import FederatedData, SiteSplit
from lcfed_jax.util.errors import DataError

log = logging.getLogger(__name__)

TASKS = ("polyp", "fundus", "prostate", "faz")

TASK_INFO = {
    "polyp": dict(builder=polyp_lib.LcfedPolyp, roots=("polyp",), classes=["polyp"],
                  eval_unit="image", postprocess="none", module=polyp_lib),
    "fundus": dict(builder=fundus_lib.LcfedFundus, roots=("fundus", "samples/Fundus"),
                   classes=["optic_disc", "optic_cup"], eval_unit="image",
                   postprocess="largest_component", module=fundus_lib),
    "prostate": dict(builder=prostate_lib.LcfedProstate,
                     roots=("prostate", "samples/ProstateSlice"), classes=["prostate"],
                     eval_unit="volume", postprocess="largest_component",
                     module=prostate_lib),
    "faz": dict(builder=faz_lib.LcfedFaz, roots=("faz",), classes=["faz"],
                eval_unit="image", postprocess="none", module=faz_lib),
}

def _get(cfg, key, default=None):
  if cfg is None:
    return default
  try:
    v = cfg.get(key, default)
  except AttributeError:
    v = getattr(cfg, key, default)
  return default if v is None else v


def resolve_paths(config) -> Dict[str, str]:
  """{'root': raw folder, 'tfds_dir': prepared-data folder} for config.data.task."""
  data = _get(config, "data")
  task = _get(data, "task")
  if task not in TASKS:
    raise DataError(f"config.data.task='{task}' is not a real task; use one of {TASKS}.")
  tfds_dir = (_get(data, "tfds_dir") or os.environ.get("LCFED_TFDS_DIR")
              or os.path.join("~", ".cache", "lcfed_jax", "tfds"))
  tfds_dir = os.path.abspath(os.path.expanduser(tfds_dir))
  root = _get(data, "root")
  if not root:
    data_dir = _get(config, "data_dir") or os.environ.get("LCFED_DATA_DIR")
    if not data_dir:
      raise DataError(
          f"No data directory for task '{task}': set config.data_dir (or the environment "
          f"variable LCFED_DATA_DIR) to the folder holding '{task}/', or config.data.root to "
          f"the task's folder.\n\nHow to get the data:\n"
          f"{TASK_INFO[task]['module'].MANUAL_DOWNLOAD_INSTRUCTIONS}")
    data_dir = os.path.expanduser(data_dir)
    candidates = [os.path.join(data_dir, r) for r in TASK_INFO[task]["roots"]]
    root = next((c for c in candidates if os.path.isdir(c)), candidates[0])
  root = os.path.abspath(os.path.expanduser(root))
  if os.path.abspath(tfds_dir).startswith(root + os.sep) or tfds_dir == root:
    raise DataError(f"config.data.tfds_dir={tfds_dir} is inside the raw data folder {root}, "
                    "which is only read; choose another folder.")
  return {"root": root, "tfds_dir": tfds_dir}


def site_configs(config) -> List[common.SiteConfig]:
  """The per-site build configs (site, size, root, resolved layout, options) of the task."""
  data = _get(config, "data")
  task = _get(data, "task")
  paths = resolve_paths(config)
  root = Path(paths["root"])
  size = int(_get(config, "image_size", 384))
  if size < 8:
    raise DataError(f"config.image_size={size} is too small (minimum 8).")
  layout = _get(data, "layout", "auto")
  mod = TASK_INFO[task]["module"]
  if task == "polyp":
    layout = polyp_lib.detect_layout(root, layout)
    site2 = _get(data, "polyp_site2", "etis")
    sites = polyp_lib.site_names(root, layout, site2)
    opts = lambda s: {"polyp_site2": site2} if s == "etis" else {}
  elif task == "prostate":
    layout = prostate_lib.detect_layout(root, layout)
    sites = prostate_lib.site_names(root, layout)
    o = {"foreground_slices_only": bool(_get(data, "foreground_slices_only", True))}
    if layout == "slices":
      o["prostate_mask"] = _get(data, "prostate_mask", "auto")
    else:
      o["prostate_norm"] = _get(data, "prostate_norm", "range")
    opts = lambda s: dict(o)
  else:
    if layout not in ("auto", task):
      raise DataError(f"config.data.layout='{layout}' does not apply to {task}; use 'auto'.")
    layout = task
    sites = [name for name, _ in mod.site_dirs(root)]
    opts = lambda s: {}
  if not sites:
    raise common.missing_root_error(root, task, mod.LAYOUT_TEXT, mod.MANUAL_DOWNLOAD_INSTRUCTIONS)
  num_sites = int(_get(data, "num_sites", 0) or 0)
  if num_sites < 0 or num_sites > len(sites):
    raise DataError(f"config.data.num_sites={num_sites} but {root} has {len(sites)} sites "
                    f"{sites}; use 0 (all) or 1..{len(sites)}.")
  if num_sites:
    sites = sites[:num_sites]
  return [common.SiteConfig(site=s, image_size=size, root=str(root), layout=layout,
                            options=opts(s)) for s in sites]


def _check_writable_dir(path: str) -> None:
  """The prepared-data folder must be a directory this process can write (builds go there)."""
  p = Path(path)
  if p.exists() and not p.is_dir():
    raise DataError(f"config.data.tfds_dir / $LCFED_TFDS_DIR {p} is a file; expected a directory")
  try:
    p.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"the prepared-data directory {p} (config.data.tfds_dir / $LCFED_TFDS_DIR) "
                    f"cannot be created: {e.strerror}") from None
  if not os.access(p, os.W_OK | os.X_OK):
    raise DataError(f"the prepared-data directory {p} (config.data.tfds_dir / $LCFED_TFDS_DIR) "
                    f"is not writable")


def load_real_task(config, sites: Optional[Iterable[int]] = None) -> FederatedData:
  """Build (first use) and read the sites of config.data.task; returns uint8 arrays.
  `sites`: the indices to build and read (default all); the others' splits are None, so
  a host of a multi-host run touches only the files of its own sites."""
  task = _get(_get(config, "data"), "task")
  paths = resolve_paths(config)
  cfgs = site_configs(config)
  _check_writable_dir(paths["tfds_dir"])
  spec = TASK_INFO[task]
  builder_cls = spec["builder"]
  wanted = set(range(len(cfgs))) if sites is None else {int(i) for i in sites}
  t_all = time.time()
  train, test, counts, build_s, conventions = [], [], {}, {}, {}
  for i, sc in enumerate(cfgs):
    if i not in wanted:
      train.append(None)
      test.append(None)
      continue
    builder, seconds = common.build_site(builder_cls, sc, paths["tfds_dir"])
    build_s[sc.site] = None if seconds is None else round(seconds, 3)
    if seconds is not None:
      log.info("%s/%s: built at %dpx in %.1f s -> %s", task, sc.site, sc.image_size,
               seconds, builder.data_dir)
    splits = []
    for split in ("train", "test"):
      d = common.read_split(builder, split)
      per_volume = task == "prostate"
      splits.append(SiteSplit(images=d["images"], masks=d["masks"], names=d["names"],
                              volume_ids=d["volume_ids"] if per_volume else None,
                              slice_index=d["slice_index"] if per_volume else None))
    train.append(splits[0])
    test.append(splits[1])
    counts[sc.site] = {"train": len(splits[0]), "test": len(splits[1])}
    conv = builder.info.metadata.get("mask_convention") if builder.info.metadata else None
    if conv:
      conventions[sc.site] = conv
  in_ch = builder_cls.IN_CHANNELS
  info = {
      "source": "tfds",
      "root": paths["root"],
      "tfds_dir": paths["tfds_dir"],
      "layout": cfgs[0].layout,
      "loaded_sites": [sc.site for i, sc in enumerate(cfgs) if i in wanted],
      "image_size": cfgs[0].image_size,
      "site_counts": counts,
      "build_seconds": build_s,
      "build_seconds_total": round(sum(v for v in build_s.values() if v), 3),
      "load_seconds_total": round(time.time() - t_all, 3),
      "config_names": {sc.site: sc.config_name() for sc in cfgs},
      "options": {sc.site: sc.options for sc in cfgs},
  }
  if conventions:
    info["mask_convention"] = conventions
  log.info("%s: sites %s, counts %s, build %.1f s, total %.1f s", task,
           info["loaded_sites"], counts, info["build_seconds_total"],
           info["load_seconds_total"])
  return FederatedData(task=task, site_names=[sc.site for sc in cfgs], train=train,
                       test=test, in_channels=in_ch, num_classes=len(spec["classes"]),
                       class_names=list(spec["classes"]), eval_unit=spec["eval_unit"],
                       postprocess=spec["postprocess"], info=info)
