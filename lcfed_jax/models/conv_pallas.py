"""Site-batched stride-1 convolution as Pallas kernels: forward, input and weight gradient.

Under the site `vmap` every site has its own kernels, so the batching rule of the
project's `site_conv` receives x [n, B, H, W, Ci] and w [n, kh, kw, Ci, Co]. The kernels
here compute the per-site convolution with one kernel launch (one copy in the compiled
program) for any site count n; they target the Pallas Triton (GPU) and Mosaic (TPU)
backends and run anywhere with `interpret=True`.

Layout: flattened rows of the padded image. Each image is zero-padded outside the kernel
to Hp x Wp (the convolution's padding) and flattened to rows of channels [Hp*Wp, C].
The output is computed on the "wide" grid Ho x Wp (row stride Wp, not Wo): at flat
position p = r*Wp + c, tap (i, j) reads the input row p + i*Wp + j, so every tap is one
contiguous [bm, C] slice of the flattened image at a static offset from the block start.
That turns the convolution into kh*kw plain 2-D matmuls on contiguous tiles (implicit
GEMM) with no in-kernel reshape, gather or shift of register values, which neither
Triton nor Mosaic does well. The Wp - Wo extra columns per row (2 for a 3x3 kernel) wrap
into the next row, are garbage and are sliced away afterwards; the rows past the end are
zero padding, so no load is ever out of bounds (the Triton lowering does not mask).

Forward grid (site, image, pixel block, Co block), all parallel:
  x block  [L, Ci_pad]     the whole flattened image of (site, image); only [bm, bk]
                           tiles of it are loaded, at dynamic row offsets;
  w block  [kh*kw, Ci_pad, bn]  the site's kernel: the index map picks the site from
                           the grid, so every image uses its own site's weights;
  y block  [bm, bn]        acc(fp32) = sum over taps and Ci chunks of x_tile @ w[tap].
The input gradient is the same kernel applied to the output gradient with the flipped,
in/out-swapped kernel and the transposed padding (k-1-lo, k-1-hi), so even kernel sizes
work too.

Weight-gradient grid (split, site, tap row, tap column, Ci block, Co block), all
parallel: each program reduces x_tile^T @ g_tile over its site's B images and its share
of the pixel blocks in an in-kernel fp32 loop. GPU programs run concurrently, so a
reduction cannot accumulate into an output block across grid steps as on TPU; instead
the pixel blocks are split over `splits` programs (enough programs to fill the GPU when
n*kh*kw*channel blocks is small) whose fp32 partial sums are added outside the kernel.

Blocking: every loaded tile is [bm, bk], [bk, bn] or [bm, bn] with bm, bn, bk powers of
two >= 16: Triton requires power-of-two tensor sizes and its dot needs M, N, K >= 16.
The pixel block bm is 64 at 128 channels and grows to 256 at 16-32 channels (the U-Net's
first levels, where most pixels are), keeping the fp32 accumulator at 64 x 128 elements.
Channels are zero-padded up to the block size outside the kernel (zeros contribute
nothing) and sliced back. bn and bk are either the whole padded channel count (<= 128)
or 128, which also satisfies Mosaic's (8, 128) rule for the last two block dims (equal
to the full dim, or a multiple of 128). Inputs are cast to the compute dtype (bf16 or
fp32) before the call; accumulation is fp32 (`preferred_element_type`); fp32 dots ask
for HIGHEST precision, since the Triton default for fp32 is TF32.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_BM = 64    # output pixels per block at 128 channels; 64 x 128 fp32 accumulators fit Triton's registers
_BM_MAX = 256  # pixels per block at <= 32 channels: the same accumulator size, 4x fewer programs
_ACC = _BM * 128  # fp32 accumulator elements per program
_BN = 128   # output channels per block
_BK = 128   # contracted channels per dot (one TPU lane width)
_MIN = 16   # Triton's smallest dot dimension
_DW_PROGRAMS = 256  # weight-gradient programs to aim for: ~2 per SM on a large GPU

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def _pow2(v: int) -> int:
  return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _tile(size: int, cap: int, override: Optional[int]) -> int:
  """Power-of-two block for a dimension of `size`: >= 16, <= cap unless overridden."""
  if override is not None:
    if override < _MIN or override & (override - 1):
      raise ValueError(f"block size {override} must be a power of two >= {_MIN}")
    return override
  return max(_MIN, min(cap, _pow2(size)))


def _rows(m: int, channels: int, override: Optional[int]) -> int:
  """Pixel rows per block for `m` rows and a `channels`-wide accumulator: at 16-32
  channels a 64-row block holds a quarter of the registers it may and every program does
  a 64 x 16 x 16 dot per tap, so the block grows while bm x channels stays <= _ACC."""
  return _tile(m, max(_BM, min(_BM_MAX, _ACC // max(channels, 1))), override)


def _chan(c: int, cap: int, override: Optional[int]) -> Tuple[int, int]:
  """(padded channel count, block) for `c` channels."""
  blk = _tile(c, cap, override)
  return _cdiv(c, blk) * blk, blk


def same_padding(kernel_hw: Sequence[int]) -> Padding:
  return tuple((k // 2, (k - 1) // 2) for k in kernel_hw)  # type: ignore[return-value]


def _transpose_padding(kernel_hw: Sequence[int], padding: Padding) -> Padding:
  return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_hw, padding))  # type: ignore


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _compute_dtype(compute_dtype, *arrays):
  if compute_dtype is not None:
    return jnp.dtype(compute_dtype)
  return jnp.result_type(*arrays)


class _Geometry:
  """Sizes of the flattened, padded layout for an input [.., H, W, ..] and kernel."""

  def __init__(self, h, w, kernel_hw, padding):
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    self.kh, self.kw = kernel_hw
    self.pads = ((ph_lo, ph_hi), (pw_lo, pw_hi))
    self.hp, self.wp = h + ph_lo + ph_hi, w + pw_lo + pw_hi
    self.ho, self.wo = self.hp - self.kh + 1, self.wp - self.kw + 1
    if self.ho < 1 or self.wo < 1:
      raise ValueError(f"kernel {kernel_hw} larger than padded input {(self.hp, self.wp)}")
    self.m = self.ho * self.wp  # wide output rows

  def rows(self, mp: int) -> int:
    """Input rows needed for `mp` output rows: the last tap reads up to here."""
    return mp + (self.kh - 1) * self.wp + (self.kw - 1)

  def flat_input(self, x, cip: int, mp: int, dtype):
    """[n, B, H, W, C] -> [n, B, rows(mp), cip], zero-padded, in `dtype`."""
    n, b = x.shape[:2]
    xp = jnp.pad(x.astype(dtype), ((0, 0), (0, 0)) + self.pads + ((0, cip - x.shape[-1]),))
    xf = xp.reshape(n, b, self.hp * self.wp, cip)
    return jnp.pad(xf, ((0, 0), (0, 0), (0, self.rows(mp) - self.hp * self.wp), (0, 0)))

  def flat_output(self, g, cop: int, mp: int, dtype):
    """[n, B, Ho, Wo, C] -> [n, B, mp, cop] on the wide grid; garbage columns are zero."""
    n, b = g.shape[:2]
    gp = jnp.pad(g.astype(dtype), ((0, 0), (0, 0), (0, 0), (0, self.wp - self.wo),
                                   (0, cop - g.shape[-1])))
    return jnp.pad(gp.reshape(n, b, self.m, cop), ((0, 0), (0, 0), (0, mp - self.m), (0, 0)))

  def unflatten(self, y, c: int):
    """[n, B, mp, cop] wide-grid rows -> [n, B, Ho, Wo, c]."""
    n, b = y.shape[:2]
    y = y[:, :, :self.m].reshape(n, b, self.ho, self.wp, y.shape[-1])
    return y[:, :, :, :self.wo, :c]


def _conv_kernel(x_ref, w_ref, y_ref, *, geo: _Geometry, bk: int, precision):
  bm, bn = y_ref.shape
  cip = x_ref.shape[-1]
  m0 = pl.program_id(2) * bm
  acc = jnp.zeros((bm, bn), jnp.float32)
  # Static loops: kh*kw*(Ci_pad/bk) dots with compile-time row offsets from m0.
  for i in range(geo.kh):
    for j in range(geo.kw):
      row = m0 + (i * geo.wp + j)
      for k0 in range(0, cip, bk):
        xt = x_ref[pl.ds(row, bm), pl.ds(k0, bk)]
        wt = w_ref[i * geo.kw + j, pl.ds(k0, bk), :]
        acc += jnp.dot(xt, wt, preferred_element_type=jnp.float32, precision=precision)
  y_ref[...] = acc.astype(y_ref.dtype)


def _conv_general(x, w, padding: Padding, *, out_dtype, compute_dtype, interpret,
                  block_m, block_n, block_k):
  """Per-site stride-1 convolution with explicit padding: x [n,B,H,W,Ci], w [n,kh,kw,Ci,Co]."""
  n, b, h, wd, ci = x.shape
  kh, kw, ci_w, co = w.shape[1:]
  if w.shape[0] != n or ci_w != ci:
    raise ValueError(f"x {x.shape} and w {w.shape}: sites or input channels differ")
  cdt = _compute_dtype(compute_dtype, x, w)
  geo = _Geometry(h, wd, (kh, kw), padding)
  cip, bk = _chan(ci, _BK, block_k)
  cop, bn = _chan(co, _BN, block_n)
  bm = _rows(geo.m, bn, block_m)
  mp = _cdiv(geo.m, bm) * bm
  rows = geo.rows(mp)
  xf = geo.flat_input(x, cip, mp, cdt)
  wf = jnp.pad(w.astype(cdt), ((0, 0),) * 3 + ((0, cip - ci), (0, cop - co)))
  wf = wf.reshape(n, kh * kw, cip, cop)
  kernel = functools.partial(_conv_kernel, geo=geo, bk=bk, precision=_precision(cdt))
  y = pl.pallas_call(
      kernel,
      out_shape=_out_type((n, b, mp, cop), out_dtype, xf, wf),
      grid=(n, b, mp // bm, cop // bn),
      in_specs=[
          # The whole image: rows are sliced in the kernel (halo of (kh-1)*Wp + kw-1 rows).
          pl.BlockSpec((None, None, rows, cip), lambda s, i, m, c: (s, i, 0, 0)),
          # The site's kernel for this Co block: per-site weights come from the index map.
          pl.BlockSpec((None, kh * kw, cip, bn), lambda s, i, m, c: (s, 0, 0, c)),
      ],
      out_specs=pl.BlockSpec((None, None, bm, bn), lambda s, i, m, c: (s, i, m, c)),
      interpret=interpret,
      name="site_conv",
  )(xf, wf)
  return geo.unflatten(y, co)


def _out_type(shape, dtype, *inputs):
  """The kernel's output type. Inside `shard_map` (the engine's site axis) it must say
  over which mesh axes it varies: as its inputs do. The argument is `manual_axis_type`
  in some JAX versions and `vma` in others."""
  params = inspect.signature(jax.ShapeDtypeStruct).parameters
  types = [jax.typeof(a) for a in inputs]
  if "vma" in params:
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset().union(*(getattr(t, "vma", ()) for t in types)))
  if "manual_axis_type" in params:
    found = [t.manual_axis_type for t in types if getattr(t, "manual_axis_type", None) is not None]
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=found[0] if found else None)
  return jax.ShapeDtypeStruct(shape, dtype)


def pallas_conv(x: jax.Array, w: jax.Array, *, interpret: bool = False,
                compute_dtype=None, block_m: Optional[int] = None,
                block_n: Optional[int] = None, block_k: Optional[int] = None) -> jax.Array:
  """Per-site 'same' convolution: x [n,B,H,W,Ci], w [n,kh,kw,Ci,Co] -> [n,B,H,W,Co].

  Inputs are cast to `compute_dtype` (default: their promoted dtype), products are
  accumulated in fp32, the result has x's dtype. Block sizes (powers of two >= 16)
  default to the module's choice."""
  return _conv_general(x, w, same_padding(w.shape[1:3]), out_dtype=x.dtype,
                       compute_dtype=compute_dtype, interpret=interpret,
                       block_m=block_m, block_n=block_n, block_k=block_k)


