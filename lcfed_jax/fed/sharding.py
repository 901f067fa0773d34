"""The site axis over a device mesh, on one host or many.

Every per-site array (the `FedState` leaves, the stacked data, the server weights) has a
leading site axis, sharded over the one mesh axis `sites` with
`NamedSharding(mesh, P('sites'))`; scalars (the round counter) are replicated. The round
runs under `jax.shard_map` (`lcfed_jax.engine`): each device runs the vmapped site step on
its own block of sites, and the server's weighted means are `psum`s over `sites`.

Site k lives on device k // per_device of the mesh (contiguous blocks, in
`mesh.devices` order; on several hosts `jax.devices()` lists each host's devices
together, so each host holds a contiguous range of sites). When the number of sites
does not divide the number of devices, weightless padding sites are appended (weight 0,
no data, parameters copied from real site k % K): they run the same step, are excluded
from every mean and from PRR-FL's divisor, and are stripped from losses, metrics,
selection, reports and checkpoints (a checkpoint holds the K real sites only, so it
restores on any device count).

Global arrays are always built from process-local pieces (`global_array`: one block per
addressable device, then `jax.make_array_from_single_device_arrays`), so the
single-process path runs the same code as a multi-host one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcfed_jax.util.errors import ConfigError
# Host-level helpers live below both this module and the data loaders; re-exported here
# for the callers that think of them as part of the layout.
from lcfed_jax.util.hosts import (barrier, gather_objects, global_array, global_max,  # noqa: F401
                                  local_rows, merge_sites, to_host)

AXIS = "sites"


def initialize_distributed(config=None, log=print) -> None:
  """`jax.distributed.initialize(...)` when `config.mesh.multihost` is set. Must run before
  any other JAX call. The coordinator address, process count and process id come from
  config.mesh.{coordinator_address, num_processes, process_id} when set, else from the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, else
  JAX detects them (Cloud TPU, Slurm, Open MPI, Kubernetes)."""
  mesh_cfg = config.mesh if config is not None else None
  if mesh_cfg is None or not bool(mesh_cfg.multihost):
    return
  if not jax.distributed.is_initialized():
    def setting(key, env, default, cast):
      value = mesh_cfg[key]
      if value == default and os.environ.get(env, ""):
        value, key = os.environ[env], f"${env}"
      if value == default:
        return None
      try:
        return cast(value)
      except ValueError:
        raise ConfigError(f"{key}={value!r}: expected {cast.__name__}") from None
    address = setting("coordinator_address", "JAX_COORDINATOR_ADDRESS", "", str)
    count = setting("num_processes", "JAX_NUM_PROCESSES", 0, int)
    pid = setting("process_id", "JAX_PROCESS_ID", -1, int)
    if count is not None and pid is not None and not 0 <= pid < count:
      raise ConfigError(f"process id {pid} is outside 0..{count - 1} (config.mesh.process_id / "
                        f"JAX_PROCESS_ID against config.mesh.num_processes / JAX_NUM_PROCESSES)")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
  log(f"multihost: process {jax.process_index()}/{jax.process_count()}, "
      f"{jax.local_device_count()} local of {jax.device_count()} devices")


def is_main_process() -> bool:
  return jax.process_index() == 0


def make_mesh(num_devices: int = 0, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh named 'sites' over the first `num_devices` devices (0: all, every host's)."""
  devices = list(devices if devices is not None else jax.devices())
  n = int(num_devices) or len(devices)
  if not 1 <= n <= len(devices):
    raise ConfigError(f"config.mesh.num_devices={num_devices}: {len(devices)} devices are available")
  if n < len(devices) and jax.process_count() > 1:
    raise ConfigError("config.mesh.num_devices must be 0 (all devices) on several hosts")
  return Mesh(np.array(devices[:n]), (AXIS,))


