"""Jitted programs shared by every experiment of a process, found by value.

Two experiments with the same model, stage, partition, program settings, number of
sites and layout run the same round program. Building it again costs a trace, a
lowering and a compile (or a persistent-cache read); a run resumed in the same process
(a notebook), the rows of a sequential seed sweep and most tests rebuild exactly such an
experiment. So `setup.Experiment` asks this module for its jitted
functions: an equal key returns the jitted function built first, with the traces and
executables jax keeps inside it.

A key is made of values only (flax modules, `Stage` records and `SiteLayout`s compare by
value), and the config enters with the settings that only schedule or store a run left
out: the seed (the round reads each site's key from the state), the number of rounds
(the stage record holds its own), evaluation, checkpointing, sweep and path settings.
"""
from __future__ import annotations

import collections
import copy
import json
from typing import Any, Callable, Hashable

# Settings that decide when a round runs, how often it is evaluated or saved, or where
# files go, never what a round or a predictor computes.
SCHEDULE_KEYS = frozenset({"seed", "rounds", "eval_every", "checkpoint_every", "resume", "data_dir"})
SCHEDULE_SECTIONS = frozenset({"eval", "checkpoint", "sweep"})
MAX_PROGRAMS = 32    # least recently used programs beyond this are dropped (and recompiled if asked again)

_programs: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()


def config_key(config) -> str:
  """The config's settings that can change a program, as one canonical string."""
  kept = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in config.items()
          if k not in SCHEDULE_KEYS and k not in SCHEDULE_SECTIONS}
  return json.dumps(kept, sort_keys=True, default=repr)


def frozen(config):
  """A private copy of the config for a program's closure: its trace happens at the first
  call, and a caller editing its own config afterwards must not change it."""
  return copy.deepcopy(config)


def get(key: Hashable, make: Callable[[], Any]) -> Any:
  """The program of `key`, built by `make()` the first time."""
  if key in _programs:
    _programs.move_to_end(key)
    return _programs[key]
  program = _programs[key] = make()
  while len(_programs) > MAX_PROGRAMS:
    _programs.popitem(last=False)
  return program


def clear() -> None:
  _programs.clear()