def pallas_conv_dx(w: jax.Array, g: jax.Array, *, interpret: bool = False,
                   compute_dtype=None, block_m: Optional[int] = None,
                   block_n: Optional[int] = None, block_k: Optional[int] = None) -> jax.Array:
  """Input gradient of `pallas_conv`: w [n,kh,kw,Ci,Co], g [n,B,H,W,Co] -> [n,B,H,W,Ci].

  The convolution of g with the flipped, in/out-swapped kernel under the transposed
  padding (equal to 'same' for odd kernels); result in g's dtype."""
  kernel_hw = w.shape[1:3]
  w_t = jnp.swapaxes(w[:, ::-1, ::-1], 3, 4)
  pad = _transpose_padding(kernel_hw, same_padding(kernel_hw))
  return _conv_general(g, w_t, pad, out_dtype=g.dtype, compute_dtype=compute_dtype,
                       interpret=interpret, block_m=block_m, block_n=block_n,
                       block_k=block_k)


def _dw_kernel(x_ref, g_ref, o_ref, *, geo: _Geometry, bm: int, per: int, precision):
  b = x_ref.shape[0]
  first = pl.program_id(0) * per  # this split's first pixel block
  off = pl.program_id(2) * geo.wp + pl.program_id(3)  # tap (i, j) in flat rows

  def image(bi, acc):
    def block(mi, acc):
      m0 = (first + mi) * bm
      xt = x_ref[bi, pl.ds(m0 + off, bm), :]
      gt = g_ref[bi, pl.ds(m0, bm), :]
      # x_tile^T @ g_tile: contract the pixel axis of both.
      return acc + lax.dot_general(xt, gt, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32, precision=precision)
    return lax.fori_loop(0, per, block, acc)

  o_ref[...] = lax.fori_loop(0, b, image, jnp.zeros(o_ref.shape, jnp.float32))


