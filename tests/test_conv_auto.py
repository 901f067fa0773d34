"""`conv_impl='auto'` picks by backend and by the number of models in one program.

The rule (lcfed_jax.models.conv.AUTO) against its documented choices, then the path a run
takes: `setup.build` counts sites x seeds (per device) and resolves 'auto' with the
backend it runs on (a GPU backend is simulated: nothing is compiled).
"""
from __future__ import annotations

import jax
import pytest

from lcfed_jax.fed import setup
from lcfed_jax.models import conv


@pytest.mark.parametrize("backend,models,want", [
    ("cpu", 1, "map"), ("cpu", 4, "map"), ("cpu", 32, "map"),
    ("gpu", 1, "unroll"), ("gpu", 4, "unroll"), ("gpu", 5, "grouped"), ("gpu", 32, "grouped"),
    ("tpu", 4, "unroll"), ("tpu", 32, "grouped"), ("rocm-like", 32, "grouped"),
])
def test_default_impl(backend, models, want):
  assert conv.default_impl(backend, models) == want


def test_rules_are_complete():
  for backend, rules in conv.AUTO.items():
    bounds = [most for most, _ in rules]
    assert bounds[-1] is None, f"{backend}: the last rule must take any count"
    assert bounds[:-1] == sorted(bounds[:-1]), backend
    assert all(impl in conv.IMPLEMENTATIONS for _, impl in rules), backend


@pytest.fixture
def gpu_backend(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("sites,seeds,want", [(4, (), "unroll"), (32, (), "grouped"),
                                              (4, tuple(range(8)), "grouped"), (2, (0, 1), "unroll")])
def test_build_counts_sites_times_seeds(tiny, gpu_backend, sites, seeds, want):
  c = tiny("fedavg", seeds=seeds)
  exp = setup.build(c, sites, 3, 1, (32, 32, 3))
  assert exp.model.impl == want


def test_explicit_impl_wins(tiny, gpu_backend):
  c = tiny("fedavg", **{"model.conv_impl": "map"})
  assert setup.build(c, 32, 3, 1, (32, 32, 3)).model.impl == "map"
  assert setup.conv_impl(c, 1) == "map"


def test_cpu_run_picks_map(tiny):
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU rule, on a CPU")
  assert setup.build(tiny("fedavg"), 4, 3, 1, (32, 32, 3)).model.impl == "map"
