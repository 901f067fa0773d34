"""Each method's partition, phases and server step (issues: LC-Fed, baselines)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from helpers import build, equal_across_sites, flat
from lcfed_jax.fed import server
from lcfed_jax.fed.methods import Phase
from lcfed_jax.models.unet import SegModel


# Sites drawing their own initial models (the official script): a leaf equal across
# sites after a round was then averaged, so the partition can be read off the state.
APART = {"federated.same_init": False}


def _after_round(setup, stage_index=0, state=None):
  state = state if state is not None else setup.fresh_state()
  new, _ = setup.round_fn(stage_index)(state, setup.arrays, setup.weights)
  return flat({"params": new.params, **new.model_state}), new


@pytest.fixture(scope="module")
def lcfed():
  return build(tiny_config("lcfed", **APART))


def _group(path):
  if "/head/" in path:
    return "head"
  if "/pcs_" in path:
    return "pcs"
  if "/hc/" in path:
    return "hc"
  return "body"


def test_lcfed_round_shares_body_and_keeps_pcs_heads_hc_personal(lcfed):
  leaves, _ = _after_round(lcfed)
  groups = {g: [] for g in ("head", "pcs", "hc", "body")}
  for path, x in leaves.items():
    groups[_group(path)].append(equal_across_sites(x))
  assert all(groups["body"]) and len(groups["body"]) > 20
  assert not any(groups["head"]) and not any(groups["pcs"]) and not any(groups["hc"])


def test_lcfed_pcs_shared_averages_pcs():
  s = build(tiny_config("lcfed", **{"lcfed.pcs_shared": True}, **APART))
  leaves, _ = _after_round(s)
  for path, x in leaves.items():
    assert equal_across_sites(x) == (_group(path) in ("body", "pcs")), path


def test_stage_b_changes_only_hc(lcfed):
  before = flat({"params": lcfed.state.params})
  after, _ = _after_round(lcfed, stage_index=1)
  assert [t.name for t in lcfed.method.stages[1].loss] == ["hc_dice"]
  for path, x in after.items():
    changed = not np.array_equal(x, before[path])
    assert changed == (_group(path) == "hc"), path


def test_head_only_and_body_only_phases(lcfed):
  """A phase training 'personal' leaves shared leaves untouched, and vice versa."""
  before = flat({"params": lcfed.state.params})
  a = lcfed.method.stages[0]
  for group, expect_changed in (("personal", {"head", "pcs"}), ("shared", {"body"})):
    stage = dataclasses.replace(a, phases=(Phase(group),), server=server.step("none"))
    new, _ = lcfed.round_fn(stage=stage)(lcfed.fresh_state(), lcfed.arrays, lcfed.weights)
    after = flat({"params": new.params})
    for path, x in after.items():
      changed = not np.array_equal(x, before[path])
      if "/bias" in path and _group(path) == "body":
        continue   # biases before instance norm may not move (their gradient is zero)
      assert changed == (_group(path) in expect_changed), (group, path)


def test_personal_pcs_trains_in_the_steps_pcs_train_names():
  """Default: PCS learns with the body whose features it calibrates, not in the head
  steps; 'head' keeps the switch's rule for personal leaves, 'all' trains it throughout."""
  from lcfed_jax.fed import engine, setup
  for pcs_train, want in (("body", (False, True)), ("head", (True, False)), ("all", (True, True))):
    exp = setup.build(tiny_config("lcfed", **{"lcfed.pcs_train": pcs_train}), 4, 3, 1, (32, 32, 3))
    _, table = engine._phase_table(exp.method.stages[0], exp.masks, 4)
    for path, flags in flat(table).items():
      group = _group("params/" + path)
      expect = {"pcs": want, "head": (True, False), "body": (False, True), "hc": (False, False)}[group]
      assert tuple(bool(f) for f in flags) == expect, (pcs_train, path)


def test_pcs_moves_in_the_body_steps_by_default(lcfed):
  """End to end: each phase of stage A run alone; PCS changes only in the body phase."""
  s = build(tiny_config("lcfed"))
  before = flat({"params": s.state.params})
  a = s.method.stages[0]
  for phase, moves in zip(a.phases, (False, True)):
    stage = dataclasses.replace(a, phases=(dataclasses.replace(phase, steps=None),), server=server.step("none"))
    new, _ = s.round_fn(stage=stage)(s.fresh_state(), s.arrays, s.weights)
    after = flat({"params": new.params})
    pcs = [p for p in after if _group(p) == "pcs"]
    assert pcs and all((not np.array_equal(after[p], before[p])) == moves for p in pcs), phase


