"""`evaluate_checkpoint(config, workdir)`: `--mode eval`.

Restores the best (the selected model) or the latest checkpoint of a workdir onto the
devices present, whatever topology trained it, and evaluates every site on its test
split into results.* (or eval_latest.*) and the overlay figure. The model, method and
data come from the checkpoint's own config; the evaluation settings, the data location
and the devices come from the config given now (a data pack named now, `data.pack`,
replaces the one the model was trained from, or the raw data: the same test split
scored from a pack's images).

The files go to `eval.out_dir` when it is set, else into the workdir. A workdir that
cannot be written (an archived study, a shared results folder) is only read: the
results are printed and nothing is written.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional

import ml_collections
from absl import logging

from lcfed_jax.config.validate import validate
from lcfed_jax.eval import selection
from lcfed_jax.fed import sharding
from lcfed_jax.run import checkpoints as ckpt_lib, report, tables
from lcfed_jax.run.runner import Run, result_record
from lcfed_jax.run.stages import Schedule
from lcfed_jax.util import files
from lcfed_jax.util.errors import ConfigError, UserError


def eval_config(config, saved: Dict):
  """The checkpoint's own config (model, method, schedule, data), with the eval settings,
  the data location and the devices of the config given now."""
  c = ml_collections.ConfigDict(saved["config"])
  c.eval = config.eval
  c.data_dir = config.data_dir
  c.mesh = config.mesh
  if "root" in config.data:
    c.data.root = config.data.root
    c.data.tfds_dir = config.data.tfds_dir
  if config.data.get("pack"):
    c.data.pack = config.data.pack
  return c


def output_dir(config, workdir, log) -> Optional[Path]:
  """Where the evaluation's files go, or None when they can only be printed."""
  if config.eval.out_dir:
    out = Path(config.eval.out_dir)
    if not files.writable(out):
      raise UserError(f"--config.eval.out_dir {out}: cannot write there")
    return out
  if files.writable(workdir):
    return Path(workdir)
  log(f"workdir {workdir} cannot be written: the results are printed, not saved "
      f"(--config.eval.out_dir=DIR writes them to DIR)")
  return None


def evaluate_checkpoint(config, workdir: str, log: Callable[[str], None] = logging.info) -> Dict:
  validate(config)
  out_root = output_dir(config, workdir, log) if sharding.is_main_process() else Path(workdir)
  which = config.eval.checkpoint
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  step = ckpts.latest_step()
  saved = ckpts.read_meta(step)
  ckpt_lib.check_format(saved, workdir)
  config = eval_config(config, saved)
  run = Run(config, log)
  if list(run.data.site_names) != list(saved["site_names"]):
    raise ConfigError(f"checkpoint sites {saved['site_names']} != data sites {run.data.site_names}")
  layout = run.layout
  abstract = layout.abstract_real(run.exp.abstract_state())
  t0 = time.time()
  seeds, views = run.exp.seeds, run.seed_views
  if which == "best" and saved["has_selection"]:
    tree = layout.pad(ckpts.restore(step, abstract, items=("selected",))["selected"])
    sels = [saved["selection"]["seeds"][str(s)] for s in seeds] if seeds else [saved["selection"]]
  else:
    state = layout.pad(ckpts.restore(step, abstract, items=("state",))["state"])
    tree = selection.model_tree(state)
    rounds = int(state.round)
    output = Schedule(list(run.exp.stages)).stage_at(rounds).output
    sels = [{"site_rounds": {s: rounds for s in run.data.site_names},
             "site_outputs": {s: output for s in run.data.site_names}}] * len(views)
    which = "latest"
  ckpts.close()
  log(f"restored {which} model from {ckpts.dir / str(step)} onto {layout.num_devices} device(s) "
      f"({time.time() - t0:.1f}s)")
  outputs = [[sel["site_outputs"][s] for s in run.data.site_names] for sel in sels]
  t0 = time.time()
  scores, out = run.evaluate_selected(tree, outputs if seeds else outputs[0])
  log(f"evaluated {sum(run.test_sizes)} test images in {time.time() - t0:.1f}s")
  stem = "results" if which == "best" else "eval_latest"
  earlier = saved.get("earlier_stages", [])
  results = []
  for v, seed_index in enumerate(views):
    result = result_record(run, scores[v] if seeds else scores, sels[v], saved["selection_policy"], which,
                           [e[v] for e in earlier])
    results.append(result)
    if out_root is None:
      log(report.to_markdown(result))
      continue
    where = out_root / f"seed{seeds[v]}" if seeds else out_root
    run.write_outputs(where, result, tree, out, outputs[v], stem, seed_index=seed_index)
    if sharding.is_main_process():
      files.atomic_write_json(where / f"eval_{which}.json",
                              dict(result, checkpoint_step=step,
                                   devices=[str(d) for d in layout.mesh.devices.flat]))
  if seeds and sharding.is_main_process():
    per_seed = {run.method.name: dict(zip(seeds, results))}
    if out_root is None:
      log(tables.to_markdown(tables.with_stage_rows(per_seed)))
    else:
      tables.write_seed_table(out_root, stem, per_seed, log)
  return results if seeds else results[0]
