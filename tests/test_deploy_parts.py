"""The Flower apps' parts: settings, what travels for every method, the state dir, and the
engine's one-site round (a layout holding a subset of the sites)."""
import pytest

pytest.importorskip("flwr")

import dataclasses  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flower_helpers as fh  # noqa: E402
from helpers import build, flat  # noqa: E402
from lcfed_jax.data.device import stack_splits  # noqa: E402
from lcfed_jax.deploy import records, settings  # noqa: E402
from lcfed_jax.deploy.store import Store  # noqa: E402
from lcfed_jax.fed import server as servers, setup, sharding  # noqa: E402
from lcfed_jax.fed.methods import HC, METHODS, PCS  # noqa: E402
from lcfed_jax.util.errors import ConfigError, UserError  # noqa: E402


def test_config_and_overrides_as_launch_py_reads_them():
  c = settings.load_config(f"{fh.ROOT}/configs/synthetic.py:ft,tiny",
                           "rounds=3 data.train_sizes=(5,6) eval.plots=False learning_rate=0.5 model.norm=bn")
  assert (c.method, c.rounds, c.data.train_sizes, c.eval.plots, c.learning_rate, c.model.norm) == (
      "ft", 3, (5, 6), False, 0.5, "bn")
  with pytest.raises(ConfigError, match=r"config.model.nrom: no such setting"):
    settings.load_config(f"{fh.ROOT}/configs/synthetic.py", "model.nrom=bn")
  with pytest.raises(ConfigError, match=r"override rounds='x': expected a value like 20"):
    settings.load_config(f"{fh.ROOT}/configs/synthetic.py", "rounds=x")
  with pytest.raises(ConfigError, match=r"'config'='configs/nope.py': no such file"):
    settings.load_config("configs/nope.py")


@pytest.mark.parametrize("overrides,message", [
    ("method=local", "config.method='local' trains every site alone"),
    ("seeds=(0,1)", r"config.seeds=\(0, 1\): a Flower run trains one federation"),
    ("federated.opt_state=mean", "config.federated.opt_state='mean' averages optimizer state"),
])
def test_what_a_flower_run_cannot_do_is_one_clear_error(overrides, message):
  with pytest.raises(ConfigError, match=message):
    settings.check_deployable(settings.load_config(f"{fh.ROOT}/configs/synthetic.py", overrides))


def test_config_differences_name_the_key_and_spare_site_settings():
  a = settings.load_config(f"{fh.ROOT}/configs/synthetic.py")
  b = settings.load_config(f"{fh.ROOT}/configs/synthetic.py", "eval.batch_size=2 model.conv_impl=unroll "
                           "data_dir=/elsewhere lcfed.alpha=0.5")
  assert settings.differences(settings.config_json(a), settings.config_json(b)) == [
      "config.lcfed.alpha: 0.1 at the server, 0.5 at the site"]
  node = settings.NodeSettings.from_node_config({"site": "clinic_b"})
  assert node.site_index(["clinic_a", "clinic_b"]) == 1
  assert settings.NodeSettings.from_node_config({"partition-id": 1}).site_index(["a", "b"]) == 1
  with pytest.raises(ConfigError, match=r"site='clinic_z' is not a site of this task"):
    settings.NodeSettings.from_node_config({"site": "clinic_z"}).site_index(["clinic_a"])
  with pytest.raises(ConfigError, match=r"node config: 'site' is missing"):
    settings.NodeSettings.from_node_config({})


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"local"}))
def test_only_shared_leaves_and_needed_heads_travel(method):
  """For every method and stage: what a client sends is its shared leaves (when the stage
  aggregates) and its head (when the stage compares heads), never a leaf its personal
  patterns match otherwise, never HC or personal PCS."""
  config = settings.load_config(f"{fh.ROOT}/configs/synthetic.py:{method},tiny")
  exp = setup.build(config, 4, 3, 1, (32, 32, 3))
  paths = list(records.leaves(exp.masks.tree))
  personal = {p for p in paths if any(re.search(r, p) for r in exp.method.personal)}
  for stage in exp.stages:
    plan = records.plan(exp.masks, stage)
    heads = set(records.HEAD_PATHS) if "heads" in stage.needs else set()
    assert set(plan.up) == ((set(paths) - personal) if stage.server.averages else set()) | heads, stage.name
    for p in set(plan.up) - heads:
      assert p not in personal and not re.search(HC, p), (stage.name, p)
      assert not (re.search(PCS, p) and not config.lcfed.pcs_shared), (stage.name, p)
  if method == "lcfed":
    assert [records.plan(exp.masks, s).up for s in exp.stages][1] == records.HEAD_PATHS
  if method in ("ft", "fedbabu"):
    assert records.plan(exp.masks, exp.stages[1]).up == ()


