"""`train_and_evaluate(config, workdir)`: the whole experiment, stage after stage;
`evaluate_checkpoint(config, workdir)`: `--mode eval`.

Training resumes: if WORKDIR/checkpoints holds a round, the state, the model selected
so far and the schedule position are restored from it, metrics.jsonl is cut back to
that round, and the loop goes on from `state.round`; the round keys fold in the round,
so the run ends exactly as an uninterrupted one. Checkpoints (`lcfed_jax.checkpoints`)
are saved every `checkpoint_every` rounds, at the end of every stage and at every round
that changes the selected model (`lcfed_jax.selection`). At the end the selected model
is evaluated on every site's test split into results.md/csv/json
(`lcfed_jax.report`) and the plots (`lcfed_jax.plots`) are drawn.

The site axis is sharded over the mesh of `config.mesh` (`lcfed_jax.sharding`), padded
with weightless sites when the site count does not divide the device count; losses,
metrics, selection, reports, returned states and checkpoints hold the real sites only.
On several hosts every process runs this same loop (the host-side bookkeeping is
identical everywhere) and only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
import json
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from lcfed_jax import checkpoints as ckpt_lib, engine, evaluate as evaluation, io_utils
from lcfed_jax import plots, report, selection, sharding
from lcfed_jax.config_validation import validate
from lcfed_jax.errors import ConfigError
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.tasks import load_task, site_names as task_site_names
from lcfed_jax.methods import Method, Stage, get_method


@dataclasses.dataclass
class Schedule:
  """Stages laid end to end on one global round counter (what a checkpoint stores)."""
  stages: List[Stage]

  @property
  def total(self) -> int:
    return sum(s.rounds for s in self.stages)

  def spans(self):
    start = 0
    for s in self.stages:
      yield s, start, start + s.rounds
      start += s.rounds

  def stage_at(self, completed_rounds: int) -> Stage:
    """The stage whose output evaluation should read after `completed_rounds` rounds."""
    last = self.stages[0]
    for s, a, b in self.spans():
      if s.rounds and a < completed_rounds <= b:
        return s
      if s.rounds and b <= completed_rounds:
        last = s
    return last


def site_weights(config, sizes) -> np.ndarray:
  """Server weights: uniform, or by each site's training-set size (`sizes`, all sites)."""
  if config.federated.weighting == "size":
    n = np.asarray(sizes, np.float32)
    return n / n.sum()
  return np.full((len(sizes),), 1.0 / len(sizes), np.float32)


def split_sizes(splits) -> List[int]:
  """Every site's split length; each process knows those of its own sites (the others'
  entries are None), so the lengths are gathered."""
  sizes = sharding.merge_sites({k: len(s) for k, s in enumerate(splits) if s is not None})
  return [int(sizes[k]) for k in range(len(splits))]


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def validate_eval(config) -> None:
  """The keys this module adds (config.eval.selection/val_fraction/checkpoint, config.checkpoint)."""
  selection.policy(config)
  if config.eval.get("checkpoint", "best") not in ("best", "latest"):
    raise ConfigError(f"config.eval.checkpoint={config.eval.checkpoint!r}: expected 'best' or 'latest'")
  keep = config.get("checkpoint", {}).get("keep", 2)
  if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
    raise ConfigError(f"config.checkpoint.keep={keep!r}: expected a positive integer")


