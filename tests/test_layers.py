"""The hand-written gradients of the U-Net's max-pool and instance norm, against references:
a NumPy re-creation of PyTorch's max_pool2d backward (first maximum of each window in
row-major order), XLA's select-and-scatter (`nn.max_pool`), and autodiff of the plain
instance-norm formula."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcfed_jax.models.layers import instance_norm, max_pool, max_pool_2x2


def _torch_rule_pool_grad(x, g):
  """max_pool2d(2, 2) backward as PyTorch computes it: the window's first argmax."""
  b, h, w, c = x.shape
  out = np.zeros_like(x)
  for n in range(b):
    for i in range(h // 2):
      for j in range(w // 2):
        for k in range(c):
          win = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].ravel()
          a = int(np.argmax(win))        # first occurrence of the maximum
          out[n, 2 * i + a // 2, 2 * j + a % 2, k] = g[n, i, j, k]
  return out


def _tied_relu_input(shape, seed=0):
  # Post-ReLU activations rounded to halves: zero windows and tied positive maxima.
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  return jnp.round(jax.nn.relu(x) * 2) / 2


def test_max_pool_matches_pytorch_rule_and_select_and_scatter_with_ties():
  x = _tied_relu_input((2, 8, 6, 3))
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 3, 3))
  y, pull = jax.vjp(max_pool_2x2, x)
  y_ref, pull_ref = jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  gx = np.asarray(pull(g)[0])
  np.testing.assert_array_equal(gx, _torch_rule_pool_grad(np.asarray(x), np.asarray(g)))
  np.testing.assert_array_equal(gx, np.asarray(pull_ref(g)[0]))
  # Ties are really there: jnp.max's own gradient would split them.
  split = jax.vjp(lambda x: x.reshape(2, 4, 2, 3, 2, 3).max(axis=(2, 4)), x)[1](g)[0]
  assert not np.array_equal(gx, np.asarray(split))


def test_max_pool_under_vmap_and_jit_and_odd_sizes():
  x = _tied_relu_input((3, 2, 8, 8, 2), seed=2)
  g = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 4, 4, 2))
  gx = jax.jit(jax.vmap(lambda x, g: jax.vjp(max_pool_2x2, x)[1](g)[0]))(x, g)
  for s in range(3):
    np.testing.assert_array_equal(np.asarray(gx[s]), _torch_rule_pool_grad(np.asarray(x[s]), np.asarray(g[s])))
  odd = _tied_relu_input((1, 7, 5, 2))       # floor, as nn.max_pool's VALID padding
  np.testing.assert_array_equal(np.asarray(max_pool(odd)), np.asarray(nn.max_pool(odd, (2, 2), (2, 2))))


def _instance_norm_ref(x, eps=1e-5):
  x = x.astype(jnp.float32)
  m = x.mean(axis=(-3, -2), keepdims=True)
  v = ((x - m) ** 2).mean(axis=(-3, -2), keepdims=True)
  return (x - m) / jnp.sqrt(v + eps)


@pytest.mark.parametrize("shape", [(2, 7, 9, 4), (3, 2, 5, 6, 3)])
def test_instance_norm_gradient_matches_autodiff_of_the_formula(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 2
  g = jax.random.normal(jax.random.PRNGKey(1), shape)
  y, pull = jax.vjp(instance_norm, x)
  y_ref, pull_ref = jax.vjp(_instance_norm_ref, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-6)
  np.testing.assert_allclose(np.asarray(pull(g)[0]), np.asarray(pull_ref(g)[0]), atol=2e-6)
  # Second-order use (a loss of the gradient) is not needed by any method; the first
  # derivative of a scalar loss through two norms is:
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(f(x) * 1.5)))
  np.testing.assert_allclose(np.asarray(jax.grad(loss(instance_norm))(x)),
                             np.asarray(jax.grad(loss(_instance_norm_ref))(x)), atol=1e-5)


def test_instance_norm_bf16_keeps_dtype_and_float32_statistics():
  x = (jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)) * 4 + 100).astype(jnp.bfloat16)
  y, pull = jax.vjp(instance_norm, x)
  assert y.dtype == jnp.bfloat16 and pull(jnp.ones_like(y))[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(_instance_norm_ref(x)), atol=2e-2)
