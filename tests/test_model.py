import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcfed_jax.fed import partition
from lcfed_jax.models.hc import gaussian_kernel, peak_map, disagreement, blur
from lcfed_jax.models.unet import SegModel


def _params(model, size=32, c=3):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, c)), 0))


def test_parameter_count_matches_official_unet():
  v = _params(SegModel(num_classes=1))
  assert sum(x.size for x in jax.tree.leaves(v["params"])) == 3_179_857


def test_in_channels_and_classes_change_only_first_conv_and_head():
  base = sum(x.size for x in jax.tree.leaves(_params(SegModel(num_classes=1))["params"]))
  v = _params(SegModel(num_classes=2), c=1)
  n = sum(x.size for x in jax.tree.leaves(v["params"]))
  assert n == base - 2 * 9 * 16 + 33   # first conv: 2 fewer input channels; head: +1 class
  assert v["params"]["head"]["kernel"].shape == (1, 1, 32, 2)


@pytest.mark.parametrize("norm,collections", [("in", {"params"}), ("bn", {"params", "batch_stats"}),
                                              ("gn", {"params"})])
def test_norm_options(norm, collections):
  model = SegModel(num_classes=1, base=4, norm=norm)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  v = jax.jit(lambda k: model.init(k, x, 0))(jax.random.PRNGKey(0))
  assert set(v.keys()) == collections
  paths = partition.leaf_paths(v)
  if norm == "in":
    assert not any("norm" in p for p in paths)          # no affine, no statistics
  else:
    assert any("/norm1/scale" in p for p in paths)
  out = jax.jit(lambda v: model.apply(v, x, 0, train=False))(v)
  assert out["probs"].shape == (2, 32, 32, 1)
  assert out["features"].shape == (2, 32, 32, 8)
  assert np.all((np.asarray(out["probs"]) > 0) & (np.asarray(out["probs"]) < 1))


def test_instance_norm_normalises_each_image_and_channel():
  from lcfed_jax.models.layers import InstanceNorm
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)) * 5 + 3
  y = np.asarray(InstanceNorm().apply({}, x))
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2)), 1, atol=1e-3)


def test_pcs_and_hc_are_named_submodules_with_official_sizes():
  model = SegModel(num_classes=1, num_sites=4, pcs=True, hc=True)
  heads = {"kernel": jnp.zeros((4, 1, 1, 32, 1)), "bias": jnp.zeros((4, 1))}
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), 0, heads=heads))
  p = v["params"]
  assert sum(x.size for x in jax.tree.leaves(p["hc"])) == 577            # one 3x3 conv, 64 -> 1
  pcs = sum(x.size for x in jax.tree.leaves(p["pcs_5"]))
  assert pcs == 4 * 256 + 256 * 256 + 512 * 16 + 16 * 256                # g: K->C->C, h: 2C->C/16->C


def test_gaussian_kernel_peak_one_and_sum():
  g = gaussian_kernel(31, 6.0)
  assert g.shape == (31, 31) and g.max() == pytest.approx(1.0)
  assert g.sum() == pytest.approx(221.8, abs=0.05)
  # The separable blur equals a direct 31x31 convolution with that kernel.
  m = np.zeros((1, 40, 40, 1), np.float32)
  m[0, 20, 13, 0] = 1
  m[0, 5, 30, 0] = 1
  out = np.asarray(blur(jnp.asarray(m)))[0, :, :, 0]
  direct = np.zeros((40, 40))
  for (y, x) in [(20, 13), (5, 30)]:
    for dy in range(-15, 16):
      for dx in range(-15, 16):
        if 0 <= y + dy < 40 and 0 <= x + dx < 40:
          direct[y + dy, x + dx] += g[dy + 15, dx + 15]
  np.testing.assert_allclose(out, direct, atol=1e-5)


def test_disagreement_zero_without_nan_when_heads_agree():
  preds = jnp.full((4, 2, 16, 16, 1), 0.7)
  u = disagreement(preds, 1)
  assert not np.any(np.isnan(np.asarray(u))) and np.all(np.asarray(u) == 0)
  assert np.all(np.asarray(peak_map(u)) == 0)
  # The released form divides 0 by 0.
  assert np.all(np.isnan(np.asarray(disagreement(preds, 1, official_no_eps=True))))


