"""The one engine: federated state with a site axis, one jitted round, one predictor.

A round is `server(scan(vmap(site_step), local_steps))`: every site's local steps run
in one `lax.scan` of a step mapped over the site axis, then the server step; the state
is donated, data stays on the device, and nothing leaves the device until the round
ends. What differs between methods arrives as a `Method`/`Stage` record
(`lcfed_jax.fed.methods`): its phases become static masks here, its loss terms and
server step are called as functions. The engine knows no method by name.

Both the round and the predictor run under `jax.shard_map` over the mesh axis 'sites'
of a `SiteLayout` (`lcfed_jax.fed.sharding`; default: the first device alone): each
device maps the site step over its own block of sites, the server's means are `psum`s,
and every site's head is gathered where a loss term or the output needs them (LC-Fed's
HC). The site axis may carry weightless padding sites past the model's `num_sites` real
ones; they use the model of site k % num_sites and are kept out of every sum by their
zero weight.

A layout may hold only some of the model's sites (`layout.num_sites < num_sites`): a
Flower client trains its own site k of a K-site federation alone. Its round and predictor
then take two more arguments, `first_site` (the model's index of the layout's first site,
so that site k keeps its PCS code and HC's own head) and `heads` (every site's head, which
the state cannot gather where a loss term or the output needs them; None elsewhere).

The round also reports, per site, whether its loss and its updated parameters are all
finite: a diverging site is found on the device, in the outputs the round returns anyway.

With `config.seeds`, S independent federations train in the same program: every state
leaf has a seed axis after the site axis ([K, S, ...], still sharded over the sites), and
the per-device round is `vmap`-ed over it. The server's sums and HC's head gathering are
collectives inside that `vmap`, so each seed averages and gathers within its own group;
the data arrays are not mapped, so every seed of a site reads the same copy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lcfed_jax.data.device import SiteArrays, sample_batch
from lcfed_jax.fed import optim, partition, programs, server, sharding as sharding_lib
from lcfed_jax.fed.losses import LossContext
from lcfed_jax.fed.methods import Method, Stage
from lcfed_jax.fed.sharding import AXIS


@flax.struct.dataclass
class FedState:
  """Everything per site carries a leading site axis K."""
  params: Any
  model_state: Any        # {'batch_stats': ...} for BN, else {}
  opt_state: Any          # optim.FreezableState: every leaf's own optimizer state
  rng: jax.Array          # [K, 2] uint32: each site's base key (round keys fold in the round)
  round: jax.Array        # int32 scalar: rounds completed (over all stages)


def init_state(model, optimizer, seed: int, num_sites: int, image_shape, same_init: bool = False,
               synced=(), optimizer_key=None) -> FedState:
  """Independent init per site (as the official code), or one init copied to all sites;
  leaves matching the `synced` patterns start as site 0's draw everywhere.

  One unmapped init is compiled and run per site (a vmapped init compiles several times
  slower), with the non-partitionable threefry, which XLA:CPU compiles about 2.5x faster
  for the model's many initializer shapes. Both programs are shared in the process
  (`programs`); the assembly's only where the caller names its optimizer by value
  (`optimizer_key`), as optax transformations compare by identity.
  """
  root = jax.random.PRNGKey(seed)
  init_key, data_key = jax.random.split(root)
  keys = jax.random.split(init_key, num_sites)
  shape = (1,) + tuple(int(s) for s in image_shape)
  init = programs.get(("init", model, shape), lambda: jax.jit(
      lambda k: model.init(k, jnp.zeros(shape, jnp.float32), 0, train=False)))
  with jax.threefry_partitionable(False):
    per_site = [init(keys[0] if same_init else keys[i]) for i in range(num_sites)]
  make = lambda: _assembly(optimizer, tuple(synced))
  assemble = make() if optimizer_key is None else programs.get(("assemble", optimizer_key, tuple(synced)), make)
  return assemble(per_site, data_key)


def _assembly(optimizer, synced):
  @jax.jit
  def assemble(per_site, data_key):   # one program, not one per leaf shape
    num_sites = len(per_site)
    variables = jax.tree.map(lambda *a: jnp.stack(a), *per_site)
    if synced:
      mask = partition.match_mask(variables, synced)
      variables = jax.tree.map(lambda a, m: jnp.broadcast_to(a[:1], a.shape) if m else a, variables, mask)
    params = variables["params"]
    return FedState(params=params, model_state={k: v for k, v in variables.items() if k != "params"},
                    opt_state=jax.vmap(optimizer.init)(params),
                    rng=jax.random.split(data_key, num_sites), round=jnp.zeros([], jnp.int32))
  return assemble


def unstacked(tree):
  return jax.tree.map(lambda a: a[0], tree)


@dataclasses.dataclass(frozen=True)
class Masks:
  """Static bool pytrees over {'params':..., **model_state} (one site's structure)."""
  tree: Any          # the structure (leaves: anything)
  personal: Any
  exclusive: Any

  @classmethod
  def build(cls, state: FedState, method: Method):
    tree = {"params": state.params, **state.model_state}   # paths only: any leaves
    if method.personal:
      partition.check_patterns_match(tree, method.personal, f"method {method.name!r} personal")
    return cls(jax.tree.map(lambda _: 0, tree), partition.match_mask(tree, method.personal),
               partition.match_mask(tree, method.exclusive))

  def shared(self):
    return partition.invert(self.personal)

  def trainable(self, entries) -> Any:
    """The union of a phase's entries (generic groups or regexes), over 'params'."""
    free = partition.invert(self.exclusive)
    generic = {"personal": partition.both(self.personal, free),
               "shared": partition.both(self.shared(), free), "all": free}
    out = jax.tree.map(lambda _: False, self.personal)
    for e in entries:
      if e in generic:
        part = generic[e]
      else:
        partition.check_patterns_match(self.tree, (e,), "phase")
        part = partition.match_mask(self.tree, (e,))
      out = jax.tree.map(lambda a, b: bool(a or b), out, part)
    return out["params"]


def _phase_table(stage: Stage, masks: Masks, local_steps: int):
  """Per leaf, a static bool per phase, and the phase boundaries in steps."""
  bounds, tables, used = [], [], 0
  for ph in stage.phases:
    n = local_steps - used if ph.steps is None else min(int(ph.steps), local_steps - used)
    used += n
    bounds.append(used)
    tables.append(masks.trainable(ph.train))
  table = jax.tree.map(lambda *flags: np.array(flags, bool), *tables)
  return np.array(bounds[:-1], np.int32), table


def _site_ids(num_local: int, num_sites: int, first_site=0):
  """Inside the shard_map: the model's site index of each local site (padding: k % K)."""
  first = first_site + lax.axis_index(AXIS) * num_local
  return (first + jnp.arange(num_local)) % num_sites


def _subset(layout, num_sites: int) -> bool:
  """Whether the layout holds only some of the model's sites (one Flower client's)."""
  return layout.num_sites < num_sites


def _heads(params, given, num_sites: int, subset: bool):
  """Every real site's head: gathered from the state, or given where the state holds a subset."""
  if not subset:
    return _all_heads(params, num_sites)
  if given is None:
    raise ValueError("this round or predictor holds a subset of the sites: pass every site's head "
                     "(`heads`), which its loss terms or output need")
  return dict(given)


def _all_heads(params, num_sites: int):
  """Every real site's head, gathered from all devices."""
  return jax.tree.map(lambda a: lax.all_gather(a, AXIS, tiled=True)[:num_sites], dict(params["head"]))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
                            if jnp.issubdtype(a.dtype, jnp.inexact)]))


