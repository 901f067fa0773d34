"""Collect what a device command returned (results/gpu_collect.sh) and rebuild the table.

  python -m lcfed_jax.run.gpu_collect ARCHIVE [--results_root results] [--cache_dir .xla_cache]

ARCHIVE is the `gpu_<task>.tar.gz` of `lcfed_jax.run.gpu_session`. Its runs/<method>/
seed<s>/ files go to <results_root>/<task>/gpu/runs/ (a file collected before is kept: a
seed is run once), its row labels to labels.json and its session log is appended to
sessions.jsonl (the time estimates of later sessions read both). An `xla_cache.tar.gz`
beside the archive replaces --cache_dir, which results/gpu_run.sh uses as the persistent
compilation cache (carry it to the device with the pack). Then results.md / results.csv
(mean ± sample std over seeds, per site), iou_curves.png and overlays_best_worst.png are
rebuilt from every run collected so far, in the order of results/gpu_run.sh's methods.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

ORDER = ("local", "fedavg", "ft", "fedbn", "fedrep", "prrfl", "lcfed", "lcfed_lcfed.hc=False",
         "fedprox", "ditto", "fedper", "fedbabu")


def _safe(name: str) -> bool:
  return not name.startswith("/") and ".." not in Path(name).parts


def unpack(archive: Path, results_root: Path) -> Tuple[Path, List[str]]:
  """Unpacks into <results_root>/<task>/gpu; returns that folder and the files kept as they were."""
  with tarfile.open(archive, "r:gz") as tar:
    members = {m.name: m for m in tar.getmembers() if m.isfile() and _safe(m.name)}
    if "session.jsonl" not in members:
      raise SystemExit(f"error: {archive} holds no session.jsonl: not an archive of results/gpu_run.sh")
    read = lambda name: tar.extractfile(members[name]).read()
    session = [json.loads(line) for line in read("session.jsonl").decode().splitlines() if line.strip()]
    task = session[0]["task"]
    dest = results_root / task / "gpu"
    kept = []
    for name in sorted(members):
      if not name.startswith("runs/"):
        continue
      target = dest / name
      data = read(name)
      if target.exists():
        if target.read_bytes() != data:
          kept.append(str(target))
        continue
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(data)
    labels_path = dest / "labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    if "labels.json" in members:
      labels.update(json.loads(read("labels.json")))
    dest.mkdir(parents=True, exist_ok=True)
    labels_path.write_text(json.dumps(labels, indent=1, sort_keys=True) + "\n")
    stamp = {"archive": archive.name, "collected_from": str(archive)}
    with open(dest / "sessions.jsonl", "a") as f:
      for rec in session:
        f.write(json.dumps(dict(rec, **stamp), sort_keys=True) + "\n")
  return dest, kept


def restore_cache(archive: Path, cache_dir: Path) -> bool:
  cache = archive.parent / "xla_cache.tar.gz"
  if not cache.exists():
    return False
  if cache_dir.exists():
    shutil.rmtree(cache_dir)
  cache_dir.mkdir(parents=True)
  with tarfile.open(cache, "r:gz") as tar:
    tar.extractall(cache_dir, members=[m for m in tar.getmembers() if _safe(m.name)])
  return True


def collected(dest: Path) -> List[Tuple[str, int, Path]]:
  """(label, seed, folder) of every finished run collected, in ORDER then by name and seed."""
  labels = json.loads((dest / "labels.json").read_text()) if (dest / "labels.json").exists() else {}
  dirs = sorted({p.parent.parent.name for p in dest.glob("runs/*/seed*/results.json")},
                key=lambda d: (ORDER.index(d) if d in ORDER else len(ORDER), d))
  return [(labels.get(d, d), int(p.parent.name[4:]), p.parent)
          for d in dirs for p in sorted((dest / "runs" / d).glob("seed*/results.json"),
                                         key=lambda p: int(p.parent.name[4:]))]


def rebuild(dest: Path, log=print) -> Dict:
  """results.md / .csv and the figures of everything collected under `dest`."""
  import ml_collections
  from lcfed_jax.run import sweep
  runs = collected(dest)
  if not runs:
    log(f"nothing collected under {dest} yet")
    return {}
  first = json.loads((runs[0][2] / "config.json").read_text())
  config = ml_collections.ConfigDict(first)
  programs, seen = [], set()      # one row per program: seeds trained together share a timing
  for label, seed, folder in runs:
    c = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
    key = (label, tuple(c.seeds) or (seed,))
    if key not in seen:
      seen.add(key)
      programs.append((label, key[1], c, folder))
  note = (f"GPU protocol, collected from device sessions (results/README.md). Rerun: bash "
          f"results/gpu_run.sh {first['data']['task']} on a device, then bash results/gpu_collect.sh.")
  return sweep.write_summary(dest, runs, log, sweep.protocol_line(config, programs, note))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lcfed_jax.run.gpu_collect", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("archive", type=Path)
  p.add_argument("--results_root", type=Path, default=Path("results"))
  p.add_argument("--cache_dir", type=Path, default=Path(".xla_cache"))
  args = p.parse_args(argv)
  if not args.archive.is_file():
    print(f"error: {args.archive}: no such archive (expected $OUT/gpu_<task>.tar.gz of results/gpu_run.sh)",
          file=sys.stderr)
    return 2
  dest, kept = unpack(args.archive, args.results_root)
  for path in kept:
    print(f"kept the earlier {path} (the archive's copy differs)")
  if restore_cache(args.archive, args.cache_dir):
    print(f"XLA cache restored into {args.cache_dir}: carry it with the pack next time")
  results = rebuild(dest)
  print(f"collected into {dest}: {len(results)} methods")
  return 0


if __name__ == "__main__":
  sys.exit(main())
