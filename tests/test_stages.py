"""Stages that start from the selection of the stage before: LC-Fed's stage B runs from
each site's selected stage-A model with a fresh optimizer and a selection of its own,
reports the stage-A selection, resumes exactly and evaluates from its checkpoint."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from helpers import flat
from lcfed_jax.eval import selection
from lcfed_jax.fed import optim
from lcfed_jax.run import checkpoints as ckpt_lib, eval_checkpoint, tables, train
from lcfed_jax.util import files

QUIET = lambda *a, **k: None
STAGE_A, STAGE_B = 3, 2


def _config(hc_rounds=STAGE_B, **kw):
  return tiny_config("lcfed", rounds=STAGE_A, **{"lcfed.hc_rounds": hc_rounds, "checkpoint.keep": 20,
                                                 "log.tensorboard": False, **kw})


def _prefer_round_1(monkeypatch):
  """Stage A's selection takes round 1 (not its last round), whatever the scores, so
  starting from the selection and from the last round can be told apart."""
  decide = selection.Tracker.decide

  def rigged(self, round_, scores, output, per_site):
    if output == "probs" and round_ > 1:
      scores = np.full(len(scores), -np.inf)
    return decide(self, round_, scores, output, per_site)
  monkeypatch.setattr(selection.Tracker, "decide", rigged)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    _prefer_round_1(mp)
    full_dir = tmp_path_factory.mktemp("full")
    full = train.train_and_evaluate(_config(), str(full_dir), log=QUIET)
    res_dir = tmp_path_factory.mktemp("resumed")
    train.train_and_evaluate(_config(hc_rounds=0), str(res_dir), log=QUIET)   # stopped at the end of A
    resumed = train.train_and_evaluate(_config(), str(res_dir), log=QUIET)
    last_dir = tmp_path_factory.mktemp("last")
    last = train.train_and_evaluate(_config(**{"lcfed.hc_start": "last"}), str(last_dir), log=QUIET)
  return full_dir, full, res_dir, resumed, last_dir, last


def _state_at(workdir, step, like):
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    return ckpts.restore(step, ckpt_lib.abstract_like(abstract), items=("state",))["state"]
  finally:
    ckpts.close()


def _is_hc(path):
  return path.split("/")[0] == "hc"


def _split(params):
  leaves = flat(params)
  return ({p: v for p, v in leaves.items() if not _is_hc(p)}, {p: v for p, v in leaves.items() if _is_hc(p)})


def test_stage_b_starts_from_the_selected_stage_a_model(runs):
  full_dir, full = runs[:2]
  earlier = full["result"]["earlier_stages"]
  assert [e["stage"] for e in earlier] == ["A"] and set(earlier[0]["site_rounds"].values()) == {1}
  round1 = _state_at(full_dir, 1, full["state"])
  frozen, hc = _split(full["state"].params)
  frozen1, hc1 = _split(round1.params)
  for path in frozen:   # head, PCS and body never move in stage B
    np.testing.assert_array_equal(frozen[path], frozen1[path], err_msg=path)
  assert hc and all(not np.array_equal(hc[p], hc1[p]) for p in hc)
  counts = flat(optim.field(full["state"].opt_state, "count", full["state"].params))
  for path, c in counts.items():   # a fresh optimizer: only HC has stepped since
    assert np.all(c == (STAGE_B * 4 if _is_hc(path) else 0)), path
  assert set(full["result"]["site_rounds"].values()) <= set(range(STAGE_A + 1, STAGE_A + STAGE_B + 1))


def test_the_last_round_when_asked(runs):
  last_dir, last = runs[4:]
  assert "earlier_stages" not in last["result"]
  frozen, _ = _split(last["state"].params)
  frozen_a, _ = _split(_state_at(last_dir, STAGE_A, last["state"]).params)
  for path in frozen:
    np.testing.assert_array_equal(frozen[path], frozen_a[path], err_msg=path)


def test_the_stage_a_selection_is_reported_with_the_scores_it_had(runs):
  full_dir, full = runs[:2]
  e = full["result"]["earlier_stages"][0]
  record = next(r for r in files.read_jsonl(full_dir / "metrics.jsonl") if r["round"] == 1)
  assert e["sites"] == record["sites"] and e["mean"] == record["mean"] and e["std"] == record["std"]
  md = (full_dir / "results.md").read_text()
  assert "| lcfed (stage A) |" in md and "started from its selected model (round 1)" in md
  rows = tables.with_stage_rows({"lcfed": {0: full["result"]}})
  assert list(rows) == ["lcfed", "lcfed (stage A)"] and rows["lcfed (stage A)"][0]["mean"] == e["mean"]
  meta = ckpt_lib.Checkpoints(full_dir, read_only=True).read_meta()
  assert meta["earlier_stages"] == [[e]]


def test_a_run_stopped_at_the_end_of_stage_a_resumes_exactly(runs):
  full_dir, full, res_dir, resumed = runs[:4]
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["result"] == full["result"]
  assert files.read_jsonl(full_dir / "metrics.jsonl") == files.read_jsonl(res_dir / "metrics.jsonl")


def test_eval_repeats_the_results_and_the_stage_a_record(runs, tmp_path):
  full_dir, full = runs[:2]
  out = tmp_path / "eval"
  again = eval_checkpoint.evaluate_checkpoint(_config(**{"eval.out_dir": str(out)}), str(full_dir), log=QUIET)
  assert again["sites"] == full["result"]["sites"] and again["site_rounds"] == full["result"]["site_rounds"]
  assert again["earlier_stages"] == full["result"]["earlier_stages"]
  assert (out / "results.json").exists() and "| lcfed (stage A) |" in (out / "results.md").read_text()
