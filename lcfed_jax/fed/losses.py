"""Loss terms: small named functions a method's stage adds up.

A stage lists its terms, each built by `term(name, weight, **settings)`; an unknown name
or setting fails there, when the method's record is built. Every term receives a
`LossContext` (the model's outputs on the batch, the targets, the parameters now and at
the start of the round, every site's head, the step) and returns a scalar. A term that
needs something the engine does not compute by default says so in `needs`:
'heads' (every site's head as it was at the start of the round, gathered from all
devices) or 'start' (this site's parameters at the start of the round).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import jax
import jax.numpy as jnp

from lcfed_jax.util.errors import ConfigError


def dice_loss(probs, target, smooth: float = 1e-5):
  """1 - mean over channels of soft Dice with sums over the whole batch and image.

  probs, target: [B,H,W,C]. The official Dice loss: per channel
  (2 sum(p y) + s) / (sum(p) + sum(y) + s), smoothing 1e-5, no BCE term.
  """
  p = probs.astype(jnp.float32)
  y = target.astype(jnp.float32)
  inter = jnp.sum(p * y, axis=(0, 1, 2))
  denom = jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(y, axis=(0, 1, 2))
  return 1.0 - jnp.mean((2 * inter + smooth) / (denom + smooth))


@dataclasses.dataclass(frozen=True)
class LossContext:
  model: Any                 # the flax module (its methods, e.g. `contrastive`)
  variables: Dict            # {'params': ..., **model_state} of this site, now
  out: Dict                  # the model's outputs on the batch
  y: jax.Array               # targets [B,H,W,nc]
  site: jax.Array            # this site's index
  start: Optional[Dict]      # this site's params at the start of the round ('start')
  shared: Any                # bool pytree over params: the leaves the server averages
  step: jax.Array


def _sq_dist(a, b) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _dice(ctx: LossContext):
  return dice_loss(ctx.out["probs"], ctx.y)


def _hc_dice(ctx: LossContext):
  return dice_loss(ctx.out["hc"], ctx.y)


def _global_dice(ctx: LossContext):
  return dice_loss(ctx.out["global_probs"], ctx.y)


def _contrastive(ctx: LossContext):
  return ctx.model.apply(ctx.variables, ctx.out["pcs_in"], ctx.site, method=type(ctx.model).contrastive)


def _prox(ctx: LossContext, mu: float):
  """FedProx: mu/2 ||w - w_round_start||^2 over the shared leaves."""
  pick = lambda t: [a for a, s in zip(jax.tree.leaves(t), jax.tree.leaves(ctx.shared)) if s]
  return 0.5 * mu * _sq_dist(pick(ctx.variables["params"]), pick(ctx.start))


def _ditto_prox(ctx: LossContext, lam: float):
  """Ditto: lambda/2 ||v - w||^2, the personal model v against the global model w as
  the server sent it at the start of the round."""
  return 0.5 * lam * _sq_dist(ctx.variables["params"]["personal"], ctx.start["global"])


# name -> (function, what it needs, the settings it takes)
TERMS: Dict[str, tuple] = {
    "dice": (_dice, frozenset(), ()),
    "hc_dice": (_hc_dice, frozenset({"heads"}), ()),
    "global_dice": (_global_dice, frozenset(), ()),
    "contrastive": (_contrastive, frozenset(), ()),
    "prox": (_prox, frozenset({"start"}), ("mu",)),
    "ditto_prox": (_ditto_prox, frozenset({"start"}), ("lam",)),
}


@dataclasses.dataclass(frozen=True)
class Term:
  """A registry function with its settings bound; equal terms (same name, weight and
  settings) are the same program, so stages holding them compare and hash by value."""
  name: str
  weight: float
  fn: Callable[..., jax.Array]
  needs: FrozenSet[str]
  settings: Tuple[Tuple[str, Any], ...] = ()

  def __call__(self, ctx: LossContext) -> jax.Array:
    return self.weight * self.fn(ctx, **dict(self.settings))


def term(name: str, weight: float = 1.0, **settings) -> Term:
  """A loss term of the registry, its settings bound."""
  if name not in TERMS:
    raise ConfigError(f"loss term {name!r}: expected one of {sorted(TERMS)}")
  fn, needs, keys = TERMS[name]
  if set(settings) != set(keys):
    raise ConfigError(f"loss term {name!r} takes the settings {list(keys)}, got {sorted(settings)}")
  return Term(name, float(weight), fn, needs, tuple(sorted(settings.items())))
