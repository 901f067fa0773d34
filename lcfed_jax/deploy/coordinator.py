"""The server's schedule: the simulation's loop (`lcfed_jax.run.train`), each site behind messages.

The method's stages run end to end on one round counter. In a round every site trains
('train'); the stage's server step (`aggregate`) turns the shared leaves that come back
into each site's next ones, which reach it with its next message. Every `eval_every`
rounds and at the end of each stage the sites score the model they hold ('evaluate'),
the server selects as `eval.selection` says (`selection.Tracker`, per site where the
stage says so) and a selected site keeps its model when its next message says `select`.
A stage that starts from the selected model (`Stage.from_selected`: LC-Fed's stage B with
`lcfed.hc_start='selected'`), or needs every site's head, begins with 'query.sync'. From
the selected model, as the simulation's `run.stages` does it: every site restores its
selected parameters and model state with a fresh optimizer state, and the stage keeps a
selection of its own; the earlier selection and the test scores it had (read from the
evaluation records of its rounds) go into results.json as `earlier_stages`, and
results.md shows them as the row '<method> (stage A)'. Otherwise (`hc_start='last'`) the
stage goes on from the last round and one selection spans the stages. Where the stage
needs heads, every site sends its (restored) head. At the end every site scores its
selected model on its test split ('evaluate.final') and the server writes
results.{md,csv,json}; metrics.jsonl (one line per evaluation, the simulation's fields)
grows along the way.

Faults. A site that fails or does not reply within `round-timeout` is logged with its
name; the round goes on when at least `min-clients` sites replied (the server step then
weighs the others, renormalised), else the run stops with an error naming the missing
sites. An evaluation that misses a site is recorded without it (`missing`) and not offered
to selection. What needs every site stops the run when one is missing: a stage's sync
(HC needs every head; every site restores its model) and the final evaluation (the table
has a column per site).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from lcfed_jax.data.tasks import site_names, task_io
from lcfed_jax.deploy import aggregate, records
from lcfed_jax.deploy.roster import Roster
from lcfed_jax.deploy.settings import RunSettings, check_deployable, config_json
from lcfed_jax.eval import evaluate as evaluation, selection
from lcfed_jax.fed import setup
from lcfed_jax.run import report, workdir as workdir_lib
from lcfed_jax.run.runner import result_json, site_weights
from lcfed_jax.run.stages import Schedule, selected_result
from lcfed_jax.util import files
from lcfed_jax.util.errors import ConfigError, UserError


class DivergenceError(UserError):
  """A site's loss or parameters are not finite (as `run.train`'s, without its imports)."""


def _scores(record) -> tuple:
  """(means, spreads) of a MetricRecord of `client_app._scores`."""
  means = {m: float(v) for m, v in record.items() if not m.endswith("_std")}
  return means, {m: float(v) for m, v in record.items() if m.endswith("_std")}


class Coordinator:
  def __init__(self, grid, run: RunSettings, log: Optional[Callable[[str], None]] = None):
    self.log = log or logging.getLogger("flwr").info
    self.run = run
    self.config = config = run.experiment()
    check_deployable(config)
    self.names = site_names(config)
    k = self.num_sites = len(self.names)
    self.min_clients = int(run.min_clients) or k
    if not 1 <= self.min_clients <= k:
      raise ConfigError(f"run config min-clients={run.min_clients}: expected 0 (every site) or 1..{k}")
    in_channels, num_classes = task_io(config)
    size = int(config.image_size)
    self.exp = setup.build(config, k, in_channels, num_classes, (size, size, in_channels))
    self.schedule = Schedule(list(self.exp.stages))
    self.total_rounds = self.schedule.total
    self.plans = [records.plan(self.exp.masks, s) for s in self.exp.stages]
    travelling = sorted({p for plan in self.plans for p in plan.up})
    self.roster = Roster(grid, self.names, config_json(config),
                         records.shapes(self.exp.abstract_state(), travelling), self.log, run.round_timeout)
    self.workdir = Path(run.workdir)
    self.pending: List[Optional[Dict]] = [None] * k      # the server step's output not yet delivered
    self.select = [-1] * k                                # a selected round not yet announced
    self.heads: List[Optional[Dict]] = [None] * k          # every site's head, where it travels
    self.selected_heads: List[Optional[Dict]] = [None] * k
    self.history: List[Dict] = []
    self.earlier: List[Dict] = []    # the selections of stages a later stage started from

  # ----------------------------------------------------------------- the run
  def __call__(self) -> Dict:
    t0 = time.time()
    self._claim_workdir()
    self.roster.connect(self.run.node_timeout)
    self.weights = site_weights(self.config, self.roster.train_sizes)
    self.tracker = selection.make_tracker(self.config.eval.selection, self.names)
    self.log(f"method={self.exp.method.name} sites={self.names} train={self.roster.train_sizes} "
             f"stages={[(s.name, s.rounds) for s in self.exp.stages]} min-clients={self.min_clients}")
    for si, (stage, a, b) in enumerate(self.schedule.spans()):
      if not stage.rounds:
        continue
      if stage.from_selected or self.plans[si].heads:
        self._sync(si, stage, a)
      for r in range(a, b):
        losses = self._train(si, stage, r)
        done = r + 1
        if done % int(self.config.eval_every) == 0 or done == b:
          self._evaluate(stage, done, losses)
    result = self._final()
    self.log(f"done in {time.time() - t0:.1f}s: {report.selected_rounds_text(result)}, mean test IoU "
             f"{result['mean']['iou']:.4f}")
    return result

  def _claim_workdir(self) -> None:
    """A fresh workdir: an earlier run's files are moved aside (a server does not resume)."""
    workdir_lib.check_writable(self.workdir)
    if any(self.workdir.iterdir()):
      moved = workdir_lib.move_aside(self.workdir)
      self.log(f"moved the earlier run in {self.workdir} to {moved}")
      workdir_lib.check_writable(self.workdir)
    files.atomic_write_json(self.workdir / "config.json", self.config.to_dict())

  # ----------------------------------------------------------------- messages
  def _content(self, k: int, instr: Dict, shared: bool = True, heads: Optional[List] = None) -> RecordDict:
    content = RecordDict({"instr": ConfigRecord(dict(instr, select=self.select[k]))})
    if shared and self.pending[k] is not None:
      content["shared"] = records.to_record(self.pending[k])
    if heads is not None:
      missing = [self.names[j] for j, h in enumerate(heads) if h is None]
      if missing:
        raise RuntimeError(f"no head of the sites {missing} to send")
      content["heads"] = records.heads_record(heads)
    return content

  def _delivered(self, k: int) -> None:
    self.pending[k], self.select[k] = None, -1

  def _check_update(self, k: int, values: Dict, plan: records.Plan, stage) -> None:
    """The server takes nothing a stage does not share (records.Plan)."""
    if set(values) != set(plan.up):
      extra, absent = sorted(set(values) - set(plan.up)), sorted(set(plan.up) - set(values))
      raise UserError(f"site {self.names[k]} sent an update of stage {stage.name} with the leaves "
                      f"{extra[:3]} that this stage does not share and without {absent[:3]}")

  # ----------------------------------------------------------------- stages
  def _sync(self, si: int, stage, a: int) -> None:
    self.roster.refresh()
    plan = self.plans[si]
    restore = stage.from_selected and self.tracker.chosen
    if stage.from_selected and not restore:
      self.log(f"stage {stage.name}: nothing was selected before it; every site goes on from its model")
    instr = {"stage": si, "round": a, "restore": int(restore), "send-head": int(plan.heads)}
    contents = {k: self._content(k, instr, shared=not restore) for k in self.roster.sites()}
    ok, failed = self.roster.send("query.sync", contents, f"stage {stage.name}")
    if failed:
      raise UserError(f"stage {stage.name} needs every site (to restore its selected model, to collect "
                      f"every site's head): {self.roster.describe(failed)}")
    for k, msg in ok.items():
      self._delivered(k)
      if plan.heads:
        values = records.from_record(msg.content["update"])
        self._check_update(k, values, records.Plan((), True, records.HEAD_PATHS), stage)
        self.heads[k] = records.head_of(values)
    if restore:   # the stage selects on its own; the earlier selection is kept with its scores
      before, sel = self.schedule.previous(stage).name, self.tracker.to_json()
      self.earlier.append(selected_result(self.history, sel, self.names, before))
      self.log(f"stage {stage.name} starts from the stage-{before} selection: {report.selected_rounds_text(sel)}")
      self.tracker = selection.make_tracker(self.config.eval.selection, self.names)

  def _train(self, si: int, stage, r: int) -> List[Optional[float]]:
    plan, done = self.plans[si], r + 1
    self.roster.refresh()
    instr = {"stage": si, "round": r}
    contents = {k: self._content(k, instr, heads=self.heads if plan.heads else None) for k in self.roster.sites()}
    ok, failed = self.roster.send("train", contents, f"round {done}")
    if failed:
      self.log(f"round {done} (stage {stage.name}): {self.roster.describe(failed)}")
    if len(ok) < self.min_clients:
      raise UserError(f"round {done} (stage {stage.name}): {len(ok)} of {self.num_sites} sites replied, "
                      f"fewer than min-clients={self.min_clients} ({self.roster.describe(failed)})")
    updates, losses, bad = {}, [None] * self.num_sites, []
    for k, msg in ok.items():
      self._delivered(k)
      values = records.from_record(msg.content["update"])
      self._check_update(k, values, plan, stage)
      metrics = msg.content["metrics"]
      losses[k] = float(metrics["loss"])
      if not int(metrics["finite"]) or not np.isfinite(losses[k]):
        bad.append(self.names[k])
      updates[k] = values
    if bad:
      raise DivergenceError(f"round {done} (stage {stage.name}): the loss or parameters of site(s) {bad} "
                            f"are not finite (NaN/inf); lower learning_rate (now {self.config.learning_rate}) "
                            f"or check the data of those sites")
    if plan.aggregates:
      per_site, common = aggregate.apply(stage.server, plan.shared, updates, self.weights, r)
      for k in self.roster.sites():
        self.pending[k] = per_site[k] if k in per_site else (common or self.pending[k])
      if failed:
        self.log(f"round {done}: aggregated {len(ok)} sites" + (
            "; the others get the result with their next message" if common else ""))
    if plan.heads:
      for k, values in updates.items():
        self.heads[k] = records.head_of(values)
    self.log(f"round {done} (stage {stage.name}): loss " +
             " ".join(f"{n}={'-' if l is None else f'{l:.4f}'}" for n, l in zip(self.names, losses)))
    return losses

  def _evaluate(self, stage, done: int, losses) -> None:
    self.roster.refresh()
    instr = {"round": done, "output": stage.output}
    heads = self.heads if stage.output == "hc" else None
    contents = {k: self._content(k, instr, heads=heads) for k in self.roster.sites()}
    ok, failed = self.roster.send("evaluate", contents, f"evaluation {done}")
    for k in ok:
      self._delivered(k)
    present = [k for k in self.roster.sites() if k in ok]
    test = {self.names[k]: _scores(ok[k].content["test"]) for k in present}
    rec = {"round": done, "stage": stage.name, "loss": losses, **evaluation.summarize(test)}
    use_val = self.config.eval.selection == "val"
    if use_val:
      rec["val"] = evaluation.summarize({self.names[k]: _scores(ok[k].content["val"]) for k in present})
    improved = False
    if failed:
      rec["missing"] = [self.names[k] for k in sorted(failed)]
      self.log(f"evaluation {done}: {self.roster.describe(failed)}; not offered to selection")
    else:
      on = [(rec["val"] if use_val else rec)["sites"][n]["iou"] for n in self.names]
      take = self.tracker.decide(done, on, stage.output, stage.per_site_selection)
      for k in np.flatnonzero(take):
        self.select[k] = done
        self.selected_heads[k] = self.heads[k]
      improved = bool(take.any())
    rec["selection"] = self.tracker.to_json()
    files.append_jsonl(self.workdir / "metrics.jsonl", rec)
    self.history.append(rec)
    per = " ".join(f"{n}={rec['sites'][n]['iou']:.4f}" for n in rec["sites"])
    self.log(f"eval round {done}: IoU {per} | mean IoU {rec['mean']['iou']:.4f}" +
             (f" | val mean IoU {rec['val']['mean']['iou']:.4f}" if use_val else "") +
             (" | selected" if improved else ""))

  def _final(self) -> Dict:
    if not self.tracker.chosen:
      raise UserError("no evaluation had every site: nothing was selected")
    self.roster.refresh()
    outputs = self.tracker.outputs
    instr = {"round": self.total_rounds}
    heads = self.selected_heads if "hc" in outputs else None
    contents = {k: self._content(k, dict(instr, output=outputs[k]), shared=False, heads=heads)
                for k in self.roster.sites()}
    ok, failed = self.roster.send("evaluate.final", contents, "final")
    if failed:
      raise UserError(f"the final evaluation needs every site: {self.roster.describe(failed)}")
    scores = evaluation.summarize({self.names[k]: _scores(ok[k].content["test"]) for k in self.roster.sites()})
    result = result_json(self.exp.method.name, self.config.data.task, self.names, scores, self.tracker.to_json(),
                         self.config.eval.selection, "best", self.earlier)
    report.write(self.workdir, result)
    if bool(self.config.eval.plots) and self.history:
      from lcfed_jax.run import plots
      complete = [h for h in self.history if "missing" not in h]
      plots.iou_curves(complete, self.names, self.workdir / "iou_curves.png", result["site_rounds"],
                       title=f"{self.exp.method.name} (Flower): test IoU per site")
    self.log(report.to_markdown(result))
    return result