@dataclasses.dataclass(frozen=True)
class SiteLayout:
  """`num_sites` real sites padded to `num_total` (a multiple of the mesh size)."""
  mesh: Mesh
  num_sites: int

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  @property
  def per_device(self) -> int:
    return -(-self.num_sites // self.num_devices)

  @property
  def num_total(self) -> int:
    return self.per_device * self.num_devices

  @property
  def num_padding(self) -> int:
    return self.num_total - self.num_sites

  @property
  def site_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def source_site(self, i: int) -> int:
    """The real site a (possibly padding) site index copies: i for real sites."""
    return i % self.num_sites

  def local_sites(self) -> list:
    """The real sites whose rows live on this process's devices."""
    idx = self.site_sharding.addressable_devices_indices_map((self.num_total,))
    rows = sorted({i for sl in idx.values() for i in range(self.num_total)[sl[0]]})
    return [i for i in rows if i < self.num_sites]

  def describe(self) -> str:
    pad = f" (+{self.num_padding} padding)" if self.num_padding else ""
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"mesh: {self.num_devices} device{'s' if self.num_devices != 1 else ''} on '{AXIS}', "
            f"{self.num_sites} sites{pad}, {self.per_device} per device{hosts}")

  # ----------------------------------------------------------- placement
  def sharding_of(self, leaf) -> NamedSharding:
    return self.site_sharding if np.ndim(leaf) >= 1 else self.replicated

  def shardings(self, tree):
    return jax.tree.map(self.sharding_of, tree)

  def specs(self, tree):
    return jax.tree.map(lambda a: P(AXIS) if np.ndim(a) >= 1 else P(), tree)

  def weights(self, real_weights) -> jax.Array:
    """[num_total] server weights: the real sites' then zeros for padding."""
    w = np.zeros((self.num_total,), np.float32)
    w[:self.num_sites] = np.asarray(real_weights, np.float32)
    return global_array(self.site_sharding, w.shape, w.dtype, lambda sl: w[sl])

  def pad_host_tree(self, tree):
    """A host tree with K real sites on its leading axes -> padded global arrays
    (padding rows copy site k % K; scalars replicated). Every process passes the same
    values (e.g. the deterministic init); each puts only its own blocks on its devices."""
    src = np.array([self.source_site(i) for i in range(self.num_total)])

    def leaf(a):
      a = np.asarray(a)
      if a.ndim == 0:
        return global_array(self.replicated, a.shape, a.dtype, lambda sl: a)
      return global_array(self.site_sharding, (self.num_total,) + a.shape[1:], a.dtype,
                          lambda sl: a[src[sl[0]]])
    return jax.tree.map(leaf, tree)

  def pad(self, tree):
    """Global arrays with K real sites (any sharding) -> padded and site-sharded."""
    src = jnp.asarray([self.source_site(i) for i in range(self.num_total)])
    fn = jax.jit(lambda t: jax.tree.map(lambda a: a if a.ndim == 0 else jnp.take(a, src, axis=0), t),
                 out_shardings=self.shardings(tree))
    return fn(tree)

  def strip(self, tree):
    """Padded site-sharded tree -> the K real sites, replicated (what checkpoints hold:
    the same on any device count). With no padding the tree is returned as it is."""
    if not self.num_padding:
      return tree
    k = self.num_sites
    fn = jax.jit(lambda t: jax.tree.map(lambda a: a if a.ndim == 0 else a[:k], t),
                 out_shardings=jax.tree.map(lambda _: self.replicated, tree))
    return fn(tree)

  def abstract_real(self, shapes):
    """The restore target for a checkpoint (K real sites): site-sharded when K divides
    the mesh (no padding), else replicated (then `pad` reshards)."""
    sh = self.site_sharding if not self.num_padding else self.replicated
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sh if len(a.shape) else self.replicated), shapes)


def from_config(config, num_sites: int) -> SiteLayout:
  return SiteLayout(make_mesh(int(config.mesh.num_devices)), int(num_sites))


def single_device_layout(num_sites: int) -> SiteLayout:
  """The layout of the engine's default: one device (the first local), no padding."""
  return SiteLayout(make_mesh(1, jax.local_devices()[:1]), int(num_sites))