def test_records_round_trip_exactly_and_shapes_are_checked():
  values = {"params/a/kernel": np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32),
            "batch_stats/b/mean": np.arange(5, dtype=np.float32), "x/count": np.asarray(7, np.int32)}
  from flwr.app import RecordDict
  from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
  wire = recorddict_from_proto(recorddict_to_proto(RecordDict({"u": records.to_record(values)})))
  back = records.from_record(wire["u"])
  assert back.keys() == values.keys() and all(
      np.array_equal(back[p], v) and back[p].dtype == v.dtype for p, v in values.items())
  records.check_shapes({"p": (1, 2)}, {"p": (1, 2)}, "site x")
  with pytest.raises(UserError, match=r"site x: parameter p has shape \(2, 1\) there, \(1, 2\) at the server"):
    records.check_shapes({"p": (1, 2)}, {"p": (2, 1)}, "site x")
  with pytest.raises(UserError, match=r"parameter q has shape None there"):
    records.check_shapes({"p": (1,), "q": (1,)}, {"p": (1,)}, "site x")


def _one_site_template(overrides=""):
  exp = setup.build(settings.load_config(f"{fh.ROOT}/configs/synthetic.py:lcfed,tiny", overrides), 2, 3, 1, (32, 32, 3))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:] if a.ndim else (), a.dtype),
                      exp.abstract_state())


def test_state_dir_round_trips_and_refuses_another_model(tmp_path):
  template = _one_site_template()
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), template)
  store = Store(tmp_path / "site")
  heads = {"kernel": np.ones((2, 1, 1, 4, 1), np.float32), "bias": np.zeros((2, 1), np.float32)}
  store.save(state, heads, {"run_id": 5, "site": "clinic_a"})
  saved = store.load(template)
  assert saved.meta == {"run_id": 5, "site": "clinic_a"} and np.array_equal(saved.heads["kernel"], heads["kernel"])
  assert all(np.array_equal(a, b) and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(saved.state), jax.tree.leaves(state)))
  store.snapshot()
  assert store.load(template, "selected.msgpack").meta["run_id"] == 5
  with pytest.raises(UserError, match=r"state.msgpack: params/down1/conv1/bias has shape \(1, 4\) float32, "
                                      r"this site's model \(1, 8\) float32"):
    store.load(_one_site_template("model.base=8"))
  aside = store.move_aside()
  assert (aside / "state.msgpack").exists() and store.load(template) is None


def test_a_one_site_round_is_that_site_of_the_federations_round():
  """LC-Fed's stage B (HC over every site's head, the site's own index) on a one-site
  layout, given the site index and every head, equals that site in the K-site round."""
  rc = fh.run_config("lcfed", "unused", "data.num_sites=2 data.train_sizes=(8,6) rounds=1 lcfed.hc_rounds=1")
  config = fh.config_of(rc)
  s = build(config)
  stage = dataclasses.replace(s.method.stages[1], server=servers.step("none"))
  full, losses, _ = s.exp.round_fn(stage)(s.fresh_state(), s.arrays, s.weights)
  one = setup.build(config, 2, 3, 1, s.data.train[0].images.shape[1:], sharding.single_device_layout(1))
  heads = {k: jnp.asarray(v) for k, v in s.state.params["head"].items()}
  want = flat(full.params)
  for k in range(2):
    row = jax.tree.map(lambda a: jnp.copy(a[k:k + 1]) if a.ndim else jnp.copy(a), s.state)
    new, loss, _ = one.round_fn(stage)(row, stack_splits([s.data.train[k]]), jnp.ones(1), k, heads)
    np.testing.assert_allclose(float(loss[0]), float(losses[k]), rtol=1e-5)
    got = flat(new.params)
    assert max(float(np.abs(got[p][0] - want[p][k]).max()) for p in want) < 1e-6
  row = jax.tree.map(lambda a: jnp.copy(a[:1]) if a.ndim else jnp.copy(a), s.state)
  with pytest.raises(ValueError, match="pass every site's head"):
    one.round_fn(stage)(row, stack_splits([s.data.train[0]]), jnp.ones(1), 0, None)
