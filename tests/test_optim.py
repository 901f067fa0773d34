"""The optax optimizers with per-leaf freezing: PyTorch >= 2.0 semantics (a frozen leaf
keeps its moments and its own step count), checked against the project's earlier Adam
and a NumPy Adam over a freeze/unfreeze schedule; PyTorch < 2.0's 'zero_grad'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lcfed_jax.fed import optim
from reference_adam import adam_init, adam_update

# Which of two leaves trains at each of 8 steps: both, a only, b only, none, ...
SCHEDULE = [(1, 1), (1, 0), (1, 0), (0, 1), (0, 0), (1, 1), (0, 1), (1, 1)]
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def _grads(step):
  rng = np.random.default_rng(step)
  return {"a": rng.normal(size=(3,)).astype(np.float32), "b": rng.normal(size=(2, 2)).astype(np.float32)}


def numpy_adam(params, schedule):
  """PyTorch's Adam per leaf, a leaf with requires_grad=False skipped entirely."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  count = {k: 0 for k in p}
  for step, flags in enumerate(schedule):
    g = _grads(step)
    for (k, x), on in zip(sorted(p.items()), flags):
      if not on:
        continue
      count[k] += 1
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
      mh, vh = m[k] / (1 - B1 ** count[k]), v[k] / (1 - B2 ** count[k])
      p[k] = x - LR * mh / (np.sqrt(vh) + EPS)
  return p, count


def run_optax(params, schedule, frozen="skip", name="adam"):
  c = tiny_config("fedavg", **{"optimizer.name": name, "optimizer.b1": B1, "optimizer.b2": B2,
                               "optimizer.eps": EPS})
  opt = optim.freezable(optim.make(c, LR), frozen)
  state = opt.init(params)
  update = jax.jit(lambda g, s, p, t: opt.update(g, s, p, trainable=t))
  for step, flags in enumerate(schedule):
    t = {k: jnp.asarray(bool(on)) for k, on in zip(sorted(params), flags)}
    u, state = update(_grads(step), state, params, t)
    params = jax.tree.map(lambda p, d: p + d, params, u)
  return params, state


def test_freezable_adam_equals_numpy_adam_and_the_earlier_implementation():
  params = {"a": np.ones(3, np.float32), "b": np.full((2, 2), 0.5, np.float32)}
  got, state = run_optax(params, SCHEDULE)
  want, count = numpy_adam(params, SCHEDULE)
  ref_p, ref_s = params, adam_init(params)
  for step, flags in enumerate(SCHEDULE):
    t = {k: jnp.asarray(bool(on)) for k, on in zip(sorted(params), flags)}
    ref_p, ref_s = adam_update(_grads(step), ref_s, ref_p, t, LR, b1=B1, b2=B2, eps=EPS)
  counts = optim.field(state, "count", params)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref_p[k]), rtol=1e-5, atol=1e-6)
    assert int(counts[k]) == count[k] == int(ref_s.count[k])     # each leaf's own step count
    np.testing.assert_allclose(np.asarray(optim.field(state, "mu", params)[k]), np.asarray(ref_s.mu[k]), rtol=1e-5)


def test_a_frozen_leaf_keeps_its_state_and_zero_grad_keeps_moving_it():
  params = {"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.float32)}
  _, before = run_optax(params, [(1, 1)])
  p1, after = run_optax(params, [(1, 1), (1, 0)])
  for name in ("mu", "nu", "count"):   # b frozen in step 2: untouched
    np.testing.assert_array_equal(np.asarray(optim.field(after, name, params)["b"]),
                                  np.asarray(optim.field(before, name, params)["b"]))
  # PyTorch < 2.0: a zeroed gradient still counts and steps through the momentum.
  p2, z = run_optax(params, [(1, 1), (1, 0)], frozen="zero_grad")
  assert int(optim.field(z, "count", params)["b"]) == 2
  assert not np.array_equal(np.asarray(p2["b"]), np.asarray(p1["b"]))


def numpy_torch_lt2_adam(params, schedule, grads):
  """PyTorch < 2.0's loop: `zero_grad()` zeroes every gradient that exists (it never
  clears one), `backward()` fills the trainable leaves' gradients, `step()` updates
  every leaf whose gradient is not None."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  grad = {k: None for k in p}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  count = {k: 0 for k in p}
  for step, trainable in enumerate(schedule):
    grad = {k: None if g is None else np.zeros_like(g) for k, g in grad.items()}   # zero_grad()
    for k in trainable:                                                               # backward()
      grad[k] = grads(step)[k].astype(np.float64)
    for k in p:                                                                       # step()
      if grad[k] is None:
        continue
      count[k] += 1
      m[k] = B1 * m[k] + (1 - B1) * grad[k]
      v[k] = B2 * v[k] + (1 - B2) * grad[k] ** 2
      p[k] = p[k] - LR * (m[k] / (1 - B1 ** count[k])) / (np.sqrt(v[k] / (1 - B2 ** count[k])) + EPS)
  return p, m, v, count


def test_zero_grad_steps_a_leaf_only_once_it_has_had_a_gradient():
  """FedRep/LC-Fed's phase switch over two rounds of 2 head steps then 3 body steps;
  'hc' is never trainable (LC-Fed's HC in stage A)."""
  rng = np.random.default_rng(0)
  params = {"body": rng.normal(size=(3,)).astype(np.float32), "hc": np.ones(2, np.float32),
            "head": rng.normal(size=(2, 2)).astype(np.float32)}
  grads = lambda step: {k: np.random.default_rng(100 + step).normal(size=a.shape).astype(np.float32)
                        for k, a in sorted(params.items())}
  one_round = [("head",)] * 2 + [("body",)] * 3
  schedule = one_round * 2
  c = tiny_config("fedavg", **{"optimizer.b1": B1, "optimizer.b2": B2, "optimizer.eps": EPS})
  opt = optim.freezable(optim.make(c, LR), "zero_grad")
  state, got = opt.init(params), params
  update = jax.jit(lambda g, s, p, t: opt.update(g, s, p, trainable=t))
  for step, trainable in enumerate(schedule):
    t = {k: jnp.asarray(k in trainable) for k in params}
    u, state = update(grads(step), state, got, t)
    got = jax.tree.map(lambda p, d: p + d, got, u)
    if step == len(one_round) - 1:   # after round 1: the body stepped in its 3 steps only
      assert {k: int(c) for k, c in optim.field(state, "count", params).items()} == {"body": 3, "hc": 0, "head": 5}
  want_p, want_m, want_v, want_count = numpy_torch_lt2_adam(params, schedule, grads)
  counts = optim.field(state, "count", params)
  for k in params:
    assert int(counts[k]) == want_count[k], k
    np.testing.assert_allclose(np.asarray(got[k]), want_p[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(optim.field(state, "mu", params)[k]), want_m[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(optim.field(state, "nu", params)[k]), want_v[k], rtol=1e-5, atol=1e-9)
  assert want_count == {"body": 8, "hc": 0, "head": 10}   # round 2's head steps move the body too
  np.testing.assert_array_equal(np.asarray(got["hc"]), params["hc"])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sgd_and_adamw_freeze_the_same_way(name):
  params = {"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.float32)}
  p, state = run_optax(params, [(1, 0), (1, 0)], name=name)
  np.testing.assert_array_equal(np.asarray(p["b"]), params["b"])      # frozen all along
  assert not np.allclose(np.asarray(p["a"]), params["a"])
  leaves_b = jax.tree.leaves(state.leaves["b"])
  assert all(np.all(np.asarray(x) == 0) for x in leaves_b)             # momentum / counts untouched
