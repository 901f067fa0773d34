"""The Pallas site-batched convolution (interpret mode) equals `lax.conv_general_dilated`
applied per site, for the value and both gradients (from `jax.vjp` of the reference).

Cases: 3x3 and 1x1 kernels, 2-3 sites with different kernels, odd image sizes, 1-20
channels; one case with 16-wide blocks so that pixels, input and output channels span
several blocks (and the weight gradient loops over several pixel blocks per split).
Precision: fp32 to 1e-4 of the reference's max; bf16 inputs (bf16 output) correctly
rounded from an fp32 reference; fp32 inputs computed in bf16 match the reference on the
bf16-rounded inputs to 1e-5, which only fp32 accumulation achieves (products of bf16
values are exact in fp32). A last test checks that the data tell apart the mistakes a
kernel could make (another site's kernel, a one-pixel shift, a transposed tap).

Then the sizes the engine runs (`test_sites_and_channels`): 1-4 sites, 4-64 channels,
with the default blocks (pixel blocks of 64-256 rows by channel count), fp32 and bf16.

Each case is one jitted function (the three kernels together) and one jitted reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lcfed_jax.models.conv_pallas import pallas_conv, pallas_conv_dw, pallas_conv_dx, same_padding

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4

# (kernel, n sites, B, H, W, Ci, Co, block/split overrides)
CASES = {
    "3x3-ci1": ((3, 3), 2, 2, 5, 6, 1, 2, {}),
    "3x3-ci3-blocks16": ((3, 3), 3, 2, 8, 7, 3, 5, {"block_m": 16}),
    "1x1-ci4": ((1, 1), 2, 2, 6, 8, 4, 5, {}),
    "3x3-multiblock": ((3, 3), 2, 2, 5, 6, 20, 18, {"block_m": 16, "block_n": 16, "block_k": 16}),
}


def ref_conv(x, w):
  """One site: x [B,H,W,Ci], w [kh,kw,Ci,Co]."""
  return lax.conv_general_dilated(x, w, (1, 1), list(same_padding(w.shape[:2])),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)


def _ref_all(x, w, g):
  """(y, dx, dw) of the per-site reference, in fp32."""
  y, pull = jax.vjp(jax.vmap(ref_conv), x.astype(jnp.float32), w.astype(jnp.float32))
  return (y,) + tuple(pull(g.astype(jnp.float32)))


def _pallas_all(x, w, g, **kw):
  blocks = {k: v for k, v in kw.items() if k != "splits"}
  splits = kw.get("splits")
  return (pallas_conv(x, w, interpret=True, **blocks),
          pallas_conv_dx(w, g, interpret=True, **blocks),
          pallas_conv_dw(x, g, kernel_hw=w.shape[1:3], interpret=True, splits=splits, **blocks))


def _run(fn, *args):
  return jax.block_until_ready(
      jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args))


def _data(kernel, n, b, h, w, ci, co, seed=0):
  kx, kw_, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, b, h, w, ci), jnp.float32)
  wt = jax.random.normal(kw_, (n,) + tuple(kernel) + (ci, co), jnp.float32)
  g = jax.random.normal(kg, (n, b, h, w, co), jnp.float32)
  return x, wt, g


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


NAMES = ("y", "dx", "dw")


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
  kernel, n, b, h, w, ci, co, kw = CASES[name]
  x, wt, g = _data(kernel, n, b, h, w, ci, co)
  if name == "3x3-ci3-blocks16":
    kw = dict(kw, splits=2)  # 5 pixel blocks: 2 splits of 3 (one block of zero padding)
  got = _run(lambda *a: _pallas_all(*a, **kw), x, wt, g)
  want = _run(_ref_all, x, wt, g)
  for nm, a, r in zip(NAMES, got, want):
    assert a.dtype == jnp.float32, (nm, a.dtype)
    err = _rel_err(a, r)
    assert err < TOL, f"{name} {nm}: relative error {err:.3g}"


def test_bf16_accumulates_in_fp32():
  kernel, n, b, h, w, ci, co = (3, 3), 2, 2, 6, 8, 4, 5
  x, wt, g = _data(kernel, n, b, h, w, ci, co, seed=1)
  xb, wb, gb = (a.astype(jnp.bfloat16) for a in (x, wt, g))

  def pallas(x, wt, g, xb, wb, gb):
    return (_pallas_all(xb, wb, gb),
            (pallas_conv(x, wt, interpret=True, compute_dtype=jnp.bfloat16),
             pallas_conv_dx(wt, g, interpret=True, compute_dtype=jnp.bfloat16),
             pallas_conv_dw(x, g, kernel_hw=kernel, interpret=True,
                            compute_dtype=jnp.bfloat16)))

  got_b, got_f = _run(pallas, x, wt, g, xb, wb, gb)
  want = _run(_ref_all, xb, wb, gb)  # fp32 reference on the bf16-rounded values
  for nm, a, r in zip(NAMES, got_b, want):
    assert a.dtype == jnp.bfloat16, (nm, a.dtype)
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    # An fp32 sum rounded once is within half a bf16 ulp (2^-9 relative) of the exact
    # value and almost always equals the rounded reference; bf16 partial sums are not.
    assert np.all(np.abs(a - r) <= 2.0 ** -8 * np.abs(r) + 1e-6), nm
    same = np.mean(a == np.asarray(jnp.asarray(r).astype(jnp.bfloat16), np.float32))
    assert same > 0.98, f"{nm}: only {same:.3f} of values correctly rounded"
  for nm, a, r in zip(NAMES, got_f, want):
    assert a.dtype == jnp.float32, (nm, a.dtype)
    err = _rel_err(a, r)
    assert err < 1e-5, f"bf16 compute {nm}: relative error {err:.3g}"


def test_data_detect_kernel_mistakes():
  """Each fp32 case's data make the likely bugs fail `TOL` by a wide margin."""
  for name, (kernel, n, b, h, w, ci, co, _) in CASES.items():
    x, wt, g = _data(kernel, n, b, h, w, ci, co)
    y = jax.vmap(ref_conv)(x, wt)
    wrong = {
        "other site's kernel": jax.vmap(ref_conv)(x, jnp.roll(wt, 1, axis=0)),
        "input shifted by one pixel": jax.vmap(ref_conv)(jnp.roll(x, 1, axis=3), wt),
    }
    if kernel != (1, 1):
      wrong["taps transposed"] = jax.vmap(ref_conv)(x, jnp.swapaxes(wt, 1, 2))
    for what, y_bad in wrong.items():
      assert _rel_err(y_bad, y) > 100 * TOL, (name, what)


