"""The Pallas convolution path trains like the current one: LC-Fed stage A, 3 rounds.

Both engines run the same tiny federation (2 sites, 16 px, base 4, a 2-level U-Net, bf16
compute as on a GPU) from the same initial state on the same data: the `pallas` kernels (through the
Pallas interpreter on a CPU) against `map` (XLA's convolution, the CPU default). Their
per-site losses must agree within bf16 tolerance in every round: a kernel with a wrong
tap, site or gradient drifts far outside it within the first round, while the two paths
differ only in rounding (bf16 products, fp32 accumulation in both).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax.data.device import SiteArrays
from lcfed_jax.fed import setup

SITES, SIZE, ROUNDS = 2, 16, 3


def _losses(tiny, impl):
  c = tiny("lcfed", **{"model.conv_impl": impl, "model.dtype": "bfloat16", "local_steps": 2,
                       "lcfed.head_iters": 1, "model.depth": 2, "image_size": SIZE})
  exp = setup.build(c, SITES, 3, 1, (SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (SITES, 6, SIZE, SIZE, 3), dtype=np.uint8)
  masks = (rng.random((SITES, 6, SIZE, SIZE, 1)) < 0.3).astype(np.uint8)
  data = jax.device_put(SiteArrays(images, masks, np.full((SITES,), 6, np.int32)))
  weights = jnp.full((SITES,), 1.0 / SITES, jnp.float32)
  state = exp.init_state()
  step = exp.round_fn(exp.stages[0])
  out = []
  for _ in range(ROUNDS):
    state, losses, finite = step(state, data, weights)
    assert bool(np.all(np.asarray(finite))), impl
    out.append(np.asarray(losses, np.float64))
  return np.stack(out)


def test_pallas_matches_current_path_for_three_rounds(tiny):
  want = _losses(tiny, "map")
  got = _losses(tiny, "pallas")
  assert want.shape[0] == ROUNDS and np.all(np.isfinite(want))
  assert not np.allclose(want[0], want[-1]), "the losses should move over 3 rounds"
  # bf16 keeps 8 bits: differences of a few ulps of the loss (2^-8 relative each).
  np.testing.assert_allclose(got, want, rtol=4 * 2.0 ** -8, atol=1e-3)