def test_disagreement_is_rms_from_own_head_and_max_normalised():
  rng = np.random.default_rng(0)
  preds = rng.uniform(size=(3, 1, 8, 8, 1)).astype(np.float32)
  u = np.asarray(disagreement(jnp.asarray(preds), 2))
  ref = np.sqrt(((preds - preds[2:3]) ** 2).sum(0) / 2)
  ref = ref / (ref.max(axis=(1, 2), keepdims=True) + 1e-8)
  np.testing.assert_allclose(u, ref, rtol=1e-5)


def test_peak_picking_keeps_exactly_local_maxima_above_threshold():
  u = np.zeros((1, 80, 80, 1), np.float32)
  u[0, 10, 10, 0] = 0.9      # kept
  u[0, 20, 20, 0] = 0.5      # within 15 px of a larger peak: suppressed
  u[0, 60, 60, 0] = 0.15     # a local max but below 0.2: dropped
  u[0, 60, 20, 0] = 0.3      # kept
  u[0, 61, 21, 0] = 0.25     # neighbour of a larger value: dropped
  p = np.asarray(peak_map(jnp.asarray(u)))[0, :, :, 0]
  assert set(map(tuple, np.argwhere(p))) == {(10, 10), (60, 20)}


def test_bfloat16_compute_keeps_float32_params_and_finite_gradients():
  model = SegModel(num_classes=1, base=4, dtype=jnp.bfloat16, pcs=True, num_sites=2)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  v = jax.jit(lambda k: model.init(k, x, 0))(jax.random.PRNGKey(0))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["params"]))
  out = jax.jit(lambda v: model.apply(v, x, 1))(v)
  assert out["features"].dtype == jnp.bfloat16 and out["probs"].dtype == jnp.float32
  g = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, 1)["probs"])))(v["params"])
  assert all(a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
  ref = jax.jit(lambda v: SegModel(num_classes=1, base=4, pcs=True, num_sites=2).apply(v, x, 1)["probs"])(v)
  # bf16 rounding through ~20 instance-normalised layers of a random net: close on
  # average, not elementwise.
  a, b = np.asarray(out["probs"]).ravel(), np.asarray(ref).ravel()
  assert np.mean(np.abs(a - b)) < 0.1 and np.corrcoef(a, b)[0, 1] > 0.5


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_a_shallower_unet_is_the_papers_outer_levels(depth):
  """`depth` keeps down1..depth and up1..depth-1 with the 5-level net's shapes, except the
  innermost decoder block, which (as up4 there) starts without its 3x3 conv."""
  full = jax.tree.map(lambda a: a.shape, _params(SegModel(num_classes=1, base=4))["params"])
  small = jax.tree.map(lambda a: a.shape, _params(SegModel(num_classes=1, base=4, depth=depth))["params"])
  assert set(small) == {f"down{i}" for i in range(1, depth + 1)} | {f"up{i}" for i in range(1, depth)} | {"head"}
  for name in small:
    if name == f"up{depth - 1}":
      assert "conv1" not in small[name] and small[name]["conv3"] == full[name]["conv3"]
    else:
      assert small[name] == full[name], name


def test_depth_and_image_size_are_checked_together():
  from conftest import tiny_config
  from lcfed_jax.config.validate import validate
  from lcfed_jax.util.errors import ConfigError
  validate(tiny_config("lcfed", image_size=24, **{"model.depth": 4, "lcfed.pcs_n": 4}))   # 24 = 3 * 2^3
  with pytest.raises(ConfigError, match=r"config.image_size=20: expected a multiple of 8 .*model.depth=4"):
    validate(tiny_config("lcfed", image_size=20, **{"model.depth": 4}))
  with pytest.raises(ConfigError, match=r"config.model.depth=8"):
    validate(tiny_config("lcfed", **{"model.depth": 8}))
  with pytest.raises(ConfigError, match=r"config.lcfed.pcs_n=4: expected 1..model.depth=3"):
    validate(tiny_config("lcfed", **{"lcfed.pcs_n": 4}))
