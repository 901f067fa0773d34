"""Build the TFDS data of a real task ahead of training (no TensorFlow needed).

  python -m lcfed_jax.data.build --task polyp --data_dir DIR [--image_size 384]
      [--tfds_dir DIR] [--root DIR] [--layout auto] [--polyp_site2 etis]
      [--prostate_mask auto] [--prostate_norm range] [--all_slices]

Prints per-site train/test counts and the build time. A site that is already built is
read from the cache (build time shown as 'cached'). Exits 2 with a message on bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lcfed_jax.data.build", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", required=True, choices=["polyp", "fundus", "prostate", "faz"])
  p.add_argument("--data_dir", default=None, help="raw data root (default $LCFED_DATA_DIR)")
  p.add_argument("--root", default=None, help="the task's raw folder (overrides data_dir)")
  p.add_argument("--image_size", type=int, default=384)
  p.add_argument("--tfds_dir", default=None,
                 help="prepared data (default $LCFED_TFDS_DIR or ~/.cache/lcfed_jax/tfds)")
  p.add_argument("--layout", default="auto")
  p.add_argument("--polyp_site2", default="etis", choices=["etis", "colondb_as_released"])
  p.add_argument("--prostate_mask", default="auto",
                 choices=["auto", "foreground_255", "inverted"])
  p.add_argument("--prostate_norm", default="range", choices=["range", "vmax_as_released"])
  p.add_argument("--all_slices", action="store_true",
                 help="prostate: keep slices without foreground too")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for noisy in ("absl", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  from ml_collections import config_dict
  from lcfed_jax.data import real
  from lcfed_jax.util.errors import UserError

  config = config_dict.ConfigDict()
  config.data_dir = args.data_dir
  config.image_size = args.image_size
  config.data = config_dict.ConfigDict(dict(
      task=args.task, root=args.root, tfds_dir=args.tfds_dir, layout=args.layout,
      polyp_site2=args.polyp_site2, prostate_mask=args.prostate_mask,
      prostate_norm=args.prostate_norm, foreground_slices_only=not args.all_slices))
  t0 = time.time()
  try:
    fd = real.load_real_task(config)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = fd.info
  print(f"task {fd.task}: {fd.num_sites} sites, {info['image_size']}px, layout "
        f"{info['layout']}, root {info['root']}")
  print(f"prepared data: {info['tfds_dir']}")
  for i, site in enumerate(fd.site_names):
    b = info["build_seconds"][site]
    extra = ""
    if "mask_convention" in info:
      extra = f"  mask {info['mask_convention'].get(site)}"
    print(f"  {site:12s} train {len(fd.train[i]):5d}  test {len(fd.test[i]):5d}  "
          f"build {'cached' if b is None else f'{b:.1f} s'}{extra}")
  print(f"total: train {sum(map(len, fd.train))}, test {sum(map(len, fd.test))}; build "
        f"{info['build_seconds_total']:.1f} s, build+load {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