def test_contrastive_gradient_reaches_only_pcs():
  model = SegModel(num_classes=1, base=4, num_sites=3, pcs=True)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  v = jax.jit(lambda k: model.init(k, x, 1))(jax.random.PRNGKey(1))

  def con(params):
    out = model.apply({"params": params}, x, 1)
    return model.apply({"params": params}, out["pcs_in"], 1, method=SegModel.contrastive)

  value, grads = jax.jit(jax.value_and_grad(con))(v["params"])
  assert float(value) < 0     # minus a mean squared distance
  for path, g in flat(grads).items():
    nonzero = bool(np.any(np.asarray(g) != 0))
    assert nonzero == ("pcs_" in path), path


def test_contrastive_uses_every_other_sites_code():
  model = SegModel(num_classes=1, base=4, num_sites=3, pcs=True)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  v = jax.jit(lambda k: model.init(k, x, 0))(jax.random.PRNGKey(1))
  out = jax.jit(lambda v: model.apply(v, x, 0))(v)
  f = out["pcs_in"][0]
  pcs = lambda codes: model.apply(v, f, codes, method=lambda m, f, c: m.pcs_mods[4].channel_maps(f, c))
  maps = np.asarray(pcs(jnp.eye(3)))
  expect = -np.mean([np.mean((maps[0] - maps[j]) ** 2) for j in (1, 2)])
  got = float(model.apply(v, out["pcs_in"], 0, method=SegModel.contrastive))
  assert got == pytest.approx(expect, rel=1e-5)


# ---------------------------------------------------------------- baselines
@pytest.mark.parametrize("method,personal_groups", [
    ("fedavg", set()), ("local", {"head", "body"}), ("fedrep", {"head"})])
def test_partitions_after_one_round(method, personal_groups):
  s = build(tiny_config(method, **APART))
  leaves, _ = _after_round(s)
  for path, x in leaves.items():
    assert equal_across_sites(x) == (_group(path) not in personal_groups), path


def test_fedbn_keeps_bn_personal_with_per_site_statistics():
  s = build(tiny_config("fedbn"))
  assert "batch_stats" in s.state.model_state
  leaves, new = _after_round(s)
  for path, x in leaves.items():
    is_bn = "batch_stats/" in path or "/norm" in path
    assert equal_across_sites(x) == (not is_bn), path
  # Running statistics moved during the round, differently at every site.
  mean = leaves["batch_stats/down1/norm1/mean"]
  assert not np.allclose(mean, 0) and not equal_across_sites(mean)
  # Evaluation uses each site's own statistics: swapping them changes the predictions.
  from lcfed_jax.fed import engine
  predict = engine.make_predict_fn(s.model, "probs", 2, 4)
  imgs = s.arrays.images[:, :2]
  own = np.asarray(predict(new.params, new.model_state, imgs)["prob"])
  swapped = jax.tree.map(lambda a: a[::-1], new.model_state)
  other = np.asarray(predict(new.params, swapped, imgs)["prob"])
  assert not np.allclose(own, other)


def _numpy_fourier(mats, fraction, divisor):
  """NumPy reference of PRR-FL's amplitude mixing."""
  spec = np.fft.fftshift(np.fft.fft2(mats), axes=(-2, -1))
  amp, pha = np.abs(spec), np.angle(spec)
  mean_amp = amp.sum(0) / divisor
  out = []
  for k in range(mats.shape[0]):
    a = amp[k].copy()
    rows, cols = mats.shape[1:]
    hr, hc = int(np.floor(fraction * rows + 1e-6)), int(np.floor(fraction * cols + 1e-6))
    r0, c0 = (rows - hr) // 2, (cols - hc) // 2
    a[r0:r0 + hr, c0:c0 + hc] = mean_amp[r0:r0 + hr, c0:c0 + hc]
    out.append(np.real(np.fft.ifft2(np.fft.ifftshift(a * np.exp(1j * pha[k])))))
  return np.stack(out)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.7, 1.0])
def test_prrfl_fourier_mix_matches_numpy_reference(fraction):
  rng = np.random.default_rng(0)
  mats = rng.normal(size=(3, 12, 10)).astype(np.float32)
  got = np.asarray(server.fourier_mix(jnp.asarray(mats), jnp.ones(3), fraction, 3.0))
  np.testing.assert_allclose(got, _numpy_fourier(mats.astype(np.float64), fraction, 3.0), atol=1e-4)
  if fraction == 0.0:
    np.testing.assert_allclose(got, mats, atol=1e-5)        # nothing changes
  if fraction == 1.0:                                         # every site: the mean amplitude
    amps = np.abs(np.fft.fft2(got))
    np.testing.assert_allclose(amps, np.broadcast_to(np.abs(np.fft.fft2(mats)).mean(0), amps.shape),
                               rtol=1e-3, atol=1e-3)


