"""A client's state dir: what a site keeps between rounds and across restarts.

  state.msgpack     the site's one-site `FedState` (parameters, model state, optimizer
                    state, data key, round), the heads of every site it holds (LC-Fed's
                    HC needs them) and which run and site it belongs to
  selected.msgpack  a copy of state.msgpack as it was at the round the server selected

Each file is written whole or not at all (a temporary file renamed over the old one), so a
client killed at any moment restarts from its last completed step. A state of another
Flower run is moved aside (to `previous-<time>/`), never overwritten; a state whose
leaves do not match the model is refused with the path that differs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import jax
import numpy as np
from flax import serialization

from lcfed_jax.deploy import records
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError

STATE, SELECTED = "state.msgpack", "selected.msgpack"


@dataclasses.dataclass
class Saved:
  state: Any                               # one-site FedState, NumPy leaves
  heads: Optional[Dict[str, np.ndarray]]   # every site's head ({'kernel', 'bias'}, site axis)
  meta: Dict                               # {'run_id', 'site', ...}


class Store:
  def __init__(self, root):
    self.root = Path(root)
    self.root.mkdir(parents=True, exist_ok=True)

  def path(self, which: str = STATE) -> Path:
    return self.root / which

  def stamp(self, which: str = STATE):
    """Identifies the file's current version (a rename makes a new inode): another process
    of the same client (Flower's simulation runs a node's messages on any worker) may have
    written it since this one read it."""
    try:
      st = os.stat(self.path(which))
    except FileNotFoundError:
      return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)

  def save(self, state, heads: Optional[Dict[str, np.ndarray]], meta: Dict) -> None:
    payload = {"leaves": {p: np.asarray(v) for p, v in records.leaves(state).items()},
               "heads": {} if heads is None else {k: np.asarray(v) for k, v in heads.items()},
               "meta": json.dumps(meta, sort_keys=True)}
    files.atomic_write_bytes(self.path(STATE), serialization.msgpack_serialize(payload))

  def load(self, template, which: str = STATE) -> Optional[Saved]:
    """The saved state, its leaves checked against `template` (a one-site state of the
    model); None when there is none."""
    path = self.path(which)
    if not path.exists():
      return None
    payload = serialization.msgpack_restore(path.read_bytes())
    saved = payload["leaves"]
    expected = records.leaves(template)
    for p, leaf in expected.items():
      if p not in saved:
        raise UserError(f"{path}: no {p} (the state of another model; move the state dir aside)")
      if tuple(saved[p].shape) != tuple(np.shape(leaf)) or saved[p].dtype != np.dtype(leaf.dtype):
        raise UserError(f"{path}: {p} has shape {tuple(saved[p].shape)} {saved[p].dtype}, this "
                        f"site's model {tuple(np.shape(leaf))} {np.dtype(leaf.dtype)} (the state of "
                        f"another experiment; move the state dir aside)")
    extra = sorted(set(saved) - set(expected))
    if extra:
      raise UserError(f"{path}: {extra[0]} is not in this site's model (the state of another "
                      f"experiment; move the state dir aside)")
    treedef = jax.tree.structure(template)
    state = jax.tree.unflatten(treedef, [saved[p] for p in expected])
    heads = dict(payload["heads"]) or None
    return Saved(state, heads, json.loads(payload["meta"]))

  def snapshot(self) -> None:
    """selected.msgpack := state.msgpack (whole or not at all)."""
    files.atomic_write_bytes(self.path(SELECTED), self.path(STATE).read_bytes())

  def move_aside(self) -> Optional[Path]:
    """Moves this dir's state files into previous-<time>/; returns it (None if nothing)."""
    present = [self.path(w) for w in (STATE, SELECTED) if self.path(w).exists()]
    if not present:
      return None
    aside = self.root / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 0
    while aside.exists():
      n += 1
      aside = self.root / (time.strftime("previous-%Y%m%d-%H%M%S") + f".{n}")
    aside.mkdir()
    for p in present:
      os.replace(p, aside / p.name)
    return aside
