"""The one engine: federated state with a site axis, one jitted round, one predictor.

A round is `server(scan(vmap(site_step), local_steps))`: every site's local steps run
in one `lax.scan` of a step mapped over the site axis, then the server step; the state
is donated, data stays on the device, and nothing leaves the device until the round
ends. What differs between methods arrives as a `Method`/`Stage` record
(`lcfed_jax.methods`) and is turned into static masks here.

Both the round and the predictor run under `jax.shard_map` over the mesh axis 'sites'
of a `SiteLayout` (`lcfed_jax.sharding`; default: the first device alone): each device
maps the site step over its own block of sites, the server's means are `psum`s, and
HC gathers every site's head. The site axis may carry weightless padding sites past
the model's `num_sites` real ones; they use the model of site k % num_sites and are
kept out of every sum by their zero weight.
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

from lcfed_jax import partition, server
from lcfed_jax import sharding as sharding_lib
from lcfed_jax.sharding import AXIS
from lcfed_jax.conv import default_impl
from lcfed_jax.data.device import SiteArrays, sample_batch
from lcfed_jax.losses import dice_loss
from lcfed_jax.methods import HC, Method, Stage
from lcfed_jax.models.unet import SegModel
from lcfed_jax.optim import AdamState, adam_init, adam_update


@flax.struct.dataclass
class FedState:
  """Everything per site carries a leading site axis K."""
  params: Any
  model_state: Any        # {'batch_stats': ...} for BN, else {}
  opt_state: AdamState
  rng: jax.Array          # [K, 2] uint32: each site's base key (round keys fold in the round)
  round: jax.Array        # int32 scalar: rounds completed (over all stages)


def compute_dtype(config):
  name = config.model.dtype
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def conv_impl(config):
  impl = config.model.conv_impl
  return default_impl() if impl == "auto" else impl


def build_model(config, method: Method, num_sites: int, in_channels: int, num_classes: int) -> SegModel:
  c = config.lcfed
  return SegModel(num_classes=num_classes, base=int(config.model.base),
                  norm=method.norm or config.model.norm, num_sites=num_sites,
                  pcs=method.pcs, pcs_n=int(c.pcs_n), pcs_pool=c.pcs_pool, hc=method.hc,
                  hc_official_no_eps=bool(c.hc_official_no_eps),
                  impl=conv_impl(config), dtype=compute_dtype(config))


def _dummy_heads(model: SegModel, num_sites: int):
  return {"kernel": jnp.zeros((num_sites, 1, 1, model.base * 2, model.num_classes)),
          "bias": jnp.zeros((num_sites, model.num_classes))}


def init_state(model: SegModel, seed: int, num_sites: int, image_shape, same_init: bool = False) -> FedState:
  """Independent init per site (as the official code), or one init copied to all sites.

  The unmapped init is compiled once and run per site: a vmapped init compiles 3x
  slower (performance notes) and runs once per experiment.
  """
  root = jax.random.PRNGKey(seed)
  init_key, data_key = jax.random.split(root)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  heads = _dummy_heads(model, num_sites) if model.hc else None
  init = jax.jit(lambda k: model.init(k, x, 0, train=False, heads=heads))
  keys = jax.random.split(init_key, num_sites)
  per_site = [init(keys[0] if same_init else keys[i]) for i in range(num_sites)]
  variables = jax.tree.map(lambda *a: jnp.stack(a), *per_site)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  opt_state = jax.vmap(adam_init)(params)
  return FedState(params=params, model_state=model_state, opt_state=opt_state,
                  rng=jax.random.split(data_key, num_sites), round=jnp.zeros([], jnp.int32))


def unstacked(tree):
  return jax.tree.map(lambda a: a[0], tree)


@dataclasses.dataclass(frozen=True)
class Masks:
  """Static bool pytrees over {'params':..., **model_state} (one site's structure)."""
  personal: Any
  hc: Any

  @classmethod
  def build(cls, state: FedState, method: Method):
    tree = {"params": unstacked(state.params), **unstacked(state.model_state)}
    if method.personal:
      partition.check_patterns_match(tree, method.personal, f"method {method.name!r} personal")
    return cls(partition.match_mask(tree, method.personal), partition.match_mask(tree, (HC,)))

  def shared(self):
    return partition.invert(self.personal)

  def group(self, name: str):
    """A trainable group (methods module doc), restricted to 'params'."""
    not_hc = partition.invert(self.hc)
    tree = {"personal": partition.both(self.personal, not_hc),
            "shared": partition.both(self.shared(), not_hc),
            "all": not_hc, "hc": self.hc}[name]
    return tree["params"]


def _phase_table(stage: Stage, masks: Masks, local_steps: int):
  """Per leaf, a static bool per phase, and the phase boundaries in steps."""
  bounds, tables, used = [], [], 0
  for i, ph in enumerate(stage.phases):
    n = local_steps - used if ph.steps is None else min(int(ph.steps), local_steps - used)
    used += n
    bounds.append(used)
    group = masks.group(ph.train)
    if stage.hc_joint:
      group = jax.tree.map(lambda g, h: bool(g or h), group, masks.hc["params"])
    tables.append(group)
  table = jax.tree.map(lambda *flags: np.array(flags, bool), *tables)
  return np.array(bounds[:-1], np.int32), table


def _site_ids(num_local: int, num_sites: int):
  """Inside the shard_map: the model's site index of each local site (padding: k % K)."""
  first = lax.axis_index(AXIS) * num_local
  return (first + jnp.arange(num_local)) % num_sites


def _all_heads(params, num_sites: int):
  """Every real site's head, gathered from all devices (HC needs them all)."""
  return jax.tree.map(lambda a: lax.all_gather(a, AXIS, tiled=True)[:num_sites], dict(params["head"]))


def make_round_fn(model: SegModel, stage: Stage, masks: Masks, config, num_sites: int,
                  layout: Optional[sharding_lib.SiteLayout] = None):
  """Returns jitted `round_fn(state, data: SiteArrays, weights) -> (state, losses[K_total])`.

  `num_sites` is the number of real sites; the state, data and weights have
  `layout.num_total` sites on their leading axis, sharded over `layout.mesh`.
  """
  layout = layout or sharding_lib.single_device_layout(num_sites)
  local_steps = int(config.local_steps)
  scan_unroll = _scan_unroll(config)
  batch_size = int(config.batch_size)
  lr = float(stage.learning_rate if stage.learning_rate is not None else config.learning_rate)
  frozen = config.federated.frozen_adam
  adam = config.adam
  fixed_stream = bool(config.federated.fixed_stream)
  bounds, table = _phase_table(stage, masks, local_steps)
  needs_heads = model.hc and (stage.loss == "hc" or stage.hc_joint)
  shared = masks.shared()
  pr = config.prrfl

  def loss_fn(params, model_state, x, y, site, heads):
    variables = {"params": params, **model_state}
    out, new_state = model.apply(variables, x, site, train=True, heads=heads,
                                 mutable=list(model_state.keys()))
    if stage.loss == "hc":
      return dice_loss(out["hc"], y), new_state
    loss = dice_loss(out["probs"], y)
    if stage.contrastive:
      loss = loss + stage.contrastive * model.apply(variables, out["pcs_in"], site,
                                                    method=SegModel.contrastive)
    if stage.hc_joint:
      loss = loss + dice_loss(out["hc"], y)
    return loss, new_state

  def site_step(params, model_state, opt_state, key, site, step, images, masks_, count, heads):
    x, y = sample_batch(images, masks_, count, jax.random.fold_in(key, step), batch_size)
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, x, y, site, heads)
    phase = jnp.sum(step >= bounds) if len(bounds) else 0
    trainable = jax.tree.map(lambda t: jnp.asarray(t)[phase], table)
    params, opt_state = adam_update(grads, opt_state, params, trainable, lr, frozen=frozen,
                                   b1=adam.b1, b2=adam.b2, eps=adam.eps)
    return params, new_state, opt_state, loss

  mapped_step = jax.vmap(site_step, in_axes=(0, 0, 0, 0, 0, None, 0, 0, 0, None))

  def local_round(state: FedState, data: SiteArrays, weights):
    """One device's block of sites (the whole site axis on a 1-device mesh)."""
    sites = _site_ids(weights.shape[0], num_sites)
    round_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
        state.rng, 0 if fixed_stream else state.round)
    # Every site's head as it was at the start of the round (the official `seg_heads`).
    heads = _all_heads(state.params, num_sites) if needs_heads else None

    def body(carry, step):
      params, model_state, opt_state = carry
      params, model_state, opt_state, loss = mapped_step(
          params, model_state, opt_state, round_keys, sites, step,
          data.images, data.masks, data.counts, heads)
      return (params, model_state, opt_state), loss

    (params, model_state, opt_state), losses = lax.scan(
        body, (state.params, state.model_state, state.opt_state), jnp.arange(local_steps),
        unroll=scan_unroll)
    tree = {"params": params, **model_state}
    if stage.server == "mean":
      tree = server.aggregate(tree, shared, weights, axis_name=AXIS)
    elif stage.server == "fourier":
      frac = server.prrfl_fraction(state.round, pr.l0, pr.slope, pr.period, pr.cap)
      tree = server.fourier_aggregate(tree, shared, weights, frac, pr.official_divisor, axis_name=AXIS)
    opt_state = _server_opt_state(opt_state, shared["params"], weights, stage, config)
    new_state = state.replace(params=tree["params"],
                              model_state={k: v for k, v in tree.items() if k != "params"},
                              opt_state=opt_state, round=state.round + 1)
    return new_state, jnp.mean(losses, axis=0)

  def round_fn(state: FedState, data: SiteArrays, weights):
    specs = layout.specs(state)
    return jax.shard_map(local_round, mesh=layout.mesh, in_specs=(specs, layout.specs(data), P(AXIS)),
                         out_specs=(specs, P(AXIS)))(state, data, weights)

  return jax.jit(round_fn, donate_argnums=0)