# (n sites, H, W, Ci, Co): every site count the tests of the engine use, and the channel
# counts of the U-Net's levels (16-64 at base 16) plus the narrowest (4, tests' base).
GRID = [(1, 6, 7, 4, 4), (2, 6, 7, 16, 32), (4, 5, 6, 32, 16), (3, 12, 13, 64, 64)]


@pytest.mark.parametrize("n,h,w,ci,co", GRID)
def test_sites_and_channels(n, h, w, ci, co):
  x, wt, g = _data((3, 3), n, 2, h, w, ci, co, seed=ci + co)
  lo = tuple(a.astype(jnp.bfloat16) for a in (x, wt, g))
  got32, got16 = _run(lambda *a: (_pallas_all(*a[:3]), _pallas_all(*a[3:])), x, wt, g, *lo)
  want32, want16 = _run(lambda *a: (_ref_all(*a[:3]), _ref_all(*a[3:])), x, wt, g, *lo)
  for nm, a, r in zip(NAMES, got32, want32):
    err = _rel_err(a, r)
    assert a.dtype == jnp.float32 and err < TOL, f"fp32 {nm}: relative error {err:.3g}"
  for nm, a, r in zip(NAMES, got16, want16):
    assert a.dtype == jnp.bfloat16, (nm, a.dtype)
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    # The fp32 sum of exact bf16 products, rounded once to bf16: half an ulp (2^-9) of
    # the value, plus the fp32 summation's own error on the largest terms.
    bound = 2.0 ** -8 * np.abs(r) + 1e-5 * np.max(np.abs(r))
    assert np.all(np.abs(a - r) <= bound), f"bf16 {nm}: max excess {np.max(np.abs(a - r) - bound):.3g}"
