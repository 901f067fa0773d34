"""Every parameter leaf starts as the official PyTorch code initialises that layer.

The rules, with where the official code sets them:

- `networks/unet2d.py`, `Unet2D.__init__`: after building every block it loops over
  `self.modules()` and, for each `nn.Conv2d`, calls
  `nn.init.kaiming_normal_(weight, mode='fan_out', nonlinearity='relu')`: an untruncated
  normal with std sqrt(2 / fan_out), fan_out = Co * kh * kw. That covers every conv of
  `convd1..5`, `convu4..1` and the head `seg1`. Their biases are left to
  `nn.Conv2d.reset_parameters`: U(+-1/sqrt(fan_in)), fan_in = Ci * kh * kw.
- The same loop sets `nn.BatchNorm2d` / `nn.GroupNorm` weight to 1 and bias to 0;
  BatchNorm's running mean starts at 0 and its running variance at 1 (PyTorch defaults).
- `networks/multi_lcnet.py`: PCS's `fc1`/`fc2` 1x1 convs (no bias) and HC's calibration
  conv (`HeadCalibration.head`) are built outside the U-Net's loop, so they keep
  `reset_parameters`: weight kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias
  U(+-1/sqrt(fan_in)).

A uniform rule is checked by its bound (no sample may exceed it, and the samples must
reach 95% of it) and its std (bound / sqrt(3), within 15%); a normal rule by its std
(within 15%) and its tail (some sample beyond 2 std, which no uniform of that std can
reach). Samples of each leaf are pooled over 128 independent initialisations, so every
leaf has at least 128 of them: Kaiming-normal where the rule is U(+-1/sqrt(fan_in)) (the
old HC bug: 20x the std) or a uniform where a normal is due fails by a wide margin.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lcfed_jax.fed import partition, setup
from lcfed_jax.fed.methods import get_method

INITS = 128
SIZE = 16


def _rule(path: str, shape):
  """(kind, scale): ('normal', std) | ('uniform', bound) | ('const', value) for a leaf."""
  leaf = path.rsplit("/", 1)[-1]
  if path.startswith("batch_stats/"):
    return ("const", 0.0) if leaf == "mean" else ("const", 1.0)
  if "/norm" in path:                       # BN / GN affine: weight 1, bias 0
    return ("const", 1.0) if leaf == "scale" else ("const", 0.0)
  if "/pcs_" in path:                       # PCS fc1/fc2: [fan_in, fan_out] matrices, no bias
    return ("uniform", 1.0 / math.sqrt(shape[0]))
  kh, kw, ci, co = shape if leaf == "kernel" else (None,) * 4
  if path.startswith("params/hc/"):         # HC's conv: PyTorch's reset_parameters
    if leaf == "kernel":
      return ("uniform", 1.0 / math.sqrt(ci * kh * kw))
  if leaf == "kernel":                      # U-Net convs and the head: the Kaiming loop
    return ("normal", math.sqrt(2.0 / (co * kh * kw)))
  assert leaf == "bias", path
  return None                               # conv bias: needs the kernel's fan_in (below)


def _bias_rules(paths_shapes):
  """Conv biases: U(+-1/sqrt(fan_in)) with their own kernel's fan_in."""
  out = {}
  for path, shape in paths_shapes.items():
    if path.endswith("/kernel") and len(shape) == 4:
      kh, kw, ci, _ = shape
      out[path[:-len("kernel")] + "bias"] = ("uniform", 1.0 / math.sqrt(ci * kh * kw))
  return out


_CACHE = {}


def _samples(method: str, **overrides):
  """{path: all values of that leaf over INITS independent initialisations}, shapes."""
  key = (method, tuple(sorted(overrides.items())))
  if key not in _CACHE:
    _CACHE[key] = _draw(method, **overrides)
  return _CACHE[key]


def _draw(method: str, **overrides):
  c = tiny_config(method, image_size=SIZE, **{"model.depth": 5, **overrides})   # every layer of the paper's net
  model = setup.build_model(c, get_method(c), 4, 3, 1)
  init = jax.jit(lambda k: model.init(k, jnp.zeros((1, SIZE, SIZE, 3)), 0, train=False))
  draws = [init(k) for k in jax.random.split(jax.random.PRNGKey(0), INITS)]
  flat = [{partition.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(d)[0]}
          for d in draws]
  shapes = {p: v.shape for p, v in flat[0].items()}
  return {p: np.stack([f[p] for f in flat]).ravel() for p in flat[0]}, shapes


def _check(path, values, rule):
  kind, scale = rule
  if kind == "const":
    assert np.all(values == scale), f"{path}: expected constant {scale}"
    return
  std = float(np.std(values))
  peak = float(np.max(np.abs(values)))
  if kind == "uniform":
    assert peak <= scale * (1 + 1e-6), f"{path}: |x| up to {peak:.4g} > bound {scale:.4g}"
    assert peak >= 0.95 * scale, f"{path}: |x| only up to {peak:.4g}, bound {scale:.4g}"
    expect = scale / math.sqrt(3.0)
  else:
    assert peak > 2.0 * scale, f"{path}: no sample beyond 2 std ({peak:.4g}): not a normal"
    expect = scale
  assert abs(std / expect - 1) < 0.15, f"{path}: std {std:.4g}, rule {kind} expects {expect:.4g}"


@pytest.mark.parametrize("method,overrides", [
    ("lcfed", {}),                     # U-Net + PCS + HC, instance norm
    ("fedbn", {}),                     # BatchNorm: affine and running statistics
    ("local", {"model.norm": "gn"}),   # GroupNorm affine
])
def test_every_leaf_follows_the_official_init_rule(method, overrides):
  values, shapes = _samples(method, **overrides)
  biases = _bias_rules(shapes)
  seen = set()
  for path, v in values.items():
    rule = biases.get(path) or _rule(path, shapes[path])
    assert rule is not None, f"{path}: no rule"
    _check(path, v, rule)
    seen.add(path.split("/")[1])
  expected = {"down1", "up1", "head"} | ({"pcs_5", "hc"} if method == "lcfed" else set())
  assert expected <= seen, seen
  if method == "fedbn":
    assert any(p.startswith("batch_stats/") for p in values)


def test_hc_conv_starts_far_from_saturation():
  """The old bug: Kaiming-normal (fan_out) HC weights, std ~20x the official one."""
  values, shapes = _samples("lcfed")
  ci = shapes["params/hc/conv/kernel"][2]
  std = float(np.std(values["params/hc/conv/kernel"]))
  official = 1.0 / math.sqrt(ci * 9) / math.sqrt(3.0)
  kaiming = math.sqrt(2.0 / 9)     # fan_out = 1 class x 3 x 3
  assert abs(std / official - 1) < 0.1 and kaiming / std > 5