class _Setup:
  """What training and evaluation both build from a config: data, method, model, predictors."""

  def __init__(self, config, log=print):
    t0 = time.time()
    self.config = config
    names = task_site_names(config)
    self.k = len(names)
    self.layout = sharding.from_config(config, self.k)
    log(self.layout.describe())
    # Each process reads only the sites on its own devices (all of them on one host).
    local = self.layout.local_sites()
    if not local:
      raise ConfigError(
          f"process {jax.process_index()} would hold only padding sites: {self.k} sites on "
          f"{self.layout.num_devices} devices of {jax.process_count()} processes; run fewer "
          f"processes or devices (config.mesh.num_devices) than there are sites")
    self.data = data = load_task(config, sites=local)
    if list(data.site_names) != list(names):
      raise RuntimeError(f"site list changed while loading: {names} -> {data.site_names}")
    self.train_sizes, self.test_sizes = split_sizes(data.train), split_sizes(data.test)
    here = (f" (this process: {[names[i] for i in local]})" if jax.process_count() > 1 else "")
    log(f"data: task={data.task} sites={data.site_names} "
        f"train={self.train_sizes} test={self.test_sizes}{here} ({time.time() - t0:.1f}s)")
    self.method: Method = get_method(config)
    self.schedule = Schedule(list(self.method.stages))
    self.model = engine.build_model(config, self.method, self.k, data.in_channels, data.num_classes)
    self.image_shape = data.train[local[0]].images.shape[1:]
    self.eval_batch = int(config.eval.batch_size)
    self.test_arrays = self.stack(data.test, pad_multiple=self.eval_batch)
    self._predictors = {}

  def stack(self, splits, pad_multiple: int = 1):
    """Site-sharded arrays of per-site splits, padded with the layout's empty sites."""
    return stack_splits(splits, self.layout.num_padding, pad_multiple, sharding=self.layout.site_sharding)

  def predictor(self, output: str):
    if output not in self._predictors:
      self._predictors[output] = engine.make_predict_fn(self.model, output, self.eval_batch, self.k,
                                                        self.layout)
    return self._predictors[output]

  def meta(self, config, selection_policy: str) -> Dict:
    return {"config": config.to_dict(), "site_names": list(self.data.site_names),
            "method": self.method.name, "task": self.data.task, "selection_policy": selection_policy,
            "schedule": ckpt_lib.schedule_json(self.schedule)}

  def evaluate_selected(self, tree, site_outputs, config) -> Tuple[Dict, Dict]:
    """(scores on every site's test split, {key: {site: predictions}} of this process's
    sites) of a {'params','model_state'} tree."""
    # HC peak maps leave the device only for the overlay figure.
    keys = ("pred", "peaks") if self.method.hc and config_plots(self.config) else ("pred",)
    out = selection.predict_selected(self.predictor, tree, site_outputs, self.test_arrays.images,
                                     self.k, keys)
    return evaluation.score_predictions(out["pred"], self.data.test, self.data, config), out

  def overlay_examples(self, tree, out: Dict, site_outputs) -> Dict:
    """The first `eval.overlay_examples` test images of every site with their masks,
    predictions and (HC) peak maps, gathered from the processes that hold them."""
    n = int(self.config.eval.get("overlay_examples", 2))
    peaks = None
    if self.method.hc:   # the heads' disagreement peaks, whichever output was selected
      peaks = (out["peaks"] if all(o == "hc" for o in site_outputs) else evaluation.local_predictions(
          self.predictor("hc")(tree["params"], tree["model_state"], self.test_arrays.images),
          self.data, ("peaks",))["peaks"])
    local = {k: (s.images[:n], s.masks[:n], out["pred"][k][:n], None if peaks is None else peaks[k][:n])
             for k, s in enumerate(self.data.test) if s is not None}
    ex = sharding.merge_sites(local)

    def stack(j):
      if ex[0][j] is None:
        return None
      a = np.zeros((self.k, n) + ex[0][j].shape[1:], ex[0][j].dtype)
      for k in range(self.k):
        a[k, :len(ex[k][j])] = ex[k][j]
      return a
    return {"images": stack(0), "gts": stack(1), "preds": stack(2), "peaks": stack(3),
            "counts": [len(ex[k][0]) for k in range(self.k)], "per_site": n}

  def write_outputs(self, workdir, result: Dict, tree, out: Dict, site_outputs, stem: str, log) -> None:
    examples = self.overlay_examples(tree, out, site_outputs) if config_plots(self.config) else None
    if not sharding.is_main_process():
      return
    paths = report.write(workdir, result, stem)
    if examples is not None:
      plots.overlays(site_names=self.data.site_names, path=Path(workdir) / f"{stem}_overlays.png",
                     **examples)
    log(report.to_markdown(result))
    log(f"wrote {', '.join(str(p) for p in paths.values())}")


def config_plots(config) -> bool:
  return bool(config.eval.get("plots", True))


def _result(setup: _Setup, scores: Dict, tracker_json: Dict, policy: str, checkpoint: str) -> Dict:
  return {"method": setup.method.name, "task": setup.data.task, "selection": policy,
          "checkpoint": checkpoint, "site_rounds": tracker_json["site_rounds"],
          "site_outputs": tracker_json["site_outputs"], "sites": scores["sites"],
          "mean": scores["mean"], "std": scores["std"]}