def test_prrfl_kernel_layout_roundtrip_and_divisor_flag():
  w = jnp.arange(3 * 3 * 2 * 4, dtype=jnp.float32).reshape(3, 3, 2, 4)
  np.testing.assert_array_equal(server.matrix_kernel(server.kernel_matrix(w), w.shape), w)
  assert server.kernel_matrix(w).shape == (2 * 3, 3 * 4)
  tree = {"k": jax.random.normal(jax.random.PRNGKey(0), (6, 3, 3, 2, 4))}
  fixed = server.fourier_aggregate(tree, {"k": True}, jnp.full(6, 1 / 6), 1.0)["k"]
  released = server.fourier_aggregate(tree, {"k": True}, jnp.full(6, 1 / 6), 1.0, official_divisor=True)["k"]
  # With 6 sites the released divisor 4 inflates the amplitude by 6/4.
  ratio = np.abs(np.fft.fft2(np.asarray(jax.vmap(server.kernel_matrix)(released)))).sum() / \
      np.abs(np.fft.fft2(np.asarray(jax.vmap(server.kernel_matrix)(fixed)))).sum()
  assert ratio == pytest.approx(1.5, rel=1e-3)
  assert server.prrfl_fraction(0) == pytest.approx(0.7)
  assert server.prrfl_fraction(100) == pytest.approx(0.825)
  assert server.prrfl_fraction(400) == pytest.approx(0.95)


def test_prrfl_round_mixes_kernels_and_averages_other_leaves():
  s = build(tiny_config("prrfl"))
  leaves, _ = _after_round(s)
  for path, x in leaves.items():
    if path.endswith("kernel"):
      assert not equal_across_sites(x), path     # own phase and high frequencies kept
    else:
      assert equal_across_sites(x), path


def test_ft_finetuning_touches_no_other_site():
  s = build(tiny_config("ft"))
  assert [st.name for st in s.method.stages] == ["fedavg", "finetune"]
  assert s.method.stages[1].learning_rate == pytest.approx(1e-4)
  base = s.fresh_state()
  a, _ = s.round_fn(1)(jax.tree.map(jnp.copy, base), s.arrays, s.weights)
  # Perturb site 2 only: after fine-tuning, every other site is bit-identical.
  bumped = base.replace(params=jax.tree.map(lambda x: x.at[2].add(0.01), base.params))
  b, _ = s.round_fn(1)(bumped, s.arrays, s.weights)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(np.delete(x, 2, 0), np.delete(y, 2, 0))
    assert not np.array_equal(x[2], y[2])


def test_every_method_selectable_in_every_task_config():
  import importlib
  from lcfed_jax.fed.methods import METHODS, get_method
  for task in ("synthetic", "polyp", "fundus", "prostate", "faz"):
    mod = importlib.import_module(f"configs.{task}")
    for name in METHODS:
      c = mod.get_config(name)
      assert c.method == name and get_method(c).name == name


def test_fedbn_statistics_survive_a_checkpoint(tmp_path):
  from lcfed_jax.run import checkpoints as ckpt_lib
  s = build(tiny_config("fedbn"))
  _, state = _after_round(s)
  ck = ckpt_lib.Checkpoints(tmp_path, keep=1)
  ck.save(1, state, {"params": state.params, "model_state": state.model_state}, {})
  restored = ck.restore(1, ckpt_lib.abstract_like(state), items=("state",))["state"]
  ck.close()
  stats = restored.model_state["batch_stats"]
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(state.model_state["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not equal_across_sites(np.asarray(stats["down1"]["norm1"]["mean"]))


@pytest.mark.parametrize("overrides", [{"lcfed.hc": False}, {"lcfed.pcs": False},
                                       {"lcfed.pcs": False, "lcfed.hc": False},
                                       {"lcfed.hc_joint": True}])
def test_lcfed_ablations_build_and_partition(overrides):
  from lcfed_jax.fed import setup
  c = tiny_config("lcfed", **overrides)
  exp = setup.build(c, 3, 3, 1, (32, 32, 3))
  m = exp.method
  masks = exp.masks   # every personal rule must match a parameter
  paths = [p for p, personal in flat(masks.personal).items() if personal]
  assert any("/head/" in p for p in paths)
  assert any("/hc/" in p for p in paths) == (c.lcfed.hc)
  assert any("/pcs_" in p for p in paths) == (c.lcfed.pcs)
  assert [s.name for s in m.stages] == (["A", "B"] if c.lcfed.hc and not c.lcfed.hc_joint else ["A"])
