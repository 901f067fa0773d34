"""Flower runs of the tiny synthetic task in this process (`lcfed_jax.deploy.inprocess`)."""
import json
from pathlib import Path

import numpy as np
from flax import serialization

from lcfed_jax.deploy import client_app, inprocess, server_app
from lcfed_jax.deploy.settings import load_config

ROOT = Path(__file__).resolve().parents[1]
# Three small sites of one size: a client's round program is compiled for its training
# set's shape, so equal sites compile it once (tests/test_deploy_equality.py's FedAvg runs
# sites of unequal size, where the simulation pads them). No figures or event files (the
# server writes none of the latter).
BASE = "data.num_sites=3 data.train_sizes=(9,9,9) eval.plots=False log.tensorboard=False"
# SGD for the comparisons with the simulation: with instance norm a conv bias's gradient is
# zero up to round-off, which Adam's normalisation turns into steps of +-lr in arbitrary
# directions, in any two programs that sum in another order (the simulation's K-site round
# against one site's). SGD keeps such a leaf's change at round-off size, so every leaf is
# compared. At this tiny size the training is chaotic from a rate of about 0.02 on (a
# 1e-7 difference at the start of a round grew to 1e-5 at one site); at 0.01 the sites stay
# within round-off while a wrong round key or PCS code still changes the losses by 1e-4
# to 1e-2.
SGD = "optimizer.name=sgd learning_rate=0.01"
# LC-Fed's two stages, two rounds each (stage B selects among its own rounds).
LCFED_AB = f"{SGD} rounds=2 lcfed.hc_rounds=2"


def run_config(method: str, workdir, overrides: str = "", **extra):
  return {"config": f"{ROOT / 'configs' / 'synthetic.py'}:{method},tiny", "overrides": f"{BASE} {overrides}",
          "workdir": str(workdir), **extra}


def config_of(rc):
  return load_config(rc["config"], rc["overrides"])


def lcfed_run(workdir):
  """LC-Fed A + B through Flower (`LCFED_AB`, three sites): (run config, grid), every
  message the server received in `grid.received`."""
  rc = run_config("lcfed", workdir, LCFED_AB)
  return rc, run(rc, make_grid(rc))


def make_grid(rc, sites=3, node_configs=None, run_id=1):
  client_app.forget()   # every run starts with clients that hold nothing in memory
  nodes = node_configs if node_configs is not None else [{"site": str(k)} for k in range(sites)]
  return inprocess.InProcessGrid(client_app.make_app(), nodes, rc, run_id=run_id)


def run(rc, grid=None, log=None):
  grid = grid or make_grid(rc)
  inprocess.run(server_app.make_app(), grid, rc)
  return grid


def metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def client_leaves(workdir, site: str, which: str = "state.msgpack"):
  """{path: array} of a client's saved one-site state (paths as records.leaves names them)."""
  payload = serialization.msgpack_restore((Path(workdir) / "clients" / site / which).read_bytes())
  return {p: np.asarray(v) for p, v in payload["leaves"].items()}


def update_paths(grid, kind=None):
  """[(message type, sorted ArrayRecord keys)] of every update the server received."""
  out = []
  for msg in grid.received:
    if msg.has_content():
      for name, record in msg.content.array_records.items():
        out.append((msg.metadata.message_type, name, sorted(record.keys())))
  return out
