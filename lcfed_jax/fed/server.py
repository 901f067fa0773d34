"""The server step: pure functions from site-stacked trees to site-stacked trees.

`aggregate` replaces every shared leaf by the weighted mean over sites (broadcast back
to every site) and leaves personal leaves alone. `fourier_aggregate` is PRR-FL's
progressive Fourier aggregation of conv kernels: in the centred amplitude spectrum of
each kernel (viewed as a matrix), a low-frequency window that grows with the round gets
the sites' mean amplitude, while every site keeps its own phase and high frequencies.
A method names its server step from `STEPS` through `step(name, **settings)`, which
binds the settings (PRR-FL's schedule) when the method's record is built.

With `axis_name` (the engine's `shard_map` over the mesh axis 'sites') the arrays are
one device's block of sites and the sums over sites are completed by a `psum`; a
zero-weight (padding) site never enters a sum, whatever its values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

from lcfed_jax.util.errors import ConfigError


def site_sum(x, weights, axis_name=None):
  """sum_k weights[k] * x[k] over the leading site axis (and over devices)."""
  w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
  out = jnp.sum(jnp.where(w > 0, x.astype(jnp.float32) * w, 0.0), axis=0)
  return jax.lax.psum(out, axis_name) if axis_name is not None else out


def weighted_mean(x, weights, axis_name=None):
  """Mean over the leading site axis with weights summing to 1 (zeros: padding sites)."""
  return site_sum(x, weights, axis_name).astype(x.dtype)


def aggregate(tree, shared_mask, weights, axis_name=None):
  def leaf(x, shared):
    if not shared:
      return x
    return jnp.broadcast_to(weighted_mean(x, weights, axis_name)[None], x.shape)
  return jax.tree.map(leaf, tree, shared_mask)


def prrfl_fraction(round_index, l0=0.7, slope=0.25, period=200.0, cap=0.95):
  """L(r) = min(l0 + slope * r / period, cap): the low-frequency window's fraction."""
  return jnp.minimum(l0 + slope * jnp.asarray(round_index, jnp.float32) / period, cap)


def kernel_matrix(w):
  """[kh,kw,Ci,Co] -> (Ci*kh, kw*Co): the layout PyTorch's (Co,Ci,kh,kw) kernel gets when
  permuted to (Ci,kh,kw,Co) and viewed as a matrix (official PFA helper)."""
  kh, kw, ci, co = w.shape
  return jnp.transpose(w, (2, 0, 1, 3)).reshape(ci * kh, kw * co)


def matrix_kernel(m, shape):
  kh, kw, ci, co = shape
  return jnp.transpose(m.reshape(ci, kh, kw, co), (1, 2, 0, 3))


def centred_window(n, fraction):
  """Bool [n]: the centred window of floor(fraction * n) bins of an fftshift-ed axis."""
  size = jnp.floor(fraction * n + 1e-6).astype(jnp.int32)
  start = (n - size) // 2
  idx = jnp.arange(n)
  return (idx >= start) & (idx < start + size)


def fourier_mix(mats, weights, fraction, divisor, axis_name=None):
  """mats [K,a,b] real. Inside the centred low-frequency window every site gets the
  sites' mean amplitude (sum of amplitudes / divisor); each keeps its own phase and its
  own amplitude outside the window."""
  spec = jnp.fft.fftshift(jnp.fft.fft2(mats.astype(jnp.float32)), axes=(-2, -1))
  amp, pha = jnp.abs(spec), jnp.angle(spec)
  mean_amp = site_sum(amp, weights, axis_name) / divisor
  win = centred_window(mats.shape[1], fraction)[:, None] & centred_window(mats.shape[2], fraction)[None, :]
  amp = jnp.where(win[None], mean_amp[None], amp)
  mixed = jnp.fft.ifft2(jnp.fft.ifftshift(amp * jnp.exp(1j * pha), axes=(-2, -1)))
  return jnp.real(mixed).astype(mats.dtype)


def fourier_aggregate(tree, shared_mask, weights, fraction, official_divisor=False, axis_name=None):
  """PRR-FL: shared conv kernels get `fourier_mix`, other shared leaves the mean.

  `weights` are the per-site weights (1 for real sites, 0 for padding); the mean
  amplitude divides by the number of real sites, or by 4 with `official_divisor`
  (the released helper's hard-coded client count).
  """
  total = lambda v: jax.lax.psum(jnp.sum(v), axis_name) if axis_name is not None else jnp.sum(v)
  real = (weights > 0).astype(jnp.float32)
  divisor = 4.0 if official_divisor else total(real)
  mean_w = weights / total(weights)

  def leaf(x, shared):
    if not shared:
      return x
    if x.ndim == 5:   # site-stacked conv kernel
      mats = jax.vmap(kernel_matrix)(x)
      mixed = fourier_mix(mats, real, fraction, divisor, axis_name)
      out = jax.vmap(lambda m: matrix_kernel(m, x.shape[1:]))(mixed)
      return jnp.where(real.reshape((-1,) + (1,) * 4) > 0, out, x)
    return jnp.broadcast_to(weighted_mean(x, mean_w, axis_name)[None], x.shape)
  return jax.tree.map(leaf, tree, shared_mask)


def _mean_step(tree, shared, weights, round_index, axis_name=None):
  return aggregate(tree, shared, weights, axis_name=axis_name)


def _fourier_step(tree, shared, weights, round_index, axis_name=None, *, l0, slope, period, cap,
                  official_divisor):
  frac = prrfl_fraction(round_index, l0, slope, period, cap)
  return fourier_aggregate(tree, shared, weights, frac, official_divisor, axis_name=axis_name)


def _no_step(tree, shared, weights, round_index, axis_name=None):
  return tree


# name -> (function, the settings it takes, whether it averages anything)
STEPS = {
    "mean": (_mean_step, (), True),
    "fourier": (_fourier_step, ("l0", "slope", "period", "cap", "official_divisor"), True),
    "none": (_no_step, (), False),
}


@dataclasses.dataclass(frozen=True)
class Step:
  """`step(tree, shared_mask, weights, round_index, axis_name) -> tree`: a registry
  function with its settings bound, compared and hashed by value (as `losses.Term`)."""
  name: str
  fn: Callable
  averages: bool
  settings: Tuple[Tuple[str, Any], ...] = ()

  def __call__(self, tree, shared_mask, weights, round_index, axis_name=None):
    return self.fn(tree, shared_mask, weights, round_index, axis_name=axis_name, **dict(self.settings))


def step(name: str, **settings) -> Step:
  if name not in STEPS:
    raise ConfigError(f"server step {name!r}: expected one of {sorted(STEPS)}")
  fn, keys, averages = STEPS[name]
  if set(settings) != set(keys):
    raise ConfigError(f"server step {name!r} takes the settings {list(keys)}, got {sorted(settings)}")
  return Step(name, fn, averages, tuple(sorted(settings.items())))
