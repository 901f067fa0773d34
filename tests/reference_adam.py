"""Reference for tests: the project's earlier hand-written Adam with per-leaf freezing
(PyTorch >= 2.0 semantics), kept to check the optax-based `lcfed_jax.fed.optim` against.

In the official code the "frozen" half of a FedRep phase has `requires_grad=False`, so
on PyTorch >= 2.0 its gradient is None and `Adam.step` skips it: its parameters, both
moments and its (per-parameter) step count stay exactly as they were. Optax's Adam keeps
one step count for the whole tree, so freezing by zeroing updates would still decay the
moments and advance bias correction. This Adam keeps a step count per leaf and, for a
frozen leaf, leaves everything untouched.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class AdamState(NamedTuple):
  mu: Any
  nu: Any
  count: Any   # int32 scalar per leaf


def adam_init(params) -> AdamState:
  zeros = jax.tree.map(jnp.zeros_like, params)
  return AdamState(zeros, jax.tree.map(jnp.zeros_like, params),
                   jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params))


def adam_update(grads, state: AdamState, params, trainable, lr, *, b1=0.9, b2=0.999, eps=1e-8):
  """One step. `trainable` is a pytree of bool scalars (traced is fine) like `params`."""

  def leaf(g, m, v, c, p, t):
    g = g.astype(jnp.float32)
    c1 = c + 1
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    bc1 = 1 - b1 ** c1.astype(jnp.float32)
    bc2 = 1 - b2 ** c1.astype(jnp.float32)
    p1 = p - lr * (m1 / bc1) / (jnp.sqrt(v1 / bc2) + eps)
    sel = lambda new, old: jnp.where(t, new, old)
    return sel(m1, m), sel(v1, v), sel(c1, c), sel(p1.astype(p.dtype), p)

  flat_p, tdef = jax.tree.flatten(params)
  outs = [leaf(*a) for a in zip(jax.tree.leaves(grads), jax.tree.leaves(state.mu),
                                jax.tree.leaves(state.nu), jax.tree.leaves(state.count),
                                flat_p, jax.tree.leaves(trainable))]
  unz = lambda i: jax.tree.unflatten(tdef, [o[i] for o in outs])
  return unz(3), AdamState(unz(0), unz(1), unz(2))
