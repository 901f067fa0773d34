"""Polyp segmentation (endoscopy, RGB), LC-Fed's 4 sites (docs/datasets.md).

Two raw layouts (`layout`):

* `pranet`: PraNet's release, which LC-Fed uses::

    <root>/TrainDataset/{image,mask}/ (or {images,masks}/)   900 Kvasir (names 'c...') + 550 ClinicDB (numeric)
    <root>/TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB}/{images,masks}/

  Sites (code order): kvasir (train: TrainDataset names starting with 'c'; test:
  TestDataset/Kvasir), etis (ETIS-LaribPolypDB frames 1..170 train, 171..196 test; with
  polyp_site2='colondb_as_released' the official code's leaky choice: CVC-ColonDB frames
  1..170 / 171..196), colondb (CVC-ColonDB frames 1..220 + 273..379 train, 221..272 test,
  380 unused), clinicdb (train: numeric TrainDataset names; test: TestDataset/CVC-ClinicDB).

* `per_site`: one folder per site, no fixed split::

    <root>/<site>/{images,masks}/     site in kvasir, etis, colondb, clinicdb (any subset;
                                      also Kvasir-SEG, CVC-ColonDB, ... as folder names)

  Sites present are used, in the code order kvasir, etis, colondb, clinicdb. Splits:
  colondb: LC-Fed's frame split (train 1..220 + 273..379, test 221..272, frame 380 unused);
  etis: frames 1..170 train / 171..196 test; others (kvasir, clinicdb): sort the names
  (natural order), test = ceil(10%) chosen by `np.random.default_rng(0).permutation`
  (seed log = logging.getLogger(__name__)

POLYP_SPLIT_SEED = 0), train = the rest. With polyp_site2='colondb_as_released'
  site 'etis' is read from the colondb folder, frames 1..170 / 171..196.

Masks: foreground = grey value > 127 (any value allowed; JPEG masks have soft edges), or
value 1 in a mask stored as {0, 1}.
Images: RGB (grey images are repeated to 3 channels). Resize bilinear (image) / nearest
(mask) to the config's image size; stored uint8, 1 mask channel.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List


from lcfed_jax.data.builders import common, files
from lcfed_jax.util.errors import DataError

log = logging.getLogger(__name__)

POLYP_SPLIT_SEED = 0
SITE_ORDER = ("kvasir", "etis", "colondb", "clinicdb")
PER_SITE_ALIASES = {
    "kvasir": ("kvasir", "kvasir-seg"),
    "etis": ("etis", "etis-laribpolypdb", "etis-larib"),
    "colondb": ("colondb", "cvc-colondb"),
    "clinicdb": ("clinicdb", "cvc-clinicdb"),
}
PRANET_TEST = {"kvasir": "Kvasir", "etis": "ETIS-LaribPolypDB", "colondb": "CVC-ColonDB",
               "clinicdb": "CVC-ClinicDB"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Polyp data (Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB, ETIS-LaribPolypDB).
Either (a) PraNet's release, as used by LC-Fed: download TrainDataset.zip and
TestDataset.zip from the PraNet repository (github.com/DengPingFan/PraNet, "Training /
Testing dataset" links) and unzip both into <data_dir>/polyp/ so that
<data_dir>/polyp/TrainDataset/{image,mask}/ and
<data_dir>/polyp/TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB}/{images,masks}/
exist; or (b) one folder per site, <data_dir>/polyp/{kvasir,etis,colondb,clinicdb}/{images,masks}/
(any subset), image and mask sharing a base name, e.g. images/12.jpg + masks/12.png
(Kvasir-SEG: datasets.simula.no/kvasir-seg; CVC-ClinicDB and CVC-ColonDB: CVC Barcelona,
polyp.grand-challenge.org). Build ahead with
  python -m lcfed_jax.data.build --task polyp --data_dir <data_dir>
"""
LAYOUT_TEXT = ("<root>/TrainDataset/{image,mask}/ + <root>/TestDataset/<Kvasir|CVC-ClinicDB|"
               "CVC-ColonDB|ETIS-LaribPolypDB>/{images,masks}/ (PraNet), or "
               "<root>/<kvasir|etis|colondb|clinicdb>/{images,masks}/ (per site)")

COLONDB_TRAIN = set(range(1, 221)) | set(range(273, 380))
COLONDB_TEST = set(range(221, 273))
SITE2_TRAIN = set(range(1, 171))
SITE2_TEST = set(range(171, 197))


