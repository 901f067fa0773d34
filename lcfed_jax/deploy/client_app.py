"""The ClientApp: one site's local rounds and evaluations, its personal state kept at home.

Messages (the server's `coordinator` sends them; every one carries an 'instr'
ConfigRecord, optionally the server step's output for this site in 'shared' and every
site's head in 'heads'):
  query.hello     who the site is: its name, config, training-set size, the shapes of the
                  leaves that travel (the server refuses a site that differs)
  train           the local round of `instr['stage']` at round `instr['round']`; replies
                  with the stage's travelling leaves ('update') and its loss
  evaluate        scores of the current model on the site's test (and validation) split
  evaluate.final  scores of the selected model on the test split
  query.sync      the start of a stage: restore the selected model where the stage starts
                  from it (its parameters and model state, with a fresh optimizer state,
                  as the simulation's `stages.restart_from_selected`), and send the head
                  where the stage needs every site's head
Before its work every message applies the server's earlier decisions: `select` (keep the
model now held as the selected one: a copy of the state file), then `restore`, then the
'shared' leaves and the 'heads'. Everything the site holds is in its state dir
(`store`), written after every change, so a restarted client goes on from there.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lcfed_jax.data.tasks import site_names
from lcfed_jax.deploy import records
from lcfed_jax.deploy.settings import NodeSettings, RunSettings, config_json
from lcfed_jax.deploy.site import Site
from lcfed_jax.deploy.store import SELECTED, Store
from lcfed_jax.run import stages
from lcfed_jax.run.runtime import setup_jax
from lcfed_jax.util.errors import UserError

_log = logging.getLogger("flwr")
_RUNTIMES: Dict[str, "Runtime"] = {}    # by state dir: the sites this process serves


def forget() -> None:
  """Drops every site this process holds in memory (what a restart does)."""
  _RUNTIMES.clear()


def _host(tree):
  return jax.tree.map(np.asarray, tree)


class Runtime:
  """One site in this process: its `Site`, its `Store` and the state as last read or written."""

  def __init__(self, context: Context, config, index: int, store: Store):
    self.run_id = int(context.run_id)
    self.config, self.store = config, store
    self.site = Site(config, index)
    self.template = self.site.abstract_state()
    self.state, self.heads, self.stamp = None, None, None   # read by `sync`, when first needed
    self.selected_round = -1     # the round selected.msgpack holds

  def sync(self) -> None:
    """The state as the state dir holds it now (another worker of this node may have
    written it), or the initial state where there is none of this run."""
    stamp = self.store.stamp()
    if stamp is not None and stamp == self.stamp:
      return
    saved = self.store.load(self.template) if stamp is not None else None
    if saved is not None and saved.meta.get("run_id") != self.run_id:
      aside = self.store.move_aside()
      _log.info(f"site {self.site.name}: the state of run {saved.meta.get('run_id')} moved to {aside}")
      saved = None
    if saved is None:
      self.state, self.heads, self.selected_round = self.site.initial_state(), None, -1
      self.save()
    else:
      self.state, self.heads, self.stamp = saved.state, saved.heads, stamp
      self.selected_round = int(saved.meta.get("selected", -1))

  def save(self) -> None:
    self.store.save(self.state, self.heads, {"run_id": self.run_id, "site": self.site.name,
                                             "round": int(self.state.round), "selected": self.selected_round})
    self.stamp = self.store.stamp()

  def selected(self):
    saved = self.store.load(self.template, SELECTED)
    if saved is None:
      raise UserError(f"site {self.site.name}: no selected model in {self.store.root}")
    return saved


def _settings(context: Context, defaults: Mapping):
  run = RunSettings.from_run_config(context.run_config, defaults)
  node = NodeSettings.from_node_config(context.node_config)
  config = node.experiment(run)
  names = site_names(config)
  index = node.site_index(names)
  return config, index, node.state_path(run, names[index])


def _runtime(context: Context, defaults: Mapping, state: bool = True) -> Runtime:
  """This process's runtime of the node's site (built at its first message), with the
  state as the state dir holds it (`state`)."""
  config, index, path = _settings(context, defaults)
  key = str(path)
  rt = _RUNTIMES.get(key)
  if rt is None or rt.run_id != int(context.run_id) or config_json(rt.config) != config_json(config):
    setup_jax()
    rt = _RUNTIMES[key] = Runtime(context, config, index, Store(path))
  if state:
    rt.sync()
  return rt


def _begin(msg: Message, context: Context, defaults: Mapping) -> Runtime:
  """The site, with the server's earlier decisions applied (module doc)."""
  rt = _runtime(context, defaults)
  instr = msg.content["instr"]
  changed = False
  select = int(instr.get("select", -1))
  if select >= 0 and select != rt.selected_round:   # (a resent decision is done once)
    if int(rt.state.round) != select:
      raise RuntimeError(f"site {rt.site.name}: asked to keep round {select} as selected, "
                         f"but holds round {int(rt.state.round)}")
    rt.store.snapshot()
    rt.selected_round = select
    changed = True
  if int(instr.get("restore", 0)):   # the data key and the round counter go on
    chosen = rt.selected().state
    rt.state = rt.state.replace(params=chosen.params, model_state=chosen.model_state,
                                opt_state=stages.fresh_opt_state(rt.state.opt_state, np.zeros_like))
    changed = True
  if "shared" in msg.content:
    rt.state = _host(records.with_rows(rt.state, records.from_record(msg.content["shared"])))
    changed = True
  if "heads" in msg.content:
    rt.heads = records.heads_from_record(msg.content["heads"])
    changed = True
  if "round" in instr and int(rt.state.round) != int(instr["round"]) and msg.metadata.message_type != "train":
    rt.state = rt.state.replace(round=np.asarray(int(instr["round"]), np.int32))
    changed = True
  if changed:
    rt.save()
  return rt


