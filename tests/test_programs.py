"""Jitted programs are shared between experiments of a process exactly when they are equal."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from helpers import build, flat
from lcfed_jax.fed import losses, programs, server, setup
from lcfed_jax.fed.methods import get_method


def _exp(method="fedprox", **overrides):
  return setup.build(tiny_config(method, **overrides), 4, 3, 1, (32, 32, 3))


def test_records_compare_by_their_settings():
  assert losses.term("prox", mu=0.1) == losses.term("prox", mu=0.1)
  assert hash(losses.term("prox", mu=0.1)) == hash(losses.term("prox", mu=0.1))
  assert losses.term("prox", mu=0.1) != losses.term("prox", mu=0.2)
  assert losses.term("dice") != losses.term("dice", 0.5)
  fourier = lambda l0: server.step("fourier", l0=l0, slope=0.25, period=200.0, cap=0.95, official_divisor=False)
  assert fourier(0.7) == fourier(0.7) and fourier(0.7) != fourier(0.8)
  assert get_method(tiny_config("lcfed")) == get_method(tiny_config("lcfed"))
  assert get_method(tiny_config("lcfed")) != get_method(tiny_config("lcfed", **{"lcfed.alpha": 0.5}))


@pytest.mark.parametrize("change,round_shared,predictor_shared", [
    ({"seed": 3}, True, True),                 # the round reads each site's key from the state
    ({"eval_every": 7, "checkpoint.keep": 5}, True, True),
    ({"fedprox.mu": 0.5}, False, True),        # a loss term's setting
    ({"learning_rate": 2e-3}, False, True),
    ({"local_steps": 3}, False, True),
    ({"federated.opt_state": "reset"}, False, True),
    ({"model.conv_impl": "unroll"}, False, False),
])
def test_equal_experiments_share_their_programs(change, round_shared, predictor_shared):
  a, b = _exp(), _exp(**change)
  assert (a.round_fn(a.stages[0]) is b.round_fn(b.stages[0])) == round_shared
  assert (a.predict_fn("probs", 2) is b.predict_fn("probs", 2)) == predictor_shared


def test_a_shared_program_computes_what_a_fresh_one_does():
  """Seed 1's round through the program first built for seed 0 equals seed 1's round
  through a program built for it alone, although seed 0's config was edited between the
  build and the first call (the trace): the program holds its own copy."""
  programs.clear()
  first = build(tiny_config("fedprox", seed=0))
  second = build(tiny_config("fedprox", seed=1))
  assert second.exp.round_fn(second.method.stages[0]) is first.exp.round_fn(first.method.stages[0])
  first.config.federated.opt_state = "reset"      # read when the round is traced
  shared, _ = second.round_fn()(second.fresh_state(), second.arrays, second.weights)
  programs.clear()
  alone = build(tiny_config("fedprox", seed=1))
  assert alone.exp.round_fn(alone.method.stages[0]) is not first.exp.round_fn(first.method.stages[0])
  fresh, _ = alone.round_fn()(alone.fresh_state(), alone.arrays, alone.weights)
  a, b = flat(jax.device_get(shared)), flat(jax.device_get(fresh))
  assert a.keys() == b.keys() and len(a) > 20
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_least_recently_used_programs_are_dropped(monkeypatch):
  monkeypatch.setattr(programs, "MAX_PROGRAMS", 2)
  programs.clear()
  made = []
  get = lambda k: programs.get(k, lambda: made.append(k) or object())
  one = get("a")
  get("b")
  assert get("a") is one                   # 'a' is now the most recently used
  get("c")                                 # drops 'b'
  get("b")
  assert made == ["a", "b", "c", "b"] and get("c") is not None and len(made) == 4
