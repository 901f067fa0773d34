"""Test helpers: a tiny experiment built through the one setup path, run round by round."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.synthetic import generate
from lcfed_jax.fed import partition, setup


@dataclasses.dataclass
class Setup:
  config: object
  exp: object
  state: object
  data: object
  arrays: object
  weights: object

  @property
  def method(self):
    return self.exp.method

  @property
  def model(self):
    return self.exp.model

  @property
  def masks(self):
    return self.exp.masks

  def round_fn(self, stage_index=0, stage=None):
    """`round(state, arrays, weights) -> (state, losses)` of a stage of the method."""
    fn = self.exp.round_fn(stage or self.method.stages[stage_index])
    return lambda *a: fn(*a)[:2]

  def fresh_state(self):
    return jax.tree.map(jnp.copy, self.state)


def build(config):
  data = generate(int(config.data.num_sites), int(config.image_size), tuple(config.data.train_sizes),
                  int(config.data.test_size), int(config.seed))
  k = data.num_sites
  exp = setup.build(config, k, data.in_channels, data.num_classes, data.train[0].images.shape[1:])
  return Setup(config, exp, exp.init_state(), data, stack_splits(data.train), jnp.full((k,), 1.0 / k))


def flat(tree):
  """{'path': leaf} over a site-stacked tree."""
  return {partition.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def equal_across_sites(x) -> bool:
  return bool(np.all(x == x[:1]))