def _scan_unroll(config) -> int:
  """How many local steps one iteration of the scan's loop holds (config.model.scan_unroll).

  0 (auto): 1 (a rolled loop) on GPU/TPU; on CPU the whole round unrolled up to 16 steps,
  since XLA:CPU runs convolutions inside a `while` body several times slower than outside
  (bench/README.md).
  """
  u = int(config.model.get("scan_unroll", 0))
  if u <= 0:
    steps = int(config.local_steps)
    return steps if jax.default_backend() == "cpu" and steps <= 16 else 1
  return int(u)


def _server_opt_state(opt_state: AdamState, shared_params, weights, stage: Stage, config):
  """'keep' (official: moments persist across rounds), 'mean' or 'reset' for shared leaves."""
  how = config.federated.opt_state
  if stage.server == "none" or how == "keep":
    return opt_state
  if how == "mean":
    return AdamState(server.aggregate(opt_state.mu, shared_params, weights, axis_name=AXIS),
                     server.aggregate(opt_state.nu, shared_params, weights, axis_name=AXIS),
                     opt_state.count)
  zero = lambda t: jax.tree.map(lambda a, s: jnp.zeros_like(a) if s else a, t, shared_params)
  return AdamState(zero(opt_state.mu), zero(opt_state.nu), zero(opt_state.count))


