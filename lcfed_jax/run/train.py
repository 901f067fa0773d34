"""`train_and_evaluate(config, workdir)`: the whole experiment, stage after stage.

Training resumes: if WORKDIR/checkpoints holds a round of the same experiment
(`lcfed_jax.run.workdir` refuses another one), the state, the model selected so far and
the schedule position are restored from it, metrics.jsonl is cut back to that round, and
the loop goes on from `state.round`; the round keys fold in the round, so the run ends
exactly as an uninterrupted one. Checkpoints are saved every `checkpoint_every` rounds,
at the end of every stage and at every round that changes the selected model. A stage
marked `from_selected` (LC-Fed's stage B) starts from the model selected so far with a
fresh optimizer state and selects on its own; the earlier selection and its test scores
are kept as `earlier_stages` (`lcfed_jax.run.stages`). At the end the selected model is
evaluated on every site's test split into results.md/csv/json and the figures are drawn.

A round whose loss or parameters are not finite at some site stops the run (exit 2)
before anything of that round is evaluated, selected or saved: the latest checkpoint
stays the last finite round.

The site axis is sharded over the mesh of `config.mesh`, padded with weightless sites
when the site count does not divide the device count; losses, metrics, selection,
reports, returned states and checkpoints hold the real sites only. On several hosts
every process runs this same loop and only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lcfed_jax.config.validate import validate
from lcfed_jax.data.tasks import site_names as task_site_names
from lcfed_jax.eval import evaluate as evaluation, selection
from lcfed_jax.fed import sharding
from lcfed_jax.run import checkpoints as ckpt_lib, plots, progress, report, runtime, tables, workdir as workdir_lib
from lcfed_jax.run.runner import Run, result_record, site_weights, split_sizes
from lcfed_jax.run.stages import Schedule, restart_from_selected, selected_result
from lcfed_jax.run.tensorboard import open_board
from lcfed_jax.util import files
from lcfed_jax.util.errors import UserError


class DivergenceError(UserError):
  """A round produced a non-finite loss or parameters."""


def _cut_metrics(path: Path, last_round: int) -> List[Dict]:
  """Keeps the records of rounds <= last_round (a resume replays the rest)."""
  records = files.read_jsonl(path)
  kept = [r for r in records if int(r["round"]) <= last_round]
  if (len(kept) != len(records) or not path.exists()) and sharding.is_main_process():
    files.atomic_write_text(path, "".join(
        json.dumps(r, sort_keys=True, default=files.jsonable) + "\n" for r in kept))
  return kept


def _compile_ahead(run: Run, schedule, start_round: int, state, train_arrays, weights, log) -> Dict:
  """Every round program the run still needs and every predictor it will evaluate with,
  lowered here and compiled in parallel threads (XLA compiles without the GIL, one
  program per core), so that no stage waits for its own compilation. Returns the rounds."""
  exp = run.exp
  stages = [s for s, a, b in schedule.spans() if b > start_round and s.rounds]
  outputs = sorted({s.output for s in stages} | ({"hc"} if exp.method.model.hc and run.plots else set()))
  t0, jobs = time.time(), {}
  for stage in stages:
    jobs[stage] = exp.round_fn(stage).lower(state, train_arrays, weights)
  for out in outputs:
    jobs[out] = run.predictor(out).lower(state.params, state.model_state, run.eval_arrays.images)
  workers = max(1, min(len(jobs), os.cpu_count() or 1))
  log(f"compiling {len(jobs)} programs ({len(stages)} rounds, {len(outputs)} predictors) on {workers} threads...")
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    done = {key: fut.result() for key, fut in {k: pool.submit(lo.compile) for k, lo in jobs.items()}.items()}
  for out in outputs:
    exp.use_compiled_predictor(out, run.eval_batch, done[out])
  log(f"compiled in {time.time() - t0:.1f}s")
  return {stage: done[stage] for stage in stages}


def _previous_meta(workdir: Path):
  if not ckpt_lib.checkpoint_dir(workdir).is_dir():
    return None
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True, must_exist=False)
  try:
    step = ckpts.latest_step()
    return None if step is None else ckpts.read_meta(step)
  finally:
    ckpts.close()


def train_and_evaluate(config, workdir: str, log: Callable[[str], None] = logging.info) -> Dict:
  runtime.track_compiles()
  t_begin, t_perf = time.time(), time.perf_counter()
  validate(config)
  workdir = Path(workdir)
  main_process = sharding.is_main_process()
  meta_before = _previous_meta(workdir)
  workdir_lib.claim(workdir, config, meta_before, log, task_site_names(config), write=main_process)
  sharding.barrier("workdir")

  run = Run(config, log)
  data, k, layout, exp = run.data, run.k, run.layout, run.exp
  schedule = Schedule(list(exp.stages))
  policy = config.eval.selection
  train_splits, val_splits, train_sizes = data.train, None, run.train_sizes
  if policy == "val":
    train_splits, val_splits = selection.carve_validation(data.train, float(config.eval.val_fraction),
                                                          int(config.eval.val_seed))
    train_sizes = split_sizes(train_splits)
    log(f"selection: validation split of {split_sizes(val_splits)} examples carved from training "
        f"(train now {train_sizes})")
  else:
    log(f"selection: {policy}")
  trivial = evaluation.trivial_baselines(data)
  log(f"reference: all-foreground mean IoU {trivial['all_foreground']:.4f}, "
      f"all-background mean IoU {trivial['all_background']:.4f}")

  host_state = jax.tree.map(np.asarray, exp.init_state())
  state = layout.pad_host_tree(host_state)        # every site (and padding) on its device
  weights = layout.weights(site_weights(config, train_sizes))
  train_arrays = run.stack(train_splits)
  parts = [data.test] + ([val_splits] if val_splits else [])
  if val_splits:   # test rows first: the final evaluation reads them from the same arrays
    run.eval_arrays = run.stack(evaluation.concat_splits(data.test, val_splits), pad_multiple=run.eval_batch)
  log(f"method={exp.method.name} backend={jax.default_backend()} conv={exp.model.impl} "
      f"dtype={jnp.dtype(exp.model.dtype).name} stages={[(s.name, s.rounds) for s in schedule.stages]}")

  ckpts = ckpt_lib.Checkpoints(workdir, int(config.checkpoint.keep))
  seeds, views = exp.seeds, run.seed_views
  tracker = selection.make_tracker(policy, data.site_names, seeds)
  meta = ckpt_lib.run_meta(config, run, policy, schedule)
  latest = ckpts.latest_step() if bool(config.resume) else None
  earlier: List = []   # per seed view, the selections of stages left behind (`stages`)
  if latest is not None:
    saved = ckpts.read_meta(latest)
    ckpt_lib.check_resumable(saved, exp.method.name, data.site_names, schedule)
    abstract = layout.abstract_real(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                 host_state))
    restored = ckpts.restore(latest, abstract, items=("state", "selected"))
    state = layout.pad(restored["state"])
    if saved["has_selection"]:
      tracker.load_json(saved["selection"], layout.pad(restored["selected"]))
    earlier = saved.get("earlier_stages", [])
    log(f"resumed from {ckpts.dir / str(latest)} (round {int(state.round)}/{schedule.total})")
  start_round = int(state.round)
  # With a seed axis every seed keeps the files of a run of its own in WORKDIR/seed<s>/.
  out_dirs = [workdir / f"seed{s}" for s in seeds] or [workdir]
  histories = [_cut_metrics(d / "metrics.jsonl", start_round) for d in out_dirs]
  boards = [open_board(d, start_round, bool(config.log.tensorboard) and main_process) for d in out_dirs]

  def save(done: int, improved: bool = False):
    tree = tracker.tree if tracker.has_selection else selection.model_tree(state)
    ckpts.save(done, layout.strip(state), layout.strip(tree),
               dict(meta, has_selection=tracker.has_selection, selection=tracker.to_json(),
                    earlier_stages=earlier),
               protect=tracker.selected_steps() | ({done} if improved else set()))

  bar = progress.Progress(schedule.total, log)
  rounds = _compile_ahead(run, schedule, start_round, state, train_arrays, weights, log)
  try:
    for stage, a, b in schedule.spans():
      if b <= start_round or stage.rounds == 0:
        continue
      if stage.from_selected and start_round <= a and tracker.has_selection:
        before = schedule.previous(stage).name
        sels = [t.to_json() for t in (tracker.trackers if seeds else [tracker])]
        earlier = earlier + [[selected_result(histories[v], sels[v], data.site_names, before)
                              for v in range(len(views))]]
        state = restart_from_selected(state, tracker.tree)
        log(f"stage {stage.name} starts from the stage-{before} selection: " + "; ".join(
            (f"seed {seeds[v]} " if seeds else "") + report.selected_rounds_text(sel) for v, sel in enumerate(sels)))
        tracker = selection.make_tracker(policy, data.site_names, seeds)
      round_fn = rounds[stage]
      predict = run.predictor(stage.output)
      bar.stage(stage.name, max(a, start_round))
      for r in range(max(a, start_round), b):
        bar.start()
        state, losses, finite = round_fn(state, train_arrays, weights)
        losses, finite = sharding.to_host((losses, finite))
        losses, finite = losses[:k], finite[:k]
        done = r + 1
        if not finite.all():
          bad = [data.site_names[i] for i in np.flatnonzero(~finite.reshape(k, -1).all(1))]
          raise DivergenceError(
              f"round {done} (stage {stage.name}): the loss or parameters of site(s) {bad} are not "
              f"finite (NaN/inf); the run stopped before evaluating or saving this round, and the "
              f"latest checkpoint (round {ckpts.latest_step()}) is the last finite one. Lower "
              f"--config.learning_rate (now {config.learning_rate}) or check the data of those sites")
        bar.done(done, stage.name, losses.reshape(k, -1).mean(1))
        improved = False
        if done % int(config.eval_every) == 0 or done == b:
          scores = evaluation.evaluate(predict, state, run.eval_arrays, parts, data, config, len(seeds))
          if not seeds:
            scores = [[part] for part in scores]
          records = []
          for v, seed_index in enumerate(views):
            loss = losses if seed_index is None else losses[:, seed_index]
            rec = {"round": done, "stage": stage.name, "loss": loss.tolist(), **scores[0][v]}
            if seeds:
              rec["seed"] = seeds[v]
            if val_splits:
              rec["val"] = scores[1][v]
            records.append(rec)
          on = [[(rec["val"] if val_splits else rec)["sites"][s]["iou"] for s in data.site_names] for rec in records]
          improved = tracker.update(state, done, on if seeds else on[0], stage.output, stage.per_site_selection)
          sel_json = tracker.to_json()
          for v, rec in enumerate(records):
            rec["selection"] = sel_json["seeds"][str(seeds[v])] if seeds else sel_json
            if main_process:
              files.append_jsonl(out_dirs[v] / "metrics.jsonl", rec)
              if boards[v] is not None:
                boards[v].record(rec, data.site_names)
            histories[v].append(rec)
            log((f"seed {seeds[v]} " if seeds else "") + evaluation.format_line(rec, data.site_names) +
                (f" | val mean IoU {rec['val']['mean']['iou']:.4f}" if val_splits else "") +
                (" | selected" if improved else ""))
        if done % int(config.checkpoint_every) == 0 or done == b or (improved and policy != "last"):
          save(done, improved)
  finally:
    ckpts.close()

  if not tracker.has_selection:     # nothing was evaluated (a schedule of zero rounds)
    zeros = np.zeros(k) if not seeds else [np.zeros(k)] * len(seeds)
    tracker.update(state, int(state.round), zeros, schedule.stage_at(int(state.round)).output, False)
  scores, out = run.evaluate_selected(tracker.tree, tracker.outputs)
  finals = []
  for v, seed_index in enumerate(views):
    one = tracker if not seeds else tracker.trackers[v]
    final = result_record(run, scores if not seeds else scores[v], one.to_json(), policy, "best",
                          [e[v] for e in earlier])
    log((f"seed {seeds[v]} " if seeds else "") + f"selected ({policy}): " + report.selected_rounds_text(final))
    run.write_outputs(out_dirs[v], final, tracker.tree, out, one.outputs, "results", boards[v], seed_index)
    if run.plots and histories[v] and main_process:
      plots.iou_curves(histories[v], data.site_names, out_dirs[v] / "iou_curves.png", final["site_rounds"],
                       title=f"{exp.method.name}: test IoU per site (selection: {policy})")
    finals.append(final)
  if seeds and main_process:   # the seeds side by side: mean ± std over seeds
    tables.write_seed_table(workdir, "results", {exp.method.name: dict(zip(seeds, finals))}, log)
  for board in boards:
    if board is not None:
      board.close()
  c = runtime.compile_seconds(t_perf)
  wall = time.time() - t_begin
  log(f"done in {wall:.1f}s, of which {c['wall']:.1f}s tracing, lowering and compiling "
      f"programs ({c['work']:.1f}s of compile work over parallel threads)")
  if main_process:   # how long this invocation took, beside the scores
    files.atomic_write_json(workdir / "timing.json", {
        "wall_s": round(wall, 1), "compile_wall_s": round(c["wall"], 1), "rounds_run": schedule.total - start_round,
        "device": runtime.device_name(), "jax": jax.__version__})
  return {"history": histories if seeds else histories[0], "state": layout.strip(state), "data": data,
          "selected": layout.strip(tracker.tree), "result": finals if seeds else finals[0]}