def _cut_metrics(path: Path, last_round: int) -> List[Dict]:
  """Keeps the records of rounds <= last_round (a resume replays the rest)."""
  records = io_utils.read_jsonl(path)
  kept = [r for r in records if int(r["round"]) <= last_round]
  if (len(kept) != len(records) or not path.exists()) and sharding.is_main_process():
    io_utils.atomic_write_text(path, "".join(
        json.dumps(r, sort_keys=True, default=io_utils._jsonable) + "\n" for r in kept))
  return kept


def train_and_evaluate(config, workdir: str, log=print) -> Dict:
  validate(config)
  validate_eval(config)
  workdir = Path(workdir)
  main_process = sharding.is_main_process()
  if main_process:
    workdir.mkdir(parents=True, exist_ok=True)
    io_utils.atomic_write_json(workdir / "config.json", config.to_dict())

  setup = _Setup(config, log)
  data, schedule, k, layout = setup.data, setup.schedule, setup.k, setup.layout
  policy = selection.policy(config)
  train_splits, val_splits, train_sizes = data.train, None, setup.train_sizes
  if policy == "val":
    train_splits, val_splits = selection.carve_validation(data.train, float(config.eval.val_fraction),
                                                          int(config.seed))
    train_sizes = split_sizes(train_splits)
    log(f"selection: validation split of {split_sizes(val_splits)} examples carved from training "
        f"(train now {train_sizes})")
  else:
    log(f"selection: {policy}")
  trivial = evaluation.trivial_baselines(data)
  log(f"reference: all-foreground mean IoU {trivial['all_foreground']:.4f}, "
      f"all-background mean IoU {trivial['all_background']:.4f}")

  method, model = setup.method, setup.model
  host_state = jax.tree.map(np.asarray, engine.init_state(model, int(config.seed), k, setup.image_shape,
                                                          config.federated.same_init))
  masks = engine.Masks.build(host_state, method)
  state = layout.pad_host_tree(host_state)        # every site (and padding) on its device
  weights = layout.weights(site_weights(config, train_sizes))
  train_arrays = setup.stack(train_splits)
  val_arrays = setup.stack(val_splits, pad_multiple=setup.eval_batch) if val_splits else None
  log(f"method={method.name} backend={jax.default_backend()} conv={model.impl} "
      f"dtype={jnp.dtype(model.dtype).name} stages={[(s.name, s.rounds) for s in schedule.stages]}")

  ckpts = ckpt_lib.Checkpoints(workdir, int(config.checkpoint.keep))
  tracker = selection.Tracker(policy, data.site_names)
  meta = setup.meta(config, policy)
  latest = ckpts.latest_step()
  if latest is not None:
    saved = ckpts.read_meta(latest)
    ckpt_lib.check_resumable(saved, method.name, data.site_names, schedule)
    abstract = layout.abstract_real(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                 host_state))
    restored = ckpts.restore(latest, abstract, items=("state", "selected"))
    state = layout.pad(restored["state"])
    if saved["has_selection"]:
      tracker.load_json(saved["selection"], layout.pad(restored["selected"]))
    log(f"resumed from {ckpts.dir / str(latest)} (round {int(state.round)}/{schedule.total})")
  start_round = int(state.round)
  metrics_path = workdir / "metrics.jsonl"
  history = _cut_metrics(metrics_path, start_round)

  def save(done: int, improved: bool = False):
    tree = tracker.tree if tracker.has_selection else selection.model_tree(state)
    ckpts.save(done, layout.strip(state), layout.strip(tree), dict(meta, has_selection=tracker.has_selection,
                                       selection=tracker.to_json()),
               protect=tracker.selected_steps() | ({done} if improved else set()))

  t_start, rounds_run = time.time(), 0
  for stage, a, b in schedule.spans():
    if b <= start_round or stage.rounds == 0:
      continue
    round_fn = engine.make_round_fn(model, stage, masks, config, k, layout)
    predict = setup.predictor(stage.output)
    for r in range(max(a, start_round), b):
      t_round = time.time()
      state, losses = round_fn(state, train_arrays, weights)
      losses = sharding.to_host(losses)[:k]
      rounds_run += 1
      done = r + 1
      rps = rounds_run / (time.time() - t_start)
      log(f"round {done}/{schedule.total} [{stage.name}] loss " +
          " ".join(f"{x:.4f}" for x in losses) +
          f" | {1.0 / max(time.time() - t_round, 1e-9):.2f} rounds/s, "
          f"ETA {_fmt_eta((schedule.total - done) / max(rps, 1e-9))}")
      improved = False
      if done % int(config.eval_every) == 0 or done == b:
        result = evaluation.evaluate(predict, state, setup.test_arrays, data.test, data, config)
        record = {"round": done, "stage": stage.name, "loss": losses.tolist(), **result}
        on = result
        if val_arrays is not None:
          record["val"] = evaluation.evaluate(predict, state, val_arrays, val_splits, data, config)
          on = record["val"]
        improved = tracker.update(state, done, [on["sites"][s]["iou"] for s in data.site_names],
                                  stage.output, stage.per_site_selection)
        record["selection"] = tracker.to_json()
        if main_process:
          io_utils.append_jsonl(metrics_path, record)
        history.append(record)
        log(evaluation.format_line(record, data.site_names) +
            (f" | val mean IoU {record['val']['mean']['iou']:.4f}" if val_arrays is not None else "") +
            (" | selected" if improved else ""))
      if done % int(config.checkpoint_every) == 0 or done == b or (improved and policy != "last"):
        save(done, improved)
  ckpts.close()

  if not tracker.has_selection:     # nothing was evaluated (a schedule of zero rounds)
    tracker.update(state, int(state.round), np.zeros(k), schedule.stage_at(int(state.round)).output, False)
  sel = tracker.to_json()
  scores, out = setup.evaluate_selected(tracker.tree, tracker.outputs, config)
  final = _result(setup, scores, sel, policy, "best")
  log(f"selected ({policy}): " + report.selected_rounds_text(final))
  setup.write_outputs(workdir, final, tracker.tree, out, tracker.outputs, "results", log)
  if config_plots(config) and history and main_process:
    plots.iou_curves(history, data.site_names, workdir / "iou_curves.png", sel["site_rounds"],
                     title=f"{method.name}: test IoU per site (selection: {policy})")
  return {"history": history, "state": layout.strip(state), "data": data,
          "selected": layout.strip(tracker.tree), "result": final}


