"""The FedDG 2-D U-Net (base width n = 16 in the paper), with optional PCS and HC.

Encoder blocks `down1..5` ([max-pool] conv3-norm, conv3-norm-relu, conv3-norm-relu;
n, 2n, 4n, 8n, 16n channels), decoder blocks `up4..1` ([conv3-norm-relu], nearest 2x
upsampling, conv1-norm-relu to half the channels, concatenation with the skip,
conv3-norm-relu), a 1x1 head and a sigmoid per class. Norms are instance norm without
affine parameters by default ('bn' for FedBN, 'gn' GroupNorm(1, C)).

`depth` (5 in the paper) is the number of encoder levels. The tests' tiny size uses 3
(down1..3, up2..1): every kind of block, in about half the program to trace and compile.

Submodule names are what the partition regexes of a method address:
`down1`..`down5` (encoder), `up4`..`up1` (decoder), `head` (the personal 1x1 head),
`pcs_<block>` (PCS after encoder block <block>), `hc` (head calibration).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lcfed_jax.models.hc import HeadCalibration
from lcfed_jax.models.layers import SiteConv, max_pool, norm
from lcfed_jax.models.pcs import PCS


class ConvD(nn.Module):
  """[pool] conv3-norm, conv3-norm-relu, conv3-norm-relu."""
  features: int
  first: bool
  norm: str
  impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    if not self.first:
      x = max_pool(x)
    conv = lambda name: SiteConv(self.features, (3, 3), impl=self.impl, dtype=self.dtype, name=name)
    x = norm(self.norm, conv("conv1")(x), train, "norm1")
    x = nn.relu(norm(self.norm, conv("conv2")(x), train, "norm2"))
    return nn.relu(norm(self.norm, conv("conv3")(x), train, "norm3"))


class ConvU(nn.Module):
  """[conv3 2p->p -norm-relu], nearest 2x up, conv1 p->p/2 -norm-relu, concat skip, conv3."""
  planes: int
  first: bool
  norm: str
  impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x, skip, train: bool):
    p = self.planes
    if not self.first:
      x = SiteConv(p, (3, 3), impl=self.impl, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(norm(self.norm, x, train, "norm1"))
    b, h, w, c = x.shape
    y = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    y = SiteConv(p // 2, (1, 1), impl=self.impl, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm(self.norm, y, train, "norm2"))
    y = jnp.concatenate([skip.astype(y.dtype), y], axis=-1)
    y = SiteConv(p, (3, 3), impl=self.impl, dtype=self.dtype, name="conv3")(y)
    return nn.relu(norm(self.norm, y, train, "norm3"))


class SegModel(nn.Module):
  """U-Net(+PCS)(+HC) for one site; the training step vmaps it over sites.

  `__call__(x, site, train, heads=None)` returns a dict with
    'probs'     sigmoid output of the own head [B,H,W,nc],
    'features'  decoder output y1 [B,H,W,32] (HC's input),
    'pcs_in'    the pre-PCS feature maps, one per PCS block (contrastive loss),
    'pcs_maps'  the channel maps used, one per PCS block,
    'hc' and 'peaks' when HC is on and `heads` (all sites' head params) is given.
  """
  num_classes: int = 1
  base: int = 16
  norm: str = "in"
  num_sites: int = 1
  pcs: bool = False
  pcs_n: int = 1
  pcs_pool: str = "avg+max"
  depth: int = 5
  hc: bool = False
  hc_eps: float = 1e-8
  hc_official_no_eps: bool = False
  impl: str = "unroll"
  dtype: Any = jnp.float32

  def setup(self):
    n, kw = self.base, dict(norm=self.norm, impl=self.impl, dtype=self.dtype)
    d = self.depth
    self.downs = [ConvD(n * 2 ** i, first=(i == 0), name=f"down{i + 1}", **kw) for i in range(d)]
    self.ups = [ConvU(n * 2 ** i, first=(i == d - 1), name=f"up{i}", **kw) for i in range(d - 1, 0, -1)]
    self.head = SiteConv(self.num_classes, (1, 1), impl=self.impl, dtype=self.dtype, name="head")
    self.pcs_blocks = tuple(range(d - self.pcs_n, d)) if self.pcs else ()
    self.pcs_mods = {b: PCS(self.num_sites, n * 2 ** b, pool=self.pcs_pool, name=f"pcs_{b + 1}")
                     for b in self.pcs_blocks}
    if self.hc:
      self.hc_mod = HeadCalibration(self.num_classes, eps=self.hc_eps,
                                    official_no_eps=self.hc_official_no_eps,
                                    impl=self.impl, dtype=self.dtype, name="hc")

  def __call__(self, x, site, train: bool = False, heads: Optional[Dict[str, Any]] = None):
    out: Dict[str, Any] = {"pcs_in": [], "pcs_maps": []}
    skips = []
    for i, down in enumerate(self.downs):
      x = down(x, train)
      if i in self.pcs_mods:
        out["pcs_in"].append(x)
        x, m = self.pcs_mods[i](x, site)
        out["pcs_maps"].append(m)
      skips.append(x)
    y = skips[-1]
    for up, skip in zip(self.ups, skips[-2::-1]):
      y = up(y, skip, train)
    out["features"] = y
    out["probs"] = jax.nn.sigmoid(self.head(y).astype(jnp.float32))
    if self.hc and heads is None and self.is_initializing():
      # HC's parameters do not depend on the heads: placeholders create them at init.
      heads = {"kernel": jnp.zeros((self.num_sites, 1, 1, y.shape[-1], self.num_classes)),
               "bias": jnp.zeros((self.num_sites, self.num_classes))}
    if self.hc and heads is not None:
      out["hc"], out["peaks"] = self.hc_mod(y, out["probs"], site, heads["kernel"], heads["bias"])
    return out

  def contrastive(self, pcs_in, site):
    """L_con (docs/official_code.md, section 1) on detached pre-PCS features; gradient reaches PCS only.

    For each PCS block: -mean_{j != site} MSE(M_site(f), stopgrad(M_j(f))), averaged
    over blocks. All K codes go through the PCS MLPs at once (no loop over sites).
    """
    codes = jnp.eye(self.num_sites)
    terms = []
    for b, f in zip(self.pcs_blocks, pcs_in):
      maps = self.pcs_mods[b].channel_maps(lax.stop_gradient(f), codes)    # [K,B,C]
      own = jnp.take(maps, site, axis=0)
      mse = jnp.mean(jnp.square(own[None] - lax.stop_gradient(maps)), axis=(1, 2))  # [K]
      others = 1.0 - jax.nn.one_hot(site, self.num_sites)
      terms.append(-jnp.sum(mse * others) / max(self.num_sites - 1, 1))
    return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros(())


class TwinSegModel(nn.Module):
  """Two copies of the network, 'global' and 'personal' (Ditto): the outputs of the
  personal one, plus 'global_probs' of the global one."""
  num_classes: int = 1
  base: int = 16
  norm: str = "in"
  num_sites: int = 1
  depth: int = 5
  impl: str = "unroll"
  dtype: Any = jnp.float32

  def setup(self):
    kw = dict(num_classes=self.num_classes, base=self.base, norm=self.norm, num_sites=self.num_sites,
              depth=self.depth, impl=self.impl, dtype=self.dtype)
    self.global_net = SegModel(name="global", **kw)
    self.personal_net = SegModel(name="personal", **kw)

  def __call__(self, x, site, train: bool = False, heads=None):
    out = dict(self.personal_net(x, site, train))
    out["global_probs"] = self.global_net(x, site, train)["probs"]
    return out