def make_predict_fn(model: SegModel, output: str, eval_batch: int, num_sites: int,
                    layout: Optional[sharding_lib.SiteLayout] = None):
  """Jitted `predict(params, model_state, images[K,N,H,W,C] uint8) -> dict` of uint8
  binary predictions [K,N,H,W,nc] (threshold 0.5), probabilities, and HC peak maps.
  N must be a multiple of `eval_batch` (`stack_splits(pad_multiple=...)`). K is the
  layout's `num_total` (padding sites predict too; callers read the first num_sites)."""
  use_hc = output == "hc"
  layout = layout or sharding_lib.single_device_layout(num_sites)

  def site_predict(params, model_state, site, images, heads):
    variables = {"params": params, **model_state}

    def batch(xb):
      out = model.apply(variables, xb.astype(jnp.float32) / 255.0, site, train=False,
                        heads=heads if use_hc else None)
      probs = out["hc"] if use_hc else out["probs"]
      peaks = out["peaks"] if use_hc else jnp.zeros_like(probs)
      return {"pred": (probs > 0.5).astype(jnp.uint8), "prob": probs, "peaks": peaks.astype(jnp.uint8)}

    n = images.shape[0]
    chunks = images.reshape((n // eval_batch, eval_batch) + images.shape[1:])
    out = lax.map(batch, chunks)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)

  def local_predict(params, model_state, images):
    heads = _all_heads(params, num_sites) if use_hc else None
    return jax.vmap(site_predict, in_axes=(0, 0, 0, 0, None))(
        params, model_state, _site_ids(images.shape[0], num_sites), images, heads)

  def predict(params, model_state, images):
    specs = (layout.specs(params), layout.specs(model_state), P(AXIS))
    return jax.shard_map(local_predict, mesh=layout.mesh, in_specs=specs, out_specs=P(AXIS))(
        params, model_state, images)

  return jax.jit(predict)