def detect_layout(root: Path, layout: str = "auto") -> str:
  if not root.is_dir():
    raise common.missing_root_error(root, "polyp", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  is_pranet = files.find_subdir(root, ["TrainDataset"]) and files.find_subdir(root, ["TestDataset"])
  if layout == "auto":
    if is_pranet:
      return "pranet"
    if per_site_dirs(root):
      return "per_site"
    raise common.missing_root_error(root, "polyp", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if layout == "pranet" and not is_pranet:
    raise common.missing_root_error(root, "polyp", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if layout == "per_site" and not per_site_dirs(root):
    raise common.missing_root_error(root, "polyp", LAYOUT_TEXT, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if layout not in ("pranet", "per_site"):
    raise DataError(f"config.data.layout='{layout}' is not a polyp layout; use 'auto', "
                    "'pranet' or 'per_site'.")
  return layout


def per_site_dirs(root: Path) -> Dict[str, Path]:
  out = {}
  for site in SITE_ORDER:
    d = files.find_subdir(root, PER_SITE_ALIASES[site])
    if d is not None:
      out[site] = d
  return out


def site_names(root: Path, layout: str, polyp_site2: str) -> List[str]:
  """Sites to build, in LC-Fed's code order."""
  if polyp_site2 not in ("etis", "colondb_as_released"):
    raise DataError(f"config.data.polyp_site2='{polyp_site2}'; use 'etis' or "
                    "'colondb_as_released'.")
  if layout == "pranet":
    return list(SITE_ORDER)
  present = per_site_dirs(root)
  sites = [s for s in SITE_ORDER if s in present]
  if polyp_site2 == "colondb_as_released" and "colondb" in present and "etis" not in sites:
    sites = [s for s in SITE_ORDER if s in present or s == "etis"]
  if "etis" not in sites:
    log.info("polyp per-site layout: no ETIS folder under %s (and polyp_site2='%s'), so "
             "%d sites are used: %s", root, polyp_site2, len(sites), sites)
  return sites


def _frame(stem: str, path: Path) -> int:
  if not stem.isdigit():
    raise DataError(f"{path}: expected a numeric frame name (1.png, 2.png, ...) for this "
                    "site's frame-based split.")
  return int(stem)


def _frames(pairs, keep):
  return [p for p in pairs if _frame(p[0], p[1]) in keep]


class LcfedPolyp(common.SiteBuilder):
  """LC-Fed polyp segmentation sites (Kvasir, ETIS, CVC-ColonDB, CVC-ClinicDB)."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  IN_CHANNELS = 3
  NUM_CLASSES = 1

  def plan(self, cfg):
    root, site = Path(cfg.root), cfg.site
    site2 = cfg.options.get("polyp_site2", "etis")
    if cfg.layout == "pranet":
      train_dir = files.find_subdir(root, ["TrainDataset"])
      test_root = files.find_subdir(root, ["TestDataset"])
      test_dir = lambda name: test_root / name
      if site in ("kvasir", "clinicdb"):
        pairs = files.pair_dir(train_dir)
        other = [p[0] for p in pairs if not (p[0].isdigit() or p[0].lower().startswith("c"))]
        if other:
          log.warning("polyp TrainDataset: %d names are neither Kvasir ids ('c...') nor "
                      "ClinicDB numbers and are not used, e.g. %s", len(other), other[:3])
        if site == "kvasir":
          train = [p for p in pairs if p[0].lower().startswith("c")]
        else:
          train = [p for p in pairs if p[0].isdigit()]
        return {"train": train, "test": files.pair_dir(test_dir(PRANET_TEST[site]))}
      if site == "colondb":
        pairs = files.pair_dir(test_dir(PRANET_TEST["colondb"]))
        return {"train": _frames(pairs, COLONDB_TRAIN), "test": _frames(pairs, COLONDB_TEST)}
      if site == "etis":
        src = PRANET_TEST["colondb" if site2 == "colondb_as_released" else "etis"]
        pairs = files.pair_dir(test_dir(src))
        return {"train": _frames(pairs, SITE2_TRAIN), "test": _frames(pairs, SITE2_TEST)}
    else:
      dirs = per_site_dirs(root)
      if site == "etis":
        pairs = files.pair_dir(dirs["colondb" if site2 == "colondb_as_released" else "etis"])
        return {"train": _frames(pairs, SITE2_TRAIN), "test": _frames(pairs, SITE2_TEST)}
      pairs = files.pair_dir(dirs[site])
      if site == "colondb":
        return {"train": _frames(pairs, COLONDB_TRAIN), "test": _frames(pairs, COLONDB_TEST)}
      train, test = files.split_seeded(pairs, 0.1, POLYP_SPLIT_SEED)
      return {"train": train, "test": test}
    raise DataError(f"Unknown polyp site '{site}'.")

  def load_unit(self, unit, cfg):
    stem, img_path, mask_path = unit
    img, m = common.read_pair(img_path, mask_path, 3)
    fg = common.foreground(m, mask_path)
    s = cfg.image_size
    return [common.Example(image=common.resize_image(img, s),
                           mask=common.resize_labels(fg, s)[..., None], name=stem)]
