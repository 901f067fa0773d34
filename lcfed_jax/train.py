"""`train_and_evaluate(config, workdir)`: the whole experiment, stage after stage."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax import engine, evaluate as evaluation, io_utils
from lcfed_jax.config_validation import validate
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.tasks import load_task
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


def site_weights(config, data) -> np.ndarray:
  if config.federated.weighting == "size":
    n = np.array([len(s) for s in data.train], np.float32)
    return n / n.sum()
  return np.full((data.num_sites,), 1.0 / data.num_sites, np.float32)


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config, workdir: str, log=print) -> Dict:
  validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  io_utils.atomic_write_json(workdir / "config.json", config.to_dict())

  t0 = time.time()
  data = load_task(config)
  log(f"data: task={data.task} sites={data.site_names} "
      f"train={[len(s) for s in data.train]} test={[len(s) for s in data.test]} "
      f"({time.time() - t0:.1f}s)")
  trivial = evaluation.trivial_baselines(data)
  log(f"reference: all-foreground mean IoU {trivial['all_foreground']:.4f}, "
      f"all-background mean IoU {trivial['all_background']:.4f}")

  method: Method = get_method(config)
  schedule = Schedule(list(method.stages))
  k = data.num_sites
  model = engine.build_model(config, method, k, data.in_channels, data.num_classes)
  image_shape = data.train[0].images.shape[1:]
  state = engine.init_state(model, int(config.seed), k, image_shape, config.federated.same_init)
  masks = engine.Masks.build(state, method)
  weights = jnp.asarray(site_weights(config, data))
  train_arrays = stack_splits(data.train)
  test_arrays = stack_splits(data.test, pad_multiple=int(config.eval.batch_size))
  log(f"method={method.name} backend={jax.default_backend()} conv={model.impl} "
      f"dtype={jnp.dtype(model.dtype).name} stages={[(s.name, s.rounds) for s in schedule.stages]}")

  metrics_path = workdir / "metrics.jsonl"
  history = []
  predictors = {}
  start_round = int(state.round)
  t_start, rounds_run = time.time(), 0
  for stage, a, b in schedule.spans():
    if b <= start_round or stage.rounds == 0:
      continue
    round_fn = engine.make_round_fn(model, stage, masks, config, k)
    if stage.output not in predictors:
      predictors[stage.output] = engine.make_predict_fn(model, stage.output, int(config.eval.batch_size), k)
    for r in range(max(a, start_round), b):
      t_round = time.time()
      state, losses = round_fn(state, train_arrays, weights)
      losses = np.asarray(losses)
      rounds_run += 1
      done = r + 1
      elapsed = time.time() - t_start
      rps = rounds_run / elapsed
      log(f"round {done}/{schedule.total} [{stage.name}] loss " +
          " ".join(f"{x:.4f}" for x in losses) +
          f" | {1.0 / max(time.time() - t_round, 1e-9):.2f} rounds/s, "
          f"ETA {_fmt_eta((schedule.total - done) / max(rps, 1e-9))}")
      if done % int(config.eval_every) == 0 or done == b:
        result = evaluation.evaluate(predictors[stage.output], state, test_arrays, data, config)
        record = {"round": done, "stage": stage.name, "loss": losses.tolist(), **result}
        io_utils.append_jsonl(metrics_path, record)
        history.append(record)
        log(evaluation.format_line(record, data.site_names))
  return {"history": history, "state": state, "data": data}
