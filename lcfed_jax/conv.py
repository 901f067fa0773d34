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

IMPLEMENTATIONS = ("unroll", "im2col", "grouped")
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
    if impl == "im2col":
      return _im2col_conv(x, w, pad), True
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
    if impl_ == "im2col":
      _, pullback = jax.vjp(functools.partial(_im2col_conv, padding=pad), x, w)
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
  """The implementation measured fastest on each backend (bench/throughput.py).

  CPU (2 cores, 48 px, base 8, 4 sites x 6): im2col 3.8 s/round, unroll 8.0, grouped
  12.2. GPU/TPU have not been measured in this project yet: 'unroll' is the pattern the
  performance notes measured fastest there (a plain convolution per site).
  """
  backend = backend or jax.default_backend()
  return {"cpu": "im2col"}.get(backend, "unroll")
