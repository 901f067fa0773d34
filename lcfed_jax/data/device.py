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


def stack_splits(splits: Sequence[SiteSplit], num_padding_sites: int = 0, pad_multiple: int = 1,
                 sharding=None) -> SiteArrays:
  """Pads every site to the largest one, rounded up to `pad_multiple` (padding is never
  sampled, and evaluation drops it), and puts the arrays on the device."""
  n_max = max(max(len(s) for s in splits), 1)
  n_max = -(-n_max // pad_multiple) * pad_multiple
  first = splits[0]
  k = len(splits) + num_padding_sites
  images = np.zeros((k, n_max) + first.images.shape[1:], np.uint8)
  masks = np.zeros((k, n_max) + first.masks.shape[1:], np.uint8)
  counts = np.zeros((k,), np.int32)
  for i, s in enumerate(splits):
    images[i, :len(s)] = s.images
    masks[i, :len(s)] = s.masks
    counts[i] = len(s)
  arrays = SiteArrays(images, masks, counts)
  return jax.device_put(arrays, sharding) if sharding is not None else jax.device_put(arrays)


def sample_batch(images, masks, count, key, batch_size: int):
  """One site's batch, uniform with replacement over its real examples (spec 2.4).

  Called inside the site vmap: `images` [N_max,...] and `count` are that site's. A
  padding site (count 0) draws row 0, which its zero weight keeps out of every result.
  """
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(count, 1))
  x = jnp.take(images, idx, axis=0).astype(jnp.float32) / 255.0
  y = jnp.take(masks, idx, axis=0).astype(jnp.float32)
  return x, y
