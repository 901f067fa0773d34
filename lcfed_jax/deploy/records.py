"""Parameter paths <-> Flower records, and what travels in each stage.

A leaf is addressed by its path in `{'params': ..., **model_state}`
('params/down1/conv1/kernel', 'batch_stats/up1/norm2/mean'): the paths a method's
personal patterns match (`lcfed_jax.fed.partition`). An `ArrayRecord` holds one site's
leaves under those paths, without the site axis.

What travels in a stage (`Plan`):
  up    what a client sends after its local round: the leaves the method shares, when the
        stage's server step aggregates (FT's and FedBABU's fine-tuning and LC-Fed's stage B
        send none); plus the client's own head ('params/head/kernel', 'params/head/bias')
        when the stage's loss or output compares every site's head (LC-Fed's HC: its
        disagreement map applies all heads to a site's features, and the official code
        copies every head to every client). That head is the one personal leaf that leaves
        a site, and only in such stages.
  down  the server step's output for the site (its shared leaves), and every site's head
        where the stage needs them.
Never: optimizer state, HC, PCS where personal, FedBN's norms, Ditto's personal model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from lcfed_jax.fed import partition
from lcfed_jax.util.errors import UserError

HEAD_PATHS = ("params/head/kernel", "params/head/bias")


def variables(state) -> Dict:
  """The tree whose paths name the leaves: {'params', **model_state}."""
  return {"params": state.params, **state.model_state}


def leaves(tree) -> Dict[str, Any]:
  """{path: leaf} in tree order."""
  return {partition.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def site_row(state, paths: Sequence[str]) -> Dict[str, np.ndarray]:
  """The leaves at `paths` of a one-site state, without the site axis, on the host."""
  flat = leaves(variables(state))
  return {p: np.asarray(flat[p][0]) for p in paths}


def with_rows(state, values: Mapping[str, np.ndarray]):
  """The one-site state with the leaves at `values`' paths replaced (shapes checked)."""
  tree = variables(state)
  flat_paths = leaves(tree)
  unknown = sorted(set(values) - set(flat_paths))
  if unknown:
    raise UserError(f"no parameter at the paths {unknown[:3]} in this site's model")
  for p, v in values.items():
    if tuple(np.shape(v)) != tuple(flat_paths[p].shape[1:]):
      raise UserError(f"parameter {p}: shape {tuple(np.shape(v))} received, "
                      f"{tuple(flat_paths[p].shape[1:])} in this site's model")

  def leaf(path, a):
    p = partition.path_str(path)
    return jax.numpy.asarray(values[p], a.dtype)[None] if p in values else a
  new = jax.tree_util.tree_map_with_path(leaf, tree)
  return state.replace(params=new["params"], model_state={k: v for k, v in new.items() if k != "params"})


def _contiguous(a) -> np.ndarray:
  a = np.asarray(a)
  return a if a.flags.c_contiguous else a.copy()   # (np.ascontiguousarray makes 0-d 1-d)


def to_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
  return ArrayRecord({p: Array(_contiguous(v)) for p, v in values.items()})


def from_record(record: ArrayRecord) -> Dict[str, np.ndarray]:
  return {p: a.numpy() for p, a in record.items()}


def heads_record(heads: Sequence[Mapping[str, np.ndarray]]) -> ArrayRecord:
  """Every site's head ({'kernel', 'bias'} each, in site order) stacked on a site axis."""
  return to_record({name: np.stack([np.asarray(h[name]) for h in heads]) for name in ("kernel", "bias")})


def heads_from_record(record: ArrayRecord) -> Dict[str, np.ndarray]:
  return from_record(record)


def head_of(values: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """{'kernel', 'bias'} of a client's update that carries its head."""
  return {p.rsplit("/", 1)[1]: values[p] for p in HEAD_PATHS}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The paths of one stage's traffic (module doc)."""
  shared: Tuple[str, ...]     # what the server step reads (and sends back)
  heads: bool                 # every site's head travels
  up: Tuple[str, ...]         # exactly what a client's update holds

  @property
  def aggregates(self) -> bool:
    return bool(self.shared)


def plan(masks, stage) -> Plan:
  """What travels in `stage` of a method whose masks are `masks` (`engine.Masks`)."""
  shared_mask = leaves(masks.shared())
  shared = tuple(p for p, s in shared_mask.items() if s) if stage.server.averages else ()
  heads = "heads" in stage.needs
  return Plan(shared, heads, shared + (HEAD_PATHS if heads else ()))


def shapes(abstract_state, paths: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
  """{path: one site's shape} of the leaves at `paths` (an abstract or real state with a site axis)."""
  flat = leaves(variables(abstract_state))
  return {p: tuple(int(d) for d in flat[p].shape[1:]) for p in paths}


def shapes_record(shape_map: Mapping[str, Sequence[int]]) -> ConfigRecord:
  # An empty list is a valid ConfigRecord value; a scalar leaf's shape is [].
  return ConfigRecord({p: [int(d) for d in s] for p, s in shape_map.items()})


def shapes_from_record(record: ConfigRecord) -> Dict[str, Tuple[int, ...]]:
  return {p: tuple(int(d) for d in s) for p, s in record.items()}


def check_shapes(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]], who: str) -> None:
  """Raises a UserError naming the first path whose shape (or presence) differs."""
  for p in sorted(set(expected) | set(got)):
    a, b = expected.get(p), got.get(p)
    if a is None or b is None or tuple(a) != tuple(b):
      raise UserError(f"{who}: parameter {p} has shape {None if b is None else tuple(b)} there, "
                      f"{None if a is None else tuple(a)} at the server")
