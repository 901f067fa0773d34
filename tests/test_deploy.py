"""The Flower apps: what travels, faults, refusals, restarts (in one process, through
`inprocess.InProcessGrid`), and the same run through Flower's own Simulation Runtime."""
import pytest

pytest.importorskip("flwr")

import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

import flower_helpers as fh  # noqa: E402
from lcfed_jax.data import tasks  # noqa: E402
from lcfed_jax.deploy import records, site as site_lib  # noqa: E402
from lcfed_jax.fed import setup  # noqa: E402
from lcfed_jax.fed.methods import BN, HC, PCS  # noqa: E402
from lcfed_jax.util.errors import UserError  # noqa: E402

TWO = "data.num_sites=2 data.train_sizes=(6,6)"   # FT: the two sites select different rounds
SITES = ("clinic_a", "clinic_b", "clinic_c")
STAGE_A_ROUNDS = ("round 1", "round 2")    # fh.LCFED_AB: stage A's rounds, then stage B's


def _plans(rc):
  config = fh.config_of(rc)
  exp = setup.build(config, len(tasks.site_names(config)), 3, 1, (32, 32, 3))
  return exp, [records.plan(exp.masks, s) for s in exp.stages]


def _updates(grid):
  """(stage index or None, ArrayRecord keys) of every update the server received."""
  out = []
  for msg in grid.received:
    if msg.has_content() and "update" in msg.content:
      out.append((msg.metadata.message_type, msg.metadata.group_id, sorted(msg.content["update"].keys())))
  return out


def test_every_update_holds_only_its_stages_declared_paths(lcfed_flower):
  rc, grid = lcfed_flower
  exp, (plan_a, plan_b) = _plans(rc)
  updates = _updates(grid)
  assert {(t, g) for t, g, _ in updates} == {("train", "round 1"), ("train", "round 2"), ("query.sync", "stage B"),
                                             ("train", "round 3"), ("train", "round 4")}
  for kind, group, paths in updates:
    declared = plan_a.up if group in STAGE_A_ROUNDS else plan_b.up
    assert paths == sorted(declared), (kind, group)
    for p in paths:   # independent of the plan: what must never leave a site in LC-Fed
      assert not re.search(HC, p) and not re.search(PCS, p) and "opt_state" not in p, p
      assert p.startswith("params/") and (not p.startswith("params/head/") or group not in STAGE_A_ROUNDS), p
  # Stage A shares the body and nothing personal; stage B only the head HC compares.
  shared_a = {p for p, s in records.leaves(exp.masks.shared()).items() if s}
  assert set(plan_a.up) == shared_a and not any(p.startswith("params/head/") for p in plan_a.up)
  assert plan_b.up == records.HEAD_PATHS
  # The server never received a personal leaf's value: no reply carries any other array.
  for msg in grid.received:
    if msg.has_content():
      assert set(msg.content.array_records) <= {"update"}


def test_stage_b_starts_from_the_selected_stage_a_model(lcfed_flower):
  """results.json keeps stage A's selection and the test scores it had at its rounds
  (`earlier_stages`, as the simulation writes it); stage B selects among its own rounds."""
  rc, grid = lcfed_flower
  result = json.loads((fh.Path(rc["workdir"]) / "results.json").read_text())
  by_round = {r["round"]: r for r in fh.metrics(rc["workdir"])}
  (stage_a,) = result["earlier_stages"]
  assert stage_a["stage"] == "A" and stage_a["site_rounds"] == by_round[2]["selection"]["site_rounds"]
  for site in SITES:
    assert stage_a["sites"][site] == by_round[stage_a["site_rounds"][site]]["sites"][site], site
  assert "start_rounds" not in result and set(result["site_rounds"].values()) <= {3, 4}
  assert result["site_outputs"] == {site: "hc" for site in SITES}
  assert "| lcfed (stage A) |" in (fh.Path(rc["workdir"]) / "results.md").read_text()
  # Every site's HC saw the others' selected stage-A heads: the heads the server got at the
  # sync are theirs (frozen in stage B, so still the ones the clients hold).
  sent = [m for m in grid.received if m.metadata.group_id == "stage B"]
  heads = {m.metadata.src_node_id: records.from_record(m.content["update"]) for m in sent}
  a = fh.client_leaves(rc["workdir"], "clinic_a")
  assert np.array_equal(heads[1001]["params/head/kernel"], a["params/head/kernel"][0])


