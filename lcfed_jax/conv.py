"""The per-site convolution: one function whose batching rule is chosen by config.

Every site has its own kernels, and the training step is `jax.vmap`-ed over the site
axis. Left to itself, `vmap` lowers a convolution whose kernel is batched to one grouped
convolution (`feature_group_count = sites`) and its weight gradient to a
`batch_group_count` convolution; XLA runs both slowly (performance notes: 3x slower
than a per-site loop on CPU, did not compile in 70 s on an H200). So the model calls
`site_conv`, and the batching rule it gets under `vmap` is picked here:

- ``unroll``: a static loop over the sites inside the one jitted step, each site a
  plain convolution (and a plain VJP in the backward pass).
- ``im2col``: patches once for all sites, then an `einsum` with the site as a batch
  axis: batched GEMMs (tensor cores), at the price of 9x memory traffic for 3x3.
- ``shifts``: one site-batched GEMM per kernel tap on a shifted view of the padded
  input, summed: no patch tensor and no convolution op. XLA:CPU runs convolutions
  inside a `while` loop (the `lax.scan` over local steps) about 8x slower than outside
  one; GEMMs keep their speed there.
- ``grouped``: plain `vmap` (what XLA does by default), kept for comparison.

A vmapped input whose kernel is not batched (for example images vmapped inside one
site) folds into the batch dimension, so nested `vmap`s stay plain convolutions.

Reverse-mode AD of `custom_vmap` is not supported by JAX, so the function is a
`custom_vjp` whose forward and backward are each a `custom_vmap`.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

IMPLEMENTATIONS = ("unroll", "im2col", "shifts", "grouped")
_DN = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, w, padding):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def _fold(x):
  """[n, B, ...] -> [n*B, ...]."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _bcast(n, args, batched):
  return [a if b else jnp.broadcast_to(a, (n,) + a.shape) for a, b in zip(args, batched)]


def _im2col_conv(x, w, padding):
  """x [n,B,H,W,Ci], w [n,kh,kw,Ci,Co] -> [n,B,H,W,Co] as site-batched GEMMs."""
  n, b = x.shape[:2]
  kh, kw, ci, co = w.shape[1:]
  if kh == 1 and kw == 1:
    return jnp.einsum("nbhwc,nco->nbhwo", x, w[:, 0, 0])
  # Patch features come out ordered (Ci, kh, kw): reorder the kernel to match.
  patches = lax.conv_general_dilated_patches(
      _fold(x), (kh, kw), (1, 1), padding, dimension_numbers=_DN)
  patches = patches.reshape((n, b) + patches.shape[1:])
  wmat = jnp.transpose(w, (0, 3, 1, 2, 4)).reshape(n, ci * kh * kw, co)
  return jnp.einsum("nbhwp,npo->nbhwo", patches, wmat)


def _shifts_conv(x, w, padding):
  """x [n,B,H,W,Ci], w [n,kh,kw,Ci,Co] -> [n,B,H,W,Co]: sum over taps of shifted GEMMs."""
  kh, kw = w.shape[1:3]
  h, wd = x.shape[2:4]
  xp = jnp.pad(x, ((0, 0), (0, 0)) + tuple(padding) + ((0, 0),))
  out = None
  for i in range(kh):
    for j in range(kw):
      term = jnp.einsum("nbhwc,nco->nbhwo", xp[:, :, i:i + h, j:j + wd], w[:, i, j])
      out = term if out is None else out + term
  return out


_BATCHED = {"im2col": _im2col_conv, "shifts": _shifts_conv}


@functools.lru_cache(maxsize=None)
def _make(impl: str, padding: Tuple[Tuple[int, int], ...]):
  """Builds the custom_vjp/custom_vmap pair for one implementation and padding."""
  pad = [tuple(p) for p in padding]

  @custom_vmap
  def fwd(x, w):
    return _plain_conv(x, w, pad)

  @fwd.def_vmap
  def fwd_rule(n, batched, x, w):
    xb, wb = batched
    if not wb:  # shared kernel: fold the mapped axis into the batch
      y = fwd(_fold(x), w)
      return y.reshape((n, x.shape[1]) + y.shape[1:]), True
    x, w = _bcast(n, (x, w), batched)
    if impl in _BATCHED:
      return _BATCHED[impl](x, w, pad), True
    if impl == "grouped":
      return jax.vmap(functools.partial(_plain_conv, padding=pad))(x, w), True
    return jnp.stack([fwd(x[i], w[i]) for i in range(n)]), True

  def _vjp(x, w, g):
    _, pullback = jax.vjp(functools.partial(_plain_conv, padding=pad), x, w)
    return pullback(g)

  @custom_vmap
  def bwd(x, w, g):
    return _vjp(x, w, g)

  @bwd.def_vmap
  def bwd_rule(n, batched, x, w, g):
    xb, wb, gb = batched
    x, w, g = _bcast(n, (x, w, g), batched)
    # A shared kernel here is rare (per-example gradients): one VJP per element.
    impl_ = impl if wb else "unroll"
    if impl_ in _BATCHED:
      _, pullback = jax.vjp(functools.partial(_BATCHED[impl_], padding=pad), x, w)
      return pullback(g), (True, True)
    if impl_ == "grouped":
      return jax.vmap(_vjp)(x, w, g), (True, True)
    outs = [bwd(x[i], w[i], g[i]) for i in range(n)]
    return (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])), (True, True)

  @jax.custom_vjp
  def conv(x, w):
    return fwd(x, w)

  conv.defvjp(lambda x, w: (fwd(x, w), (x, w)), lambda res, g: bwd(*res, g))
  return conv


def same_padding(kernel_size: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
  return tuple((k // 2, (k - 1) // 2) for k in kernel_size)


def site_conv(x: jax.Array, w: jax.Array, impl: str = "unroll") -> jax.Array:
  """Stride-1 'same' convolution, NHWC x HWIO, batched over sites by `impl` under vmap."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"conv implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
  return _make(impl, same_padding(w.shape[:2]))(x, w)


def default_impl(backend: str | None = None) -> str:
  """The implementation measured fastest on each backend (bench/README.md).

  CPU, 2 cores, 48 px, base 8, 4 sites x batch 6, 10 local steps, the scan fully
  unrolled (engine._scan_unroll): unroll 0.87 s/round, shifts 1.82, im2col 17.8. With the
  scan rolled every implementation is 4-9x slower (unroll 7.9, im2col 4.7, shifts 3.3).
  One H200, the paper's setting (384 px, base 16, 4 x 6, 50 steps, bf16, LC-Fed stage A):
  unroll 1,155 img/s, shifts 571, im2col 106 (README, Performance). TPU: not measured;
  'unroll' (a plain convolution per site) is the safe pattern there too.
  """
  del backend
  return "unroll"
