"""The mapped round, aggregation semantics, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from helpers import build, equal_across_sites, flat
from lcfed_jax.fed import optim, server
from lcfed_jax.data.device import sample_batch
from lcfed_jax.fed.losses import dice_loss
from reference_adam import adam_init, adam_update


@pytest.fixture(scope="module")
def fedavg():
  # A large Adam eps keeps float-noise gradients (biases before instance norm have a
  # true gradient of exactly zero) from being scaled up to full lr steps, so the mapped
  # and the reference round can be compared tightly.
  # 'unroll' runs the very convolution the un-mapped reference runs: other algorithms
  # differ by float rounding, which max-pool ties can turn into different subgradients.
  return build(tiny_config("fedavg", **{"optimizer.eps": 1e-3, "model.conv_impl": "unroll",
                                        "federated.same_init": False}))


def test_aggregate_means_shared_and_keeps_personal():
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.normal(size=(3, 2, 2))), "b": jnp.asarray(rng.normal(size=(3, 4)))}
  w = jnp.asarray([0.5, 0.25, 0.25])
  out = server.aggregate(tree, {"a": True, "b": False}, w)
  expect = np.tensordot(np.asarray(w), np.asarray(tree["a"]), axes=1)
  for k in range(3):
    np.testing.assert_allclose(out["a"][k], expect, rtol=1e-6)
  np.testing.assert_array_equal(out["b"], tree["b"])


def test_fedavg_round_makes_every_leaf_equal_across_sites(fedavg):
  state, _ = fedavg.round_fn()(fedavg.fresh_state(), fedavg.arrays, fedavg.weights)
  before = flat(fedavg.state.params)
  for path, leaf in flat(state.params).items():
    assert equal_across_sites(leaf), path
    assert not equal_across_sites(before[path]), path   # independent init per site


def test_every_site_starts_from_one_initial_model_unless_told_otherwise():
  """Default: the server's one draw given to every site; `same_init=False`: each site its
  own draw (the official script), of which site 0's is the common model."""
  from lcfed_jax.fed import setup
  states = {}
  for same in (True, False):
    exp = setup.build(tiny_config("lcfed", **{"federated.same_init": same}), 4, 3, 1, (32, 32, 3))
    states[same] = flat(exp.init_state().params)
  for path, leaf in states[True].items():
    np.testing.assert_array_equal(leaf, np.broadcast_to(states[False][path][:1], leaf.shape), err_msg=path)
    if "/kernel" in path or "/embed" in path:   # drawn at random (biases may start at zero)
      assert not equal_across_sites(states[False][path]), path


def test_local_round_keeps_sites_apart():
  s = build(tiny_config("local", **{"federated.same_init": False}))
  state, _ = s.round_fn()(s.fresh_state(), s.arrays, s.weights)
  for path, leaf in flat(state.params).items():
    assert not equal_across_sites(leaf), path


def _reference_round(s, state):
  """Sites stepped one by one with an un-mapped step, then the server mean (fedavg).

  Returns the averaged params and each site's mean loss over its local steps.
  """
  c = s.config
  lr, bs = float(c.learning_rate), int(c.batch_size)
  trainable = jax.tree.map(lambda _: jnp.asarray(True), jax.tree.map(lambda a: a[0], state.params))

  @jax.jit
  def step(params, opt, images, masks, count, key, site):
    x, y = sample_batch(images, masks, count, key, bs)
    loss_fn = lambda p: dice_loss(s.model.apply({"params": p}, x, site, train=True)["probs"], y)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt = adam_update(grads, opt, params, trainable, lr, eps=float(c.optimizer.eps))
    return params, opt, loss

  new_params, losses = [], []
  for k in range(s.data.num_sites):
    params = jax.tree.map(lambda a: a[k], state.params)
    opt = adam_init(params)
    key = jax.random.fold_in(state.rng[k], state.round)
    site_losses = []
    for i in range(int(c.local_steps)):
      params, opt, loss = step(params, opt, s.arrays.images[k], s.arrays.masks[k],
                               s.arrays.counts[k], jax.random.fold_in(key, i), k)
      site_losses.append(float(loss))
    new_params.append(params)
    losses.append(np.mean(site_losses))
  return jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *new_params), np.array(losses)


