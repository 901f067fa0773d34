"""Build a data pack: a task's prepared sites in one folder that trains without raw data.

  python -m lcfed_jax.data.pack polyp --image_size 256 --out packs/polyp256
  python -m lcfed_jax.data.pack faz --image_size 256 --out packs/faz256 [--quality 50]
  python -m lcfed_jax.data.pack synthetic --image_size 32 --tiny --out /tmp/tiny_pack
      [--data_dir DIR] [--set data.polyp_site2=etis ...] [--image_format webp|jpeg|png]
      [--quality auto|Q] [--max_mib 30]

The sites come from `load_task` exactly as a run would load them (real tasks through the
TFDS builders, from `--data_dir` or $LCFED_DATA_DIR; `--set` changes a config.data
setting, `--tiny` applies the tiny test size's data settings), then are encoded into
`--out` (lcfed_jax/data/packfile.py: the format). Images are WebP by default: at the
same size it codes them with about half JPEG's error, which is what moves a model's
scores (FAZ's speckle needs quality ~50 to fit 30 MiB at 256 px). `--quality auto`
(default) takes the highest quality in 95, 90, ..., 30 whose pack fits `--max_mib` MiB;
the manifest states the codec and quality used, the size and the images' mean and
largest absolute error.
Train from it with `python launch.py --config configs/<task>.py --config.data.pack=DIR
--config.image_size=SIZE ...` (the data settings must match the pack's). Exit 2 with one
line on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

QUALITIES = tuple(range(95, 25, -5))


def _config(args):
  from lcfed_jax.config.defaults import TASKS, apply_tiny, base_config, set_dotted
  from lcfed_jax.util.errors import ConfigError
  if args.task not in TASKS:
    raise ConfigError(f"task {args.task!r}: expected one of {list(TASKS)}")
  c = base_config(args.task)
  if args.tiny:
    apply_tiny(c)
  c.image_size = args.image_size
  if args.data_dir:
    c.data_dir = args.data_dir
  for item in args.set:
    key, sep, value = item.partition("=")
    settable = sorted(k for k in c.data if k not in ("task", "pack"))
    if not sep or not key.startswith("data.") or key.split(".", 1)[1] not in settable:
      raise ConfigError(f"--set {item!r}: expected data.<key>=<value>, key one of {settable}")
    default = c.data[key.split(".", 1)[1]]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true")
    elif isinstance(default, (tuple, list)):
      value = tuple(int(v) for v in value.strip("()[] ").split(",") if v.strip())
    else:
      value = type(default)(value)
    set_dotted(c, key, value)
  c.data.pack = ""
  return c


def encode_all(data, codec):
  from lcfed_jax.data.packfile import encode_split
  return {f"{site}.{split}": encode_split(getattr(data, split)[k], codec)
          for k, site in enumerate(data.site_names) for split in ("train", "test")}


def choose_quality(data, budget: int, log, fmt: str = "jpeg") -> int:
  """The highest quality whose images, estimated on every 8th image, fit `budget` bytes."""
  from lcfed_jax.data.packfile import encode_image
  sample = [s.images[i] for s in data.train + data.test for i in range(0, len(s), 8)]
  total = sum(len(s) for s in data.train + data.test)
  for q in QUALITIES:
    est = sum(len(encode_image(a, {"format": fmt, "quality": q})) for a in sample) * total / len(sample)
    log(f"  quality {q}: about {est / 2**20:.1f} MiB of images")
    if est <= budget:
      return q
  return QUALITIES[-1]


def image_error(data, arrays, codec) -> dict:
  from lcfed_jax.data import packfile
  errs, worst = [], 0
  for k, site in enumerate(data.site_names):
    for split in ("train", "test"):
      a = arrays[f"{site}.{split}"]
      dec = packfile._map(lambda b: packfile.decode_image(b, data.in_channels),
                          packfile._split_blobs(a["images"], a["image_offsets"]))
      for x, y in zip(getattr(data, split)[k].images, dec):
        d = np.abs(x.astype(np.int16) - y.astype(np.int16))
        errs.append(d.mean())
        worst = max(worst, int(d.max()))
  return {"mean_abs": round(float(np.mean(errs)), 3), "max_abs": worst}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lcfed_jax.data.pack", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("task")
  p.add_argument("--image_size", type=int, required=True)
  p.add_argument("--out", required=True, help="the new pack folder (must not exist)")
  p.add_argument("--data_dir", default="", help="raw data root (default $LCFED_DATA_DIR)")
  p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE")
  p.add_argument("--tiny", action="store_true", help="the tiny test size's data settings")
  p.add_argument("--image_format", choices=("webp", "jpeg", "png"), default="webp")
  p.add_argument("--quality", default="auto", help="JPEG or WebP quality 1..95, or auto")
  p.add_argument("--max_mib", type=float, default=30.0, help="size budget of --quality auto")
  args = p.parse_args(argv)
  from lcfed_jax.data import packfile, tasks
  from lcfed_jax.util.errors import UserError
  log = lambda s: print(s, flush=True)
  try:
    if args.quality != "auto" and not (args.quality.isdigit() and 1 <= int(args.quality) <= 95):
      raise UserError(f"--quality {args.quality!r}: expected auto or an integer in 1..95")
    config = _config(args)
    if os.path.exists(args.out):
      raise UserError(f"--out {args.out} exists; remove it or choose another folder (a pack is never overwritten)")
    t0 = time.time()
    data = tasks.load_task(config)
    t_load = time.time() - t0
    log(f"{data.task}: sites {data.site_names}, train {[len(s) for s in data.train]}, test "
        f"{[len(s) for s in data.test]} at {args.image_size} px, loaded in {t_load:.1f} s")
    budget = int(args.max_mib * 2**20)
    if args.image_format == "png":
      codec = {"format": "png"}
    elif args.quality == "auto":
      fmt = args.image_format
      codec = {"format": fmt, "quality": choose_quality(data, int(budget * 0.97), log, fmt)}
    else:
      codec = {"format": args.image_format, "quality": int(args.quality)}
    while True:
      arrays = encode_all(data, codec)
      other = sum(sum(int(v.nbytes) for key, v in a.items() if key != "images") for a in arrays.values())
      total = packfile.image_bytes(arrays) + other
      auto = codec["format"] != "png" and args.quality == "auto"
      if total <= budget or not auto or codec["quality"] <= QUALITIES[-1]:
        break
      log(f"  quality {codec['quality']}: {total / 2**20:.1f} MiB > {args.max_mib} MiB, trying lower")
      codec = dict(codec, quality=codec["quality"] - 5)
    if codec["format"] == "jpeg":
      codec["subsampling"] = "4:4:4"
    err = image_error(data, arrays, codec)
    m = packfile.write_pack(data, packfile.data_settings(config), args.out, arrays, codec, extra={
        "image_error": err, "build_seconds": round(time.time() - t0, 1),
        "built_by": "python -m lcfed_jax.data.pack " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": {k: v for k, v in data.info.items() if k in ("layout", "options", "config_names",
                                                               "mask_convention", "protocols")}})
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  mib = m["total_bytes"] / 2**20
  log(f"wrote {args.out}: {mib:.1f} MiB, images {codec}, image error mean {err['mean_abs']} max "
      f"{err['max_abs']} (grey levels), masks lossless; {m['build_seconds']} s")
  if mib > args.max_mib:
    log(f"warning: {mib:.1f} MiB is over --max_mib {args.max_mib}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
