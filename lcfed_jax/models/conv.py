"""The per-site convolution: one function whose batching rule is chosen by config.

Every site has its own kernels, and the training step is `jax.vmap`-ed over the site
axis. Left to itself, `vmap` lowers a convolution whose kernel is batched to one grouped
convolution and its weight gradient to a `batch_group_count` convolution, which XLA
runs slowly on CPU and GPU. So the model calls `site_conv`, a `custom_vjp` whose forward
and backward are each a `custom_vmap` (JAX has no reverse-mode AD of `custom_vmap`), and
the batching rule it gets under the site `vmap` is picked here:

- ``unroll``: a static loop over the sites, each a plain convolution. The program holds
  one copy of every convolution per site, so compile time grows with the site count.
- ``grouped``: sites folded into the channels of one grouped convolution
  (`feature_group_count` = sites) for the forward pass and the input gradient; the
  weight gradient is one site-batched GEMM per kernel tap. One copy for any site count.
- ``map``: `lax.map` over the sites of a plain convolution: one copy, run in sequence.
- ``im2col``: patches once for all sites, then a site-batched GEMM (9x the memory traffic
  of a 3x3 convolution).
- ``shifts``: one site-batched GEMM per kernel tap on a shifted view of the padded input.
- ``pallas``: one Pallas kernel (implicit GEMM, every image with its own site's weights,
  fp32 accumulation) for the forward pass and both gradients (`conv_pallas`); run by
  the Pallas interpreter on CPU, where it serves as a test of the kernel, not for speed.
- ``vmap``: JAX's default batching (grouped convolution, `batch_group_count` weight
  gradient), kept for comparison.

The backward pass of the plain (per-site) convolution is written as two forward
convolutions with XLA's canonical dimension numbers: the input gradient convolves the
output gradient with the flipped, in/out-swapped kernel, and the weight gradient
convolves the input (images as the contracted feature axis) with the output gradient.
XLA:CPU runs the convolutions that `jax.vjp` emits for a convolution 20-30x slower inside
a `while` body (the `lax.scan` over local steps) than outside one; these canonical forms
run at the same speed in both (bench/compile.py), so the local-step loop stays rolled.

A vmapped input whose kernel is not batched (images vmapped inside one site) folds into
the batch dimension, so nested `vmap`s stay plain convolutions.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from lcfed_jax.models import conv_pallas

IMPLEMENTATIONS = ("unroll", "grouped", "map", "im2col", "shifts", "pallas", "vmap")
# Named scopes of the forward pass, the input gradient and the weight gradient: every
# implementation's ops carry them in their HLO metadata, which is how a profile tells the
# three apart (bench/profile_round.py); a scope changes no computation.
SCOPES = ("conv_fwd", "conv_dgrad", "conv_wgrad")
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding, groups: int = 1):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN,
                                  feature_group_count=groups)


def _transpose_padding(w_shape, padding):
  """The padding of the input-gradient convolution of a stride-1 convolution."""
  return [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w_shape[:2], padding)]


def _flip_io(w):
  """[kh,kw,Ci,Co] -> the input-gradient kernel [kh,kw,Co,Ci] (spatially flipped)."""
  return jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))


def conv_dx(w, g, padding):
  """d(conv(x, w))/dx applied to the output gradient g: a plain forward convolution."""
  return _conv(g, _flip_io(w), _transpose_padding(w.shape, padding))


def conv_dw(x, g, padding, kernel_hw):
  """d(conv(x, w))/dw applied to g: a forward convolution with the images as the
  contracted feature axis: lhs [Ci, H, W, B], kernel g [H, W, B, Co] -> [Ci, kh, kw, Co]."""
  out = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), padding)
  assert out.shape[1:3] == tuple(kernel_hw), (out.shape, kernel_hw)
  return jnp.transpose(out, (1, 2, 0, 3))


def _fold(x):
  """[n, B, ...] -> [n*B, ...]."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _bcast(n, args, batched):
  return [a if b else jnp.broadcast_to(a, (n,) + a.shape) for a, b in zip(args, batched)]


def _sites_to_channels(x):
  """[n,B,H,W,C] -> [B,H,W,n*C] (site-major channels)."""
  n, b, h, w, c = x.shape
  return jnp.transpose(x, (1, 2, 3, 0, 4)).reshape(b, h, w, n * c)