def _scores(part) -> MetricRecord:
  means, spread = part
  return MetricRecord({**{m: float(v) for m, v in means.items()}, **{m: float(v) for m, v in spread.items()}})


def make_app(defaults: Optional[Mapping] = None) -> ClientApp:
  """The ClientApp; `defaults` fill run-config keys the run does not set (Flower's
  Python simulation API passes no run config)."""
  defaults = dict(defaults or {})
  app = ClientApp()

  @app.query("hello")
  def hello(msg: Message, context: Context) -> Message:
    info = {"error": "", "config": "", "site": "", "site-index": -1}
    shapes = {}
    try:
      config, index, _ = _settings(context, defaults)
      info.update(config=config_json(config), site=site_names(config)[index], **{"site-index": index})
      rt = _runtime(context, defaults, state=False)
      paths = sorted({p for stage in rt.site.exp.stages for p in records.plan(rt.site.exp.masks, stage).up})
      shapes = records.shapes(rt.template, paths)
      info["train-size"] = rt.site.train_size
    except UserError as e:   # the server reports it with the site's name
      info["error"] = str(e)
    return Message(RecordDict({"hello": ConfigRecord(info), "shapes": records.shapes_record(shapes)}),
                   reply_to=msg)

  @app.query("sync")
  def sync(msg: Message, context: Context) -> Message:
    rt = _begin(msg, context, defaults)
    content = RecordDict({"metrics": MetricRecord({"round": int(rt.state.round)})})
    if int(msg.content["instr"].get("send-head", 0)):
      content["update"] = records.to_record(records.site_row(rt.state, records.HEAD_PATHS))
    return Message(content, reply_to=msg)

  @app.train()
  def train(msg: Message, context: Context) -> Message:
    rt = _begin(msg, context, defaults)
    instr = msg.content["instr"]
    stage = rt.site.exp.stages[int(instr["stage"])]
    plan = records.plan(rt.site.exp.masks, stage)
    state, loss, finite = rt.site.train_round(rt.state, stage, int(instr["round"]), rt.heads)
    rt.state = _host(state)
    rt.save()
    return Message(RecordDict({
        "update": records.to_record(records.site_row(rt.state, plan.up)),
        "metrics": MetricRecord({"loss": loss, "finite": int(finite), "num-examples": rt.site.train_size})}),
        reply_to=msg)

  @app.evaluate()
  def evaluate(msg: Message, context: Context) -> Message:
    rt = _begin(msg, context, defaults)
    scores = rt.site.evaluate(rt.state, str(msg.content["instr"]["output"]), rt.heads)
    return Message(RecordDict({part: _scores(s) for part, s in scores.items()}), reply_to=msg)

  @app.evaluate("final")
  def final(msg: Message, context: Context) -> Message:
    rt = _begin(msg, context, defaults)
    chosen = rt.selected()
    heads = records.heads_from_record(msg.content["heads"]) if "heads" in msg.content else None
    scores = rt.site.evaluate(chosen.state, str(msg.content["instr"]["output"]), heads, with_val=False)
    return Message(RecordDict({"test": _scores(scores["test"])}), reply_to=msg)

  return app


app = make_app()