def make_round_fn(model, stage: Stage, masks: Masks, config, num_sites: int,
                  layout: Optional[sharding_lib.SiteLayout] = None):
  """Returns jitted `round_fn(state, data: SiteArrays, weights) -> (state, losses[K], finite[K])`.

  `num_sites` is the number of real sites; the state, data and weights have
  `layout.num_total` sites on their leading axis, sharded over `layout.mesh`.
  `finite[k]` is False when site k's mean loss or any of its parameters is not finite.
  A layout holding a subset of the sites makes it `round_fn(state, data, weights,
  first_site, heads)` (module doc).
  """
  layout = layout or sharding_lib.single_device_layout(num_sites)
  subset = _subset(layout, num_sites)
  local_steps = int(config.local_steps)
  batch_size = int(config.batch_size)
  lr = float(stage.learning_rate if stage.learning_rate is not None else config.learning_rate)
  opt = optim.freezable(optim.make(config, lr), config.federated.frozen_adam)
  fixed_stream = bool(config.federated.fixed_stream)
  bounds, table = _phase_table(stage, masks, local_steps)
  needs = stage.needs
  shared = masks.shared()

  def loss_fn(params, model_state, x, y, site, heads, start, step):
    variables = {"params": params, **model_state}
    out, new_state = model.apply(variables, x, site, train=True, heads=heads, mutable=list(model_state))
    ctx = LossContext(model=model, variables=variables, out=out, y=y, site=site, start=start,
                      shared=shared["params"], step=step)
    return sum(t(ctx) for t in stage.loss), new_state

  def site_step(params, model_state, opt_state, key, site, step, start, data, heads):
    x, y = sample_batch(data.images, data.masks, data.counts, jax.random.fold_in(key, step), batch_size)
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, x, y, site, heads, start, step)
    phase = jnp.sum(step >= bounds) if len(bounds) else 0
    trainable = jax.tree.map(lambda t: jnp.asarray(t)[phase], table)
    updates, opt_state = opt.update(grads, opt_state, params, trainable=trainable)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, new_state, opt_state, loss

  mapped_step = jax.vmap(site_step, in_axes=(0, 0, 0, 0, 0, None, 0, 0, None))

  def local_round(state: FedState, data: SiteArrays, weights, first_site=0, given_heads=None):
    """One device's block of sites (the whole site axis on a 1-device mesh)."""
    sites = _site_ids(weights.shape[0], num_sites, first_site)
    round_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
        state.rng, 0 if fixed_stream else state.round)
    # Every site's head as it was at the start of the round (the official `seg_heads`).
    heads = _heads(state.params, given_heads, num_sites, subset) if "heads" in needs else None
    start = state.params if "start" in needs else None

    def body(carry, step):
      params, model_state, opt_state = carry
      params, model_state, opt_state, loss = mapped_step(
          params, model_state, opt_state, round_keys, sites, step, start, data, heads)
      return (params, model_state, opt_state), loss

    (params, model_state, opt_state), losses = lax.scan(
        body, (state.params, state.model_state, state.opt_state), jnp.arange(local_steps),
        unroll=max(int(config.model.scan_unroll), 1))
    loss = jnp.mean(losses, axis=0)
    finite = jnp.isfinite(loss) & jax.vmap(_all_finite)(params)
    tree = stage.server({"params": params, **model_state}, shared, weights, state.round, axis_name=AXIS)
    opt_state = _server_opt_state(opt_state, shared["params"], weights, stage, config, opt)
    new_state = state.replace(params=tree["params"],
                              model_state={k: v for k, v in tree.items() if k != "params"},
                              opt_state=opt_state, round=state.round + 1)
    return new_state, loss, finite

  body = _over_seeds(local_round, len(config.seeds), 2 if subset else 0)

  def round_fn(state: FedState, data: SiteArrays, weights):
    specs = layout.specs(state)
    return jax.shard_map(body, mesh=layout.mesh, in_specs=(specs, layout.specs(data), P(AXIS)),
                         out_specs=(specs, P(AXIS), P(AXIS)), check_vma=_check_vma(model))(state, data, weights)

  def subset_round_fn(state: FedState, data: SiteArrays, weights, first_site, heads):
    specs = layout.specs(state)
    replicated = jax.tree.map(lambda _: P(), heads)
    return jax.shard_map(body, mesh=layout.mesh, in_specs=(specs, layout.specs(data), P(AXIS), P(), replicated),
                         out_specs=(specs, P(AXIS), P(AXIS)), check_vma=_check_vma(model))(
                             state, data, weights, jnp.asarray(first_site, jnp.int32), heads)

  return jax.jit(subset_round_fn if subset else round_fn, donate_argnums=0)


