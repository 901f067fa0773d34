"""The Flower apps through Flower's own Simulation Runtime (Ray, a process per worker):
the same results as through the in-process grid the other tests use."""
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import numpy as np  # noqa: E402

import flower_helpers as fh  # noqa: E402
from lcfed_jax.deploy import client_app, server_app  # noqa: E402

TWO = "data.num_sites=2 data.train_sizes=(8,6) rounds=1"


def test_flower_simulation_runtime_equals_the_inprocess_grid(tmp_path):
  from flwr.simulation import run_simulation
  rc = fh.run_config("fedavg", tmp_path / "ray", f"{fh.SGD} {TWO}")
  reference = dict(rc, workdir=str(tmp_path / "inprocess"))
  fh.run(reference, fh.make_grid(reference, sites=2))   # first: its programs fill the compilation cache
  # Flower's Python simulation API passes no run config: the apps take it as defaults.
  # A node's site is its partition-id; its state dir <workdir>/clients/<site>. One worker
  # process (a client takes both CPUs) runs both sites' messages.
  run_simulation(server_app.make_app(rc), client_app.make_app(rc), num_supernodes=2,
                 backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}})

  ray, mine = fh.metrics(tmp_path / "ray"), fh.metrics(tmp_path / "inprocess")
  assert [r["round"] for r in ray] == [1]
  assert ray == mine
  assert (tmp_path / "ray" / "results.json").read_text() == (tmp_path / "inprocess" / "results.json").read_text()
  for site in ("clinic_a", "clinic_b"):
    a, b = fh.client_leaves(tmp_path / "ray", site), fh.client_leaves(tmp_path / "inprocess", site)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a), site