def test_a_restarted_client_goes_on_from_its_state_dir(lcfed_flower, tmp_path):
  """Every client restarts after stage A (new processes, new nodes): the server greets the
  new nodes, each goes on from its state dir (restoring its selected stage-A model with a
  fresh optimizer state for stage B), and the run ends exactly as without it."""
  rc0, _ = lcfed_flower
  rc = dict(rc0, workdir=str(tmp_path))
  grid = fh.make_grid(rc)
  restarted, synced = [], {}

  def restart_after_stage_a(reply, node):
    if reply.metadata.group_id == "evaluation 2" and node == 1003:   # the last reply of stage A
      restarted.append(node)
      fh.client_app.forget()      # the processes' memory is gone
      for n in list(grid.contexts):
        grid.restart(n)           # and the nodes are new
    if reply.metadata.group_id == "stage B":
      site = SITES[node - 1004]
      synced[site] = (fh.client_leaves(tmp_path, site), fh.client_leaves(tmp_path, site, "selected.msgpack"))
  grid.after.append(restart_after_stage_a)
  fh.run(rc, grid)
  assert restarted and set(grid.contexts) == {1004, 1005, 1006}
  for site, (now, chosen) in synced.items():   # at stage B's start
    opt = [p for p in now if p.startswith("opt_state/")]
    assert opt and not any(np.any(now[p]) for p in opt), site
    assert any(np.any(chosen[p]) for p in opt), site   # (stage A's momentum was not zero)
    assert all(np.array_equal(now[p], chosen[p]) for p in now if p.startswith("params/")), site
  assert sorted(synced) == list(SITES)
  assert fh.metrics(tmp_path) == [dict(r) for r in fh.metrics(rc0["workdir"])]
  for name in ("results.json", "results.csv"):
    assert (tmp_path / name).read_text() == (fh.Path(rc0["workdir"]) / name).read_text()
  for site in SITES:
    a, b = fh.client_leaves(tmp_path, site), fh.client_leaves(rc0["workdir"], site)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a), site


def test_flower_simulation_runtime_gives_the_inprocess_result(lcfed_flower, tmp_path):
  """LC-Fed's two stages through Flower's Simulation Runtime (Ray; the ClientApp in a worker
  process): exactly the in-process run's metrics, results and client states."""
  pytest.importorskip("ray")
  from flwr.simulation import run_simulation
  rc0, _ = lcfed_flower
  rc = dict(rc0, workdir=str(tmp_path))
  # Flower's Python simulation API passes no run config: the apps take it as defaults. A
  # node's site is its partition-id, its state dir <workdir>/clients/<site>. One worker
  # process (a client takes both CPUs) runs both sites' messages.
  run_simulation(fh.server_app.make_app(rc), fh.client_app.make_app(rc), num_supernodes=3,
                 backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}})
  assert fh.metrics(tmp_path) == fh.metrics(rc0["workdir"])
  assert (tmp_path / "results.json").read_text() == (fh.Path(rc0["workdir"]) / "results.json").read_text()
  for site in SITES:
    a, b = fh.client_leaves(tmp_path, site), fh.client_leaves(rc0["workdir"], site)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a), site


def test_ft_keeps_every_sites_best_round_and_scores_it(tmp_path):
  """FT's fine-tuning selects per site (here the sites choose different rounds); the final
  evaluation scores each site's model of its own selected round, kept by the client."""
  rc = fh.run_config("ft", tmp_path, f"{TWO} rounds=1 ft.rounds=1")
  fh.run(rc, fh.make_grid(rc, sites=2))
  records_ = {r["round"]: r for r in fh.metrics(tmp_path)}
  result = json.loads((tmp_path / "results.json").read_text())
  for site in ("clinic_a", "clinic_b"):
    better = records_[2]["val"]["sites"][site]["iou"] > records_[1]["val"]["sites"][site]["iou"]
    chosen = 2 if better else 1
    assert result["site_rounds"][site] == chosen, site
    assert result["sites"][site] == records_[chosen]["sites"][site], site
  assert len(set(result["site_rounds"].values())) == 2   # (else this run tests no per-site choice)


