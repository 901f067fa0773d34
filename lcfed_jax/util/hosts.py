"""Host-level helpers for one process or many: global arrays built from process-local
blocks, and small host values (sizes, per-site metrics) gathered over processes.

They sit below both the data loaders and the federated core (`lcfed_jax.fed.sharding`
re-exports them), so the data never imports the layer that trains on it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding


def global_array(sharding: NamedSharding, shape, dtype, rows: Callable[[tuple], np.ndarray]) -> jax.Array:
  """A global array from process-local data: `rows(index)` returns the block at `index`
  (a tuple of slices) and is called only for this process's devices."""
  idx = sharding.addressable_devices_indices_map(tuple(shape))
  def block(i):
    a = np.asarray(rows(i), dtype)
    return a if a.flags.c_contiguous else a.copy()   # (np.ascontiguousarray makes 0-d 1-d)
  arrays = [jax.device_put(block(i), d) for d, i in idx.items()]
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def to_host(tree):
  """Global arrays -> NumPy on every process (an all-gather when not fully addressable)."""
  def leaf(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(leaf, tree)


def local_rows(a: jax.Array, keep: Optional[Sequence[int]] = None) -> Dict[int, np.ndarray]:
  """{site index: its row as NumPy} for the rows on this process's devices (`keep`: only
  those indices), read from the addressable shards alone: no cross-host traffic."""
  rows: Dict[int, np.ndarray] = {}
  keep = None if keep is None else {int(i) for i in keep}
  for shard in a.addressable_shards:     # replicas of a block are read once
    start = shard.index[0].start or 0
    wanted = [j for j in range(shard.data.shape[0])
              if start + j not in rows and (keep is None or start + j in keep)]
    if wanted:
      block = np.asarray(shard.data)
      rows.update({start + j: block[j] for j in wanted})
  return rows


def gather_objects(obj) -> List[Any]:
  """Every process's `obj` (picklable), in process order: small host-side values such as
  per-site metrics or sizes, which each process knows for its own sites only."""
  if jax.process_count() == 1:
    return [obj]
  import pickle
  from jax.experimental import multihost_utils
  payload = np.frombuffer(pickle.dumps(obj), np.uint8)
  # Sizes rounded up to a power of two: the all-gather compiles once per size, not per payload.
  n = 1 << int(global_max(payload.size + 8) - 1).bit_length()
  buf = np.zeros((n,), np.uint8)
  buf[:8] = np.frombuffer(np.int64(payload.size).tobytes(), np.uint8)
  buf[8:8 + payload.size] = payload
  everyone = np.asarray(multihost_utils.process_allgather(buf))   # [processes, n]
  out = []
  for row in everyone:
    size = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
    out.append(pickle.loads(row[8:8 + size].tobytes()))
  return out


def merge_sites(local: Dict[int, Any]) -> Dict[int, Any]:
  """{site index: value} known per process -> the union over processes (each site is held
  by exactly one process)."""
  merged: Dict[int, Any] = {}
  for part in gather_objects(dict(local)):
    merged.update(part)
  return merged


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def global_max(value: int) -> int:
  """The maximum of an integer over processes."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))
