"""Model selection: which round's model is reported (spec section 8).

`config.eval.selection`:
  'val'   (default) the round with the best mean IoU over sites on a validation split
          carved from each site's training data (`carve_validation`; those examples are
          removed from training);
  'test'  the paper's protocol: the best mean IoU on the test splits;
  'last'  the final round.

Ties keep the earliest round; a NaN score never wins. In a stage with
`per_site_selection` (FT's fine-tuning) every site keeps its own best round on its own
IoU, starting from the model selected before that stage, so the reported model is a
per-site mix of rounds. `Tracker` holds the selected parameters on the device (a
select along the site axis) and its bookkeeping goes into every checkpoint, so a
resumed run selects exactly what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lcfed_jax.fed import sharding as sharding_lib
from lcfed_jax.data.types import SiteSplit
from lcfed_jax.util.errors import ConfigError

def _take(split: SiteSplit, idx: np.ndarray) -> SiteSplit:
  opt = lambda a: None if a is None else a[idx]
  return SiteSplit(split.images[idx], split.masks[idx], [split.names[i] for i in idx],
                   opt(split.volume_ids), opt(split.slice_index))


def carve_validation(train: List[Optional[SiteSplit]], fraction: float, seed: int
                     ) -> Tuple[List[Optional[SiteSplit]], List[Optional[SiteSplit]]]:
  """(train without val, val) per site: `fraction` of the examples (of the volumes for
  volume tasks, so a case is never split), at least one, drawn by `seed` and the site index.
  Index order is kept inside both parts. Sites not held here (None) stay None."""
  new_train, val = [], []
  for k, split in enumerate(train):
    if split is None:
      new_train.append(None)
      val.append(None)
      continue
    groups = split.volume_ids if split.volume_ids is not None else np.arange(len(split))
    units = np.unique(groups)
    if len(units) < 2:
      raise ConfigError(f"config.eval.selection='val': site {k} has {len(units)} training "
                        f"{'volume' if split.volume_ids is not None else 'example'}(s); "
                        f"need at least 2 to carve a validation split (or use selection='test')")
    n_val = min(max(1, int(round(fraction * len(units)))), len(units) - 1)
    rng = np.random.default_rng([int(seed), k])
    val_units = rng.permutation(units)[:n_val]
    is_val = np.isin(groups, val_units)
    new_train.append(_take(split, np.flatnonzero(~is_val)))
    val.append(_take(split, np.flatnonzero(is_val)))
  return new_train, val


@jax.jit
def _select_sites(take, new, old):
  """Per site (leading axis), `new` where take[k] else `old`; always fresh buffers."""
  def pick(n, o):
    t = take.reshape(take.shape + (1,) * (n.ndim - 1))
    return jnp.where(t, n, o)
  return jax.tree.map(pick, new, old)


def model_tree(state) -> Dict:
  return {"params": state.params, "model_state": state.model_state}


class Tracker:
  """The selected model so far: per site its round, score, output and parameters."""

  def __init__(self, policy_name: str, site_names: List[str]):
    self.policy = policy_name
    self.site_names = list(site_names)
    k = len(site_names)
    self.rounds = [0] * k
    self.scores = [float("-inf")] * k
    self.outputs = ["probs"] * k
    self.tree = None     # {'params', 'model_state'} with the site axis, on the device

  # --- bookkeeping that goes into the checkpoint's JSON item ---
  def to_json(self) -> Dict:
    return {"policy": self.policy, "site_rounds": dict(zip(self.site_names, self.rounds)),
            "site_scores": dict(zip(self.site_names, [_finite(s) for s in self.scores])),
            "site_outputs": dict(zip(self.site_names, self.outputs)),
            "best_round": self.best_round, "score": _finite(self.mean_score)}

  def load_json(self, d: Dict, tree) -> None:
    self.rounds = [int(d["site_rounds"][s]) for s in self.site_names]
    self.scores = [float("-inf") if d["site_scores"][s] is None else float(d["site_scores"][s])
                   for s in self.site_names]
    self.outputs = [d["site_outputs"][s] for s in self.site_names]
    self.tree = tree

  @property
  def has_selection(self) -> bool:
    return self.tree is not None

  @property
  def mean_score(self) -> float:
    return float(np.mean(self.scores))

  @property
  def best_round(self) -> Optional[int]:
    """The round all sites share, or None for a per-site mix (or nothing yet)."""
    if self.tree is None:
      return None
    return self.rounds[0] if len(set(self.rounds)) == 1 else None

  def selected_steps(self) -> set:
    return set(self.rounds) if self.tree is not None else set()

  # --- the decision ---
  def update(self, state, round_: int, site_scores: np.ndarray, output: str, per_site: bool) -> bool:
    """Offers round `round_` (per-site IoU on the selection split). Returns whether
    anything was selected from it."""
    scores = np.asarray(site_scores, np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)   # NaN never wins
    k = len(self.site_names)
    if self.policy == "last" or self.tree is None:
      take = np.ones(k, bool)
    elif per_site:
      take = scores > np.asarray(self.scores)
    else:
      take = np.full(k, bool(np.mean(scores) > self.mean_score))
    if not take.any():
      return False
    new = model_tree(state)
    old = new if self.tree is None else self.tree
    # Padding sites past the k real ones (lcfed_jax.fed.sharding) follow their source site k % K.
    n = jax.tree.leaves(new)[0].shape[0]
    self.tree = _select_sites(jnp.asarray(take[np.arange(n) % k]), new, old)
    for i in np.flatnonzero(take):
      self.rounds[i], self.scores[i], self.outputs[i] = int(round_), float(scores[i]), output
    return True


def _finite(x: float):
  return float(x) if np.isfinite(x) else None


def predict_selected(get_predictor, tree: Dict, site_outputs: List[str], images,
                     num_sites: int, keys=("pred",)) -> Dict[str, Dict[int, np.ndarray]]:
  """Predictions of the selected model, every site through its own round's output
  ('probs' or 'hc'): {key: {site: host rows}} for the real sites on this process."""
  local = {}
  for o in sorted(set(site_outputs)):
    out = get_predictor(o)(tree["params"], tree["model_state"], images)
    mine = [k for k in range(num_sites) if site_outputs[k] == o]
    for key in keys:
      local.setdefault(key, {}).update(sharding_lib.local_rows(out[key], mine))
  return local
