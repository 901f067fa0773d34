"""One site of a federation, alone: its data, the federation's model and the jitted programs.

The model is the federation's (K sites: PCS codes and the contrastive term over K codes,
HC over K heads) and this site is its site k. The state holds site k alone, on a one-site
layout (`engine`: a layout holding a subset of the sites), and starts as row k of the
federation's initial state, so its initial parameters, its data key and thereby its batch
stream (`fold_in(rng[k], round)`) are those of site k in the simulation. The round program
is the stage's with no server step (the server applies it to the replies) and is the same
program for every k (the site index is an argument), so the sites of one process, and of
processes sharing the compilation cache, compile it once.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax.data import sanity
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.tasks import load_task, site_names
from lcfed_jax.eval import evaluate as evaluation, selection
from lcfed_jax.fed import optim, server as servers, setup, sharding
from lcfed_jax.fed.methods import Stage


class Site:
  def __init__(self, config, index: int):
    self.config = config
    self.names = site_names(config)
    self.k, self.num_sites = int(index), len(self.names)
    self.name = self.names[self.k]
    data = load_task(config, sites=[self.k])
    sanity.check_foreground(data)
    self.data = data
    train, val = data.train, None
    if config.eval.selection == "val":
      train, val = selection.carve_validation(data.train, float(config.eval.val_fraction),
                                              int(config.eval.val_seed))
    self.train, self.test = train[self.k], data.test[self.k]
    self.val = None if val is None else val[self.k]
    self.image_shape = tuple(int(s) for s in self.train.images.shape[1:])
    self.exp = setup.build(config, self.num_sites, data.in_channels, data.num_classes, self.image_shape,
                           sharding.single_device_layout(1))
    self.eval_batch = int(config.eval.batch_size)
    self.train_arrays = stack_splits([self.train])
    # Test rows first, then validation: one predictor shape serves every evaluation.
    parts = [self.test] + ([self.val] if self.val is not None else [])
    self.eval_arrays = stack_splits(evaluation.concat_splits(*[[p] for p in parts]), pad_multiple=self.eval_batch)

  @property
  def train_size(self) -> int:
    return len(self.train)

  def initial_state(self):
    """Row k of the federation's initial state (host arrays, a site axis of 1)."""
    full = self.exp.init_state()
    return jax.tree.map(lambda a: np.asarray(a[self.k:self.k + 1]) if np.ndim(a) else np.asarray(a), full)

  def abstract_state(self):
    """The one-site state's structure, shapes and dtypes."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:] if a.ndim else a.shape, a.dtype),
                        self.exp.abstract_state())

  def local_stage(self, stage: Stage) -> Stage:
    return dataclasses.replace(stage, server=servers.step("none"))

  def train_round(self, state, stage: Stage, round_index: int, heads: Optional[Dict] = None
                  ) -> Tuple[object, float, bool]:
    """Site k's local round `round_index` (rounds completed before it, over all stages):
    (new state, mean loss, whether the loss and parameters are finite)."""
    state = jax.tree.map(jnp.asarray, state).replace(round=jnp.asarray(round_index, jnp.int32))
    fn = self.exp.round_fn(self.local_stage(stage))
    state, loss, finite = fn(state, self.train_arrays, jnp.ones((1,), jnp.float32), self.k,
                             self.own_heads(heads, state) if "heads" in stage.needs else None)
    if self.config.federated.opt_state == "reset" and stage.server.averages:
      shared = self.exp.masks.shared()["params"]
      state = state.replace(opt_state=optim.map_leaf_states(
          lambda s: jax.tree.map(jnp.zeros_like, s), state.opt_state, shared))
    return state, float(np.asarray(loss)[0]), bool(np.asarray(finite)[0])

  def own_heads(self, heads: Optional[Dict], state) -> Dict:
    """Every site's head, this site's row being its own current head."""
    if heads is None:
      raise ValueError(f"site {self.name}: this stage needs every site's head and none was received")
    own = state.params["head"]
    return {n: jnp.asarray(heads[n]).at[self.k].set(jnp.asarray(own[n])[0]) for n in ("kernel", "bias")}

  def predict(self, state, output: str, heads: Optional[Dict]) -> np.ndarray:
    """uint8 predictions [N_pad, H, W, nc] of this site's model (output 'probs' or 'hc') on
    its test rows, then its validation rows."""
    fn = self.exp.predict_fn(output, self.eval_batch)
    state = jax.tree.map(jnp.asarray, state)
    out = fn(state.params, state.model_state, self.eval_arrays.images, self.k,
             self.own_heads(heads, state) if output == "hc" else None)
    return np.asarray(out["pred"][0])

  def evaluate(self, state, output: str, heads: Optional[Dict] = None, with_val: bool = True) -> Dict:
    """{'test': (means, spreads)[, 'val': ...]} of `evaluation.score_site` on this site."""
    rows, n = self.predict(state, output, heads), len(self.test)
    scores = {"test": evaluation.score_site(rows[:n], self.test, self.data, self.config)}
    if with_val and self.val is not None:
      scores["val"] = evaluation.score_site(rows[n:n + len(self.val)], self.val, self.data, self.config)
    return scores
