"""Optimizers as optax transformations, with per-leaf freezing that matches PyTorch >= 2.0.

In the official code the "frozen" half of a FedRep-style phase has `requires_grad=False`,
so on PyTorch >= 2.0 its gradient is None and the optimizer skips it: its parameters,
moments and (per-parameter) step count stay exactly as they were. Optax keeps one step
count for the whole tree, so freezing by zeroing updates would still decay the moments
and advance the bias correction. `freezable(inner)` therefore runs the inner optax
transformation on every leaf separately (each leaf has its own state, step count
included) and, for a leaf that is frozen in this step, keeps that state and emits a zero
update (`frozen='skip'`).

`frozen='zero_grad'` reproduces PyTorch < 2.0: `zero_grad()` zeroed the gradients that
existed instead of clearing them. A parameter that has had a gradient keeps a zero one
while it is frozen, so Adam still steps it (its moments decay, its step count advances,
it moves through its momentum); a parameter that never had one (grad None) is skipped.
Each leaf's state therefore carries whether it has had a gradient (`ZeroGradLeaf.seen`).

`config.optimizer.name`: 'adam' (PyTorch's Adam, the paper's), 'sgd' (with momentum, as
the FedProx and Ditto papers train) or 'adamw' (decoupled weight decay).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lcfed_jax.util.errors import ConfigError

NAMES = ("adam", "sgd", "adamw")


def make(config, learning_rate: float) -> optax.GradientTransformation:
  """The inner (per-leaf) transformation of `config.optimizer` at `learning_rate`."""
  o = config.optimizer
  if o.name == "adam":
    return optax.adam(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps)
  if o.name == "adamw":
    return optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  if o.name == "sgd":
    return optax.sgd(learning_rate, momentum=o.momentum or None, nesterov=bool(o.nesterov))
  raise ConfigError(f"config.optimizer.name={o.name!r}: expected one of {NAMES}")


class FreezableState(NamedTuple):
  leaves: Any      # the params' structure; every leaf holds the inner state of that leaf


class ZeroGradLeaf(NamedTuple):
  """A leaf's state under `frozen='zero_grad'`."""
  inner: Any
  seen: Any        # bool scalar: the leaf has had a gradient (PyTorch: p.grad is not None)


def freezable(inner: optax.GradientTransformation, frozen: str = "skip"
              ) -> optax.GradientTransformationExtraArgs:
  """Per-leaf `inner`; `update(grads, state, params, trainable=...)`, where `trainable`
  is a pytree of bool scalars (traced is fine) with the params' structure."""
  if frozen not in ("skip", "zero_grad"):
    raise ConfigError(f"config.federated.frozen_adam={frozen!r}: expected 'skip' or 'zero_grad'")

  def init_leaf(p):
    s = inner.init(p)
    return ZeroGradLeaf(s, jnp.zeros([], bool)) if frozen == "zero_grad" else s

  def init(params):
    return FreezableState(jax.tree.map(init_leaf, params))

  def update(grads, state, params=None, *, trainable, **extra):
    flat_g, tdef = jax.tree.flatten(grads)
    flat_p = tdef.flatten_up_to(params)
    flat_s = tdef.flatten_up_to(state.leaves)
    flat_t = tdef.flatten_up_to(trainable)
    updates, states = [], []
    for g, s, p, t in zip(flat_g, flat_s, flat_p, flat_t):
      g = g.astype(jnp.float32)
      if frozen == "zero_grad":   # a zeroed gradient steps once the leaf has had one
        step = t | s.seen
        u, s1 = _masked_update(inner, jnp.where(t, g, 0.0), s.inner, p, step)
        s1 = ZeroGradLeaf(s1, step)
      else:
        u, s1 = _masked_update(inner, g, s, p, t)
      updates.append(u.astype(p.dtype))
      states.append(s1)
    return tdef.unflatten(updates), FreezableState(tdef.unflatten(states))

  return optax.GradientTransformationExtraArgs(init, update)


def _masked_update(inner, g, s, p, on):
  """`inner`'s update where `on` (a traced bool), else a zero update and the state kept."""
  u, s1 = inner.update(g, s, p)
  return jnp.where(on, u, 0.0), jax.tree.map(lambda new, old: jnp.where(on, new, old), s1, s)


def map_leaf_states(fn, state: FreezableState, mask) -> FreezableState:
  """`fn(inner_state)` for the leaves where `mask` (bool pytree over params) is True."""
  flat_m, tdef = jax.tree.flatten(mask)
  flat_s = tdef.flatten_up_to(state.leaves)
  return FreezableState(tdef.unflatten([fn(s) if m else s for m, s in zip(flat_m, flat_s)]))


def field(state: FreezableState, name: str, params_like):
  """The params-structured tree of one field of every leaf's inner state (e.g. 'mu',
  'nu', 'count' of Adam): for tests and inspection."""
  tdef = jax.tree.structure(params_like)
  found = []
  for s in tdef.flatten_up_to(state.leaves):
    has = lambda n: name in getattr(n, "_fields", ())
    hits = [x for x in jax.tree.leaves(s, is_leaf=has) if has(x)]
    if not hits:
      raise KeyError(f"no optimizer state field {name!r}")
    found.append(getattr(hits[0], name))
  return tdef.unflatten(found)
