"""Segmentation loss (the official Dice loss)."""
import jax.numpy as jnp


def dice_loss(probs, target, smooth: float = 1e-5):
  """1 - mean over channels of soft Dice with sums over the whole batch and image.

  probs, target: [B,H,W,C]. Matches `utils/losses.py` of the official code: per channel
  (2 sum(p y) + s) / (sum(p) + sum(y) + s), smoothing 1e-5, no BCE term.
  """
  p = probs.astype(jnp.float32)
  y = target.astype(jnp.float32)
  inter = jnp.sum(p * y, axis=(0, 1, 2))
  denom = jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(y, axis=(0, 1, 2))
  return 1.0 - jnp.mean((2 * inter + smooth) / (denom + smooth))
