"""Every site's split on the device, stacked on the site axis and sampled there."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax.data.types import SiteSplit


@flax.struct.dataclass
class SiteArrays:
  images: jax.Array   # uint8 [K, N_max, H, W, C]
  masks: jax.Array    # uint8 [K, N_max, H, W, nc]
  counts: jax.Array   # int32 [K]: real examples per site; rows past it are zero padding


def stack_splits(splits: Sequence[Optional[SiteSplit]], num_padding_sites: int = 0, pad_multiple: int = 1,
                 sharding=None) -> SiteArrays:
  """Pads every site to the largest one, rounded up to `pad_multiple` (padding is never
  sampled, and evaluation drops it), appends `num_padding_sites` empty sites (count 0),
  and puts the arrays on the device.

  With a `NamedSharding` over the site axis (`lcfed_jax.sharding`) the global arrays are
  built from process-local blocks: only the sites on this process's devices are read,
  so on several hosts the other sites' entries of `splits` may be None (the largest
  site size is then agreed over processes).
  """
  present = [s for s in splits if s is not None]
  if not present:
    raise ValueError("stack_splits: no site data on this process")
  n_max = max(max(len(s) for s in present), 1)
  if sharding is not None:
    from lcfed_jax.util.hosts import global_max
    n_max = global_max(n_max)
  n_max = -(-n_max // pad_multiple) * pad_multiple
  first = present[0]
  k = len(splits) + num_padding_sites

  def block(field: str, sites: range) -> np.ndarray:
    sample = getattr(first, field)
    out = np.zeros((len(sites), n_max) + sample.shape[1:], np.uint8)
    for j, i in enumerate(sites):
      s = splits[i] if i < len(splits) else None
      if s is not None:
        out[j, :len(s)] = getattr(s, field)
    return out

  def counts(sites: range) -> np.ndarray:
    return np.array([len(splits[i]) if i < len(splits) and splits[i] is not None else 0
                     for i in sites], np.int32)

  if sharding is None:
    everything = range(k)
    return jax.device_put(SiteArrays(block("images", everything), block("masks", everything),
                                     counts(everything)))
  from lcfed_jax.util.hosts import global_array
  rows = lambda sl: range(k)[sl[0]]
  return SiteArrays(
      images=global_array(sharding, (k, n_max) + first.images.shape[1:], np.uint8,
                          lambda sl: block("images", rows(sl))),
      masks=global_array(sharding, (k, n_max) + first.masks.shape[1:], np.uint8,
                         lambda sl: block("masks", rows(sl))),
      counts=global_array(sharding, (k,), np.int32, lambda sl: counts(rows(sl))))


def sample_batch(images, masks, count, key, batch_size: int):
  """One site's batch, uniform with replacement over its real examples (the
  official sampler draws with replacement too).

  Called inside the site vmap: `images` [N_max,...] and `count` are that site's. A
  padding site (count 0) draws row 0, which its zero weight keeps out of every result.
  """
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(count, 1))
  x = jnp.take(images, idx, axis=0).astype(jnp.float32) / 255.0
  y = jnp.take(masks, idx, axis=0).astype(jnp.float32)
  return x, y
