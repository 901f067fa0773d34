"""Building blocks shared by the U-Net, PCS and HC: the site convolution and the norms."""
from __future__ import annotations

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcfed_jax.models.conv import site_conv

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): an untruncated normal.
# The official U-Net applies it to every Conv2d it holds when it is built.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_uniform(fan_in: int):
  """U(+-1/sqrt(fan_in)): PyTorch's default init of a bias, and of a weight left to
  `reset_parameters` (kaiming_uniform with a=sqrt(5) gives the same bound)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_default_kernel(key, shape, dtype=jnp.float32):
  return torch_default_uniform(math.prod(shape[:-1]))(key, shape, dtype)


# How a SiteConv's kernel starts: 'kaiming' for convolutions inside the official U-Net
# (its init loop reaches them), 'torch_default' for those built outside it (HC's conv).
KERNEL_INITS = {"kaiming": kaiming_fan_out, "torch_default": _torch_default_kernel}


class SiteConv(nn.Module):
  """Stride-1 'same' conv whose kernel may be per site (see `lcfed_jax.conv`)."""
  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  use_bias: bool = True
  impl: str = "unroll"
  dtype: Any = jnp.float32
  kernel_init: str = "kaiming"    # a key of KERNEL_INITS

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", KERNEL_INITS[self.kernel_init], (kh, kw, cin, self.features))
    y = site_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
    if self.use_bias:
      bias = self.param("bias", torch_default_uniform(cin * kh * kw), (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class InstanceNorm(nn.Module):
  """PyTorch InstanceNorm2d defaults: no affine, no running stats, eps 1e-5, biased var."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(-3, -2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(-3, -2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).astype(x.dtype)


def norm(kind: str, x, train: bool, name: str):
  """`in` (instance, no affine), `bn` (batch norm, FedBN) or `gn` (GroupNorm(1, C)).

  Called inside a parent's compact method, so the norm's parameters sit at
  `<parent>/<name>/{scale,bias}` and BN statistics at `batch_stats/<parent>/<name>/...`,
  which is what FedBN's partition rule addresses.
  """
  if kind == "in":
    return InstanceNorm(name=name)(x)
  if kind == "bn":
    # PyTorch momentum 0.1 == flax momentum 0.9. Under the site vmap the statistics are
    # per site.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=jnp.float32, name=name)(x.astype(jnp.float32)).astype(x.dtype)
  if kind == "gn":
    return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=jnp.float32, name=name)(
        x.astype(jnp.float32)).astype(x.dtype)
  raise ValueError(f"norm {kind!r}; expected 'in', 'bn' or 'gn'")
