"""PCS, Personalized Channel Selection (docs/official_code.md, section 1).

A fixed one-hot site code e_k goes through an embedding MLP g (K -> C -> C, no bias);
the feature map's pooled descriptors, concatenated with the embedding, go through a
shared MLP h (2C -> C/16 -> C, no bias); M = sigmoid(h[avg; xi] + h[max; xi]) is the
channel map and the output is f * M + f. `pool='avg'` drops the max branch (the figure).

`channel_maps` evaluates M for several codes at once, which is what the contrastive site
loss needs (every other site's code, inside the mapped step, with no loop over sites).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcfed_jax.models.layers import torch_default_uniform


class PCS(nn.Module):
  num_sites: int
  channels: int
  pool: str = "avg+max"
  reduction: int = 16

  def setup(self):
    c, k = self.channels, self.num_sites
    hidden = max(c // self.reduction, 1)
    # PCS's 1x1 convs keep PyTorch's default init (the official model's Kaiming loop
    # never reached them).
    self.embed1 = self.param("embed1", torch_default_uniform(k), (k, c))
    self.embed2 = self.param("embed2", torch_default_uniform(c), (c, c))
    self.mlp1 = self.param("mlp1", torch_default_uniform(2 * c), (2 * c, hidden))
    self.mlp2 = self.param("mlp2", torch_default_uniform(hidden), (hidden, c))

  def embed(self, codes):
    """codes [..., K] (one-hot) -> [..., C]."""
    return jnp.maximum(codes @ self.embed1, 0.0) @ self.embed2

  def _h(self, v):
    return jnp.maximum(v @ self.mlp1, 0.0) @ self.mlp2

  def channel_maps(self, f, codes):
    """f [B,H,W,C], codes [J,K] -> maps [J,B,C] in (0, 1)."""
    f = f.astype(jnp.float32)
    xi = self.embed(codes)[:, None, :]                       # [J,1,C]
    xi = jnp.broadcast_to(xi, (codes.shape[0], f.shape[0], self.channels))
    avg = jnp.broadcast_to(jnp.mean(f, axis=(1, 2)), xi.shape)
    logits = self._h(jnp.concatenate([avg, xi], -1))
    if self.pool == "avg+max":
      mx = jnp.broadcast_to(jnp.max(f, axis=(1, 2)), xi.shape)
      logits = logits + self._h(jnp.concatenate([mx, xi], -1))
    elif self.pool != "avg":
      raise ValueError(f"pcs pool {self.pool!r}; expected 'avg+max' or 'avg'")
    return jax.nn.sigmoid(logits)

  def __call__(self, f, site):
    code = jax.nn.one_hot(site, self.num_sites)[None]        # [1,K]
    m = self.channel_maps(f, code)[0]                        # [B,C]
    return f * m[:, None, None, :].astype(f.dtype) + f, m
