"""A workdir belongs to one experiment.

Before anything is written, a run that finds an earlier run's `config.json` (or
checkpoint) in its workdir compares the two configs. Keys that only steer the run
(rounds of the stages, evaluation, checkpointing, logging, devices, where the data lives)
may change: a longer schedule resumes, a new evaluation setting re-evaluates. Any other
difference (the method and its settings, the sites, the model, the image size, the
optimizer, the seed, ...) is refused with the keys that differ, because resuming or
re-evaluating would mix two experiments. `--config.resume=False` starts over after moving
the old run aside to `<workdir>.<timestamp>`; nothing is ever deleted or overwritten.
Only after these checks is `config.json` (re)written, atomically.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from lcfed_jax.config.defaults import with_added_settings
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError

# Keys (dotted prefixes) that may differ between runs in one workdir.
RUN_CONTROL = ("rounds", "lcfed.hc_rounds", "ft.rounds", "fedbabu.ft_rounds", "eval_every",
               "checkpoint_every", "checkpoint.", "eval.", "log.", "mesh.", "data_dir", "data.root",
               "data.tfds_dir", "resume", "sweep.")


def _flatten(d: Dict, prefix: str = "") -> Dict[str, object]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def _steers_only(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RUN_CONTROL)


def differences(old: Dict, new: Dict) -> List[str]:
  """'key: old -> new' for every experiment-defining key that differs."""
  a, b = _flatten(old), _flatten(new)
  out = []
  for key in sorted(set(a) | set(b)):
    if _steers_only(key):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return out


def previous_config(workdir: Path, checkpoint_meta: Optional[Dict]) -> Optional[Dict]:
  if checkpoint_meta is not None:
    return checkpoint_meta["config"]
  path = workdir / "config.json"
  if path.exists():
    try:
      return with_added_settings(json.loads(path.read_text()))
    except ValueError:
      raise UserError(f"{path} is not valid JSON: a workdir of an earlier run? use another --workdir")
  return None


GLOB_CHARS = "[]*?"


def check_writable(workdir: Path) -> None:
  bad = sorted({c for c in str(Path(workdir).absolute()) if c in GLOB_CHARS})
  if bad:
    # Orbax finds a checkpoint's per-process files with a glob over this path: with a
    # pattern character in it the files are not found, and the checkpoint saves but never
    # restores.
    raise UserError(f"--workdir {workdir} contains {' '.join(bad)}: checkpoints cannot be found "
                    f"under a path with glob characters ({GLOB_CHARS}); choose another path")
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} is a file, expected a directory (or a path that does not exist)")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir {workdir} cannot be created: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir} is not writable")


def move_aside(workdir: Path) -> Path:
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target = workdir.with_name(f"{workdir.name}.{stamp}")
  n = 1
  while target.exists():
    target = workdir.with_name(f"{workdir.name}.{stamp}-{n}")
    n += 1
  os.rename(workdir, target)
  return target


def claim(workdir, config, checkpoint_meta: Optional[Dict], log, site_names=None, write: bool = True) -> bool:
  """Checks that `config` may run in `workdir` (moving an old run aside when
  config.resume is False), then writes config.json. Every process of a multi-host run
  checks; only the one with `write` moves and writes. Returns whether an earlier run's
  checkpoint may be resumed."""
  workdir = Path(workdir)
  if write:
    check_writable(workdir)
  old = previous_config(workdir, checkpoint_meta)
  new = config.to_dict()
  if old is not None and not bool(config.resume):
    if write:
      moved = move_aside(workdir)
      log(f"config.resume=False: moved the earlier run in {workdir} to {moved}")
      check_writable(workdir)
    old, checkpoint_meta = None, None
  elif old is not None:
    diff = differences(old, new)
    if diff:
      raise UserError(
          f"--workdir {workdir} holds another experiment; these settings differ from its "
          f"config.json: {'; '.join(diff)}. Use another --workdir, or --config.resume=False to "
          f"move the earlier run aside and start over")
    saved_sites = (checkpoint_meta or {}).get("site_names")
    if saved_sites is not None and site_names is not None and list(saved_sites) != list(site_names):
      raise UserError(
          f"--workdir {workdir} holds a run on the sites {saved_sites}; the data found now has "
          f"{list(site_names)}. Use another --workdir, or --config.resume=False to move the "
          f"earlier run aside and start over")
  if write:
    files.atomic_write_json(workdir / "config.json", new)
  return checkpoint_meta is not None
