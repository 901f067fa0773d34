"""`Run`: what training and `--mode eval` both build from a config: the device layout,
this process's sites' data, the experiment (`lcfed_jax.fed.setup`), the stacked test
arrays, and the evaluation and output helpers.

On several hosts each process loads only the sites whose rows live on its own devices
(`SiteLayout.local_sites`); what needs every site (split sizes, per-site scores, the
overlay examples) is gathered as small host values.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from lcfed_jax.data import sanity
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.tasks import load_task, site_names as task_site_names
from lcfed_jax.eval import evaluate as evaluation, selection
from lcfed_jax.fed import setup, sharding
from lcfed_jax.run import plots, report
from lcfed_jax.util.errors import ConfigError


def split_sizes(splits) -> List[int]:
  """Every site's split length; each process knows those of its own sites (the others'
  entries are None), so the lengths are gathered."""
  sizes = sharding.merge_sites({k: len(s) for k, s in enumerate(splits) if s is not None})
  return [int(sizes[k]) for k in range(len(splits))]


def site_weights(config, sizes) -> np.ndarray:
  """Server weights: uniform (the official 1/K), or by each site's training-set size."""
  if config.federated.weighting == "size":
    n = np.asarray(sizes, np.float32)
    return n / n.sum()
  return np.full((len(sizes),), 1.0 / len(sizes), np.float32)


class Run:
  def __init__(self, config, log: Callable[[str], None] = logging.info):
    t0 = time.time()
    self.config, self.log = config, log
    names = task_site_names(config)
    self.k = len(names)
    self.layout = sharding.from_config(config, self.k)
    log(self.layout.describe())
    local = self.layout.local_sites()
    if not local:
      raise ConfigError(
          f"process {jax.process_index()} would hold only padding sites: {self.k} sites on "
          f"{self.layout.num_devices} devices of {jax.process_count()} processes; run fewer "
          f"processes or devices (config.mesh.num_devices) than there are sites")
    self.data = data = load_task(config, sites=local)
    if list(data.site_names) != list(names):
      raise RuntimeError(f"site list changed while loading: {names} -> {data.site_names}")
    sanity.check_foreground(data)
    self.train_sizes, self.test_sizes = split_sizes(data.train), split_sizes(data.test)
    here = f" (this process: {[names[i] for i in local]})" if jax.process_count() > 1 else ""
    log(f"data: task={data.task} sites={data.site_names} "
        f"train={self.train_sizes} test={self.test_sizes}{here} ({time.time() - t0:.1f}s)")
    image_shape = data.train[local[0]].images.shape[1:]
    self.exp = setup.build(config, self.k, data.in_channels, data.num_classes, image_shape, self.layout)
    self.method, self.model = self.exp.method, self.exp.model
    self.eval_batch = int(config.eval.batch_size)
    # What predictions are made on: every site's test split first (training appends its
    # validation split, so one compiled predictor serves both).
    self.eval_arrays = self.stack(data.test, pad_multiple=self.eval_batch)

  def stack(self, splits, pad_multiple: int = 1):
    """Site-sharded arrays of per-site splits, padded with the layout's empty sites."""
    return stack_splits(splits, self.layout.num_padding, pad_multiple, sharding=self.layout.site_sharding)

  def predictor(self, output: str):
    return self.exp.predict_fn(output, self.eval_batch)

  @property
  def plots(self) -> bool:
    return bool(self.config.eval.plots)

  @property
  def seed_views(self) -> List:
    """Indices into the seed axis, or [None] without one."""
    return list(range(len(self.exp.seeds))) if self.exp.seeds else [None]

  def evaluate_selected(self, tree, site_outputs) -> Tuple:
    """(scores on every site's test split, {key: {site: predictions}} of this process's
    sites) of a {'params','model_state'} tree. With a seed axis: a list of scores."""
    # HC peak maps leave the device only for the overlay figure.
    keys = ("pred", "peaks") if self.method.model.hc and self.plots else ("pred",)
    out = selection.predict_selected(self.predictor, tree, site_outputs, self.eval_arrays.images,
                                     self.k, keys)
    scores = [evaluation.score_predictions(evaluation.seed_rows(out["pred"], v), self.data.test, self.data,
                                           self.config) for v in self.seed_views]
    return (scores if self.exp.seeds else scores[0]), out

  def overlay_examples(self, tree, out: Dict, site_outputs, seed_index=None) -> Dict:
    """The first `eval.overlay_examples` test images of every site with their masks,
    predictions and (HC) peak maps, gathered from the processes that hold them."""
    n = int(self.config.eval.overlay_examples)
    peaks = None
    if self.method.model.hc:   # the heads' disagreement peaks, whichever output was selected
      peaks = (out["peaks"] if all(o == "hc" for o in site_outputs) else evaluation.local_predictions(
          self.predictor("hc")(tree["params"], tree["model_state"], self.eval_arrays.images),
          self.data, ("peaks",))["peaks"])
      peaks = evaluation.seed_rows(peaks, seed_index)
    pred = evaluation.seed_rows(out["pred"], seed_index)
    local = {k: (s.images[:n], s.masks[:n], pred[k][:n], None if peaks is None else peaks[k][:n])
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

  def write_outputs(self, workdir, result: Dict, tree, out: Dict, site_outputs, stem: str,
                    board=None, seed_index=None) -> Optional[Path]:
    """results.{md,csv,json} and the overlay figure (process 0 writes; all gather)."""
    examples = self.overlay_examples(tree, out, site_outputs, seed_index) if self.plots else None
    if not sharding.is_main_process():
      return None
    paths = report.write(workdir, result, stem)
    figure = None
    if examples is not None:
      figure = plots.overlays(site_names=self.data.site_names, path=Path(workdir) / f"{stem}_overlays.png",
                              **examples)
      if board is not None:
        board.image(f"{stem}/overlays", figure, max(result["site_rounds"].values()))
    self.log(report.to_markdown(result))
    self.log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return figure


def result_record(run: Run, scores: Dict, selection_json: Dict, policy: str, checkpoint: str,
                  earlier_stages=()) -> Dict:
  """What results.json holds; `earlier_stages`: the selections of stages a later stage
  started from (`lcfed_jax.run.stages.selected_result`), with their test scores."""
  return result_json(run.method.name, run.data.task, run.data.site_names, scores, selection_json, policy,
                     checkpoint, earlier_stages)


def result_json(method: str, task: str, site_names, scores: Dict, selection_json: Dict, policy: str,
                checkpoint: str, earlier_stages=()) -> Dict:
  """`result_record` from its parts (a Flower server has no `Run`: it writes the same)."""
  out = {"method": method, "task": task, "site_names": list(site_names), "selection": policy,
         "checkpoint": checkpoint, "site_rounds": selection_json["site_rounds"],
         "site_outputs": selection_json["site_outputs"], "sites": scores["sites"],
         "mean": scores["mean"], "std": scores["std"]}
  if earlier_stages:
    out["earlier_stages"] = list(earlier_stages)
  return out