def pallas_conv_dw(x: jax.Array, g: jax.Array, *, kernel_hw: Sequence[int],
                   interpret: bool = False, compute_dtype=None,
                   block_m: Optional[int] = None, block_n: Optional[int] = None,
                   block_k: Optional[int] = None,
                   splits: Optional[int] = None) -> jax.Array:
  """Weight gradient of `pallas_conv`: x [n,B,H,W,Ci], g [n,B,H,W,Co] -> [n,kh,kw,Ci,Co].

  dw[s, i, j] = sum over site s's images and pixels of (x padded, shifted by tap (i, j))
  outer g, accumulated in fp32; result in x's dtype. `kernel_hw` is the kernel size
  (the shapes of x and g do not determine it). `splits` programs share the pixel blocks
  of each (site, tap, channel block); default: enough to give ~256 programs."""
  n, b, h, wd, ci = x.shape
  co = g.shape[-1]
  if g.shape[:4] != x.shape[:4]:
    raise ValueError(f"x {x.shape} and g {g.shape}: sites, images or pixels differ")
  kh, kw = kernel_hw
  cdt = _compute_dtype(compute_dtype, x, g)
  geo = _Geometry(h, wd, (kh, kw), same_padding((kh, kw)))
  cip, bci = _chan(ci, _BK, block_k)
  cop, bn = _chan(co, _BN, block_n)
  bm = _rows(geo.m, max(bci, bn), block_m)
  nm = _cdiv(geo.m, bm)
  programs = n * kh * kw * (cip // bci) * (cop // bn)
  if splits is None:
    splits = _cdiv(_DW_PROGRAMS, programs)
  splits = max(1, min(int(splits), nm))
  per = _cdiv(nm, splits)
  splits = _cdiv(nm, per)
  mp = splits * per * bm  # extra pixel blocks are zero in g and add nothing
  rows = geo.rows(mp)
  xf = geo.flat_input(x, cip, mp, cdt)
  gf = geo.flat_output(g, cop, mp, cdt)
  kernel = functools.partial(_dw_kernel, geo=geo, bm=bm, per=per, precision=_precision(cdt))
  parts = pl.pallas_call(
      kernel,
      out_shape=_out_type((splits, n, kh, kw, cip, cop), jnp.float32, xf, gf),
      grid=(splits, n, kh, kw, cip // bci, cop // bn),
      in_specs=[
          pl.BlockSpec((None, b, rows, bci), lambda q, s, i, j, a, c: (s, 0, 0, a)),
          pl.BlockSpec((None, b, mp, bn), lambda q, s, i, j, a, c: (s, 0, 0, c)),
      ],
      out_specs=pl.BlockSpec((None, None, None, None, bci, bn),
                             lambda q, s, i, j, a, c: (q, s, i, j, a, c)),
      interpret=interpret,
      name="site_conv_dw",
  )(xf, gf)
  return parts.sum(0)[..., :ci, :co].astype(x.dtype)