def _check_vma(model) -> bool:
  """shard_map's check of which values vary over the mesh: off for the Pallas convolution,
  whose interpreter slices with indices the check takes as replicated (a JAX limitation)."""
  return getattr(model, "impl", "") != "pallas"


def _over_seeds(local_round, num_seeds: int, num_extra: int = 0):
  """The per-device round, mapped over the seed axis (1) of the state when there is one
  (`num_extra` more unmapped arguments: a subset layout's `first_site` and `heads`)."""
  if not num_seeds:
    return local_round
  axes = FedState(params=1, model_state=1, opt_state=1, rng=1, round=None)
  return jax.vmap(local_round, in_axes=(axes, None, None) + (None,) * num_extra, out_axes=(axes, 1, 1))


def _server_opt_state(opt_state, shared_params, weights, stage: Stage, config, opt):
  """'keep' (official: moments persist across rounds), 'mean' or 'reset' for shared leaves."""
  how = config.federated.opt_state
  if not stage.server.averages or how == "keep":
    return opt_state
  if how == "mean":
    def mean(s):
      return jax.tree.map(lambda a: server.aggregate(a, True, weights, axis_name=AXIS)
                          if jnp.issubdtype(a.dtype, jnp.inexact) else a, s)
    return optim.map_leaf_states(mean, opt_state, shared_params)
  return optim.map_leaf_states(lambda s: jax.tree.map(jnp.zeros_like, s), opt_state, shared_params)


