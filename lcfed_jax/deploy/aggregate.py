"""The method's server step on one round's replies.

The simulation applies `stage.server` to site-stacked trees inside its round; here the
same function gets the replying sites' shared leaves stacked on a site axis, as a
{path: array} tree, with the simulation's weights (`runner.site_weights`: uniform or by
training-set size). When some sites did not reply, the others' weights are renormalised
to sum to 1, as the weighted mean needs. A step whose output is the same for every site
(the mean) also reaches the sites that missed the round, with their next message; a step
that is per site (PRR-FL keeps each site's phase), or a round only one site replied to,
leaves them as they were.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Values = Dict[str, np.ndarray]


def site_weights(all_weights: Sequence[float], sites: Sequence[int]) -> np.ndarray:
  """The weights of `sites` (every site: unchanged; a subset: renormalised to sum 1)."""
  w = np.asarray(all_weights, np.float32)
  if len(sites) == len(w):
    return w
  part = w[list(sites)]
  return (part / part.sum()).astype(np.float32)


def apply(step, paths: Sequence[str], updates: Mapping[int, Mapping[str, np.ndarray]],
          all_weights: Sequence[float], round_index: int) -> Tuple[Dict[int, Values], Optional[Values]]:
  """({site: its shared leaves after the server step}, the output all sites share or None)."""
  sites = sorted(updates)
  tree = {p: jnp.asarray(np.stack([updates[k][p] for k in sites])) for p in paths}
  mask = {p: True for p in paths}
  out = step(tree, mask, jnp.asarray(site_weights(all_weights, sites)), jnp.asarray(round_index, jnp.int32))
  out = jax.tree.map(np.asarray, out)
  per_site = {k: {p: out[p][i] for p in paths} for i, k in enumerate(sites)}
  same = len(sites) > 1 and all(np.array_equal(out[p][0], out[p][i]) for p in paths for i in range(1, len(sites)))
  return per_site, (per_site[sites[0]] if same else None)
