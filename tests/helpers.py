"""Test helpers: build a tiny engine for a method and run rounds directly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax import engine, partition
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.synthetic import generate
from lcfed_jax.methods import get_method


@dataclasses.dataclass
class Setup:
  config: object
  method: object
  model: object
  state: object
  masks: object
  data: object
  arrays: object
  weights: object

  def round_fn(self, stage_index=0, stage=None):
    st = stage or self.method.stages[stage_index]
    return engine.make_round_fn(self.model, st, self.masks, self.config, self.data.num_sites)

  def fresh_state(self):
    return jax.tree.map(jnp.copy, self.state)


def build(config):
  data = generate(int(config.data.num_sites), int(config.image_size), tuple(config.data.train_sizes),
                  int(config.data.test_size), int(config.seed))
  method = get_method(config)
  k = data.num_sites
  model = engine.build_model(config, method, k, data.in_channels, data.num_classes)
  state = engine.init_state(model, int(config.seed), k, data.train[0].images.shape[1:])
  masks = engine.Masks.build(state, method)
  return Setup(config, method, model, state, masks, data, stack_splits(data.train),
               jnp.full((k,), 1.0 / k))


def flat(tree):
  """{'path': leaf} over a site-stacked tree."""
  return {partition.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def equal_across_sites(x) -> bool:
  return bool(np.all(x == x[:1]))
