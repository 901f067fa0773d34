"""Orbax checkpoints of the whole federated state, restorable on any device topology.

Layout: `WORKDIR/checkpoints/<round>/` with three items
  state     the FedState (params, model_state, opt_state with every leaf's own optimizer
            state and step count, rng, round), every leaf with its site axis;
  selected  {'params', 'model_state'} of the model selected so far (`lcfed_jax.selection`;
            a per-site mix of rounds under per-site selection);
  meta      JSON: round, config, site names, method, schedule, the selection bookkeeping.

Saves are synchronous and atomic: orbax writes into a temporary directory and renames it
to `<round>` only when every item is complete, so a process killed mid-save leaves the
previous checkpoint as the latest one (tests/test_checkpoints.py kills one). Leftover
temporary directories are removed when a writer opens the directory again.

Restores always pass a target built from the current process (`abstract_state`): a
checkpoint saved from arrays sharded over several devices then restores onto one (orbax
refuses a topology mismatch without a target, and without one NamedTuples such as
the optimizer's NamedTuples would come back as lists). With a `SiteLayout` the
target carries the current mesh's shardings, so every process restores only its own
blocks. Checkpoints hold the real sites only (training strips the padding sites before
saving and pads again after restoring), so one restores on any number of devices.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

import jax
import orbax.checkpoint as ocp

from lcfed_jax.config.defaults import with_added_settings
from lcfed_jax.util.errors import UserError


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Orbax logs every step of every save at INFO through absl: keep its warnings only."""
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


logging.getLogger("absl").addFilter(_quiet_orbax)

DIRNAME = "checkpoints"
FORMAT = 2     # 2: optax per-leaf optimizer states (format 1 held one Adam state tree)


def checkpoint_dir(workdir) -> Path:
  return Path(workdir).absolute() / DIRNAME


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of `tree` placed by `sharding` (default: the first local device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_selected(abstract) -> Dict:
  return {"params": abstract.params, "model_state": abstract.model_state}


def schedule_json(schedule) -> list:
  return [{"name": s.name, "rounds": int(s.rounds), "start": int(a), "output": s.output,
           "per_site_selection": bool(s.per_site_selection)} for s, a, _ in schedule.spans()]


def run_meta(config, run, selection_policy: str, schedule) -> Dict:
  """The JSON item every checkpoint of a training run carries (besides its round)."""
  return {"config": config.to_dict(), "site_names": list(run.data.site_names),
          "method": run.method.name, "task": run.data.task, "selection_policy": selection_policy,
          "schedule": schedule_json(schedule)}


def check_format(meta: Dict, workdir) -> None:
  if int(meta.get("format", 1)) != FORMAT:
    raise UserError(f"the checkpoint in {workdir} has format {meta.get('format', 1)}; this version "
                    f"reads format {FORMAT} (the optimizer state changed): retrain, or evaluate it "
                    f"with the version that wrote it")


class Checkpoints:
  """`CheckpointManager` over `WORKDIR/checkpoints` keeping the `keep` newest steps plus
  the steps that hold a selected round (`save(..., protect=...)`)."""

  def __init__(self, workdir, keep: int = 2, read_only: bool = False, must_exist: bool = True):
    self.dir = checkpoint_dir(workdir)
    self.keep = int(keep)
    if read_only and must_exist and not self.dir.is_dir():
      raise UserError(f"no checkpoint in workdir {str(workdir)!r}: {self.dir} does not exist "
                      f"(train there first with --mode train)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    self.mngr = ocp.CheckpointManager(self.dir, item_names=("state", "selected", "meta"),
                                      options=options)
    if read_only and must_exist and self.latest_step() is None:
      raise UserError(f"no checkpoint in workdir {str(workdir)!r}: {self.dir} holds no saved round")

  def all_steps(self):
    return sorted(self.mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.mngr.latest_step()

  def save(self, step: int, state, selected_tree, meta: Dict, protect: Iterable[int] = ()) -> None:
    meta = dict(meta, round=int(step), format=FORMAT)
    self.mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), selected=ocp.args.StandardSave(selected_tree),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.mngr.wait_until_finished()
    self.prune(protect)

  def prune(self, protect: Iterable[int] = ()) -> None:
    steps = self.all_steps()
    keep = set(steps[-self.keep:] if self.keep > 0 else steps[-1:]) | set(protect)
    for s in steps:
      if s not in keep:
        self.mngr.delete(s)

  def read_meta(self, step: Optional[int] = None) -> Dict:
    step = self.latest_step() if step is None else step
    meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return dict(meta, config=with_added_settings(meta["config"])) if "config" in meta else meta

  def restore(self, step: int, abstract, items=("state", "selected", "meta")) -> Dict:
    """{item: restored} for the requested items, placed as `abstract` says."""
    args = {"meta": ocp.args.JsonRestore(),
            "state": ocp.args.StandardRestore(abstract),
            "selected": ocp.args.StandardRestore(abstract_selected(abstract))}
    out = self.mngr.restore(int(step), args=ocp.args.Composite(**{k: args[k] for k in items}))
    return {k: out[k] for k in items}

  def close(self) -> None:
    self.mngr.close()


def check_resumable(meta: Dict, method_name: str, site_names, schedule) -> None:
  """A workdir's checkpoint continues only the same method on the same sites, with the
  stages that already ran unchanged (the stage in progress, or the last one, may grow)."""
  where = "the checkpoint in this workdir"
  check_format(meta, "this workdir")
  if meta.get("method") != method_name:
    raise UserError(f"{where} is of method {meta.get('method')!r}, the config asks for "
                    f"{method_name!r}: use another --workdir")
  if list(meta.get("site_names", [])) != list(site_names):
    raise UserError(f"{where} has sites {meta.get('site_names')}, the data has {list(site_names)}")
  done = int(meta["round"])
  new = schedule_json(schedule)
  for i, old in enumerate(meta["schedule"]):
    if old["start"] >= done and i > 0:
      break
    current = old["start"] < done <= old["start"] + old["rounds"]
    if i >= len(new) or new[i]["name"] != old["name"] or new[i]["start"] != old["start"]:
      raise UserError(f"{where} ran stage {old['name']!r} from round {old['start']}; the config's "
                      f"schedule {[(s['name'], s['rounds']) for s in new]} differs: use another --workdir")
    later_started = any(o["start"] < done for o in meta["schedule"][i + 1:])
    if later_started and new[i]["rounds"] != old["rounds"]:
      raise UserError(f"{where} completed stage {old['name']!r} after {old['rounds']} rounds and "
                      f"went on; the config asks for {new[i]['rounds']}: use another --workdir")
    if current and new[i]["start"] + new[i]["rounds"] < done and not later_started:
      raise UserError(f"{where} is at round {done}, past the end of stage {old['name']!r} "
                      f"in the config ({new[i]['rounds']} rounds): use another --workdir")