def test_mapped_round_equals_per_site_reference(fedavg):
  """Same losses step by step and the same averaged parameters and outputs."""
  ref_params, ref_losses = _reference_round(fedavg, fedavg.fresh_state())
  state, losses = fedavg.round_fn()(fedavg.fresh_state(), fedavg.arrays, fedavg.weights)
  np.testing.assert_allclose(np.asarray(losses), ref_losses, atol=1e-4, rtol=1e-5)
  # Parameters: the gap to the reference is a small fraction of how far the round moved
  # them (Adam turns rounding-level gradients of a few elements into ~lr steps, so an
  # elementwise max would be noise).
  gap = np.mean([float(jnp.mean(jnp.abs(a[0] - b))) for a, b in
                 zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params))])
  moved = np.mean([float(jnp.mean(jnp.abs(a[0] - b))) for a, b in
                   zip(jax.tree.leaves(fedavg.state.params), jax.tree.leaves(ref_params))])
  assert gap < 0.02 * moved, (gap, moved)
  assert moved > 1e-4   # the round did move the model: the comparison is not vacuous


def test_round_is_deterministic_and_seed_dependent(fedavg):
  f = fedavg.round_fn()
  a, la = f(fedavg.fresh_state(), fedavg.arrays, fedavg.weights)
  b, lb = f(fedavg.fresh_state(), fedavg.arrays, fedavg.weights)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(la, lb)
  # A later round draws other batches (the round folds into the key).
  c, lc = f(a, fedavg.arrays, fedavg.weights)
  assert not np.array_equal(np.asarray(lc), np.asarray(la))


def test_sampling_stays_inside_each_site():
  images = jnp.arange(6, dtype=jnp.uint8).reshape(6, 1, 1, 1) * 40 + 1
  masks = jnp.zeros((6, 1, 1, 1), jnp.uint8)
  seen = set()
  for i in range(50):
    x, _ = sample_batch(images, masks, jnp.int32(4), jax.random.PRNGKey(i), 3)
    seen |= set(np.round(np.asarray(x).ravel() * 255).astype(int).tolist())
  assert seen == {1, 41, 81, 121}   # rows 0..3 only; padding rows 4, 5 never drawn


def test_size_weighting():
  s = build(tiny_config("fedavg", **{"federated.weighting": "size"}))
  from lcfed_jax.run.runner import site_weights, split_sizes
  w = site_weights(s.config, split_sizes(s.data.train))
  np.testing.assert_allclose(w, np.array([10, 7, 5, 8]) / 30, rtol=1e-6)


@pytest.mark.parametrize("how", ["keep", "mean", "reset"])
def test_server_optimizer_state_options(how):
  s = build(tiny_config("fedavg", **{"federated.opt_state": how}))
  state, _ = s.round_fn()(s.fresh_state(), s.arrays, s.weights)
  mu = flat(optim.field(state.opt_state, "mu", state.params))
  counts = flat(optim.field(state.opt_state, "count", state.params))
  kernel = "down1/conv1/kernel"
  if how == "keep":      # official: every site keeps its own moments
    assert not equal_across_sites(mu[kernel]) and np.all(counts[kernel] == 4)
  elif how == "mean":
    assert equal_across_sites(mu[kernel]) and np.all(counts[kernel] == 4)
  else:
    assert np.all(mu[kernel] == 0) and np.all(counts[kernel] == 0)


def test_rolled_and_unrolled_local_steps_give_the_same_round(fedavg):
  """The local-step loop rolled (one step per iteration, the default) and fully unrolled."""
  unrolled = build(tiny_config("fedavg", **{"optimizer.eps": 1e-3, "model.conv_impl": "unroll",
                                            "model.scan_unroll": 4, "federated.same_init": False}))
  a, la = fedavg.round_fn()(fedavg.fresh_state(), fedavg.arrays, fedavg.weights)
  b, lb = unrolled.round_fn()(unrolled.fresh_state(), unrolled.arrays, unrolled.weights)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
