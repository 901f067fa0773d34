"""FedProx, Ditto, FedPer, FedBABU: one round of the mapped engine equals a plain
sequential per-site implementation of each method; and the records' registries."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from helpers import build, equal_across_sites, flat
from lcfed_jax.data.device import sample_batch
from lcfed_jax.fed import losses, methods, server
from lcfed_jax.fed.losses import dice_loss
from lcfed_jax.fed.partition import path_str
from lcfed_jax.util.errors import ConfigError
from reference_adam import adam_init, adam_update

# As in test_engine: a large Adam eps (float-noise gradients stay small steps) and the
# 'unroll' convolution (the very convolution the unmapped reference runs). Sites draw
# their own initial models, so a leaf equal across sites after a round was averaged.
EXACT = {"optimizer.eps": 1e-3, "model.conv_impl": "unroll", "local_steps": 3, "federated.same_init": False}


def _sq(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _sub(tree, mask, keep):
  return [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m == keep]


def reference_loss(name, config, model, params, start, shared, x, y, site):
  """Each method's local objective, written out by hand."""
  out = model.apply({"params": params}, x, site, train=True)
  if name == "ditto":
    lam = config.ditto.lam
    return (dice_loss(out["global_probs"], y) + dice_loss(out["probs"], y)
            + 0.5 * lam * _sq(params["personal"], start["global"]))
  loss = dice_loss(out["probs"], y)
  if name == "fedprox":
    loss = loss + 0.5 * config.fedprox.mu * _sq(_sub(params, shared, True), _sub(start, shared, True))
  return loss


def reference_round(s, state, stage_index=0):
  """Sites stepped one by one with an unmapped step, then the mean of the shared leaves."""
  c, name = s.config, s.method.name
  stage = s.method.stages[stage_index]
  lr = float(stage.learning_rate or c.learning_rate)
  shared = s.masks.shared()["params"]
  if name == "fedbabu":   # body only, then head only
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(path_str(p).startswith("head/") == (stage_index == 1)),
        jax.tree.map(lambda a: a[0], state.params))
  else:
    trainable = jax.tree.map(lambda _: jnp.asarray(True), jax.tree.map(lambda a: a[0], state.params))

  @jax.jit
  def step(params, opt, start, images, masks, count, key, site):
    x, y = sample_batch(images, masks, count, key, int(c.batch_size))
    loss, grads = jax.value_and_grad(
        lambda p: reference_loss(name, c, s.model, p, start, shared, x, y, site))(params)
    params, opt = adam_update(grads, opt, params, trainable, lr, eps=float(c.optimizer.eps))
    return params, opt, loss

  new, site_losses = [], []
  for k in range(s.data.num_sites):
    params = jax.tree.map(lambda a: a[k], state.params)
    start, opt = params, adam_init(params)
    key = jax.random.fold_in(state.rng[k], state.round)
    ls = []
    for i in range(int(c.local_steps)):
      params, opt, loss = step(params, opt, start, s.arrays.images[k], s.arrays.masks[k], s.arrays.counts[k],
                               jax.random.fold_in(key, i), k)
      ls.append(float(loss))
    new.append(params)
    site_losses.append(np.mean(ls))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *new)
  if stage.server.averages:
    stacked = jax.tree.map(lambda a, m: jnp.broadcast_to(a.mean(0), a.shape) if m else a, stacked, shared)
  return stacked, np.array(site_losses)


def assert_round_matches_reference(s, stage_index=0, state=None):
  state = state if state is not None else s.fresh_state()
  ref_params, ref_losses = reference_round(s, state, stage_index)
  new, got_losses = s.round_fn(stage_index)(jax.tree.map(jnp.copy, state), s.arrays, s.weights)
  # Losses of order 100 (Ditto's two networks) are compared relative to fp32 round-off.
  np.testing.assert_allclose(np.asarray(got_losses), ref_losses, atol=1e-4, rtol=1e-5)
  # The gap to the reference, against how far the round moved the leaves it trains.
  pairs = list(zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), jax.tree.leaves(ref_params)))
  moved = [float(jnp.mean(jnp.abs(a - r))) for a, _, r in pairs if not np.array_equal(a, r)]
  gap = [float(jnp.mean(jnp.abs(n - r))) for a, n, r in pairs]
  assert moved and np.mean(moved) > 1e-4 and np.mean(gap) < 0.02 * np.mean(moved), (gap, moved)
  return new


@pytest.mark.parametrize("method", ["fedprox", "ditto", "fedper"])
def test_round_equals_sequential_reference(method):
  over = dict(EXACT, **({"fedprox.mu": 0.5} if method == "fedprox" else {}))
  s = build(tiny_config(method, **over))
  new = assert_round_matches_reference(s)
  leaves = flat(new.params)
  personal = {"fedprox": (), "ditto": ("personal/",), "fedper": ("head/", "up1/")}[method]
  for path, x in leaves.items():
    assert equal_across_sites(x) == (not path.startswith(personal)), path