def _channels_to_sites(y, n):
  b, h, w, nc = y.shape
  return jnp.transpose(y.reshape(b, h, w, n, nc // n), (3, 0, 1, 2, 4))


def _group_kernel(w):
  """[n,kh,kw,Ci,Co] -> [kh,kw,Ci,n*Co]: the HWIO kernel of a grouped convolution."""
  n, kh, kw, ci, co = w.shape
  return jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(kh, kw, ci, n * co)


def _grouped_conv(x, w, padding):
  n = x.shape[0]
  return _channels_to_sites(_conv(_sites_to_channels(x), _group_kernel(w), padding, n), n)


def _tap_dw(x, g, padding, kernel_hw):
  """Per-site weight gradient as site-batched GEMMs, one per tap: [n,kh,kw,Ci,Co]."""
  kh, kw = kernel_hw
  h, wd = g.shape[2:4]
  xp = jnp.pad(x, ((0, 0), (0, 0)) + tuple(padding) + ((0, 0),))
  taps = [[jnp.einsum("nbhwc,nbhwo->nco", xp[:, :, i:i + h, j:j + wd], g) for j in range(kw)]
          for i in range(kh)]
  return jnp.stack([jnp.stack(row, 1) for row in taps], 1)


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


def _interpret() -> bool:
  return jax.default_backend() not in ("gpu", "tpu")


@functools.lru_cache(maxsize=None)
def _make(impl: str, padding: Tuple[Tuple[int, int], ...]):
  """Builds the custom_vjp/custom_vmap pair for one implementation and padding."""
  pad = [tuple(p) for p in padding]

  @custom_vmap
  def fwd(x, w):
    with jax.named_scope(SCOPES[0]):
      return _conv(x, w, pad)

  @fwd.def_vmap
  def fwd_rule(n, batched, x, w):
    with jax.named_scope(SCOPES[0]):
      return _fwd_rule(n, batched, x, w)

  def _fwd_rule(n, batched, x, w):
    if not batched[1]:  # shared kernel: fold the mapped axis into the batch
      y = fwd(_fold(x), w)
      return y.reshape((n, x.shape[1]) + y.shape[1:]), True
    x, w = _bcast(n, (x, w), batched)
    if impl in _BATCHED:
      return _BATCHED[impl](x, w, pad), True
    if impl == "grouped":
      return _grouped_conv(x, w, pad), True
    if impl == "map":
      return lax.map(lambda a: fwd(*a), (x, w)), True
    if impl == "pallas":
      return conv_pallas.pallas_conv(x, w, interpret=_interpret()), True
    if impl == "vmap":
      return jax.vmap(functools.partial(_conv, padding=pad))(x, w), True
    return jnp.stack([fwd(x[i], w[i]) for i in range(n)]), True

  def _default_vjp(x, w, g):
    _, pullback = jax.vjp(functools.partial(_conv, padding=pad), x, w)
    return pullback(g)

  @custom_vmap
  def bwd(x, w, g):
    with jax.named_scope(SCOPES[1]):
      dx = conv_dx(w, g, pad)
    with jax.named_scope(SCOPES[2]):
      return dx, conv_dw(x, g, pad, w.shape[:2])

  @bwd.def_vmap
  def bwd_rule(n, batched, x, w, g):
    x, w, g = _bcast(n, (x, w, g), batched)
    # A shared kernel here is rare (per-example gradients): one backward per element.
    impl_ = impl if batched[1] else "unroll"
    if impl_ in _BATCHED:
      _, pullback = jax.vjp(functools.partial(_BATCHED[impl_], padding=pad), x, w)
      return pullback(g), (True, True)
    if impl_ == "grouped":
      with jax.named_scope(SCOPES[1]):
        dx = _grouped_conv(g, jax.vmap(_flip_io)(w), _transpose_padding(w.shape[1:], pad))
      with jax.named_scope(SCOPES[2]):
        return (dx, _tap_dw(x, g, pad, w.shape[1:3])), (True, True)
    if impl_ == "map":
      return lax.map(lambda a: bwd(*a), (x, w, g)), (True, True)
    if impl_ == "pallas":
      with jax.named_scope(SCOPES[1]):
        dx = conv_pallas.pallas_conv_dx(w, g, interpret=_interpret())
      with jax.named_scope(SCOPES[2]):
        return (dx, conv_pallas.pallas_conv_dw(x, g, kernel_hw=w.shape[1:3], interpret=_interpret())), (True, True)
    if impl_ == "vmap":
      return jax.vmap(_default_vjp)(x, w, g), (True, True)
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


# `conv_impl='auto'`: per backend, (most models, impl) pairs tried in order, for the
# number of models one device's program holds (sites on the device x seeds); measured in
# bench/README.md. CPU: `map` at every count (one copy of the convolutions, so compile
# time is flat in the count; `unroll` is up to 1.3x faster per round at 4-16 sites but
# compiles 1.4-3.4x longer). GPU: `unroll` (fastest, 1,155 img/s at 4 sites on an H200)
# while its per-model copies keep compiling in about a minute, then `grouped`, one copy
# for any count (32 s to compile at 4 sites; 32 sites with `unroll`/`map` did not compile
# and run within 100 s). The GPU bound (4) awaits the device run's K = 8 / 32 and 4 x 8
# rows (bench/gpu_check.sh); TPU follows the GPU rule, unmeasured.
AUTO = {"cpu": ((None, "map"),),
        "gpu": ((4, "unroll"), (None, "grouped")),
        "tpu": ((4, "unroll"), (None, "grouped"))}


def default_impl(backend: str, num_models: int = 1) -> str:
  """The implementation `conv_impl='auto'` picks for `num_models` models in one program."""
  for most, impl in AUTO.get(backend, AUTO["gpu"]):
    if most is None or num_models <= most:
      return impl
  return "grouped"
