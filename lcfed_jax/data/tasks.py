"""One entry point for every task's data: `site_names(config)` and `task_io(config)`
(cheap: no data read) and `load_task(config, sites) -> FederatedData` (the splits of
`sites` only, None elsewhere). With `config.data.pack` set the data come from that pack
alone (lcfed_jax/data/packfile.py), without TFDS or the raw files."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from lcfed_jax.data.types import FederatedData


def _pack(config) -> str:
  return str(config.data.get("pack", "") or "")


def site_names(config) -> List[str]:
  """The task's sites, in order, from the config and a directory listing alone."""
  if _pack(config):
    from lcfed_jax.data.packfile import site_names as pack_sites
    return pack_sites(config)
  if config.data.task == "synthetic":
    from lcfed_jax.data.synthetic import site_names as synthetic_sites
    return synthetic_sites(int(config.data.num_sites))
  from lcfed_jax.data.real import site_configs   # TFDS: imported only for real tasks
  return [sc.site for sc in site_configs(config)]


def task_io(config) -> Tuple[int, int]:
  """(input channels, output classes) of the task's images and masks."""
  if _pack(config):
    from lcfed_jax.data.packfile import pack_dir, read_manifest
    m = read_manifest(pack_dir(config))
    return int(m["in_channels"]), int(m["num_classes"])
  if config.data.task == "synthetic":
    from lcfed_jax.data.synthetic import CLASSES, IN_CHANNELS
    return IN_CHANNELS, len(CLASSES)
  from lcfed_jax.data.real import TASK_INFO
  spec = TASK_INFO[config.data.task]
  return int(spec["builder"].IN_CHANNELS), len(spec["classes"])


def load_task(config, sites: Optional[Iterable[int]] = None) -> FederatedData:
  """Every site's splits, or those of `sites` (indices; the others are None)."""
  task = config.data.task
  if _pack(config):
    from lcfed_jax.data.packfile import load_pack
    return load_pack(config, sites=sites)
  if task == "synthetic":
    from lcfed_jax.data.synthetic import generate
    return generate(num_sites=int(config.data.num_sites), image_size=int(config.image_size),
                    train_sizes=tuple(config.data.train_sizes), test_size=int(config.data.test_size),
                    seed=int(config.data.seed), sites=sites)
  from lcfed_jax.data.real import load_real_task   # TFDS: imported only for real tasks
  return load_real_task(config, sites=sites)