def test_fedbabu_stages_equal_sequential_reference():
  s = build(tiny_config("fedbabu", **EXACT))
  heads = flat(s.state.params)
  head_paths = [p for p in heads if p.startswith("head/")]
  assert head_paths and all(equal_across_sites(heads[p]) for p in head_paths)   # one shared init
  body = assert_round_matches_reference(s, 0)
  after = flat(body.params)
  assert all(np.array_equal(after[p], heads[p]) for p in head_paths)            # the head is frozen
  tuned = assert_round_matches_reference(s, 1, state=body)
  tuned = flat(tuned.params)
  for p, x in tuned.items():
    assert np.array_equal(x, after[p]) != p.startswith("head/"), p              # only the head moves
  assert not equal_across_sites(tuned[head_paths[0]])


def test_prox_gradient_is_zero_when_mu_is_zero():
  params = {"a": jnp.ones(3), "b": jnp.full(2, 2.0)}
  start = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  ctx = losses.LossContext(model=None, variables={"params": params}, out={}, y=None, site=0, start=start,
                           shared={"a": True, "b": False}, step=0)
  for mu, expect in ((0.0, 0.0), (0.5, 0.5 * 0.5 * 3)):
    term = losses.term("prox", mu=mu)
    g = jax.grad(lambda p: term(dataclasses.replace(ctx, variables={"params": p})))(params)
    assert float(term(ctx)) == pytest.approx(expect)
    np.testing.assert_allclose(g["a"], mu * np.ones(3))
    np.testing.assert_array_equal(g["b"], 0)   # a personal leaf is never pulled


def test_ditto_global_model_equals_fedavg_when_lambda_is_zero():
  d = build(tiny_config("ditto", **dict(EXACT, **{"ditto.lam": 0.0})))
  f = build(tiny_config("fedavg", **EXACT))
  # FedAvg from Ditto's global model: the same parameters and optimizer state.
  fed_state = f.fresh_state().replace(
      params=jax.tree.map(jnp.copy, d.state.params["global"]),
      opt_state=type(d.state.opt_state)(jax.tree.map(jnp.copy, d.state.opt_state.leaves["global"])))
  dn, _ = d.round_fn()(d.fresh_state(), d.arrays, d.weights)
  fn, _ = f.round_fn()(fed_state, f.arrays, f.weights)
  for a, b in zip(jax.tree.leaves(dn.params["global"]), jax.tree.leaves(fn.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unknown_loss_or_server_names_are_rejected_when_the_record_is_built():
  with pytest.raises(ConfigError, match="loss term 'dcie'"):
    methods.Stage("x", 1, (methods.Phase("all"),), loss=(losses.term("dcie"),))
  with pytest.raises(ConfigError, match="server step 'meen'"):
    methods.Stage("x", 1, (methods.Phase("all"),), server=server.step("meen"))
  with pytest.raises(ConfigError, match="takes the settings"):
    losses.term("prox")   # mu missing
  config = tiny_config("fedavg")
  config.method = "fedproxx"
  with pytest.raises(ConfigError, match="config.method='fedproxx'"):
    methods.get_method(config)


@pytest.mark.parametrize("method", ["fedprox", "ditto", "fedper", "fedbabu"])
def test_new_methods_resume_exactly_and_evaluate_from_their_checkpoint(method, tmp_path):
  """Checkpoints, resume, --mode eval and the reports work for every new method: a run
  stopped after round 1 and resumed equals an uninterrupted one, and the checkpoint's
  evaluation repeats its results."""
  from lcfed_jax.run import eval_checkpoint, train
  quiet = lambda *a, **k: None
  cfg = lambda rounds, ft=1: tiny_config(method, rounds=rounds, **{"fedbabu.ft_rounds": ft, "log.tensorboard": False})
  full = train.train_and_evaluate(cfg(2), str(tmp_path / "full"), log=quiet)
  train.train_and_evaluate(cfg(1, ft=0), str(tmp_path / "resumed"), log=quiet)   # stopped after round 1
  resumed = train.train_and_evaluate(cfg(2), str(tmp_path / "resumed"), log=quiet)
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert full["result"]["sites"] == resumed["result"]["sites"]
  again = eval_checkpoint.evaluate_checkpoint(cfg(2), str(tmp_path / "full"), log=quiet)
  assert again["sites"] == full["result"]["sites"] and again["site_rounds"] == full["result"]["site_rounds"]
  assert (tmp_path / "full" / "results.md").read_text().startswith(f"# {method} on synthetic")
