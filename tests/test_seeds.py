"""Seeds as a replica axis: S federations in one program equal S separate runs; the
sweep's table, its mean ± std and its resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lcfed_jax.data.device import stack_splits
from lcfed_jax.data.synthetic import generate
from lcfed_jax.fed import server, setup
from lcfed_jax.run import sweep, tables

EXACT = {"optimizer.eps": 1e-3, "model.conv_impl": "unroll", "local_steps": 2}


def _close(a, b, tol, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  assert a.shape == b.shape and err <= tol * max(1.0, float(np.max(np.abs(b)))), (what, err)


def test_grouped_aggregation_equals_separate_aggregations():
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.normal(size=(4, 3, 2, 5))), "b": jnp.asarray(rng.normal(size=(4, 3, 6)))}
  mask, w = {"a": True, "b": False}, jnp.asarray([0.1, 0.2, 0.3, 0.4])
  grouped = jax.vmap(lambda t: server.aggregate(t, mask, w), in_axes=1, out_axes=1)(tree)
  for s in range(3):
    alone = server.aggregate(jax.tree.map(lambda a: a[:, s], tree), mask, w)
    for key in tree:
      np.testing.assert_allclose(grouped[key][:, s], alone[key], rtol=1e-6)
  kernels = {"k": jnp.asarray(rng.normal(size=(4, 2, 3, 3, 2, 4)))}   # PRR-FL mixes amplitudes
  mixed = jax.vmap(lambda t: server.fourier_aggregate(t, {"k": True}, w, 0.8), in_axes=1, out_axes=1)(kernels)
  for s in range(2):
    alone = server.fourier_aggregate({"k": kernels["k"][:, s]}, {"k": True}, w, 0.8)
    np.testing.assert_allclose(mixed["k"][:, s], alone["k"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lcfed_together_and_apart():
  """LC-Fed (PCS, contrastive loss, HC gathering every site's head) with seeds (0, 1) in
  one program, and each seed alone: one round of stage A, one of stage B, predictions."""
  base = tiny_config("lcfed", **EXACT)
  data = generate(4, 32, tuple(base.data.train_sizes), 4, 0)
  arrays, test = stack_splits(data.train), stack_splits(data.test, pad_multiple=2)
  w = jnp.full((4,), 0.25)
  out = {}
  for name, seed, seeds in (("together", 0, (0, 1)), ("seed0", 0, ()), ("seed1", 1, ())):
    c = tiny_config("lcfed", seed=seed, seeds=seeds, **EXACT)
    exp = setup.build(c, 4, 3, 1, (32, 32, 3))
    state = exp.init_state()
    init = jax.tree.map(np.asarray, state)
    losses = []
    for stage in exp.stages:
      state, loss, finite = exp.round_fn(stage)(state, arrays, w)
      assert np.asarray(finite).all()
      losses.append(np.asarray(loss))
    pred = exp.predict_fn("hc", 2)(state.params, state.model_state, test.images)
    out[name] = (init, jax.tree.map(np.asarray, state), losses, np.asarray(pred["prob"]))
  return out


def test_seeds_in_one_program_equal_separate_runs(lcfed_together_and_apart):
  together = lcfed_together_and_apart["together"]
  for s, name in enumerate(("seed0", "seed1")):
    alone = lcfed_together_and_apart[name]
    # Initialisation and data keys: exactly those of the run with that seed.
    for a, b in zip(jax.tree.leaves(together[0]), jax.tree.leaves(alone[0])):
      np.testing.assert_array_equal(a if a.ndim == 0 else a[:, s], b)
    for i in range(2):   # stage A, stage B losses
      _close(together[2][i][:, s], alone[2][i], 1e-5, f"{name} losses stage {i}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(together[1].params), jax.tree.leaves(alone[1].params)):
      _close(a[:, s], b, 2e-4, f"{name} {jax.tree_util.keystr(path)}")
    # HC thresholds the heads' disagreement into peaks: rounding moves a few pixels only.
    _close(together[3][:, s], alone[3], 1e-2, f"{name} HC predictions")
    assert np.mean(np.abs(together[3][:, s] - alone[3])) < 1e-4
  # The seeds differ: their groups did not leak into each other.
  assert not np.allclose(together[1].params["head"]["kernel"][:, 0], together[1].params["head"]["kernel"][:, 1])


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  wd = tmp_path_factory.mktemp("sweep")
  config = tiny_config("fedavg", rounds=1, **{"sweep.seeds": "sequential"})
  sweep.run_sweep(config, str(wd), "fedavg,local", "0,1", log=lambda *a: None)
  return wd, config


def test_sweep_table_parses_back_to_numpys_mean_and_std(tiny_sweep):
  wd, _ = tiny_sweep
  table = tables.read_csv(wd / "results.csv")
  for method in ("fedavg", "local"):
    for site in ("clinic_a", "clinic_d", "avg"):
      for m in ("iou", "assd"):
        per_seed = [table[(method, str(s), site)][m] for s in (0, 1)]
        assert table[(method, "mean", site)][m] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert table[(method, "std", site)][m] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
  md = (wd / "results.md").read_text()
  iou = table[("fedavg", "mean", "avg")]["iou"] * 100
  assert "| fedavg |" in md and f"{iou:.2f} ± " in md
  assert (wd / "iou_curves.png").stat().st_size > 0


def test_interrupted_sweep_resumes_and_skips_finished_runs(tiny_sweep):
  wd, config = tiny_sweep
  finished = (wd / "fedavg" / "seed0" / "metrics.jsonl").read_text()
  (wd / "local" / "seed1" / "results.json").unlink()    # as if killed before its end
  lines = []
  sweep.run_sweep(config, str(wd), "fedavg,local", "0,1", log=lines.append)
  assert any("4 runs (3 finished already)" in l for l in lines)
  ran = {l.split("]")[0] for l in lines if l.startswith("[")}
  assert ran == {"[local seed 1"}                          # only the interrupted run
  assert (wd / "fedavg" / "seed0" / "metrics.jsonl").read_text() == finished
  assert (wd / "local" / "seed1" / "results.json").exists()
