"""HC, Head Calibration (the released `multi_lcnet` version; docs/official_code.md).

For site k with decoder features F and its own prediction P (both detached):
every site's head is applied to F (the heads come stacked on the site axis), U is the
RMS deviation of those predictions from site k's head, normalised per image and class
by its maximum (+eps, so agreeing heads give 0 rather than NaN), and its 31x31 local
maxima above 0.2 form a binary peak map. A fixed peak-normalised Gaussian (31x31,
sigma 6) blurs the peak map and P; each gives a residual attention F*S + F, per class;
their concatenation goes through a 3x3 conv and a sigmoid.

The Gaussian and the max filter are separable, so both run as two 1-D passes (exactly
the same values as the 31x31 forms, 15x fewer operations per pixel).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcfed_jax.models.layers import SiteConv


def gaussian_1d(size: int = 31, sigma: float = 6.0) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  return np.exp(-(x ** 2) / (2 * sigma ** 2)).astype(np.float32)   # peak 1


def gaussian_kernel(size: int = 31, sigma: float = 6.0) -> np.ndarray:
  """The 2-D kernel (peak 1, sum ~221.8 for 31/6): outer product of the 1-D one."""
  g = gaussian_1d(size, sigma)
  return np.outer(g, g)


def blur(maps, size: int = 31, sigma: float = 6.0):
  """Depthwise 'same' Gaussian blur of [B,H,W,C] maps, zero padding."""
  g = jnp.asarray(gaussian_1d(size, sigma))
  c = maps.shape[-1]
  dn = ("NHWC", "HWIO", "NHWC")
  pad = size // 2
  kv = jnp.tile(g.reshape(size, 1, 1, 1), (1, 1, 1, c))
  kh = jnp.tile(g.reshape(1, size, 1, 1), (1, 1, 1, c))
  maps = lax.conv_general_dilated(maps, kv, (1, 1), ((pad, pad), (0, 0)),
                                  dimension_numbers=dn, feature_group_count=c)
  return lax.conv_general_dilated(maps, kh, (1, 1), ((0, 0), (pad, pad)),
                                  dimension_numbers=dn, feature_group_count=c)


def local_max(u, size: int = 31):
  """Max over a size x size window (stride 1, -inf padding), as two 1-D passes."""
  pad = size // 2
  u = lax.reduce_window(u, -jnp.inf, lax.max, (1, size, 1, 1), (1, 1, 1, 1),
                        ((0, 0), (pad, pad), (0, 0), (0, 0)))
  return lax.reduce_window(u, -jnp.inf, lax.max, (1, 1, size, 1), (1, 1, 1, 1),
                           ((0, 0), (0, 0), (pad, pad), (0, 0)))


def peak_map(u, window: int = 31, threshold: float = 0.2):
  """1 where u is its window's local maximum and above threshold ("NMS")."""
  return ((u == local_max(u, window)) & (u > threshold)).astype(u.dtype)


def head_predictions(features, head_kernels, head_biases):
  """Every site's 1x1 head on one site's features: [B,H,W,32] -> [K,B,H,W,nc]."""
  k = head_kernels.reshape(head_kernels.shape[0], head_kernels.shape[-2], head_kernels.shape[-1])
  logits = jnp.einsum("bhwc,kco->kbhwo", features.astype(jnp.float32), k.astype(jnp.float32))
  return jax.nn.sigmoid(logits + head_biases[:, None, None, None, :])


def disagreement(preds, site, eps: float = 1e-8, official_no_eps: bool = False):
  """RMS deviation of all heads from head `site`, max-normalised per image and class.

  preds: [K,B,H,W,nc]. With `official_no_eps` the released 0/0 = NaN behaviour stays.
  """
  k = preds.shape[0]
  own = jnp.take(preds, site, axis=0)
  u = jnp.sqrt(jnp.sum(jnp.square(preds - own[None]), axis=0) / max(k - 1, 1))
  umax = jnp.max(u, axis=(1, 2), keepdims=True)
  return u / umax if official_no_eps else u / (umax + eps)


class HeadCalibration(nn.Module):
  num_classes: int
  window: int = 31
  sigma: float = 6.0
  threshold: float = 0.2
  eps: float = 1e-8
  official_no_eps: bool = False
  impl: str = "unroll"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, pred, site, head_kernels, head_biases):
    """Returns the calibrated sigmoid output and the peak (disagreement) map."""
    features = lax.stop_gradient(features).astype(jnp.float32)
    pred = lax.stop_gradient(pred).astype(jnp.float32)
    preds = head_predictions(features, lax.stop_gradient(head_kernels),
                             lax.stop_gradient(head_biases))
    u = disagreement(preds, site, self.eps, self.official_no_eps)
    peaks = peak_map(u, self.window, self.threshold)
    s1 = blur(peaks, self.window, self.sigma)
    s2 = blur(pred, self.window, self.sigma)
    feats = []
    for c in range(self.num_classes):
      feats.append(features * s1[..., c:c + 1] + features)
      feats.append(features * s2[..., c:c + 1] + features)
    # A plain nn.Conv2d built outside the official U-Net's Kaiming loop: PyTorch's
    # default init, ~20x smaller than Kaiming-normal here, so the sigmoid starts unsaturated.
    out = SiteConv(self.num_classes, (3, 3), impl=self.impl, dtype=self.dtype,
                   kernel_init="torch_default", name="conv")(jnp.concatenate(feats, -1))
    return jax.nn.sigmoid(out.astype(jnp.float32)), peaks