def test_dead_client_round_goes_on_with_min_clients_and_fedbn_norms_stay_home(tmp_path, caplog):
  rc = fh.run_config("fedbn", tmp_path, fh.SGD, **{"min-clients": 2})
  grid = fh.make_grid(rc)

  def die_in_round_2(msg, node):
    if msg.metadata.group_id == "round 2" and node == 1002:
      raise RuntimeError("killed")
  grid.hooks.append(die_in_round_2)
  caplog.set_level("INFO")
  fh.run(rc, grid)
  assert re.search(r"round 2 \(stage train\): site clinic_b: its ClientApp failed: RuntimeError: killed", caplog.text)
  assert "aggregated 2 sites" in caplog.text
  rounds = fh.metrics(tmp_path)
  assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["loss"][1] is None
  assert set(rounds[1]["sites"]) == {"clinic_a", "clinic_b", "clinic_c"} and "missing" not in rounds[1]
  # The mean of the two others reached clinic_b with its evaluation message; its norms stayed its own.
  b, c = fh.client_leaves(tmp_path, "clinic_b"), fh.client_leaves(tmp_path, "clinic_c")
  norms = [p for p in b if any(re.search(pattern, p) for pattern in BN)]
  shared = [p for p in b if p.startswith("params/") and p not in norms]
  assert norms and shared and all(np.array_equal(b[p], c[p]) for p in shared)
  assert not any(np.array_equal(b[p], c[p]) for p in norms)
  assert (tmp_path / "results.json").exists()
  # No update carried a norm or optimizer state.
  updates = _updates(grid)
  assert len(updates) == 5 and all(kind == "train" for kind, _, _ in updates)
  for _, _, paths in updates:
    assert paths and not any(re.search(pattern, p) for pattern in BN for p in paths)
    assert not any("opt_state" in p for p in paths)


def test_dead_client_stops_the_run_without_min_clients(tmp_path):
  rc = fh.run_config("fedbn", tmp_path, fh.SGD)
  grid = fh.make_grid(rc)
  grid.hooks.append(lambda msg, node: (_ for _ in ()).throw(RuntimeError("killed"))
                    if msg.metadata.group_id == "round 2" and node == 1002 else None)
  with pytest.raises(UserError, match=r"round 2 \(stage train\): 2 of 3 sites replied, fewer than "
                                      r"min-clients=3 \(site clinic_b: its ClientApp failed"):
    fh.run(rc, grid)


def test_a_site_whose_config_differs_is_refused_naming_the_key(tmp_path):
  rc = fh.run_config("fedbn", tmp_path, fh.SGD)
  nodes = [{"site": "0"}, {"site": "1"}, {"site": "2", "overrides": "model.base=8 eval.batch_size=4"}]
  with pytest.raises(UserError, match=r"site clinic_c refused: its config differs from the server's: "
                                      r"config.model.base: 4 at the server, 8 at the site$"):
    fh.run(rc, fh.make_grid(rc, node_configs=nodes))


def test_a_site_whose_shapes_differ_is_refused_naming_the_path(tmp_path, monkeypatch):
  real = site_lib.load_task

  def grey_at_site_2(config, sites):
    data = real(config, sites=sites)
    if 2 in sites:
      data.train[2].images = data.train[2].images[..., :1]
      data.test[2].images = data.test[2].images[..., :1]
    return data
  monkeypatch.setattr(site_lib, "load_task", grey_at_site_2)
  rc = fh.run_config("fedbn", tmp_path, fh.SGD)
  with pytest.raises(UserError, match=r"site clinic_c refused: parameter params/down1/conv1/kernel has "
                                      r"shape \(3, 3, 1, 4\) there, \(3, 3, 3, 4\) at the server"):
    fh.run(rc, fh.make_grid(rc))
