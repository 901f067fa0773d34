"""A method's stages laid end to end, and what passes from one stage to the next.

`Schedule` puts the stages on one global round counter (what a checkpoint stores).

A stage with `from_selected` (LC-Fed's stage B with `lcfed.hc_start='selected'`, as the
official `train_hc.py` runs it) does not continue from the last round of the stage
before it: every site starts from its model selected so far, with a fresh optimizer
state, and the stage keeps its own selection. The earlier selection is not lost: its
rounds and the test scores it had (read from the evaluation records of those rounds,
the very predictions that were logged) go into the checkpoint's metadata and every
result file as `earlier_stages`, so a full LC-Fed run also reports its stage-A model.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp

from lcfed_jax.eval import metrics
from lcfed_jax.fed.methods import Stage


@dataclasses.dataclass
class Schedule:
  stages: List[Stage]

  @property
  def total(self) -> int:
    return sum(s.rounds for s in self.stages)

  def spans(self):
    start = 0
    for s in self.stages:
      yield s, start, start + s.rounds
      start += s.rounds

  def stage_at(self, completed_rounds: int) -> Stage:
    """The stage whose output evaluation should read after `completed_rounds` rounds."""
    last = self.stages[0]
    for s, a, b in self.spans():
      if s.rounds and a < completed_rounds <= b:
        return s
      if s.rounds and b <= completed_rounds:
        last = s
    return last

  def previous(self, stage: Stage) -> Stage:
    """The last stage with rounds before `stage`."""
    before = [s for s, _, _ in self.spans() if s.rounds]
    return before[max(before.index(stage) - 1, 0)]


def fresh_opt_state(opt_state, zeros_like=jnp.zeros_like):
  """The optimizer state as at the start: every optimizer of `lcfed_jax.fed.optim` starts
  from zeros (moments, step counts, the zero_grad 'seen' flags). `zeros_like=np.zeros_like`
  keeps host arrays on the host (a Flower client's state)."""
  return jax.tree.map(zeros_like, opt_state)


@jax.jit
def _restart(state, tree):
  return state.replace(params=tree["params"], model_state=tree["model_state"],
                       opt_state=fresh_opt_state(state.opt_state))


def restart_from_selected(state, tree):
  """The state whose sites (and seeds) hold the selected model `tree` and a fresh
  optimizer state; the data keys and the round counter go on. Every array keeps the
  placement of the state it replaces (the compiled rounds expect it)."""
  new = _restart(state, tree)
  return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new, state)


def selected_result(history: Sequence[Dict], selection: Dict, site_names: Sequence[str],
                    stage: str) -> Dict:
  """The test scores of a selection, from the evaluation records of its rounds: each
  site's scores at its selected round, and their mean and std over sites."""
  by_round = {int(r["round"]): r for r in history}
  rounds = {s: int(selection["site_rounds"][s]) for s in site_names}
  missing = sorted({r for r in rounds.values() if r not in by_round})
  if missing:
    raise RuntimeError(f"stage {stage}: no evaluation record of the selected round(s) {missing}")
  sites = {s: dict(by_round[rounds[s]]["sites"][s]) for s in site_names}
  summary = metrics.summarize_sites({s: {"mean": sites[s]} for s in site_names})
  return {"stage": stage, "site_rounds": rounds, "site_outputs": dict(selection["site_outputs"]),
          "sites": sites, "mean": summary["mean"], "std": summary["std"]}