def _eval_config(config, saved: Dict):
  """The checkpoint's own config (model, method, schedule, data), with the eval settings
  and data location of the config given now."""
  c = ml_collections.ConfigDict(saved["config"])
  c.eval = config.eval
  c.data_dir = config.data_dir
  if "mesh" in config:      # the devices of this run, not of the one that trained
    c.mesh = config.mesh
  if "root" in config.data:
    c.data.root = config.data.root
  return c


def evaluate_checkpoint(config, workdir: str, log=print) -> Dict:
  """`--mode eval`: restores the best (or latest, `config.eval.checkpoint`) model onto the
  devices present and evaluates every site on its test split."""
  validate_eval(config)
  which = config.eval.get("checkpoint", "best")
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  step = ckpts.latest_step()
  saved = ckpts.read_meta(step)
  config = _eval_config(config, saved)
  setup = _Setup(config, log)
  if list(setup.data.site_names) != list(saved["site_names"]):
    raise ConfigError(f"checkpoint sites {saved['site_names']} != data sites {setup.data.site_names}")
  layout = setup.layout
  abstract = ckpt_lib.abstract_state(setup.model, config, setup.k, setup.image_shape, layout=layout)
  t0 = time.time()
  if which == "best" and saved["has_selection"]:
    tree = layout.pad(ckpts.restore(step, abstract, items=("selected",))["selected"])
    sel = saved["selection"]
  else:
    state = layout.pad(ckpts.restore(step, abstract, items=("state",))["state"])
    tree = selection.model_tree(state)
    rounds = int(state.round)
    output = setup.schedule.stage_at(rounds).output
    sel = {"site_rounds": {s: rounds for s in setup.data.site_names},
           "site_outputs": {s: output for s in setup.data.site_names}}
    which = "latest"
  ckpts.close()
  log(f"restored {which} model from {ckpts.dir / str(step)} onto {layout.num_devices} device(s) "
      f"({time.time() - t0:.1f}s)")
  outputs = [sel["site_outputs"][s] for s in setup.data.site_names]
  t0 = time.time()
  scores, out = setup.evaluate_selected(tree, outputs, config)
  n = sum(setup.test_sizes)
  log(f"evaluated {n} test images in {time.time() - t0:.1f}s")
  result = _result(setup, scores, sel, saved["selection_policy"], which)
  stem = "results" if which == "best" else "eval_latest"
  setup.write_outputs(workdir, result, tree, out, outputs, stem, log)
  if sharding.is_main_process():
    io_utils.atomic_write_json(Path(workdir) / f"eval_{which}.json",
                               dict(result, checkpoint_step=step,
                                    devices=[str(d) for d in layout.mesh.devices.flat]))
  return result
