"""One setup path: from a config and the data's shapes to everything a run needs.

    exp = setup.build(config, num_sites, in_channels, num_classes, image_shape[, layout])
    state = exp.init_state()                  # FedState, every site on its leading axis
    state, losses, finite = exp.round_fn(stage)(state, data, weights)
    out = exp.predict_fn('probs', eval_batch)(state.params, state.model_state, images)

Training, evaluation, the benchmarks, the notebooks and the tests all build through
`build`, so a method, a model and its masks are made in exactly one way.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from lcfed_jax.fed import engine, optim, programs, sharding
from lcfed_jax.fed.methods import Method, Stage, get_method
from lcfed_jax.models.conv import default_impl
from lcfed_jax.models.unet import SegModel, TwinSegModel


def compute_dtype(config):
  name = config.model.dtype
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def conv_impl(config, num_models: int = 1) -> str:
  """`config.model.conv_impl`, with 'auto' resolved for the backend and the number of
  models one device's program holds (`lcfed_jax.models.conv.default_impl`)."""
  impl = config.model.conv_impl
  return default_impl(jax.default_backend(), num_models) if impl == "auto" else impl


def build_model(config, method: Method, num_sites: int, in_channels: int, num_classes: int,
                models_per_device: Optional[int] = None):
  """`models_per_device` (default: every site x every seed) picks the 'auto' conv."""
  del in_channels   # the first convolution takes its input width from the data
  spec = method.model
  if models_per_device is None:
    models_per_device = num_sites * max(1, len(config.seeds))
  common = dict(num_classes=num_classes, base=int(config.model.base), depth=int(config.model.depth),
                norm=spec.norm or config.model.norm, num_sites=num_sites,
                impl=conv_impl(config, models_per_device), dtype=compute_dtype(config))
  if spec.twin:
    return TwinSegModel(**common)
  c = config.lcfed
  return SegModel(pcs=spec.pcs, pcs_n=int(c.pcs_n), pcs_pool=c.pcs_pool, hc=spec.hc,
                  hc_official_no_eps=bool(c.hc_official_no_eps), **common)


@dataclasses.dataclass
class Experiment:
  config: object
  method: Method
  model: object
  num_sites: int
  image_shape: Tuple[int, ...]
  layout: sharding.SiteLayout
  _masks: Optional[engine.Masks] = None
  _abstract: Optional[engine.FedState] = None
  _rounds: Dict = dataclasses.field(default_factory=dict)
  _predictors: Dict = dataclasses.field(default_factory=dict)

  @property
  def stages(self) -> Tuple[Stage, ...]:
    return self.method.stages

  def optimizer(self):
    """The per-leaf optimizer at the main learning rate (stages may use another rate;
    the state's structure is the same)."""
    return optim.freezable(optim.make(self.config, float(self.config.learning_rate)),
                           self.config.federated.frozen_adam)

  @property
  def seeds(self) -> Tuple[int, ...]:
    """The seeds of the replica axis; () for one federation of `config.seed` (no axis)."""
    return tuple(int(s) for s in self.config.seeds)

  def init_state(self) -> engine.FedState:
    """The initial state of the `num_sites` real sites (not padded, default device). With
    `config.seeds`, every seed's own initial state on a second axis: leaves [K, S, ...]."""
    c = self.config
    init = lambda seed: engine.init_state(self.model, self.optimizer(), seed, self.num_sites, self.image_shape,
                                          bool(c.federated.same_init), self.method.synced_init,
                                          optimizer_key=programs.config_key(c))
    if not self.seeds:
      return init(int(c.seed))
    per_seed = [init(seed) for seed in self.seeds]
    return jax.tree.map(lambda *a: jnp.stack(a, 1) if a[0].ndim else a[0], *per_seed)

  def abstract_state(self) -> engine.FedState:
    """The initial state's structure, shapes and dtypes (nothing computed)."""
    if self._abstract is None:
      self._abstract = jax.eval_shape(self.init_state)
    return self._abstract

  @property
  def masks(self) -> engine.Masks:
    if self._masks is None:
      self._masks = engine.Masks.build(self.abstract_state(), self.method)
    return self._masks

  def round_fn(self, stage: Stage):
    """The jitted round of `stage`: one program per distinct (model, stage, partition,
    settings, layout) in the process (`lcfed_jax.fed.programs`)."""
    if stage not in self._rounds:
      m = self.method
      key = ("round", self.model, stage, m.personal, m.exclusive, programs.config_key(self.config),
             self.num_sites, self.layout)
      self._rounds[stage] = programs.get(key, lambda: engine.make_round_fn(
          self.model, stage, self.masks, programs.frozen(self.config), self.num_sites, self.layout))
    return self._rounds[stage]

  def use_compiled_predictor(self, output: str, eval_batch: int, compiled) -> None:
    """A predictor compiled ahead of time for one input shape (training's eval arrays)."""
    self._predictors[(output, int(eval_batch))] = compiled

  def predict_fn(self, output: str, eval_batch: int):
    key = (output, int(eval_batch))
    if key not in self._predictors:
      args = (self.model, output, int(eval_batch), self.num_sites, self.layout, len(self.seeds))
      self._predictors[key] = programs.get(("predict",) + args, lambda: engine.make_predict_fn(*args))
    return self._predictors[key]


def build(config, num_sites: int, in_channels: int, num_classes: int, image_shape,
          layout: Optional[sharding.SiteLayout] = None) -> Experiment:
  method = get_method(config)
  layout = layout or sharding.single_device_layout(num_sites)
  model = build_model(config, method, num_sites, in_channels, num_classes,
                      layout.per_device * max(1, len(config.seeds)))
  return Experiment(config, method, model, int(num_sites), tuple(int(s) for s in image_shape), layout)
