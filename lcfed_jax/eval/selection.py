"""Model selection: which round's model is reported.

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
  """Per site (and seed: `take` [K] or [K, S] over the leading axes), `new` where take
  else `old`; always fresh buffers."""
  def pick(n, o):
    t = take.reshape(take.shape + (1,) * (n.ndim - take.ndim))
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
    self.chosen = False
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
    self.chosen = True
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
    if not self.chosen:
      return None
    return self.rounds[0] if len(set(self.rounds)) == 1 else None

  def selected_steps(self) -> set:
    return set(self.rounds) if self.chosen else set()

  # --- the decision ---
  def decide(self, round_: int, site_scores, output: str, per_site: bool) -> np.ndarray:
    """Which sites take round `round_` (per-site IoU on the selection split); the
    bookkeeping is updated, the parameters are not."""
    scores = np.asarray(site_scores, np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)   # NaN never wins
    k = len(self.site_names)
    if self.policy == "last" or not self.chosen:
      take = np.ones(k, bool)
    elif per_site:
      take = scores > np.asarray(self.scores)
    else:
      take = np.full(k, bool(np.mean(scores) > self.mean_score))
    for i in np.flatnonzero(take):
      self.rounds[i], self.scores[i], self.outputs[i] = int(round_), float(scores[i]), output
    self.chosen = True
    return take

  def update(self, state, round_: int, site_scores, output: str, per_site: bool) -> bool:
    """Offers round `round_`. Returns whether anything was selected from it."""
    take = self.decide(round_, site_scores, output, per_site)
    if take.any():
      self.tree = select(self.tree, state, take)
    return bool(take.any())


def select(tree, state, take: np.ndarray):
  """`tree` with the sites (and seeds) where `take` [K] (or [K, S]) replaced by the
  state's. Padding sites past the K real ones follow their source site k % K."""
  new = model_tree(state)
  old = new if tree is None else tree
  k = take.shape[0]
  n = jax.tree.leaves(new)[0].shape[0]
  return _select_sites(jnp.asarray(take[np.arange(n) % k]), new, old)


class SeedTrackers:
  """One `Tracker`'s bookkeeping per seed of the replica axis, one selected tree
  [K, S, ...] for all: the same interface as `Tracker`, with per-seed lists."""

  def __init__(self, policy_name: str, site_names: List[str], seeds):
    self.seeds = list(seeds)
    self.trackers = [Tracker(policy_name, site_names) for _ in self.seeds]
    self.tree = None

  def to_json(self) -> Dict:
    return {"seeds": {str(s): t.to_json() for s, t in zip(self.seeds, self.trackers)}}

  def load_json(self, d: Dict, tree) -> None:
    for s, t in zip(self.seeds, self.trackers):
      t.load_json(d["seeds"][str(s)], None)
    self.tree = tree

  @property
  def has_selection(self) -> bool:
    return self.tree is not None

  @property
  def outputs(self):
    return [t.outputs for t in self.trackers]

  def selected_steps(self) -> set:
    return set().union(*(t.selected_steps() for t in self.trackers))

  def update(self, state, round_: int, site_scores, output: str, per_site: bool) -> bool:
    """`site_scores`: one list of per-site scores per seed."""
    take = np.stack([t.decide(round_, sc, output, per_site) for t, sc in zip(self.trackers, site_scores)], 1)
    if take.any():
      self.tree = select(self.tree, state, take)
    return bool(take.any())


def make_tracker(policy_name: str, site_names: List[str], seeds=()):
  return SeedTrackers(policy_name, site_names, seeds) if seeds else Tracker(policy_name, site_names)


def _finite(x: float):
  return float(x) if np.isfinite(x) else None


def predict_selected(get_predictor, tree: Dict, site_outputs, images, num_sites: int,
                     keys=("pred",)) -> Dict[str, Dict[int, np.ndarray]]:
  """Predictions of the selected model, every site through its own round's output
  ('probs' or 'hc'): {key: {site: host rows}} for the real sites on this process. With a
  seed axis `site_outputs` holds one list per seed, and every row is [S, N, ...]."""
  per_seed = bool(site_outputs) and isinstance(site_outputs[0], (list, tuple))
  table = np.array(site_outputs if per_seed else [site_outputs], dtype=object)   # [S, K]
  local: Dict[str, Dict[int, np.ndarray]] = {}
  for o in sorted(set(table.ravel())):
    out = get_predictor(o)(tree["params"], tree["model_state"], images)
    mine = [k for k in range(num_sites) if (table[:, k] == o).any()]
    for key in keys:
      rows = sharding_lib.local_rows(out[key], mine)
      for k, row in rows.items():
        if not per_seed:
          local.setdefault(key, {})[k] = row
          continue
        into = local.setdefault(key, {}).setdefault(k, np.zeros_like(row))
        for s in np.flatnonzero(table[:, k] == o):
          into[s] = row[s]
  return local