def make_predict_fn(model, output: str, eval_batch: int, num_sites: int,
                    layout: Optional[sharding_lib.SiteLayout] = None, num_seeds: int = 0):
  """Jitted `predict(params, model_state, images[K,N,H,W,C] uint8) -> dict` of uint8
  binary predictions [K,N,H,W,nc] (threshold 0.5), probabilities, and HC peak maps
  ([K,S,N,...] with a seed axis). N must be a multiple of `eval_batch`. K is the
  layout's `num_total` (padding sites predict too; callers read the first num_sites).
  A layout holding a subset of the sites makes it `predict(params, model_state, images,
  first_site, heads)` (module doc; `heads` only for output 'hc')."""
  use_hc = output == "hc"
  layout = layout or sharding_lib.single_device_layout(num_sites)
  subset = _subset(layout, num_sites)

  def site_predict(params, model_state, site, images, heads):
    variables = {"params": params, **model_state}

    def batch(xb):
      out = model.apply(variables, xb.astype(jnp.float32) / 255.0, site, train=False,
                        heads=heads if use_hc else None)
      probs = out[output]
      peaks = out["peaks"] if use_hc else jnp.zeros_like(probs)
      return {"pred": (probs > 0.5).astype(jnp.uint8), "prob": probs, "peaks": peaks.astype(jnp.uint8)}

    n = images.shape[0]
    chunks = images.reshape((n // eval_batch, eval_batch) + images.shape[1:])
    out = lax.map(batch, chunks)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)

  def local_predict(params, model_state, images, first_site=0, given_heads=None):
    heads = _heads(params, given_heads, num_sites, subset) if use_hc else None
    return jax.vmap(site_predict, in_axes=(0, 0, 0, 0, None))(
        params, model_state, _site_ids(images.shape[0], num_sites, first_site), images, heads)

  extra = (None, None) if subset else ()
  body = jax.vmap(local_predict, in_axes=(1, 1, None) + extra, out_axes=1) if num_seeds else local_predict

  def predict(params, model_state, images):
    specs = (layout.specs(params), layout.specs(model_state), P(AXIS))
    return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=P(AXIS),
                         check_vma=_check_vma(model))(params, model_state, images)

  def subset_predict(params, model_state, images, first_site, heads):
    specs = (layout.specs(params), layout.specs(model_state), P(AXIS), P(), jax.tree.map(lambda _: P(), heads))
    return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=P(AXIS),
                         check_vma=_check_vma(model))(params, model_state, images,
                                                      jnp.asarray(first_site, jnp.int32), heads)

  return jax.jit(subset_predict if subset else predict)
